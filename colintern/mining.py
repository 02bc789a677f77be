"""Reusable pieces of mine.py: the on-disk page-embedding store, candidate generation and negative selection.

Pipeline (mine.py drives it):
1. plan_pages: one page per distinct page key (image_filename or a content hash), in first-appearance order;
   the representative row of a page is its first row whose image decodes.
2. ensure_page_store: every unique page is encoded once, in parts of `pages_per_part` pages, into a flat fp16
   (total_tokens, dim) file per part + token offsets. Parts are claimed with file locks, so concurrent shards
   (torchrun ranks, or jobs sharing a filesystem) split the encoding and an interrupted run keeps every
   finished part. Scoring streams the parts through memory maps: the corpus never has to fit in RAM or GPU.
3. per query: the positive score, then candidates (exact: every page; faiss: first stage + exact re-rank),
   then select_negatives (positives removed, false-negative filter, skip_top, top k).

Scores are the exact late-interaction score of colintern.scoring.maxsim: the SUM over query tokens of the max
over page tokens (ColBERT / ColPali / mteb). The SPEC §5 loss uses the mean over query tokens; the ranking of
pages for one query and the ratio of fn_filter are the same under both.

Why FAISS indexes page *token* vectors (the ColBERT / PLAID first stage) and not one vector per page: a mean-
pooled page vector (the seed's miner) throws away the late interaction, so its neighbours are pages that look
alike on average, not pages that answer the query's individual terms. Indexing every page token vector in an
inner-product index and searching with every query token finds pages that own a token close to some query
token; a page's approximate score is sum_i max(best hit of query token i on the page, tau_i), where tau_i (the
score of token i's last hit) stands in for hits that were not retrieved (XTR's missing-similarity imputation,
an upper bound of the true max). The top `candidates` pages by that score are re-ranked with exact MaxSim;
`candidate_recall` (mine.py) measures how much of the exact top-k the candidates hold.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from colintern.data import BadRowError, decode_image, image_bytes
from colintern.errors import UserError

log = logging.getLogger("colintern.mining")

STORE_VERSION = 1
TOKENS_FILE = "tokens.f16"  # raw little-endian float16, (n_tokens, dim) row-major
PART_META = "part.json"


# ---------------------------------------------------------------- small file helpers


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to a temp file beside path, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (identifies a checkpoint in fingerprints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def file_lock(path: str | Path, blocking: bool = True) -> Iterator[bool]:
    """flock on path: yields True when held, False when not blocking and someone else holds it.

    The kernel releases the lock when its holder dies, so a crashed shard never blocks the others.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def count_complete_lines(path: str | Path) -> tuple[int, int]:
    """(number of newline-terminated lines, byte size of those lines) in a file; a torn last line is ignored."""
    n, size = 0, 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            n += 1
            size += len(line)
    return n, size


def byte_offset_of_line(path: str | Path, n_lines: int) -> int:
    """Byte offset where line n_lines (0-based) starts, i.e. the size of the first n_lines lines."""
    size = 0
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if i >= n_lines:
                break
            size += len(line)
    return size


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
        keys = [n if isinstance(n, str) and n else None for n in names]
        missing = [i for i, k in enumerate(keys) if k is None]
        if missing:
            log.warning("%d rows of %s have no image_filename (first: row %d); those rows are keyed by content",
                        len(missing), name, missing[0])
        images = dataset.select_columns(["image"])
        keys = [k if k is not None else content_key(images, i) for i, k in enumerate(keys)]
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
    split: str
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


def encode_part(store_dir: Path, j: int, spec: StoreSpec, plan: PagePlan, dataset: Any, name: str,
                encode: Callable[[list], list[torch.Tensor]], window: int, strict: bool,
                on_pages: Callable[[int], None]) -> dict[str, Any]:
    """Encode the pages of part j into store_dir/part-j (written to a temp dir, renamed when complete).

    For each page the rows are tried in order until one image decodes (that row is the representative);
    rows whose image fails are recorded as skipped. A page without any decodable image gets length 0.
    """
    first = j * spec.pages_per_part
    last = min(first + spec.pages_per_part, spec.n_pages)
    final = _part_dir(store_dir, j)
    tmp = store_dir / f".part-{j:05d}.tmp-{socket.gethostname()}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
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
                    where = f"{name} row {row}"
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
    if final.exists():  # cannot happen under the part lock, but never replace a finished part
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
    return meta


