"""Faults the tests inject into training and indexing, installed as hooks (colintern/hooks.py):

    kill@N        SIGKILL after optimizer step N, after index segment N, or after Qdrant upload batch N (a real crash:
                  nothing runs after it)
    raise@N       RuntimeError after step N (a crash the process survives)
    nan@N         the loss of step N becomes NaN (a diverged run)
    save_error@N  the checkpoint written after step N fails halfway through its temp file (a full disk)

In-process: `with injected("raise@7"): train.main(argv)`. In a child process, the command line of a script with
its faults installed first: `python -m colintern.testing.faults kill@5 train ARGS...` (train, mine, eval, search).
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from colintern import hooks


class FailOnSave:
    """Put in a checkpoint payload to make torch.save fail halfway through writing (the "save_error" fault)."""

    def __reduce__(self):
        raise OSError(28, "No space left on device (injected)")


def parse(spec: str) -> list[tuple[str, int]]:
    """'kill@5,nan@3' -> [('kill', 5), ('nan', 3)]."""
    faults = []
    for item in filter(None, spec.split(",")):
        kind, _, at = item.partition("@")
        if kind not in ("kill", "raise", "nan", "save_error") or not at.isdigit():
            raise ValueError(f"unknown fault {item!r}: use kill@N, raise@N, nan@N or save_error@N")
        faults.append((kind, int(at)))
    return faults


def fault_hook(spec: str) -> hooks.Hook:
    faults = parse(spec)

    def hook(point: str, n: int, value: Any) -> Any:
        for kind, at in faults:
            if n != at:
                continue
            if kind == "kill" and point in ("step", "segment", "upload"):
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "raise" and point == "step":
                raise RuntimeError(f"injected failure after step {n}")
            if kind == "nan" and point == "loss":
                value = math.nan
            if kind == "save_error" and point == "checkpoint":
                value["fault"] = FailOnSave()  # fails in the middle of writing the temp file
        return value

    return hook


@contextlib.contextmanager
def injected(spec: str) -> Iterator[None]:
    remove = hooks.install(fault_hook(spec))
    try:
        yield
    finally:
        remove()


def main(argv: list[str]) -> int:
    """python -m colintern.testing.faults SPEC SCRIPT ARGS...: run colintern.scripts.SCRIPT with the faults."""
    from colintern.cli import run_cli

    spec, script, *rest = argv
    module = importlib.import_module(f"colintern.scripts.{script}")
    hooks.install(fault_hook(spec))
    return run_cli(module.main, rest, out_flag=getattr(module, "OUT_FLAG", "output location"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
