"""The on-disk page-embedding store of mine.py: every distinct page of a corpus encoded once, streamed back for search.

1. plan_pages: one page per distinct page key (image_filename or a content hash), in first-appearance order;
   the representative row of a page is its first row whose image decodes.
2. ensure_page_store: every unique page is encoded once, in parts of `pages_per_part` pages, into a flat fp16
   (total_tokens, dim) file per part + token offsets. Parts are claimed with file locks, so concurrent shards
   (torchrun ranks, or jobs sharing a filesystem) split the encoding and an interrupted run keeps every
   finished part.
3. PageStore: reads the finished parts through memory maps, so scoring streams the corpus and it never has to fit
   in RAM or GPU memory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from colintern.data.report import BadRowError
from colintern.data.images import decode_image, image_bytes
from colintern.errors import UserError
from colintern.files import atomic_write_json, file_lock, fingerprint, note_path

log = logging.getLogger("colintern.mine.search")


STORE_VERSION = 1
TOKENS_FILE = "tokens.f16"  # raw little-endian float16, (n_tokens, dim) row-major
PART_META = "part.json"


# ---------------------------------------------------------------- pages


@dataclass
class PagePlan:
    """Rows grouped into pages: pages[u] = the dataset rows showing page u (first row first)."""

    keys: list[str]                 # page key of every row
    pages: list[list[int]]          # rows of each unique page, ascending
    page_of_row: np.ndarray         # (n_rows,) int64: unique page index of each row
    dedupe: str                     # "filename" | "hash"

    @property
    def n_pages(self) -> int:
        return len(self.pages)


def content_key(dataset: Any, index: int) -> str:
    """sha1 of a row's encoded image bytes; "row:<i>" for a row without a readable image (its own page)."""
    try:
        return "sha1:" + hashlib.sha1(image_bytes(dataset[index]["image"], f"row {index}")).hexdigest()
    except BadRowError:
        return f"row:{index}"


def plan_pages(dataset: Any, name: str, dedupe: str = "auto", show_progress: bool = True) -> PagePlan:
    """Group rows into unique pages by image_filename (dedupe "filename") or by image content ("hash").

    "auto" uses image_filename when the dataset has that column with a value in every row, else content hashes.
    """
    has_filename = "image_filename" in dataset.column_names
    names = list(dataset["image_filename"]) if has_filename else []
    filenames_ok = has_filename and all(isinstance(n, str) and n for n in names)
    if dedupe == "auto":
        dedupe = "filename" if filenames_ok else "hash"
    if dedupe == "filename":
        if not has_filename:
            raise UserError(f"--dedupe filename: dataset {name} has no image_filename column; use --dedupe hash")
        named: list[str | None] = [n if isinstance(n, str) and n else None for n in names]
        missing = [i for i, k in enumerate(named) if k is None]
        if missing:
            log.warning("%d rows of %s have no image_filename (first: row %d); those rows are keyed by content",
                        len(missing), name, missing[0])
        images = dataset.select_columns(["image"])
        keys = [k if k is not None else content_key(images, i) for i, k in enumerate(named)]
    elif dedupe == "hash":
        images = dataset.select_columns(["image"])
        keys = [content_key(images, i) for i in tqdm(range(len(dataset)), desc="hash pages", unit="row",
                                                     disable=not show_progress or len(dataset) < 2000,
                                                     dynamic_ncols=True)]
    else:
        raise UserError(f"unknown --dedupe {dedupe!r}; use auto, filename or hash")
    index_of: dict[str, int] = {}
    pages: list[list[int]] = []
    page_of_row = np.empty(len(keys), dtype=np.int64)
    for row, key in enumerate(keys):
        u = index_of.setdefault(key, len(pages))
        if u == len(pages):
            pages.append([])
        pages[u].append(row)
        page_of_row[row] = u
    return PagePlan(keys=keys, pages=pages, page_of_row=page_of_row, dedupe=dedupe)


# ---------------------------------------------------------------- the page-embedding store


