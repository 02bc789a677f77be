#!/usr/bin/env python
"""Plot ColIntern training loss curves from the logs train.py writes.

    python plot_training_loss.py --input outputs/train/training_loss.txt --smooth 200
    python plot_training_loss.py --input outputs/e1/metrics.jsonl outputs/e2/metrics.jsonl \\
        --labels "E1 (in-batch)" "E2 (mined)" --smooth 50 --lr

Each --input is one of the two logs of docs/CONTRACT.md §8 (detected by extension, else by content):

training_loss.txt  one line per log step, fields separated by "|", each field "key value":
                       step 12 | epoch 1 | loss 0.123456 | lr 5.000e-05 | grad_norm 1.2345 | pairs/s 12.3
                   "step" (an integer: the global optimizer step) and "loss" are required; "epoch", "lr",
                   "grad_norm", "pairs/s" and "seconds" are read when present; any other "| key value"
                   field is ignored. Blank lines and lines starting with "#" are skipped.
metrics.jsonl      one JSON object per optimizer step with at least "step" and "loss"
                   (train.py writes step, epoch, loss, lr, grad_norm, pairs_per_s, seconds, and with
                   --eval_local the eval_ndcg_at_5 / eval_ndcg_at_10 / eval_recall_at_5 of that step).

A directory is accepted too: its metrics.jsonl, else its training_loss.txt.
The x axis is the global step. Several inputs (e.g. the epoch-1 and epoch-2 phases, whose steps continue)
are drawn on the same axes, one colour each. A step logged twice in one file (a resumed run appending to
its log) keeps its last value. NaN/inf losses are left out of the curve, with a warning. Where a new training
phase starts (train.py's "# phase N from ... at step S" note in training_loss.txt, read beside a metrics.jsonl too)
a dotted line marks it
and the moving average starts afresh. Evaluation during training (eval_* fields) is drawn in a panel below.
An unfinished last line (a run still writing) is left out with a warning.

Exit status: 0 on success, 2 on a user error (one line on stderr naming FILE:LINE and what to do).
"""
import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from colintern.cli import build_parser as build_options_parser, parse_config, run_cli, setup_logging  # noqa: E402
from colintern.errors import UserError  # noqa: E402
from colintern.settings import PlotLossConfig  # noqa: E402

PROG = "plot_training_loss.py"
log = logging.getLogger("colintern.plot_training_loss")

# The example line shown in error messages: train.py writes exactly this layout.
TEXT_EXAMPLE = "step 12 | epoch 1 | loss 0.123456 | lr 5.000e-05 | grad_norm 1.2345 | pairs/s 12.3"
# training_loss.txt field name -> record key. Fields not listed here are ignored.
TEXT_FIELDS = {
    "step": "step",
    "epoch": "epoch",
    "loss": "loss",
    "lr": "lr",
    "grad_norm": "grad_norm",
    "pairs/s": "pairs_per_s",
    "pairs_per_s": "pairs_per_s",
    "seconds": "seconds",
}
# metrics.jsonl keys read as numbers (besides "step"); others are ignored.
EVAL_FIELDS = {"eval_ndcg_at_5": "nDCG@5", "eval_ndcg_at_10": "nDCG@10", "eval_recall_at_5": "recall@5"}
JSON_NUMBERS = ("loss", "epoch", "lr", "grad_norm", "pairs_per_s", "seconds", *EVAL_FIELDS)
PHASE_NOTE = re.compile(r"^#\s*phase (\d+) from .* at step (\d+)")  # train.py's note where a new phase starts


# ----------------------------------------------------------------------------------------------------------
# Reading the logs


def parse_text_line(line: str, where: str) -> dict:
    """Parse one training_loss.txt line into {"step": int, "loss": float, ...}. `where` is "FILE:LINE"."""
    record = {}
    for field in line.split("|"):
        parts = field.split(None, 1)
        if not parts:
            continue  # an empty field, e.g. a trailing "|"
        key = parts[0]
        name = TEXT_FIELDS.get(key)
        if name is None:
            continue  # an extra field this script does not use
        if len(parts) < 2:
            raise UserError(f"{where}: field '{key}' has no value; expected '{key} <number>' as in '{TEXT_EXAMPLE}'")
        value = parts[1].strip()
        try:
            record[name] = int(value) if name == "step" else float(value)
        except ValueError:
            kind = "an integer" if name == "step" else "a number"
            raise UserError(f"{where}: '{key}' must be {kind}, got {value!r}") from None
    for required in ("step", "loss"):
        if required not in record:
            shown = line.strip()
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise UserError(f"{where}: no '{required}' field in {shown!r}; expected a line like '{TEXT_EXAMPLE}'")
    return record


