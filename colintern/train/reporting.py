"""train.py --report_to: the metrics of every optimizer step, also sent to TensorBoard and/or Weights & Biases.

metrics.jsonl stays the record of truth (docs/CONTRACT.md §8); these are views of the same numbers, under the
names "train/<key>" and "eval/<metric>". Both packages are optional: asking for one that is not installed is a
one-line error. W&B honours its own environment (WANDB_PROJECT, WANDB_MODE=offline for a machine without
network: the run is stored under --out_dir/wandb and can be synced later).
"""
from __future__ import annotations

import logging
import os
from typing import Any

from colintern.errors import UserError

log = logging.getLogger("colintern.train")

REPORTERS = ("none", "tensorboard", "wandb")


def scalar_name(key: str) -> str:
    """metrics.jsonl key -> dashboard name: eval_ndcg_at_5 -> eval/ndcg_at_5, loss -> train/loss."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


class Reporter:
    """Sends each step's metrics to the dashboards asked for (rank 0 only; the others pass kinds=[])."""

    def __init__(self, kinds: list[str], out_dir: str, run_name: str, run_id: str, config: dict[str, Any]):
        self.tensorboard = None
        self.wandb_run = None
        if "tensorboard" in kinds:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--report_to tensorboard needs the tensorboard package: pip install tensorboard") \
                    from None
            log_dir = os.path.join(out_dir, "tensorboard")
            self.tensorboard = SummaryWriter(log_dir=log_dir)
            log.info("reporting to TensorBoard: tensorboard --logdir %s", log_dir)
        if "wandb" in kinds:
            try:
                import wandb
            except ImportError:
                raise UserError("--report_to wandb needs the wandb package: pip install wandb (WANDB_MODE=offline "
                                "works without network)") from None
            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "colintern"), name=run_name,
                                        id=run_id, resume="allow", dir=out_dir, config=config)
            log.info("reporting to Weights & Biases (%s mode): run %s", os.environ.get("WANDB_MODE", "online"),
                     run_id)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        scalars = {scalar_name(k): float(v) for k, v in metrics.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
