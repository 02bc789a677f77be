#!/usr/bin/env python
"""Evaluate a ColIntern checkpoint (or the bare base model) on ViDoRe through mteb, or on local BEIR-layout sets.

    python eval.py --ckpt outputs/train/colintern_heads_epoch1.pt                     # ViDoRe(v1), model from ckpt
    python eval.py --model_id OpenGVLab/InternVL3_5-1B-Instruct --run_name base      # the base model (baseline)
    python eval.py --ckpt CKPT --benchmark "ViDoRe(v1)" "ViDoRe(v2)" --tasks VidoreDocVQARetrieval
    python eval.py --ckpt CKPT --local_dataset outputs/demo/synthetic/eval --save_run
    python eval.py --list_benchmarks

Every task runs through mteb's own retrieval evaluation (mteb 2.x): local sets become mteb retrieval tasks
named after their directory. Writes into <out_dir>/<run_name>/ (docs/CONTRACT.md §8):

    summary.json      {"model", "ckpt", "benchmark", "main_metric", "tasks": {task: {"ndcg_at_5", "ndcg_at_10",
                      "recall_at_5", ...}}, "average": {metric: mean over tasks}, "mteb_version", "dtype",
                      "batch_size", ...}; metrics are mteb's, averaged over a task's language subsets, with the
                      ndcg/map/recall/precision/hit_rate values recomputed unrounded from mteb's retrieval results
                      (mteb's files round them to 5 decimals)
    results/<model>/<revision>/<task>.json, model_meta.json, run_settings.jsonl   mteb's result files (ResultCache)
    runs/<task>.json  with --save_run: {query_id: {corpus_id: score}}, the top 100 pages per query
                      (runs/<task>.<subset>.json for each language subset of a multilingual task)

and prints a table (task, main metric, nDCG@5, nDCG@10, recall@5, and the average).

Offline: local sets need no network (HF_HUB_OFFLINE=1 works); a hub task that cannot be downloaded stops at once
with one line saying why. An interrupted run resumes: tasks whose mteb results are already in the run directory
are not recomputed (same model, checkpoint and settings only); --overwrite starts over.

Exit status: 0 on success, 2 on a user error (one line on stderr).
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any


from colintern.cli import run_cli, setup_logging  # noqa: E402
from colintern.errors import UserError  # noqa: E402
from colintern.files import atomic_write_text, make_output_dir, note_path  # noqa: E402

log = logging.getLogger("colintern.eval")
OUT_FLAG = "--out_dir"  # named in one-line errors about the output location (full disk, ...)
# mteb's task and encoding bars nest (cursor-movement codes): only on a terminal, never in a captured log.
PROGRESS_BARS = sys.stderr.isatty()

DEFAULT_BENCHMARK = "ViDoRe(v1)"
RUN_TOP_K = 100
TABLE_METRICS = [("ndcg_at_5", "nDCG@5"), ("ndcg_at_10", "nDCG@10"), ("recall_at_5", "recall@5")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Outputs: OUT_DIR/RUN_NAME/summary.json (per-task nDCG, MAP, recall, precision and hit rate at k, and their average), mteb's "
                                "result files beside it, and with --save_run runs/TASK.json (top-100 pages per "
                                "query); docs/CONTRACT.md §8.")
    p.add_argument("--model_id", default=None,
                   help="backbone: hub id or local directory (default: the base model named in --ckpt's config; "
                        "required without --ckpt)")
    p.add_argument("--ckpt", default=None,
                   help="ColIntern checkpoint (colintern_heads_*.pt: head + LoRA + formatting config); omit it to "
                        "evaluate the base model with a freshly initialised head (a baseline)")
    p.add_argument("--benchmark", nargs="+", default=None, metavar="NAME",
                   help=f"mteb benchmark name(s), e.g. 'ViDoRe(v1)' 'ViDoRe(v2)' 'ViDoRe(v3)' (default: "
                        f"{DEFAULT_BENCHMARK}, unless only --local_dataset is given); see --list_benchmarks")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="evaluate only these tasks of the benchmark(s); a name outside them is looked up among all "
                        "mteb tasks (default: every task of the benchmark(s))")
    p.add_argument("--list_benchmarks", action="store_true",
                   help="print the benchmark names the installed mteb knows, one per line, and exit")
    p.add_argument("--local_dataset", nargs="+", default=[], metavar="DIR",
                   help="local BEIR-layout evaluation set(s): a folder with corpus, queries and qrels as .jsonl or "
                        ".parquet; corpus rows {corpus-id, image (bytes or a path relative to the folder)}, queries "
                        "{query-id, query}, qrels {query-id, corpus-id, score} (docs/CONTRACT.md §7). Each becomes "
                        "an mteb task named after its folder (default: none)")
    p.add_argument("--task_data", nargs="+", default=[], metavar="TASK=DIR",
                   help="read an mteb task's dataset from a local copy of its hub repo (same configs and files), "
                        "e.g. VidoreDocVQARetrieval=/data/docvqa_test_subsampled_beir (default: from the hub)")
    p.add_argument("--batch_size", type=int, default=8,
                   help="pages per forward pass; pages are sorted by tile count first (default: 8)")
    p.add_argument("--query_batch_size", type=int, default=32, help="queries per forward pass (default: 32)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="backbone dtype; auto = bf16 on CUDA, fp32 on CPU (default: auto). Heads and scores are "
                        "always fp32")
    p.add_argument("--device", default=None,
                   help="torch device for encoding and scoring (default: cuda when available, else cpu)")
    p.add_argument("--allow_other_base", action="store_true",
                   help="evaluate a --ckpt with a base model of the same architecture but other weights than the "
                        "one it was trained on (default: refuse; the checkpoint records its base weights)")
    p.add_argument("--use_flash_attn", action="store_true",
                   help="use flash-attention 2 when installed (default: sdpa)")
    p.add_argument("--pool_factor", type=int, default=1, help="hierarchical token pooling of every page: about K "
                   "times fewer vectors (search.py index --pool_factor); measures what it costs (default: 1, none)")
    p.add_argument("--max_tiles", type=int, default=None,
                   help="override the checkpoint's max_tiles (448-px tiles per page; changes the embeddings, so "
                        "it warns; default: the checkpoint's value, 6 for a bare base model)")
    p.add_argument("--out_dir", default="outputs/eval", help="parent of the run directory (default: outputs/eval)")
    p.add_argument("--run_name", default=None,
                   help="run directory name under --out_dir (default: the checkpoint's file stem, or 'base')")
    p.add_argument("--save_run", action="store_true",
                   help=f"also write runs/<task>.json: the top {RUN_TOP_K} pages and scores per query")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run directory's results instead of refusing (finished) or resuming "
                        "(interrupted)")
    p.add_argument("-v", "--verbose", action="store_true", help="log details (debug level; default: progress and results)")
    g = p.add_argument_group("image-text retrieval (seed 004; a checkpoint of train.py --task itr)")
    g.add_argument("--itr_dataset", default=None, metavar="DIR", help="a folder holding itr.jsonl (e.g. python -m "
                   "colintern.scenes OUT writes OUT/eval): T2I and I2T R@1/5/10, twin accuracy, box IoU/GIoU/L1 beside "
                   "the mean-box prior, relation accuracy/macro-F1 beside the shuffled-image control (default: none)")
    g.add_argument("--coco_images", default=None, help="with a COCO captions JSON as --itr_dataset: its images")
    g.add_argument("--coco_instances", default=None, help="with a COCO captions JSON: its instances JSON (boxes)")
    g.add_argument("--itm_rerank", type=int, default=0, metavar="K", help="with --itr_dataset: also re-rank each "
                   "caption's top K images by the matching head (default: 0 = off)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.query_batch_size < 1:
        raise UserError("--batch_size and --query_batch_size must be at least 1")
    if args.max_tiles is not None and args.max_tiles < 1:
        raise UserError("--max_tiles must be at least 1")
    if args.pool_factor < 1:
        raise UserError(f"--pool_factor must be at least 1, got {args.pool_factor}")
    return args


# ------------------------------------------------------------------------------------------------ tasks


def list_benchmarks() -> list[str]:
    import mteb

    return sorted(b.name for b in mteb.get_benchmarks())


def get_benchmark(name: str) -> Any:
    import mteb

    try:
        return mteb.get_benchmark(name)
    except (KeyError, ValueError):
        names = list_benchmarks()
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.4)
        vidore = [n for n in names if "vidore" in n.lower()]
        raise UserError(f"--benchmark {name!r}: the installed mteb {mteb.__version__} has no such benchmark; "
                        f"{'did you mean ' + ', '.join(close) + '? ' if close else ''}ViDoRe names: "
                        f"{', '.join(vidore)} (all names: --list_benchmarks)") from None


def get_task(name: str) -> Any:
    import mteb

    try:
        return mteb.get_task(name)
    except (KeyError, ValueError) as err:
        hint = str(err.args[0] if err.args else err).replace("KeyError: ", "")
        raise UserError(f"--tasks {name!r}: no such mteb task ({hint}); see a benchmark's tasks with "
                        f"python -c \"import mteb; print(mteb.get_benchmark('ViDoRe(v1)').tasks)\"") from None


def select_tasks(args: argparse.Namespace) -> tuple[list[Any], list[Any], str]:
    """(hub tasks, local tasks, benchmark label) from --benchmark / --tasks / --local_dataset / --task_data."""
    from colintern.evaluation import local_task, use_local_copy

    benchmarks = args.benchmark
    if benchmarks is None and args.tasks is None and not args.local_dataset:
        benchmarks = [DEFAULT_BENCHMARK]
    hub_tasks: list[Any] = []
    labels: list[str] = []
    for name in benchmarks or []:
        benchmark = get_benchmark(name)
        labels.append(benchmark.name)
        hub_tasks.extend(t for t in benchmark.tasks if t.metadata.name not in {h.metadata.name for h in hub_tasks})
    if args.tasks:
        by_name = {t.metadata.name: t for t in hub_tasks}
        picked = []
        for name in dict.fromkeys(args.tasks):
            if name in by_name:
                picked.append(by_name[name])
            else:
                task = get_task(name)
                if by_name:
                    log.warning("task %s is not part of %s; evaluating it as well", name, ", ".join(labels))
                picked.append(task)
        hub_tasks = picked
        if not labels:  # --tasks without --benchmark: name the tasks
            names = [t.metadata.name for t in hub_tasks]
            labels = [", ".join(names) if len(names) <= 3 else f"{len(names)} tasks"]
    copies = {}
    for item in args.task_data:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--task_data {item!r}: expected TASK=DIR")
        copies[name] = path
    known = {t.metadata.name for t in hub_tasks}
    for name, path in copies.items():
        if name not in known:
            raise UserError(f"--task_data {name}={path}: {name} is not among the selected tasks "
                            f"({', '.join(sorted(known)) or 'none'})")
    for task in hub_tasks:
        if task.metadata.name in copies:
            use_local_copy(task, copies[task.metadata.name])
    local_tasks = [local_task(path) for path in args.local_dataset]
    if local_tasks:
        labels.append("local")
    names = [t.metadata.name for t in hub_tasks + local_tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"two tasks are named {duplicates[0]!r} (a local set is named after its directory); "
                        f"rename one directory")
    if not names:
        raise UserError("no tasks selected")
    return hub_tasks, local_tasks, ", ".join(labels)


def load_hub_data(tasks: list[Any], copies: set[str]) -> list[Any]:
    """Load every hub task's data before the model (fail fast); private tasks without access are skipped."""
    from colintern.evaluation import load_task_data

    ready = []
    for task in tasks:
        name = task.metadata.name
        start = time.perf_counter()
        try:
            load_task_data(task, local=name in copies)
        except UserError as err:
            if not task.metadata.is_public:
                log.warning("skipping private task %s (its dataset needs granted access): %s", name, err)
                continue
            raise
        log.info("loaded %s in %.1fs", name, time.perf_counter() - start)
        ready.append(task)
    if not ready and tasks:
        raise UserError("none of the selected tasks could be loaded")
    return ready


