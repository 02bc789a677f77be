"""The training loop: one phase of ColIntern training, started fresh or resumed exactly (train.py is its command line).

A run is one *phase* (in-batch negatives from a page dataset, or hard negatives from a triples file). Its state is
a `TrainingState` (typed, stored in every checkpoint as a plain dict): where the phase started, how far it got,
and the optimizer, scheduler and RNG states. A checkpoint of the same phase (same data, same arguments: the
`Fingerprint`) continues exactly; a checkpoint of another phase starts a new one from its weights.

    train(config)                what train.py does (every process of a torchrun calls it)
    Trainer(config, dist)        data, model, phase (new or resumed), optimizer, logs, hidden-state cache
    Trainer.run()                epochs -> optimizer steps -> (log line, checkpoint, hooks); returns a summary

One optimizer step, in the files that hold it: `Trainer._optimizer_step` (here) -> `Embedder` (batches.py: the
micro-batch through the model, colintern/retriever/model.py) -> `step_loss` (step.py) -> `late_interaction_loss`
(losses.py). The other pieces: examples.py (examples, epoch plan, page check), state.py (RNG, logs, fingerprint)."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from functools import partial
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from colintern import hooks
from colintern.cli import OUTPUT_ERRNOS, output_error_message, save_config
from colintern.data.report import SkipReport
from colintern.device import peak_memory_gib, resolve_device, torch_threads
from colintern.errors import UserError
from colintern.files import fingerprint, note_path
from colintern.retriever.checkpoint import load_checkpoint, save_checkpoint
from colintern.retriever.config import LATER_FIELDS
from colintern.settings import TrainConfig
from colintern.train.batches import Embedder, HiddenCache, MicroBatches, make_loader
from colintern.train.distributed import (DistInfo, all_gather_object, all_reduce_gradients, all_reduce_mean,
                                         broadcast_object, cleanup, gather_padded, init_distributed)
from colintern.train.examples import Plan, check_pages, load_hub_examples, load_jsonl_examples, make_plan
from colintern.train.gradcache import gradcache_backward
from colintern.train.losses import late_interaction_loss
from colintern.train.optim import make_optimizer, optimizer_step, repage_optimizer_states
from colintern.train.outputs import CONFIG_FILE, prepare_out_dir
from colintern.train.reporting import Reporter
from colintern.train.setup import auto_batch, compile_embed, new_model_settings
from colintern.train.state import (LOSS_TXT, METRICS_JSONL, Fingerprint, append_line, diff_args, format_loss_line,
                                   prepare_logs, rng_state, seed_everything, set_rng_state)
from colintern.train.step import lr_factor, step_loss


log = logging.getLogger("colintern.train")


OUT_FLAG = "--out_dir"


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


class Trainer:
    """One phase of training on this process (rank) of a data-parallel run."""

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
        self.last_ckpt = config.resume_ckpt
        self.last_metrics: dict[str, Any] = dict(self.payload.get("metrics", {})) if self.payload else {}
        self.window = self._restored_window()  # losses since the last training_loss.txt line
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
        from colintern.retriever.model import ColIntern

        config, payload = self.config, self.payload
        for flag in ("dim", "embedding", "pooling", "attention", "instruction"):
            wanted, saved = getattr(config, flag), (payload or {}).get("config", {}).get(flag, LATER_FIELDS.get(flag))
            if payload is not None and wanted is not None and wanted != saved:
                raise UserError(f"--{flag} {wanted} differs from {config.resume_ckpt}'s {flag} {saved}; a checkpoint "
                                f"keeps its own: drop --{flag} to continue from it, or train a new model without "
                                "--resume_ckpt")
        seed_everything(config.seed)  # identical on every rank: the LoRA initialisation must be the same everywhere
        model = ColIntern.from_pretrained(config.model_id, ckpt=config.resume_ckpt, device=str(self.device),
                                          dtype=config.dtype, use_flash_attn=config.use_flash_attn,
                                          max_tiles=config.max_tiles, max_visual_tokens=config.max_visual_tokens,
                                          allow_other_base=config.allow_other_base,
                                          **({} if payload is not None else new_model_settings(config)))
        if config.lora and model.lora_config is None:
            model.add_lora(config.lora_r, config.lora_alpha, config.lora_dropout, include_vision=config.lora_vision)
        elif config.lora:
            lora: dict[str, Any] = model.lora_config or {}
            if (lora["r"], lora["lora_alpha"], lora["lora_dropout"]) != (config.lora_r, config.lora_alpha,
                                                                          config.lora_dropout):
                log.warning("continuing the checkpoint's LoRA adapters (r=%s, alpha=%s, dropout=%s); --lora_r/"
                            "--lora_alpha/--lora_dropout apply only to new adapters", lora["r"],
                            lora["lora_alpha"], lora["lora_dropout"])
        elif model.lora_config is not None:
            log.info("%s has LoRA adapters: they stay frozen (heads-only mode); pass --lora to keep training them",
                     config.resume_ckpt)
        self.train_backbone = config.lora
        if self.train_backbone and model.backbone.dtype == torch.float16:
            log.warning("--dtype fp16 with --lora: backbone gradients flow in fp16 without loss scaling and can "
                        "underflow; prefer bf16 (or fp32 on GPUs without bf16)")
        for name, param in model.backbone.named_parameters():
            param.requires_grad_(self.train_backbone and "lora_" in name)
        model.head.requires_grad_(True)
        if model.pooler is not None:
            model.pooler.requires_grad_(True)
        if model.config.attention == "bidirectional" and model.config.keep_page_tokens == "page":
            log.info("bidirectional attention: the page prompt's tokens before the image now see the page, but "
                     "keep_page_tokens 'page' still leaves them out (set by the checkpoint's config)")
        model.train(self.train_backbone)  # LoRA dropout on; the frozen backbone runs in eval mode
        self.params = [p for p in model.parameters() if p.requires_grad]
        log.info("mode: %s; %.3fM trainable parameters", "LoRA + head" if self.train_backbone else
                 "head only (frozen backbone, cached hidden states)", sum(p.numel() for p in self.params) / 1e6)
        log.info("device %s, backbone %s, %d torch thread(s)", self.device,
                 str(model.backbone.dtype).replace("torch.", ""), torch.get_num_threads())
        if config.gradient_checkpointing:
            if self.train_backbone:
                model.checkpoint_activations(include_vision=config.lora_vision)
            else:
                log.warning("--gradient_checkpointing has no effect in heads-only mode (no backbone gradients)")
        self.model = model
        self.embed = compile_embed(model, str(config.compile_backend), self.device) if config.compile_heads else \
            model.embed
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

    def run(self) -> str:
        """Train to the end of the phase; returns the summary line."""
        state = self.state
        bar = tqdm(total=state.phase.steps, initial=state.phase_step, desc=f"phase {state.phase.index}",
                   unit="step", disable=not self.is_main, dynamic_ncols=True)
        t_train = time.perf_counter()
        try:
            first_epoch = state.epoch
            while state.phase_step < state.phase.steps:
                if state.epoch_position >= state.phase.steps_per_epoch:  # resumed from an epoch-end checkpoint
                    state.epoch, state.epoch_position = state.epoch + 1, 0
                skip = self.cache.keys() if self.cache is not None else frozenset()
                if state.epoch == first_epoch and self.skip_at_epoch_start is not None:
                    skip = self.skip_at_epoch_start
                self._run_epoch(skip, bar)
        finally:
            bar.close()
            self.reporter.close()
            if self.cache is not None:
                self.cache.close()
        return self._summary(time.perf_counter() - t_train)

    def _run_epoch(self, skip: frozenset[str], bar) -> None:
        """The optimizer steps of the current epoch, from its position to its end or the end of the phase."""
        state, accum = self.state, self.config.grad_accum
        end = min(state.phase.steps_per_epoch, state.epoch_position + state.phase.steps - state.phase_step)
        plan, loader = self.epoch_batches(state.epoch, state.epoch_position * accum, end * accum, skip)
        batches_left = iter(loader)
        t_epoch, computed_before = time.perf_counter(), self.embedder.items_computed
        full_epoch = state.epoch_position == 0
        for pos in range(state.epoch_position, end):
            self._optimizer_step(plan, pos, [next(batches_left) for _ in range(accum)])
            bar.update(1)
            bar.set_postfix(loss=f"{self.last_metrics['loss']:.4f}", lr=f"{self.last_metrics['lr']:.2e}",
                            pairs_s=f"{self.last_metrics['pairs_per_s']:.1f}", epoch=state.epoch)
            self._after_step()
        if full_epoch and state.epoch_position == state.phase.steps_per_epoch:
            self._note_epoch_time(state.epoch, time.perf_counter() - t_epoch,
                                  self.embedder.items_computed - computed_before)

    def _optimizer_step(self, plan: Plan, pos: int, batches: list[dict]) -> None:
        """Step `pos` of the epoch (micro-batches pos * grad_accum ...): forward, backward, gradient averaging and
        clipping, the update; then metrics.jsonl and the loss line."""
        config, state = self.config, self.state
        t0 = time.perf_counter()
        micro = [pos * config.grad_accum + m for m in range(config.grad_accum)]
        for batch in batches:
            self._note_skips(batch)
        loss = all_reduce_mean(self._forward_backward(plan, micro, batches))
        done = optimizer_step(self.optimizer, self.scheduler, self.params, loss, step=state.step + 1,
                              max_grad_norm=config.max_grad_norm, reduce_gradients=all_reduce_gradients,
                              where=f"at step {state.step + 1} (epoch {state.epoch}); stopped without saving. Last "
                                    f"good checkpoint: {self.last_ckpt or '(none written yet)'}. Lower --lr, raise "
                                    "--tau or check the data")
        loss, grad_norm, lr = done.loss, float(done.grad_norm or 0.0), done.lr
        state.step, state.phase_step, state.epoch_position = state.step + 1, state.phase_step + 1, pos + 1
        seconds = time.perf_counter() - t0
        pairs = state.phase.batch_size * config.grad_accum * self.world
        self.run_steps, self.run_pairs = self.run_steps + 1, self.run_pairs + pairs
        self.last_metrics = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": lr,
                             "grad_norm": grad_norm, "pairs_per_s": pairs / seconds, "seconds": seconds}
        self.window.append(loss)
        if self._eval_due():
            self._evaluate()
        if self.is_main:
            append_line(config.out_dir, METRICS_JSONL, json.dumps(self.last_metrics))
            self.reporter.log(self.last_metrics, state.step)
            if state.step % config.log_every == 0:
                line = format_loss_line(state.step, state.epoch, sum(self.window) / len(self.window), lr, grad_norm,
                                        pairs / seconds)
                append_line(config.out_dir, LOSS_TXT, line)
                self.window = []

    def _eval_due(self) -> bool:
        """--eval_local: every --eval_every steps, at each epoch end and at the end of the phase."""
        state, every = self.state, self.config.eval_every
        return self.evaluator is not None and (
            (every > 0 and state.step % every == 0) or state.epoch_position == state.phase.steps_per_epoch
            or state.phase_step == state.phase.steps)

    def _evaluate(self) -> None:
        """Retrieval metrics on the --eval_local set, added to this step's metrics.jsonl row (eval_*)."""
        start = time.perf_counter()
        scores = self.evaluator(self.model, batch_size=self.state.phase.batch_size)
        self.last_metrics.update({f"eval_{name}": value for name, value in scores.items()})
        text = ", ".join(f"{name} {value:.4f}" for name, value in scores.items())
        log.info("eval on %s at step %d: %s (%.1f s)", self.evaluator.name, self.state.step, text,
                 time.perf_counter() - start)
        append_line(self.config.out_dir, LOSS_TXT, f"# eval {self.evaluator.name} at step {self.state.step}: {text}")

    def _forward_backward(self, plan: Plan, micro: list[int], batches: list[dict]) -> float:
        """Forward + backward of one optimizer step; returns this rank's loss."""
        config = self.config
        loss_kwargs = {"kind": config.loss, "temperature": config.tau, "fn_filter": config.fn_filter}
        local = config.gather == "local"  # each process contrasts its queries with its own pages only
        ranks = [self.rank] if local else list(range(self.world))
        kw: dict[str, Any] = {"num_negs": self.num_negs, "rank": 0 if local else self.rank, "loss_fn": late_interaction_loss,
              "gather": (lambda d, mask: (d, mask)) if local else gather_padded, "loss_kwargs": loss_kwargs}
        if config.grad_cache:
            keys = [self.examples[i].pos.key for r in ranks for j in micro for i in plan.rank_rows(j, r)]
            closures: list[Callable[[], tuple[torch.Tensor, torch.Tensor]]] = []
            for batch in batches:
                closures += [partial(self.embedder.queries, batch), partial(self.embedder.pages, batch)]
            return float(gradcache_backward(closures, lambda parts: step_loss(parts, batches, all_keys=keys, **kw)))
        total = 0.0
        for j, batch in zip(micro, batches):
            keys = [self.examples[i].pos.key for r in ranks for i in plan.rank_rows(j, r)]
            loss = step_loss([self.embedder.queries(batch), self.embedder.pages(batch)], [batch], all_keys=keys,
                             **kw)
            (loss / config.grad_accum).backward()
            total += float(loss.detach()) / config.grad_accum
        return total

    def _note_skips(self, batch: dict) -> None:
        """Report the pages of a micro-batch that could not be decoded (normally all found by _check_pages)."""
        bad = batch["bad"]
        for b, p in enumerate(batch["pos_row"].tolist()):
            if p in bad:
                self._skip(batch["where"][b], bad[p][1], f"{bad[p][1]} (pos {batch['pos_label'][b]})")
            for n in batch["neg_row"][b].tolist():
                if n in bad:
                    self._skip(batch["where"][b], bad[n][1], f"{bad[n][1]} (negative {bad[n][0]})")

    def _after_step(self) -> None:
        """Checkpoints (every --save_every steps, at a phase end inside an epoch, at each epoch end), the "step" hook."""
        config, state = self.config, self.state
        epoch_done = state.epoch_position == state.phase.steps_per_epoch
        done = state.phase_step == state.phase.steps
        if (config.save_every and state.step % config.save_every == 0) or (done and not epoch_done):
            self.save(os.path.join(config.out_dir, f"colintern_heads_step{state.step}.pt"), done)
        if epoch_done:
            self.save(os.path.join(config.out_dir, f"colintern_heads_epoch{state.epoch}.pt"), done)
        hooks.call("step", state.step)

    def _note_epoch_time(self, epoch: int, seconds: float, computed: int) -> None:
        """After a second full epoch with the hidden-state cache: how much faster it was than the first."""
        self.epoch_seconds[epoch] = seconds
        base = min(self.epoch_seconds)  # the first full epoch of this run: the one that filled the cache
        cache = self.cache
        if not (self.is_main and cache is not None and epoch > base):
            return
        msg = (f"epoch {epoch}: {seconds:.1f} s vs {self.epoch_seconds[base]:.1f} s for epoch {base}: "
               f"{self.epoch_seconds[base] / max(seconds, 1e-9):.1f}x faster with the hidden-state cache "
               f"({len(cache)} items cached, {cache.mem_used / 1e9:.2f} GB memory + {cache.disk_used / 1e9:.2f} GB "
               f"disk; {computed} items still went through the backbone)")
        log.info(msg)
        append_line(self.config.out_dir, LOSS_TXT, "# " + msg)

    # -- checkpoints and the summary ---------------------------------------------------------------------
    def save(self, path: str, done: bool) -> None:
        """Write a checkpoint on rank 0 (atomic); a failure stops the run with the previous file intact."""
        config = self.config
        rngs = all_gather_object(rng_state())
        if config.resume_ckpt and os.path.realpath(path) == os.path.realpath(config.resume_ckpt):
            log.warning("not overwriting %s, the checkpoint this run resumed from", path)
            return
        error = None
        if self.is_main:
            parts = self.model.checkpoint_parts()
            state = replace(self.state, phase_done=done, skipped=self.report.count, rng=rngs,
                            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict())
            training = hooks.call("checkpoint", state.step, state.to_dict())
            try:
                save_checkpoint(path, **parts, training=training, metrics=self.last_metrics)
            except OSError as err:
                error = output_error_message(note_path(err, path), OUT_FLAG) if err.errno in OUTPUT_ERRNOS \
                    else f"{type(err).__name__}: {err}"
        error = broadcast_object(error)
        if error:
            raise UserError(f"could not write checkpoint {path} ({error}); the previous checkpoint "
                            f"{self.last_ckpt or '(none)'} is intact")
        self.last_ckpt = path
        log.info("saved %s", path)
        if self.is_main and config.save_total_limit:
            self._prune_step_checkpoints(config.save_total_limit)

    def _prune_step_checkpoints(self, keep: int) -> None:
        """--save_total_limit: delete all but the newest `keep` step checkpoints (by step; epoch ones stay)."""
        def step_of(path: Path) -> int:
            tail = path.stem.rsplit("step", 1)[-1]
            return int(tail) if tail.isdigit() else -1

        steps = sorted(Path(self.config.out_dir).glob("colintern_heads_step*.pt"), key=step_of)
        for old in steps[:-keep]:
            old.unlink(missing_ok=True)
            log.info("--save_total_limit %d: removed %s", keep, old)

    def _summary(self, seconds: float) -> str:
        """The closing line (also the last line of training_loss.txt), with the first skipped rows logged."""
        state = self.state
        peak = f"{peak_memory_gib(self.device)[0]:.2f} GiB {'GPU' if self.device.type == 'cuda' else 'RSS'}"
        summary = (f"done: phase {state.phase.index}, {self.run_steps} steps in this run (global step {state.step}, "
                   f"epoch {state.epoch}) in {seconds:.1f} s, {self.run_pairs / max(seconds, 1e-9):.1f} pairs/s, "
                   f"peak memory {peak}, {self.report.summary()}; last checkpoint {self.last_ckpt} "
                   f"(total {time.perf_counter() - self.t_run:.1f} s)")
        if self.is_main:  # the summary itself is train.py's output (stdout); the log keeps the details
            for item in self.report.items[:20]:
                log.info("  skipped %s: %s", item.where, item.reason)
            append_line(self.config.out_dir, LOSS_TXT, "# " + summary)
        return summary


def train(config: TrainConfig, device_flag: str = "--device") -> str | None:
    """One phase of retrieval training (train.py, or from Python with a TrainConfig); under torchrun every process
    calls it. Returns the summary line on rank 0 (None on the others). `device_flag` names the flag in errors."""
    dist = init_distributed(resolve_device(config.device, flag=device_flag))
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        with torch_threads(config.threads):
            summary = Trainer(config, dist).run()
        return summary if dist.is_main else None
    finally:  # an in-process caller (tests, notebooks) gets its global torch settings back
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        cleanup()
