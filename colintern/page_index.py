"""The on-disk page index of search.py (docs/CONTRACT.md §10): your PDFs and images, each page encoded once.

Layout of an index folder:
    index.json          model id, checkpoint (+ sha256), the ColIntern config, DPI, the committed segments, the
                        files indexed (path -> sha256) and pages hidden because their file changed
    seg-NNNNN/          one committed batch of pages: tokens.f16 (raw float16, (tokens, dim) row-major, read
                        through a memory map) and pages.json (file, sha256, page, offset, length, where the image
                        tokens are among the page's vectors, page size)
A segment is written to a temporary folder, fsynced and renamed, then index.json names it (atomically): an
interrupted run leaves only whole segments, a folder index.json does not name is a leftover removed on open, and
a rerun encodes exactly the pages not committed yet (no duplicates). Adding files encodes only the new pages.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from colintern.errors import UserError
from colintern.files import atomic_write_json, file_sha256, fsync_dir
from colintern.token_pooling import pool_tokens

log = logging.getLogger("colintern.search")

INDEX_VERSION = 1
PAGES_PER_SEGMENT_MAX = 1_000_000  # page uids are segment * this + position in the segment
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")


@dataclass(frozen=True)
class PageSource:
    """One page to index: a PDF page (1-based) or an image file (page 1)."""

    file: str       # absolute path
    sha256: str     # of the file's bytes: the page's identity, with `page`
    page: int
    kind: str       # "pdf" | "image"


def find_inputs(inputs: list[str]) -> list[Path]:
    """PDFs and images named directly or found under folders (sorted); one line for a path that is neither."""
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and
                           (p.suffix.lower() == ".pdf" or p.suffix.lower() in IMAGE_SUFFIXES))
            if not found:
                raise UserError(f"--inputs {name}: no PDF or image files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"--inputs {name}: no such file or folder")
    return [p.resolve() for p in dict.fromkeys(files)]


def pdf_page_count(path: Path) -> int:
    """Pages of a PDF; UserError-free: raises ValueError with the reason for an unreadable one."""
    import pypdfium2 as pdfium

    try:
        document = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as err:
        reason = str(err)
        if "password" in reason.lower():
            raise ValueError("encrypted PDF (needs a password)") from None
        raise ValueError(f"not a readable PDF ({reason})") from None
    try:
        return len(document)
    finally:
        document.close()


def render_page(source: PageSource, dpi: int) -> Image.Image:
    """The page as an RGB image: a PDF page rendered at `dpi`, or the image file decoded (any PIL mode)."""
    from colintern.data import decode_image

    if source.kind == "image":
        return decode_image(source.file, source.file)
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(source.file)
    try:
        return document[source.page - 1].render(scale=dpi / 72).to_pil().convert("RGB")
    finally:
        document.close()


class PageIndex:
    """An index folder: open (or create) it, add pages, read every page's vectors back."""

    def __init__(self, folder: str | Path, meta: dict[str, Any]):
        self.folder, self.meta = Path(folder), meta
        self.pages: list[dict[str, Any]] = []
        self.tokens: list[np.ndarray] = []  # one memory map per segment, (T, dim) float16
        for name in meta["segments"]:
            self._load_segment(name)

    # -- opening -----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path) -> "PageIndex":
        path = Path(folder) / "index.json"
        if not path.is_file():
            raise UserError(f"--index {folder}: no index.json; build one with search.py index")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: unreadable index ({err}); rebuild it with search.py index") from None
        if meta.get("version", 0) > INDEX_VERSION:
            raise UserError(f"{path}: index format {meta['version']} is newer than this ColIntern; upgrade it")
        index = cls(folder, meta)
        index._remove_leftovers()
        return index

    @classmethod
    def create_or_open(cls, folder: str | Path, model_id: str, ckpt: str | None, config: dict[str, Any],
                       dpi: int, pool_factor: int = 1) -> "PageIndex":
        """Open an index built with the same model, checkpoint and config, or create an empty one."""
        folder = Path(folder)
        ckpt_sha = file_sha256(ckpt) if ckpt else None
        if (folder / "index.json").exists():
            index = cls.open(folder)
            meta = index.meta
            if meta["ckpt_sha256"] != ckpt_sha or meta["config"] != config:
                raise UserError(f"--index {folder} was built with another model or checkpoint ({meta['model_id']} "
                                f"+ {meta['ckpt']}); use a new --index folder for this one")
            for flag, value in (("dpi", dpi), ("pool_factor", pool_factor)):
                if meta.get(flag, 1) != value:
                    raise UserError(f"--index {folder} was built with --{flag} {meta.get(flag, 1)}; pass the same "
                                    "or use a new --index folder")
            return index
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--index {folder} is a file, not a folder; choose another --index")
        if folder.is_dir() and any(folder.iterdir()):
            raise UserError(f"--index {folder} is not empty and holds no index; choose an empty or new folder")
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"version": INDEX_VERSION, "model_id": model_id, "ckpt": ckpt and str(Path(ckpt).resolve()),
                "ckpt_sha256": ckpt_sha, "config": config, "dpi": dpi, "pool_factor": pool_factor, "segments": [],
                "files": {}, "hidden": []}
        atomic_write_json(folder / "index.json", meta)
        return cls(folder, meta)

    def _load_segment(self, name: str) -> None:
        pages = json.loads((self.folder / name / "pages.json").read_text(encoding="utf-8"))
        dim = self.meta["config"]["dim"]
        raw = np.memmap(self.folder / name / "tokens.f16", dtype="<f2", mode="r")
        segment = len(self.tokens)
        self.tokens.append(raw.reshape(-1, dim))
        hidden = {(h[0], h[1]) for h in self.meta.get("hidden", [])}
        for n, page in enumerate(pages):
            if (page["sha256"], page["page"]) not in hidden:
                # uid: stable when pages before it are hidden (a changed file), unlike the position in self.pages
                self.pages.append({**page, "segment": segment, "uid": segment * PAGES_PER_SEGMENT_MAX + n})

    def _remove_leftovers(self) -> None:
        """Segment folders index.json does not name: a crash after writing them; their pages are redone."""
        named = set(self.meta["segments"])
        for path in self.folder.glob("seg-*"):
            if path.name not in named:
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed %s, an uncommitted segment of an interrupted run", path.name)

    # -- adding --------------------------------------------------------------------------------------------
    def done(self) -> set[tuple[str, int]]:
        """(sha256, page) of every committed page."""
        return {(p["sha256"], p["page"]) for p in self.pages}

    def plan(self, files: list[Path], report: Any) -> list[PageSource]:
        """The pages of `files` still to encode. A file whose content changed since it was indexed: its old
        pages are hidden and its new ones encoded. An unreadable file is a reported bad file."""
        done, todo = self.done(), []
        for path in files:
            sha = file_sha256(path)
            old = self.meta["files"].get(str(path))
            if old and old != sha:
                hidden = [[p["sha256"], p["page"]] for p in self.pages if p["file"] == str(path)]
                self.meta["hidden"] += hidden
                self.pages = [p for p in self.pages if p["file"] != str(path)]
                log.info("%s changed since it was indexed: %d old page(s) hidden, its pages are indexed again",
                         path, len(hidden))
            if path.suffix.lower() == ".pdf":
                try:
                    count = pdf_page_count(path)
                except ValueError as err:
                    report.add(str(path), f"bad PDF: {err}")
                    continue
                sources = [PageSource(str(path), sha, page, "pdf") for page in range(1, count + 1)]
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                sources = [PageSource(str(path), sha, 1, "image")]
            else:
                report.add(str(path), f"not a PDF or an image: {path.suffix or 'no extension'}")
                continue
            todo += [s for s in sources if (s.sha256, s.page) not in done]
        return todo

    def commit(self, entries: list[tuple[PageSource, torch.Tensor, int, int, tuple[int, int]]]) -> None:
        """Write one segment: (source, (L, dim) vectors, image-token start, image tokens, page size) each."""
        name = f"seg-{len(self.meta['segments']):05d}"
        tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            pages, offset = [], 0
            with open(tmp / "tokens.f16", "wb") as f:
                for source, vectors, image_start, image_tokens, size in entries:
                    data = vectors.to(torch.float16).numpy().astype("<f2", copy=False)
                    f.write(np.ascontiguousarray(data).tobytes())
                    pages.append({"file": source.file, "sha256": source.sha256, "page": source.page,
                                  "kind": source.kind, "offset": offset, "length": int(data.shape[0]),
                                  "image_start": image_start, "image_tokens": image_tokens,
                                  "width": size[0], "height": size[1]})
                    offset += int(data.shape[0])
                f.flush()
                os.fsync(f.fileno())
            atomic_write_json(tmp / "pages.json", pages)
            os.replace(tmp, self.folder / name)
            fsync_dir(self.folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.meta["segments"].append(name)
        for source, *_ in entries:
            self.meta["files"][source.file] = source.sha256
        atomic_write_json(self.folder / "index.json", self.meta)
        self._load_segment(name)

    # -- reading ------------------------------------------------------------------------------------------
    def vectors(self, i: int) -> torch.Tensor:
        """(L, dim) float32 vectors of page i."""
        page = self.pages[i]
        rows = self.tokens[page["segment"]][page["offset"]:page["offset"] + page["length"]]
        return torch.from_numpy(np.asarray(rows, dtype=np.float32))

    def all_vectors(self) -> Iterator[torch.Tensor]:
        for i in range(len(self.pages)):
            yield self.vectors(i)

    def source(self, i: int) -> PageSource:
        page = self.pages[i]
        return PageSource(page["file"], page["sha256"], page["page"], page["kind"])


def index_pages(index: PageIndex, model: Any, todo: list[PageSource], report: Any, batch_size: int,
                segment_pages: int, show_progress: bool = True) -> int:
    """Render, encode and commit the pages of `todo`, segment by segment; returns how many were indexed."""
    from tqdm.auto import tqdm

    from colintern.data import BadRowError

    from colintern.training import fault

    done = committed = 0
    start = time.perf_counter()
    with tqdm(total=len(todo), desc="index pages", unit="page", dynamic_ncols=True,
              disable=not show_progress) as bar:
        for first in range(0, len(todo), segment_pages):
            chunk, images = [], []
            for source in todo[first:first + segment_pages]:
                try:
                    images.append(render_page(source, index.meta["dpi"]))
                    chunk.append(source)
                except BadRowError as err:
                    report.add(f"{source.file} page {source.page}", err.reason)
                except Exception as err:  # noqa: BLE001 - pdfium raises its own error types
                    report.add(f"{source.file} page {source.page}", f"cannot render: {err}")
            if chunk:
                vectors = model.encode_images(images, batch_size=batch_size, show_progress=False)
                factor = index.meta.get("pool_factor", 1)
                index.commit([(s, pool_tokens(v, factor), *image_tokens_of(model, img, factor), img.size)
                              for s, v, img in zip(chunk, vectors, images)])
                committed += 1
                fault("kill", committed)  # tests: COLINTERN_FAULT=kill@N is a SIGKILL after the N-th segment
            done += len(chunk)
            bar.update(len(todo[first:first + segment_pages]))
            bar.set_postfix(pages_per_s=f"{done / max(time.perf_counter() - start, 1e-9):.1f}")
    return done


def image_tokens_of(model: Any, page: Image.Image, pool_factor: int = 1) -> tuple[int, int]:
    """(index of the first image-token vector among the page's kept vectors, number of image tokens): where the
    similarity map of a page reads its per-token scores. Single-vector models, and pooled pages (whose vectors no
    longer sit on image tokens), have no token map: (0, 0).
    Kept vectors start at the first image token unless keep_page_tokens is "all", which keeps the prompt before
    it too (the same tokens for every page)."""
    cfg = model.config
    if cfg.embedding == "single" or pool_factor > 1:
        return 0, 0
    start = 0
    if cfg.keep_page_tokens == "all":
        before = cfg.page_prompt.split("<image>")[0] + cfg.image_start_token
        start = len(model.tokenizer(before, add_special_tokens=False)["input_ids"])
    return start, model.processor.page_cost(page)
