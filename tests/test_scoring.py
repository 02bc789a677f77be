"""Tests for colintern.retriever.scoring: exact sum-MaxSim against a float64 reference, chunking, top-k, padding."""
from __future__ import annotations

import pytest
import torch

from colintern.retriever import scoring
from colintern.retriever.scoring import maxsim, maxsim_topk, pad_embeddings, topk, unpad_embeddings


pytestmark = pytest.mark.usefixtures("one_thread")


def _ragged(n: int, lo: int, hi: int, dim: int, g: torch.Generator) -> list[torch.Tensor]:
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.nn.functional.normalize(torch.randn(n_tok, dim, generator=g), dim=-1) for n_tok in lens]


def _reference(qs: list[torch.Tensor], docs: list[torch.Tensor]) -> torch.Tensor:
    """float64, one pair at a time, real tokens only."""
    out = torch.empty(len(qs), len(docs), dtype=torch.float64)
    for i, q in enumerate(qs):
        for j, d in enumerate(docs):
            out[i, j] = (q.double() @ d.double().T).max(dim=1).values.sum()
    return out


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def data() -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    qs = _ragged(9, 1, 12, 16, g)
    docs = _ragged(23, 1, 40, 16, g)
    return qs, docs, _reference(qs, docs)


@pytest.mark.parametrize(
    "doc_chunk,query_chunk",
    [(None, None), (1, 1), (7, 3), (40, 5), (45, 1000), (100, 13), (10_000, 10_000)],
)
@pytest.mark.parametrize("workers", [1, 3])
def test_maxsim_matches_float64_reference(data, doc_chunk, query_chunk, workers) -> None:
    qs, docs, want = data
    got = maxsim(qs, docs, device="cpu", doc_chunk=doc_chunk, query_chunk=query_chunk, workers=workers)
    _assert_close(got, want)


def test_worker_threads_restore_thread_count(data) -> None:
    qs, docs, _ = data
    before = torch.get_num_threads()
    maxsim(qs, docs, device="cpu", doc_chunk=40, workers=2)
    maxsim_topk(qs, docs, 3, device="cpu", doc_chunk=40, workers=2)
    assert torch.get_num_threads() == before


def test_default_device_and_dtypes(data) -> None:
    qs, docs, want = data
    _assert_close(maxsim(qs, docs), want)  # device=None: CUDA if present, else CPU
    _assert_close(maxsim([q.double() for q in qs], [d.double() for d in docs], device="cpu"), want)
    _assert_close(maxsim([q.numpy() for q in qs], [d.numpy() for d in docs], device="cpu"), want)
    half_q = [q.half() for q in qs]
    half_d = [d.bfloat16() for d in docs]
    ref = _reference([q.float() for q in half_q], [d.float() for d in half_d])
    _assert_close(maxsim(half_q, half_d, device="cpu"), ref)


def test_all_negative_similarities_stay_negative() -> None:
    """A zero pad would win every max here (the ColPali artefact); exact scoring must stay negative."""
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.rand(4, 8, generator=g) + 0.1, dim=-1)  # positive orthant
    short_neg = -torch.nn.functional.normalize(torch.rand(2, 8, generator=g) + 0.1, dim=-1)  # all sims < 0
    long_doc = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1)
    long_neg = -torch.nn.functional.normalize(torch.rand(25, 8, generator=g) + 0.1, dim=-1)
    docs = [short_neg, long_doc, long_neg]
    want = _reference([q], docs)
    assert (want[0, [0, 2]] < 0).all()
    for doc_chunk in (None, 64, 3):  # shared bucket (short doc padded) and separate buckets
        got = maxsim([q], docs, device="cpu", doc_chunk=doc_chunk)
        _assert_close(got, want)
        assert (got[0, [0, 2]] < 0).all()


