"""Training-step speed of the real trainer: query-page pairs/s and peak memory vs batch size, per training mode.

Every configuration runs train.py itself (its main(), in a fresh child process so that peak memory belongs to
that configuration alone) for a few optimizer steps on a synthetic corpus, and reads the per-step wall time
train.py writes to metrics.jsonl (data loading, forward, backward, optimizer: everything a step costs).

Modes (train.py flags):
  lora_gc    --lora --gradient_checkpointing             LoRA + head, activations recomputed in the backward
  lora       --lora                                      LoRA + head, activations kept (more memory)
  heads      (no --lora), 2 epochs                       head only on a frozen backbone; epoch 1 fills the
                                                         hidden-state cache, epoch 2 runs from it: both reported
  gradcache  --lora --grad_cache, micro-batch --gc_micro  one softmax over the whole batch with the activation
             x grad_accum (batch / gc_micro)             memory of one micro-batch
Steady-state pairs/s = pairs / seconds summed over the steps after the first --warmup_steps (heads: over
epoch 1 and epoch 2 separately, each without its first step).

    python bench/train_step.py                             # tiny model on this machine: the CPU smoke run
    python bench/train_step.py --model_id random:internvl3_5-1b --page_size 896 --max_tiles 4 \\
        --batch_sizes 8 16 32 64                           # GPU: InternVL3.5-1B shapes, random weights
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchlib import REPO, env, loadavg, print_table, write_json  # noqa: E402

from colintern.cli import run_cli, setup_logging  # noqa: E402
from colintern.errors import UserError  # noqa: E402
from colintern.device import peak_memory_gib  # noqa: E402

log = logging.getLogger("colintern.bench.train_step")

MODES = ("lora_gc", "lora", "heads", "gradcache")
RANDOM_1B = "random:internvl3_5-1b"


def load_train_module():
    """train.py as a module (it is a script at the repository root, not part of the package)."""
    spec = importlib.util.spec_from_file_location("colintern_train_script", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_argv(mode: str, batch: int, args: argparse.Namespace, data_dir: str, out_dir: str,
               n_rows: int) -> tuple[list[str], dict[str, int]]:
    """train.py arguments of one (mode, batch) configuration and its step layout."""
    micro, accum = batch, 1
    if mode == "gradcache":
        micro = min(args.gc_micro, batch)
        if batch % micro:
            raise UserError(f"gradcache: batch {batch} is not a multiple of --gc_micro {micro}")
        accum = batch // micro
    steps_per_epoch = n_rows // batch
    if mode == "heads":
        epochs, steps = 2, 2 * steps_per_epoch
    else:
        epochs, steps = 1, args.warmup_steps + args.steps
    argv = ["--model_id", args.model_id, "--train_hub", os.path.join(data_dir, "train"), "--out_dir", out_dir,
            "--batch_size", str(micro), "--grad_accum", str(accum), "--epochs", str(epochs),
            "--max_steps", str(steps), "--save_every", "0", "--num_workers", str(args.num_workers),
            "--device", args.device, "--dtype", args.dtype, "--seed", "0", "--lr", "1e-4"]
    if args.max_tiles:
        argv += ["--max_tiles", str(args.max_tiles)]
    if mode in ("lora_gc", "lora", "gradcache"):
        argv += ["--lora"]
    if mode == "lora_gc":
        argv += ["--gradient_checkpointing"]
    if mode == "gradcache":
        argv += ["--grad_cache"]
    if args.use_flash_attn:
        argv += ["--use_flash_attn"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv, {"micro_batch": micro, "grad_accum": accum, "steps_per_epoch": steps_per_epoch, "max_steps": steps}


def run_in_this_process(argv: list[str], device: str) -> dict[str, Any]:
    """Run train.main(argv) here; return its metrics.jsonl rows, wall time and peak memory."""
    train = load_train_module()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    t0 = time.perf_counter()
    code = train.main(argv)
    wall = time.perf_counter() - t0
    if code:
        raise UserError(f"train.py exited with {code}")
    out_dir = argv[argv.index("--out_dir") + 1]
    metrics = [json.loads(line) for line in Path(out_dir, "metrics.jsonl").read_text().splitlines() if line.strip()]
    peak, kind = peak_memory_gib(dev)
    return {"metrics": metrics, "wall_s": wall, "peak_mem_gib": peak, "peak_mem_kind": kind}


def run_child(argv: list[str], device: str, timeout: float) -> dict[str, Any]:
    """The same in a fresh Python process (so peak memory is this configuration's own)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        result_path = f.name
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", result_path, "--device", device, "--",
               *argv]
        env_vars = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env_vars, cwd=str(REPO))
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            oom = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
            return {"status": "OOM" if oom else f"failed: {tail[-1] if tail else proc.returncode}"}
        return {**json.loads(Path(result_path).read_text()), "status": "ok"}
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    finally:
        Path(result_path).unlink(missing_ok=True)


