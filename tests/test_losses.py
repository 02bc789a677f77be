"""Tests for colintern.train.losses: golden values (tests/fixtures/loss_golden.json, docs/CONTRACT.md §5), a naive
reference, gradients, edge cases."""
from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from colintern.train import losses
from colintern.train.losses import late_interaction_loss, late_interaction_scores
from helpers import FIXTURES

GOLDEN = json.loads((FIXTURES / "loss_golden.json").read_text())["cases"]


pytestmark = pytest.mark.usefixtures("one_thread")

# The golden file is the project contract's, copied verbatim; its hash pins it against accidental edits.
GOLDEN_SHA256 = "d7a0d80a3ccd383d38c7864fb41e97bdf6bc55926fa1b3f44ef2b4af027c91bd"


def test_golden_fixture_is_the_contract_copy():
    assert hashlib.sha256((FIXTURES / "loss_golden.json").read_bytes()).hexdigest() == GOLDEN_SHA256


def _inputs(case: dict, dtype: torch.dtype) -> dict:
    out = {}
    for key, val in case["inputs"].items():
        t = torch.tensor(val)
        out[key] = t.bool() if key.endswith("mask") or key == "exclude" else t.to(dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", GOLDEN, ids=[c["name"] for c in GOLDEN])
def test_golden(case: dict, dtype: torch.dtype) -> None:
    got = late_interaction_loss(**_inputs(case, dtype), **case["options"])
    assert got.ndim == 0
    assert got.item() == pytest.approx(case["expected"], abs=1e-5)


def test_golden_float_masks() -> None:
    """Masks given as 0/1 numbers (as in the fixture) work like bool masks."""
    case = GOLDEN[2]
    inp = {k: torch.tensor(v, dtype=torch.float64) for k, v in case["inputs"].items()}
    got = late_interaction_loss(**inp, **case["options"])
    assert got.item() == pytest.approx(case["expected"], abs=1e-5)


# ---------------------------------------------------------------- naive float64 reference
def _ref_score(q, qm, d, dm) -> float:
    qr = [q[i] for i in range(len(q)) if qm[i]]
    dr = [d[j] for j in range(len(d)) if dm[j]]
    if not dr:
        return -math.inf
    tot = sum(max(float(qi @ dj) for dj in dr) for qi in qr)
    return tot / max(1, len(qr))


def _ref_loss(q, qm, d, dm, neg=None, nm=None, *, kind="ce", temperature=0.02, offset=0,
              fn_filter=None, exclude=None) -> float:
    q, d = q.double(), d.double()
    per_q = []
    for b in range(q.shape[0]):
        pos = b + offset
        sp = _ref_score(q[b], qm[b], d[pos], dm[pos])
        cands = [
            _ref_score(q[b], qm[b], d[c], dm[c])
            for c in range(d.shape[0])
            if c != pos and not (exclude is not None and exclude[b][c])
        ]
        if neg is not None:
            cands += [_ref_score(q[b], qm[b], neg[b, k].double(), nm[b, k]) for k in range(neg.shape[1])]
        cands = [s for s in cands if s != -math.inf]
        if fn_filter is not None:
            cands = [s for s in cands if not s > fn_filter * sp]
        if kind == "ce":
            xs = [s / temperature for s in cands + [sp]]
            m = max(xs)
            per_q.append(m + math.log(sum(math.exp(x - m) for x in xs)) - sp / temperature)
        else:
            per_q.append(0.0 if not cands else math.log1p(math.exp((max(cands) - sp) / temperature)))
    return sum(per_q) / len(per_q)


def _rand_batch(b: int, c: int, k: int, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lq, ld, ln = 6, 9, 7
    q = torch.nn.functional.normalize(torch.randn(b, lq, dim, generator=g), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(c, ld, dim, generator=g), dim=-1)
    neg = torch.nn.functional.normalize(torch.randn(b, k, ln, dim, generator=g), dim=-1)
    qm = torch.arange(lq)[None] < torch.randint(1, lq + 1, (b, 1), generator=g)
    dm = torch.arange(ld)[None] < torch.randint(1, ld + 1, (c, 1), generator=g)
    nm = torch.arange(ln)[None, None] < torch.randint(1, ln + 1, (b, k, 1), generator=g)
    return q, qm, d, dm, neg, nm


@pytest.mark.parametrize("kind", ["ce", "pairwise"])
@pytest.mark.parametrize("temperature", [0.02, 0.5])
def test_matches_naive_reference(kind: str, temperature: float) -> None:
    b, c, k, offset = 3, 7, 2, 2  # C > B: docs gathered from several ranks
    q, qm, d, dm, neg, nm = _rand_batch(b, c, k)
    g = torch.Generator().manual_seed(5)
    exclude = torch.rand(b, c, generator=g) < 0.3
    exclude[torch.arange(b), torch.arange(b) + offset] = True  # the positive must never be excluded
    for fnf in (None, 0.9):
        kw = dict(kind=kind, temperature=temperature, offset=offset, fn_filter=fnf, exclude=exclude)
        got = late_interaction_loss(q, qm, d, dm, neg, nm, **kw)
        want = _ref_loss(q, qm, d, dm, neg, nm, **kw)
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-5)
        got64 = late_interaction_loss(q.double(), qm, d.double(), dm, neg.double(), nm, **kw)
        assert got64.item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_scores_match_reference_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    q, qm, d, dm, _, _ = _rand_batch(4, 5, 1)
    want = torch.tensor([[_ref_score(q[i].double(), qm[i], d[j].double(), dm[j]) for j in range(5)] for i in range(4)], dtype=torch.float64)
    got = late_interaction_scores(q, qm, d, dm)
    assert got.shape == (4, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(losses, "_SIM_CHUNK_ELEMENTS", 1)  # one doc per no-grad chunk
    torch.testing.assert_close(late_interaction_scores(q, qm, d, dm), got)


def test_pads_never_win_negative_similarities() -> None:
    """Every real similarity is negative: a zero pad must not turn the max into 0."""
    q = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # (1, 2, 2); 2nd token is a pad
    qm = torch.tensor([[True, False]])
    d = torch.tensor([[[-1.0, 0.0], [-0.6, 0.8], [0.0, 0.0]]])  # 3rd token is a pad
    dm = torch.tensor([[True, True, False]])
    s = late_interaction_scores(q, qm, d, dm)
    assert s.item() == pytest.approx(-0.6, abs=1e-6)


def test_gradients_flow_and_inputs_untouched() -> None:
    q, qm, d, dm, neg, nm = _rand_batch(3, 3, 2, seed=1)
    q.requires_grad_(True)
    d.requires_grad_(True)
    neg.requires_grad_(True)
    snap = [t.detach().clone() for t in (q, qm, d, dm, neg, nm)]
    exclude = torch.zeros(3, 3, dtype=torch.bool)
    ex_snap = exclude.clone()
    for kind in ("ce", "pairwise"):
        for t in (q, d, neg):
            t.grad = None
        loss = late_interaction_loss(q, qm, d, dm, neg, nm, kind=kind, temperature=0.1,
                                     fn_filter=0.99, exclude=exclude)
        loss.backward()
        for t in (q, d):
            assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
        assert torch.isfinite(neg.grad).all()
        # pads get no gradient
        assert (q.grad[~qm] == 0).all() and (d.grad[~dm] == 0).all()
    for before, after in zip(snap, (q, qm, d, dm, neg, nm)):
        assert torch.equal(before, after.detach())
    assert torch.equal(exclude, ex_snap)


def test_gradient_matches_finite_differences() -> None:
    q, qm, d, dm, neg, nm = _rand_batch(2, 3, 1, dim=4, seed=2)
    args = [t.double().requires_grad_(True) for t in (q, d, neg)]

    def f(qq, dd, nn):
        return late_interaction_loss(qq, qm, dd, dm, nn, nm, kind="ce", temperature=0.3, offset=1)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", ["ce", "pairwise"])
def test_all_candidates_removed_gives_zero(kind: str) -> None:
    q, qm, d, dm, _, _ = _rand_batch(2, 2, 1, seed=3)
    q.requires_grad_(True)
    d.requires_grad_(True)
    exclude = torch.ones(2, 2, dtype=torch.bool)  # removes everything but the (protected) positive
    loss = late_interaction_loss(q, qm, d, dm, kind=kind, exclude=exclude)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(d.grad).all()


def test_positive_never_excluded() -> None:
    case = GOLDEN[0]
    inp = _inputs(case, torch.float64)
    b, c = inp["q"].shape[0], inp["d"].shape[0]
    plain = late_interaction_loss(**inp, **case["options"])
    diag = torch.eye(b, c, dtype=torch.bool)
    assert late_interaction_loss(**inp, exclude=diag, **case["options"]).item() == pytest.approx(plain.item())


def test_empty_negative_is_not_a_candidate() -> None:
    q, qm, d, dm, neg, nm = _rand_batch(2, 2, 2, seed=4)
    nm2 = nm.clone()
    nm2[:, 1] = False  # second negative of every query is padding
    with_pad = late_interaction_loss(q, qm, d, dm, neg, nm2, kind="ce")
    only_first = late_interaction_loss(q, qm, d, dm, neg[:, :1], nm[:, :1], kind="ce")
    assert with_pad.item() == pytest.approx(only_first.item(), rel=1e-6)


def test_bf16_inputs_are_upcast() -> None:
    q, qm, d, dm, _, _ = _rand_batch(2, 2, 1)
    out = late_interaction_loss(q.bfloat16(), qm, d.bfloat16(), dm)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_bad_arguments() -> None:
    q, qm, d, dm, _, _ = _rand_batch(2, 3, 1)
    with pytest.raises(ValueError):
        late_interaction_loss(q, qm, d, dm, kind="hinge")
    with pytest.raises(ValueError):
        late_interaction_loss(q, qm, d, dm, offset=2)  # positives 2, 3 but C = 3
    with pytest.raises(ValueError):
        late_interaction_loss(q, qm, d, dm, temperature=0.0)
    with pytest.raises(ValueError):
        late_interaction_loss(q, qm, d, dm, exclude=torch.zeros(2, 2, dtype=torch.bool))
