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

import argparse
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from colintern.errors import UserError
from colintern.itr import (Features, ItrConfig, ItrHeads, ItrRow, load_backbone_for_itr, open_images, read_rows,
                           restore_lora)
from colintern.itr_losses import (box_losses, clamp_temperature_, itc_loss, itm_loss, relation_loss,
                                  sample_itm_negatives)

log = logging.getLogger("colintern.train")

STAGE_LOSSES = {"1": ("itc",), "2": ("itc", "itm", "box", "rel"), "single": ("itc", "itm", "box", "rel")}
DEFAULT_WEIGHTS = {"itc": 1.0, "itm": 1.0, "box_l1": 0.1, "box_giou": 0.1, "rel": 0.1}  # the seed's (GIoU added)
PHASE_ARGS = ("stage", "epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "loss_weights", "itm_negatives",
              "max_steps", "seed", "lora", "lora_r", "lora_alpha")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py --task itr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["itr"], default="itr", help="itr: image-text retrieval with multi-task heads")
    p.add_argument("--model_id", required=True, help="base model: hub id or local directory (frozen)")
    p.add_argument("--train_itr", required=True, help="rows {image, caption(s), phrase, subject, object, relation} "
                   "(docs/CONTRACT.md §12), e.g. python -m colintern.scenes OUT writes OUT/train/itr.jsonl; or a COCO "
                   "captions JSON (with --coco_images)")
    p.add_argument("--coco_images", default=None, help="with a COCO captions JSON as --train_itr: its image folder")
    p.add_argument("--coco_instances", default=None, help="with a COCO captions JSON: its instances JSON (the two "
                   "largest boxes train the box head; COCO has no relation labels)")
    p.add_argument("--out_dir", default="outputs/itr", help="checkpoints and logs (default: outputs/itr)")
    p.add_argument("--stage", choices=["1", "2", "single"], default="single", help="1: ITC only; 2: every loss, from "
                   "a stage-1 --resume_ckpt; single: every loss from step 1 (default: single)")
    p.add_argument("--epochs", type=int, default=6, help="epochs (default: 6)")
    p.add_argument("--max_steps", type=int, default=0, help="stop after N steps (default: 0 = all epochs)")
    p.add_argument("--batch_size", type=int, default=32, help="captions per step = in-batch candidates (default: 32)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, AdamW (default: 1e-4, the seed's)")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (default: 0.01)")
    p.add_argument("--warmup_ratio", type=float, default=0.1, help="linear warm-up share of the steps (default: 0.1)")
    p.add_argument("--loss_weights", default="itc=1,itm=1,box_l1=0.1,box_giou=0.1,rel=0.1",
                   help="weights of the stage's losses (default: %(default)s, the seed's with GIoU added)")
    p.add_argument("--itm_negatives", choices=["hard", "random"], default="hard", help="ITM negatives drawn from the "
                   "ITC softmax (ALBEF/BLIP) or uniformly (default: hard)")
    p.add_argument("--temp_init", type=float, default=0.07, help="initial ITC temperature (default: 0.07)")
    p.add_argument("--temp_bounds", default="0.001,0.5", help="the temperature is clamped to LOW,HIGH after every "
                   "step (default: 0.001,0.5)")
    p.add_argument("--dim", type=int, default=256, help="ITC vector size (default: 256)")
    p.add_argument("--fusion_dim", type=int, default=256, help="fusion width (default: 256)")
    p.add_argument("--fusion_layers", type=int, default=2, help="fusion decoder layers (default: 2)")
    p.add_argument("--fusion_heads", type=int, default=4, help="fusion attention heads (default: 4)")
    p.add_argument("--image_size", type=int, default=None, help="images are resized to this square (default: the "
                   "backbone's tile size)")
    p.add_argument("--max_tiles", type=int, default=1, help="InternVL tiles of that square (default: 1; 4 = 2 x 2 + "
                   "thumbnail)")
    p.add_argument("--lora", action="store_true", help="also train LoRA adapters on the language model (every step "
                   "then runs the backbone; default: frozen, features computed once)")
    p.add_argument("--lora_r", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--lora_alpha", type=int, default=32, help="LoRA alpha (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the heads, the epoch order and the ITM draws "
                   "(default: 0)")
    p.add_argument("--save_every", type=int, default=0, help="also save colintern_heads_step{N}.pt every N steps "
                   "(default: 0 = epoch ends only)")
    p.add_argument("--resume_ckpt", default=None, help="an itr checkpoint (or latest): the same phase continues; "
                   "another (stage 2 after stage 1) starts from its weights")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out_dir")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row")
    p.add_argument("--device", "--device_map", dest="device", default="auto", help="cpu, cuda, cuda:N or auto "
                   "(--device_map is the seed's name) (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the training process "
                   "(default: torch's choice)")
    p.add_argument("--num_workers", type=int, default=0, help="threads decoding the images before the features "
                   "are computed (default: 0, in the main thread)")
    p.add_argument("--report_to", nargs="+", choices=["none", "tensorboard", "wandb"], default=["none"],
                   help="also send every step's metrics to TensorBoard and/or Weights & Biases (the seed's --use_wandb; "
                   "WANDB_MODE=offline works); metrics.jsonl is always written (default: none)")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "dim", "fusion_dim", "fusion_layers", "fusion_heads", "max_tiles"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must not be negative, got {args.num_workers}")
    if args.batch_size < 2:
        raise UserError("--batch_size must be at least 2: the contrastive loss needs in-batch negatives")
    args.weights = parse_weights(args.loss_weights)
    try:
        low, high = (float(v) for v in args.temp_bounds.split(","))
    except ValueError:
        raise UserError(f"--temp_bounds {args.temp_bounds!r}: expected LOW,HIGH") from None
    if not 0 < low < high:
        raise UserError(f"--temp_bounds {args.temp_bounds}: need 0 < LOW < HIGH")
    args.temp_range = (low, high)
    if args.stage == "2" and not args.resume_ckpt:
        raise UserError("--stage 2 starts from a stage-1 checkpoint: pass --resume_ckpt (or use --stage single)")
    return args


