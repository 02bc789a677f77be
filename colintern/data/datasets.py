"""Page datasets (docs/CONTRACT.md §7): a hub id, a local repository folder, a save_to_disk directory or parquet
files with the vidore/colpali_train_set columns, read row by row with one-line errors (colintern/data/report.py),
and the pseudo-paths <dataset>/<split>/doc_<i>.png that name their pages in triples files.

The data layer: report.py (bad rows), images.py (decoding), datasets.py (page datasets), triples.py (triples
files), beir.py (evaluation folders), make_dataset.py (a dataset from your PDFs). Everything that reads user data
lives here, so train.py, mine.py and eval.py report bad input the same way."""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from colintern.errors import UserError
from colintern.data.report import BadRowError, SkipReport
from colintern.data.images import decode_image, image_bytes


log = logging.getLogger("colintern.data.datasets")


REQUIRED_COLUMNS = ("query", "image")


_PSEUDO_RE = re.compile(r"^(?P<name>.+)/(?P<split>[^/]+)/doc_(?P<index>\d+)\.png$")


_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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
        assert row is not None  # locate: a local file or a dataset row
        name, split, index = row
        return decode_image(self.dataset(name, split)[index]["image"], where=path)
