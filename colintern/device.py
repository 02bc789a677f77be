"""One device policy for every script and the API: `auto` means CUDA when available, else the CPU; a device that is
asked for but absent is a one-line user error, never a silent CPU run."""
from __future__ import annotations

import contextlib
import re
import resource
from collections.abc import Iterator

import torch

from colintern.errors import UserError


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` (None: left as it is) for the block, then given back, so an
    in-process caller (tests, notebooks) keeps its own setting (train.py --threads, for both tasks)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(spec: str | torch.device | None = None, flag: str = "--device") -> str:
    """'auto'/None -> 'cuda' or 'cpu'; 'cpu', 'cuda', 'cuda:N', 'mps' are checked against this machine."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    want = (spec or "auto").strip().lower()
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", want):
        raise UserError(f"{flag} {spec!r}: use cpu, cuda, cuda:N or auto")
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {spec}: CUDA is not available on this machine; use {flag} cpu (or auto)")
        index = int(want.split(":")[1]) if ":" in want else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"{flag} {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    if want == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag} mps: Apple's MPS is not available on this machine; use {flag} cpu (or auto)")
    return want


def peak_memory_gib(device: str | torch.device) -> tuple[float, str]:
    """(GiB, what it is): CUDA max_memory_allocated since the last reset on a GPU, else the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"
