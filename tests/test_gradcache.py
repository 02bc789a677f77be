"""GradCache gives the big-batch gradients (dropout included); plain gradient accumulation does not."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from PIL import Image

from colintern.train.gradcache import gradcache_backward
from colintern.train.step import pad_cat
from colintern.train.losses import late_interaction_loss

N, MICRO = 8, 2  # big batch, micro-batch (4 micro-batches of queries and 4 of pages)
TEMP = 0.05


pytestmark = pytest.mark.usefixtures("one_thread")


def combine_queries_pages(n_query_closures: int):
    """combine for closures ordered [query micro-batches..., page micro-batches...]."""

    def combine(outs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        q, q_mask = pad_cat(outs[:n_query_closures])  # (N, Lq, D)
        p, p_mask = pad_cat(outs[n_query_closures:])  # (N, Lp, D)
        return late_interaction_loss(q, q_mask, p, p_mask, temperature=TEMP)

    return combine


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def zero(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def assert_grads_close(got: dict, ref: dict, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    assert set(got) == set(ref) and ref
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=atol, rtol=rtol, msg=name)


def max_grad_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# --- a small model with dropout -----------------------------------------------------------------------
class DropoutEmbedder(nn.Module):
    """(n, L, F) features -> (n, L, 8) unit token vectors (masked); dropout in the hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(6, 32)
        self.drop = nn.Dropout(0.3)
        self.l2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.l2(self.drop(torch.tanh(self.l1(x))))  # (n, L, 8)
        return h / h.norm(dim=-1, keepdim=True) * mask.unsqueeze(-1), mask


def small_data():
    gen = torch.Generator().manual_seed(1)
    qx, px = torch.randn(N, 4, 6, generator=gen), torch.randn(N, 7, 6, generator=gen)
    q_mask = torch.ones(N, 4, dtype=torch.bool)
    q_mask[1::3, 3:] = False
    p_mask = torch.ones(N, 7, dtype=torch.bool)
    p_mask[::2, 5:] = False
    return qx, q_mask, px, p_mask


def small_closures(model, data):
    qx, q_mask, px, p_mask = data
    rows = [slice(i, i + MICRO) for i in range(0, N, MICRO)]
    return ([lambda s=s: model(qx[s], q_mask[s]) for s in rows] + [lambda s=s: model(px[s], p_mask[s]) for s in rows])


