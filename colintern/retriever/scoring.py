"""Exact late-interaction (MaxSim) scoring of ragged multi-vector embeddings.

s(q, d) = sum over the real tokens i of q of max over the real tokens j of d of <q_i, d_j>
(the ColBERT / ColPali / mteb retrieval score; the training loss in ``colintern.train.losses`` uses the
per-query-token mean instead).

Exactness: inputs are lists of ``(L_i, dim)`` tensors holding real tokens only. Documents are grouped
into length buckets and padded inside a bucket with *copies of one of their own real tokens*, so a pad
can never change a max (a zero pad would win whenever every real similarity is negative, the ColPali
padding artefact). Query tokens are concatenated without padding and summed per query with
``segment_reduce``. All arithmetic is float32 (TF32 is switched off on CUDA while scoring).

Speed: one GEMM per (query-token tile, document bucket) pair, sized so the similarity tile stays in
the CPU cache; the padding waste of the length buckets is typically well under 1 %. On CPU, buckets are
spread over one worker thread per intra-op thread, each running single-threaded kernels (see
``_iter_scores_threaded``). Benchmarks: ``bench/scoring.py`` and docs/BENCHMARKS.md.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

# Default tile sizes, per device type. doc_chunk: padded document tokens per bucket; query_chunk: query
# tokens per GEMM tile. On CPU a (256 x 2048) float32 tile is 2 MiB, which stays in cache between the
# GEMM that writes it and the max that reads it; on a GPU bigger tiles amortise launch overhead (an H200 sweep,
# docs/BENCHMARKS.md: 65,536 doc tokens 10 % faster than 16,384, the query tile no difference; 1 GiB of scratch).
_DEFAULT_CHUNKS: dict[str, tuple[int, int]] = {
    "cpu": (2048, 256),
    "cuda": (65536, 4096),
}
# Columns of chunk scores gathered before a running top-k merge in maxsim_topk.
_TOPK_MERGE_COLS = 1024


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """None means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_token_list(items: Any, name: str) -> list[torch.Tensor]:
    """Validate a list of (L_i, dim) embeddings; numpy arrays and any float dtype are accepted."""
    if isinstance(items, torch.Tensor):
        raise TypeError(
            f"{name}: expected a list of (L_i, dim) tensors with real tokens only, got one "
            f"{tuple(items.shape)} tensor; use unpad_embeddings(padded, mask) to split a padded batch"
        )
    out: list[torch.Tensor] = []
    dim = None
    for i, t in enumerate(items):
        t = torch.as_tensor(t)
        if t.ndim != 2:
            raise ValueError(f"{name}[{i}]: expected a 2-D (L, dim) tensor, got shape {tuple(t.shape)}")
        if t.shape[0] == 0:
            raise ValueError(f"{name}[{i}]: has no tokens")
        if not t.is_floating_point():
            t = t.float()
        if dim is None:
            dim = t.shape[1]
        elif t.shape[1] != dim:
            raise ValueError(f"{name}[{i}]: dim {t.shape[1]} differs from {name}[0]'s {dim}")
        out.append(t)
    return out


@contextlib.contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """No TF32 in CUDA matmuls for the duration: the one guard every exact score (and fp32 benchmark) uses.

    torch refuses to read its TF32 state through one API after it was set through the other, so the caller's state
    is restored through the API it used: the legacy `allow_tf32` when it can be read (defaults,
    `allow_tf32 = ...`, `set_float32_matmul_precision`), else the new `fp32_precision`. Correct from every
    starting state (tests/test_scoring.py sets each)."""
    if device.type != "cuda":
        yield
        return
    mm = torch.backends.cuda.matmul
    if not hasattr(mm, "fp32_precision"):  # torch < 2.9: the legacy flag only
        old = mm.allow_tf32
        mm.allow_tf32 = False
        try:
            yield
        finally:
            mm.allow_tf32 = old
        return
    try:
        legacy = mm.allow_tf32  # readable unless the caller used the new API
    except RuntimeError:
        legacy = None
    old = mm.fp32_precision
    mm.fp32_precision = "ieee"
    try:
        yield
    finally:
        if legacy is not None:
            mm.allow_tf32 = legacy
        else:
            mm.fp32_precision = old


