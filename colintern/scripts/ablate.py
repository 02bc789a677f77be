"""The seed-002 ablation grid: which single-vector techniques add value (docs/CONTRACT.md §11).

    python -m colintern.scripts.ablate --out outputs/ablate            # offline, on a CPU: tiny model + synthetic pages
    python -m colintern.scripts.ablate --model_id OpenGVLab/InternVL3_5-1B-Instruct --train_hub vidore/colpali_train_set \\
        --eval_dir my_beir_set --out outputs/ablate --batch_size 64 --lr 5e-5 --epochs 1 --seeds 0 1 2

Every cell of pooling (last, mean, latent) x attention (causal, bidirectional) [x gather (global, local)] trains a
single-vector model with train.py on the same data, steps and seeds (LoRA with NV-Embed's settings), and is
evaluated on a held-out BEIR-layout set (pages, or any image set with text queries, e.g. an MSCOCO export) before
training (the cell's untrained base: same pooling and attention, fresh head) and after. On one process, "gather"
is contrasted the way it acts across GPUs: global = one softmax over both micro-batches (GradCache), local = each
micro-batch its own (gradient accumulation).

Writes, under --out: cells/<cell>/seed<S>/{base,trained}/summary.json (the eval.py summary shape, so
plot_vidore_metrics.py can plot any of them), grid.json (every number), grid.md (mean ± spread over seeds per cell,
and whether the differences between cells are larger than the seed noise) and grid.png.
"""
from __future__ import annotations

import itertools
import logging
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from colintern.cli import parse_config, run_cli, setup_logging, to_argv
from colintern.scripts.demo import child_env, script, shown_path
from colintern.errors import UserError
from colintern.settings import AblateConfig, TrainConfig
from colintern.files import atomic_write_json, atomic_write_text

log = logging.getLogger("colintern.scripts.ablate")

METRIC = "ndcg_at_5"
OUT_FLAG = "--out"


def parse_args(argv: list[str] | None) -> AblateConfig:
    return parse_config(AblateConfig, argv, __doc__, prog="python -m colintern.scripts.ablate")


def cell_name(pooling: str, attention: str, gather: str) -> str:
    return f"{pooling}-{attention}-{gather}"


def train_settings(config: AblateConfig, model_id: str, train_hub: str, pooling: str, attention: str, gather: str,
                   seed: int, out_dir: Path) -> TrainConfig:
    """train.py's settings for one (cell, seed). gather global = one softmax over 2 micro-batches (GradCache), local =
    each micro-batch its own softmax (plain accumulation): the contrast --gather makes across 2 processes."""
    latent = pooling == "latent"
    return TrainConfig(model_id=model_id, train_hub=train_hub, embedding="single", pooling=pooling,
                       attention=attention, lora_preset="nv-embed", lr=config.lr, tau=config.tau, epochs=config.epochs,
                       batch_size=config.batch_size // 2, grad_accum=2, max_tiles=config.max_tiles, seed=seed,
                       num_workers=0, save_every=0, device="cpu", out_dir=str(out_dir), overwrite=True,
                       grad_cache=gather == "global", latent_size=config.latent_size if latent else None,
                       latent_heads=config.latent_heads if latent else None)


def summary(model_id: str, ckpt: str | None, task: str, metrics: dict[str, float]) -> dict[str, Any]:
    """eval.py's summary.json shape for one evaluation (docs/CONTRACT.md §8)."""
    return {"model": model_id, "ckpt": ckpt, "benchmark": None, "main_metric": METRIC, "tasks": {task: metrics},
            "average": dict(metrics)}


def evaluate_cell(model_id: str, evaluator, ckpt: str, base_settings: dict[str, Any]) -> tuple[dict, dict]:
    """(untrained base, trained) metrics of one cell: the base has the cell's pooling and attention, a fresh head."""
    from colintern.retriever.model import ColIntern

    trained = ColIntern.from_pretrained(model_id, ckpt=ckpt, device="cpu")
    base = ColIntern.from_pretrained(model_id, device="cpu", **base_settings)
    return evaluator(base), evaluator(trained)


def spread(values: list[float]) -> float:
    """Half the range over seeds (0 for one seed): the noise a difference between cells must exceed."""
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def grid_markdown(grid: dict[str, Any]) -> str:
    lines = [f"# Single-vector ablation: {METRIC} on {grid['eval_set']}", "",
             f"{len(grid['seeds'])} seed(s) per cell; base = the cell's untrained model; "
             "mean ± half the range over seeds.", "",
             "| pooling | attention | gather | base | trained | gain |", "| --- | --- | --- | --- | --- | --- |"]
    for cell in grid["cells"]:
        lines.append(f"| {cell['pooling']} | {cell['attention']} | {cell['gather']} | {cell['base_mean']:.4f} | "
                     f"{cell['trained_mean']:.4f} ± {cell['trained_spread']:.4f} | {cell['gain_mean']:+.4f} |")
    lines += ["", grid["verdict"], ""]
    return "\n".join(lines)


