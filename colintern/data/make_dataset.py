"""Your PDFs in, a training and an evaluation set out: python -m colintern.data.make_dataset --inputs PDFS_OR_FOLDERS --out OUT

    OUT/pages/<document>/page-NNN.png   the training documents' pages, rendered (--dpi)
    OUT/train.jsonl                     {"query", "pos", "negs": []} per query, paths relative to OUT, so that
                                        train.py --train_jsonl OUT/train.jsonl --root OUT and mine.py read it as is
    OUT/eval/                           a BEIR-layout set (corpus.jsonl, queries.jsonl, qrels.jsonl, pages/) of the
                                        held-out documents: eval.py --local_dataset OUT/eval; each corpus row
                                        also holds its page's text layer ("text"), for text baselines
    OUT/dataset.json                    what was made from what: inputs (sha256), settings, counts, skipped pages

Queries come from each page's own text layer (pypdfium2): its sentences and lines, without the boilerplate a page
shares with the rest of its document (headers, footers, running titles: lines on at least --boilerplate_share of
its pages), page numbers, fragments shorter than --min_words or longer than --max_words words and text that is
mostly not letters (tables, code); a sentence
that occurs on more than one page is dropped (it would have two right answers). Up to --queries_per_page per page,
the longest first. Pages without a text layer or without a usable sentence are reported and left out.

--generator MODEL: the queries are written instead by a vision-language model looking at each rendered page
(colintern/data/generate_queries.py: the prompt, greedy decoding, batched, resumable), filtered the same way; scans
without a text layer get queries too. dataset.json records the model and the prompt.

Evaluation is held out by document, not by page: pages of one document share their layout and vocabulary, so a
split by page would score the model on near-copies of what it trained on. --eval_fraction of the documents (at
least one) go to OUT/eval; the choice is deterministic (--seed) and recorded in dataset.json.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from colintern.cli import parse_config, run_cli, save_config, setup_logging
from colintern.errors import UserError
from colintern.files import atomic_write, atomic_write_json, atomic_write_text, display, file_sha256, make_output_dir
from colintern.settings import DatasetConfig

log = logging.getLogger("colintern.data.make_dataset")
OUT_FLAG = "--out"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
HEADING_WORDS = 6  # a line of at most this many words without closing punctuation is a heading
PAGE_NUMBER = re.compile(r"^(page\s*)?([0-9]+|[ivxlcdm]+)(\s*(of|/)\s*[0-9]+)?$", re.IGNORECASE)


@dataclass
class Page:
    """One PDF page: where it came from, its text layer's candidate sentences, the queries kept."""

    document: str        # the document's folder name under pages/ (its stem and a short hash: unique)
    source: str          # the PDF's path
    number: int          # 1-based
    lines: list[str]
    queries: list[str] = field(default_factory=list)
    image: str = ""      # path relative to the set's root


def parse_args(argv: list[str] | None) -> DatasetConfig:
    """make_dataset's flags (and --config FILE) as a DatasetConfig."""
    return parse_config(DatasetConfig, argv, __doc__, prog="python -m colintern.data.make_dataset")


# -- text layer -> queries ----------------------------------------------------------------------------------
def clean(text: str) -> str:
    return " ".join(text.split())


def text_lines(page_text: str) -> list[str]:
    """The text layer's lines, whitespace folded; words hyphenated across a line break joined again (pdfium marks
    the break of a soft hyphen with U+FFFE)."""
    text = re.sub(r"[\ufffe\u00ad]\r?\n", "", page_text).replace("\ufffe", "").replace("\u00ad", "")
    return [clean(line) for line in text.splitlines() if clean(line)]