def test_single_token_items() -> None:
    q = [torch.tensor([[0.6, -0.8]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    d = [torch.tensor([[-1.0, 0.0]]), torch.tensor([[0.0, -1.0], [0.6, 0.8]])]
    got = maxsim(q, d, device="cpu")
    want = torch.tensor([[-0.6, 0.8], [-1.0 + 0.0, 0.6 + 0.8]], dtype=torch.float64)
    _assert_close(got, want)


def test_empty_lists() -> None:
    d = [torch.randn(3, 4)]
    assert maxsim([], d).shape == (0, 1)
    assert maxsim(d, []).shape == (1, 0)
    v, i = maxsim_topk(d, [], k=5)
    assert v.shape == (1, 0) and i.shape == (1, 0)


def test_input_errors() -> None:
    with pytest.raises(TypeError):
        maxsim(torch.randn(2, 3, 4), [torch.randn(3, 4)])
    with pytest.raises(ValueError):
        maxsim([torch.randn(0, 4)], [torch.randn(3, 4)])
    with pytest.raises(ValueError):
        maxsim([torch.randn(2, 4)], [torch.randn(3, 5)])
    with pytest.raises(ValueError):
        maxsim([torch.randn(2, 4)], [torch.randn(3, 4, 1)])


def test_topk_handles_large_k_and_ties() -> None:
    s = torch.tensor([[0.1, 0.5, 0.5, -1.0], [2.0, 0.0, 2.0, 2.0]])
    v, i = topk(s, 3)
    assert i.tolist() == [[1, 2, 0], [0, 2, 3]]  # ties: lower doc index first
    torch.testing.assert_close(v, torch.tensor([[0.5, 0.5, 0.1], [2.0, 2.0, 2.0]]))
    v, i = topk(s, 10)
    assert v.shape == (2, 4) and i[0].tolist() == [1, 2, 0, 3]
    v, i = topk(s, 0)
    assert v.shape == (2, 0)


@pytest.mark.parametrize("k", [1, 5, 23, 100])
@pytest.mark.parametrize("merge_cols", [1, 1024])
def test_maxsim_topk_equals_full_topk(data, k, merge_cols, monkeypatch: pytest.MonkeyPatch) -> None:
    qs, docs, want = data
    monkeypatch.setattr(scoring, "_TOPK_MERGE_COLS", merge_cols)
    full = maxsim(qs, docs, device="cpu", doc_chunk=30, query_chunk=7)
    fv, fi = topk(full, k)
    v, i = maxsim_topk(qs, docs, k, device="cpu", doc_chunk=30, query_chunk=7, workers=2)
    assert v.shape == (len(qs), min(k, len(docs))) and i.dtype == torch.long
    assert torch.equal(i, fi)
    torch.testing.assert_close(v, fv)
    # against the float64 reference too
    rv, ri = torch.sort(want, dim=1, descending=True, stable=True)
    assert torch.equal(i, ri[:, : min(k, len(docs))])
    torch.testing.assert_close(v.double(), rv[:, : min(k, len(docs))], rtol=1e-5, atol=1e-6)


def test_maxsim_topk_ties_prefer_lower_index(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(2)
    page = torch.randn(5, 8, generator=g)
    other = torch.randn(50, 8, generator=g)  # a longer doc lands in a later bucket
    docs = [other, page.clone(), torch.randn(3, 8, generator=g), page.clone()]
    q = [page[:2] * 3]
    monkeypatch.setattr(scoring, "_TOPK_MERGE_COLS", 1)
    v, i = maxsim_topk(q, docs, k=2, device="cpu", doc_chunk=8)
    assert i.tolist() == [[1, 3]] and v[0, 0] == v[0, 1]


def test_pad_and_unpad_roundtrip() -> None:
    items = [torch.randn(3, 4), torch.randn(1, 4), torch.randn(5, 4)]
    padded, mask = pad_embeddings(items)
    assert padded.shape == (3, 5, 4) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [3, 1, 5]
    assert (padded[1, 1:] == 0).all()
    for a, b in zip(items, unpad_embeddings(padded, mask)):
        assert torch.equal(a, b)
    half, _ = pad_embeddings([t.half() for t in items])
    assert half.dtype == torch.float16
    with pytest.raises(ValueError):
        pad_embeddings([torch.randn(2, 4), torch.randn(2, 3)])