def _doc_buckets(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group doc indices by length (ascending) so n_docs * longest <= max_tokens per group.

    A document longer than max_tokens gets a group of its own. Inside a group the indices are ascending
    in length, so the padding waste is only the length spread of neighbours in sorted order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > max_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups


def _pack_bucket(docs: list[torch.Tensor], idx: list[int], device: torch.device) -> torch.Tensor:
    """Stack docs[idx] into (n, Lmax, dim) float32 on device, padding each with copies of its last real token.

    Packed where the docs live, then moved in one transfer (not one per doc).
    """
    lmax = max(docs[i].shape[0] for i in idx)
    dim = docs[idx[0]].shape[1]
    src = docs[idx[0]].device
    buf = torch.empty(len(idx), lmax, dim, dtype=torch.float32, device=src)  # (n, Lmax, dim)
    for row, i in enumerate(idx):
        d = docs[i]
        n_tok = d.shape[0]
        buf[row, :n_tok].copy_(d)
        if n_tok < lmax:
            # duplicates of a real token never change a max: exact, and no mask pass is needed
            buf[row, n_tok:].copy_(d[n_tok - 1].expand(lmax - n_tok, dim))
    return buf.to(device, non_blocking=True)


class _QueryTokens:
    """All query tokens concatenated once (no padding), with each query's token count."""

    def __init__(self, qs: list[torch.Tensor], device: torch.device) -> None:
        self.n = len(qs)
        self.lens = torch.tensor([q.shape[0] for q in qs], dtype=torch.long, device=device)  # (n_q,)
        self.tokens = torch.cat([q.to(device=device, dtype=torch.float32) for q in qs])  # (Tq, dim)


def _score_bucket(
    qt: _QueryTokens, bucket: torch.Tensor, query_chunk: int, sim_buf: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact sum-MaxSim of all queries against one padded doc bucket -> ((n_q, n), reusable buffer)."""
    n, lmax, dim = bucket.shape
    flat = bucket.view(n * lmax, dim)  # (n*Lmax, dim)
    t_q = qt.tokens.shape[0]
    tok_max = torch.empty(t_q, n, dtype=torch.float32, device=bucket.device)  # (Tq, n)
    need = min(query_chunk, t_q) * n * lmax
    if sim_buf is None or sim_buf.numel() < need:
        sim_buf = torch.empty(need, dtype=torch.float32, device=bucket.device)
    for s in range(0, t_q, query_chunk):
        e = min(s + query_chunk, t_q)
        sim = sim_buf[: (e - s) * n * lmax].view(e - s, n * lmax)  # (qt, n*Lmax)
        torch.mm(qt.tokens[s:e], flat.T, out=sim)
        torch.amax(sim.view(e - s, n, lmax), dim=-1, out=tok_max[s:e])  # (qt, n)
    # per-query sum over its contiguous tokens (deterministic, also on CUDA)
    out = torch.segment_reduce(tok_max, "sum", lengths=qt.lens, axis=0)  # (n_q, n)
    return out, sim_buf


def _fused_available() -> bool:
    from colintern.retriever import maxsim_kernel

    return maxsim_kernel.available()


# Page tokens per launch of the fused kernel (the pages are concatenated once per launch: 512 MiB at dim 128 fp16).
FUSED_DOC_TOKENS = 1 << 21


def _iter_fused(qs: list[torch.Tensor], docs: list[torch.Tensor], dev: torch.device,
                fallback: tuple[int | None, int | None, int | None] = (None, None, None)
                ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """The fused Triton kernel (colintern.retriever.maxsim_kernel) over groups of docs: float16/bfloat16 when queries and
    docs are both in that dtype (the caller's choice: tensor cores, float32 accumulation), else IEEE float32 (the
    same arithmetic as the GEMM path). Falls back to that path (with the caller's `fallback` doc_chunk, query_chunk
    and workers), with a warning, if the kernel cannot compile here."""
    from colintern.retriever.maxsim_kernel import maxsim_fused

    dtypes = {t.dtype for t in qs} | {t.dtype for t in docs}
    dtype = dtypes.pop() if len(dtypes) == 1 and dtypes & {torch.float16, torch.bfloat16} else torch.float32
    start = 0
    while start < len(docs):
        end, tokens = start, 0
        while end < len(docs) and (end == start or tokens + docs[end].shape[0] <= FUSED_DOC_TOKENS):
            tokens += docs[end].shape[0]
            end += 1
        try:
            with torch.no_grad():
                scores = maxsim_fused(qs, docs[start:end], dtype=dtype, device=dev)  # (n_q, end - start)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - Triton compile errors come in many types
            if start:
                raise
            logger.warning("the fused MaxSim kernel failed here (%s: %s); using the GEMM path "
                           "(COLINTERN_FUSED_MAXSIM=0 skips the attempt)", type(err).__name__, err)
            os.environ["COLINTERN_FUSED_MAXSIM"] = "0"
            yield from _iter_scores(qs, docs, dev, *fallback)
            return
        yield list(range(start, end)), scores
        start = end


class PackedDocs:
    """Documents packed once into the padded float32 buckets the scorer reads, to be scored again and again (a search
    service keeps its index resident this way): no widening, copying or padding per call. fetch(i) -> (L_i, dim)
    tensor of any float dtype; 4 bytes per stored value (float16 pages take twice their size here)."""

    def __init__(self, lengths: Sequence[int], fetch: Callable[[int], torch.Tensor],
                 device: str | torch.device | None = None, bucket_tokens: int = 1 << 16) -> None:
        self.device = _resolve_device(device)
        self.lengths = list(lengths)
        self.buckets: list[tuple[list[int], torch.Tensor]] = []  # (doc ids, (n, Lmax, dim) float32)
        self.where: list[tuple[int, int]] = [(0, 0)] * len(lengths)  # doc -> (bucket, row)
        for idx in _doc_buckets(lengths, bucket_tokens):
            self.buckets.append((idx, _pack_bucket([fetch(i) for i in idx], list(range(len(idx))), self.device)))
            for row, i in enumerate(idx):
                self.where[i] = (len(self.buckets) - 1, row)

    def __len__(self) -> int:
        return len(self.lengths)

    def doc(self, i: int) -> torch.Tensor:
        """(L_i, dim) float32 real tokens of doc i: a view into its bucket, no copy."""
        bucket, row = self.where[i]
        return self.buckets[bucket][1][row, :self.lengths[i]]

    @property
    def nbytes(self) -> int:
        return sum(bucket.numel() * bucket.element_size() for _, bucket in self.buckets)


def _iter_packed(qs: list[torch.Tensor], docs: PackedDocs, query_chunk: int | None
                 ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """_iter_scores over PackedDocs: one multi-threaded GEMM pass per bucket (buckets are large: no thread pool)."""
    dev = docs.device
    chunk = int(query_chunk or _DEFAULT_CHUNKS.get(dev.type, _DEFAULT_CHUNKS["cuda"])[1])  # as _iter_scores picks it
    with torch.no_grad():
        qt = _QueryTokens(qs, dev)
    sim_buf = None
    for idx, bucket in docs.buckets:
        with torch.no_grad(), exact_fp32(dev):
            scores, sim_buf = _score_bucket(qt, bucket, chunk, sim_buf)
        yield idx, scores


def _iter_scores(
    qs: Any,
    docs: Any,
    device: str | torch.device | None,
    doc_chunk: int | None,
    query_chunk: int | None,
    workers: int | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (doc indices, (n_q, n) float32 scores on the compute device) for every doc bucket."""
    qs_l = _as_token_list(qs, "qs")
    if isinstance(docs, PackedDocs):
        yield from _iter_packed(qs_l, docs, query_chunk) if qs_l and len(docs) else iter(())
        return
    docs_l = _as_token_list(docs, "docs")
    if qs_l and docs_l and qs_l[0].shape[1] != docs_l[0].shape[1]:
        raise ValueError(f"query dim {qs_l[0].shape[1]} != doc dim {docs_l[0].shape[1]}")
    dev = _resolve_device(device)
    default_doc, default_q = _DEFAULT_CHUNKS.get(dev.type, _DEFAULT_CHUNKS["cuda"])
    doc_chunk = int(doc_chunk or default_doc)
    query_chunk = int(query_chunk or default_q)
    if doc_chunk < 1 or query_chunk < 1:
        raise ValueError("doc_chunk and query_chunk must be >= 1")
    if not qs_l or not docs_l:
        return
    if dev.type == "cuda" and _fused_available():
        yield from _iter_fused(qs_l, docs_l, dev, (doc_chunk, query_chunk, workers))
        return
    with torch.no_grad():
        qt = _QueryTokens(qs_l, dev)
    buckets = _doc_buckets([d.shape[0] for d in docs_l], doc_chunk)
    logger.debug("maxsim: %d queries (%d tokens) x %d docs in %d buckets on %s",
                 qt.n, qt.tokens.shape[0], len(docs_l), len(buckets), dev)
    n_workers = min(int(workers or torch.get_num_threads()), len(buckets))
    if dev.type == "cpu" and n_workers > 1:
        yield from _iter_scores_threaded(qt, docs_l, buckets, query_chunk, n_workers)
        return
    sim_buf = None
    for idx in buckets:
        # settings are scoped to each bucket, never held across a yield
        with torch.no_grad(), exact_fp32(dev):
            bucket = _pack_bucket(docs_l, idx, dev)
            scores, sim_buf = _score_bucket(qt, bucket, query_chunk, sim_buf)
        yield idx, scores


def _iter_scores_threaded(
    qt: _QueryTokens, docs: list[torch.Tensor], buckets: list[list[int]], query_chunk: int, n_workers: int
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """CPU: score whole buckets in parallel threads, each running single-threaded kernels.

    Coarse-grained parallelism has no per-GEMM barrier, so it keeps near-full speed on a quiet machine
    and degrades gracefully on a busy one (a descheduled worker simply takes fewer buckets, where a
    2-thread GEMM would stall both threads). Results are yielded in bucket order; at most 2 * n_workers
    buckets are in flight. torch's intra-op thread count is 1 while this runs and restored afterwards.
    """
    local = threading.local()
    cpu = torch.device("cpu")

    def work(idx: list[int]) -> tuple[list[int], torch.Tensor]:
        if not hasattr(local, "buf"):
            torch.set_num_threads(1)  # single-threaded MKL / OpenMP inside this worker
            local.buf = None
        with torch.no_grad():
            bucket = _pack_bucket(docs, idx, cpu)
            scores, local.buf = _score_bucket(qt, bucket, query_chunk, local.buf)
        return idx, scores

    old_threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(n_workers, thread_name_prefix="colintern-maxsim") as pool:
            todo = iter(buckets)
            pending: deque[Future] = deque()
            for idx in todo:
                pending.append(pool.submit(work, idx))
                if len(pending) >= 2 * n_workers:
                    break
            while pending:
                result = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(work, nxt))
                yield result
    finally:
        torch.set_num_threads(old_threads)


def maxsim(
    qs: Sequence[torch.Tensor],
    docs: Sequence[torch.Tensor],
    device: str | torch.device | None = None,
    doc_chunk: int | None = None,
    query_chunk: int | None = None,
    workers: int | None = None,
) -> torch.Tensor:
    """Exact sum-MaxSim of every query against every doc -> (len(qs), len(docs)) float32 on CPU.

    qs, docs: lists of (L_i, dim) tensors (real tokens only, any float dtype, any device).
    device: where to compute; None -> CUDA if available else CPU.
    doc_chunk: max padded doc tokens scored per bucket; query_chunk: max query tokens per GEMM tile.
    workers: CPU only, buckets scored in parallel (None -> torch.get_num_threads(); 1 -> serial,
    multi-threaded kernels). Peak extra memory ~ 4 bytes * query_chunk * doc_chunk per worker
    (+ the concatenated query tokens).
    """
    qs_l = _as_token_list(qs, "qs")
    docs_l = _as_token_list(docs, "docs")
    dev = _resolve_device(device)
    if qs_l and docs_l and all(t.shape[0] == 1 for t in qs_l) and all(t.shape[0] == 1 for t in docs_l):
        return dense_scores(qs_l, docs_l, dev)  # single-vector models: MaxSim of one token is the dot product
    out = torch.zeros(len(qs_l), len(docs_l), dtype=torch.float32, device=dev)  # (n_q, n_d)
    for idx, scores in _iter_scores(qs_l, docs_l, dev, doc_chunk, query_chunk, workers):
        out[:, torch.as_tensor(idx, device=dev)] = scores
    return out.cpu()


def dense_scores(qs: Sequence[torch.Tensor], docs: Sequence[torch.Tensor],
                 device: str | torch.device | None = None, doc_chunk: int = 65536) -> torch.Tensor:
    """Dot products of single vectors ((1, dim) or (dim,) each) -> (len(qs), len(docs)) float32 on CPU: one fp32
    GEMM per chunk of docs (TF32 off on CUDA), the fast path of `maxsim` for single-vector models."""
    dev = _resolve_device(device)
    q = torch.stack([t.reshape(-1) for t in qs]).to(dev, torch.float32)  # (n_q, dim)
    out = torch.empty(len(qs), len(docs), dtype=torch.float32, device=dev)
    with torch.no_grad(), exact_fp32(dev):
        for start in range(0, len(docs), doc_chunk):
            d = torch.stack([t.reshape(-1) for t in docs[start:start + doc_chunk]]).to(dev, torch.float32)
            out[:, start:start + d.shape[0]] = q @ d.T  # (n_q, chunk)
    return out.cpu()


def topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-k of a (n_q, n_d) score matrix -> (values, indices), each (n_q, min(k, n_d)).

    Sorted by descending score; ties go to the lower doc index (deterministic), and k > n_d
    returns all n_d columns.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (n_q, n_d), got {tuple(scores.shape)}")
    if k < 0:
        raise ValueError("k must be >= 0")
    k = min(int(k), scores.shape[1])
    # a stable descending sort keeps ascending column order among equal scores
    vals, idx = torch.sort(scores, dim=1, descending=True, stable=True)
    return vals[:, :k].contiguous(), idx[:, :k].contiguous()


def _merge_topk(
    vals: torch.Tensor, idx: torch.Tensor, new_vals: torch.Tensor, new_idx: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a running top-k with new candidates; ties resolved to the lower doc index."""
    cand_v = torch.cat([vals, new_vals], dim=1)  # (n_q, k + m)
    cand_i = torch.cat([idx, new_idx], dim=1)
    order = torch.argsort(cand_i, dim=1)  # indices are unique: ascending index order first
    cand_v = cand_v.gather(1, order)
    cand_i = cand_i.gather(1, order)
    v, pos = topk(cand_v, k)
    return v, cand_i.gather(1, pos)


def maxsim_topk(
    qs: Sequence[torch.Tensor],
    docs: "Sequence[torch.Tensor] | PackedDocs",
    k: int,
    device: str | torch.device | None = None,
    doc_chunk: int | None = None,
    query_chunk: int | None = None,
    workers: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k docs per query by exact sum-MaxSim without building the full score matrix.

    Returns (values float32, indices int64), each (len(qs), min(k, len(docs))) on CPU, equal to
    ``topk(maxsim(qs, docs), k)`` (same ordering and tie rule). Memory is O(n_q * (k + chunk)).
    Arguments as in maxsim; docs may also be PackedDocs (scored where they were packed).
    """
    qs_l = _as_token_list(qs, "qs")
    docs_l = docs if isinstance(docs, PackedDocs) else _as_token_list(docs, "docs")
    dev = docs.device if isinstance(docs, PackedDocs) else _resolve_device(device)
    k = max(0, min(int(k), len(docs_l)))
    vals = torch.empty(len(qs_l), 0, dtype=torch.float32, device=dev)
    idx = torch.empty(len(qs_l), 0, dtype=torch.long, device=dev)
    pend_v: list[torch.Tensor] = []
    pend_i: list[torch.Tensor] = []
    n_pend = 0

    def flush() -> None:
        nonlocal vals, idx, pend_v, pend_i, n_pend
        if pend_v:
            vals, idx = _merge_topk(vals, idx, torch.cat(pend_v, 1), torch.cat(pend_i, 1), k)
            pend_v, pend_i, n_pend = [], [], 0

    if k > 0:
        for bidx, scores in _iter_scores(qs_l, docs_l, dev, doc_chunk, query_chunk, workers):
            pend_v.append(scores)
            pend_i.append(torch.as_tensor(bidx, device=dev).expand(len(qs_l), len(bidx)))
            n_pend += len(bidx)
            if n_pend >= max(_TOPK_MERGE_COLS, 4 * k):
                flush()
        flush()
    return vals.cpu(), idx.cpu()


def pad_embeddings(
    items: Sequence[torch.Tensor], padding_value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of (L_i, dim) tensors -> (padded (N, Lmax, dim), mask (N, Lmax) bool, True = real).

    Keeps the dtype and device of the first item. Used to feed ragged embeddings to batched code
    (the loss) that takes explicit masks.
    """
    if len(items) == 0:
        raise ValueError("pad_embeddings needs at least one item")
    first = torch.as_tensor(items[0])
    lmax = max(int(t.shape[0]) for t in items)
    dim = first.shape[-1]
    padded = torch.full((len(items), lmax, dim), padding_value, dtype=first.dtype, device=first.device)
    mask = torch.zeros(len(items), lmax, dtype=torch.bool, device=first.device)  # (N, Lmax)
    for i, t in enumerate(items):
        t = torch.as_tensor(t)
        if t.ndim != 2 or t.shape[1] != dim:
            raise ValueError(f"item {i}: expected shape (L, {dim}), got {tuple(t.shape)}")
        padded[i, : t.shape[0]] = t.to(device=first.device, dtype=first.dtype)
        mask[i, : t.shape[0]] = True
    return padded, mask


def unpad_embeddings(padded: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of pad_embeddings: (N, L, dim) + (N, L) mask -> list of (L_i, dim) real-token tensors."""
    if padded.ndim != 3 or mask.shape != padded.shape[:2]:
        raise ValueError(f"expected (N, L, dim) and (N, L), got {tuple(padded.shape)} and {tuple(mask.shape)}")
    mask = mask.bool()
    return [padded[i][mask[i]] for i in range(padded.shape[0])]