def sentences(lines: list[str]) -> list[str]:
    """The sentences of a page's (non-boilerplate) lines: split at sentence ends, list bullets and headings (a short
    line that ends without punctuation stands alone), section numbers ("2.1", "1.3.") taken off their front."""
    blocks: list[str] = []
    current: list[str] = []
    for line in lines:
        if len(line.split()) <= HEADING_WORDS and not line.endswith((".", ",", ";", ":", "-")):
            blocks += [" ".join(current), line]
            current = []
        else:
            current.append(line)
    blocks.append(" ".join(current))
    parts = [part for block in blocks for part in
             re.split(r"(?<=[.!?:;])\s+(?=[A-Z0-9\"'(])|\s*[•▪◦●]\s*", block)]
    out = [re.sub(r"^(?:\d+(?:\.\d+)*\.?\s+)+", "", clean(part)) for part in parts]
    return [part for part in out if part]


def line_shape(line: str) -> str:
    """A line with its digits folded, so a running header or footer with the page number in it repeats."""
    return re.sub(r"\d+", "#", line)


def is_query(text: str, min_words: int, max_words: int) -> bool:
    """A sentence a person could have typed: min_words to max_words words, mostly letters, not a page number or a
    table-of-contents line."""
    words = text.split()
    letters = sum(ch.isalpha() for ch in text)
    return min_words <= len(words) <= max_words and letters >= 0.6 * len(text.replace(" ", "")) \
        and not PAGE_NUMBER.match(text) and "...." not in text and ". . ." not in text


def choose_queries(pages: list[Page], config: DatasetConfig) -> None:
    """Fill each page's queries: its sentences without its document's boilerplate lines, without sentences found
    on two pages, longest first."""
    by_document: dict[str, list[Page]] = {}
    for page in pages:
        by_document.setdefault(page.document, []).append(page)
    boilerplate: set[tuple[str, str]] = set()
    for document, members in by_document.items():  # digits folded: "Chapter 2: Parsing 4" on page 4 is a header
        counts = Counter(shape for page in members for shape in {line_shape(line) for line in page.lines})
        least = max(2, config.boilerplate_share * len(members))
        boilerplate |= {(document, shape) for shape, n in counts.items() if n >= least}
    found = [sentences([line for line in page.lines if (page.document, line_shape(line)) not in boilerplate
                        and not PAGE_NUMBER.match(line)]) for page in pages]
    for page, usable in zip(pages, unique_queries(found, config)):
        usable.sort(key=lambda s: (-len(s.split()), s))
        page.queries = list(dict.fromkeys(usable))[:config.queries_per_page]


def unique_queries(candidates: list[list[str]], config: DatasetConfig) -> list[list[str]]:
    """Each page's candidate queries that pass the query filter and occur on no other page (case folded): a query
    found on two pages would have two right answers."""
    seen = Counter(q.lower() for page in candidates for q in set(page))
    return [[q for q in page if seen[q.lower()] == 1 and is_query(q, config.min_words, config.max_words)]
            for page in candidates]


# -- documents ----------------------------------------------------------------------------------------------
def read_documents(files: list[Path]) -> tuple[list[Page], list[dict[str, Any]], list[tuple[str, str]]]:
    """Every page's text lines; (pages, documents for dataset.json, [(where, why)] for unreadable files)."""
    import pypdfium2 as pdfium

    from colintern.index.sources import pdf_page_count

    pages, documents, bad = [], [], []
    for path in files:
        if path.suffix.lower() != ".pdf":
            bad.append((display(path), "not a PDF (images have no text layer: index them with search.py)"))
            continue
        try:
            count = pdf_page_count(path)
        except ValueError as err:
            bad.append((display(path), f"bad PDF: {err}"))
            continue
        sha = file_sha256(path)
        name = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', path.stem)[:60]}-{sha[:8]}"
        document = pdfium.PdfDocument(str(path))
        try:
            for number in range(1, count + 1):
                text = document[number - 1].get_textpage().get_text_range()
                pages.append(Page(name, str(path), number, text_lines(text)))
        finally:
            document.close()
        documents.append({"document": name, "file": str(path), "sha256": sha, "pages": count})
    return pages, documents, bad


