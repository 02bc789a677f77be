"""The embedded default, end to end (docs/CONTRACT.md §9): what `make demo` runs.

    python -m colintern.scripts.demo --out outputs/demo

On a CPU, with no GPU and no hub access, it runs the seed README's whole workflow on a tiny
InternVL3.5-architecture model and a synthetic page corpus, calling the real scripts with real flags:

    1. python -m colintern.testing.tiny         the tiny model (random weights, local tokenizer)
    2. python -m colintern.testing.synthetic    synthetic pages: a colpali_train_set-style train set + a held-out BEIR set
    3. train.py --train_hub ...         epoch 1, in-batch negatives (LoRA + head)
    4. mine.py --ckpt epoch1            hard negatives mined with the epoch-1 checkpoint
    5. train.py --train_jsonl ...       epoch 2 on the mined triples, from the epoch-1 weights
    6-8. eval.py --local_dataset ...    the untrained base, epoch 1 and epoch 2 on the held-out set
    9-10. plot_training_loss.py, plot_vidore_metrics.py

Each command is printed (shell-quoted, copyable) before it runs, and its progress bars stream to the terminal.
A failing step stops the demo with one line naming it. At the end: a table (base / epoch 1 / epoch 2: nDCG@5,
nDCG@10, recall@5), the plot paths and the total time; demo_summary.json holds the same numbers.

Layout of --out (the seed's outputs/ layout, one level down):
    tiny/  synthetic/  train/  mine/  eval/{base,epoch1,epoch2}/  plots/  demo_summary.json

Why these defaults: one torch thread (a second one gains at most ~1.3x on a quiet machine, and on a busy
2-core machine two threads spin-wait and are several times slower), 2 tiles per page are enough for 224-px
pages, and 480 pages x 6 queries make one epoch long enough to learn the synthetic attributes in about a
minute of CPU.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from colintern.cli import parse_config, run_cli, setup_logging, to_argv
from colintern.errors import UserError
from colintern.settings import (DemoConfig, EvalConfig, MineConfig, PlotLossConfig, PlotMetricsConfig,
                                SyntheticConfig, TinyConfig, TrainConfig)

log = logging.getLogger("colintern.scripts.demo")
OUT_FLAG = "--out"  # named in one-line errors about the output location (full disk, ...)

REPO = Path(__file__).resolve().parents[2]
MARKER = ".colintern_demo"             # written first into --out: marks a directory this demo may replace
RUNS = ("base", "epoch1", "epoch2")
RUN_LABELS = {"base": "base", "epoch1": "epoch 1", "epoch2": "epoch 2"}
METRICS = (("ndcg_at_5", "nDCG@5"), ("ndcg_at_10", "nDCG@10"), ("recall_at_5", "recall@5"))
EVAL_TASK = "eval"                     # eval.py names a --local_dataset task after its directory
PLOT_FILES = ("training_loss.png", "metrics_ndcg_at_5.png", "metrics_ndcg_at_10.png", "metrics_recall_at_5.png",
              "main_metric_across_runs.png")
SUMMARY = "demo_summary.json"


def parse_args(argv: list[str] | None) -> DemoConfig:
    return parse_config(DemoConfig, argv, __doc__.split("\n\n")[0], prog="python -m colintern.scripts.demo",
                        epilog="\n\n".join(__doc__.split("\n\n")[1:]))


# ---------------------------------------------------------------------------------------------------------
# Running the steps


def shown_path(path: str | Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it, else absolute."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def script(name: str) -> str:
    """A top-level script of the repository, as a path the printed command can use."""
    return shown_path(REPO / name)


def child_env(threads: int) -> tuple[dict[str, str], dict[str, str]]:
    """(environment of every step, the variables the demo sets in it), so that printed commands can be re-run."""
    fixed = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if Path.cwd().resolve() != REPO:  # `python -m colintern.*` must find the package from anywhere
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        fixed["PYTHONPATH"] = os.pathsep.join(paths if str(REPO) in paths else [str(REPO), *paths])
    return {**os.environ, **fixed}, fixed


class Runner:
    """Prints each step's command, runs it with the demo's environment and stops the demo when it fails."""

    def __init__(self, total: int, env: dict[str, str]):
        self.total, self.env, self.index = total, env, 0
        self.commands: list[dict] = []

    def __call__(self, title: str, argv: list[str]) -> float:
        self.index += 1
        shown = shlex.join([shown_path(argv[0])] + argv[1:])
        print(f"\n[{self.index}/{self.total}] {title}\n$ {shown}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(argv, env=self.env, check=False).returncode
        except OSError as err:
            raise UserError(f"demo stopped at step {self.index}/{self.total} ({title}): could not start "
                            f"{argv[0]}: {err}") from None
        seconds = time.perf_counter() - t0
        if rc != 0:
            raise UserError(f"demo stopped at step {self.index}/{self.total} ({title}): the command above exited "
                            f"with status {rc} after {seconds:.0f} s; its own message is just above")
        print(f"[{self.index}/{self.total}] {title}: done in {seconds:.1f} s", flush=True)
        self.commands.append({"step": title, "command": shown, "seconds": round(seconds, 2)})
        return seconds


def prepare_out(out: Path) -> None:
    """Create --out, replacing an earlier demo run; refuse a non-empty directory the demo did not write."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(f"--out {out} is not empty and was not written by the demo; choose another directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by python -m colintern.scripts.demo; the demo replaces this directory on a re-run\n")


