"""Losses and metrics of image-text retrieval with multi-task heads (seed 004; docs/CONTRACT.md §12).

    itc_loss               image-text contrastive: symmetric InfoNCE over txt @ imgᵀ / τ, τ learned (clamped)
    sample_itm_negatives   ALBEF/BLIP hard negatives for matching, drawn from the detached ITC softmax
    itm_loss               matching cross-entropy over [B positives, B negative images, B negative texts]
    box_from_raw, generalized_box_iou, box_losses     boxes as sigmoid (cx, cy, w, h) -> xyxy; L1 + (1 - GIoU)
    relation_loss, macro_f1                           relation classification and its macro-F1 (with confusion)
docs/CONTRACT.md §5's late_interaction_loss is untouched: these are the seed-004 heads' own objectives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-7


def itc_loss(img: torch.Tensor, txt: torch.Tensor, temperature: torch.Tensor,
             exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of aligned (image b, caption b) pairs -> (loss, logits_t2i (B, B)).

    img, txt: (B, D) L2-normalised. exclude: (B, B) bool, [t, i] True where caption t also describes image i (a
    paraphrase, the same meaning): removed from both softmaxes instead of counted as a negative (the diagonal is
    never excluded)."""
    logits = txt @ img.T / temperature  # (B_txt, B_img)
    if exclude is not None:
        eye = torch.eye(len(img), dtype=torch.bool, device=img.device)
        logits = logits.masked_fill(exclude & ~eye, float("-inf"))
    target = torch.arange(len(img), device=img.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    return loss, logits


def clamp_temperature_(temperature: torch.nn.Parameter, low: float, high: float) -> None:
    """Keep the learned τ inside [low, high], in place before a step (ALBEF)."""
    with torch.no_grad():
        temperature.clamp_(low, high)


def sample_itm_negatives(logits_t2i: torch.Tensor, exclude: torch.Tensor | None,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(a negative image per caption (B,), a negative caption per image (B,)), each drawn with probability
    softmax(ITC similarity) over the in-batch candidates that are neither the positive nor excluded.

    Hard negatives (similar but wrong) make matching learn more than random ones; drawn from the detached logits
    with the caller's generator, so a resumed run draws the same ones. A row without any candidate (a batch of
    one, or everything excluded) gets -1."""
    logits = logits_t2i.detach().float().cpu()
    n = len(logits)
    banned = torch.eye(n, dtype=torch.bool)
    if exclude is not None:
        banned |= exclude.cpu()
    out = []
    for rows, ban in ((logits, banned), (logits.T, banned.T)):
        weights = torch.softmax(rows.masked_fill(ban, float("-inf")), dim=1).nan_to_num(0.0)  # (B, B)
        empty = weights.sum(1) == 0
        weights[empty] = 1.0  # placeholder rows, overwritten with -1 below
        picks = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        picks[empty] = -1
        out.append(picks)
    return out[0], out[1]


def itm_loss(logits: torch.Tensor, n_pos: int) -> torch.Tensor:
    """Cross-entropy of (N, 2) match logits whose first n_pos rows are matching pairs, the rest not."""
    labels = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    labels[:n_pos] = 1
    return F.cross_entropy(logits, labels)


def box_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """(N, 4) unconstrained outputs -> (N, 4) boxes [x1, y1, x2, y2] in [0, 1] via sigmoid (cx, cy, w, h)."""
    cx, cy, w, h = torch.sigmoid(raw).unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).clamp(0.0, 1.0)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(GIoU (N,), IoU (N,)) of aligned boxes a[i], b[i] ([x1, y1, x2, y2]); zero-area boxes give finite values
    (IoU 0 unless the two coincide in area 0, GIoU in [-1, 1]), never NaN."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    inter_w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp_min(0)
    inter_h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp_min(0)
    inter = inter_w * inter_h
    union = area_a + area_b - inter
    iou = inter / union.clamp_min(EPS)
    hull = ((torch.maximum(a[:, 2], b[:, 2]) - torch.minimum(a[:, 0], b[:, 0])).clamp_min(0)
            * (torch.maximum(a[:, 3], b[:, 3]) - torch.minimum(a[:, 1], b[:, 1])).clamp_min(0))
    giou = iou - (hull - union) / hull.clamp_min(EPS)
    return giou, iou


def box_losses(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"box_l1": mean |pred - target| per coordinate, "box_giou": mean (1 - GIoU)} over the valid rows (0 if none)."""
    if not bool(valid.any()):
        zero = pred.sum() * 0.0
        return {"box_l1": zero, "box_giou": zero}
    p, t = pred[valid], target[valid]
    giou, _ = generalized_box_iou(p, t)
    return {"box_l1": (p - t).abs().mean(), "box_giou": (1 - giou).mean()}


def relation_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the rows that have a relation label (0 if none)."""
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid], target[valid])


def macro_f1(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> tuple[float, torch.Tensor]:
    """(macro-F1 over the classes present in target or pred, confusion (n_classes, n_classes) [true, predicted])."""
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    confusion.index_put_((target.long().cpu(), pred.long().cpu()), torch.ones(len(target), dtype=torch.long),
                         accumulate=True)
    tp = confusion.diag().double()
    predicted, actual = confusion.sum(0).double(), confusion.sum(1).double()
    present = (predicted + actual) > 0
    f1 = 2 * tp / (predicted + actual).clamp_min(1)
    return float(f1[present].mean()) if bool(present.any()) else 0.0, confusion