def hold_out(documents: list[dict[str, Any]], fraction: float, seed: int) -> set[str]:
    """The documents of the evaluation set: round(fraction * n), at least one, chosen by a seeded shuffle of the
    documents' sha256 order (so the choice does not depend on file names or the order of --inputs)."""
    if fraction == 0:
        return set()
    if len(documents) < 2:
        raise UserError("a split by document needs at least two PDFs with usable text (evaluation holds out whole "
                        "documents); give more --inputs, or --eval_fraction 0 for a training set only")
    order = sorted(documents, key=lambda d: d["sha256"])
    random.Random(seed).shuffle(order)
    n = min(len(order) - 1, max(1, round(fraction * len(order))))
    return {d["document"] for d in order[:n]}


def save_png(image: Any, f: IO[bytes]) -> None:
    image.save(f, format="PNG")


def render(pages: list[Page], root: Path, dpi: int) -> None:
    """Render each page with queries to root/pages/<document>/page-NNN.png; page.image relative to root."""
    from tqdm.auto import tqdm

    from colintern.index.sources import PageSource, render_page

    for page in tqdm(pages, desc="render pages", unit="page", disable=not sys.stderr.isatty()):
        relative = Path("pages") / page.document / f"page-{page.number:03d}.png"
        image = render_page(PageSource(page.source, "", page.number, "pdf"), dpi)
        atomic_write(root / relative, partial(save_png, image))
        page.image = relative.as_posix()


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_sets(train: list[Page], held: list[Page], out: Path) -> dict[str, int]:
    atomic_write_text(out / "train.jsonl", jsonl([{"query": q, "pos": p.image, "negs": []}
                                                  for p in train for q in p.queries]))
    counts = {"train_pages": len(train), "train_queries": sum(len(p.queries) for p in train)}
    if held:
        # "text": the page's own text layer, for text baselines (BM25, text embedders) scored on the same pages
        corpus = [{"corpus-id": f"{p.document}/page-{p.number:03d}", "image": p.image, "text": "\n".join(p.lines)}
                  for p in held]
        queries, qrels = [], []
        for p in held:
            for k, q in enumerate(p.queries, start=1):
                qid = f"{p.document}/page-{p.number:03d}/q{k}"
                queries.append({"query-id": qid, "query": q})
                qrels.append({"query-id": qid, "corpus-id": f"{p.document}/page-{p.number:03d}", "score": 1})
        for name, rows in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
            atomic_write_text(out / "eval" / f"{name}.jsonl", jsonl(rows))
        counts.update(eval_pages=len(held), eval_queries=len(queries))
    return counts


def prepare_out(config: DatasetConfig) -> Path:
    """The output folder, checked (created later, once the split is known): new, empty, a dataset to replace
    (--overwrite), or an interrupted --generator run (its generated.jsonl and no dataset.json yet), which continues."""
    from colintern.data.generate_queries import CACHE

    out = Path(config.out)
    if out.is_dir() and config.generator and (out / CACHE).is_file() and not (out / "dataset.json").is_file():
        log.info("%s holds an unfinished --generator run: continuing it", display(out))
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not config.overwrite or not out.is_dir():
            raise UserError(f"--out {config.out} exists and is not an empty folder; choose a new one or pass "
                            "--overwrite")
        if not (out / "dataset.json").is_file():
            raise UserError(f"--out {config.out} is not a dataset this command wrote (no dataset.json); --overwrite "
                            "replaces only those")
        shutil.rmtree(out)
    return out


def generated_queries(pages: list[Page], documents: list[dict[str, Any]], config: DatasetConfig,
                      out: Path) -> tuple[set[str], dict[str, Any]]:
    """--generator: render every page, have the model write its questions, keep those that pass the query filter
    and occur on one page only; (the held-out documents, what dataset.json records about the generator)."""
    from colintern.data.generate_queries import generate_questions
    from colintern.device import resolve_device

    held = hold_out(documents, config.eval_fraction, config.seed)
    make_output_dir(out, OUT_FLAG)
    render([p for p in pages if p.document not in held], out, config.dpi)
    render([p for p in pages if p.document in held], out / "eval", config.dpi)
    images = [(out / "eval" if p.document in held else out) / p.image for p in pages]  # where each was rendered
    record = generate_questions(pages, images, out, config.generator or "", resolve_device(config.device),
                                config.queries_per_page, config.max_new_tokens, config.batch_size)
    for page, image, usable in zip(pages, images, unique_queries([p.queries for p in pages], config)):
        page.queries = usable[:config.queries_per_page]
        if not page.queries:
            image.unlink(missing_ok=True)
    return held, record


