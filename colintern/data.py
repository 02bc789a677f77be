"""Data layer (docs/CONTRACT.md §7): page datasets, image decoding, pseudo-paths, triples files, BEIR evaluation dirs.

Everything that reads user data lives here so that train.py, mine.py and eval.py report bad input the same way:
a bad row is a `BadRowError(where, reason)` with `where` = "FILE line N" (JSONL, 1-based) or "NAME row N"
(datasets, the 0-based dataset index that pseudo-paths use too); callers collect them in a `SkipReport`, which
logs each one, counts them by reason and, with strict=True, turns the first into a fatal error.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from colintern.errors import UserError
from colintern.processor import PageModeError, page_size_note, page_size_problem, to_rgb  # one rule for the API and the batch jobs

log = logging.getLogger("colintern.data")

REQUIRED_COLUMNS = ("query", "image")
_PSEUDO_RE = re.compile(r"^(?P<name>.+)/(?P<split>[^/]+)/doc_(?P<index>\d+)\.png$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class BadRowError(UserError):
    """One unusable item (row, line, image); str() is "WHERE: REASON", REASON starting with a short kind."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


# ---------------------------------------------------------------- skip reporting


@dataclass(frozen=True)
class SkippedRow:
    """An item that was skipped, where it was and why."""

    where: str
    reason: str

    @property
    def kind(self) -> str:
        """The reason's category, e.g. "corrupt image" for "corrupt image: not a recognised image format"."""
        return self.reason.split(":", 1)[0].strip()


class SkipReport:
    """Collects skipped items; logs each as a warning; strict=True raises on the first. Nothing is skipped silently."""

    def __init__(self, strict: bool = False, logger: logging.Logger | None = None) -> None:
        self.strict = strict
        self.items: list[SkippedRow] = []
        self._log = logger or log

    def add(self, where: str, reason: str) -> None:
        """Record a skipped item (or raise BadRowError when strict)."""
        if self.strict:
            raise BadRowError(where, reason)
        self.items.append(SkippedRow(where, reason))
        self._log.warning("skipped %s: %s", where, reason)

    def add_error(self, error: BadRowError) -> None:
        """Record a BadRowError (or re-raise it when strict)."""
        if self.strict:
            raise error
        self.add(error.where, error.reason)

    @property
    def count(self) -> int:
        """Number of skipped items."""
        return len(self.items)

    def counts(self) -> dict[str, int]:
        """Skipped items by reason kind, most frequent first."""
        return dict(Counter(item.kind for item in self.items).most_common())

    def summary(self) -> str:
        """One line: how many items were skipped and why."""
        if not self.items:
            return "skipped 0 items"
        parts = ", ".join(f"{kind} x{n}" for kind, n in self.counts().items())
        return f"skipped {len(self.items)} item{'s' if len(self.items) != 1 else ''}: {parts}"


# ---------------------------------------------------------------- images


