"""GradCache: exact large-batch contrastive gradients with the activation memory of one micro-batch.

Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (2021).
The contrastive loss couples every query with every page of the batch, so plain gradient accumulation
(loss per micro-batch, summed) is NOT the big-batch loss: each query only sees the pages of its own
micro-batch as negatives. GradCache splits the work instead:

1. embed every micro-batch without grad (no activations kept), remembering each call's RNG state;
2. make the embeddings leaf tensors, compute the full-batch loss on them (`combine`, which may
   all-gather across ranks with `colintern.train.distributed.gather_padded`) and backprop to the leaves:
   this "caches" dLoss/d(embedding) for every item of the big batch;
3. re-embed each micro-batch with grad under its saved RNG state (so dropout, e.g. LoRA dropout,
   draws the same masks) and backprop the cached embedding gradient through it.

The parameter gradients are those of one forward/backward on the whole batch (up to float rounding),
because d Loss/d theta = sum over items of (d Loss/d emb_i) . (d emb_i/d theta), and each micro-batch
re-computation gives exactly d emb_i/d theta for its items. Requirements: a closure's embeddings must
not depend on what else is in its micro-batch (true for ColIntern: right padding, masked), and the
closures must be deterministic given the RNG state. Modules with running statistics (BatchNorm) would
update them twice; ColIntern has none.
"""
from __future__ import annotations

from typing import Callable

import torch

Closure = Callable[[], tuple[torch.Tensor, torch.Tensor]]
Combine = Callable[[list[tuple[torch.Tensor, torch.Tensor]]], torch.Tensor]


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """CPU and (if CUDA is in use) every CUDA device's RNG state."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def gradcache_backward(closures: list[Closure], combine: Combine) -> torch.Tensor:
    """Backprop `combine` of all micro-batch embeddings into the parameters, one micro-batch at a time.

    closures: each recomputes one micro-batch and returns (emb (b, L, D), mask (b, L)); e.g.
      `lambda: model(model.processor.process_queries(texts[i:i + b]))`. Any number and mix (query,
      page and negative micro-batches); `combine` gets their outputs in the same order.
    combine: [(emb, mask), ...] -> scalar loss, differentiable w.r.t. the embs. It may call
      `colintern.train.distributed.gather_padded` (every rank then runs the same collectives here, and the
      cross-rank gradient arrives through the gather's backward); it may also use parameters directly
      (e.g. a learned temperature), which then get their gradient once, in step 2.
    Accumulates into `.grad` like `loss.backward()` would (zero them before, all-reduce them after in
    data parallel training). Returns the loss, detached. The RNG ends in the state a single
    forward of every closure followed by `combine` would leave it in.
    """
    if not closures:
        raise ValueError("gradcache_backward needs at least one closure")
    # 1. Embed every micro-batch without grad, remembering the RNG state before each call.
    states = []
    cached: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for fn in closures:
            states.append(_rng_state())
            emb, mask = fn()  # (b, L, D), (b, L)
            cached.append((emb.detach(), mask.detach()))
    # 2. Full-batch loss on leaf copies; backprop only as far as the embeddings.
    leaves = [(emb.requires_grad_(True), mask) for emb, mask in cached]
    loss = combine(leaves)
    if loss.ndim != 0:
        raise ValueError(f"combine must return a scalar loss, got shape {tuple(loss.shape)}")
    loss.backward()
    # 3. Recompute each micro-batch with grad under its RNG state and push the cached gradient through it.
    after_combine = _rng_state()
    try:
        for fn, state, (leaf, _) in zip(closures, states, leaves):
            if leaf.grad is None:  # combine did not use this micro-batch
                continue
            _set_rng_state(state)
            emb, _ = fn()  # (b, L, D), now with a graph
            if emb.shape != leaf.shape:
                raise RuntimeError(f"a closure returned {tuple(emb.shape)} on recomputation but {tuple(leaf.shape)} "
                                   "the first time: closures must be deterministic")
            if emb.requires_grad:  # a fully frozen encoder has nothing to backprop into
                torch.autograd.backward(emb, grad_tensors=leaf.grad)
            del emb
    finally:
        _set_rng_state(after_combine)
    return loss.detach()