def ensure_page_store(store_dir: str | Path, spec: StoreSpec, plan: PagePlan, dataset: Any, name: str,
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
            meta = encode_part(store_dir, j, spec, plan, dataset, name, encode, window, strict, bar.update)
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


class PageStore:
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
        self.part_of = np.arange(spec.n_pages) // spec.pages_per_part
        local_starts = np.zeros(spec.n_pages, dtype=np.int64)        # token offset of a page inside its part
        for j, meta in enumerate(self.parts):
            first = meta["first_page"]
            n = meta["n_pages"]
            local_starts[first:first + n] = np.concatenate([[0], np.cumsum(meta["lengths"])[:-1]]) if n else []
        self.local_starts = local_starts
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])  # (n_pages+1,) global token offsets
        self.n_tokens = int(self.starts[-1])

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())

    def skipped_rows(self) -> list[tuple[int, str]]:
        return [(int(r), str(reason)) for meta in self.parts for r, reason in meta["skipped"]]

    def page_array(self, u: int) -> np.ndarray:
        """(L_u, dim) float16 view of page u in its memory map (no copy)."""
        s = int(self.local_starts[u])
        return self.maps[self.part_of[u]][s:s + int(self.lengths[u])]

    def pages(self, ids: Sequence[int], device: Any = "cpu") -> list[torch.Tensor]:
        """(L, dim) float32 tensors of the given pages on device."""
        return [torch.from_numpy(np.asarray(self.page_array(int(u)), dtype=np.float32)).to(device) for u in ids]

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

    def iter_parts(self, device: Any = "cpu") -> Iterator[tuple[np.ndarray, list[torch.Tensor]]]:
        """(valid page ids of a part, their (L, dim) float32 tensors on device), part after part.

        One part is read (and moved to the device) as one contiguous block; the pages are views into it.
        This is the streaming scan of the exact method: one part in memory at a time.
        """
        for j, meta in enumerate(self.parts):
            ids = np.arange(meta["first_page"], meta["first_page"] + meta["n_pages"])
            ids = ids[self.valid[ids]]
            if not len(ids):
                continue
            block = torch.from_numpy(np.asarray(self.maps[j])).to(device=device, dtype=torch.float32)  # (T_j, dim)
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

    def token_pages(self, token_ids: np.ndarray) -> np.ndarray:
        """Global token ids -> page ids (-1 for FAISS's -1 "no result")."""
        pages = np.searchsorted(self.starts, token_ids, side="right") - 1
        return np.where(token_ids < 0, -1, pages)


# ---------------------------------------------------------------- queries and positives


@dataclass
class Pair:
    """One output line: a query text and its own positive page."""

    row: int                 # first dataset row with this (query, page)
    text: str
    page: int                # unique page index of the positive


@dataclass
class PairPlan:
    pairs: list[Pair]
    positives: dict[str, np.ndarray]   # query text -> every page that is a positive for it (sorted)
    duplicate_rows: int                # rows repeating an earlier (query, page)
    bad_rows: list[tuple[int, str]] = field(default_factory=list)