def parse_json_line(line: str, where: str) -> dict:
    """Parse one metrics.jsonl line into {"step": int, "loss": float, ...}. `where` is "FILE:LINE"."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object like {{\"step\": 12, \"loss\": 0.12}}, got {type(obj).__name__}")
    for required in ("step", "loss"):
        if required not in obj:
            raise UserError(f'{where}: missing "{required}"; each line needs at least "step" and "loss"')
    step = obj["step"]
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int):
        raise UserError(f'{where}: "step" must be an integer, got {step!r}')
    record = {"step": step}
    for key in JSON_NUMBERS:
        value = obj.get(key)
        if value is None:
            continue  # absent, or null (e.g. a NaN loss written as null): treated as missing
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f'{where}: "{key}" must be a number, got {value!r}')
        record[key] = float(value)
    record.setdefault("loss", math.nan)
    return record


def detect_format(path: Path, lines: list) -> str:
    """'jsonl' or 'text': by extension, else by the first meaningful line."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".txt", ".log"):
        return "text"
    for line in lines:
        s = line.strip()
        if s and not s.startswith("#"):
            return "jsonl" if s.startswith("{") else "text"
    return "text"


def resolve_input(name: str) -> Path:
    """The log file for an --input argument (a directory means its metrics.jsonl or training_loss.txt)."""
    path = Path(name)
    if path.is_dir():
        for candidate in ("metrics.jsonl", "training_loss.txt"):
            if (path / candidate).is_file():
                log.info("%s: using %s", path, candidate)
                return path / candidate
        raise UserError(f"{path}: directory has no metrics.jsonl or training_loss.txt; pass the log file itself")
    if not path.exists():
        raise UserError(f"{path}: no such file; pass the training_loss.txt or metrics.jsonl that train.py wrote "
                        f"(by default in outputs/train/)")
    return path


