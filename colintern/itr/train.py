"""train.py --task itr: the seed-004 heads on a frozen backbone, single-stage or two-stage (docs/CONTRACT.md §12).

    python train.py --task itr --model_id M --train_itr scenes/train/itr.jsonl --out_dir outputs/itr/stage1 --stage 1
    python train.py --task itr ... --out_dir outputs/itr/stage2 --stage 2 --resume_ckpt outputs/itr/stage1/...epoch3.pt
    python train.py --task itr ... --out_dir outputs/itr/single --stage single

Stages: 1 = image-text contrastive (ITC) only; 2 = ITC + matching (ITM, hard negatives from the ITC similarities) +
box regression (L1 + GIoU) + relation classification, starting from a stage-1 checkpoint as a new phase (fresh
optimizer and schedule, its weights); single = every loss from step 1. The backbone is frozen: every image, caption
and phrase goes through it once, before step 1, and the steps train the heads only (float32). Every step appends a
row to metrics.jsonl (loss, each loss, the temperature, lr, pairs/s); checkpoints are colintern_heads_epoch{E}.pt
(and _step{N}.pt with --save_every) holding the heads, their config, the optimizer, the schedule and the position;
a resumed run of the same phase continues bit for bit (the ITM negatives of step N are drawn from a generator seeded
by (seed, N), the epoch order from (seed, epoch)).
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterator

import torch

from colintern.train.loop import run_loop
from colintern.train.step import optimizer_step
from colintern.cli import parse_config, save_config
from colintern.settings import ItrTrainConfig, task_flag
from colintern.itr.losses import (box_losses, clamp_temperature_, itc_loss, itm_loss, relation_loss,
                                  sample_itm_negatives)
from colintern.itr.prepare import PreparedItr

log = logging.getLogger("colintern.train")

CONFIG_FILE = "itr_config.yaml"  # the resolved settings of the newest run in --out_dir


def parse_args(argv: list[str] | None) -> ItrTrainConfig:
    """train.py --task itr's flags (and --config FILE) as an ItrTrainConfig."""
    return parse_config(ItrTrainConfig, argv, __doc__, extra=task_flag)


