#!/usr/bin/env python
"""Compare ViDoRe evaluation runs: per-task bar charts, the main metric across runs, a Markdown table and a CSV.

    python plot_vidore_metrics.py --inputs outputs/eval/base outputs/eval/epoch1 outputs/eval/epoch2
    python plot_vidore_metrics.py --inputs outputs/eval_v1.json outputs/eval_v2.json \\
        --labels "E1 (in-batch)" "E2 (mined)" --outdir outputs/plots

Each --inputs item is a summary.json written by eval.py (docs/CONTRACT.md §8), a directory holding one, or a directory
whose sub-directories hold one each (e.g. outputs/eval: every <run_name>/summary.json, sorted by name).
summary.json:

    {"model": ..., "ckpt": ..., "benchmark": ..., "main_metric": "ndcg_at_5",
     "tasks": {"<task>": {"ndcg_at_5": 0.61, "ndcg_at_10": 0.64, "recall_at_5": 0.77, ...}, ...},
     "average": {"ndcg_at_5": 0.58, ...},   # or a plain number: the main metric's average
     "mteb_version": ..., "dtype": ..., "batch_size": ...}

Only "tasks" is required. An "average" value given in the file is used as is; a metric it lacks is averaged
over the run's tasks here. Runs that cover different tasks are allowed (with a warning): a missing task has
no bar and no CSV row.

Writes into --outdir:
    metrics_<metric>.png          one grouped bar chart per --metrics entry (x: tasks + "average", bars: runs)
    main_metric_across_runs.png   the main metric's average over tasks, one bar per run, in --inputs order
    metrics.md                    the same numbers as Markdown tables (4 decimals; best run in bold)
    metrics.csv                   columns run,task,metric,value: one row per run x task x metric, plus
                                  task "average"; values are the summaries' numbers, unrounded
and prints the paths written, one per line.

Exit status: 0 on success, 2 on a user error (one line on stderr naming the file and what to do).
"""
import argparse
import csv
import json
import logging
import math
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from colintern.cli import build_parser as build_options_parser, parse_config, run_cli, setup_logging  # noqa: E402
from colintern.errors import UserError  # noqa: E402
from colintern.settings import PLOT_METRICS, PlotMetricsConfig  # noqa: E402

PROG = "plot_vidore_metrics.py"
log = logging.getLogger("colintern.plot_vidore_metrics")

DEFAULT_METRICS = PLOT_METRICS
DEFAULT_MAIN_METRIC = "ndcg_at_5"  # ViDoRe's headline metric, used when a summary names none
AVERAGE = "average"  # the pseudo-task holding each run's mean over tasks
METRIC_NAMES = {"ndcg": "nDCG", "recall": "Recall", "map": "MAP", "mrr": "MRR", "precision": "Precision",
                "hit_rate": "Hit rate", "cv_recall": "CV recall"}


def readable(metric: str) -> str:
    """ndcg_at_5 -> nDCG@5, recall_at_10 -> Recall@10; other names as they are."""
    match = re.fullmatch(r"(.+)_at_(\d+)", metric)
    if match and match.group(1) in METRIC_NAMES:
        return f"{METRIC_NAMES[match.group(1)]}@{match.group(2)}"
    return metric


def wrapped(label: str, width: int = 16) -> str:
    """A run label on several lines so that long ones do not overlap on an axis."""
    return "\n".join(textwrap.wrap(label, width, break_on_hyphens=False)) or label


# ----------------------------------------------------------------------------------------------------------
# Reading the summaries