def parse_weights(text: str) -> dict[str, float]:
    weights = dict(DEFAULT_WEIGHTS)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in weights:
            raise UserError(f"--loss_weights: unknown loss {name!r} (one of {', '.join(weights)})")
        try:
            weights[name] = float(value)
        except ValueError:
            raise UserError(f"--loss_weights: {item!r} is not NAME=NUMBER") from None
    return weights


@dataclass
class ItrState:
    """Where training stands (the checkpoint's "training" section)."""
    phase: int = 1
    stage: str = "single"
    step: int = 0                 # steps of this phase done
    epoch: int = 0                # epochs of this phase completed
    position: int = 0             # steps done inside the current epoch
    steps: int = 0                # steps of the whole phase
    fingerprint: str = ""


class ItrTrainer:
    """One phase of seed-004 training on cached backbone features."""

    def __init__(self, args: argparse.Namespace):
        from colintern.data import SkipReport
        from colintern.device import resolve_device
        from colintern.trainer import prepare_out_dir

        self.args = args
        self.to_remove = prepare_out_dir(args)
        self.out = Path(args.out_dir)
        self.device = resolve_device(args.device)
        self.report = SkipReport(strict=args.strict, logger=log)
        self.rows: list[ItrRow] = read_rows(args.train_itr, self.report, args.coco_images, args.coco_instances)
        payload = self._resume_payload()
        cfg = ItrConfig.from_dict(payload["itr"]) if payload else ItrConfig(
            dim=args.dim, fusion_dim=args.fusion_dim, fusion_layers=args.fusion_layers,
            fusion_heads=args.fusion_heads, image_size=args.image_size or 0, max_tiles=args.max_tiles,
            temp_init=args.temp_init, seed=args.seed)
        self.model, self.cfg = self._backbone(cfg, payload)
        self.heads = ItrHeads(self.model.config.hidden_size, self.cfg).to(self.device)
        self.lora_params: list[torch.nn.Parameter] = []
        if payload and payload.get("lora"):
            restore_lora(self.model, payload["lora"])
        elif args.lora:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)  # LoRA's A matrices: seeded, the caller's RNG untouched
                self.model.add_lora(r=args.lora_r, lora_alpha=args.lora_alpha,
                                    lora_dropout=0.0)  # no dropout: steps stay reproducible
        if self.model.lora_config is not None:
            self.lora_params = [p for n, p in self.model.backbone.named_parameters() if "lora_" in n]
            for p in self.lora_params:
                p.requires_grad_(args.lora)
        self.items = [(r, c) for r, row in enumerate(self.rows) for c in range(len(row.captions))]
        self.keys = [self.rows[r].key for r, _ in self.items]
        self.losses = STAGE_LOSSES[args.stage]
        self.state = ItrState(stage=args.stage, fingerprint=self._fingerprint())
        self.state.steps = self._plan_steps()
        trainable = [*self.heads.parameters(), *(self.lora_params if args.lora else [])]
        self.optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
        warmup = math.ceil(args.warmup_ratio * self.state.steps)
        from colintern.training import lr_factor

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           partial(lr_factor, total=self.state.steps, warmup=warmup))
        if payload:
            self._load(payload)
        self._features()

    # -- set-up ------------------------------------------------------------------------------------------------
    def _resume_payload(self) -> dict[str, Any] | None:
        if not self.args.resume_ckpt:
            return None
        from colintern.checkpoint import load_checkpoint

        return load_checkpoint(self.args.resume_ckpt, task="itr")

    def _backbone(self, cfg: ItrConfig, payload: dict[str, Any] | None):
        if payload and payload["config"]["base_model"] != self.args.model_id:
            log.warning("--resume_ckpt was trained on %s; continuing on --model_id %s",
                        payload["config"]["base_model"], self.args.model_id)
        return load_backbone_for_itr(self.args.model_id, cfg, self.device)

    def _fingerprint(self) -> str:
        args = self.args
        data = hashlib.sha256(Path(args.train_itr).read_bytes()).hexdigest()
        settings = {name: getattr(args, name) for name in PHASE_ARGS}
        settings["loss_weights"] = args.weights
        return hashlib.sha256(json.dumps([data, settings, self.cfg.to_dict()], sort_keys=True).encode()).hexdigest()

    def _plan_steps(self) -> int:
        per_epoch = len(self.items) // self.args.batch_size
        if per_epoch < 1:
            raise UserError(f"{len(self.items)} captions are fewer than one --batch_size {self.args.batch_size}")
        total = per_epoch * self.args.epochs
        return min(total, self.args.max_steps) if self.args.max_steps else total

    def _load(self, payload: dict[str, Any]) -> None:
        saved = payload["training"]
        self.heads.load_state_dict(payload["itr_heads"])
        if saved["fingerprint"] == self.state.fingerprint:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            for name in ("phase", "step", "epoch", "position"):
                setattr(self.state, name, saved[name])
            log.info("resuming phase %d (stage %s) at step %d of %d", self.state.phase, self.state.stage,
                     self.state.step, self.state.steps)
        else:
            self.state.phase = saved["phase"] + 1
            log.info("new phase %d (stage %s) from the weights of %s (stage %s): fresh optimizer and schedule",
                     self.state.phase, self.state.stage, self.args.resume_ckpt, saved["stage"])

    def _features(self) -> None:
        """Every image, caption and phrase through the frozen backbone, once."""
        t0 = time.perf_counter()
        features = Features(self.model, self.cfg)
        images = open_images(self.rows, self.args.num_workers)
        self.features, self.images = features, images
        self.captions = [self.rows[r].captions[c] for r, c in self.items]
        self.phrases = [row.phrase or row.captions[0] for row in self.rows]
        if not self.args.lora:  # frozen: every state once, then the steps only index them
            self.image_states = features.images(images).to(self.device)  # (N_rows, n_img, H)
            texts, keep = features.texts(self.captions)
            self.text_states, self.text_keep = texts.to(self.device), keep.to(self.device)  # (N_items, L, H)
            phrases, pkeep = features.texts(self.phrases)
            self.phrase_states, self.phrase_keep = phrases.to(self.device), pkeep.to(self.device)
        self.subject_box = torch.tensor([r.subject_box or [0.0] * 4 for r in self.rows], device=self.device)
        self.object_box = torch.tensor([r.object_box or [0.0] * 4 for r in self.rows], device=self.device)
        self.has_boxes = torch.tensor([r.subject_box is not None and r.object_box is not None for r in self.rows],
                                      device=self.device)
        self.relation = torch.tensor([-1 if r.relation is None else r.relation for r in self.rows], device=self.device)
        self.feature_seconds = time.perf_counter() - t0
        if not self.args.lora:
            log.info("backbone features of %d images and %d captions in %.1f s (frozen: computed once)",
                     len(self.rows), len(self.items), self.feature_seconds)

    # -- training ----------------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.items), generator=g)

    def states(self, rows: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(image, caption, caption keep, phrase, phrase keep) states of a batch: cached when the backbone is frozen,
        else a forward with gradients through the LoRA adapters."""
        if not self.args.lora:
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
            g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + 7919 * step)
            weights = logits if self.args.itm_negatives == "hard" else torch.zeros_like(logits)
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
        from colintern.training import append_line, fault

        args, state = self.args, self.state
        from colintern.reporting import Reporter

        for path in self.to_remove:
            path.unlink(missing_ok=True)
        self._trim_metrics()
        self._write_run_info()
        reporter = Reporter([k for k in args.report_to if k != "none"], str(self.out),
                            f"{self.out.name}-phase{state.phase}", f"{self.out.name}-{state.fingerprint[:12]}",
                            {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool))})
        from tqdm.auto import tqdm

        per_epoch = len(self.items) // args.batch_size
        t_start = time.perf_counter()
        row: dict[str, Any] = {}  # the last step's metrics (none yet when a resume lands on an epoch's end)
        with tqdm(total=state.steps, initial=state.step, desc=f"phase {state.phase} (stage {state.stage})",
                  unit="step", dynamic_ncols=True) as bar:
            while state.step < state.steps:
                order = self.epoch_order(state.epoch)
                while state.position < per_epoch and state.step < state.steps:
                    batch = order[state.position * args.batch_size:(state.position + 1) * args.batch_size]
                    row = self.train_step(batch)
                    append_line(str(self.out), "metrics.jsonl", json.dumps(row))
                    reporter.log(row, state.step)
                    bar.update(1)
                    bar.set_postfix(epoch=row["epoch"], loss=f"{row['loss']:.4f}", pairs_s=f"{row['pairs_per_s']:.0f}")
                    if args.save_every and state.step % args.save_every == 0:
                        self.save(f"colintern_heads_step{state.step}.pt", row)
                    fault("kill", state.step)
                state.epoch += 1
                state.position = 0
                self.save(f"colintern_heads_epoch{state.epoch}.pt", row)
        reporter.close()
        wall = time.perf_counter() - t_start
        from colintern.device import peak_memory_gib

        peak, kind = peak_memory_gib(self.device)
        self._write_run_info({"peak_mem_gib": round(peak, 3), "peak_mem_kind": kind})
        return (f"done: phase {state.phase} (stage {state.stage}), {state.step} steps, {state.epoch} epoch(s) in "
                f"{wall:.1f} s; last checkpoint {self.out / f'colintern_heads_epoch{state.epoch}.pt'}")

    def train_step(self, batch: torch.Tensor) -> dict[str, Any]:
        """One optimizer step on a batch of caption items; returns its metrics.jsonl row."""
        args, state = self.args, self.state
        t0 = time.perf_counter()
        parts = self.step_losses(batch, state.step)
        loss = sum(args.weights[name] * value for name, value in parts.items())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        clamp_temperature_(self.heads.temperature, *args.temp_range)
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

    def save(self, name: str, metrics: dict[str, Any]) -> None:
        from dataclasses import asdict

        from colintern.checkpoint import FORMAT_VERSION, atomic_torch_save

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
                                                                          if self.args.lora)
        frozen = sum(p.numel() for p in self.model.backbone.parameters()) - (
            sum(p.numel() for p in self.lora_params) if self.args.lora else 0)
        atomic_write_json(self.out / "run_info.json", {
            "task": "itr", "stage": self.state.stage, "phase": self.state.phase, "model_id": self.args.model_id,
            "train_itr": self.args.train_itr, "rows": len(self.rows), "captions": len(self.items),
            "trainable_params": trainable, "total_params": trainable + frozen, "image_tokens": self.cfg.image_tokens,
            "feature_seconds": round(self.feature_seconds, 2), "itr": self.cfg.to_dict(), **(peak or {}),
            "args": {k: v for k, v in vars(self.args).items() if isinstance(v, (str, int, float, bool, type(None)))}})


def main(argv: list[str]) -> int:
    from colintern.cli import setup_logging
    from colintern.device import torch_threads

    args = parse_args(argv)
    setup_logging(args.verbose)
    with torch_threads(args.threads):
        print(ItrTrainer(args).run(), flush=True)
    return 0
