"""Settings shared by several commands: the model, the checkpoint, the device, logging."""
from __future__ import annotations

from dataclasses import dataclass

from colintern.cli import Options, option


DTYPES = ("auto", "fp32", "bf16", "fp16")


MAX_DPI = 1200  # PDF rendering resolution: pages are resized to the model's tiles, so 150 is plenty


@dataclass(frozen=True, kw_only=True)
class ModelOptions(Options):
    """model and data"""

    model_id: str = option(help="base model: hub id or local directory (InternVL3.5, original internvl_chat or "
                                "transformers-native, or Qwen3-VL); with a checkpoint, the one it was trained on "
                                "(eval.py and search.py default to the base model the checkpoint names)")
    allow_other_base: bool = option(False, help="use a checkpoint on a base model of the same architecture but other "
                                               "weights than the one it was trained on (default: refuse; the "
                                               "checkpoint records its base weights)")


@dataclass(frozen=True, kw_only=True)
class CheckpointOptions(Options):
    """model"""

    ckpt: str | None = option(None, help="ColIntern checkpoint (colintern_heads_*.pt): head, LoRA and formatting. "
                                         "Without it the base model with a freshly initialised, untrained head is used "
                                         "(a warning says so; eval.py: a baseline)")


@dataclass(frozen=True, kw_only=True)
class DeviceOptions(Options):
    """hardware"""

    device: str = option("auto", flags=("--device_map",),
                         help="cpu, cuda, cuda:N or auto (CUDA when available; --device_map is the seed's name). "
                              "Asking for CUDA on a machine without it is an error. Under torchrun each process "
                              "uses cuda:LOCAL_RANK")
    dtype: str = option("auto", choices=DTYPES, help="backbone dtype (default: bf16 on CUDA, fp32 on CPU); head "
                                                     "and LoRA stay fp32")
    use_flash_attn: bool = option(False, help="flash-attention 2 (CUDA, flash-attn installed); otherwise a warning "
                                              "and sdpa")
    threads: int | None = option(None, at_least=1, help="torch intra-op threads of the process (default: torch's "
                                 "default, one per core). On a busy, shared CPU small models can run several times "
                                 "faster with 1; on a quiet one the default is faster (docs/BENCHMARKS.md). "
                                 "Irrelevant on a GPU")
    num_workers: int = option(2, at_least=0, help="workers decoding and tiling images: DataLoader processes (--task "
                                                  "itr: threads, before the features are computed, default 0); 0 = in "
                                                  "the main process")


@dataclass(frozen=True, kw_only=True)
class LogOptions(Options):
    """logging"""

    verbose: bool = option(False, flags=("-v",), help="log details (default: progress and results; the plot "
                                                      "scripts: warnings only)")