def test_small_model_with_dropout_matches_one_graph():
    model, data = DropoutEmbedder().train(), small_data()
    closures, combine = small_closures(model, data), combine_queries_pages(N // MICRO)

    torch.manual_seed(123)  # reference: the same micro-batch forwards, all kept in one graph
    ref_loss = combine([fn() for fn in closures])
    ref_loss.backward()
    ref, ref_next = grads(model), torch.rand(3)
    zero(model)

    torch.manual_seed(123)
    loss = gradcache_backward(closures, combine)
    got, got_next = grads(model), torch.rand(3)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    assert_grads_close(got, ref)
    assert torch.equal(got_next, ref_next)  # RNG continues as after one forward of each closure + combine

    zero(model)  # dropout really is active: another seed draws other masks and other gradients
    torch.manual_seed(7)
    gradcache_backward(closures, combine)
    assert max_grad_diff(grads(model), ref) > 1e-3


def test_small_model_eval_matches_true_big_batch_and_accumulation_does_not():
    model, data = DropoutEmbedder().eval(), small_data()
    qx, q_mask, px, p_mask = data
    q, _ = model(qx, q_mask)  # one big batch: N queries against N pages
    p, _ = model(px, p_mask)
    big_loss = late_interaction_loss(q, q_mask, p, p_mask, temperature=TEMP)
    big_loss.backward()
    big = grads(model)
    zero(model)

    loss = gradcache_backward(small_closures(model, data), combine_queries_pages(N // MICRO))
    assert loss.item() == pytest.approx(big_loss.item(), abs=1e-6)
    assert_grads_close(grads(model), big)
    zero(model)

    # Gradient accumulation: each micro-batch's queries only see MICRO pages instead of N.
    accum_loss = 0.0
    for i in range(0, N, MICRO):
        s = slice(i, i + MICRO)
        mq, _ = model(qx[s], q_mask[s])
        mp, _ = model(px[s], p_mask[s])
        part = late_interaction_loss(mq, q_mask[s], mp, p_mask[s], temperature=TEMP) / (N // MICRO)
        part.backward()
        accum_loss += part.item()
    assert accum_loss < big_loss.item() - 0.1  # fewer negatives: an easier, different objective
    assert max_grad_diff(grads(model), big) > 1e-3


def test_unused_closure_and_errors():
    model, data = DropoutEmbedder().eval(), small_data()
    closures = small_closures(model, data)
    # combine that ignores the last page micro-batch: that closure is not recomputed, nothing breaks
    calls = {"n": 0}

    def counted():
        calls["n"] += 1
        return closures[-1]()

    def combine(outs):
        q, qm = pad_cat(outs[:4])
        p, pm = pad_cat(outs[4:7])  # 6 pages
        return late_interaction_loss(q[:6], qm[:6], p, pm, temperature=TEMP)

    gradcache_backward(closures[:-1] + [counted], combine)
    assert calls["n"] == 1
    with pytest.raises(ValueError, match="scalar"):
        gradcache_backward(closures[:1], lambda outs: outs[0][0].sum(-1))
    with pytest.raises(ValueError, match="at least one"):
        gradcache_backward([], combine)


def test_cat_padded_pads_right():
    a = (torch.ones(1, 2, 3, requires_grad=True), torch.ones(1, 2, dtype=torch.bool))
    b = (torch.full((2, 4, 3), 2.0), torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool))
    emb, mask = pad_cat([a, b])
    assert emb.shape == (3, 4, 3) and mask.dtype == torch.bool
    assert torch.equal(mask, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool))
    assert torch.equal(emb[0, 2:], torch.zeros(2, 3)) and torch.equal(emb[1:], b[0])
    emb.sum().backward()
    assert torch.equal(a[0].grad, torch.ones(1, 2, 3))


# --- the tiny ColIntern with LoRA ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    from colintern import ColIntern

    m = ColIntern.from_pretrained(tiny_model_dir, max_tiles=2)
    m.add_lora(4, 8, 0.1)
    gen = torch.Generator().manual_seed(0)
    for name, p in m.named_parameters():
        p.requires_grad = "lora_" in name or name.startswith("head.")
        if "lora_B" in name:  # peft starts B at zero, which would make every lora_A gradient zero
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    pages = [Image.new("RGB", (112 + 56 * (i % 3), 112 + 28 * (i % 2)), (30 * i, 200 - 20 * i, 40 + 25 * i))
             for i in range(N)]
    queries = [f"which page shows the {c} circle" + " on a blue background" * (i % 2)
               for i, c in enumerate(["red", "green", "blue", "black", "white", "pink", "gray", "teal"])]
    return m, queries, pages


def colintern_closures(m, queries, pages):
    rows = [slice(i, i + MICRO) for i in range(0, N, MICRO)]
    return ([lambda s=s: m(m.processor.process_queries(queries[s])) for s in rows]
            + [lambda s=s: m(m.processor.process_images(pages[s])) for s in rows])


def test_colintern_lora_dropout_matches_one_graph(lora_model):
    m, queries, pages = lora_model
    m.train()  # LoRA dropout active
    closures, combine = colintern_closures(m, queries, pages), combine_queries_pages(N // MICRO)
    zero(m)
    torch.manual_seed(5)
    ref_loss = combine([fn() for fn in closures])
    ref_loss.backward()
    ref = grads(m)
    assert any("lora_A" in k for k in ref) and any("lora_B" in k for k in ref) and "head.weight" in ref
    zero(m)
    torch.manual_seed(5)
    loss = gradcache_backward(closures, combine)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    assert_grads_close(grads(m), ref)


def test_colintern_eval_matches_true_big_batch_and_accumulation_does_not(lora_model):
    m, queries, pages = lora_model
    m.eval()
    zero(m)
    q, q_mask = m(m.processor.process_queries(queries))  # (N, Lq, dim): one big batch
    p, p_mask = m(m.processor.process_images(pages))  # (N, Lp, dim)
    big_loss = late_interaction_loss(q, q_mask, p, p_mask, temperature=TEMP)
    big_loss.backward()
    big = grads(m)
    zero(m)

    closures = colintern_closures(m, queries, pages)
    with torch.no_grad():  # right padding: an item's embedding does not depend on its batch
        q_micro, _ = pad_cat([fn() for fn in closures[: N // MICRO]])
        torch.testing.assert_close(q_micro[:, : q.shape[1]], q.detach(), atol=1e-5, rtol=0)
    loss = gradcache_backward(closures, combine_queries_pages(N // MICRO))
    assert loss.item() == pytest.approx(big_loss.item(), abs=1e-5)
    assert_grads_close(grads(m), big)
    zero(m)

    for i in range(0, N, MICRO):  # plain accumulation over the same micro-batches
        s = slice(i, i + MICRO)
        mq, mq_mask = m(m.processor.process_queries(queries[s]))
        mp, mp_mask = m(m.processor.process_images(pages[s]))
        (late_interaction_loss(mq, mq_mask, mp, mp_mask, temperature=TEMP) / (N // MICRO)).backward()
    assert max_grad_diff(grads(m), big) > 1e-3
