"""The optimizer and the one optimizer step of the package (both training tasks take it): torch AdamW or
bitsandbytes' 8-bit AdamW (with a working fallback), paged states restored as paged on a resume, and
`optimizer_step`: gradients averaged over ranks, clipped, checked finite, the update, the schedule."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from colintern import hooks
from colintern.errors import UserError

log = logging.getLogger("colintern.train")


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                   device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer asked for; bitsandbytes' 8-bit AdamW falls back to torch AdamW when it cannot run here."""
    if name != "adamw":
        try:
            import bitsandbytes as bnb

            cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
            if name == "paged_adamw_8bit" and device.type != "cuda":
                log.info("--optimizer paged_adamw_8bit: paging needs CUDA; using non-paged 8-bit AdamW on %s",
                         device.type)
                cls = bnb.optim.AdamW8bit
            # one step proves the kernels run here; 100,000 elements is where bitsandbytes starts paging
            probe = torch.nn.Parameter(torch.zeros(100_000, device=device))
            probe.grad = torch.ones_like(probe)
            cls([probe], lr=1e-3).step()
            return cls(params, lr=lr, weight_decay=weight_decay), name
        except Exception as err:  # noqa: BLE001 - ImportError, missing CUDA kernels, ...
            log.warning("--optimizer %s needs a working bitsandbytes on %s (%s: %s); falling back to torch "
                        "AdamW (32-bit states)", name, device.type, type(err).__name__, str(err).splitlines()[0]
                        if str(err) else "")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), "adamw"


def repage_optimizer_states(optimizer) -> int:
    """Put a resumed bitsandbytes paged optimizer's big states back into paged memory; returns how many.

    bitsandbytes' load_state_dict keeps the loaded states as ordinary tensors and its first step moves them onto the
    GPU, so without this a same-phase resume silently stops paging (the memory the user chose the optimizer for).
    get_state_buffer is the allocator the optimizer itself uses for a fresh state (paged from 100,000 elements on
    CUDA, ordinary elsewhere)."""
    if not getattr(optimizer, "is_paged", False):
        return 0
    moved = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key in ("state1", "state2"):
                value = state.get(key)
                if not isinstance(value, torch.Tensor) or getattr(value, "is_paged", False) or p.numel() < 100_000:
                    continue
                buffer = optimizer.get_state_buffer(p, dtype=value.dtype)
                buffer.copy_(value.reshape(buffer.shape))
                state[key] = buffer
                moved += bool(getattr(buffer, "is_paged", False))
    return moved


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
