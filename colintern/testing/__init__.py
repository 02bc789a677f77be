"""What the tests and demos build: tiny models of each family, a toy tokenizer and synthetic page sets."""
