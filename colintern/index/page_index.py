"""The on-disk page index of search.py (docs/CONTRACT.md §10): your PDFs and images, each page encoded once.

Layout of an index folder:
    index.json          model id, checkpoint (+ sha256), the ColIntern config, DPI, the committed segments, the
                        files indexed (path -> sha256), their metadata (--meta), and the uids of pages hidden
                        because their file changed or was removed
    seg-NNNNN/          one committed batch of pages: tokens.f16 (raw float16, (tokens, dim) row-major, read
                        through a memory map) and pages.json (file, sha256, page, offset, length, where the image
                        tokens are among the page's vectors, page size)
A segment is written to a temporary folder, fsynced and renamed, then index.json names it (atomically): an
interrupted run leaves only whole segments, a folder index.json does not name is a leftover removed on open, and
a rerun encodes exactly the pages not committed yet (no duplicates). Adding files encodes only the new pages."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from colintern.errors import UserError
from colintern.files import atomic_write_json, display, file_sha256, fsync_dir
from colintern.index.segments import (PAGES, TOKENS, segment_number,
                                write_manifest)
from colintern.index.sources import IMAGE_SUFFIXES, PageSource, pdf_page_count
from colintern.index.folder import (DEFAULT_DPI, HEADER_FIELDS, INDEX_VERSION, LOCK_FILE,  # noqa: F401 (their home)
                                    PAGES_PER_SEGMENT_MAX, IndexFolder, check_new_index_folder, writer_lock)


log = logging.getLogger("colintern.search")


class PageIndex(IndexFolder):
    """An index folder: open (or create) it, add pages, read every page's vectors back.

    Opened for reading, damaged segments are left out and named in `damaged` (a warning each); opened for writing
    (under writer_lock), they are dropped and the files they held are listed in `redo_files` to be encoded again.
    A page's uid (segment number * PAGES_PER_SEGMENT_MAX + position) never changes: Qdrant points are keyed by it."""

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
                hidden = self.hide(lambda p, path=str(path): p["file"] == path)
                log.info("%s changed since it was indexed: %d old page(s) hidden, its pages are indexed again",
                         display(path), hidden)
            if path.suffix.lower() == ".pdf":
                try:
                    count = pdf_page_count(path)
                except ValueError as err:
                    report.add(display(path), f"bad PDF: {err}")
                    continue
                sources = [PageSource(str(path), sha, page, "pdf") for page in range(1, count + 1)]
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                sources = [PageSource(str(path), sha, 1, "image")]
            else:
                report.add(display(path), f"not a PDF or an image: {path.suffix or 'no extension'}")
                continue
            todo += [s for s in sources if (s.sha256, s.page) not in done]
        return todo

    def hide(self, which: Any) -> int:
        """Hide the visible pages for which which(page) is true (by uid: the same content indexed again later is not
        hidden with them); returns how many. The caller saves the meta (atomically)."""
        gone = [p for p in self.pages if which(p)]
        self.meta.setdefault("hidden_uids", []).extend(p["uid"] for p in gone)
        self.pages = [p for p in self.pages if not which(p)]
        return len(gone)

    def remove(self, patterns: list[str]) -> tuple[list[str], int]:
        """Take files out of the index: each pattern is a file, a folder (every file under it) or a glob, matched
        against the indexed paths. Returns (the files removed, their pages). Writers only; the next index or
        sync drops their Qdrant points."""
        import fnmatch

        files = list(self.meta["files"])
        chosen = []
        for pattern in patterns:
            path = os.path.abspath(os.path.expanduser(pattern))
            matched = [f for f in files if f == path or f.startswith(path.rstrip(os.sep) + os.sep)
                       or fnmatch.fnmatch(f, path) or fnmatch.fnmatch(os.path.basename(f), pattern)]
            if not matched:
                raise UserError(f"{display(pattern)}: no indexed file matches it (search.py info --index "
                                f"{self.folder} lists them); nothing removed")
            chosen += [f for f in matched if f not in chosen]
        pages = self.hide(lambda p: p["file"] in chosen)
        for file in chosen:
            self.meta["files"].pop(file, None)
            self.meta.get("file_meta", {}).pop(file, None)
        self.save_meta()
        return chosen, pages

    def info(self) -> dict[str, Any]:
        """What the index holds and was built with (search.py info)."""
        stored = sum((self.folder / name / TOKENS).stat().st_size for name in self.tokens)
        meta = self.meta
        return {"index": str(self.folder), "version": meta.get("version", 1), "model_id": meta["model_id"],
                "ckpt": meta["ckpt"], "ckpt_sha256": meta["ckpt_sha256"], "dim": meta["config"]["dim"],
                "embedding": meta["config"].get("embedding", "multi"), "backbone": meta["config"].get("backbone"),
                "dpi": meta.get("dpi"), "pool_factor": meta.get("pool_factor", 1), "pages": len(self.pages),
                "files": len({p["file"] for p in self.pages}), "tokens": sum(p["length"] for p in self.pages),
                "segments": len(meta["segments"]), "damaged_segments": sorted(self.damaged),
                "hidden_pages": len(meta.get("hidden_uids", [])) + len(meta.get("hidden", [])),
                "bytes_on_disk": stored, "backends": ["embedded"] + ([meta.get("qdrant_backend", "qdrant")]
                                                                      if meta.get("qdrant_collection") else []),
                "qdrant_collection": meta.get("qdrant_collection"), "file_meta_keys":
                sorted({k for values in meta.get("file_meta", {}).values() for k in values})}

    def subset(self, keep: Any) -> "PageIndex":
        """A read-only view of the pages for which keep(page, file_meta) is true (the same memory maps): what
        filtered queries search. Positions in the view are its own."""
        import copy

        view = copy.copy(self)
        file_meta = self.meta.get("file_meta", {})
        view.pages = [p for p in self.pages if keep(p, file_meta.get(p["file"], {}))]
        return view

    def commit(self, entries: list[tuple[PageSource, torch.Tensor, int, int, tuple[int, int]]]) -> None:
        """Write one segment and name it in index.json: (source, (L, dim) vectors, image-token start, image tokens,
        page size) each."""
        name, manifest = self.write_segment(entries)
        self.meta["segments"].append(name)
        self.meta.setdefault("segment_files", {})[name] = manifest
        for source, *_ in entries:
            self.meta["files"][source.file] = source.sha256
        self.save_meta()
        self._load_segment(name, full_check=False)

    def write_segment(self, entries: list[tuple[PageSource, torch.Tensor, int, int, tuple[int, int]]],
                      taken: list[str] | None = None) -> tuple[str, dict[str, Any]]:
        """Write one segment folder (fsynced, renamed into place) without naming it in index.json: (its name, its
        manifest). Until index.json names it, it is a leftover the next writer removes. `taken`: names to avoid."""
        numbers = [segment_number(n) for n in [*self.meta["segments"], *(taken or [])]] + \
            [segment_number(p.name) for p in self.folder.glob("seg-*")]
        name = f"seg-{max(numbers, default=-1) + 1:05d}"
        tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            pages, offset = [], 0
            with open(tmp / TOKENS, "wb") as f:
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
            atomic_write_json(tmp / PAGES, pages)
            manifest = write_manifest(tmp, pages, int(self.meta["config"]["dim"]))
            os.replace(tmp, self.folder / name)
            fsync_dir(self.folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return name, manifest

    # -- reading ------------------------------------------------------------------------------------------
    def page_rows(self, i: int) -> np.ndarray:
        """(L, dim) float16 rows of page i, as stored (a view into the segment's memory map)."""
        page = self.pages[i]
        return self.tokens[page["segment"]][page["offset"]:page["offset"] + page["length"]]

    def vectors(self, i: int) -> torch.Tensor:
        """(L, dim) float32 vectors of page i."""
        return torch.from_numpy(np.asarray(self.page_rows(i), dtype=np.float32))

    def all_vectors(self) -> Iterator[torch.Tensor]:
        for i in range(len(self.pages)):
            yield self.vectors(i)

    def source(self, i: int) -> PageSource:
        page = self.pages[i]
        return PageSource(page["file"], page["sha256"], page["page"], page["kind"])
