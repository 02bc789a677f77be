"""The optimizer: torch AdamW or bitsandbytes' 8-bit AdamW (with a working fallback), and paged states restored as
paged on a resume. The step that uses it is `colintern.train.step.optimizer_step`."""
from __future__ import annotations

import logging

import torch


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