def _png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG header, or None if data is not a PNG (used to name 0x0 PNGs PIL rejects)."""
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    return None


def _read_source(value: Any, where: str) -> bytes:
    """The encoded image bytes behind a datasets {"bytes","path"} dict, raw bytes or a file path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return _read_source(value["path"], where)
        raise BadRowError(where, "missing image: no bytes and no path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise BadRowError(where, "missing image: empty bytes")
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise BadRowError(where, f"missing image: file not found: {path}")
        try:
            return path.read_bytes()
        except OSError as err:
            raise BadRowError(where, f"missing image: cannot read {path}: {err.strerror or err}") from None
    raise BadRowError(where, f"missing image: unsupported image value of type {type(value).__name__}")


def _check_size(width: int, height: int, where: str) -> None:
    problem = page_size_problem(width, height)
    if problem:
        raise BadRowError(where, problem)


def _note_size(width: int, height: int, where: str) -> None:
    note = page_size_note(width, height)
    if note:
        log.warning("%s: %s", where, note)


def decode_image(value: Any, where: str) -> Image.Image:
    """Decode a page image to RGB; BadRowError(where, reason) for missing, corrupt, truncated, empty or extreme images.

    value: a datasets {"bytes", "path"} dict, a PIL image, raw encoded bytes or a file path.
    """
    if value is None:
        raise BadRowError(where, "missing image: no image value")
    if isinstance(value, Image.Image):
        _check_size(value.width, value.height, where)
        _note_size(value.width, value.height, where)
        try:
            return to_rgb(value)
        except PageModeError as err:
            raise BadRowError(where, str(err)) from None
    data = _read_source(value, where)
    try:
        with warnings.catch_warnings():  # PIL's DecompressionBombWarning: said once, in our words (_note_size)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                _check_size(image.width, image.height, where)  # from the header: reject before decoding pixels
                _note_size(image.width, image.height, where)
                image.load()
                return to_rgb(image)
    except BadRowError:
        raise
    except PageModeError as err:
        raise BadRowError(where, str(err)) from None
    except Image.DecompressionBombError as err:
        raise BadRowError(where, f"image too large: {err}") from None
    except Image.UnidentifiedImageError:
        size = _png_size(data)
        if size is not None and 0 in size:
            raise BadRowError(where, f"empty image: {size[0]}x{size[1]} pixels") from None
        raise BadRowError(where, f"corrupt image: not a recognised image format ({len(data)} bytes)") from None
    except OSError as err:
        if "truncated" in str(err).lower():
            raise BadRowError(where, f"truncated image: {err} ({len(data)} bytes)") from None
        raise BadRowError(where, f"corrupt image: {err}") from None
    except (SyntaxError, ValueError, EOFError, struct.error, IndexError) as err:
        raise BadRowError(where, f"corrupt image: {type(err).__name__}: {err}") from None


def image_bytes(value: Any, where: str = "image") -> bytes:
    """Bytes identifying an image value (encoded bytes, or raw pixels for a PIL image), for hashing."""
    if isinstance(value, Image.Image):
        return f"{value.mode}{value.size}".encode() + value.tobytes()
    return _read_source(value, where)


# ---------------------------------------------------------------- page datasets


def _is_save_to_disk_dir(path: Path) -> bool:
    """True for a directory written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _looks_like_path(name: str) -> bool:
    """True if name is meant as a local path (so a missing one is 'not found', not a hub lookup)."""
    return (name.startswith(("/", "./", "../", "~")) or "\\" in name or name.endswith((".parquet", ".arrow"))
            or not _HUB_ID_RE.match(name))


def _local_cache_dir(folder: Path) -> str:
    """A datasets cache directory private to one local repository folder and the current state of its files.

    datasets keys the Arrow cache of a folder whose README declares `configs` by folder name and card only,
    so two folders with the same name (e.g. two generated synthetic corpora), or a regenerated folder, would
    silently share stale rows. Keying by resolved path + file sizes and mtimes makes the cache exact.
    """
    import datasets

    stamp = hashlib.sha1(str(folder.resolve()).encode())
    for file in sorted(folder.rglob("*")):
        rel = file.relative_to(folder)
        if file.is_file() and not any(part.startswith(".") for part in rel.parts):
            stat = file.stat()
            stamp.update(f"\0{rel.as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "colintern_local" / stamp.hexdigest()[:16])


def _check_metadata_utf8(folder: Path) -> None:
    """An image folder's metadata.jsonl/.csv must be UTF-8: datasets would fail deep inside its builder (a long
    traceback) on the first bad byte; name the file and line instead. (Its rows cannot be skipped one by one:
    the builder reads the whole file.)"""
    for meta in sorted(folder.rglob("metadata.jsonl")) + sorted(folder.rglob("metadata.csv")):
        with open(meta, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise UserError(f"{meta} line {number}: not valid UTF-8: byte 0x{raw[err.start]:02x} at byte "
                                    f"{err.start + 1} of the line; save the file as UTF-8") from None


def load_page_dataset(name_or_path: str, split: str = "train", strict: bool = False) -> Any:
    """Load a page dataset (query + image columns) from a hub id, a local folder, save_to_disk output or parquet.

    One path for hub ids and local repository folders (datasets.load_dataset); save_to_disk directories use
    load_from_disk; a .parquet file or glob uses the parquet builder. The image column is left undecoded
    (decode it per row with decode_image) so one corrupt image cannot crash an iterator.
    strict=True also decodes every row now and raises BadRowError ("NAME row N: reason") on the first bad one.
    """
    import datasets  # heavy import, deferred

    path = Path(os.path.expanduser(name_or_path))
    has_glob = any(ch in name_or_path for ch in "*?[")
    try:
        if has_glob or path.is_file():
            files = sorted(glob.glob(os.path.expanduser(name_or_path))) if has_glob else [str(path)]
            if not files:
                raise UserError(f"cannot load dataset {name_or_path}: no files match")
            bad = [f for f in files if not f.endswith(".parquet")]
            if bad:
                raise UserError(f"cannot load dataset {name_or_path}: expected .parquet files, got {bad[0]}")
            dataset = datasets.load_dataset("parquet", data_files={split: files}, split=split)
        elif path.is_dir() and _is_save_to_disk_dir(path):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UserError(f"cannot load dataset {name_or_path}: no split {split!r} "
                                    f"(splits: {', '.join(loaded)})")
                loaded = loaded[split]
            dataset = loaded
        elif path.is_dir():
            _check_metadata_utf8(path)
            dataset = datasets.load_dataset(str(path), split=split, cache_dir=_local_cache_dir(path))
        elif not _looks_like_path(name_or_path):
            dataset = datasets.load_dataset(name_or_path, split=split)
        else:
            raise UserError(f"cannot load dataset {name_or_path}: no such file or directory")
    except UserError:
        raise
    except ConnectionError as err:
        if datasets.config.HF_HUB_OFFLINE:
            raise UserError(f"cannot load dataset {name_or_path}: not found locally and the hub is unreachable "
                            f"(HF_HUB_OFFLINE=1); pass a local directory or parquet files") from None
        raise UserError(f"cannot load dataset {name_or_path}: the hub is unreachable and it is not cached "
                        f"({err}); pass a local directory or parquet files") from None
    except datasets.exceptions.DatasetNotFoundError as err:
        raise UserError(f"cannot load dataset {name_or_path}: {err}") from None
    except ValueError as err:  # e.g. unknown split
        raise UserError(f"cannot load dataset {name_or_path}: {err}") from None
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"cannot load dataset {name_or_path}: {err}") from None

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise UserError(f"cannot load dataset {name_or_path}: got several splits, expected one")
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise UserError(f"dataset {name_or_path} lacks column(s) {', '.join(missing)}; "
                        f"found columns: {', '.join(dataset.column_names) or '(none)'}")
    if isinstance(dataset.features.get("image"), datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    log.info("loaded %s split %s: %d rows, columns %s", name_or_path, split, len(dataset),
             ", ".join(dataset.column_names))
    if strict:
        for _ in iter_page_rows(dataset, name_or_path, SkipReport(strict=True)):
            pass
    return dataset


def clean_query(value: Any, where: str) -> str:
    """A dataset row's query text, stripped; BadRowError for a missing, non-string or empty query (API input is
    validated unchanged by processor.require_query_text)."""
    if value is None:
        raise BadRowError(where, "empty query: missing")
    if not isinstance(value, str):
        raise BadRowError(where, f"empty query: expected a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise BadRowError(where, "empty query: blank text")
    return text


@dataclass
class PageRow:
    """One usable dataset row: its index, query, page key and (if decoded) RGB image."""

    index: int
    query: str
    key: str
    image: Image.Image | None = None


def iter_page_rows(dataset: Any, name: str, report: SkipReport, decode: bool = True) -> Iterator[PageRow]:
    """Yield the dataset's usable rows; bad ones ("NAME row N: reason") go to report (raising if strict).

    decode=False checks only the query (and that an image value exists), for callers that decode later.
    """
    has_filename = "image_filename" in dataset.column_names
    for index in range(len(dataset)):
        where = f"{name} row {index}"
        try:
            row = dataset[index]
        except Exception as err:  # a row the reader itself cannot materialise
            report.add(where, f"corrupt row: {type(err).__name__}: {err}")
            continue
        try:
            query = clean_query(row.get("query"), where)
            image = decode_image(row.get("image"), where) if decode else None
            if not decode and row.get("image") is None:
                raise BadRowError(where, "missing image: no image value")
            key = row["image_filename"] if has_filename and row.get("image_filename") else page_key(row, index)
        except BadRowError as err:
            report.add_error(err)
            continue
        yield PageRow(index, query, key, image)


def page_key(row: dict, index: int) -> str:
    """Identity of a row's page: image_filename when present, else "sha1:<hash of the image bytes>".

    Rows with the same key share a page (several queries per page); used to deduplicate pages.
    """
    filename = row.get("image_filename")
    if isinstance(filename, str) and filename:
        return filename
    try:
        return "sha1:" + hashlib.sha1(image_bytes(row.get("image"), f"row {index}")).hexdigest()
    except BadRowError:
        return f"row:{index}"  # no readable image: the row is its own page (and will be skipped when decoded)


def page_keys(dataset: Any) -> list[str]:
    """page_key for every row; reads the image_filename column directly when it exists (no image reads)."""
    if "image_filename" in dataset.column_names:
        names = dataset["image_filename"]
        if all(isinstance(n, str) and n for n in names):
            return list(names)
    return [page_key(dataset[i], i) for i in range(len(dataset))]


# ---------------------------------------------------------------- pseudo-paths


def pseudo_path(dataset_name: str, split: str, index: int) -> str:
    """The path that names row `index` of a dataset split, e.g. vidore/colpali_train_set/train/doc_42.png."""
    return f"{dataset_name}/{split}/doc_{index}.png"


def parse_pseudo_path(path: str) -> tuple[str, str, int] | None:
    """(dataset_name, split, index) for a pseudo-path, else None. Dataset names may contain slashes."""
    match = _PSEUDO_RE.match(path)
    if match is None:
        return None
    return match.group("name"), match.group("split"), int(match.group("index"))


class ImageResolver:
    """Turns the paths of a triples file into RGB images: local files (relative to root) or pseudo-paths.

    A path that exists as a file wins; otherwise a pseudo-path is row i of its dataset (each dataset loaded
    once with load_page_dataset and cached). Unusable images raise BadRowError naming the path.
    """

    def __init__(self, root: str | None = None) -> None:
        self.root = Path(root) if root else None
        self._datasets: dict[tuple[str, str], Any] = {}

    def _local(self, path: str) -> Path:
        """A path as a local file: absolute as is, relative under root (or the working directory)."""
        candidate = Path(os.path.expanduser(path))
        if candidate.is_absolute() or self.root is None:
            return candidate
        return self.root / candidate

    def dataset(self, name: str, split: str) -> Any:
        """The (cached) dataset split a pseudo-path points into; a local name may also be relative to root."""
        key = (name, split)
        if key not in self._datasets:
            location = name
            if self.root is not None and not Path(name).exists() and (self.root / name).exists():
                location = str(self.root / name)
            self._datasets[key] = load_page_dataset(location, split)
        return self._datasets[key]

    def locate(self, path: str) -> tuple[Path | None, tuple[str, str, int] | None]:
        """Where a path points: (local file, None) or (None, (dataset, split, row)); BadRowError if nowhere."""
        local = self._local(path)
        if local.is_file():
            return local, None
        parsed = parse_pseudo_path(path)
        if parsed is None:
            raise BadRowError(path, f"missing image: file not found: {local}")
        name, split, index = parsed
        dataset = self.dataset(name, split)
        if index >= len(dataset):
            raise BadRowError(path, f"missing image: row {index} out of range ({name} split {split} has "
                                    f"{len(dataset)} rows)")
        return None, parsed

    def load(self, path: str) -> Image.Image:
        """Decode the image a path names (BadRowError if it is missing or unusable)."""
        local, row = self.locate(path)
        if local is not None:
            return decode_image(str(local), where=path)
        name, split, index = row
        return decode_image(self.dataset(name, split)[index]["image"], where=path)


# ---------------------------------------------------------------- JSON lines


def jsonl_objects(path: str | Path, label: str | None = None) -> Iterator[tuple[str, int, Any]]:
    """(where, line number, JSON object or BadRowError) for every non-blank line of a JSONL file, 1-based.

    Each line is decoded on its own, strictly: bytes that are not UTF-8 make that line a bad line ("not valid
    UTF-8"), never a traceback and never U+FFFD replacement characters in the data."""
    label = str(path) if label is None else label
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{label} line {number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, number, BadRowError(where, f"not valid UTF-8: byte 0x{raw[err.start]:02x} at byte "
                                                        f"{err.start + 1} of the line")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                yield where, number, BadRowError(where, f"malformed JSON: {err.msg} at column {err.colno}")
                continue
            if not isinstance(obj, dict):
                obj = BadRowError(where, f"malformed JSON: expected an object, got {type(obj).__name__}")
            yield where, number, obj


# ---------------------------------------------------------------- triples


@dataclass
class Triple:
    """One training example from a triples file: query, positive page path, hard-negative page paths."""

    query: str
    pos: str
    negs: list[str]
    line: int
    extra: dict[str, Any] = field(default_factory=dict)  # other keys, e.g. mine.py's "scores"


def _parse_triple(obj: dict[str, Any], where: str, line: int) -> Triple:
    """Validate one JSONL object as a triple."""
    query = clean_query(obj.get("query"), where)
    pos = obj.get("pos")
    if not isinstance(pos, str) or not pos.strip():
        raise BadRowError(where, "missing pos: expected a non-empty path string")
    negs = obj.get("negs", [])
    if not isinstance(negs, list) or not all(isinstance(n, str) and n.strip() for n in negs):
        raise BadRowError(where, "bad negs: expected a list of non-empty path strings")
    extra = {k: v for k, v in obj.items() if k not in ("query", "pos", "negs")}
    return Triple(query, pos.strip(), [n.strip() for n in negs], line, extra)


def read_triples_jsonl(path: str, strict: bool = False,
                       report: SkipReport | None = None) -> tuple[list[Triple], list[SkippedRow]]:
    """Read {"query", "pos", "negs"} lines; bad lines ("FILE line N: reason", 1-based) are reported and skipped.

    strict=True raises BadRowError on the first bad line. Blank lines are ignored. Missing "negs" means [].
    Raises UserError if the file is missing or holds no valid triple.
    """
    file = Path(path)
    if not file.is_file():
        raise UserError(f"triples file not found: {path}")
    report = report if report is not None else SkipReport(strict=strict)
    first_skip = report.count
    triples: list[Triple] = []
    for where, number, obj in jsonl_objects(file, str(path)):
        try:
            if isinstance(obj, BadRowError):
                raise obj
            triples.append(_parse_triple(obj, where, number))
        except BadRowError as err:
            if strict:
                raise
            report.add_error(err)
    skipped = report.items[first_skip:]
    if not triples:
        detail = f"; first problem: {skipped[0].where}: {skipped[0].reason}" if skipped else ""
        raise UserError(f"{path}: no valid triples ({len(skipped)} lines skipped){detail}")
    log.info("read %d triples from %s (%d lines skipped)", len(triples), path, len(skipped))
    return triples, skipped


# ---------------------------------------------------------------- BEIR evaluation directories


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