def plan_pairs(queries: Sequence[Any], plan: PagePlan, store: PageStore, bad_image_rows: set[int],
               check: Callable[[Any, str], str], name: str) -> PairPlan:
    """One pair per distinct (query text, page), in dataset order.

    The positives of a query are all rows that share its page, the pages of other rows with the same query
    text (the same question asked of two pages: neither may be the other's negative), and pages whose image
    bytes equal a positive's (the same page stored under two file names).
    Rows with an empty query, a failed image, or a page without any decodable image are reported, not used.
    """
    bad: list[tuple[int, str]] = []
    positives: dict[str, set[int]] = {}
    seen: set[tuple[str, int]] = set()
    pairs: list[Pair] = []
    duplicates = 0
    for row, value in enumerate(queries):
        if row in bad_image_rows:
            continue  # reported by the encoder with its reason
        u = int(plan.page_of_row[row])
        try:
            text = check(value, f"{name} row {row}")
        except BadRowError as err:
            bad.append((row, err.reason))
            continue
        if not store.valid[u]:
            bad.append((row, "missing image: no row of its page has a decodable image"))
            continue
        positives.setdefault(text, set()).add(u)
        if (text, u) in seen:
            duplicates += 1
            continue
        seen.add((text, u))
        pairs.append(Pair(row=row, text=text, page=u))
    # pages with the same image bytes under another name are the same page: positives too
    same_content: dict[str, list[int]] = {}
    for u in store.valid_ids:
        same_content.setdefault(store.sha1[u], []).append(int(u))
    for pages in positives.values():
        pages.update([v for u in list(pages) for v in same_content.get(store.sha1[u], ())])
    pos = {t: np.asarray(sorted(s), dtype=np.int64) for t, s in positives.items()}
    return PairPlan(pairs=pairs, positives=pos, duplicate_rows=duplicates, bad_rows=bad)


# ---------------------------------------------------------------- scoring and selection


def unique_texts(pairs: Sequence[Pair]) -> tuple[list[str], np.ndarray]:
    """Distinct query texts of a batch (first-appearance order) and each pair's index into them."""
    index: dict[str, int] = {}
    which = np.asarray([index.setdefault(p.text, len(index)) for p in pairs], dtype=np.int64)
    return list(index), which


@contextlib.contextmanager
def exact_fp32(device: Any) -> Iterator[None]:
    """No TF32 in CUDA matmuls while scoring (scores must be float32-exact, as in colintern.scoring)."""
    if torch.device(device).type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def rerank_chunk_tokens(device: Any) -> int:
    """Padded page tokens scored per GEMM in a re-rank.

    On a CPU a 4,096-token block (2 MiB of fp32) and its similarity tile stay in cache between the fp16 -> fp32
    conversion, the GEMM and the max: 4x faster than one block of all candidates (bench/mining.py, BENCHMARKS.md).
    On a GPU fewer, larger transfers and launches win.
    """
    return 4096 if torch.device(device).type == "cpu" else 1 << 20


@torch.no_grad()
def own_candidate_scores(q: torch.Tensor, ids: np.ndarray, store: PageStore, device: Any,
                         chunk_tokens: int | None = None) -> np.ndarray:
    """Exact sum-MaxSim of ONE query against its own list of pages -> (len(ids),) float32.

    colintern.scoring.maxsim scores every query against every page; re-ranking needs each query against its
    own candidates only. Candidates are taken shortest first and packed into padded (n, Lmax, dim) blocks of at
    most chunk_tokens tokens (padding = copies of a real token, exact; sorting keeps it small), one GEMM each.
    """
    out = np.empty(len(ids), dtype=np.float32)
    if not len(ids):
        return out
    budget = chunk_tokens or rerank_chunk_tokens(device)
    order = np.argsort(store.lengths[ids], kind="stable")  # (n,) shortest first
    lengths = store.lengths[ids][order]
    qd = q.to(device=device, dtype=torch.float32)  # (Lq, dim)
    with exact_fp32(device):
        start = 0
        while start < len(ids):
            # the block's Lmax is its last (longest) page: grow while n x Lmax fits the budget (at least 1 page)
            block_sizes = np.arange(1, len(ids) - start + 1) * lengths[start:]  # ascending
            end = start + max(1, int(np.searchsorted(block_sizes, budget, side="right")))
            sel = order[start:end]
            block = store.padded(ids[sel], device)  # (n, Lmax, dim)
            n, lmax, dim = block.shape
            sim = qd @ block.view(n * lmax, dim).T  # (Lq, n*Lmax)
            out[sel] = sim.view(-1, n, lmax).amax(-1).sum(0).cpu().numpy()  # (n,)
            start = end
    return out