@dataclass
class StoreSpec:
    """What a page store holds; its fingerprint names the store directory (another model/data -> another dir)."""

    model_id: str
    ckpt_sha256: str | None
    config: dict[str, Any]          # the ColIntern config (formatting): decides what an embedding means
    dtype: str                      # backbone dtype: bf16 encodings differ from fp32 ones
    dataset: str
    split: str | None
    limit: int | None
    dedupe: str
    keys_sha256: str                # the page plan (which rows form which page)
    n_pages: int
    pages_per_part: int
    version: int = STORE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def id(self) -> str:
        return fingerprint(self.to_dict())


def keys_digest(plan: PagePlan) -> str:
    h = hashlib.sha256()
    for key in plan.keys:
        h.update(key.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def _part_dir(store_dir: Path, j: int) -> Path:
    return store_dir / f"part-{j:05d}"


def _part_done(store_dir: Path, j: int) -> bool:
    return (_part_dir(store_dir, j) / PART_META).is_file()


def encode_part(store_dir: Path, j: int, spec: StoreSpec, plan: PagePlan, dataset: Any, where: Callable[[int], str],
                encode: Callable[[list], list[torch.Tensor]], window: int, strict: bool,
                on_pages: Callable[[int], None]) -> dict[str, Any]:
    """Encode the pages of part j into store_dir/part-j (written to a temp dir, renamed when complete).

    Called under part j's lock. A temp dir left by a process that died is removed first; this one's is removed
    on any failure (a full disk must not stay full), so only complete parts ever exist.
    """
    final = _part_dir(store_dir, j)
    for stale in store_dir.glob(f".part-{j:05d}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = store_dir / f".part-{j:05d}.tmp-{socket.gethostname()}-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        meta = _write_part(tmp, j, spec, plan, dataset, where, encode, window, strict, on_pages)
        if final.exists():  # cannot happen under the part lock, but never replace a finished part
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            note_path(err, tmp / TOKENS_FILE)
        raise
    return meta


def _write_part(tmp: Path, j: int, spec: StoreSpec, plan: PagePlan, dataset: Any, where_of: Callable[[int], str],
                encode: Callable[[list], list[torch.Tensor]], window: int, strict: bool,
                on_pages: Callable[[int], None]) -> dict[str, Any]:
    """The token file and part.json of part j, in tmp. For each page the rows are tried in order until one image
    decodes (that row is the representative); rows whose image fails are recorded as skipped. A page without
    any decodable image gets length 0."""
    first = j * spec.pages_per_part
    last = min(first + spec.pages_per_part, spec.n_pages)
    images = dataset.select_columns(["image"])
    lengths = [0] * (last - first)
    rep_rows = [-1] * (last - first)
    sha1 = [""] * (last - first)  # content hash of the representative image: same bytes = same page
    skipped: list[list[Any]] = []
    start_time = time.time()
    n_tokens = 0
    dim = None
    with open(tmp / TOKENS_FILE, "wb") as out:
        for w0 in range(first, last, window):
            w1 = min(w0 + window, last)
            pils, owners = [], []
            for u in range(w0, w1):
                for row in plan.pages[u]:
                    where = where_of(row)
                    value = images[row]["image"]
                    try:
                        pils.append(decode_image(value, where))
                    except BadRowError as err:
                        if strict:
                            raise
                        skipped.append([row, err.reason])
                        continue
                    owners.append(u)
                    rep_rows[u - first] = row
                    sha1[u - first] = hashlib.sha1(image_bytes(value, where)).hexdigest()
                    break
            embs = encode(pils) if pils else []
            for u, emb in zip(owners, embs):
                arr = emb.to(torch.float16).numpy()  # (L, dim)
                dim = arr.shape[1] if dim is None else dim
                out.write(np.ascontiguousarray(arr).astype("<f2", copy=False).tobytes())
                lengths[u - first] = arr.shape[0]
                n_tokens += arr.shape[0]
            on_pages(w1 - w0)
        out.flush()
        os.fsync(out.fileno())
    meta = {"part": j, "first_page": first, "n_pages": last - first, "dim": dim, "n_tokens": n_tokens,
            "lengths": lengths, "rep_rows": rep_rows, "sha1": sha1, "skipped": skipped,
            "seconds": round(time.time() - start_time, 3), "pages_encoded": sum(1 for r in rep_rows if r >= 0),
            "encoded_by": f"{socket.gethostname()}:{os.getpid()}"}
    atomic_write_json(tmp / PART_META, meta)
    return meta


def ensure_page_store(store_dir: str | Path, spec: StoreSpec, plan: PagePlan, dataset: Any,
                      where: Callable[[int], str],
                      encode: Callable[[list], list[torch.Tensor]], window: int, strict: bool = False,
                      shard_id: int = 0, num_shards: int = 1, show_progress: bool = True) -> dict[str, float]:
    """Make sure every part of the store exists, encoding the missing ones. Returns this process's timing.

    Work sharing: each process starts at its own offset in the part list and claims parts with a
    non-blocking lock, so N shards on one filesystem encode disjoint parts; afterwards it waits for the parts
    others hold (a blocking lock: returns when they finish or die) and encodes whatever is still missing.
    """
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    manifest = store_dir / "manifest.json"
    with file_lock(store_dir / "manifest.lock"):
        if manifest.is_file():
            saved = json.loads(manifest.read_text())
            if saved != spec.to_dict():
                raise UserError(f"page store {store_dir} holds other embeddings than this run needs; "
                                f"delete it or pass another --emb_dir")
        else:
            atomic_write_json(manifest, spec.to_dict())
    n_parts = max(1, math.ceil(spec.n_pages / spec.pages_per_part))
    start = (shard_id * n_parts) // max(1, num_shards)
    order = [(start + i) % n_parts for i in range(n_parts)]
    done_pages = sum(min(spec.pages_per_part, spec.n_pages - j * spec.pages_per_part)
                     for j in range(n_parts) if _part_done(store_dir, j))
    stats = {"pages_encoded": 0, "encode_seconds": 0.0}
    with tqdm(total=spec.n_pages, initial=done_pages, desc="encode pages", unit="page", dynamic_ncols=True,
              disable=not show_progress) as bar:
        def run(j: int) -> None:
            t0 = time.time()
            meta = encode_part(store_dir, j, spec, plan, dataset, where, encode, window, strict, bar.update)
            stats["pages_encoded"] += meta["pages_encoded"]
            stats["encode_seconds"] += time.time() - t0
            bar.set_postfix(pages_per_s=f"{stats['pages_encoded'] / max(stats['encode_seconds'], 1e-9):.1f}")

        held_elsewhere = []
        for j in order:
            if _part_done(store_dir, j):
                continue
            with file_lock(store_dir / f"part-{j:05d}.lock", blocking=False) as held:
                if not held:
                    held_elsewhere.append(j)
                elif not _part_done(store_dir, j):
                    run(j)
        for j in held_elsewhere:
            if not _part_done(store_dir, j):
                log.info("waiting for part %d of %s (being encoded by another process)", j, store_dir)
            with file_lock(store_dir / f"part-{j:05d}.lock"):
                if not _part_done(store_dir, j):
                    run(j)
            bar.update(min(spec.pages_per_part, spec.n_pages - j * spec.pages_per_part))
    return stats


class PageTokens:
    """What the exact re-rank and the FAISS first stage read from any store of per-page float16 token vectors:
    subclasses provide page_array(u), lengths (n_pages,), starts (n_pages + 1,) global token offsets and dim."""

    lengths: np.ndarray
    starts: np.ndarray
    dim: int
    n_tokens: int
    n_valid: int                 # pages a search may return ...
    valid_ids: np.ndarray        # ... and their ids
    spec: Any                    # .n_pages

    def page_array(self, u: int) -> np.ndarray:
        raise NotImplementedError

    def iter_token_chunks(self, chunk: int = 1 << 18) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def sample_tokens(self, n: int, seed: int = 0) -> np.ndarray:
        raise NotImplementedError

    def padded(self, ids: np.ndarray, device: Any = "cpu") -> torch.Tensor:
        """(n, Lmax, dim) float32 tensor of the pages, each padded with copies of its own last token.

        A copy of a real token never changes a max, so MaxSim over the padded block is exact without a mask.
        """
        lmax = int(self.lengths[ids].max())
        buf = np.empty((len(ids), lmax, self.dim), dtype=np.float16)  # (n, Lmax, dim), converted on the device
        for r, u in enumerate(ids):
            a = self.page_array(int(u))
            buf[r, :len(a)] = a
            buf[r, len(a):] = a[-1]
        return torch.from_numpy(buf).to(device).float()

    def token_pages(self, token_ids: np.ndarray) -> np.ndarray:
        """Global token ids -> page ids (-1 for FAISS's -1 "no result")."""
        pages = np.searchsorted(self.starts, token_ids, side="right") - 1
        return np.where(token_ids < 0, -1, pages)


class PageStore(PageTokens):
    """Read side of a page store: memory-mapped fp16 token arrays, one per part, and per-page offsets."""

    def __init__(self, store_dir: str | Path, spec: StoreSpec):
        self.dir = Path(store_dir)
        self.spec = spec
        n_parts = max(1, math.ceil(spec.n_pages / spec.pages_per_part))
        self.parts: list[dict[str, Any]] = []
        self.maps: list[np.ndarray | None] = []
        lengths, reps, hashes = [], [], []
        dim = None
        for j in range(n_parts):
            meta = json.loads((_part_dir(self.dir, j) / PART_META).read_text())
            self.parts.append(meta)
            lengths += meta["lengths"]
            reps += meta["rep_rows"]
            hashes += meta["sha1"]
            if meta["dim"] is not None:
                dim = meta["dim"] if dim is None else dim
                if meta["dim"] != dim:
                    raise UserError(f"page store {self.dir}: part {j} has dim {meta['dim']}, others {dim}")
        self.dim = dim or 0
        for j, meta in enumerate(self.parts):
            path = _part_dir(self.dir, j) / TOKENS_FILE
            if meta["n_tokens"] == 0:
                self.maps.append(None)
                continue
            expected = meta["n_tokens"] * self.dim * 2
            if path.stat().st_size != expected:
                raise UserError(f"page store {self.dir}: {path} has {path.stat().st_size} bytes, expected "
                                f"{expected}; delete the part directory to re-encode it")
            # mode "c" (copy-on-write) gives writable arrays for torch.from_numpy without touching the file
            self.maps.append(np.memmap(path, dtype="<f2", mode="c", shape=(meta["n_tokens"], self.dim)))
        self.lengths = np.asarray(lengths, dtype=np.int64)          # (n_pages,)
        self.rep_rows = np.asarray(reps, dtype=np.int64)            # (n_pages,) -1 = no decodable image
        self.sha1 = hashes                                           # content hash per page ("" if none)
        self.valid = self.lengths > 0                                # (n_pages,)
        self.valid_ids = np.flatnonzero(self.valid)                  # ascending
        self.n_valid = len(self.valid_ids)
        self.part_of = np.arange(spec.n_pages) // spec.pages_per_part
        local_starts = np.zeros(spec.n_pages, dtype=np.int64)        # token offset of a page inside its part
        for j, meta in enumerate(self.parts):
            first = meta["first_page"]
            n = meta["n_pages"]
            local_starts[first:first + n] = np.concatenate([[0], np.cumsum(meta["lengths"])[:-1]]) if n else []
        self.local_starts = local_starts
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])  # (n_pages+1,) global token offsets
        self.n_tokens = int(self.starts[-1])
        self._resident: list[torch.Tensor | None] = []  # make_resident's copies of self.maps
        self._resident_on: torch.device | None = None
        self._not_resident: set[torch.device] = set()  # devices make_resident found too small

    def skipped_rows(self) -> list[tuple[int, str]]:
        return [(int(r), str(reason)) for meta in self.parts for r, reason in meta["skipped"]]

    def page_array(self, u: int) -> np.ndarray:
        """(L_u, dim) float16 view of page u in its memory map (no copy)."""
        s = int(self.local_starts[u])
        return self.maps[self.part_of[u]][s:s + int(self.lengths[u])]

    def pages(self, ids: Sequence[int], device: Any = "cpu") -> list[torch.Tensor]:
        """(L, dim) float32 tensors of the given pages on device."""
        return [torch.from_numpy(np.asarray(self.page_array(int(u)), dtype=np.float32)).to(device) for u in ids]

    def make_resident(self, device: Any, budget_bytes: int | None = None) -> bool:
        """Keep every part on device (fp16, as stored) for all later scans, if it fits; True when it does.

        Exact mining scans the whole store once per search batch: on a GPU, streaming it from disk each time
        re-uploads the store hundreds of times (colpali_train_set: ~30 GB per batch). budget_bytes defaults to
        half of the device's free memory on CUDA; elsewhere resident copies are only made when a budget is given.
        """
        device = torch.device(device)
        if self._resident_on == device:
            return True
        if device in self._not_resident:  # decided once: Miner asks before every search batch
            return False
        need = self.n_tokens * self.dim * 2
        if budget_bytes is None:
            budget_bytes = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 0
        if need > budget_bytes:
            log.info("page store: %.2f GiB does not fit the %.2f GiB budget on %s; streamed from disk for every "
                     "search batch", need / 2**30, budget_bytes / 2**30, device)
            self._not_resident.add(device)
            return False
        self._resident = [None if mm is None else torch.from_numpy(np.asarray(mm)).to(device) for mm in self.maps]
        self._resident_on = device
        log.info("page store resident on %s: %.2f GiB (fp16)", device, need / 2**30)
        return True

    def iter_parts(self, device: Any = "cpu") -> Iterator[tuple[np.ndarray, list[torch.Tensor]]]:
        """(valid page ids of a part, their (L, dim) float32 tensors on device), part after part.

        One part is read (and moved to the device) as one contiguous block; the pages are views into it.
        This is the streaming scan of the exact method: one part in memory at a time, unless make_resident
        put the store on this device (then each part is only widened to float32 there, which is exact).
        """
        device = torch.device(device)
        for j, meta in enumerate(self.parts):
            ids = np.arange(meta["first_page"], meta["first_page"] + meta["n_pages"])
            ids = ids[self.valid[ids]]
            if not len(ids):
                continue
            stored = self._resident[j] if self._resident_on == device else None
            if stored is None:
                stored = torch.from_numpy(np.asarray(self.maps[j]))
            block = stored.to(device=device, dtype=torch.float32)  # (T_j, dim)
            yield ids, list(torch.split(block, self.lengths[ids].tolist()))

    def iter_token_chunks(self, chunk: int = 1 << 18) -> Iterator[np.ndarray]:
        """All page token vectors in global token order as float32 (n, dim) chunks (for the FAISS index)."""
        for mm in self.maps:
            if mm is None:
                continue
            for s in range(0, mm.shape[0], chunk):
                yield np.ascontiguousarray(mm[s:s + chunk], dtype=np.float32)

    def sample_tokens(self, n: int, seed: int = 0) -> np.ndarray:
        """n token vectors drawn uniformly without replacement (float32), for training an IVF index."""
        rng = np.random.default_rng(seed)
        picks = np.sort(rng.choice(self.n_tokens, size=min(n, self.n_tokens), replace=False))
        out = np.empty((len(picks), self.dim), dtype=np.float32)
        part_token_starts = np.concatenate([[0], np.cumsum([m["n_tokens"] for m in self.parts])])
        owner = np.searchsorted(part_token_starts, picks, side="right") - 1
        for j in np.unique(owner):
            sel = owner == j
            out[sel] = self.maps[j][picks[sel] - part_token_starts[j]]
        return out

