#!/usr/bin/env python
"""Train ColIntern: a projection head (+ optional LoRA) on InternVL3.5 / Qwen3-VL for late-interaction retrieval.

Phase 1, in-batch negatives (docs/CONTRACT.md §5, §7):
    python train.py --model_id OpenGVLab/InternVL3_5-1B-Instruct --train_hub vidore/colpali_train_set \\
        --batch_size 4 --grad_accum 4 --epochs 1 --lr 5e-5 --lora --optimizer paged_adamw_8bit --save_every 50
Phase 2, mined hard negatives (mine.py's output), continuing from phase 1's weights:
    python train.py --model_id OpenGVLab/InternVL3_5-1B-Instruct --train_jsonl outputs/mine/mined_triples.jsonl \\
        --resume_ckpt outputs/train/colintern_heads_epoch1.pt --batch_size 8 --grad_accum 4
Multi-GPU (data parallel; page embeddings are all-gathered so every query sees every rank's pages):
    torchrun --nproc_per_node 4 train.py ...   or   accelerate launch --multi_gpu --num_processes 4 train.py ...
(without GPUs the same commands run CPU processes over gloo).

Modes: without --lora only the head is trained; the backbone (and any LoRA loaded from --resume_ckpt) is
frozen, so hidden states are cached (--cache_mem_gb / --cache_disk_gb) and later epochs skip the backbone.
With --lora, LoRA adapters on the language model's linear layers are trained together with the head.

--resume_ckpt: a checkpoint of the same phase (same data, same arguments) continues exactly where it stopped
(optimizer, schedule, data position, RNG); a checkpoint of another phase (e.g. the in-batch epoch-1 file when
training on --train_jsonl) starts a new phase from its weights: fresh optimizer and schedule, step and epoch
numbers continue, and the file resumed from is never overwritten.

Outputs in --out_dir: colintern_heads_step{N}.pt every --save_every steps, colintern_heads_epoch{E}.pt at each
epoch end, training_loss.txt (one line per --log_every steps) and metrics.jsonl (one object per step).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from colintern.cli import parse_config, run_cli, setup_logging  # noqa: E402
from colintern.settings import TrainConfig, task_flag  # noqa: E402

log = logging.getLogger("colintern.train")
OUT_FLAG = "--out_dir"  # named in one-line errors about the output location (full disk, ...)


def parse_args(argv: list[str] | None) -> TrainConfig:
    """train.py's flags (and --config FILE) as a TrainConfig; --task itr has its own (main() dispatches)."""
    return parse_config(TrainConfig, argv, __doc__, extra=task_flag)


def device_flag(argv: list[str] | None) -> str:
    """The spelling of the device flag the user typed, for error messages (--device_map is the seed's)."""
    given = sys.argv[1:] if argv is None else [str(a) for a in argv]
    return "--device_map" if any(a.startswith("--device_map") for a in given) else "--device"


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else [str(a) for a in argv]
    task = argparse.ArgumentParser(add_help=False)
    task_flag(task)
    if task.parse_known_args(given)[0].task == "itr":  # seed 004: its own flags (train.py --task itr --help)
        from colintern.itr.train import main as itr_main

        return itr_main(given)
    config = parse_args(argv)
    setup_logging(config.verbose, quiet=int(os.environ.get("RANK", "0") or 0) > 0)  # ranks > 0: warnings only
    from colintern.train.trainer import train  # torch: after the flags are checked (and --help printed)

    summary = train(config, device_flag=device_flag(argv))
    if summary is not None:  # rank 0 prints the summary line
        print(summary, flush=True)
    return 0


def console() -> None:
    """The command line: one-line errors, the exit status (`python train.py`, `colintern-train`)."""
    sys.exit(run_cli(main, out_flag=OUT_FLAG))


if __name__ == "__main__":
    console()
