"""One optimizer step: step_loss gathers the pages of every rank and applies late_interaction_loss (docs/CONTRACT.md
§5); optimizer_step, the package's one optimizer step (both training tasks take it), averages, clips and checks the
gradients and makes the update; the learning-rate schedule, and auto-batch's memory probe."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from colintern import hooks
from colintern.errors import UserError


log = logging.getLogger("colintern.train")


def pad_cat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (emb (b, ..., L, D), mask (b, ..., L)) along dim 0, right-padding the token axis L with zeros
    and False (differentiable; padding never takes part in a score). The one concatenate-and-pad helper."""
    lmax = max(e.shape[-2] for e, _ in parts)
    embs = [F.pad(e, (0, 0, 0, lmax - e.shape[-2])) for e, _ in parts]
    masks = [F.pad(m, (0, lmax - m.shape[-1])) for _, m in parts]
    return torch.cat(embs, 0), torch.cat(masks, 0)


def exclude_matrix(row_keys: Sequence[str], col_keys: Sequence[str], offset: int) -> torch.Tensor:
    """(B, C) bool: True where column c holds the same page as query b's positive (c != b + offset).

    Several queries can share a page (colpali_train_set); such a duplicate must not count as a negative.
    """
    ids: dict[str, int] = {}
    r = torch.tensor([ids.setdefault(k, len(ids)) for k in row_keys], dtype=torch.long)
    c = torch.tensor([ids.setdefault(k, len(ids)) for k in col_keys], dtype=torch.long)
    ex = r[:, None] == c[None, :]  # (B, C)
    ex[torch.arange(len(row_keys)), torch.arange(len(row_keys)) + offset] = False
    return ex