def positive_scores(qs: list[torch.Tensor], which: np.ndarray, pairs: Sequence[Pair], store: PageStore,
                    device: Any) -> np.ndarray:
    """(n_pairs,) float32 exact score of every pair's own positive page (the same for both methods)."""
    return np.asarray([own_candidate_scores(qs[which[r]], np.asarray([p.page]), store, device)[0]
                       for r, p in enumerate(pairs)], dtype=np.float32)


def select_negatives(pages: np.ndarray, scores: np.ndarray, positives: np.ndarray, threshold: float | None,
                     skip_top: int, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Negatives of one query from scored candidates -> (pages, scores, number dropped by the fn filter).

    Positives are removed; with a threshold (fn_filter x positive score) every candidate scoring above it is
    dropped as a probable false negative; the rest is ranked by score (ties: lower page index first) and
    ranks skip_top .. skip_top+k-1 are returned.
    """
    keep = ~np.isin(pages, positives)
    n_filtered = 0
    if threshold is not None:
        above = keep & (scores > threshold)
        n_filtered = int(above.sum())
        keep &= ~above
    p, s = pages[keep], scores[keep]
    order = np.lexsort((p, -s))[skip_top:skip_top + k]
    return p[order], s[order], n_filtered


def exact_search(qs: list[torch.Tensor], which: np.ndarray, pairs: Sequence[Pair], pos_scores: np.ndarray,
                 positives: dict[str, np.ndarray], store: PageStore, maxsim: Callable, device: Any,
                 k: int, skip_top: int, fn_filter: float | None) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Score every valid page exactly, streaming the store part by part; keep a running top-(k+skip_top).

    Positives and fn-filtered pages are masked (-inf) before the running top-k, so the result equals
    select_negatives over the whole corpus.
    """
    n = len(pairs)
    depth = k + skip_top
    thr = (torch.from_numpy(pos_scores * fn_filter).unsqueeze(1) if fn_filter
           else torch.full((n, 1), float("inf")))  # (n, 1)
    run_v = torch.empty(n, 0)
    run_i = torch.empty(n, 0, dtype=torch.long)
    filtered = torch.zeros(n, dtype=torch.long)
    which_t = torch.from_numpy(which)
    pos_lists = [positives[p.text] for p in pairs]
    for ids, docs in store.iter_parts(device):
        s = maxsim(qs, docs, device=device)[which_t]  # (n, n_part) float32
        ids_t = torch.from_numpy(ids)
        is_pos = torch.zeros_like(s, dtype=torch.bool)
        for r, pl in enumerate(pos_lists):
            hit = np.flatnonzero(np.isin(ids, pl))
            if len(hit):
                is_pos[r, torch.from_numpy(hit)] = True
        above = (s > thr) & ~is_pos
        filtered += above.sum(1)
        s = s.masked_fill(is_pos | above, float("-inf"))
        cat_v = torch.cat([run_v, s], 1)
        cat_i = torch.cat([run_i, ids_t.expand(n, len(ids))], 1)
        # stable: among equal scores the running entries (lower page ids) stay first, then ascending ids
        v, order = torch.sort(cat_v, dim=1, descending=True, stable=True)
        run_v, run_i = v[:, :depth], cat_i.gather(1, order[:, :depth])
    out = []
    for r in range(n):
        finite = torch.isfinite(run_v[r])
        v, i = run_v[r][finite].numpy(), run_i[r][finite].numpy()
        out.append((i[skip_top:], v[skip_top:], int(filtered[r])))
    return out


# Below this many page tokens exact search is as fast as FAISS and has no approximation; above it an IVF-PQ first
# stage pays for its build. Measured on a 2-core CPU (docs/BENCHMARKS.md, "Mining"), per query / build: 1.3M tokens
# exact 58 ms, IVF1024,PQ32 35 ms / 35 s, Flat 78 ms (the same GEMMs as exact plus top-k heaps); 2.6M tokens exact
# 134 ms, IVF8192,PQ32 (auto) 53 ms / 209 s. With one query per page the totals meet near 3M tokens.
AUTO_EXACT_MAX_TOKENS = 3_000_000


def choose_method(method: str, n_tokens: int, on_gpu: bool) -> tuple[str, str]:
    """--method auto -> ("exact" | "faiss", why): exact on a GPU or up to AUTO_EXACT_MAX_TOKENS page tokens."""
    if method != "auto":
        return method, "asked for"
    if on_gpu:
        return "exact", "exact MaxSim runs at GEMM speed on a GPU"
    if n_tokens <= AUTO_EXACT_MAX_TOKENS:
        return "exact", f"{n_tokens:,} page tokens <= {AUTO_EXACT_MAX_TOKENS:,}: exact is as fast as FAISS here"
    return "faiss", f"{n_tokens:,} page tokens > {AUTO_EXACT_MAX_TOKENS:,}: an IVF-PQ first stage is faster"


def build_faiss_index(store: PageStore, factory: str, nprobe: int, use_gpu: bool, gpu_id: int, cache_path: Path | None,
                      show_progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Inner-product FAISS index over every page token vector (ids = global token positions).

    factory "auto": an exact "Flat" index up to AUTO_EXACT_MAX_TOKENS tokens (where --method auto would not use
    FAISS at all), else "IVF<nlist>,PQ32" (32 bytes per token, trained on a sample), searched with nprobe lists.
    A trained index is saved to cache_path so a resumed run searches the very same index. With use_gpu the index
    is moved to GPU gpu_id (float16 storage).
    """
    import faiss

    if factory == "auto":
        if store.n_tokens <= AUTO_EXACT_MAX_TOKENS:
            factory = "Flat"
        else:
            nlist = int(2 ** round(math.log2(4 * math.sqrt(store.n_tokens))))
            factory = f"IVF{nlist},PQ32"
    info: dict[str, Any] = {"factory": factory, "n_tokens": store.n_tokens, "gpu": False}
    index = None
    if cache_path is not None and cache_path.is_file():
        index = faiss.read_index(str(cache_path))
        if index.ntotal != store.n_tokens:
            index = None
    if index is None:
        index = faiss.index_factory(store.dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            nlist = faiss.extract_index_ivf(index).nlist if "IVF" in factory else 0
            n_train = min(store.n_tokens, max(65536, 64 * nlist), 2_000_000)
            log.info("training FAISS %s on %d token vectors", factory, n_train)
            index.train(store.sample_tokens(n_train))
        with tqdm(total=store.n_tokens, desc="index tokens", unit="tok", unit_scale=True, dynamic_ncols=True,
                  disable=not show_progress) as bar:
            for chunk in store.iter_token_chunks():
                index.add(chunk)
                bar.update(len(chunk))
        if cache_path is not None and factory != "Flat":
            tmp = cache_path.with_name(cache_path.name + f".tmp-{os.getpid()}")
            faiss.write_index(index, str(tmp))
            os.replace(tmp, cache_path)
    if "IVF" in factory:
        faiss.extract_index_ivf(index).nprobe = nprobe
        info["nprobe"] = nprobe
    if use_gpu:
        try:
            res = faiss.StandardGpuResources()
            options = faiss.GpuClonerOptions()
            options.useFloat16 = True
            index = faiss.index_cpu_to_gpu(res, gpu_id % max(faiss.get_num_gpus(), 1), index, options)
            index._colintern_gpu_resources = res  # keep the resources alive as long as the index
            info["gpu"] = True
        except Exception as err:  # noqa: BLE001 - faiss raises RuntimeError with C++ messages
            log.warning("FAISS GPU index failed (%s); searching on the CPU", str(err).splitlines()[0])
    return index, info


def faiss_candidates(index: Any, qs_np: list[np.ndarray], store: PageStore, token_k: int,
                     n_candidates: int) -> list[np.ndarray]:
    """First stage: the n_candidates pages with the best approximate score, per query (best first).

    Every query token retrieves its token_k nearest page tokens; a page's approximate score is
    sum_i max(tau_i, best hit of token i on the page) with tau_i the score of token i's last hit. Pages
    without any hit all score sum_i tau_i and fill remaining slots in page order, so `n_candidates` is a
    true depth: when it covers the corpus, the candidates are the whole corpus.
    """
    lens = [q.shape[0] for q in qs_np]
    all_tok = np.concatenate(qs_np).astype(np.float32, copy=False)  # (T, dim)
    kk = min(token_k, store.n_tokens)
    dist, ids = index.search(all_tok, kk)  # (T, kk): scores descending per row, token ids (-1 = none)
    pages = store.token_pages(ids)  # (T, kk)
    n_pages = store.spec.n_pages
    n_cand = min(n_candidates, store.n_valid)
    out = []
    start = 0
    for length in lens:
        d, p = dist[start:start + length], pages[start:start + length]  # (Lq, kk)
        start += length
        ok = p >= 0
        # tau_i: the score of token i's last hit (0 when it retrieved nothing)
        tau = np.where(ok.any(1), np.where(ok, d, np.inf).min(1), 0.0)  # (Lq,)
        rows, cols = np.nonzero(ok)  # row-major: within a row, hits come best first
        key = rows * n_pages + p[rows, cols]
        _, first = np.unique(key, return_index=True)  # first hit = best hit of (token, page)
        best_rows, best_pages = rows[first], p[rows[first], cols[first]]
        gain = d[best_rows, cols[first]] - tau[best_rows]  # >= 0
        hit_pages, inv = np.unique(best_pages, return_inverse=True)
        approx = tau.sum() + np.bincount(inv.reshape(-1), weights=gain, minlength=len(hit_pages))
        cand = hit_pages[np.lexsort((hit_pages, -approx))[:n_cand]]
        if len(cand) < n_cand:  # too few pages were hit: fill with unhit pages (all tied at sum(tau))
            extra = store.valid_ids[:n_cand + len(hit_pages)]
            extra = extra[~np.isin(extra, hit_pages)][:n_cand - len(cand)]
            cand = np.concatenate([cand, extra])
        out.append(cand.astype(np.int64))
    return out


def faiss_search(qs: list[torch.Tensor], which: np.ndarray, pairs: Sequence[Pair], pos_scores: np.ndarray,
                 positives: dict[str, np.ndarray], store: PageStore, index: Any, device: Any,
                 k: int, skip_top: int, fn_filter: float | None, token_k: int, n_candidates: int,
                 deepen: int = 0, max_token_k: int | None = None
                 ) -> tuple[list[tuple[np.ndarray, np.ndarray, int]], list[np.ndarray], int]:
    """FAISS first stage + exact re-rank -> (per pair (negs, scores, n_filtered), per text candidates, deepened).

    Positives and the false-negative filter can eat a query's best candidates (a page set with many near
    duplicates, or an undertrained model whose scores are all close). A query left with fewer than k negatives
    whose candidates do not cover the corpus is searched again with 4x the depth (candidates and token_k), up
    to `deepen` times, so that it gets what exact search would give it instead of a short list.
    """
    qs_np = [q.float().numpy() for q in qs]
    cands: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(qs)
    cand_scores: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * len(qs)
    out: list[tuple[np.ndarray, np.ndarray, int] | None] = [None] * len(pairs)
    todo = list(range(len(qs)))  # unique texts still to (re)search
    depth, tk = n_candidates, token_k
    deepened: set[int] = set()
    for round_ in range(deepen + 1):
        found = faiss_candidates(index, [qs_np[u] for u in todo], store, tk, depth)
        for u, c in zip(todo, found):
            cands[u] = c
            cand_scores[u] = own_candidate_scores(qs[u], c, store, device)
        redo = set()
        todo_set = set(todo)
        for r, p in enumerate(pairs):
            u = int(which[r])
            if u not in todo_set:
                continue
            thr = float(pos_scores[r] * fn_filter) if fn_filter else None
            out[r] = select_negatives(cands[u], cand_scores[u], positives[p.text], thr, skip_top, k)
            if len(out[r][0]) < k and len(cands[u]) < store.n_valid:
                redo.add(u)
        if not redo or round_ == deepen:
            break
        todo = sorted(redo)
        deepened.update(redo)
        depth *= 4
        tk = min(tk * 4, max_token_k) if max_token_k else tk * 4
    return out, cands, len(deepened)  # type: ignore[return-value]