def is_number(value) -> bool:
    """A finite JSON number (not a bool, not NaN/Infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def where(path: Path, text: str, key: str, start: int = 0) -> str:
    """'FILE:LINE' of the first JSON key `key` at or after `start` in text ('FILE' if not found)."""
    i = text.find(json.dumps(key), start)
    return str(path) if i < 0 else f"{path}:{text.count(chr(10), 0, i) + 1}"


def find_summaries(name: str) -> list:
    """The summary files an --inputs item stands for."""
    path = Path(name)
    if path.is_dir():
        if (path / "summary.json").is_file():
            return [path / "summary.json"]
        found = sorted(p for p in path.glob("*/summary.json") if p.is_file())
        if not found:
            raise UserError(f"{path}: no summary.json in this directory or its sub-directories; pass an eval run "
                            f"directory (e.g. outputs/eval/<run_name>) or the summary file itself")
        log.info("%s: found %d runs: %s", path, len(found), ", ".join(p.parent.name for p in found))
        return found
    if not path.exists():
        raise UserError(f"{path}: no such file; pass a summary.json written by eval.py or its directory")
    return [path]


def read_summary(path: Path, metrics: list) -> dict:
    """Load and check one summary. Returns {"path", "meta", "main_metric", "tasks", "given_average", "all_tasks"}:
    "tasks" is {task: {metric: number}} for the requested metrics only, "given_average" the file's own averages
    {metric: number}, "all_tasks" the file's "tasks" as read (for averaging a metric that was not requested)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; pass a summary.json written by eval.py") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                        f"re-run eval.py or fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: expected a JSON object (an eval summary), got {type(data).__name__}")
    if "tasks" not in data:
        raise UserError(f'{path}: missing "tasks"; this is not an eval.py summary.json '
                        f'(expected {{"tasks": {{task: {{metric: value}}}}, ...}})')
    tasks_at = max(0, text.find('"tasks"'))
    tasks = data["tasks"]
    if not isinstance(tasks, dict) or not tasks:
        raise UserError(f'{where(path, text, "tasks")}: "tasks" must be a non-empty object '
                        f'{{task: {{metric: value}}}}; did the evaluation finish?')
    picked: dict[str, Any] = {}
    for task, scores in tasks.items():
        at = where(path, text, task, tasks_at)
        if task == AVERAGE:
            raise UserError(f'{at}: a task is named "{AVERAGE}", which this script uses for the mean over tasks; '
                            f'rename that task')
        if not isinstance(scores, dict):
            raise UserError(f'{at}: task "{task}" must map metric names to numbers, got {type(scores).__name__}')
        picked[task] = {}
        for metric in metrics:
            if metric not in scores:  # tasks of different kinds (seed 004: retrieval and grounding) differ
                have = ", ".join(sorted(k for k, v in scores.items() if is_number(v))) or "none"
                log.warning('%s: task "%s" has no metric "%s" (it has: %s); no bar for it', at, task, metric, have)
                continue
            value = scores[metric]
            if not is_number(value):
                raise UserError(f'{at}: task "{task}": "{metric}" must be a finite number, got {value!r}')
            picked[task][metric] = value

    main_metric = data.get("main_metric")
    if main_metric is not None and not isinstance(main_metric, str):
        raise UserError(f'{where(path, text, "main_metric")}: "main_metric" must be a metric name, '
                        f'got {main_metric!r}')
    average = data.get("average")
    avg_where = where(path, text, "average")
    if average is None:
        given = {}
    elif is_number(average):  # a plain number: the main metric's average
        given = {main_metric or DEFAULT_MAIN_METRIC: average}
    elif isinstance(average, dict):
        given = {k: v for k, v in average.items() if is_number(v)}
        for metric in metrics:
            if metric in average and metric not in given and average[metric] is not None:
                raise UserError(f'{avg_where}: "average"."{metric}" must be a finite number, got {average[metric]!r}')
    else:
        raise UserError(f'{avg_where}: "average" must be {{metric: value}} or a number, got {average!r}')
    for metric in metrics:
        if not any(metric in scores for scores in picked.values()):
            have = ", ".join(sorted({k for s in tasks.values() for k, v in s.items() if is_number(v)})) or "none"
            raise UserError(f'{where(path, text, "tasks")}: no task has the metric "{metric}" (they have: {have}); '
                            f'choose --metrics among those')
    meta = {k: data.get(k) for k in ("model", "ckpt", "benchmark", "mteb_version", "dtype", "batch_size")}
    return {"path": path, "meta": meta, "main_metric": main_metric, "tasks": picked, "given_average": given,
            "all_tasks": tasks}


def run_average(summary: dict, metric: str):
    """The run's average of `metric` over its tasks: the file's own value when it has one, else computed here."""
    tasks = summary["all_tasks"]
    values = [s.get(metric) for s in tasks.values() if isinstance(s, dict)]
    numbers = [float(v) for v in values if v is not None and is_number(v)]
    computed = math.fsum(numbers) / len(numbers) if values and len(numbers) == len(values) else None
    given = summary["given_average"].get(metric)
    if given is None:
        return computed
    if computed is not None and abs(given - computed) > 5e-4:
        log.warning('%s: "average"."%s" is %.6f but the mean over its %d tasks is %.6f; plotting the file\'s value',
                    summary["path"], metric, given, len(values), computed)
    return given


# ----------------------------------------------------------------------------------------------------------
# Charts, tables