def step_loss(parts: list[tuple[torch.Tensor, torch.Tensor]], batches: list[dict[str, Any]], *, num_negs: int,
              rank: int, all_keys: list[str], gather, loss_fn, loss_kwargs: dict[str, Any]) -> torch.Tensor:
    """Contrastive loss of this rank's queries of one step (one or, with GradCache, several micro-batches).

    parts: per micro-batch [(query emb (B, Lq, D), mask), (page table (U+1, L, D), mask)], in that order.
    all_keys: the positive page keys of every rank's rows of these micro-batches, in gathered order (rank-major),
    used to exclude duplicates of a query's positive page. Queries whose positive could not be decoded are left
    out (their page slot stays in the gathered batch as an empty, never-scored doc).
    """
    qs: list[tuple[torch.Tensor, torch.Tensor]] = []
    ds: list[tuple[torch.Tensor, torch.Tensor]] = []
    ns: list[tuple[torch.Tensor, torch.Tensor]] = []
    valid: list[bool] = []
    for m, batch in enumerate(batches):
        q, q_mask = parts[2 * m]
        table, t_mask = parts[2 * m + 1]
        pos = batch["pos_row"].to(table.device)
        qs.append((q, q_mask))
        ds.append((table[pos], t_mask[pos]))  # (B, L, D)
        if num_negs:
            neg = batch["neg_row"].to(table.device)
            ns.append((table[neg], t_mask[neg]))  # (B, K, L, D)
        bad = batch["bad"]
        valid.extend(int(p) not in bad for p in batch["pos_row"].tolist())
    q, q_mask = pad_cat(qs)  # (n, Lq, D)
    d, d_mask = pad_cat(ds)  # (n, Ld, D)
    n = q.shape[0]
    d_all, d_all_mask = gather(d, d_mask)  # (W*n, L, D)
    offset = rank * n
    exclude = exclude_matrix(all_keys[offset:offset + n], all_keys, offset).to(q.device)  # (n, W*n)
    neg = neg_mask = None
    if num_negs:
        neg, neg_mask = pad_cat(ns)  # (n, K, Ln, D)
    if not all(valid):
        keep = torch.tensor(valid, device=q.device)
        if not keep.any():
            return d_all.sum() * 0.0 + q.sum() * 0.0  # nothing to learn here; keep the collectives in step
        rows = keep.nonzero().squeeze(1)
        cols = torch.arange(d_all.shape[0], device=q.device)
        block = torch.cat([rows, (~keep).nonzero().squeeze(1)]) + offset
        cols[offset:offset + n] = block  # this rank's valid positives first, so positive b sits at offset + b
        d_all, d_all_mask, exclude = d_all[cols], d_all_mask[cols], exclude[:, cols][rows]
        q, q_mask = q[rows], q_mask[rows]
        if neg is not None and neg_mask is not None:
            neg, neg_mask = neg[rows], neg_mask[rows]
    return loss_fn(q, q_mask, d_all, d_all_mask, neg, neg_mask, offset=offset, exclude=exclude, **loss_kwargs)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total` (transformers' linear schedule)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def is_out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError, or the plain RuntimeError("CUDA out of memory") some kernels raise instead."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                             and "out of memory" in str(err).lower())


def probe_batch_size(embed_step, params: list[torch.nn.Parameter], *, max_batch: int,
                     target_frac: float, device: torch.device, extra_bytes: int = 0) -> tuple[int, list[str]]:
    """Largest b <= max_batch with peak memory of embed_step(b) (forward + backward) <= target_frac of the GPU.

    Doubling from 1 until a probe fails or exceeds the target, then bisection; a CUDA OOM counts as "too big"
    and is survived. extra_bytes (e.g. the optimizer state still to be allocated) is added to every peak.
    Returns (batch size, one note per probe).
    """
    total = torch.cuda.get_device_properties(device).total_memory
    budget = target_frac * total
    notes: list[str] = []
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all()

    def fits(b: int) -> bool:
        for p in params:
            p.grad = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            embed_step(b)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) + extra_bytes
            ok = peak <= budget
            notes.append(f"batch {b}: peak {peak / 2**30:.2f} GiB ({'fits' if ok else 'over'} "
                         f"{budget / 2**30:.2f} GiB)")
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(err):
                raise  # a real error, not memory
            ok = False
            notes.append(f"batch {b}: out of memory")
        finally:
            for p in params:
                p.grad = None
            torch.cuda.empty_cache()
        return ok

    try:
        good, bad, b = 0, max_batch + 1, 1
        while True:  # doubling until the first failure (or max_batch)
            if not fits(b):
                bad = b
                break
            good = b
            if b >= max_batch:
                break
            b = min(2 * b, max_batch)
        while bad - good > 1:  # bisection between the last fit and the first failure
            mid = (good + bad) // 2
            if fits(mid):
                good = mid
            else:
                bad = mid
    finally:
        torch.set_rng_state(cpu_rng)
        torch.cuda.set_rng_state_all(cuda_rng)
    if good == 0:
        raise UserError(f"auto_batch: even a batch of 1 does not fit in {target_frac:.0%} of GPU memory "
                        f"({'; '.join(notes)}); lower --max_tiles, use --lora with --gradient_checkpointing, "
                        "or raise --auto_target_frac")
    return good, notes


@dataclass
class StepOutcome:
    """What one optimizer step did."""

    loss: float
    grad_norm: float | None   # before clipping; None when the task does not clip
    lr: float                 # the learning rate of this update


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: Any, params: list[torch.nn.Parameter], loss: float, *,
                   step: int, max_grad_norm: float | None, where: str,
                   reduce_gradients: Callable[[list[torch.nn.Parameter]], None] | None = None) -> StepOutcome:
    """The package's one optimizer step, after the task's forward and backward passes (every micro-batch of the
    step): gradients averaged over ranks, clipped (max_grad_norm 0: measured, not clipped; None: neither), the loss
    and the gradient norm checked finite (a diverged run stops here, before anything is saved: `where` says at
    which step and what to do), the update, the schedule, the gradients cleared. `step`: the number of this step
    (1-based), for the "loss" hook."""
    if reduce_gradients is not None:
        reduce_gradients(params)
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")))
    loss = hooks.call("loss", step, loss)
    if not (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))):
        raise UserError(f"training diverged: loss {loss}" + (f", grad_norm {grad_norm}" if grad_norm is not None
                                                              else "") + f" {where}")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss=loss, grad_norm=grad_norm, lr=lr)
