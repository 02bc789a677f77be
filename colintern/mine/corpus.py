"""What mining searches: the pages of a page dataset (with their queries), or local pages named by a triples file
(and every image under --pages), deduplicated."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


from colintern.errors import UserError
from colintern.settings import MineConfig
from colintern.index.sources import IMAGE_SUFFIXES


log = logging.getLogger("colintern.mine")




@dataclass
class Corpus:
    """What mining reads: rows of (query or None, page image), and how to name them in messages and output."""

    dataset: Any                           # columns query (None: a page no query asks for), image, image_filename
    name: str                              # the dataset id or the triples file (meta, store identity)
    split: str | None
    label: str                             # for messages: "dataset NAME split S" / "FILE"
    where: Callable[[int], str]            # a row in messages: "NAME row 3", "FILE line 4", "pages/x.png"
    path_of_row: Callable[[int], str]      # a row's page in the output triples
    page_only: frozenset[int] = frozenset()
    paths_doc: str = ""                    # what the output paths are, for the meta


def load_corpus(config: MineConfig, report: Any) -> Corpus:
    """The corpus of --hub_name (a page dataset) or of --train_jsonl/--root (+ --pages): every form train.py
    trains on (docs/CONTRACT.md §7)."""
    from colintern.data.datasets import load_page_dataset, pseudo_path

    if config.train_jsonl:
        return local_corpus(config.train_jsonl, config.root, config.pages, report)
    name = config.hub_name
    assert name is not None  # MineConfig.check: --hub_name or --train_jsonl
    dataset = load_page_dataset(name, config.split, strict=False)
    if config.limit is not None and config.limit < len(dataset):
        dataset = dataset.select(range(config.limit))
    if len(dataset) == 0:
        raise UserError(f"dataset {config.hub_name} split {config.split} is empty: nothing to mine")
    return Corpus(dataset, name, config.split, f"dataset {name} split {config.split}",
                  where=lambda row: f"{name} row {row}",
                  path_of_row=lambda row: pseudo_path(name, config.split, row),
                  paths_doc="<dataset>/<split>/doc_<row>.png pseudo-paths (row = the page's representative row)")


class LocalRows:
    """The few `datasets.Dataset` calls mining makes (len, column access, row access, select, select_columns), over
    in-memory columns: mining local pages needs no `datasets` package (the GPU machines of docs/BENCHMARKS.md have
    none). Image values are {"path", "bytes"} dicts, as datasets.Image(decode=False) gives them."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            return self.columns[key]
        return {name: values[key] for name, values in self.columns.items()}

    def select_columns(self, names: list[str]) -> "LocalRows":
        return LocalRows({name: self.columns[name] for name in names})

    def select(self, indices: Any) -> "LocalRows":
        rows = list(indices)
        return LocalRows({name: [values[i] for i in rows] for name, values in self.columns.items()})


def local_corpus(triples_path: str, root: str | None, pages_dir: str | None, report: Any) -> Corpus:
    """Local pages: each triple's query asks for its positive (queries and positives are the file's); the pages
    are every distinct pos and neg path, plus with pages_dir every image file under it. Output paths are written
    as the file writes them (relative to --root), so train.py --train_jsonl OUT --root DIR reads them back."""
    from colintern.data.report import BadRowError
    from colintern.data.datasets import parse_pseudo_path
    from colintern.data.triples import read_triples_jsonl

    base = Path(root) if root else Path(".")
    triples, _ = read_triples_jsonl(triples_path, strict=report.strict, report=report)
    rows: dict[str, list] = {"query": [], "image": [], "image_filename": []}
    wheres: list[str] = []
    seen: set[str] = set()

    def add(query: str | None, path: str, where: str) -> bool:
        pseudo = parse_pseudo_path(path)
        if pseudo is not None and not (base / path).is_file():
            name = pseudo[0]
            raise UserError(f"{where}: {path} is a row of dataset {name}; mine that dataset with --hub_name {name}")
        key = os.path.normpath(path)
        file = Path(path) if Path(path).is_absolute() else base / path
        if not file.is_file():
            report.add_error(BadRowError(where, f"missing image: file not found: {file}"))
            return False
        if query is None and key in seen:
            return True
        seen.add(key)
        rows["query"].append(query)
        rows["image"].append({"path": str(file.resolve()), "bytes": None})
        rows["image_filename"].append(key)
        wheres.append(where)
        return True

    for t in triples:
        add(t.query, t.pos, f"{triples_path} line {t.line}")
    n_queries = len(wheres)
    for t in triples:
        for neg in t.negs:
            add(None, neg, f"{triples_path} line {t.line} (negative {neg})")
    if pages_dir:
        files = sorted(p for p in Path(pages_dir).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"--pages {pages_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        for file in files:
            rel = os.path.relpath(file, base)
            add(None, rel, rel)
    if not n_queries:
        raise UserError(f"{triples_path}: no triple has a usable positive page ({report.summary()})")
    dataset = LocalRows(rows)
    log.info("local corpus %s: %d queries, %d distinct pages", triples_path, n_queries, len(set(rows["image_filename"])))
    return Corpus(dataset, str(Path(triples_path).resolve()), None, str(triples_path), where=wheres.__getitem__,
                  path_of_row=rows["image_filename"].__getitem__, page_only=frozenset(range(n_queries, len(wheres))),
                  paths_doc="image paths relative to --root, as the input triples write them")
