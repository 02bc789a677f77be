"""Helpers shared by the bench/ scripts: what machine a number was measured on, the load it shared the machine
with, device timing, peak memory, a plain-text table and the JSON file every script writes.

Every benchmark result carries `env()` (date, device, library versions) and the load average before and after,
because other jobs share the development machine and a number without its load is not comparable.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]

# colintern comes from the installed package (make venv installs this checkout editable); on a machine without it,
# run from the repository root with PYTHONPATH=. (make gpu-suite does). No sys.path edit here.
from colintern.retriever.scoring import exact_fp32  # noqa: E402


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"


def versions() -> dict[str, str | None]:
    """torch / transformers / peft / faiss / flash-attn versions (None when not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda}
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its import logs 6 INFO lines
    for name in ("transformers", "peft", "faiss", "flash_attn"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken optional package
            out[name] = None
    return out


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages (other jobs share this machine: record them with every number)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def env(device: torch.device) -> dict[str, Any]:
    return {"date": date.today().isoformat(), "device": device_name(device), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), **versions()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(wall seconds, result) of one call, with the device synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 3) -> float:
    """Best TFLOP/s of a plain square matmul in `dtype`: the device's measured ceiling for MFU.

    On a shared machine measure it more than once (e.g. before and after the benchmark) and keep the best:
    a busy moment lowers it, and a low ceiling inflates utilisation."""
    n = n or (8192 if device.type == "cuda" else 4096)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    # An fp32 ceiling must be true fp32: keep TF32 off on CUDA while measuring it (the one guard of scoring).
    guard = exact_fp32(device) if dtype == torch.float32 else contextlib.nullcontext()
    with guard:
        torch.mm(a, b, out=c)  # warm-up
        best = min(timed(lambda: torch.mm(a, b, out=c), device)[0] for _ in range(repeats))
    return 2 * n**3 / best / 1e12


def fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec) if not isinstance(value, str) else value


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Print rows as a fixed-width table; columns = (key, header, format spec). Returns the text."""
    cells = [[fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | Path, result: dict[str, Any]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}", flush=True)
    return out
