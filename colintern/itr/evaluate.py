"""eval.py --itr_dataset DIR: image-text retrieval, matching and grounding metrics of a seed-004 checkpoint (§12).

    python eval.py --ckpt outputs/itr/single/colintern_heads_epoch6.pt --itr_dataset scenes/eval [--itm_rerank 16]

Retrieval (exact ITC dot products, float32): text->image R@1/5/10 and nDCG@10 (a caption's relevant images: those
with its meaning, its `key`), image->text R@1/5/10 (a hit when any caption of the image's meaning is in the top K,
the COCO protocol). --itm_rerank K re-orders each caption's top K images by the ITM probability (ALBEF inference);
twin_acc: the share of captions whose own image scores above its relation-swapped twin (chance 0.5), by ITC and by
ITM. Grounding (the fused image + relation-free phrase): subject and object box IoU, GIoU, L1 and Acc@IoU>=0.5
(averaged over both), beside box_iou_prior, the IoU of the mean training box (what a head that ignores the image
gets); relation accuracy and macro-F1, beside rel_acc_image_shuffled, the same heads with every phrase paired with
another image (what the text alone explains). Writes OUT_DIR/RUN_NAME/summary.json in the shape of the retrieval
summary (tasks eval_t2i, eval_i2t, eval_grounding), so plot_vidore_metrics.py plots it.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from colintern.itr.losses import generalized_box_iou, macro_f1
from colintern.settings import EvalConfig

log = logging.getLogger("colintern.eval")
KS = (1, 5, 10)


def recall_at(ranked: torch.Tensor, relevant: torch.Tensor, ks=KS) -> dict[str, float]:
    """ranked (Q, N) candidate indices best first, relevant (Q, N) bool -> {"recall_at_k": share of queries with a
    relevant candidate in the top k}."""
    hits = torch.gather(relevant, 1, ranked)  # (Q, N) relevance in rank order
    return {f"recall_at_{k}": float(hits[:, :k].any(1).double().mean()) for k in ks}


def ndcg_at(ranked: torch.Tensor, relevant: torch.Tensor, k: int = 10) -> float:
    """Binary-relevance nDCG@k, averaged over queries."""
    hits = torch.gather(relevant, 1, ranked)[:, :k].double()  # (Q, k)
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    dcg = (hits * discount[:hits.shape[1]]).sum(1)
    ideal = torch.stack([discount[:min(int(n), k)].sum() for n in relevant.sum(1)])
    return float((dcg / ideal.clamp_min(1e-12)).mean())


def rank(scores: torch.Tensor) -> torch.Tensor:
    """(Q, N) scores -> indices best first (ties: lower index first)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def itm_rerank(ranked: torch.Tensor, k: int, itm_prob: Any) -> torch.Tensor:
    """Re-order each row's first k candidates by itm_prob(query_index, candidate_indices) (descending, stable)."""
    out = ranked.clone()
    for q in range(len(ranked)):
        top = ranked[q, :k]
        order = torch.sort(itm_prob(q, top), descending=True, stable=True).indices
        out[q, :k] = top[order]
    return out


