"""BEIR-layout evaluation folders (docs/CONTRACT.md §7): corpus, queries and qrels as .jsonl or .parquet, with
page images as bytes or paths relative to the folder."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator


from colintern.errors import UserError
from colintern.data.report import BadRowError
from colintern.data.images import decode_image
from colintern.data.triples import jsonl_objects


log = logging.getLogger("colintern.data.datasets")


def _beir_files(root: Path, name: str) -> list[Path]:
    """The file(s) holding one BEIR table: NAME.jsonl, NAME.parquet, or a NAME/ folder of those."""
    for candidate in (root / f"{name}.jsonl", root / f"{name}.parquet"):
        if candidate.is_file():
            return [candidate]
    folder = root / name
    if folder.is_dir():
        files = sorted(folder.glob("*.parquet")) or sorted(folder.glob("*.jsonl"))
        if files:
            return files
    raise UserError(f"{root}: missing {name}.jsonl or {name}.parquet (BEIR layout needs corpus, queries, qrels)")


def _beir_rows(files: list[Path], root: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) for every row of a BEIR table; "FILE line N" for JSONL, "FILE row N" for parquet."""
    for file in files:
        label = str(file.relative_to(root))
        if file.suffix == ".jsonl":
            for where, _, row in jsonl_objects(file, label):
                if isinstance(row, BadRowError):
                    raise UserError(str(row))  # an evaluation set is used whole: a bad line stops the run
                yield where, row
        else:
            import pyarrow.parquet as pq

            try:
                parquet = pq.ParquetFile(file)
            except Exception as err:
                raise UserError(f"{label}: cannot read parquet: {err}") from None
            index = 0
            for batch in parquet.iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    yield f"{label} row {index}", row
                    index += 1


def _field(row: dict, names: tuple[str, ...], where: str, what: str) -> Any:
    """The first of several accepted column names present in a row (UserError if none)."""
    for name in names:
        if row.get(name) is not None:
            return row[name]
    raise UserError(f"{where}: missing {what} (expected key {' or '.join(repr(n) for n in names)})")


def _image_ref(value: Any, root: Path) -> bytes | str | None:
    """Normalise a corpus image to embedded bytes or an absolute path string."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) if value else None
    if isinstance(value, str) and value:
        return str(Path(value) if Path(value).is_absolute() else root / value)
    return None


def load_beir_dir(path: str, check_images: bool = True) -> tuple[dict[str, bytes | str], dict[str, str],
                                                                 dict[str, dict[str, int]]]:
    """Read a local BEIR-layout evaluation set: (corpus id -> image bytes or absolute path, queries, qrels).

    Any problem is a UserError naming the file and line/row: missing table, malformed row, duplicate id,
    a qrel pointing at an unknown corpus-id or query-id, or (check_images) an image that cannot be decoded.
    """
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"evaluation set not found: {path} is not a directory")
    corpus_files, query_files, qrel_files = (_beir_files(root, n) for n in ("corpus", "queries", "qrels"))

    corpus: dict[str, bytes | str] = {}
    for where, row in _beir_rows(corpus_files, root):
        cid = str(_field(row, ("corpus-id", "_id", "id"), where, "corpus-id"))
        if cid in corpus:
            raise UserError(f"{where}: duplicate corpus-id {cid!r}")
        ref = _image_ref(row.get("image"), root)
        if ref is None:
            raise UserError(f"{where}: corpus-id {cid!r} has no image")
        if check_images:
            decode_image(ref, where=f"{where}: corpus-id {cid!r}")  # raises BadRowError (a UserError)
        corpus[cid] = ref

    queries: dict[str, str] = {}
    for where, row in _beir_rows(query_files, root):
        qid = str(_field(row, ("query-id", "_id", "id"), where, "query-id"))
        if qid in queries:
            raise UserError(f"{where}: duplicate query-id {qid!r}")
        text = _field(row, ("query", "text"), where, "query text")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: query-id {qid!r} has an empty query")
        queries[qid] = text

    qrels: dict[str, dict[str, int]] = {}
    corpus_label, queries_label = corpus_files[0].relative_to(root), query_files[0].relative_to(root)
    for where, row in _beir_rows(qrel_files, root):
        qid = str(_field(row, ("query-id",), where, "query-id"))
        cid = str(_field(row, ("corpus-id",), where, "corpus-id"))
        if qid not in queries:
            raise UserError(f"{where}: unknown query-id {qid!r} (not in {queries_label})")
        if cid not in corpus:
            raise UserError(f"{where}: unknown corpus-id {cid!r} (not in {corpus_label})")
        try:
            score = int(row.get("score", 1))
        except (TypeError, ValueError):
            raise UserError(f"{where}: score must be an integer, got {row.get('score')!r}") from None
        qrels.setdefault(qid, {})[cid] = score
    if not qrels:
        raise UserError(f"{path}: qrels are empty")
    unjudged = sum(1 for q in queries if q not in qrels)
    log.info("loaded evaluation set %s: %d pages, %d queries (%d without qrels), %d qrels", path, len(corpus),
             len(queries), unjudged, sum(len(v) for v in qrels.values()))
    return corpus, queries, qrels