def grouped_bars(path: Path, metric: str, labels: list, groups: list, values: dict, title: str):
    """values[(label, group)] -> number (absent: no bar). One group per task, one bar per run."""
    n_runs = len(labels)
    width = 0.8 / n_runs
    fig_w = min(30.0, max(6.0, 1.5 + len(groups) * (0.35 * n_runs + 0.5)))
    fig, ax = plt.subplots(figsize=(fig_w, 5.0))
    x = np.arange(len(groups))
    label_bars = len(groups) * n_runs <= 60
    for i, label in enumerate(labels):
        heights = [values.get((label, g), math.nan) for g in groups]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), heights, width, label=wrapped(label, 28), color=f"C{i % 10}")
        if label_bars:
            ax.bar_label(bars, labels=["" if math.isnan(h) else f"{h:.3f}" for h in heights],
                         fontsize=7, rotation=90 if n_runs > 2 else 0, padding=2)
    if len(groups) > 1 and groups[-1] == AVERAGE:
        ax.axvline(len(groups) - 1.5, color="0.6", linestyle=":", linewidth=1)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=30 if len(groups) > 3 else 0, ha="right" if len(groups) > 3 else "center")
    finite = [v for v in values.values() if not math.isnan(v)]
    top = max(finite) if finite else 1.0
    ax.set_ylim(0, top * 1.2 if top > 0 else 1.0)
    ax.set_ylabel(readable(metric))
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    save(fig, path)


