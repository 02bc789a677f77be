"""User data: page datasets, triples files and BEIR sets (read with one-line errors), and datasets made from your PDFs."""
