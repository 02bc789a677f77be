"""A training phase made ready before its first step: the output folder, the data (every page checked), the model
and which parameters train, the phase (continued or new) with its optimizer and schedule, the logs, and the
hidden-state cache rebuilt up to a resume point. The loop (colintern/train/trainer.py) runs it."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from colintern.cli import save_config
from colintern.data.report import SkipReport
from colintern.errors import UserError
from colintern.files import fingerprint
from colintern.retriever.checkpoint import load_checkpoint
from colintern.settings import TrainConfig
from colintern.train.batches import Embedder, HiddenCache, MicroBatches, make_loader
from colintern.train.distributed import DistInfo
from colintern.train.examples import Plan, check_pages, load_hub_examples, load_jsonl_examples, make_plan
from colintern.train.optim import make_optimizer, repage_optimizer_states
from colintern.train.outputs import CONFIG_FILE, prepare_out_dir
from colintern.train.reporting import Reporter
from colintern.train.setup import auto_batch, compile_embed, load_training_model, trainable_parameters
from colintern.train.state import (LOSS_TXT, METRICS_JSONL, PHASE_ARGS, Fingerprint, Phase, TrainingState, append_line,
                                   diff_args, prepare_logs, seed_everything, set_rng_state)
from colintern.train.step import lr_factor

log = logging.getLogger("colintern.train")


class PreparedRun:
    """One phase of training on this process (rank), made ready: Trainer (colintern/train/trainer.py) runs it."""

    def __init__(self, config: TrainConfig, dist: DistInfo):
        self.rank, self.world, self.device, self.is_main = dist.rank, dist.world_size, dist.device, dist.is_main
        self.t_run = time.perf_counter()
        resume_ckpt, self.replaced = prepare_out_dir(config.out_dir, config.resume_ckpt, config.overwrite)
        self.config = config = config.replace(resume_ckpt=resume_ckpt)
        if self.device.type == "cpu":
            # Bit-exact resume: the CPU backward of advanced indexing (the loss's best-token gather, the page
            # table) otherwise accumulates in parallel, in an order that changes from run to run.
            torch.use_deterministic_algorithms(True, warn_only=True)
        self._load_data()
        self.payload = load_checkpoint(config.resume_ckpt) if config.resume_ckpt else None
        self._build_model()
        self.state, self.same_phase = self._start_or_resume()
        self._make_optimizer()
        self._prepare_logs()
        self._prepare_embedder()
        self.last_ckpt: str | None = config.resume_ckpt
        self.last_metrics: dict[str, Any] = dict(self.payload.get("metrics", {})) if self.payload else {}
        self.window: list[float] = self._restored_window()  # losses since the last training_loss.txt line
        self.run_steps = self.run_pairs = 0
        self.epoch_seconds: dict[int, float] = {}
        kinds = [k for k in config.report_to if k != "none"] if self.is_main else []
        phase = self.state.phase
        self.reporter = Reporter(kinds, config.out_dir, f"{Path(config.out_dir).name}-phase{phase.index}",
                                 fingerprint([os.path.abspath(config.out_dir), phase.id, phase.start_step], n=12),
                                 {k: v for k, v in config.to_dict().items() if isinstance(v, (str, int, float, bool))})
        self.evaluator: Any = None  # a LocalEvaluator with --eval_local (on rank 0)
        if config.eval_local and self.is_main:
            from colintern.eval.evaluation import LocalEvaluator

            self.evaluator = LocalEvaluator(config.eval_local)

    # -- set-up ------------------------------------------------------------------------------------------
    def _load_data(self) -> None:
        config = self.config
        self.report = SkipReport(strict=config.strict, logger=log)
        if config.train_hub:
            self.data = load_hub_examples(config.train_hub, config.split, self.report)
        else:
            self.data = load_jsonl_examples(str(config.train_jsonl), config.root, self.report)
        self.examples = self.data.examples
        self.num_negs = config.num_negs if self.data.kind == "jsonl" else 0
        log.info("%d training examples (%s%s)", len(self.examples), "in-batch negatives" if self.data.kind == "hub"
                 else "in-batch + hard negatives", f", {self.num_negs} per query" if self.num_negs else "")
        self.seen_skips: set[tuple[str, str]] = set()
        if not config.no_page_check:
            self._check_pages()
        short = sum(len(e.negs) < self.num_negs for e in self.examples)
        if short:
            log.warning("%d of %d examples have fewer than --num_negs %d hard negatives (%d have none): they are "
                        "trained with the ones they have and the in-batch pages", short, len(self.examples),
                        self.num_negs, sum(not e.negs for e in self.examples))

    def _check_pages(self) -> None:
        """Decode every page before the model loads: all bad pages are reported now (--strict stops here), each
        under the example that uses it, exactly as a batch would report it (a batch then reports nothing twice)."""
        start = time.perf_counter()
        workers = min(16, os.cpu_count() or 1)
        bad = check_pages(self.examples, self.data.datasets, self.num_negs, workers, show_progress=self.is_main)
        for example in self.examples:
            if example.pos.key in bad:
                label, reason = bad[example.pos.key]
                self._skip(example.where, reason, f"{reason} (pos {example.pos.label})")
            for neg in example.negs[:self.num_negs]:
                if neg.key in bad:
                    label, reason = bad[neg.key]
                    self._skip(example.where, reason, f"{reason} (negative {label})")
        log.info("checked the pages of %d examples in %.1f s with %d threads: %d cannot be decoded",
                 len(self.examples), time.perf_counter() - start, workers, len(bad))

    def _skip(self, where: str, reason: str, detail: str) -> None:
        """Report one example's bad page once (by example and reason); `detail` names the page in triples mode."""
        if (where, reason) not in self.seen_skips:
            self.seen_skips.add((where, reason))
            self.report.add(where, detail if self.data.kind == "jsonl" else reason)

    def _build_model(self) -> None:
        """The model (from --resume_ckpt's weights when given), which parameters train, and the embed function."""
        config = self.config
        seed_everything(config.seed)  # identical on every rank: the LoRA initialisation must be the same everywhere
        self.model = model = load_training_model(config, self.payload, self.device)
        self.train_backbone = config.lora
        self.params = trainable_parameters(model, config)
        log.info("mode: %s; %.3fM trainable parameters", "LoRA + head" if self.train_backbone else
                 "head only (frozen backbone, cached hidden states)", sum(p.numel() for p in self.params) / 1e6)
        log.info("device %s, backbone %s, %d torch thread(s)", self.device,
                 str(model.backbone.dtype).replace("torch.", ""), torch.get_num_threads())
        backend = config.compile_backend or os.environ.get("COLINTERN_COMPILE_BACKEND", "inductor")
        self.embed = compile_embed(model, backend, self.device) if config.compile_heads else model.embed
        seed_everything(config.seed + self.rank)  # dropout differs between ranks, as in any data-parallel run

    def _fingerprint(self) -> Fingerprint:
        config, data = self.config, self.data
        phase_args = {k: getattr(config, k) for k in PHASE_ARGS}
        if config.gather != "global":  # a later argument: only recorded when it changes what is computed
            phase_args["gather"] = config.gather
        phase_args.update(num_negs=self.num_negs, world_size=self.world,
                          split=config.split if data.kind == "hub" else None,
                          model=self.model.config.meaning())
        return Fingerprint(json.dumps([data.kind, data.identity], sort_keys=True), phase_args)

    def _data_names(self) -> list[str]:
        """The training data of this phase by name: a hub dataset id as given, a local dataset or triples file as an
        absolute path, and the datasets a triples file's pseudo-paths point into (mined pages)."""
        config = self.config
        if config.train_hub:
            return [os.path.abspath(config.train_hub) if os.path.exists(config.train_hub) else config.train_hub]
        rows = {p.dataset[0] for e in self.examples for p in (e.pos, *e.negs) if p.dataset is not None}
        return [os.path.abspath(str(config.train_jsonl))] + sorted(rows)

    def _start_or_resume(self) -> tuple[TrainingState, bool]:
        """Continue the checkpoint's phase (same data and arguments), or start a new phase (from its weights)."""
        config = self.config
        fingerprint = self._fingerprint()
        saved: dict[str, Any] = self.payload.get("training") or {} if self.payload is not None else {}
        same_phase = bool(saved) and saved["phase"]["id"] == fingerprint.phase_id and not saved["phase_done"] \
            and not config.new_phase
        if same_phase and saved["phase"]["fingerprint"] != fingerprint.value:
            diffs = diff_args(saved["phase"]["args"], fingerprint.args)
            raise UserError(f"{config.resume_ckpt} is a checkpoint of this phase (same data) trained with other "
                            f"arguments ({'; '.join(diffs[:4]) or 'model config'}); pass the same arguments to "
                            "continue it exactly, or add --new_phase to start a new phase from its weights")
        if same_phase:
            state = TrainingState.from_dict(saved)
            log.info("resuming phase %d from %s: step %d (epoch %d, step %d of the epoch)", state.phase.index,
                     config.resume_ckpt, state.step, state.epoch, state.epoch_position)
        else:
            step = saved["step"] if saved else 0
            epoch = saved["epoch"] + 1 if saved else 1
            index = saved["phase"]["index"] + 1 if saved else 1
            if self.payload is not None:
                log.info("new phase %d from the weights of %s: fresh optimizer and schedule, starting at epoch %d, "
                         "step %d", index, config.resume_ckpt, epoch, step)
            batch_size = config.batch_size
            if config.auto_batch:
                batch_size = auto_batch(config, self.model, self.embed, self.params, self.num_negs,
                                        self.train_backbone, self.device)
            phase = Phase(id=fingerprint.phase_id, fingerprint=fingerprint.value, args=fingerprint.args,
                          index=index, kind=self.data.kind, start_step=step, start_epoch=epoch, steps=0,
                          steps_per_epoch=0, batch_size=batch_size, world_size=self.world)
            seen = saved.get("datasets") if saved else []
            datasets = None if seen is None else seen + [d for d in self._data_names() if d not in seen]
            state = TrainingState(phase, step=step, phase_step=0, epoch=epoch, epoch_position=0, datasets=datasets)
        self._size_phase(state)
        return state, same_phase

    def _size_phase(self, state: TrainingState) -> None:
        """Steps per epoch and in the phase, from the data size, the batch layout and --epochs / --max_steps."""
        config, phase = self.config, state.phase
        plan = make_plan(len(self.examples), config.seed, state.epoch, phase.batch_size, self.world, config.grad_accum)
        if plan.steps == 0:
            need = phase.batch_size * config.grad_accum * self.world
            raise UserError(f"{len(self.examples)} training examples are fewer than one optimizer step needs "
                            f"(batch_size {phase.batch_size} x grad_accum {config.grad_accum} x {self.world} processes "
                            f"= {need}); lower --batch_size or --grad_accum")
        phase.steps_per_epoch = plan.steps
        phase.steps = plan.steps * config.epochs
        if config.max_steps:
            phase.steps = min(phase.steps, config.max_steps)

    def _make_optimizer(self) -> None:
        config, state, phase = self.config, self.state, self.state.phase
        warmup = math.ceil(config.warmup_ratio * phase.steps)
        self.optimizer, opt_name = make_optimizer(config.optimizer, self.params, config.lr, config.weight_decay,
                                                  self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           partial(lr_factor, total=phase.steps, warmup=warmup))
        if self.same_phase:
            assert state.optimizer is not None and state.scheduler is not None  # a checkpoint of this phase
            self.optimizer.load_state_dict(state.optimizer)
            if repage_optimizer_states(self.optimizer):
                log.info("resumed the paged optimizer's states into paged memory")
            self.scheduler.load_state_dict(state.scheduler)
            state.optimizer = state.scheduler = None  # loaded; save() takes fresh ones
        last_epoch = phase.start_epoch + math.ceil(phase.steps / phase.steps_per_epoch) - 1
        per_step = phase.batch_size * config.grad_accum * self.world
        dropped = len(self.examples) - phase.steps_per_epoch * per_step
        log.info("phase %d: %d epoch(s) x %d steps (%d pairs per step = %d per micro-batch x %d accumulation x %d "
                 "processes%s), %d steps in all, warm-up %d; %s", phase.index, last_epoch - phase.start_epoch + 1,
                 phase.steps_per_epoch, per_step, phase.batch_size, config.grad_accum, self.world,
                 f"; {dropped} examples per epoch do not fill a step" if dropped else "", phase.steps, warmup,
                 opt_name)

    def _prepare_logs(self) -> None:
        config, state = self.config, self.state
        if not self.is_main:
            return
        if self.replaced:
            log.warning("--overwrite: removing the earlier run in %s (%d files)", config.out_dir, len(self.replaced))
            for path in self.replaced:
                path.unlink(missing_ok=True)
        prepare_logs(config.out_dir, state.step if self.payload is not None else None)
        save_config(config, Path(config.out_dir) / CONFIG_FILE, "train.py")
        if self.payload is not None:
            what = "resumed" if self.same_phase else f"phase {state.phase.index}"
            append_line(config.out_dir, LOSS_TXT, f"# {what} from {config.resume_ckpt} at step {state.step}, epoch "
                        f"{state.epoch}: {config.train_hub or config.train_jsonl}")

    def _restored_window(self) -> list[float]:
        """The losses logged since the last training_loss.txt line, so a resumed run averages the same steps."""
        if not (self.is_main and self.payload is not None):
            return []
        step = self.state.step
        with open(os.path.join(self.config.out_dir, METRICS_JSONL), encoding="utf-8") as f:
            done = [json.loads(line) for line in f if line.strip()]
        return [r["loss"] for r in done if r["step"] > step - step % self.config.log_every]

    def _prepare_embedder(self) -> None:
        """Heads-only: the hidden-state cache, rebuilt up to the resume point so that results stay exact."""
        config, state = self.config, self.state
        self.cache = None
        if not self.train_backbone:
            self.cache = HiddenCache(int(config.cache_mem_gb * 1e9), int(config.cache_disk_gb * 1e9),
                                     os.path.join(config.out_dir, f".hidden_cache_rank{self.rank}.bin"))
        self.embedder = Embedder(self.model, self.embed, self.train_backbone, self.cache)
        self.skip_at_epoch_start: frozenset[str] | None = None
        start_epoch, epoch, position = state.phase.start_epoch, state.epoch, state.epoch_position
        if self.same_phase and self.cache is not None and config.cache_mem_gb + config.cache_disk_gb > 0 and (
                epoch > start_epoch or position > 0):
            log.info("rebuilding the hidden-state cache up to the resume point (%d epoch(s) + %d steps of "
                     "forward passes)", epoch - start_epoch, position)
            with torch.no_grad():
                for e in range(start_epoch, epoch + 1):
                    skip = self.cache.keys()
                    if e == epoch:
                        self.skip_at_epoch_start = skip
                    upto = state.phase.steps_per_epoch if e < epoch else position
                    _, loader = self.epoch_batches(e, 0, upto * config.grad_accum, skip)
                    for batch in loader:
                        self.embedder.queries(batch)
                        self.embedder.pages(batch)
        if self.same_phase:
            assert state.rng is not None  # a checkpoint of this phase
            set_rng_state(state.rng[self.rank])

    # -- the loop ----------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int, first: int, last: int, skip: frozenset[str]) -> tuple[Plan, Any]:
        """Plan of an epoch and a loader of this rank's micro-batches first..last-1."""
        plan = make_plan(len(self.examples), self.config.seed, epoch, self.state.phase.batch_size, self.world,
                         self.config.grad_accum)
        rows = [plan.rank_rows(j, self.rank) for j in range(first, last)]
        dataset = MicroBatches(self.examples, rows, self.model.processor, self.num_negs, self.data.datasets, skip)
        return plan, make_loader(dataset, self.config.num_workers, self.config.prefetch_factor,
                                 self.device.type == "cuda")
