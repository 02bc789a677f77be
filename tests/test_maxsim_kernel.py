"""The fused MaxSim kernel (colintern.retriever.maxsim_kernel) in Triton's interpreter (TRITON_INTERPRET=1, set by conftest on
this CPU suite) against a float64 reference: ragged pages without padding, empty and one-token bags, pages longer
than a tile, queries of several lengths (one block of several queries, and a query longer than a block), float16
and float32 inputs with float32 accumulation. bfloat16 is left to the GPU: the interpreter's tl.dot computes
garbage for bfloat16 operands (its loads are right), so that check runs in bench/gpu_suite.py."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
from colintern.retriever import scoring  # noqa: E402
from colintern.retriever.maxsim_kernel import BLOCK_N, maxsim_fused  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
QUERY_LENGTHS = (1, 3, 25, 0, 70, 16)
PAGE_LENGTHS = (1, 0, BLOCK_N, BLOCK_N + 1, 3 * BLOCK_N + 7, 7)


def reference(qs, docs) -> torch.Tensor:
    """float64 MaxSim of the same (already rounded) vectors; 0 for an empty query, -inf for an empty page."""
    out = torch.empty(len(qs), len(docs), dtype=torch.float64)
    for i, q in enumerate(qs):
        for j, d in enumerate(docs):
            if len(q) == 0:
                out[i, j] = 0.0
            elif len(d) == 0:
                out[i, j] = float("-inf")
            else:
                out[i, j] = (q.double() @ d.double().T).max(1).values.sum()
    return out


def ragged(lengths, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g).to(dtype) for n in lengths]


def test_interpreter_is_on():
    assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [16, 32, 40])  # 40: a dim that is not a power of two (masked columns)
def test_fused_maxsim_equals_a_float64_reference_on_ragged_bags(dtype, dim):
    qs, docs = ragged(QUERY_LENGTHS, dim, dtype, 0), ragged(PAGE_LENGTHS, dim, dtype, 1)
    got = maxsim_fused(qs, docs)
    want = reference(qs, docs)
    assert got.shape == (len(qs), len(docs)) and got.dtype == torch.float32
    finite = torch.isfinite(want)
    assert torch.equal(~finite, got == float("-inf"))  # exactly the empty pages (with a non-empty query)
    scale = reference([q.abs() for q in qs], [d.abs() for d in docs])  # the size of the summed terms
    error = ((got.double() - want)[finite].abs() / scale[finite].clamp(min=1.0)).max().item()
    assert error < 2e-6  # float32 rounding of the sums (and, for float32 inputs, of the products)


def test_queries_are_rounded_to_the_pages_dtype_and_a_long_query_spans_a_block():
    qs = ragged((300, 2), 16, torch.float32, 2)  # 300 tokens: one query per block, padded to 512 rows
    docs = ragged((5, 130), 16, torch.float16, 3)
    got = maxsim_fused(qs, docs)  # the pages' float16: the queries are rounded to it
    rounded = [q.half() for q in qs]
    want = reference(rounded, docs)
    scale = reference([q.abs() for q in rounded], [d.abs() for d in docs])
    assert ((got.double() - want).abs() / scale).max().item() < 2e-6


def test_scoring_takes_the_fused_path_on_cuda_in_the_callers_dtype(monkeypatch):
    """On a CUDA device colintern.retriever.scoring's iterator (behind maxsim and maxsim_topk) yields the kernel's scores;
    today's float32 inputs are multiplied in IEEE float32, 16-bit ones only when both sides are 16-bit."""
    qs, docs = ragged((3, 5), 16, torch.float32, 4), ragged((4, 9, 2), 16, torch.float32, 5)
    routed = []
    monkeypatch.setattr(scoring, "_iter_fused", lambda q, d, dev, fallback: routed.append(dev.type) or iter(()))
    assert list(scoring._iter_scores(qs, docs, "cuda", None, None)) == [] and routed == ["cuda"]
    assert list(scoring._iter_scores(qs, docs, "cpu", None, None)) and routed == ["cuda"]  # CPU: the GEMM path
    monkeypatch.undo()
    chosen = []
    real = maxsim_fused

    def recording(q, d, dtype=None, device=None):
        chosen.append(dtype)
        return real(q, d, dtype=dtype, device=device)

    monkeypatch.setattr("colintern.retriever.maxsim_kernel.maxsim_fused", recording)
    cpu = torch.device("cpu")
    (ids, fused), = scoring._iter_fused(qs, docs, cpu)
    assert ids == [0, 1, 2] and chosen == [torch.float32]
    assert torch.allclose(fused, scoring.maxsim(qs, docs, device="cpu"), rtol=1e-6, atol=1e-5)
    list(scoring._iter_fused([q.half() for q in qs], [d.half() for d in docs], cpu))
    list(scoring._iter_fused([q.half() for q in qs], docs, cpu))  # mixed: float32
    assert chosen[1:] == [torch.float16, torch.float32]