class ItrTrainer(PreparedItr):
    """One phase of seed-004 training on cached backbone features."""

    # -- training ----------------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.items), generator=g)

    def states(self, rows: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(image, caption, caption keep, phrase, phrase keep) states of a batch: cached when the backbone is frozen,
        else a forward with gradients through the LoRA adapters."""
        if not self.config.lora:
            return (self.image_states[rows], self.text_states[items], self.text_keep[items],
                    self.phrase_states[rows], self.phrase_keep[rows])
        f = self.features
        image = f.images([self.images[r] for r in rows.tolist()], grad=True)
        text, keep = f.texts([self.captions[i] for i in items.tolist()], grad=True)
        phrase, phrase_keep = f.texts([self.phrases[r] for r in rows.tolist()], grad=True)
        return image, text, keep, phrase, phrase_keep

    def step_losses(self, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Every loss of this stage on one batch of caption items."""
        heads, dev = self.heads, self.device
        rows = torch.tensor([self.items[i][0] for i in batch.tolist()], device=dev)
        items = batch.to(dev)
        image, text, keep, phrase, phrase_keep = self.states(rows, items)
        keys = [self.keys[i] for i in batch.tolist()]
        exclude = torch.tensor([[a == b for b in keys] for a in keys], device=dev)  # same meaning: not a negative
        out: dict[str, torch.Tensor] = {}
        out["itc"], logits = itc_loss(heads.image_vectors(image), heads.text_vectors(text, keep), heads.temperature,
                                      exclude)
        if "itm" in self.losses:
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 7919 * step)
            weights = logits if self.config.itm_negatives == "hard" else torch.zeros_like(logits)
            neg_image, neg_text = (t.to(dev) for t in sample_itm_negatives(weights, exclude, g))
            ok_i, ok_t = neg_image >= 0, neg_text >= 0
            fused = torch.cat([
                heads.fusion(image, text, keep),                                   # B matching pairs
                heads.fusion(image[neg_image[ok_i]], text[ok_i], keep[ok_i]),      # a wrong image per caption
                heads.fusion(image[ok_t], text[neg_text[ok_t]], keep[neg_text[ok_t]])])  # a wrong caption per image
            out["itm"] = itm_loss(heads.itm(fused), len(batch))
        if "box" in self.losses or "rel" in self.losses:
            subject, obj, rel_logits = heads.ground(heads.fusion(image, phrase, phrase_keep))
            valid = self.has_boxes[rows]
            pred, target = torch.cat([subject, obj]), torch.cat([self.subject_box[rows], self.object_box[rows]])
            boxes = box_losses(pred, target, torch.cat([valid, valid]))
            out["box_l1"], out["box_giou"] = boxes["box_l1"], boxes["box_giou"]
            labels = self.relation[rows]
            out["rel"] = relation_loss(rel_logits, labels.clamp_min(0), labels >= 0)
        return out

    def run(self) -> str:
        """Train to the end of the phase (the one training loop, colintern/train/loop.py); returns the summary."""
        from colintern.train.reporting import Reporter

        config, state = self.config, self.state
        for path in self.to_remove:
            path.unlink(missing_ok=True)
        self._trim_metrics()
        self._write_run_info()
        save_config(config, self.out / CONFIG_FILE, "train.py --task itr")
        reporter = Reporter([k for k in config.report_to if k != "none"], str(self.out),
                            f"{self.out.name}-phase{state.phase}", f"{self.out.name}-{state.fingerprint[:12]}",
                            {k: v for k, v in config.to_dict().items() if isinstance(v, (str, int, float, bool))})
        t_start = time.perf_counter()
        self.last_row: dict[str, Any] = {}  # the last step's metrics (none yet when a resume lands on an epoch's end)
        run_loop(self, total=state.steps, initial=state.step, desc=f"phase {state.phase} (stage {state.stage})",
                 out_dir=str(self.out), reporter=reporter)
        reporter.close()
        wall = time.perf_counter() - t_start
        from colintern.device import peak_memory_gib

        peak, kind = peak_memory_gib(self.device)
        self._write_run_info({"peak_mem_gib": round(peak, 3), "peak_mem_kind": kind})
        return (f"done: phase {state.phase} (stage {state.stage}), {state.step} steps, {state.epoch} epoch(s) in "
                f"{wall:.1f} s; last checkpoint {self.out / f'colintern_heads_epoch{state.epoch}.pt'}")

    def steps(self) -> Iterator[dict[str, Any]]:
        """The phase's remaining steps, epoch by epoch (each epoch ends with its checkpoint, also when --max_steps
        stops the phase inside it); each step's metrics."""
        config, state = self.config, self.state
        per_epoch = len(self.items) // config.batch_size
        while state.step < state.steps:
            order = self.epoch_order(state.epoch)
            while state.position < per_epoch and state.step < state.steps:
                batch = order[state.position * config.batch_size:(state.position + 1) * config.batch_size]
                self.last_row = self.train_step(batch)
                yield self.last_row
            state.epoch += 1
            state.position = 0
            self.save(f"colintern_heads_epoch{state.epoch}.pt", state.step == state.steps)

    def checkpoints_due(self) -> list[tuple[str, bool]]:
        """Every --save_every steps (the epoch checkpoints are written by steps() at each epoch's end)."""
        step, every = self.state.step, self.config.save_every
        return [(f"colintern_heads_step{step}.pt", step == self.state.steps)] if every and step % every == 0 else []

    def postfix(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"epoch": row["epoch"], "loss": f"{row['loss']:.4f}", "pairs_s": f"{row['pairs_per_s']:.0f}"}

    def train_step(self, batch: torch.Tensor) -> dict[str, Any]:
        """One optimizer step on a batch of caption items; returns its metrics.jsonl row."""
        config, state = self.config, self.state
        t0 = time.perf_counter()
        parts = self.step_losses(batch, state.step)
        loss = sum(config.weights[name] * value for name, value in parts.items())
        assert isinstance(loss, torch.Tensor)  # every stage has the ITC loss
        loss.backward()
        optimizer_step(self.optimizer, self.scheduler, self.trainable, float(loss.detach()), step=state.step + 1,
                       max_grad_norm=None, where=f"at step {state.step + 1}; stopped without saving (lower --lr or "
                                                 "check the data)")
        clamp_temperature_(self.heads.temperature, *config.temp_range)
        state.step += 1
        state.position += 1
        seconds = time.perf_counter() - t0
        return {"step": state.step, "epoch": state.epoch + 1, "phase": state.phase, "stage": state.stage,
                "loss": float(loss.detach()), **{f"loss_{k}": float(v.detach()) for k, v in parts.items()},
                "temp": float(self.heads.temperature.detach()), "lr": self.scheduler.get_last_lr()[0],
                "seconds": seconds, "pairs_per_s": len(batch) / max(seconds, 1e-9)}

    def _trim_metrics(self) -> None:
        """A resumed phase drops the rows logged after its checkpoint (they are computed again)."""
        from colintern.files import atomic_write_text

        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line of a killed run
            if row.get("phase", 1) < self.state.phase or (row.get("phase") == self.state.phase
                                                          and row["step"] <= self.state.step):
                kept.append(line)
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def save(self, name: str, done: bool) -> None:
        """Write checkpoint `name` into --out_dir: the heads, their config, LoRA, the training state, the mean-box
        prior and the last step's metrics (`done`: the phase's last checkpoint, recorded by the state itself)."""
        metrics = self.last_row
        from dataclasses import asdict

        from colintern.retriever.checkpoint import FORMAT_VERSION, atomic_torch_save

        payload = {"format_version": FORMAT_VERSION, "task": "itr", "config": self.model.config.to_dict(),
                   "itr": self.cfg.to_dict(), "itr_heads": self.heads.state_dict(),
                   "lora": None if self.model.lora_config is None else {"config": dict(self.model.lora_config),
                                                                        "state": self.model.lora_state()},
                   "training": {**asdict(self.state), "optimizer": self.optimizer.state_dict(),
                                "scheduler": self.scheduler.state_dict()},
                   "box_prior": {"subject": self.subject_box[self.has_boxes].mean(0).tolist(),
                                 "object": self.object_box[self.has_boxes].mean(0).tolist()}
                   if bool(self.has_boxes.any()) else None,
                   "metrics": metrics}
        atomic_torch_save(payload, str(self.out / name))

    def _write_run_info(self, peak: dict[str, Any] | None = None) -> None:
        from colintern.files import atomic_write_json

        trainable = sum(p.numel() for p in self.heads.parameters()) + sum(p.numel() for p in self.lora_params
                                                                          if self.config.lora)
        frozen = sum(p.numel() for p in self.model.backbone.parameters()) - (
            sum(p.numel() for p in self.lora_params) if self.config.lora else 0)
        atomic_write_json(self.out / "run_info.json", {
            "task": "itr", "stage": self.state.stage, "phase": self.state.phase, "model_id": self.config.model_id,
            "train_itr": self.config.train_itr, "rows": len(self.rows), "captions": len(self.items),
            "trainable_params": trainable, "total_params": trainable + frozen, "image_tokens": self.cfg.image_tokens,
            "feature_seconds": round(self.feature_seconds, 2), "itr": self.cfg.to_dict(), **(peak or {}),
            "args": {k: v for k, v in self.config.to_dict().items() if isinstance(v, (str, int, float, bool, type(None)))}})


def main(argv: list[str]) -> int:
    from colintern.cli import setup_logging
    from colintern.device import torch_threads

    config = parse_args(argv)
    setup_logging(config.verbose)
    with torch_threads(config.threads):
        print(ItrTrainer(config).run(), flush=True)
    return 0
