"""Seed-004 losses and metrics against float64 references written out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from colintern.itr.losses import (box_from_raw, box_losses, clamp_temperature_, generalized_box_iou, itc_loss,
                                  itm_loss, macro_f1, relation_loss, sample_itm_negatives)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def test_itc_is_the_mean_of_both_directions_with_excluded_pairs_left_out():
    img, txt = unit(5, 8, 0), unit(5, 8, 1)
    tau = torch.tensor(0.07, dtype=torch.float64)
    exclude = torch.zeros(5, 5, dtype=torch.bool)
    exclude[0, 3] = exclude[3, 0] = exclude[2, 2] = True  # a paraphrase pair; the diagonal is never excluded
    loss, logits = itc_loss(img, txt, tau, exclude)
    sim = [[float(txt[t] @ img[i]) / 0.07 for i in range(5)] for t in range(5)]
    banned = {(0, 3), (3, 0)}

    def ce(rows):
        return sum(-rows[b][b] + math.log(sum(math.exp(v) for c, v in enumerate(rows[b]) if (b, c) not in banned))
                   for b in range(5)) / 5

    want = (ce(sim) + ce([list(col) for col in zip(*sim)])) / 2
    assert abs(float(loss) - want) < 1e-12
    assert logits[0, 3] == float("-inf") and math.isfinite(float(logits[2, 2]))


def test_the_temperature_gets_a_gradient_and_is_clamped():
    img, txt = unit(4, 8, 2), unit(4, 8, 3)
    tau = torch.nn.Parameter(torch.tensor(0.07, dtype=torch.float64))
    loss, _ = itc_loss(img, txt, tau)
    loss.backward()
    sim = txt @ img.T  # d loss / d tau by the float64 formula: mean over both directions of sum_c (p_c - y_c) * -s_c/tau²
    grad = 0.0
    for rows in (sim, sim.T):
        p = torch.softmax(rows / 0.07, dim=1)
        grad += float(((p - torch.eye(4, dtype=torch.float64)) * (-rows / 0.07 ** 2)).sum(1).mean()) / 2
    assert abs(float(tau.grad) - grad) < 1e-10
    with torch.no_grad():
        tau.fill_(5.0)
    clamp_temperature_(tau, 0.001, 0.5)
    assert float(tau.detach()) == 0.5


def test_the_itm_sampler_never_draws_a_positive_or_an_excluded_pair_and_follows_the_softmax():
    logits = torch.tensor([[5.0, 1.0, 2.0, 0.0], [0.5, 4.0, 0.0, 1.5], [1.0, 1.0, 3.0, 1.0], [2.0, 0.0, 0.0, 1.0]])
    exclude = torch.zeros(4, 4, dtype=torch.bool)
    exclude[1, 3] = True
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_itm_negatives(logits, exclude, g)[0] for _ in range(6_000)])  # (N, 4)
    assert not (draws == torch.arange(4)).any() and not (draws[:, 1] == 3).any()
    row = 0  # caption 0: weights softmax(1, 2, 0) over images 1, 2, 3
    want = torch.softmax(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), 0)
    got = torch.stack([(draws[:, row] == i).double().mean() for i in (1, 2, 3)])
    chi2 = float((((got - want) ** 2) / want).sum() * len(draws))
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001
    neg_txt = torch.stack([sample_itm_negatives(logits, exclude, torch.Generator().manual_seed(1))[1]
                           for _ in range(2)])
    assert torch.equal(neg_txt[0], neg_txt[1])  # the same generator state draws the same negatives (resume)
    alone = sample_itm_negatives(torch.zeros(1, 1), None, g)
    assert alone[0].tolist() == [-1] and alone[1].tolist() == [-1]


def test_itm_labels_the_first_rows_as_matches():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.5, -0.5]], dtype=torch.float64)
    want = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-1.0))) / 3
    assert abs(float(itm_loss(logits, 1)) - want) < 1e-12


@pytest.mark.parametrize("a,b,iou,giou", [
    ([0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5], 1.0, 1.0),                   # identical
    ([0.0, 0.0, 0.2, 0.2], [0.6, 0.6, 1.0, 1.0], 0.0, -(1.0 - 0.2) / 1.0),    # disjoint: hull 1, union 0.04 + 0.16
    ([0.0, 0.0, 0.4, 0.4], [0.2, 0.2, 0.6, 0.6], 0.04 / 0.28, 0.04 / 0.28 - (0.36 - 0.28) / 0.36),
    ([0.3, 0.3, 0.3, 0.3], [0.3, 0.3, 0.3, 0.3], 0.0, 0.0),                   # identical zero-area boxes: no NaN
    ([0.3, 0.3, 0.3, 0.5], [0.1, 0.1, 0.2, 0.2], 0.0, -(0.08 - 0.01) / 0.08),  # a zero-width box
])
def test_generalized_iou_against_hand_computed_values(a, b, iou, giou):
    g, i = generalized_box_iou(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))
    assert abs(float(i) - iou) < 1e-9 and abs(float(g) - giou) < 1e-9 and not torch.isnan(g).any()


def test_box_losses_and_decoding():
    raw = torch.zeros(2, 4, dtype=torch.float64)  # sigmoid 0.5 everywhere: centre 0.5, size 0.5
    boxes = box_from_raw(raw)
    assert torch.allclose(boxes, torch.tensor([[0.25, 0.25, 0.75, 0.75]] * 2, dtype=torch.float64))
    target = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 0.5, 0.5]], dtype=torch.float64)
    losses = box_losses(boxes, target, torch.tensor([False, True]))
    assert abs(float(losses["box_l1"]) - 0.25) < 1e-12
    inter, union, hull = 0.0625, 0.4375, 0.5625
    assert abs(float(losses["box_giou"]) - (1 - (inter / union - (hull - union) / hull))) < 1e-12
    none = box_losses(boxes, target, torch.tensor([False, False]))
    assert float(none["box_l1"]) == 0.0 and float(none["box_giou"]) == 0.0


def test_relation_loss_uses_only_labelled_rows():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 9.0]], dtype=torch.float64)
    got = relation_loss(logits, torch.tensor([0, 1]), torch.tensor([True, False]))
    assert abs(float(got) - (-2.0 + math.log(math.exp(2.0) + 2))) < 1e-12


def test_macro_f1_on_a_hand_computed_confusion_matrix():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2, 0])
    f1, confusion = macro_f1(pred, target, 6)
    assert confusion[:3, :3].tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 3]] and int(confusion.sum()) == 9
    # class 0: P 2/3 R 2/3 F 2/3; class 1: P 1/2 R 1/2 F 1/2; class 2: P 3/4 R 3/4 F 3/4; absent classes ignored
    assert abs(f1 - (2 / 3 + 1 / 2 + 3 / 4) / 3) < 1e-12