def across_runs(path: Path, metric: str, labels: list, values: list, title: str):
    """The main metric's average per run: one labelled bar per run, in --inputs order."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 1.1 * len(labels)), 4.5))
    x = np.arange(len(labels))
    bars = ax.bar(x, values, 0.6, color=[f"C{i % 10}" for i in range(len(labels))], alpha=0.85)
    ax.bar_label(bars, labels=[f"{v:.4f}" for v in values], fontsize=8, padding=2)
    ax.set_xticks(x)
    ax.set_xticklabels([wrapped(label) for label in labels], rotation=20 if len(labels) > 4 else 0,
                       ha="right" if len(labels) > 4 else "center")
    top = max(values)
    ax.set_ylim(0, top * 1.2 if top > 0 else 1.0)
    ax.set_ylabel(f"{readable(metric)} (average over tasks)")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    save(fig, path)


def save(fig, path: Path):
    try:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot write ({getattr(e, 'strerror', None) or e}); choose another --outdir") from None
    finally:
        plt.close(fig)


def md_cell(text) -> str:
    return "—" if text is None or text == "" else str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: list, rows: list, align: str) -> list:
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |",
             "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return lines


def md_numbers(values: list) -> list:
    """Format a row of numbers (None: missing) with 4 decimals, the best one in bold."""
    present = [v for v in values if v is not None]
    best = max(present) if len(present) > 1 else None
    return [None if v is None else (f"**{v:.4f}**" if v == best else f"{v:.4f}") for v in values]


# ----------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    return build_options_parser(PlotMetricsConfig, __doc__, prog=PROG)


def default_labels(paths: list) -> list:
    """summary.json -> its parent directory name; other files -> their name without extension.
    Repeated names get ' (2)', ' (3)', ..."""
    labels: list[str] = []
    seen: dict[str, int] = {}
    for path in paths:
        name = path.resolve().parent.name if path.name == "summary.json" else path.stem
        name = name or str(path)
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return labels


def run(config: PlotMetricsConfig) -> list:
    metrics = list(dict.fromkeys(config.metrics))  # drop repeats, keep order
    paths = [p for name in config.inputs for p in find_summaries(name)]
    if config.labels is not None:
        if len(config.labels) != len(paths):
            found = f" ({', '.join(str(p) for p in paths)})" if len(paths) != len(config.inputs) else ""
            raise UserError(f"--labels: got {len(config.labels)} label(s) for {len(paths)} run(s){found}; "
                            f"give one label per run")
        repeated = sorted({x for x in config.labels if config.labels.count(x) > 1})
        if repeated:
            raise UserError(f"--labels: {repeated[0]!r} is given more than once; labels must be unique")
    labels = config.labels if config.labels is not None else default_labels(paths)
    runs = [read_summary(p, metrics) for p in paths]
    for label, r in zip(labels, runs):
        log.info("%s: %s (%d tasks, model %s, ckpt %s)", label, r["path"], len(r["tasks"]),
                 r["meta"]["model"], r["meta"]["ckpt"])

    # Tasks in order of first appearance; a run lacking one is shown without that bar.
    tasks = list(dict.fromkeys(t for r in runs for t in r["tasks"]))
    for label, r in zip(labels, runs):
        missing = [t for t in tasks if t not in r["tasks"]]
        if missing:
            log.warning("%s: run %r has no result for %d task(s) (%s); its average covers fewer tasks",
                        r["path"], label, len(missing), ", ".join(missing))

    # values[metric][(label, task)] = number; task AVERAGE holds each run's average.
    values: dict[str, dict[tuple[str, str], float]] = {}
    for metric in metrics:
        values[metric] = {}
        for label, r in zip(labels, runs):
            for task, scores in r["tasks"].items():
                if metric in scores:
                    values[metric][(label, task)] = scores[metric]
            average = run_average(r, metric)
            if average is not None:  # no file average and not every task has it: no average bar
                values[metric][(label, AVERAGE)] = average

    mains = list(dict.fromkeys(r["main_metric"] for r in runs if r["main_metric"]))
    main_metric = config.main_metric or (mains[0] if mains else DEFAULT_MAIN_METRIC)
    if not config.main_metric and len(mains) > 1:
        log.warning("the summaries name different main metrics (%s); using %s (set --main_metric to choose)",
                    ", ".join(mains), main_metric)
    main_values = []
    for label, r in zip(labels, runs):
        value = values[main_metric].get((label, AVERAGE)) if main_metric in values else run_average(r, main_metric)
        if value is None:
            raise UserError(f'{r["path"]}: no value for main metric "{main_metric}" (not in "average" and not in '
                            f'every task); pass --main_metric with a metric the summaries have')
        main_values.append(value)

    benchmarks = list(dict.fromkeys(str(r["meta"]["benchmark"]) for r in runs if r["meta"]["benchmark"]))
    bench = f"{' / '.join(benchmarks)}: " if benchmarks else ""
    data_name = " / ".join(benchmarks) or " / ".join(tasks)

    outdir = Path(config.outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{outdir}: cannot create the output directory ({e.strerror}); choose another --outdir") from None
    written = []
    groups = tasks + [AVERAGE] if len(tasks) > 1 else tasks  # one task: its "average" would repeat it
    for metric in metrics:
        path = outdir / f"metrics_{re.sub(r'[^A-Za-z0-9_.-]', '_', metric)}.png"
        grouped_bars(path, metric, labels, groups, values[metric], f"{bench}{readable(metric)} per task")
        written.append(path)
    path = outdir / "main_metric_across_runs.png"
    across_runs(path, main_metric, labels, main_values, f"{bench}{readable(main_metric)}, average over tasks")
    written.append(path)

    return written + write_tables(outdir, data_name, labels, runs, tasks, groups, metrics, values, main_metric,
                                  main_values)


def write_tables(outdir: Path, data_name: str, labels: list, runs: list, tasks: list, groups: list, metrics: list,
                 values: dict, main_metric: str, main_values: list) -> list:
    """metrics.md (the run list, the main metric across runs, then one task x run table per metric) and metrics.csv
    (one row per run x task x metric, values unrounded); returns their paths."""
    written = []
    md = [f"# {data_name} metrics", "", "## Runs", ""]
    md += md_table(["run", "model", "ckpt", "benchmark", "summary"],
                   [[label, r["meta"]["model"], r["meta"]["ckpt"], r["meta"]["benchmark"], str(r["path"])]
                    for label, r in zip(labels, runs)], "lllll")
    md += ["", f"## Main metric: {readable(main_metric)} (`{main_metric}`, average over tasks)", ""]
    md += md_table(["run", main_metric], [[label, cell] for label, cell in zip(labels, md_numbers(main_values))],
                   "lr")
    for metric in metrics:
        md += ["", f"## {readable(metric)} (`{metric}`)", ""]
        rows = []
        for task in groups:
            cells = md_numbers([values[metric].get((label, task)) for label in labels])
            rows.append([f"**{AVERAGE}**" if task == AVERAGE else task] + cells)
        md += md_table(["task"] + labels, rows, "l" + "r" * len(labels))
    md_path = outdir / "metrics.md"
    csv_path = outdir / "metrics.csv"
    try:
        md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
        written.append(md_path)
        # metrics.csv: one row per run x task x metric (plus task "average"), values unrounded.
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["run", "task", "metric", "value"])
            for label in labels:
                for task in tasks + [AVERAGE]:  # the data keeps the average row even for one task
                    for metric in metrics:
                        value = values[metric].get((label, task))
                        if value is not None:
                            writer.writerow([label, task, metric, repr(value)])
        written.append(csv_path)
    except OSError as e:
        raise UserError(f"{e.filename}: cannot write ({e.strerror}); choose another --outdir") from None
    return written


def run_main(argv: list[str] | None = None) -> int:
    config = parse_config(PlotMetricsConfig, argv, __doc__, prog=PROG)
    setup_logging(config.verbose, default=logging.WARNING)
    written = run(config)
    for path in written or []:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 after a plot or --help, 2 after a usage error or a UserError (one line, no traceback)."""
    return run_cli(run_main, argv, out_flag="--outdir")


def console() -> None:
    """The command line (`python plot_vidore_metrics.py`, `colintern-plot-metrics`)."""
    sys.exit(main())


if __name__ == "__main__":
    console()
