"""Hook points inside long jobs, where a caller acts without code of its own in the job: after every optimizer
step ("step"), on the loss a step is about to apply ("loss"), on a checkpoint's training section before it is
written ("checkpoint"), after every committed index segment ("segment"), after every batch of pages sent to a Qdrant
edge shard ("upload").

    remove = install(hook)        # hook(point, n, value) -> value (returned unchanged when it has nothing to do)
    ...
    remove()

The tests install their faults this way (colintern/testing/faults.py: a SIGKILL after step N, an exception, a NaN
loss, a disk that fills while a checkpoint is written); with nothing installed every point is a no-op.
"""
from __future__ import annotations

from typing import Any, Callable

Hook = Callable[[str, int, Any], Any]
_installed: list[Hook] = []


def install(hook: Hook) -> Callable[[], None]:
    """Add a hook; returns the function that removes it."""
    _installed.append(hook)
    return lambda: _installed.remove(hook) if hook in _installed else None


def call(point: str, n: int, value: Any = None) -> Any:
    """Run the installed hooks at `point` (n: the step or segment number); each may replace `value`."""
    for hook in list(_installed):
        value = hook(point, n, value)
    return value