def why_left_out(page: Page, generated: bool) -> str:
    """Why a page has no query, as dataset.json records it."""
    if generated:
        return "no usable generated question"
    return "no text layer" if not page.lines else "no usable sentence"


HINTS = {"no text layer": " (a scan? OCR it first, or use --generator)",
         "no usable generated question": " (none passed the query filter, or each was also written for another page)"}


def make_dataset(config: DatasetConfig) -> dict[str, Any]:
    """Everything the command does; returns what dataset.json records."""
    from colintern.index.sources import find_inputs

    files = find_inputs(config.inputs)
    pages, documents, bad = read_documents(files)
    for where, why in bad:
        log.warning("skipped %s: %s", where, why)
    if not documents:
        raise UserError("no readable PDF among --inputs; nothing to make")
    out = prepare_out(config)
    generator = None
    if config.generator:
        held, generator = generated_queries(pages, documents, config, out)
    else:
        choose_queries(pages, config)
        usable = {p.document for p in pages if p.queries}  # a document without a usable page cannot be held out
        held = hold_out([d for d in documents if d["document"] in usable], config.eval_fraction, config.seed)
    empty = [p for p in pages if not p.queries]
    for p in empty:
        why = why_left_out(p, bool(generator))
        log.warning("%s page %d: %s%s; left out", display(p.source), p.number, why, HINTS.get(why, ""))
    kept = [p for p in pages if p.queries]
    if not kept:
        raise UserError("no page has a usable " + ("generated question" if generator else "sentence in its text "
                                                   "layer") + "; nothing to make")
    if not generator:
        make_output_dir(out, OUT_FLAG)
        render([p for p in kept if p.document not in held], out, config.dpi)
        render([p for p in kept if p.document in held], out / "eval", config.dpi)
    counts = write_sets([p for p in kept if p.document not in held], [p for p in kept if p.document in held], out)
    record = {"command": "python -m colintern.data.make_dataset",
              "queries_from": "generator" if generator else "text layer", **({"generator": generator} if generator
                                                                             else {}),
              "settings": {k: getattr(config, k) for k in ("eval_fraction", "queries_per_page", "min_words",
                                                         "max_words", "boilerplate_share", "dpi", "seed")},
              "documents": [{**d, "split": "eval" if d["document"] in held else "train"} for d in documents],
              "counts": {**counts, "pages_left_out": len(empty), "files_skipped": len(bad)},
              "left_out": [{"file": p.source, "page": p.number, "why": why_left_out(p, bool(generator))}
                           for p in empty],
              "skipped_files": [{"file": where, "why": why} for where, why in bad]}
    atomic_write_json(out / "dataset.json", record)
    save_config(config, out / "dataset_config.yaml", "python -m colintern.data.make_dataset")
    return record


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.verbose)
    record = make_dataset(config)
    counts = record["counts"]
    held = [d["document"] for d in record["documents"] if d["split"] == "eval"]
    print(f"{counts['train_queries']} training queries on {counts['train_pages']} pages -> {config.out}/train.jsonl"
          + (f"; {counts['eval_queries']} evaluation queries on {counts['eval_pages']} pages of {len(held)} "
             f"held-out document(s) -> {config.out}/eval" if held else "")
          + (f"; {counts['pages_left_out']} page(s) left out (see the warnings)" if counts["pages_left_out"] else ""))
    return 0


def console() -> None:
    sys.exit(run_cli(main, out_flag=OUT_FLAG))


if __name__ == "__main__":
    console()
