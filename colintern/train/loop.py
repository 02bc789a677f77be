"""The one training loop, which both training tasks run (page retrieval, colintern/train/trainer.py; seed 004's
image-text heads, colintern/itr/train.py):

    for row in task.steps():                  # the task runs one optimizer step (train.step.optimizer_step) ...
        metrics.jsonl + reporters <- row      # ... and the loop logs it,
        progress bar                          # shows it,
        task.save(name) for task.checkpoints_due()   # writes the checkpoints the task's cadence asks for,
        hooks.call("step", n)                 # and runs the hooks (the tests' faults).

A task says what a batch is and what its loss is (inside `steps`, resumed where its state stands), which
checkpoints follow a step and what they carry; the loop is the same for every task.
"""
from __future__ import annotations

import json
from typing import Any, Iterator, Protocol

from tqdm.auto import tqdm

from colintern import hooks
from colintern.train.state import METRICS_JSONL, append_line


class Task(Protocol):
    def steps(self) -> Iterator[dict[str, Any]]:
        """Run the phase's remaining optimizer steps; yield each one's metrics row (with "step")."""
        ...

    def checkpoints_due(self) -> list[tuple[str, bool]]:
        """(file name, phase done) of every checkpoint to write after the step just yielded."""
        ...

    def save(self, name: str, done: bool) -> None:
        ...

    def postfix(self, row: dict[str, Any]) -> dict[str, Any]:
        """What the progress bar shows of a step."""
        ...


def run_loop(task: Task, *, total: int, initial: int, desc: str, out_dir: str, reporter: Any,
             is_main: bool = True) -> None:
    """Run `task` to the end of its phase: every step logged (metrics.jsonl on the main process, the reporters),
    shown, checkpointed as the task asks, and passed to the "step" hooks."""
    with tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not is_main, dynamic_ncols=True) as bar:
        for row in task.steps():
            if is_main:
                append_line(out_dir, METRICS_JSONL, json.dumps(row))
                reporter.log(row, row["step"])
            bar.update(1)
            bar.set_postfix(task.postfix(row))
            for name, done in task.checkpoints_due():
                task.save(name, done)
            hooks.call("step", row["step"])
