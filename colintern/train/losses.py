"""Contrastive late-interaction losses (docs/CONTRACT.md §5).

s(q, d) = (1/|q|) * sum over real query tokens i of max over real doc tokens j of <q_i, d_j>
(the per-token *mean*, unlike the retrieval score in ``colintern.retriever.scoring`` which is the sum).

Memory: the (B, C, Lq, Ld) similarity tensor is only ever built under ``no_grad`` and in chunks, to
find each query token's best doc token. The differentiable score is then recomputed from the
gathered best tokens, so autograd keeps (B, C, Lq, dim) values instead of (B, C, Lq, Ld). The
gradient is that of the max (it flows to the arg-max token), as with ``torch.max``.

Edge cases (documented behaviour):
- A doc / negative with no real tokens scores -inf and is never a candidate (use it to pad K).
- A query with no real tokens scores 0 against everything (|q| is clamped to 1).
- A query left with no candidates (all excluded or filtered) contributes 0: ce is then
  -log softmax over {pos} = 0, and pairwise is defined as softplus(-inf) = 0. It still counts in the
  mean over b.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Max elements of one no-grad (B, c, Lq, Ld) similarity chunk (~256 MiB in float32).
_SIM_CHUNK_ELEMENTS = 1 << 26


def _best_doc_tokens(q: torch.Tensor, d: torch.Tensor, d_mask: torch.Tensor, paired: bool) -> torch.Tensor:
    """Index of the best real doc token for every query token, without grad.

    paired=False: q (B, Lq, dim), d (C, Ld, dim), d_mask (C, Ld) -> (B, C, Lq).
    paired=True:  q (B, Lq, dim), d (B, K, Ld, dim), d_mask (B, K, Ld) -> (B, K, Lq).
    """
    with torch.no_grad():
        qf = q.detach()
        df = d.detach()
        b, lq = qf.shape[:2]
        n_docs, ld = df.shape[-3], df.shape[-2]
        per_doc = max(1, b * lq * ld)
        step = max(1, _SIM_CHUNK_ELEMENTS // per_doc)
        out = []
        for s in range(0, n_docs, step):
            if paired:
                sim = torch.einsum("bid,bkjd->bkij", qf, df[:, s : s + step])  # (B, k, Lq, Ld)
                pad = ~d_mask[:, s : s + step, None, :].bool()  # (B, k, 1, Ld)
            else:
                sim = torch.einsum("bid,cjd->bcij", qf, df[s : s + step])  # (B, c, Lq, Ld)
                pad = ~d_mask[None, s : s + step, None, :].bool()  # (1, c, 1, Ld)
            sim = sim.masked_fill(pad, float("-inf"))
            out.append(sim.argmax(dim=-1))  # (B, c, Lq)
        return torch.cat(out, dim=1)


def _mean_maxsim(
    q: torch.Tensor, q_mask: torch.Tensor, d: torch.Tensor, d_mask: torch.Tensor, paired: bool
) -> torch.Tensor:
    """Differentiable mean-MaxSim: (B, C) for all pairs, or (B, K) when paired (own docs).

    Computed in float32 at least (bf16/fp16 inputs are upcast; float64 stays float64).
    """
    dtype = torch.promote_types(torch.promote_types(q.dtype, d.dtype), torch.float32)
    qf = q.to(dtype)  # (B, Lq, dim)
    df = d.to(dtype)
    idx = _best_doc_tokens(qf, df, d_mask, paired)  # (B, C|K, Lq)
    if paired:
        b, k = idx.shape[:2]
        bi = torch.arange(b, device=idx.device)[:, None, None]
        ki = torch.arange(k, device=idx.device)[None, :, None]
        best = df[bi, ki, idx]  # (B, K, Lq, dim)
        nonempty = d_mask.bool().any(-1)  # (B, K)
    else:
        ci = torch.arange(idx.shape[1], device=idx.device)[None, :, None]
        best = df[ci, idx]  # (B, C, Lq, dim)
        nonempty = d_mask.bool().any(-1)[None, :]  # (1, C)
    tok = (qf[:, None] * best).sum(-1)  # (B, C|K, Lq)
    qm = q_mask.bool()[:, None, :]  # (B, 1, Lq)
    tok = torch.where(qm, tok, torch.zeros((), dtype=tok.dtype, device=tok.device))
    n_real = q_mask.bool().sum(-1).clamp_min(1).to(tok.dtype)[:, None]  # (B, 1)
    scores = tok.sum(-1) / n_real  # (B, C|K)
    return torch.where(nonempty, scores, torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device))


def late_interaction_scores(
    q: torch.Tensor, q_mask: torch.Tensor, d: torch.Tensor, d_mask: torch.Tensor
) -> torch.Tensor:
    """Mean-normalised MaxSim of every query against every doc -> (B, C), float32+ (differentiable).

    q (B, Lq, dim), q_mask (B, Lq); d (C, Ld, dim), d_mask (C, Ld); masks are 1/True on real tokens.
    These are the scores the loss uses, exposed so trainers can log them.
    """
    _check(q, q_mask, "q", 3)
    _check(d, d_mask, "d", 3)
    return _mean_maxsim(q, q_mask, d, d_mask, paired=False)


def _check(x: torch.Tensor, mask: torch.Tensor, name: str, ndim: int) -> None:
    if x.ndim != ndim or tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"{name} must be {ndim}-D with a mask of shape {name}.shape[:-1]; "
            f"got {tuple(x.shape)} and {tuple(mask.shape)}"
        )


def late_interaction_loss(
    q: torch.Tensor,
    q_mask: torch.Tensor,
    d: torch.Tensor,
    d_mask: torch.Tensor,
    neg: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    *,
    kind: str = "ce",
    temperature: float = 0.02,
    offset: int = 0,
    fn_filter: float | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-batch (+ hard negative) late-interaction contrastive loss -> scalar (float32, or float64 inputs' dtype).

    q (B, Lq, dim), q_mask (B, Lq); d (C, Ld, dim), d_mask (C, Ld) with C >= B + offset (e.g. docs
    gathered from all ranks, offset = rank * B); neg (B, K, Ln, dim), neg_mask (B, K, Ln): query b's
    own hard negatives; exclude (B, C) bool: True removes doc c from query b's candidates (the positive
    c = b + offset is never removed). fn_filter r: a non-positive candidate with s > r * s(pos) is
    dropped (false-negative guard; the threshold is computed without grad).
    kind="ce": mean_b -log softmax(s / T over candidates + pos)[pos];
    kind="pairwise": mean_b softplus((max over candidates of s - s(pos)) / T).
    """
    if kind not in ("ce", "pairwise"):
        raise ValueError(f"kind must be 'ce' or 'pairwise', got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check(q, q_mask, "q", 3)
    _check(d, d_mask, "d", 3)
    b, c = q.shape[0], d.shape[0]
    if offset < 0 or b + offset > c:
        raise ValueError(f"positives d[offset : offset + B] out of range: B={b}, C={c}, offset={offset}")
    dev = q.device

    scores = _mean_maxsim(q, q_mask, d, d_mask, paired=False)  # (B, C)
    valid = torch.isfinite(scores.detach())  # (B, C): docs with real tokens
    if exclude is not None:
        if tuple(exclude.shape) != (b, c):
            raise ValueError(f"exclude must be (B, C) = {(b, c)}, got {tuple(exclude.shape)}")
        valid = valid & ~exclude.to(device=dev, dtype=torch.bool)
    if neg is not None:
        if neg_mask is None:
            raise ValueError("neg_mask is required with neg")
        _check(neg, neg_mask, "neg", 4)
        if neg.shape[0] != b:
            raise ValueError(f"neg must have B={b} rows, got {neg.shape[0]}")
        neg_scores = _mean_maxsim(q, q_mask, neg, neg_mask, paired=True)  # (B, K)
        scores = torch.cat([scores, neg_scores], dim=1)  # (B, C + K)
        valid = torch.cat([valid, torch.isfinite(neg_scores.detach())], dim=1)

    rows = torch.arange(b, device=dev)
    pos_col = rows + offset  # (B,)
    is_pos = torch.zeros_like(valid)
    is_pos[rows, pos_col] = True  # plain bool tensor, no grad involved
    valid = valid & ~is_pos  # candidates exclude the positive itself
    s_pos = scores[rows, pos_col]  # (B,)
    if fn_filter is not None:
        with torch.no_grad():
            thr = float(fn_filter) * s_pos.detach()  # (B,)
            valid = valid & ~(scores.detach() > thr[:, None])

    neg_inf = torch.full((), float("-inf"), dtype=scores.dtype, device=dev)
    if kind == "ce":
        logits = torch.where(valid | is_pos, scores / temperature, neg_inf)  # (B, C [+ K])
        per_q = torch.logsumexp(logits, dim=1) - s_pos / temperature  # (B,)
    else:
        has_cand = valid.any(dim=1)  # (B,)
        best = torch.where(valid, scores, neg_inf).amax(dim=1)  # (B,)
        # rows without candidates: substitute a finite value so no inf/nan reaches the gradient
        best = torch.where(has_cand, best, s_pos.detach())
        per_q = torch.where(
            has_cand, F.softplus((best - s_pos) / temperature), torch.zeros((), dtype=scores.dtype, device=dev)
        )
    return per_q.mean()
