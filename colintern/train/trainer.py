"""The training loop: one phase of ColIntern training, started fresh or resumed exactly (train.py is its command line).

A run is one *phase* (in-batch negatives from a page dataset, or hard negatives from a triples file). Its state is
a `TrainingState` (typed, stored in every checkpoint as a plain dict, colintern/train/state.py): where the phase
started, how far it got, and the optimizer, scheduler and RNG states. A checkpoint of the same phase (same data,
same arguments: the `Fingerprint`) continues exactly; a checkpoint of another phase starts a new one from its weights.

    train(config)                what train.py does (every process of a torchrun calls it)
    Trainer(config, dist)        prepare.py: data, model, phase (new or resumed), optimizer, logs, hidden-state cache
    Trainer.run()                epochs -> optimizer steps -> (log line, checkpoint, hooks); returns a summary

One optimizer step, in the files that hold it: `Trainer._optimizer_step` (here) -> `Embedder` (batches.py: the
micro-batch through the model, colintern/retriever/model.py) -> `step_loss` (step.py) -> `late_interaction_loss`
(losses.py) -> `optimizer_step` (step.py). The other pieces: examples.py (examples, epoch plan, page check), state.py (RNG, logs, fingerprint)."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from functools import partial
from typing import Any, Callable, Iterator

import torch

from colintern import hooks
from colintern.cli import OUTPUT_ERRNOS, output_error_message
from colintern.device import peak_memory_gib, resolve_device, torch_threads
from colintern.errors import UserError
from colintern.files import note_path
from colintern.retriever.checkpoint import save_checkpoint
from colintern.settings import TrainConfig
from colintern.train.distributed import (all_gather_object, all_reduce_gradients, all_reduce_mean,
                                         broadcast_object, cleanup, gather_padded, init_distributed)
from colintern.train.examples import Plan
from colintern.train.gradcache import gradcache_backward
from colintern.train.loop import run_loop
from colintern.train.losses import late_interaction_loss
from colintern.train.prepare import PreparedRun
from colintern.train.state import LOSS_TXT, append_line, format_loss_line, rng_state
from colintern.train.step import optimizer_step, step_loss


log = logging.getLogger("colintern.train")


OUT_FLAG = "--out_dir"


class Trainer(PreparedRun):
    """One phase of training on this process (rank) of a data-parallel run."""

    def run(self) -> str:
        """Train to the end of the phase (the one training loop, colintern/train/loop.py); returns the summary."""
        state = self.state
        t_train = time.perf_counter()
        try:
            run_loop(self, total=state.phase.steps, initial=state.phase_step, desc=f"phase {state.phase.index}",
                     out_dir=self.config.out_dir, reporter=self.reporter, is_main=self.is_main)
        finally:
            self.reporter.close()
            if self.cache is not None:
                self.cache.close()
        return self._summary(time.perf_counter() - t_train)

    def steps(self) -> Iterator[dict[str, Any]]:
        """The phase's remaining optimizer steps, epoch by epoch from where the state stands; each one's metrics."""
        state = self.state
        first_epoch = state.epoch
        while state.phase_step < state.phase.steps:
            if state.epoch_position >= state.phase.steps_per_epoch:  # resumed from an epoch-end checkpoint
                state.epoch, state.epoch_position = state.epoch + 1, 0
            skip = self.cache.keys() if self.cache is not None else frozenset()
            if state.epoch == first_epoch and self.skip_at_epoch_start is not None:
                skip = self.skip_at_epoch_start
            yield from self._epoch_steps(skip)

    def _epoch_steps(self, skip: frozenset[str]) -> Iterator[dict[str, Any]]:
        """The optimizer steps of the current epoch, from its position to its end or the end of the phase."""
        state, accum = self.state, self.config.grad_accum
        end = min(state.phase.steps_per_epoch, state.epoch_position + state.phase.steps - state.phase_step)
        plan, loader = self.epoch_batches(state.epoch, state.epoch_position * accum, end * accum, skip)
        batches_left = iter(loader)
        t_epoch, computed_before = time.perf_counter(), self.embedder.items_computed
        full_epoch = state.epoch_position == 0
        for pos in range(state.epoch_position, end):
            self._optimizer_step(plan, pos, [next(batches_left) for _ in range(accum)])
            yield self.last_metrics
        if full_epoch and state.epoch_position == state.phase.steps_per_epoch:
            self._note_epoch_time(state.epoch, time.perf_counter() - t_epoch,
                                  self.embedder.items_computed - computed_before)

    def postfix(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "pairs_s": f"{row['pairs_per_s']:.1f}",
                "epoch": row["epoch"]}

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
        if self.is_main:  # metrics.jsonl gets the row from the loop
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

    def checkpoints_due(self) -> list[tuple[str, bool]]:
        """Every --save_every steps, at a phase end inside an epoch, and at each epoch end."""
        config, state = self.config, self.state
        epoch_done = state.epoch_position == state.phase.steps_per_epoch
        done = state.phase_step == state.phase.steps
        due = []
        if (config.save_every and state.step % config.save_every == 0) or (done and not epoch_done):
            due.append((f"colintern_heads_step{state.step}.pt", done))
        if epoch_done:
            due.append((f"colintern_heads_epoch{state.epoch}.pt", done))
        return due

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
    def save(self, name: str, done: bool) -> None:
        """Write checkpoint `name` into --out_dir on rank 0 (atomic); a failure stops the run with the previous file
        intact."""
        config = self.config
        path = os.path.join(config.out_dir, name)
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
