"""What a resume needs besides the weights: RNG states, the phase fingerprint, the two logs (training_loss.txt
and metrics.jsonl, docs/CONTRACT.md §8) trimmed to the resume point, and the test-only fault injection."""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from colintern.files import atomic_write_text, note_path, sha1_of_parts


log = logging.getLogger("colintern.train")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        # the training device's generator only: a resume may see fewer (or other) GPUs than were visible here
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # checkpoints before: one state per GPU visible then
            index = torch.cuda.current_device()
            if index >= len(cuda):
                log.warning("the checkpoint holds CUDA RNG states for %d GPU(s), none for cuda:%d: dropout draws "
                            "differ from an uninterrupted run", len(cuda), index)
                cuda = None
            else:
                cuda = cuda[index]
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)  # the current (training) device
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state({"bit_generator": npst["bit_generator"],
                         "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
                         "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


LOSS_TXT = "training_loss.txt"


METRICS_JSONL = "metrics.jsonl"


def format_loss_line(step: int, epoch: int, loss: float, lr: float, grad_norm: float, pairs_per_s: float) -> str:
    return (f"step {step} | epoch {epoch} | loss {loss:.6f} | lr {lr:.3e} | grad_norm {grad_norm:.4f} | "
            f"pairs/s {pairs_per_s:.1f}")


def _line_step(line: str, is_json: bool) -> int | None:
    try:
        if is_json:
            return int(json.loads(line)["step"])
        if line.startswith("step "):
            return int(line.split("|", 1)[0].split()[1])
    except (ValueError, KeyError, IndexError, json.JSONDecodeError):
        return None
    return None


def prepare_logs(out_dir: str, resume_step: int | None) -> None:
    """Start fresh logs (resume_step None) or keep only steps <= resume_step, so a resumed run appends without
    duplicating the steps it repeats. Notes (lines starting with '# ') are kept."""
    for name, is_json in ((LOSS_TXT, False), (METRICS_JSONL, True)):
        path = Path(out_dir) / name
        if resume_step is None or not path.exists():
            path.write_text("", encoding="utf-8")
            continue
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            step = _line_step(line, is_json)
            if step is None and (is_json or not line.startswith("# ")):
                continue  # a half-written last line of a killed run
            if step is None or step <= resume_step:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def append_line(out_dir: str, name: str, line: str) -> None:
    path = Path(out_dir) / name
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
    except OSError as err:
        raise note_path(err, path)


@dataclass
class Fingerprint:
    """What a checkpoint's training state must match to continue the same phase."""

    phase_id: str
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> str:
        return sha1_of_parts(self.phase_id, self.args)


def diff_args(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [f"--{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


# Arguments that change what training computes: a checkpoint continues the same phase only if they match.
PHASE_ARGS = ("batch_size", "grad_accum", "epochs", "lr", "seed", "loss", "tau", "warmup_ratio", "weight_decay",
              "max_grad_norm", "max_steps", "fn_filter", "lora", "lora_r", "lora_alpha", "lora_dropout",
              "lora_vision", "optimizer", "grad_cache", "auto_batch", "auto_max_batch", "auto_target_frac", "dtype")


@dataclass
class Phase:
    """What a phase is: its identity (data + arguments), where it started and how it is cut into steps."""

    id: str                 # identity of the data (kind + content hash)
    fingerprint: str        # hash of the data identity and PHASE_ARGS: a resume must match it
    args: dict[str, Any]    # the PHASE_ARGS values (to say which ones differ)
    index: int              # 1 for the first phase of a model, 2 for the next, ...
    kind: str               # "hub" (in-batch negatives) or "jsonl" (in-batch + hard negatives)
    start_step: int         # global optimizer step the phase started at
    start_epoch: int
    steps: int              # optimizer steps of the whole phase
    steps_per_epoch: int
    batch_size: int         # micro-batch per process (auto_batch may have chosen it)
    world_size: int

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Phase":
        return cls(**{f.name: values[f.name] for f in fields(cls)})


@dataclass
class TrainingState:
    """How far a phase got. Counters move during the run; the state dicts are filled when a checkpoint is written
    or read."""

    phase: Phase
    step: int                # global optimizer steps done (across phases)
    phase_step: int          # steps done in this phase
    epoch: int               # current epoch number (global, 1-based)
    epoch_position: int      # steps done in the current epoch
    phase_done: bool = False
    skipped: int = 0         # bad rows reported so far
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    rng: list[dict[str, Any]] | None = None  # one RNG state per rank
    # What every phase so far trained on (mteb's training_datasets); None: unknown (a phase before it was recorded).
    datasets: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # shallow: state dicts are not copied
        values["phase"] = self.phase.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainingState":
        known = {f.name for f in fields(cls)} - {"phase"}
        return cls(phase=Phase.from_dict(values["phase"]), **{k: v for k, v in values.items() if k in known})