def read_log(path: Path) -> dict:
    """Read one log into numpy arrays {"step", "loss", "lr", "epoch"} sorted by step (NaN where absent)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; pass a training_loss.txt or metrics.jsonl") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    lines = text.splitlines()
    fmt = detect_format(path, lines)
    parse = parse_json_line if fmt == "jsonl" else parse_text_line
    by_step = {}  # step -> record; a repeated step keeps its last record
    n_records = 0
    torn_last = bool(text) and not text.endswith("\n")  # a run still writing its last line
    for lineno, line in enumerate(lines, start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        try:
            record = parse(s, f"{path}:{lineno}")
        except UserError:
            if not (torn_last and lineno == len(lines)):
                raise
            log.warning("%s:%d: incomplete last line (is the run still writing?); left out", path, lineno)
            continue
        if record["step"] < 0:
            raise UserError(f"{path}:{lineno}: step must be >= 0, got {record['step']}")
        by_step[record["step"]] = record
        n_records += 1
    if not by_step:
        expected = '{"step": ..., "loss": ...} lines' if fmt == "jsonl" else f"lines like '{TEXT_EXAMPLE}'"
        raise UserError(f"{path}: empty log (no {expected}); has training logged its first step yet?")
    if n_records > len(by_step):
        log.warning("%s: %d repeated step(s) (a resumed run appended to this log?); keeping the last value of each",
                    path, n_records - len(by_step))
    steps = sorted(by_step)
    run = {"step": np.array(steps, dtype=float)}
    for key in ("loss", "lr", "epoch", *EVAL_FIELDS):
        run[key] = np.array([by_step[s].get(key, math.nan) for s in steps], dtype=float)
    run["phase"] = phases_of(run["step"], path if fmt == "text" else path.with_name("training_loss.txt"))
    bad = ~np.isfinite(run["loss"])
    if bad.any():
        first = int(run["step"][np.argmax(bad)])
        log.warning("%s: %d non-finite or missing loss value(s) (first at step %d) are left out of the curve",
                    path, int(bad.sum()), first)
        run["loss"][bad] = math.nan
    log.info("%s: %s format, %d points, steps %d..%d", path, fmt, len(steps), steps[0], steps[-1])
    return run


# ----------------------------------------------------------------------------------------------------------
# Smoothing


def phases_of(steps: np.ndarray, loss_txt: Path) -> np.ndarray:
    """The phase of each step, from train.py's "# phase N from ... at step S" notes (phase N holds the steps after
    S); NaN before the first note (the first phase names none) or when there is no training_loss.txt."""
    phase = np.full(len(steps), math.nan)
    try:
        notes = [PHASE_NOTE.match(line.strip()) for line in loss_txt.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError):
        return phase
    for match in sorted((m for m in notes if m), key=lambda m: int(m.group(2))):
        phase[steps > int(match.group(2))] = float(match.group(1))
    return phase


def phase_starts(phase: np.ndarray) -> list[int]:
    """Indices where a new phase starts (not the first point): where the phase number changes. NaN (not said)
    counts as a value of its own: in a training_loss.txt the first phase has no "# phase" note."""
    same = (phase[1:] == phase[:-1]) | (np.isnan(phase[1:]) & np.isnan(phase[:-1]))
    return [int(i) + 1 for i in np.flatnonzero(~same)]


def smooth_by_phase(values: np.ndarray, phase: np.ndarray, n: int) -> np.ndarray:
    """moving_average restarted at every phase start: a new phase's loss is not averaged with the last one's."""
    bounds = [0, *phase_starts(phase), len(values)]
    return np.concatenate([moving_average(values[a:b], n) for a, b in zip(bounds, bounds[1:])]) if len(values) \
        else np.asarray(values, dtype=float)


def moving_average(values, n: int) -> np.ndarray:
    """Trailing moving average over n points: out[i] = mean(values[max(0, i - n + 1) : i + 1]).

    The output has the input's length: the first n - 1 points average over the points seen so far.
    NaN/inf values are skipped; a window holding no finite value gives NaN. n <= 1 returns a copy.
    """
    x = np.asarray(values, dtype=float)
    if n <= 1 or x.size == 0:
        return x.copy()
    finite = np.isfinite(x)
    csum = np.concatenate([[0.0], np.cumsum(np.where(finite, x, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(finite)])
    hi = np.arange(1, x.size + 1)
    lo = np.maximum(0, hi - n)
    total, count = csum[hi] - csum[lo], ccount[hi] - ccount[lo]
    out = np.full(x.size, math.nan)
    np.divide(total, count, out=out, where=count > 0)
    return out


# ----------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    return build_options_parser(PlotLossConfig, __doc__, prog=PROG)


def default_labels(paths: list) -> list:
    """Each file's parent directory name; repeated names get ' (2)', ' (3)', ..."""
    labels: list[str] = []
    seen: dict[str, int] = {}
    for path in paths:
        name = path.resolve().parent.name or str(path)
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return labels


