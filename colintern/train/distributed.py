"""Data parallelism for `torchrun` / `accelerate launch` by explicit gradient averaging.

No DistributedDataParallel wrapper: every rank runs its own forward/backward (possibly through
GradCache, possibly with a frozen backbone), then calls `all_reduce_gradients` before the optimizer
step. This composes with anything that produces `.grad`, and keeps `model` a plain ColIntern.

Why the result equals one process on the combined batch (W ranks, B queries each):
- every rank embeds its own B queries and B pages, and `gather_padded` all-gathers the pages, so
  every rank sees all C = W*B pages; rank r's positives sit at columns r*B .. r*B+B-1 (offset = rank*B);
- rank r's loss L_r = mean over its B queries, so the global mean loss is L = (1/W) * sum_r L_r
  (the ranks hold equal B, which `gather_padded` checks);
- the differentiable all-gather's backward SUMS the gradient that every rank's loss sends to a
  gathered page into the rank that owns that page: rank r ends up with dL_r'/d(own pages) summed
  over all r', plus the gradient of L_r through its own queries;
- so after backward, rank r's parameter gradient is sum_r' dL_r'/d(theta via rank r's data), and
  averaging over ranks gives (1/W) * sum_r sum_r' dL_r'/d(theta via r) = dL/dtheta: exactly the
  gradient of the global mean loss, as if one process had computed it on the W*B batch.

With world_size 1 (plain `python train.py`) every function here is an identity / no-op and no
process group is created.
"""
from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

log = logging.getLogger("colintern")

# Largest flat buffer (elements) one all-reduce of gradients uses; bigger gradient sets are sent in chunks.
_BUCKET_ELEMENTS = 1 << 26


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_distributed(device_hint: str) -> DistInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun and `accelerate launch`) and join the group.

    device_hint: "cpu", "cuda", "cuda:N" or "mps", already checked against this machine by
    `colintern.device.resolve_device` (the one device policy). With more than one rank on CUDA each process uses
    cuda:LOCAL_RANK and the nccl backend; otherwise gloo. With WORLD_SIZE unset or 1 no process group is created
    and the device is the hint.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    hint = device_hint.lower()
    if world_size <= 1:
        device = torch.device(hint)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_main=True)

    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    use_cuda = torch.device(hint).type == "cuda"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                               "visible: launch at most one process per GPU (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device(hint)
        backend = "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world_size}
        if use_cuda:
            kwargs["device_id"] = device  # binds the communicator to this GPU (no guessing in barrier)
        dist.init_process_group(**kwargs)
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(f"a process group (rank {dist.get_rank()}/{dist.get_world_size()}) is already "
                           f"running, but RANK={rank} WORLD_SIZE={world_size}")
    log.info("distributed: rank %d/%d (local %d) on %s, backend %s", rank, world_size, local_rank, device,
             dist.get_backend())
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_main=rank == 0)


def _comm_device() -> torch.device:
    """Device the small bookkeeping tensors of a collective live on (the current GPU for nccl, else CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_padded(emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather token embeddings from every rank, padding the token axis to the longest rank.

    emb (B, L, D), mask (B, L) -> emb (W*B, Lmax, D), mask (W*B, Lmax); rank r's rows are r*B .. r*B+B-1
    (so its positives are at offset = rank * B). Padding is zeros with mask False (never scored).
    emb is gathered with a differentiable all-gather whose backward sums every rank's gradient into the
    owner (see the module docstring for why this gives the global-batch gradient); mask has no grad.
    Every rank must call this (a collective) with the same B; otherwise all ranks raise ValueError.
    Identity when not distributed.
    """
    if emb.ndim != 3 or tuple(mask.shape) != tuple(emb.shape[:2]):
        raise ValueError(f"gather_padded expects emb (B, L, D) and mask (B, L); got {tuple(emb.shape)} "
                         f"and {tuple(mask.shape)}")
    if not is_distributed():
        return emb, mask
    from torch.distributed.nn.functional import all_gather as differentiable_all_gather

    world = dist.get_world_size()
    b, length, d = emb.shape
    sizes = torch.tensor([b, length, d], dtype=torch.long, device=_comm_device())
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    table = torch.stack(all_sizes).cpu()  # (W, 3)
    if (table[:, 0] != b).any() or (table[:, 2] != d).any():
        raise ValueError("gather_padded needs the same batch size and dim on every rank; got (B, L, D) per rank "
                         f"{[tuple(t) for t in table.tolist()]} (drop the last incomplete batch: drop_last=True)")
    lmax = int(table[:, 1].max())
    if length < lmax:
        emb = F.pad(emb, (0, 0, 0, lmax - length))  # (B, Lmax, D), zeros
        mask = F.pad(mask, (0, lmax - length))  # (B, Lmax), False / 0
    parts = differentiable_all_gather(emb.contiguous())  # W x (B, Lmax, D)
    gathered = torch.cat(parts, dim=0)  # (W*B, Lmax, D)
    mask_wire = mask.detach().to(torch.uint8).contiguous()  # bool is not supported by every backend
    mask_parts = [torch.empty_like(mask_wire) for _ in range(world)]
    dist.all_gather(mask_parts, mask_wire)
    gathered_mask = torch.cat(mask_parts, dim=0).to(mask.dtype)  # (W*B, Lmax)
    return gathered, gathered_mask


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order (e.g. page keys to build a cross-rank `exclude`)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average `.grad` of the trainable params across ranks, in place (one flat buffer per dtype/device).

    Params with requires_grad=False are skipped (the same on every rank, as the model is the same).
    A trainable param whose grad is None on some ranks (unused there) counts as zero on those ranks;
    it gets the averaged grad on every rank if any rank had one, and stays None everywhere otherwise,
    so optimizer states never diverge. Every rank must call this. No-op when not distributed.
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    params = [p for p in params if p.requires_grad]
    groups: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    # The same ordering on every rank: dict insertion order follows the params' order.
    for (dtype, device), group in groups.items():
        start = 0
        while start < len(group):
            chunk: list = []
            n = 0
            while start < len(group) and (not chunk or n + group[start].numel() <= _BUCKET_ELEMENTS):
                chunk.append(group[start])
                n += group[start].numel()
                start += 1
            flat = torch.zeros(n + len(chunk), dtype=dtype, device=device)  # grads, then one has-grad flag each
            pos = 0
            for i, p in enumerate(chunk):
                if p.grad is not None:
                    flat[pos:pos + p.numel()].copy_(p.grad.reshape(-1))
                    flat[n + i] = 1
                pos += p.numel()
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            pos = 0
            for i, p in enumerate(chunk):
                if flat[n + i] > 0:
                    avg = flat[pos:pos + p.numel()].view_as(p).div_(world)
                    if p.grad is None:
                        p.grad = avg.clone()
                    else:
                        p.grad.copy_(avg)
                pos += p.numel()


def all_reduce_mean(x: float) -> float:
    """Mean of a Python number over ranks (e.g. the logged loss); x itself when not distributed."""
    if not is_distributed():
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's picklable object on every rank (e.g. a run directory name); obj when not distributed."""
    if not is_distributed():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (safe to call when none exists).

    Collects garbage first: a finished collective's work object still referenced from Python would otherwise be freed
    by a gloo thread during interpreter shutdown, where taking the GIL aborts the process (SIGABRT, "terminate called
    without an active exception") after all the work is done.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
