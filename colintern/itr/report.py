"""Single-stage vs two-stage seed-004 training: the comparison and the efficiency report (docs/CONTRACT.md §12).

    python -m colintern.itr.report compare --runs outputs/eval/single outputs/eval/two_stage \\
        --labels Single Two-Stage --out outputs/itr_report
    python -m colintern.itr.report efficiency --train single=outputs/itr/single \\
        two_stage=outputs/itr/stage1,outputs/itr/stage2 --evals single=outputs/eval/single_e \\
        two_stage=outputs/eval/two_e --out outputs/itr_report

compare: every metric of two or more eval.py --itr_dataset summaries side by side, with the change of the last run
against the first (absolute, and relative where the first is not 0), as comparison.md / comparison.csv and a bar
chart per task (comparison_<task>.png).
efficiency: for each run (the training folders of its stages, in order), the epochs until T2I R@1 first reached
95 % of that run's best (from one eval summary per epoch: PREFIX1 ... PREFIXn), wall seconds of the training steps
(the sum of metrics.jsonl's "seconds"), pairs/s, trainable and total parameters (run_info.json) and the backbone
feature time; efficiency.md / efficiency.json and a R@1-per-epoch plot (efficiency.png).
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from colintern.cli import parse_command
from colintern.settings import CompareConfig, EfficiencyConfig
from colintern.errors import UserError
from colintern.files import atomic_write_json, atomic_write_text


def read_summary(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    path = path / "summary.json" if path.is_dir() else path
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        return summary["tasks"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path}: not an eval.py summary ({type(err).__name__}: {err})") from None


def compare(runs: list[str], labels: list[str], out: Path) -> str:
    """comparison.md/.csv and one bar chart per task; returns the markdown."""
    if len(runs) < 2 or len(labels) != len(runs):
        raise UserError("compare needs at least two --runs and one --labels entry per run")
    tasks = [read_summary(r) for r in runs]
    rows = []
    for task in tasks[0]:
        for metric in tasks[0][task]:
            values = [t.get(task, {}).get(metric) for t in tasks]
            if any(v is None for v in values):
                continue
            first, last = values[0], values[-1]
            rel = f"{(last - first) / abs(first):+.1%}" if first else "-"
            rows.append([task, metric, *[f"{v:.4f}" for v in values], f"{last - first:+.4f}", rel])
    head = ["task", "metric", *labels, f"change ({labels[-1]} - {labels[0]})", "relative"]
    md = "| " + " | ".join(head) + " |\n| " + " | ".join("---" for _ in head) + " |\n" + \
        "".join("| " + " | ".join(r) + " |\n" for r in rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.md", md)
    with open(out / "comparison.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([head, *rows])
    plot_comparison(tasks, labels, out)
    return md


def plot_comparison(tasks: list[dict], labels: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    for task in tasks[0]:
        metrics = [m for m in tasks[0][task] if all(m in t.get(task, {}) for t in tasks)]
        fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(metrics)), 3.6))
        width = 0.8 / len(tasks)
        for i, (t, label) in enumerate(zip(tasks, labels)):
            ax.bar(np.arange(len(metrics)) + i * width, [t[task][m] for m in metrics], width, label=label)
        ax.set_xticks(np.arange(len(metrics)) + width * (len(tasks) - 1) / 2)
        ax.set_xticklabels([m.replace("_", " ") for m in metrics], rotation=30, ha="right", fontsize=8)
        ax.set_title(task)
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
        fig.savefig(out / f"comparison_{task}.png", dpi=120, bbox_inches="tight")
        plt.close(fig)


def efficiency_row(label: str, train_dirs: list[Path], eval_prefix: str) -> dict[str, Any]:
    rows, infos = [], []
    for folder in train_dirs:
        try:
            rows += [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
            infos.append(json.loads((folder / "run_info.json").read_text()))
        except (OSError, ValueError) as err:
            raise UserError(f"{folder}: not a train.py --task itr folder ({err})") from None
    epochs = sum(max(r["epoch"] for r in rows if r.get("phase") == info["phase"]) for info in infos
                 if any(r.get("phase") == info["phase"] for r in rows))
    r1 = []
    for e in range(1, epochs + 1):
        r1.append(read_summary(f"{eval_prefix}{e}")["eval_t2i"]["recall_at_1"])
    best = max(r1)
    to_95 = next(e for e, v in enumerate(r1, start=1) if v >= 0.95 * best)
    wall = sum(r["seconds"] for r in rows)
    pairs = sum(r["pairs_per_s"] * r["seconds"] for r in rows)
    return {"run": label, "epochs": epochs, "t2i_r1_per_epoch": r1, "best_t2i_r1": best, "epochs_to_95pct_best": to_95,
            "train_seconds": round(wall, 2), "pairs_per_s": round(pairs / max(wall, 1e-9), 1),
            "feature_seconds": round(sum(i["feature_seconds"] for i in infos), 2),
            "trainable_params": infos[-1]["trainable_params"], "total_params": infos[-1]["total_params"],
            "peak_mem_gib": max(i.get("peak_mem_gib", 0.0) for i in infos),
            "peak_mem_kind": infos[-1].get("peak_mem_kind", "")}


def efficiency(train: list[str], evals: list[str], out: Path) -> str:
    """efficiency.md/.json and efficiency.png; returns the markdown."""
    trains = dict(item.split("=", 1) for item in train)
    prefixes = dict(item.split("=", 1) for item in evals)
    if set(trains) != set(prefixes):
        raise UserError("efficiency: --train and --evals must name the same runs (LABEL=...)")
    rows = [efficiency_row(label, [Path(p) for p in trains[label].split(",")], prefixes[label]) for label in trains]
    head = ["run", "epochs", "best T2I R@1", "epochs to 95 % of best", "train s (heads)", "pairs/s",
            "backbone features s", "trainable / total params", "peak memory GiB"]
    md = "| " + " | ".join(head) + " |\n| " + " | ".join("---" for _ in head) + " |\n" + "".join(
        f"| {r['run']} | {r['epochs']} | {r['best_t2i_r1']:.4f} | {r['epochs_to_95pct_best']} | {r['train_seconds']} | "
        f"{r['pairs_per_s']} | {r['feature_seconds']} | {r['trainable_params']:,} / {r['total_params']:,} | "
        f"{r['peak_mem_gib']:.2f} ({r['peak_mem_kind']}) |\n"
        for r in rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "efficiency.md", md)
    atomic_write_json(out / "efficiency.json", rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in rows:
        ax.plot(range(1, r["epochs"] + 1), r["t2i_r1_per_epoch"], marker="o", label=r["run"])
    ax.set_xlabel("epoch (all stages)")
    ax.set_ylabel("held-out T2I R@1")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(out / "efficiency.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return md


def main(argv: list[str] | None = None) -> int:
    command, config = parse_command({"compare": CompareConfig, "efficiency": EfficiencyConfig}, argv, __doc__,
                                    prog="python -m colintern.itr.model.report")
    if isinstance(config, CompareConfig):
        print(compare(config.runs, config.labels, Path(config.out)))
    else:
        assert isinstance(config, EfficiencyConfig)
        print(efficiency(config.train, config.evals, Path(config.out)))
    return 0


if __name__ == "__main__":
    from colintern.cli import run_cli

    sys.exit(run_cli(main, out_flag="--out"))