def evaluate_itr(m: Any, rows: list, itm_rerank_k: int = 0, box_prior: dict | None = None,
                 batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Every metric of the module docstring -> {"eval_t2i": {...}, "eval_i2t": {...}, "eval_grounding": {...}}."""
    from colintern.itr.model import open_images

    heads, features = m.heads, m.features
    with torch.no_grad():
        image_states = features.images(open_images(rows), batch_size=batch_size)  # (N, n_img, H)
        items = [(r, c) for r, row in enumerate(rows) for c in range(len(row.captions))]
        text_states, text_keep = features.texts([rows[r].captions[c] for r, c in items])
        iv = heads.image_vectors(image_states)  # (N, D)
        tv = heads.text_vectors(text_states, text_keep)  # (T, D)
        from colintern.retriever.scoring import dense_scores

        scores = dense_scores(list(tv.unsqueeze(1)), list(iv.unsqueeze(1)), device="cpu")  # (T, N) exact float32
    keys = [row.key for row in rows]
    relevant = torch.tensor([[keys[r] == key for key in keys] for r, _ in items])  # (T, N)
    ranked = rank(scores)

    def itm_prob(t: int, candidates: torch.Tensor) -> torch.Tensor:
        n = len(candidates)
        with torch.no_grad():
            fused = heads.fusion(image_states[candidates], text_states[t].expand(n, -1, -1),
                                 text_keep[t].expand(n, -1))
            return torch.softmax(heads.itm(fused), -1)[:, 1]

    t2i = {**recall_at(ranked, relevant), "ndcg_at_10": ndcg_at(ranked, relevant)}
    if itm_rerank_k:
        reranked = itm_rerank(ranked, itm_rerank_k, itm_prob)
        t2i.update({f"{k}_itm_rerank": v for k, v in recall_at(reranked, relevant).items()})
    i2t = recall_at(rank(scores.T), relevant.T)
    by_id = {row.image_id: i for i, row in enumerate(rows)}
    twins = [(t, r, by_id[rows[r].twin]) for t, (r, _) in enumerate(items) if rows[r].twin in by_id]
    if twins:
        t2i["twin_acc"] = sum(float(scores[t, r] > scores[t, o]) for t, r, o in twins) / len(twins)
        t2i["twin_acc_itm"] = sum(float(p[0] > p[1]) for p in (itm_prob(t, torch.tensor([r, o])) for t, r, o in twins)
                                  ) / len(twins)
    grounding = ground_metrics(heads, features, rows, image_states, box_prior)
    return {"eval_t2i": t2i, "eval_i2t": i2t, "eval_grounding": grounding}


def ground_metrics(heads: Any, features: Any, rows: list, image_states: torch.Tensor,
                   box_prior: dict | None) -> dict[str, float]:
    labelled = [i for i, row in enumerate(rows) if row.subject_box is not None and row.object_box is not None]
    with_rel = [i for i, row in enumerate(rows) if row.relation is not None]
    out: dict[str, float] = {}
    if not labelled and not with_rel:
        return out
    with torch.no_grad():
        phrases, keep = features.texts([row.phrase or row.captions[0] for row in rows])
        subject, obj, logits = heads.ground(heads.fusion(image_states, phrases, keep))
        shuffled = heads.ground(heads.fusion(image_states.roll(1, 0), phrases, keep))[2]  # every phrase, another image
    if labelled:
        idx = torch.tensor(labelled)
        target = torch.tensor([rows[i].subject_box for i in labelled] + [rows[i].object_box for i in labelled])
        pred = torch.cat([subject[idx], obj[idx]])
        giou, iou = generalized_box_iou(pred.double(), target.double())
        out.update({"box_iou": float(iou.mean()), "box_giou": float(giou.mean()),
                    "box_l1": float((pred.double() - target.double()).abs().mean()),
                    "box_acc_at_50": float((iou >= 0.5).double().mean())})
        if box_prior:
            prior = torch.tensor([box_prior["subject"]] * len(labelled) + [box_prior["object"]] * len(labelled),
                                 dtype=torch.float64)
            out["box_iou_prior"] = float(generalized_box_iou(prior, target.double())[1].mean())
    if with_rel:
        idx = torch.tensor(with_rel)
        target = torch.tensor([rows[i].relation for i in with_rel])
        pred = logits[idx].argmax(-1)
        out["rel_acc"] = float((pred == target).double().mean())
        out["rel_macro_f1"] = macro_f1(pred, target, logits.shape[1])[0]
        out["rel_acc_image_shuffled"] = float((shuffled[idx].argmax(-1) == target).double().mean())
    return out


def run(config: EvalConfig) -> dict[str, Any]:
    """eval.py --itr_dataset: load, evaluate, write the summary; returns it."""
    from colintern.data.report import SkipReport
    from colintern.device import resolve_device
    from colintern.errors import UserError
    from colintern.itr.model import ImageText, read_rows

    if not config.ckpt:
        raise UserError("--itr_dataset needs --ckpt: an image-text checkpoint of train.py --task itr")
    assert config.itr_dataset is not None  # evaluate() calls this only with --itr_dataset
    data = Path(config.itr_dataset)
    t0 = time.perf_counter()
    rows = read_rows(data, SkipReport(strict=config.strict, logger=log), config.coco_images,
                     config.coco_instances)
    m = ImageText.from_pretrained(config.model_id, config.ckpt, device=resolve_device(config.device))
    tasks = evaluate_itr(m, rows, config.itm_rerank, m.box_prior, config.batch_size)
    by_metric: dict[str, list[float]] = {}
    for scores in tasks.values():
        for name, value in scores.items():
            if math.isfinite(value):
                by_metric.setdefault(name, []).append(value)
    average = {name: sum(values) / len(values) for name, values in by_metric.items()}  # recall_at_k: T2I and I2T
    return {"model": config.model_id or m.base_model, "ckpt": config.ckpt,
            "benchmark": f"itr:{data.name}", "main_metric": "recall_at_1", "tasks": tasks, "average": average,
            "main_metrics": {name: "recall_at_1" for name in ("eval_t2i", "eval_i2t")} | {"eval_grounding": "rel_acc"},
            "itm_rerank": config.itm_rerank, "rows": len(rows), "config": m.cfg.to_dict(),
            "dtype": str(next(m.model.backbone.parameters()).dtype).replace("torch.", ""),
            "batch_size": config.batch_size, "seconds": round(time.perf_counter() - t0, 1)}


def format_table(summary: dict[str, Any]) -> str:
    """One line per task: every metric it has."""
    lines = []
    for name, scores in summary["tasks"].items():
        lines.append(f"{name:15s} " + "  ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    return "\n".join(lines)