# ------------------------------------------------------------------------------------------------ model


def default_model_id(ckpt: str) -> str:
    from colintern.checkpoint import base_model_of, load_checkpoint

    base = base_model_of(load_checkpoint(ckpt), ckpt)
    log.info("--model_id not given: using the checkpoint's base model %s", base)
    return base


def load_encoder(args: argparse.Namespace) -> Any:
    """The mteb encoder (mteb_model.ColInternMTEB) for --model_id / --ckpt."""
    from colintern.mteb_model import ColInternMTEB

    if args.ckpt and not Path(args.ckpt).is_file():
        raise UserError(f"--ckpt {args.ckpt}: no such file")
    model_id = args.model_id or default_model_id(args.ckpt)
    return ColInternMTEB(model_id, device=args.device, ckpt=args.ckpt,
                         dtype=None if args.dtype == "auto" else args.dtype, max_tiles=args.max_tiles,
                         batch_size=args.batch_size, query_batch_size=args.query_batch_size,
                         use_flash_attn=args.use_flash_attn, allow_other_base=args.allow_other_base,
                         pool_factor=args.pool_factor)


# ------------------------------------------------------------------------------------------------ evaluation


def run_dir_for(args: argparse.Namespace) -> Path:
    """<out_dir>/<run_name>; refuses a finished run unless --overwrite (checked before any work is done)."""
    run_name = args.run_name or (Path(args.ckpt).stem if args.ckpt else "base")
    if not run_name or "/" in run_name or os.sep in run_name or run_name in (".", ".."):
        raise UserError(f"--run_name {run_name!r}: must be a plain directory name")
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise UserError(f"--out_dir {args.out_dir} is a file, not a folder; choose another --out_dir")
    run_dir = Path(args.out_dir) / run_name
    summary = run_dir / "summary.json"
    if summary.exists() and not args.overwrite:
        raise UserError(f"{summary} exists; pass --overwrite to replace this run or choose another --run_name")
    return run_dir


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create the run directory; with --overwrite, remove the previous summary and run files first."""
    summary = run_dir / "summary.json"
    if overwrite:
        for stale in (summary, run_dir / "runs"):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
    elif run_dir.exists():
        log.info("%s exists without summary.json: resuming (finished tasks are not recomputed)", run_dir)
    make_output_dir(run_dir, "--out_dir")


def numeric_scores(scores: dict[str, Any]) -> dict[str, float]:
    skip = {"main_score", "evaluation_time"}
    return {k: float(v) for k, v in scores.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def mean_dicts(items: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over the dicts, for the keys every dict has."""
    if not items:
        return {}
    keys = [k for k in items[0] if all(k in d for d in items)]
    return {k: math.fsum(d[k] for d in items) / len(items) for k in keys}


