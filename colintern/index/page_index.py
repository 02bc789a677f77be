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

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from colintern.errors import UserError
from colintern.files import atomic_write_json, display, file_lock, file_sha256, fsync_dir, make_output_dir
from colintern.index.segments import (MANIFEST, PAGES, TOKENS, check_segment, read_checked_json, segment_number,
                                tokens_mtime, verified_mtime, write_checked_json, write_manifest)
from colintern.index.sources import IMAGE_SUFFIXES, PageSource, pdf_page_count


log = logging.getLogger("colintern.search")


INDEX_VERSION = 2  # 2: checksums (colintern.index.segments), header.json, uids from segment numbers


HEADER_FIELDS = ("version", "model_id", "ckpt", "ckpt_sha256", "config", "dpi", "pool_factor")


DEFAULT_DPI = 150


LOCK_FILE = ".lock"


PAGES_PER_SEGMENT_MAX = 1_000_000  # page uids are segment * this + position in the segment


def check_new_index_folder(folder: Path) -> None:
    """Before a model loads: --index must be a new or empty folder, or an index (one line otherwise)."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--index {folder} is a file, not a folder; choose another --index")
    if (folder / "index.json").exists() or (folder / "header.json").exists():
        return
    if folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir()):
        raise UserError(f"--index {folder} is not empty and holds no index; choose an empty or new folder")


@contextlib.contextmanager
def writer_lock(folder: str | Path) -> Iterator[None]:
    """Hold the index folder's writer lock (IDX/.lock, flock: released when the holder dies); a second writer stops
    with one line instead of racing the first."""
    folder = Path(folder)
    make_output_dir(folder, "--index")  # one line when a file stands there
    with file_lock(folder / LOCK_FILE, blocking=False) as held:
        if not held:
            raise UserError(f"--index {folder} is being written by another process (search.py index, verify "
                            "--repair or remove); wait for it to finish, or use another --index")
        yield


class PageIndex:
    """An index folder: open (or create) it, add pages, read every page's vectors back.

    Opened for reading, damaged segments are left out and named in `damaged` (a warning each); opened for writing
    (under writer_lock), they are dropped and the files they held are listed in `redo_files` to be encoded again.
    A page's uid (segment number * PAGES_PER_SEGMENT_MAX + position) never changes: Qdrant points are keyed by it."""

    def __init__(self, folder: str | Path, meta: dict[str, Any], full_check: bool = False):
        self.folder, self.meta = Path(folder), meta
        self.pages: list[dict[str, Any]] = []
        self.tokens: dict[str, np.ndarray] = {}  # segment name -> memory map, (T, dim) float16
        self.damaged: dict[str, str] = {}  # segment name -> what is wrong
        for name in meta["segments"]:
            self._load_segment(name, full_check)

    # -- opening -----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path, full_check: bool = False, writer: bool = False,
             warn: bool = True) -> "PageIndex":
        """Open an index folder. A reader gets the intact segments (cheap checks unless full_check), with a warning
        per damaged one unless warn=False (the caller reports `damaged` itself); a writer (who holds writer_lock)
        also has index.json rebuilt when it is damaged, leftovers removed and damaged segments dropped (their files
        in `redo_files`)."""
        folder = Path(folder)
        path = folder / "index.json"
        if not path.exists():
            if folder.is_dir() and (folder / "header.json").is_file():
                meta = None  # a crash or damage took index.json: rebuild it (writers) or say how
            else:
                raise UserError(f"--index {folder}: no index.json; build one with search.py index")
        else:
            meta, why = read_checked_json(path)
        if meta is None:
            if not writer:
                raise UserError(f"{path}: {'damaged: ' + why if path.exists() else 'missing'}; run search.py index "
                                f"--index {folder} --inputs ... (it rebuilds index.json from header.json and the "
                                "segments) or search.py verify --index " + str(folder))
            meta = cls._rebuilt_meta(folder, why if path.exists() else "missing")
            write_checked_json(path, meta)
        if meta.get("version", 0) > INDEX_VERSION:
            raise UserError(f"{path}: index format {meta['version']} is newer than this ColIntern; upgrade it")
        index = cls(folder, meta, full_check=full_check or writer)
        for name, why in index.damaged.items():
            if writer:
                log.warning("%s: damaged (%s); dropping it, its pages are encoded again", folder / name, why)
            elif warn:
                log.warning("%s: damaged (%s); its pages are left out: run search.py index --index %s ... to "
                            "encode them again (search.py verify lists every damaged file)", folder / name, why,
                            folder)
        if writer:
            index._drop_damaged()
            index._remove_leftovers()
            index._upgrade()
        return index

    @classmethod
    def create_or_open(cls, folder: str | Path, model_id: str, ckpt: str | None, config: dict[str, Any],
                       dpi: int | None = None, pool_factor: int | None = None) -> "PageIndex":
        """Open an index built with the same model, checkpoint and config (dpi and pool_factor None: the index's),
        or create an empty one (None: 150 dpi, no pooling). The caller holds writer_lock."""
        folder = Path(folder)
        ckpt_sha = file_sha256(ckpt) if ckpt else None
        if (folder / "index.json").exists() or (folder / "header.json").exists():
            index = cls.open(folder, writer=True)
            meta = index.meta
            if meta["ckpt_sha256"] != ckpt_sha or meta["config"] != config:
                raise UserError(f"--index {folder} was built with another model or checkpoint ({meta['model_id']} "
                                f"+ {meta['ckpt']}); use a new --index folder for this one")
            for flag, value in (("dpi", dpi), ("pool_factor", pool_factor)):
                if value is not None and meta.get(flag, 1) != value:
                    raise UserError(f"--index {folder} was built with --{flag} {meta.get(flag, 1)}; leave --{flag} "
                                    "out to extend it, or use a new --index folder")
            return index
        check_new_index_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        header = {"version": INDEX_VERSION, "model_id": model_id, "ckpt": ckpt and str(Path(ckpt).resolve()),
                  "ckpt_sha256": ckpt_sha, "config": config, "dpi": dpi or DEFAULT_DPI,
                  "pool_factor": pool_factor or 1}
        write_checked_json(folder / "header.json", header)
        meta = {**header, "segments": [], "segment_files": {}, "files": {}, "hidden": [], "hidden_uids": []}
        index = cls(folder, meta)
        index.save_meta()
        return index

    @classmethod
    def _rebuilt_meta(cls, folder: Path, why: str) -> dict[str, Any]:
        """index.json rebuilt from header.json and every intact segment (a file indexed twice with other content:
        its newest pages count, the older ones are hidden, as when the index was written)."""
        header, header_why = read_checked_json(folder / "header.json")
        if header is None:
            raise UserError(f"{folder / 'index.json'} is {why} and header.json is {header_why or 'missing'}: the "
                            "index cannot be rebuilt; index the files again into a new --index folder")
        meta = {**header, "segments": [], "segment_files": {}, "files": {}, "hidden": []}
        dim = int(meta["config"]["dim"])
        intact: list[tuple[str, list[dict[str, Any]]]] = []  # (segment, its pages) in segment order
        for seg in sorted(folder.glob("seg-*"), key=lambda p: segment_number(p.name)):
            manifest, _ = read_checked_json(seg / MANIFEST)
            pages, bad = check_segment(seg, manifest, dim, full=True) if manifest else (None, "no manifest")
            if pages is None:
                log.warning("%s: not taken back into the rebuilt index.json (%s)", seg, bad)
                continue
            meta["segments"].append(seg.name)
            meta["segment_files"][seg.name] = manifest
            intact.append((seg.name, pages))
            for page in pages:
                meta["files"][page["file"]] = page["sha256"]
        last: dict[tuple[str, str, int], int] = {}  # (file, sha256, page) -> uid of its newest copy
        hidden_uids: list[int] = []
        for name, pages in intact:
            for n, p in enumerate(pages):
                uid = segment_number(name) * PAGES_PER_SEGMENT_MAX + n
                if meta["files"][p["file"]] != p["sha256"]:
                    hidden_uids.append(uid)  # an older content of a file indexed again
                elif (key := (p["file"], p["sha256"], p["page"])) in last:
                    hidden_uids.append(last[key])  # the same page indexed again later: the newest copy counts
                if meta["files"][p["file"]] == p["sha256"]:
                    last[(p["file"], p["sha256"], p["page"])] = uid
        meta["hidden_uids"] = hidden_uids
        log.warning("%s was %s: rebuilt from header.json and %d intact segment(s)", folder / "index.json", why,
                    len(meta["segments"]))
        return meta

    def save_meta(self) -> None:
        write_checked_json(self.folder / "index.json", self.meta)

    def _load_segment(self, name: str, full_check: bool) -> None:
        dim = int(self.meta["config"]["dim"])
        record = self.meta.get("segment_files", {}).get(name)
        pages, why = check_segment(self.folder / name, record, dim, full_check)
        if pages is None:
            self.damaged[name] = why
            return
        size = (self.folder / name / TOKENS).stat().st_size
        raw = np.memmap(self.folder / name / TOKENS, dtype="<f2", mode="r") if size else np.empty(0, "<f2")
        self.tokens[name] = raw.reshape(-1, dim)
        hidden = {(h[0], h[1]) for h in self.meta.get("hidden", [])}  # format 1: by content and page number
        hidden_uids = set(self.meta.get("hidden_uids", []))
        number = segment_number(name)
        for n, page in enumerate(pages):
            uid = number * PAGES_PER_SEGMENT_MAX + n
            if (page["sha256"], page["page"]) not in hidden and uid not in hidden_uids:
                # uid: stable when pages before it are hidden (a changed file) or a damaged segment is dropped
                self.pages.append({**page, "segment": name, "uid": uid})

    def _drop_damaged(self) -> None:
        """Writers: forget damaged segments (their folders removed) and list the files they held for re-encoding."""
        if not self.damaged:
            return
        kept = {p["file"] for p in self.pages}
        redo = self.meta.setdefault("redo_files", [])
        for name in self.damaged:
            held = self.meta.get("segment_files", {}).pop(name, {}).get("files", [])
            redo += [f for f in held if f not in redo]
            self.meta["segments"].remove(name)
            shutil.rmtree(self.folder / name, ignore_errors=True)
        for file in redo:
            if file not in kept:  # every page of it was in damaged segments: the file counts as not indexed
                self.meta["files"].pop(file, None)
        self.damaged = {}
        self.save_meta()

    @property
    def redo_files(self) -> list[str]:
        """Files whose pages were in damaged segments that a writer dropped: the next `index` encodes them again
        (kept in index.json until then, so `verify --repair` then `index` needs no list of files)."""
        return list(self.meta.get("redo_files", []))

    def done_redoing(self) -> None:
        if self.meta.pop("redo_files", None) is not None:
            self.save_meta()

    def _upgrade(self) -> None:
        """A format-1 index (no checksums) read by a writer: intact segments get their manifest, header.json is
        written, and the index is format 2 from then on."""
        if self.meta.get("version", 1) >= INDEX_VERSION and (self.folder / "header.json").is_file():
            return
        dim = int(self.meta["config"]["dim"])
        for name in self.meta["segments"]:
            if name not in self.meta.setdefault("segment_files", {}):
                pages = json.loads((self.folder / name / PAGES).read_text(encoding="utf-8"))
                self.meta["segment_files"][name] = write_manifest(self.folder / name, pages, dim)
        self.meta["version"] = INDEX_VERSION
        header = {k: self.meta.get(k) for k in HEADER_FIELDS}
        write_checked_json(self.folder / "header.json", header)
        self.save_meta()
        log.info("%s: checksums added (index format %d)", self.folder, INDEX_VERSION)

    def _remove_leftovers(self) -> None:
        """Segment folders index.json does not name: a crash after writing them; their pages are redone. Only a
        writer may do this: a reader could see a segment between its rename and index.json naming it."""
        named = set(self.meta["segments"])
        for path in list(self.folder.glob("seg-*")) + list(self.folder.glob(".seg-*.tmp-*")):
            if path.name not in named:
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed %s, an uncommitted segment of an interrupted run", path.name)

    def mark_verified(self) -> None:
        """Writers, after a full check: record the tokens files' current mtimes as verified, so that readers of a
        copied folder need not hash them again."""
        changed = False
        for name, record in self.meta.get("segment_files", {}).items():
            mtime = tokens_mtime(self.folder / name)
            if mtime != verified_mtime(record):
                record["verified_mtime_ns"], changed = mtime, True
        if changed:
            self.save_meta()

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
                "bytes_on_disk": stored, "backends": ["embedded"] + (["qdrant"] if meta.get("qdrant_collection")
                                                                      else []),
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