def read_metrics(summary_path: Path) -> dict[str, float]:
    """The table's metrics of one eval.py run: its summary.json values for the held-out task."""
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        task = summary["tasks"][EVAL_TASK]
        return {key: float(task[key]) for key, _ in METRICS}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{summary_path}: cannot read the {EVAL_TASK!r} task's metrics ({type(err).__name__}: "
                        f"{err}); re-run the demo") from None


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """The final table: one row per run, 4 decimals (the same numbers as the summaries, rounded)."""
    head = f"{'run':<10}" + "".join(f"{label:>10}" for _, label in METRICS)
    rows = [f"{RUN_LABELS[run]:<10}" + "".join(f"{metrics[run][key]:>10.4f}" for key, _ in METRICS) for run in RUNS]
    return "\n".join([head, "-" * len(head), *rows])


def count_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.verbose)
    t_start = time.perf_counter()
    out = Path(config.out)
    prepare_out(out)
    o = shown_path(out)
    tiny, syn = f"{o}/tiny", f"{o}/synthetic"
    train_dir, mined = f"{o}/train", f"{o}/mine/mined_triples.jsonl"
    epoch1, epoch2 = f"{train_dir}/colintern_heads_epoch1.pt", f"{train_dir}/colintern_heads_epoch2.pt"
    eval_dir, plots = f"{o}/eval", f"{o}/plots"
    py = sys.executable
    env, fixed = child_env(config.threads)
    run = Runner(10, env)

    print("ColIntern demo: the seed workflow on a tiny InternVL3.5-architecture model and synthetic pages, on the "
          f"CPU.\nEvery step's command is printed before it runs; to re-run one by hand, first:\n"
          f"$ export {' '.join(f'{k}={shlex.quote(v)}' for k, v in fixed.items())}", flush=True)

    # Every step is a settings object (checked when made), run as the command line it parses back from (to_argv).
    epoch1_settings = TrainConfig(model_id=tiny, train_hub=f"{syn}/train", out_dir=train_dir, epochs=1,
                                  max_tiles=config.max_tiles, batch_size=config.batch_size, lr=config.lr, lora=True,
                                  lora_r=config.lora_r, lora_alpha=config.lora_alpha, tau=config.tau, seed=config.seed,
                                  device="cpu", num_workers=config.num_workers, save_every=0)
    steps = [
        ("tiny model", "build the tiny model", [py, "-m", "colintern.testing.tiny"],
         TinyConfig(out=tiny, seed=config.seed)),
        ("synthetic corpus", "write the synthetic corpus", [py, "-m", "colintern.testing.synthetic"],
         SyntheticConfig(out=syn, n_train_pages=config.train_pages, n_eval_pages=config.eval_pages,
                         queries_per_page=config.queries_per_page, seed=config.seed)),
        ("train epoch 1", "train epoch 1 (in-batch negatives)", [py, script("train.py")], epoch1_settings),
        ("mine", "mine hard negatives with the epoch-1 checkpoint", [py, script("mine.py")],
         MineConfig(model_id=tiny, ckpt=epoch1, hub_name=f"{syn}/train", split="train", out_jsonl=mined, k=config.k,
                    method=config.mine_method, device="cpu", num_shards=1, shard_id=0)),
        ("train epoch 2", "train epoch 2 on the mined triples (from the epoch-1 weights)", [py, script("train.py")],
         epoch1_settings.replace(train_hub=None, train_jsonl=mined, resume_ckpt=epoch1, num_negs=config.num_negs,
                                 max_tiles=None)),
    ]
    evals = EvalConfig(model_id=tiny, local_dataset=[f"{syn}/eval"], out_dir=eval_dir, device="cpu")
    steps += [
        ("eval base", "evaluate the untrained base model (random head) on the held-out pages", [py, script("eval.py")],
         evals.replace(max_tiles=config.max_tiles, run_name="base")),
        ("eval epoch 1", "evaluate epoch 1 on the held-out pages", [py, script("eval.py")],
         evals.replace(ckpt=epoch1, run_name="epoch1")),
        ("eval epoch 2", "evaluate epoch 2 on the held-out pages", [py, script("eval.py")],
         evals.replace(ckpt=epoch2, run_name="epoch2")),
    ]
    seconds: dict[str, float] = {}
    for key, what, command, settings in steps:
        seconds[key] = run(what, [*command, *to_argv(settings)])
    smooth = max(1, min(20, count_lines(Path(train_dir) / "metrics.jsonl") // 10))
    seconds["plot loss"] = run("plot the training loss (both epochs, with the learning rate)", [
        py, script("plot_training_loss.py"), *to_argv(PlotLossConfig(
            input=[f"{train_dir}/metrics.jsonl"], labels=["epochs 1-2"], output=f"{plots}/training_loss.png",
            smooth=smooth, lr=True))])
    seconds["plot metrics"] = run("plot the held-out metrics of the three runs", [
        py, script("plot_vidore_metrics.py"), *to_argv(PlotMetricsConfig(inputs=[f"{eval_dir}/{r}" for r in RUNS],
                                                                          outdir=plots))])

    return report(config, out, seconds, run, fixed, time.perf_counter() - t_start)


def report(config: DemoConfig, out: Path, seconds: dict[str, float], run: Runner, fixed: dict[str, str],
           total: float) -> int:
    """The demo's table, demo_summary.json and the bar: exit status 1 when epoch 2 did not clear --min_gain."""
    o = shown_path(out)
    syn, train_dir, eval_dir, plots = f"{o}/synthetic", f"{o}/train", f"{o}/eval", f"{o}/plots"
    epoch1, epoch2 = f"{train_dir}/colintern_heads_epoch1.pt", f"{train_dir}/colintern_heads_epoch2.pt"
    metrics = {r: read_metrics(Path(eval_dir) / r / "summary.json") for r in RUNS}
    gain = metrics["epoch2"]["ndcg_at_5"] - metrics["base"]["ndcg_at_5"]
    plot_paths = [f"{plots}/{name}" for name in PLOT_FILES] + [f"{plots}/metrics.md", f"{plots}/metrics.csv"]
    summary = {
        "runs": {r: {"summary": f"{eval_dir}/{r}/summary.json", **metrics[r]} for r in RUNS},
        "gain_ndcg_at_5": gain,
        "min_gain": config.min_gain,
        "checkpoints": {"epoch1": epoch1, "epoch2": epoch2},
        "mined_triples": f"{o}/mine/mined_triples.jsonl",
        "plots": plot_paths,
        "seconds": {**{k: round(v, 2) for k, v in seconds.items()}, "total": round(total, 2)},
        "commands": run.commands,
        "environment": fixed,
        "settings": config.to_dict(),
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    n_queries = count_lines(Path(syn) / "eval" / "queries.jsonl")
    print(f"\nHeld-out synthetic pages ({config.eval_pages} pages, {n_queries} queries), exact MaxSim, mteb "
          "metrics:\n")
    print(format_table(metrics))
    print(f"\nepoch 2 vs the untrained base: nDCG@5 {gain:+.4f}")
    print("\nplots and tables:")
    for path in plot_paths:
        print(f"  {path}")
    print(f"summary: {o}/{SUMMARY}")
    print(f"total time: {minutes(total)} ({total:.1f} s)", flush=True)
    if not gain >= config.min_gain:  # NaN fails too
        print(f"error: training did not clear the bar: held-out nDCG@5 went from {metrics['base']['ndcg_at_5']:.4f} "
              f"to {metrics['epoch2']['ndcg_at_5']:.4f} ({gain:+.4f} < +{config.min_gain}); see the loss curve above",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, out_flag=OUT_FLAG))
