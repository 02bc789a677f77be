"""An index folder opened, checked and kept whole: index.json and header.json (each with its checksum), the segments'
manifests, damaged segments dropped (their files encoded again by the next run), a lost index.json rebuilt from
header.json and the intact segments, format-1 indexes upgraded, a writer's leftovers removed; one writer at a time.
PageIndex (colintern/index/page_index.py) adds what the index holds and how pages go in and out."""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator, Self

import numpy as np

from colintern.errors import UserError
from colintern.files import file_lock, file_sha256, make_output_dir
from colintern.index.segments import (MANIFEST, PAGES, TOKENS, check_segment, read_checked_json, segment_number,
                                tokens_mtime, verified_mtime, write_checked_json, write_manifest)

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


class IndexFolder:
    """An index folder opened, checked and kept whole: index.json and header.json (each with its checksum), the segments'"""

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
             warn: bool = True) -> Self:
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
                       dpi: int | None = None, pool_factor: int | None = None) -> Self:
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