def remove_torn_json(folder: Path) -> list[Path]:
    """Delete the .json files under folder that do not parse (written by mteb when the disk filled), so that a rerun
    recomputes those tasks instead of failing on them; returns what was deleted."""
    torn = []
    for path in sorted(folder.rglob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            path.unlink(missing_ok=True)
            torn.append(path)
    return torn


def evaluate(encoder: Any, tasks: list[Any], run_dir: Path, *, benchmark: str, args: argparse.Namespace) -> dict:
    """Run mteb on the tasks, write runs and summary.json into run_dir; return the summary."""
    import mteb

    from colintern.evaluation import K_VALUES, language_averages, retrieval_metrics, task_qrels, top_run

    predictions = run_dir / ".predictions"
    shutil.rmtree(predictions, ignore_errors=True)
    start = time.perf_counter()
    try:
        result = mteb.evaluate(
            encoder, tasks,
            encode_kwargs={"batch_size": args.batch_size, "show_progress_bar": PROGRESS_BARS},
            cache=mteb.ResultCache(run_dir),
            overwrite_strategy="always" if args.overwrite else "only-missing",
            prediction_folder=predictions,
            co2_tracker=False,
            show_progress_bar=PROGRESS_BARS,
        )
    except OSError as err:  # e.g. a full disk while mteb wrote its files: leave none of them torn
        shutil.rmtree(predictions, ignore_errors=True)
        torn = remove_torn_json(run_dir)
        raise note_path(err, torn[0] if torn else run_dir)
    seconds = time.perf_counter() - start
    if result.exceptions:
        first = result.exceptions[0]
        raise UserError(f"{first.task_name}: evaluation failed: {first.exception}")
    by_name = {t.metadata.name: t for t in tasks}
    task_scores: dict[str, dict[str, float]] = {}
    subset_scores: dict[str, dict[str, dict[str, float]]] = {}
    main_metrics: dict[str, str] = {}
    runs_dir = run_dir / "runs"
    for task_result in result.task_results:
        name = task_result.task_name
        task = by_name[name]
        main_metrics[name] = task.metadata.main_score
        prediction_file = predictions / f"{name}_predictions.json"
        predicted = json.loads(prediction_file.read_text()) if prediction_file.exists() else None
        if predicted is None:
            log.info("%s: mteb results reused from %s (no new run file)", name, run_dir)
        entries = []
        multi_split = len(task_result.scores) > 1
        for split, split_scores in task_result.scores.items():
            multi_subset = len(split_scores) > 1
            for scores in split_scores:
                subset = scores["hf_subset"]
                metrics = numeric_scores(scores)
                results = (predicted or {}).get(subset, {}).get(split)
                if results is not None:
                    qrels = task_qrels(task, subset, split)
                    exact = retrieval_metrics(qrels, results, tuple(getattr(task, "k_values", K_VALUES)))
                    for key, value in exact.items():
                        if key in metrics and abs(metrics[key] - value) > 6e-6:
                            log.warning("%s %s/%s: %s recomputed %.6f differs from mteb's %.6f", name, subset,
                                        split, key, value, metrics[key])
                    metrics.update(exact)
                    if args.save_run:
                        suffix = (f".{subset}" if multi_subset else "") + (f".{split}" if multi_split else "")
                        write_json(runs_dir / f"{name}{suffix}.json", top_run(results, RUN_TOP_K))
                entries.append(metrics)
                if multi_subset or multi_split:
                    key = subset if not multi_split else f"{subset}/{split}"
                    subset_scores.setdefault(name, {})[key] = {k: metrics[k] for k, _ in TABLE_METRICS
                                                               if k in metrics}
        task_scores[name] = mean_dicts(entries)
    shutil.rmtree(predictions, ignore_errors=True)
    order = [t.metadata.name for t in tasks if t.metadata.name in task_scores]
    task_scores = {name: task_scores[name] for name in order}
    main_metric = main_metrics[order[0]]
    if len(set(main_metrics.values())) > 1:
        log.warning("tasks have different main metrics (%s); summary main_metric is %s",
                    ", ".join(sorted(set(main_metrics.values()))), main_metric)
    languages, english = language_averages(subset_scores, by_name, task_scores)
    summary = {
        "model": encoder.model_id,
        "ckpt": args.ckpt,
        "benchmark": benchmark,
        "main_metric": main_metric,
        "tasks": task_scores,
        "average": mean_dicts(list(task_scores.values())),
        "mteb_version": mteb.__version__,
        "dtype": encoder.dtype,
        "batch_size": args.batch_size,
        "pool_factor": args.pool_factor,
        "main_metrics": main_metrics,
        "subsets": subset_scores,
        "languages": languages,  # per language, over tasks (ViDoRe V3); "average" is the all-language number
        "average_english": english,
        "model_name": encoder.mteb_model_meta.name,
        "model_revision": encoder.mteb_model_meta.revision,
        "config": encoder.config,
        "device": str(encoder.device),
        "seconds": round(seconds, 1),
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (colintern.files.atomic_write_text), readable as it is (non-ASCII kept)."""
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def format_table(summary: dict) -> str:
    """Task | main metric | nDCG@5 | nDCG@10 | recall@5, plus the average row."""
    rows = [["task", "main metric", *[label for _, label in TABLE_METRICS]]]
    for name, scores in summary["tasks"].items():
        main = summary["main_metrics"].get(name, summary["main_metric"])
        rows.append([name, f"{main}={scores.get(main, float('nan')):.4f}",
                     *[f"{scores.get(k, float('nan')):.4f}" for k, _ in TABLE_METRICS]])
    main = summary["main_metric"]
    languages = summary.get("languages") or {}
    extra = [(f"language {code}", scores) for code, scores in languages.items()] if len(languages) > 1 else []
    if extra and summary.get("average_english"):
        extra.append(("average, English only", summary["average_english"]))
    for label, scores in extra:
        rows.append([label, f"{main}={scores.get(main, float('nan')):.4f}",
                     *[f"{scores.get(k, float('nan')):.4f}" for k, _ in TABLE_METRICS]])
    avg = summary["average"]
    rows.append(["average" + (" (all languages)" if extra else ""), f"{main}={avg.get(main, float('nan')):.4f}",
                 *[f"{avg.get(k, float('nan')):.4f}" for k, _ in TABLE_METRICS]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    for noisy in ("httpx", "httpx2", "urllib3", "datasets", "mteb"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not args.verbose else logging.DEBUG)
    if args.list_benchmarks:
        print("\n".join(list_benchmarks()))
        return 0
    run_dir = run_dir_for(args)
    if args.itr_dataset:  # seed 004: its own metrics, not mteb's
        from colintern import itr_eval

        summary = itr_eval.run(args)
        prepare_run_dir(run_dir, args.overwrite)
        write_json(run_dir / "summary.json", summary)
        print(itr_eval.format_table(summary))
        print(f"wrote {run_dir / 'summary.json'}")
        return 0
    hub_tasks, local_tasks, benchmark = select_tasks(args)
    copies = {item.partition("=")[0] for item in args.task_data}
    hub_tasks = load_hub_data(hub_tasks, copies)
    encoder = load_encoder(args)
    prepare_run_dir(run_dir, args.overwrite)
    summary = evaluate(encoder, hub_tasks + local_tasks, run_dir, benchmark=benchmark, args=args)
    print(format_table(summary))
    print(f"wrote {run_dir / 'summary.json'}")
    return 0


def console() -> None:
    """The command line: one-line errors, the exit status (`python eval.py`, `colintern-eval`)."""
    sys.exit(run_cli(main, out_flag=OUT_FLAG))


if __name__ == "__main__":
    console()
