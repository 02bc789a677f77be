"""A seed-004 training phase made ready before its first step: the rows, the backbone (with LoRA when asked), the
heads (a checkpoint's, or new), the phase (continued or new) with its optimizer and schedule, and the backbone
features of every image, caption and phrase when the backbone is frozen. ItrTrainer (colintern/itr/train.py) runs it."""
from __future__ import annotations

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
from colintern.settings import ItrTrainConfig
from colintern.itr.model import (Features, ItrConfig, ItrHeads, ItrRow, load_backbone_for_itr, open_images, read_rows,
                           restore_lora)

log = logging.getLogger("colintern.train")


STAGE_LOSSES = {"1": ("itc",), "2": ("itc", "itm", "box", "rel"), "single": ("itc", "itm", "box", "rel")}
PHASE_ARGS = ("stage", "epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "loss_weights", "itm_negatives",
              "max_steps", "seed", "lora", "lora_r", "lora_alpha")


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


class PreparedItr:
    """A seed-004 training phase made ready before its first step: the rows, the backbone (with LoRA when asked), the"""

    def __init__(self, config: ItrTrainConfig):
        from colintern.data.report import SkipReport
        from colintern.device import resolve_device
        from colintern.train.outputs import prepare_out_dir

        resume_ckpt, self.to_remove = prepare_out_dir(config.out_dir, config.resume_ckpt, config.overwrite)
        self.config = config = config.replace(resume_ckpt=resume_ckpt)
        self.out = Path(config.out_dir)
        self.device = resolve_device(config.device)
        self.report = SkipReport(strict=config.strict, logger=log)
        self.rows: list[ItrRow] = read_rows(config.train_itr, self.report, config.coco_images, config.coco_instances)
        payload = self._resume_payload()
        cfg = ItrConfig.from_dict(payload["itr"]) if payload else ItrConfig(
            dim=config.dim, fusion_dim=config.fusion_dim, fusion_layers=config.fusion_layers,
            fusion_heads=config.fusion_heads, image_size=config.image_size or 0, max_tiles=config.max_tiles,
            temp_init=config.temp_init, seed=config.seed)
        self.model, self.cfg = self._backbone(cfg, payload)
        self.heads = ItrHeads(self.model.config.hidden_size, self.cfg).to(self.device)
        self.lora_params: list[torch.nn.Parameter] = []
        if payload and payload.get("lora"):
            restore_lora(self.model, payload["lora"])
        elif config.lora:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)  # LoRA's A matrices: seeded, the caller's RNG untouched
                self.model.add_lora(r=config.lora_r, lora_alpha=config.lora_alpha,
                                    lora_dropout=0.0)  # no dropout: steps stay reproducible
        if self.model.lora_config is not None:
            self.lora_params = [p for n, p in self.model.backbone.named_parameters() if "lora_" in n]
            for p in self.lora_params:
                p.requires_grad_(config.lora)
        self.items = [(r, c) for r, row in enumerate(self.rows) for c in range(len(row.captions))]
        self.keys = [self.rows[r].key for r, _ in self.items]
        self.losses = STAGE_LOSSES[config.stage]
        self.state = ItrState(stage=config.stage, fingerprint=self._fingerprint())
        self.state.steps = self._plan_steps()
        self.trainable = [*self.heads.parameters(), *(self.lora_params if config.lora else [])]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay)
        warmup = math.ceil(config.warmup_ratio * self.state.steps)
        from colintern.train.step import lr_factor

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           partial(lr_factor, total=self.state.steps, warmup=warmup))
        if payload:
            self._load(payload)
        self._features()

    # -- set-up ------------------------------------------------------------------------------------------------
    def _resume_payload(self) -> dict[str, Any] | None:
        if not self.config.resume_ckpt:
            return None
        from colintern.retriever.checkpoint import load_checkpoint

        return load_checkpoint(self.config.resume_ckpt, task="itr")

    def _backbone(self, cfg: ItrConfig, payload: dict[str, Any] | None):
        if payload and payload["config"]["base_model"] != self.config.model_id:
            log.warning("--resume_ckpt was trained on %s; continuing on --model_id %s",
                        payload["config"]["base_model"], self.config.model_id)
        return load_backbone_for_itr(self.config.model_id, cfg, self.device)

    def _fingerprint(self) -> str:
        config = self.config
        data = hashlib.sha256(Path(config.train_itr).read_bytes()).hexdigest()
        settings = {name: getattr(config, name) for name in PHASE_ARGS}
        settings["loss_weights"] = config.weights
        return hashlib.sha256(json.dumps([data, settings, self.cfg.to_dict()], sort_keys=True).encode()).hexdigest()

    def _plan_steps(self) -> int:
        per_epoch = len(self.items) // self.config.batch_size
        if per_epoch < 1:
            raise UserError(f"{len(self.items)} captions are fewer than one --batch_size {self.config.batch_size}")
        total = per_epoch * self.config.epochs
        return min(total, self.config.max_steps) if self.config.max_steps else total

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
                     self.state.phase, self.state.stage, self.config.resume_ckpt, saved["stage"])

    def _features(self) -> None:
        """Every image, caption and phrase through the frozen backbone, once."""
        t0 = time.perf_counter()
        features = Features(self.model, self.cfg)
        images = open_images(self.rows, self.config.num_workers)
        self.features, self.images = features, images
        self.captions = [self.rows[r].captions[c] for r, c in self.items]
        self.phrases = [row.phrase or row.captions[0] for row in self.rows]
        if not self.config.lora:  # frozen: every state once, then the steps only index them
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
        if not self.config.lora:
            log.info("backbone features of %d images and %d captions in %.1f s (frozen: computed once)",
                     len(self.rows), len(self.items), self.feature_seconds)