def draw_run(config: PlotLossConfig, ax, ax_eval, path: Path, label: str, r: dict, color: str, several: bool) -> None:
    """One run's loss curve (raw and smoothed, per phase), its phase marks and its eval points."""
    steps, loss = r["step"], r["loss"]
    marker = "o" if len(steps) == 1 else None  # a lone point would otherwise be invisible
    n = config.smooth
    if n > len(steps):
        log.warning("%s: --smooth %d is larger than its %d points; using %d", path, n, len(steps), len(steps))
        n = len(steps)
    if n > 1:
        ax.plot(steps, loss, color=color, alpha=0.25, linewidth=0.8)
        curve = smooth_by_phase(loss, r["phase"], n)
        ax.plot(steps, curve, color=color, linewidth=1.6, label=label, marker=marker)
    else:
        curve = loss
        ax.plot(steps, loss, color=color, linewidth=1.2, label=label, marker=marker)
    for start in phase_starts(r["phase"]):
        ax.axvline(steps[start] - 0.5, color=color, linestyle=":", linewidth=1.0)
        name = f"phase {int(r['phase'][start])}" if np.isfinite(r["phase"][start]) else "new phase"
        ax.annotate(name, (steps[start], 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=8, color=color)
    if ax_eval is not None:
        for (key, name), style in zip(EVAL_FIELDS.items(), ("-", "--", ":")):
            has = np.isfinite(r[key])
            if has.any():
                ax_eval.plot(steps[has], r[key][has], color=color, linestyle=style, marker="o", markersize=3,
                             label=f"{label} {name}" if several else name)
    finite = curve[np.isfinite(curve)]
    if finite.size:
        log.info("%s: last %s loss %.6f at step %d", label, "smoothed" if n > 1 else "raw", finite[-1],
                 int(steps[np.isfinite(curve)][-1]))


def finish_axes(config: PlotLossConfig, ax, ax_eval, runs: list) -> None:
    """Scale, titles, labels and grids of the loss axes (and the eval axes under them)."""
    if config.logy:
        all_loss = np.concatenate([r["loss"] for r in runs])
        n_nonpos = int((all_loss[np.isfinite(all_loss)] <= 0).sum())
        if n_nonpos:
            log.warning("--logy: %d loss value(s) <= 0 cannot be drawn on a log axis", n_nonpos)
        ax.set_yscale("log")
    title = "Training loss"
    if config.smooth > 1:
        title += f" (moving average over {config.smooth} points)"
    ax.set_title(title)
    ax.set_xlabel("global step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if ax_eval is not None:
        ax.set_xlabel("")
        ax_eval.set_xlabel("global step")
        ax_eval.set_ylabel("held-out retrieval")
        ax_eval.set_title("Evaluation during training (--eval_local)", fontsize=10)
        ax_eval.grid(True, alpha=0.3)
        ax_eval.legend(loc="best", fontsize=8)


def run(config: PlotLossConfig) -> Path:
    paths = [resolve_input(name) for name in config.input]
    if config.labels is not None and len(config.labels) != len(paths):
        raise UserError(f"--labels: got {len(config.labels)} label(s) for {len(paths)} --input file(s); give one per input")
    labels = config.labels if config.labels is not None else default_labels(paths)
    runs = [read_log(path) for path in paths]

    with_eval = any(np.isfinite(r[key]).any() for r in runs for key in EVAL_FIELDS)
    if with_eval:
        fig, (ax, ax_eval) = plt.subplots(2, 1, figsize=(10, 8), sharex=True, height_ratios=[2, 1])
    else:
        fig, ax = plt.subplots(figsize=(10, 5.5))
        ax_eval = None
    for i, (path, label, r) in enumerate(zip(paths, labels, runs)):
        draw_run(config, ax, ax_eval, path, label, r, f"C{i % 10}", several=len(runs) > 1)
    finish_axes(config, ax, ax_eval, runs)
    handles, names = ax.get_legend_handles_labels()
    if config.lr:
        lr, steps = runs[0]["lr"], runs[0]["step"]
        has = np.isfinite(lr)
        if not has.any():
            log.warning("%s: no lr values; --lr draws nothing", paths[0])
        else:
            ax2 = ax.twinx()
            (line,) = ax2.plot(steps[has], lr[has], color="0.4", linestyle="--", linewidth=1.0)
            ax2.set_ylabel("learning rate")
            ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
            handles.append(line)
            names.append(f"lr ({labels[0]})")
    if len(handles) > 1 or config.lr:
        ax.legend(handles, names, loc="upper right")

    out = Path(config.output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=150, bbox_inches="tight")
    except (OSError, ValueError) as e:
        raise UserError(f"{out}: cannot write the plot ({getattr(e, 'strerror', None) or e}); choose another --output") from None
    finally:
        plt.close(fig)
    return out


def run_main(argv: list[str] | None = None) -> int:
    config = parse_config(PlotLossConfig, argv, __doc__, prog=PROG)
    setup_logging(config.verbose, default=logging.WARNING)
    out = run(config)
    if out is not None:
        print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 after a plot or --help, 2 after a usage error or a UserError (one line, no traceback)."""
    return run_cli(run_main, argv, out_flag="--output")


def console() -> None:
    """The command line (`python plot_training_loss.py`, `colintern-plot-loss`)."""
    sys.exit(main())


if __name__ == "__main__":
    console()