def verdict(cells: list[dict[str, Any]], n_seeds: int) -> str:
    """Whether the best cell beats the worst by more than the seed noise."""
    best = max(cells, key=lambda c: c["trained_mean"])
    worst = min(cells, key=lambda c: c["trained_mean"])
    gap = best["trained_mean"] - worst["trained_mean"]
    noise = max(c["trained_spread"] for c in cells)
    if n_seeds < 2:
        return (f"Best cell {best['name']} ({best['trained_mean']:.4f}), worst {worst['name']} "
                f"({worst['trained_mean']:.4f}); one seed per cell: the seed noise is not measured, so these "
                "differences may be noise (run --seeds 0 1 2).")
    if gap <= 2 * noise:
        return (f"The differences between cells (best {best['name']} {best['trained_mean']:.4f}, worst "
                f"{worst['name']} {worst['trained_mean']:.4f}: {gap:.4f}) are within the seed noise (spread up to "
                f"{noise:.4f}): on this data no technique is shown to add value.")
    return (f"Best cell {best['name']} ({best['trained_mean']:.4f}) beats the worst, {worst['name']} "
            f"({worst['trained_mean']:.4f}), by {gap:.4f}, more than twice the largest seed spread ({noise:.4f}).")


def plot(grid: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = grid["cells"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cells) + 2), 4.5))
    x = range(len(cells))
    ax.bar(x, [c["base_mean"] for c in cells], 0.35, label="untrained base", color="0.7")
    ax.bar([i + 0.35 for i in x], [c["trained_mean"] for c in cells], 0.35, label="trained", color="C0",
           yerr=[c["trained_spread"] for c in cells], capsize=3)
    ax.set_xticks([i + 0.175 for i in x])
    ax.set_xticklabels([c["name"].replace("-", "\n") for c in cells], fontsize=8)
    ax.set_ylabel(f"{METRIC} (held out)")
    ax.set_title(f"Single-vector ablation, {len(grid['seeds'])} seed(s) per cell (bars: mean, whiskers: spread)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.verbose)
    from colintern.retriever.checkpoint import load_checkpoint
    from colintern.eval.evaluation import LocalEvaluator

    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose another --out")
    shutil.rmtree(out / "cells", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    env, _ = child_env(config.threads)
    model_id, train_hub, eval_dir = config.model_id, config.train_hub, config.eval_dir
    if model_id is None:
        model_id = str(out / "tiny")
        subprocess.run([sys.executable, "-m", "colintern.testing.tiny", model_id], env=env, check=True, capture_output=True)
    if train_hub is None or eval_dir is None:
        from colintern.testing.synthetic import generate

        generate(str(out / "synthetic"))
        train_hub, eval_dir = train_hub or str(out / "synthetic" / "train"), eval_dir or str(out / "synthetic" / "eval")
    evaluator = LocalEvaluator(eval_dir)
    cells = []
    start = time.perf_counter()
    combos = list(itertools.product(config.poolings, config.attentions, config.gathers))
    for n, (pooling, attention, gather) in enumerate(combos, start=1):
        name = cell_name(pooling, attention, gather)
        runs = []
        for seed in config.seeds:
            run_dir = out / "cells" / name / f"seed{seed}"
            train_config = train_settings(config, model_id, train_hub, pooling, attention, gather, seed,
                                          run_dir / "train")
            argv = [script("train.py"), *to_argv(train_config)]
            log.info("[%d/%d] %s seed %d: %s", n, len(combos), name, seed, " ".join(argv[1:]))
            done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
                raise UserError(f"cell {name} seed {seed}: train.py failed: {tail}")
            ckpt = str(run_dir / "train" / f"colintern_heads_epoch{config.epochs}.pt")
            settings = {"embedding": "single", "pooling": pooling, "attention": attention, "n_augmentation": 0,
                        "max_tiles": config.max_tiles, "head_seed": 0}
            saved = load_checkpoint(ckpt)["config"]
            settings.update(query_suffix=saved["query_suffix"], latent=saved["latent"])
            base, trained = evaluate_cell(model_id, evaluator, ckpt, settings)
            for kind, metrics, path in (("base", base, None), ("trained", trained, ckpt)):
                atomic_write_json(run_dir / kind / "summary.json", summary(model_id, path, evaluator.name, metrics))
            runs.append({"seed": seed, "base": base[METRIC], "trained": trained[METRIC], "ckpt": shown_path(ckpt)})
            log.info("%s seed %d: %s %.4f -> %.4f", name, seed, METRIC, base[METRIC], trained[METRIC])
        trained_values = [r["trained"] for r in runs]
        cells.append({"name": name, "pooling": pooling, "attention": attention, "gather": gather, "runs": runs,
                      "base_mean": statistics.fmean(r["base"] for r in runs),
                      "trained_mean": statistics.fmean(trained_values), "trained_spread": spread(trained_values),
                      "gain_mean": statistics.fmean(r["trained"] - r["base"] for r in runs)})
    grid = {"metric": METRIC, "eval_set": evaluator.name, "model": model_id, "train": train_hub,
            "seeds": config.seeds, "settings": {k: getattr(config, k) for k in ("epochs", "batch_size", "lr", "tau",
                                                                          "max_tiles", "latent_size", "latent_heads")},
            "cells": cells, "seconds": round(time.perf_counter() - start, 1)}
    grid["verdict"] = verdict(cells, len(config.seeds))
    atomic_write_json(out / "grid.json", grid)
    text = grid_markdown(grid)
    atomic_write_text(out / "grid.md", text)
    plot(grid, out / "grid.png")
    print(text)
    print(f"grid: {shown_path(out / 'grid.md')}, {shown_path(out / 'grid.json')}, {shown_path(out / 'grid.png')} "
          f"({grid['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, out_flag=OUT_FLAG))