def steady(metrics: list[dict], skip: int) -> dict[str, float] | None:
    """pairs/s and s/step over the steps after the first `skip` (pairs of a step = pairs_per_s x seconds)."""
    rows = metrics[skip:]
    if not rows:
        return None
    seconds = sum(r["seconds"] for r in rows)
    pairs = sum(r["pairs_per_s"] * r["seconds"] for r in rows)
    return {"pairs_per_s": pairs / seconds, "s_per_step": seconds / len(rows), "steps": len(rows)}


def summarise(mode: str, result: dict[str, Any], warmup: int) -> dict[str, Any]:
    """The row of one configuration from its metrics (heads: cache-filling epoch and cached epoch)."""
    if result.get("status") != "ok":
        return {}
    metrics = result["metrics"]
    if mode == "heads":
        epochs = sorted({r["epoch"] for r in metrics})
        first = steady([r for r in metrics if r["epoch"] == epochs[0]], 1)
        cached = steady([r for r in metrics if r["epoch"] == epochs[-1]], 1) if len(epochs) > 1 else None
        main = cached or first
        return {"pairs_per_s": main and main["pairs_per_s"], "s_per_step": main and main["s_per_step"],
                "steps_measured": main and main["steps"], "uncached_pairs_per_s": first and first["pairs_per_s"],
                "cached_speedup": (cached["pairs_per_s"] / first["pairs_per_s"]) if cached and first else None}
    s = steady(metrics, warmup)
    return {"pairs_per_s": s and s["pairs_per_s"], "s_per_step": s and s["s_per_step"],
            "steps_measured": s and s["steps"]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_child":  # internal: run one configuration, write its result JSON
        result_path, device, train_args = argv[1], argv[3], argv[5:]
        logging.basicConfig(level=logging.WARNING)
        Path(result_path).write_text(json.dumps(run_in_this_process(train_args, device)))
        return 0

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_id", default=None, help=f"model folder or hub id for train.py; '{RANDOM_1B}' writes a "
                   "random-weight InternVL3.5-1B-shaped folder first (default: the tiny model, built in a "
                   "temporary folder)")
    p.add_argument("--data_dir", default=None, help="a colintern.testing.synthetic output folder (its train/ split is "
                   "used); default: generated in a temporary folder with enough rows for the largest batch")
    p.add_argument("--modes", nargs="+", default=["lora_gc", "heads", "gradcache"], choices=MODES,
                   help="training modes (default: lora_gc heads gradcache)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 16, 32],
                   help="query-page pairs per optimizer step (default: 8 16 32)")
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps per configuration "
                   "(default: 3; heads mode runs 2 whole epochs instead)")
    p.add_argument("--warmup_steps", type=int, default=1, help="untimed first steps (default: 1)")
    p.add_argument("--gc_micro", type=int, default=8, help="gradcache: pairs per micro-batch (default: 8)")
    p.add_argument("--page_size", type=int, default=224, help="synthetic pages' short side in pixels "
                   "(default: 224, i.e. 4-6 tiles of the tiny model's 112 px; use 896 for 448-px models)")
    p.add_argument("--max_tiles", type=int, default=None, help="train.py --max_tiles (default: train.py's)")
    p.add_argument("--device", default="auto", help="train.py --device: cpu, cuda or auto (default: auto)")
    p.add_argument("--dtype", default="auto", help="train.py --dtype (default: auto = bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--use_flash_attn", action="store_true", help="train.py --use_flash_attn")
    p.add_argument("--num_workers", type=int, default=2, help="train.py --num_workers (default: 2, train.py's)")
    p.add_argument("--threads", type=int, default=None, help="train.py --threads: torch intra-op threads of the "
                   "training process (default: train.py's, i.e. torch's default, one per core)")
    p.add_argument("--in_process", action="store_true", help="run train.py in this process instead of a child "
                   "per configuration (faster start; peak memory is then the whole process's)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration (default: 1800)")
    p.add_argument("--json_out", default="outputs/bench/train_step.json", help="result file "
                   "(default: outputs/bench/train_step.json)")
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.steps < 1 or args.warmup_steps < 0 or args.gc_micro < 1:
        raise UserError("--batch_sizes, --steps and --gc_micro must be at least 1, --warmup_steps at least 0")
    setup_logging()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    load_before = loadavg()
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
    try:
        if args.model_id is None:
            from colintern.backbones.internvl import build_tiny_internvl

            args.model_id = build_tiny_internvl(os.path.join(tmp.name, "tiny"), layout="native", seed=0)
            model_label = "tiny InternVL3.5-architecture model (colintern.testing.tiny)"
        elif args.model_id == RANDOM_1B:
            from encode import save_random_internvl35_1b

            # built on the CPU: this parent process must not hold GPU memory while the children train
            args.model_id = save_random_internvl35_1b(os.path.join(tmp.name, "internvl35_1b"), torch.device("cpu"))
            model_label = "InternVL3.5-1B shapes, random weights"
        else:
            model_label = args.model_id
        rows_needed = max(max(args.batch_sizes) * (args.warmup_steps + args.steps),
                          max(args.batch_sizes) * 3)  # heads: >= 3 steps per epoch at the largest batch
        data_dir = args.data_dir
        if data_dir is None:
            from colintern.testing.synthetic import generate

            data_dir = os.path.join(tmp.name, "data")
            generate(data_dir, n_train_pages=-(-rows_needed // 3), n_eval_pages=1, queries_per_page=3,
                     page_size=args.page_size)
        import datasets

        n_rows = len(datasets.load_from_disk(os.path.join(data_dir, "train")))
        rows = []
        for mode in args.modes:
            for batch in args.batch_sizes:
                out_dir = os.path.join(tmp.name, f"run_{mode}_{batch}")
                targv, layout = train_argv(mode, batch, args, data_dir, out_dir, n_rows)
                if layout["steps_per_epoch"] < (3 if mode == "heads" else args.warmup_steps + args.steps):
                    raise UserError(f"{n_rows} training rows are too few for {mode} at batch {batch}; "
                                    "pass a larger --data_dir")
                log.info("%s, batch %d: train.py %s", mode, batch, " ".join(targv))
                row = {"mode": mode, "batch": batch, **layout, "threads": args.threads or torch.get_num_threads(),
                       "load_before": loadavg()}
                t0 = time.perf_counter()
                if args.in_process:
                    result = {**run_in_this_process(targv, args.device), "status": "ok"}
                else:
                    result = run_child(targv, args.device, args.timeout)
                row.update(status=result["status"], wall_s=time.perf_counter() - t0, load_after=loadavg(),
                           peak_mem_gib=result.get("peak_mem_gib"), peak_mem_kind=result.get("peak_mem_kind"),
                           **summarise(mode, result, args.warmup_steps), metrics=result.get("metrics"))
                rows.append(row)
                log.info("%s, batch %d: %s", mode, batch, f"{row['pairs_per_s']:.1f} pairs/s, peak "
                         f"{row['peak_mem_gib']:.2f} GiB" if row["status"] == "ok" else row["status"])
    finally:
        tmp.cleanup()

    info = env(device)
    print(f"\nTraining step, {model_label}, train.py on {info['device']} ({args.dtype}); torch {info['torch']}, "
          f"transformers {info['transformers']}, peft {info['peft']}; {n_rows} synthetic rows, pages "
          f"{args.page_size} px; load {load_before} -> {loadavg()}")
    print_table(rows, [("mode", "mode", "s"), ("threads", "threads", "d"), ("batch", "pairs/step", "d"),
                       ("micro_batch", "micro", "d"),
                       ("grad_accum", "accum", "d"), ("pairs_per_s", "pairs/s", ".1f"), ("s_per_step", "s/step", ".3f"),
                       ("uncached_pairs_per_s", "uncached pairs/s", ".1f"), ("peak_mem_gib", "peak GiB", ".2f"),
                       ("status", "status", "s")])
    write_json(args.json_out, {
        "benchmark": "train_step", **info, "model": model_label, "train_dtype": args.dtype, "rows_in_corpus": n_rows,
        "page_size": args.page_size, "max_tiles": args.max_tiles, "num_workers": args.num_workers,
        "threads": args.threads, "steps": args.steps, "warmup_steps": args.warmup_steps, "in_process": args.in_process,
        "loadavg_before": load_before, "loadavg_after": loadavg(), "rows": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
