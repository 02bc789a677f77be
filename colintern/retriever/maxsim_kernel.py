"""A fused exact MaxSim kernel in Triton: s(q, d) = sum over q's tokens of the max over d's tokens of <q_i, d_j>.

Why: the GEMM-then-max path (colintern.retriever.scoring) writes every (query tokens x page tokens) similarity tile to memory
and reads it back for the max, in float32 on CUDA cores. Here each program loads a block of queries once, walks one
page's tokens tile by tile, takes the running max in registers and writes one score per query: the tile never
leaves the chip, and float16/bfloat16 inputs run on tensor cores.

Exactness: pages and queries are multiplied in their own dtype and accumulated in float32. The product of two
float16 (or bfloat16) numbers is exact in float32, so for the float16 vectors the page store and the search index
hold this is the same arithmetic as widening them to float32 first, up to the order of the float32 sums. Queries
are rounded to the pages' dtype when they differ (`maxsim_fused(..., dtype=)` says which); float32 inputs use IEEE
float32 products (never TF32).

Layout: queries padded to a power-of-two length LQ (padding rows are masked, never scored), pages ragged and
concatenated with offsets (no padding at all). Program (page j, query block b) scores queries b*QB .. b*QB+QB-1
against page j. An empty query scores 0; an empty page scores -inf (no token can match).

Correctness is tested on the CPU with Triton's interpreter (TRITON_INTERPRET=1, tests/test_maxsim_kernel.py)
against a float64 reference; speed is measured by bench/gpu_suite.py on a GPU.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

try:  # Triton ships with CUDA builds of torch; without it colintern.retriever.scoring's path is used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

ROWS = 64          # query-token rows per program (QB queries x LQ tokens), at least 16 for tl.dot
BLOCK_N = 64       # page tokens per tile
MAX_QUERY_BLOCKS = 65_535  # CUDA's limit on the grid's second axis


def available() -> bool:
    """Whether the fused kernel can run here: Triton imports, and COLINTERN_FUSED_MAXSIM is not 0."""
    return triton is not None and os.environ.get("COLINTERN_FUSED_MAXSIM", "1") != "0"


if triton is not None:
    @triton.jit
    def _maxsim_kernel(q_ptr, q_len_ptr, p_ptr, p_off_ptr, out_ptr, n_q, dim,
                       stride_qb, stride_qt, stride_pt, stride_ob,
                       LQ: tl.constexpr, QB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr):
        page = tl.program_id(0)
        block = tl.program_id(1)
        rows = tl.arange(0, QB * LQ)                         # (M,) query-token rows of this program
        query = block * QB + rows // LQ                      # (M,) the query of each row
        token = rows % LQ                                    # (M,) its token within the query
        length = tl.load(q_len_ptr + query, mask=query < n_q, other=0)
        real = (query < n_q) & (token < length)              # (M,) rows that hold a real query token
        d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + query[:, None] * stride_qb + token[:, None] * stride_qt + d[None, :],
                    mask=real[:, None] & (d[None, :] < dim), other=0.0)   # (M, BLOCK_D)
        start = tl.load(p_off_ptr + page)
        end = tl.load(p_off_ptr + page + 1)
        best = tl.full((QB * LQ,), float("-inf"), tl.float32)  # (M,) running max over the page's tokens
        for first in range(start, end, BLOCK_N):
            cols = first + tl.arange(0, BLOCK_N)             # (N,) page tokens of this tile
            inside = cols < end
            p = tl.load(p_ptr + cols[:, None] * stride_pt + d[None, :],
                        mask=inside[:, None] & (d[None, :] < dim), other=0.0)  # (N, BLOCK_D)
            sim = tl.dot(q, tl.trans(p), input_precision=PRECISION)          # (M, N) float32
            sim = tl.where(inside[None, :], sim, float("-inf"))               # tokens past the page never win
            best = tl.maximum(best, tl.max(sim, axis=1))
        best = tl.where(real, best, 0.0)                     # padding rows add nothing
        scores = tl.sum(tl.reshape(best, (QB, LQ)), axis=1)  # (QB,)
        queries = block * QB + tl.arange(0, QB)
        tl.store(out_ptr + queries * stride_ob + page, scores, mask=queries < n_q)


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def maxsim_fused(qs: Sequence[torch.Tensor], docs: Sequence[torch.Tensor], dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> torch.Tensor:
    """(len(qs), len(docs)) float32 exact MaxSim on `device` (default: the docs' device) through the fused kernel.

    qs, docs: (L_i, dim) tensors of real tokens (L_i may be 0). dtype: what both are multiplied in (default: the
    docs' dtype; float16, bfloat16 or float32); a query in another dtype is rounded to it."""
    if triton is None:
        raise RuntimeError("the fused MaxSim kernel needs Triton (it ships with CUDA builds of torch)")
    device = torch.device(device) if device is not None else (docs[0].device if docs else torch.device("cpu"))
    dtype = dtype or (docs[0].dtype if docs else torch.float32)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"maxsim_fused multiplies float16, bfloat16 or float32, not {dtype}")
    n_q, n_d = len(qs), len(docs)
    out = torch.empty(n_q, n_d, dtype=torch.float32, device=device)  # (n_q, n_d)
    if n_q == 0 or n_d == 0:
        return out
    dim = int(docs[0].shape[1])
    lengths = torch.tensor([len(d) for d in docs], dtype=torch.int64)
    offsets = torch.zeros(n_d + 1, dtype=torch.int32)
    offsets[1:] = lengths.cumsum(0).to(torch.int32)
    pages = torch.cat([d.to(device=device, dtype=dtype) for d in docs]) if int(offsets[-1]) else \
        torch.zeros(1, dim, dtype=dtype, device=device)      # (T, dim), ragged pages back to back
    q_lengths = [len(q) for q in qs]
    lq = _pow2(max(q_lengths), 1)
    qb = max(1, ROWS // lq)  # QB * LQ rows: a power of two, at least 16 (what tl.dot needs)
    padded = torch.zeros(n_q, lq, dim, dtype=dtype, device=device)  # (n_q, LQ, dim)
    for i, q in enumerate(qs):
        padded[i, :len(q)] = q.to(device=device, dtype=dtype)
    q_len = torch.tensor(q_lengths, dtype=torch.int32, device=device)
    offsets = offsets.to(device)
    block_d = _pow2(dim, 16)
    precision = "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs: their products are exact
    for first in range(0, n_q, MAX_QUERY_BLOCKS * qb):  # the second grid axis is capped on CUDA
        count = min(n_q - first, MAX_QUERY_BLOCKS * qb)
        grid = (n_d, triton.cdiv(count, qb))
        _maxsim_kernel[grid](padded[first:], q_len[first:], pages, offsets, out[first:], count, dim,
                             padded.stride(0), padded.stride(1), pages.stride(0), out.stride(0),
                             LQ=lq, QB=qb, BLOCK_N=BLOCK_N, BLOCK_D=block_d, PRECISION=precision)
    return out
