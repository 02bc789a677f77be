"""Evaluation as a job (eval.py is its command line): the tasks (mteb benchmarks, local BEIR sets, local copies),
the encoder, mteb's run, and summary.json with the per-task metrics (docs/CONTRACT.md §8).

    evaluate(EvalConfig(ckpt=..., local_dataset=[...]))   what eval.py does: returns the summary written
    format_table(summary)                                  the table eval.py prints
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from colintern.errors import UserError
from colintern.files import atomic_write_text, make_output_dir, note_path
from colintern.cli import save_config
from colintern.settings import DEFAULT_BENCHMARK, EvalConfig

log = logging.getLogger("colintern.eval")
# mteb's task and encoding bars nest (cursor-movement codes): only on a terminal, never in a captured log.
PROGRESS_BARS = sys.stderr.isatty()
RUN_TOP_K = 100
TABLE_METRICS = [("ndcg_at_5", "nDCG@5"), ("ndcg_at_10", "nDCG@10"), ("recall_at_5", "recall@5")]
CONFIG_FILE = "eval_config.yaml"  # the resolved settings, in the run directory


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


def select_tasks(config: EvalConfig) -> tuple[list[Any], list[Any], str]:
    """(hub tasks, local tasks, benchmark label) from --benchmark / --tasks / --local_dataset / --task_data."""
    from colintern.eval.evaluation import local_task, use_local_copy

    benchmarks = config.benchmark
    if benchmarks is None and config.tasks is None and not config.local_dataset:
        benchmarks = [DEFAULT_BENCHMARK]
    hub_tasks: list[Any] = []
    labels: list[str] = []
    for name in benchmarks or []:
        benchmark = get_benchmark(name)
        labels.append(benchmark.name)
        hub_tasks.extend(t for t in benchmark.tasks if t.metadata.name not in {h.metadata.name for h in hub_tasks})
    if config.tasks:
        by_name = {t.metadata.name: t for t in hub_tasks}
        picked = []
        for name in dict.fromkeys(config.tasks):
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
    for item in config.task_data:
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
    local_tasks = [local_task(path) for path in config.local_dataset]
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
    from colintern.eval.evaluation import load_task_data

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
    from colintern.retriever.checkpoint import base_model_of, load_checkpoint

    base = base_model_of(load_checkpoint(ckpt), ckpt)
    log.info("--model_id not given: using the checkpoint's base model %s", base)
    return base


def load_encoder(config: EvalConfig) -> Any:
    """The mteb encoder (mteb_model.ColInternMTEB) for --model_id / --ckpt."""
    from colintern.eval.mteb_model import ColInternMTEB

    if not config.model_id and not config.ckpt:
        raise UserError("pass --ckpt (a checkpoint; its base model is used) or --model_id (the bare base model)")
    if config.ckpt and not Path(config.ckpt).is_file():
        raise UserError(f"--ckpt {config.ckpt}: no such file")
    model_id = config.model_id or default_model_id(str(config.ckpt))
    return ColInternMTEB(model_id, device=config.device, ckpt=config.ckpt,
                         dtype=None if config.dtype == "auto" else config.dtype, max_tiles=config.max_tiles,
                         batch_size=config.batch_size, query_batch_size=config.query_batch_size,
                         use_flash_attn=config.use_flash_attn, allow_other_base=config.allow_other_base,
                         pool_factor=config.pool_factor)


# ------------------------------------------------------------------------------------------------ evaluation


def run_dir_for(config: EvalConfig) -> Path:
    """<out_dir>/<run_name>; refuses a finished run unless --overwrite (checked before any work is done)."""
    if Path(config.out_dir).exists() and not Path(config.out_dir).is_dir():
        raise UserError(f"--out_dir {config.out_dir} is a file, not a folder; choose another --out_dir")
    run_dir = config.run_dir
    summary = run_dir / "summary.json"
    if summary.exists() and not config.overwrite:
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


def call_mteb(encoder: Any, tasks: list[Any], run_dir: Path, predictions: Path, config: EvalConfig) -> Any:
    """mteb.evaluate with its results cached in run_dir and its per-query scores in `predictions`; a fault of the
    output location (a full disk) leaves no torn result file behind."""
    import mteb

    try:
        result = mteb.evaluate(
            getattr(encoder, "mteb_model", encoder), tasks,  # a text baseline wraps mteb's own model
            encode_kwargs={"batch_size": config.batch_size, "show_progress_bar": PROGRESS_BARS},
            cache=mteb.ResultCache(run_dir),
            overwrite_strategy="always" if config.overwrite else "only-missing",
            prediction_folder=predictions,
            co2_tracker=False,
            show_progress_bar=PROGRESS_BARS,
        )
    except OSError as err:  # e.g. a full disk while mteb wrote its files: leave none of them torn
        shutil.rmtree(predictions, ignore_errors=True)
        torn = remove_torn_json(run_dir)
        raise note_path(err, torn[0] if torn else run_dir)
    if result.exceptions:
        first = result.exceptions[0]
        raise UserError(f"{first.task_name}: evaluation failed: {first.exception}")
    return result


def task_metrics(task_result: Any, task: Any, predicted: dict | None, runs_dir: Path | None,
                 subset_scores: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """One task's metrics, averaged over its language subsets and splits: mteb's, with the ranking metrics recomputed
    unrounded from its per-query scores when they are there (mteb's files round to 5 decimals); the subsets' own
    table metrics go into subset_scores; with runs_dir (--save_run) the top pages per query are written there."""
    from colintern.eval.evaluation import K_VALUES, retrieval_metrics, task_qrels, top_run

    name, entries = task_result.task_name, []
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
                if runs_dir is not None:
                    suffix = (f".{subset}" if multi_subset else "") + (f".{split}" if multi_split else "")
                    write_json(runs_dir / f"{name}{suffix}.json", top_run(results, RUN_TOP_K))
            entries.append(metrics)
            if multi_subset or multi_split:
                key = subset if not multi_split else f"{subset}/{split}"
                subset_scores.setdefault(name, {})[key] = {k: metrics[k] for k, _ in TABLE_METRICS if k in metrics}
    return mean_dicts(entries)


def run_mteb(encoder: Any, tasks: list[Any], run_dir: Path, *, benchmark: str, config: EvalConfig) -> dict:
    """Run mteb on the tasks, write runs and summary.json into run_dir; return the summary."""
    import mteb

    from colintern.eval.evaluation import language_averages

    predictions = run_dir / ".predictions"
    shutil.rmtree(predictions, ignore_errors=True)
    start = time.perf_counter()
    result = call_mteb(encoder, tasks, run_dir, predictions, config)
    seconds = time.perf_counter() - start
    by_name = {t.metadata.name: t for t in tasks}
    task_scores: dict[str, dict[str, float]] = {}
    subset_scores: dict[str, dict[str, dict[str, float]]] = {}
    main_metrics: dict[str, str] = {}
    for task_result in result.task_results:
        name = task_result.task_name
        main_metrics[name] = by_name[name].metadata.main_score
        prediction_file = predictions / f"{name}_predictions.json"
        predicted = json.loads(prediction_file.read_text()) if prediction_file.exists() else None
        if predicted is None:
            log.info("%s: mteb results reused from %s (no new run file)", name, run_dir)
        task_scores[name] = task_metrics(task_result, by_name[name], predicted,
                                         run_dir / "runs" if config.save_run else None, subset_scores)
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
        "ckpt": config.ckpt,
        "benchmark": benchmark,
        "main_metric": main_metric,
        "tasks": task_scores,
        "average": mean_dicts(list(task_scores.values())),
        "mteb_version": mteb.__version__,
        "dtype": encoder.dtype,
        "batch_size": config.batch_size,
        "pool_factor": config.pool_factor,
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


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """eval.py (or from Python with an EvalConfig): evaluate, write OUT_DIR/RUN_NAME/summary.json, return it.
    The seed-004 image-text evaluation when --itr_dataset is given, else mteb on the selected tasks."""
    for noisy in ("httpx", "httpx2", "urllib3", "datasets", "mteb"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not config.verbose else logging.DEBUG)
    run_dir = run_dir_for(config)
    if config.itr_dataset:  # seed 004: its own metrics, not mteb's
        from colintern.itr import evaluate as itr_eval

        summary = itr_eval.run(config)
        prepare_run_dir(run_dir, config.overwrite)
        save_config(config, run_dir / CONFIG_FILE, "eval.py")
        write_json(run_dir / "summary.json", summary)
        return summary
    if config.baseline:  # the pages' text, scored by BM25 or a text embedder
        from colintern.eval.baselines import Baseline, text_task

        text_tasks = [text_task(path, run_dir.parent / "ocr") for path in config.local_dataset]
        for path, (_, read) in zip(config.local_dataset, text_tasks):
            if read:
                log.info("%s: %d page(s) had no text: read by OCR (cached in %s)", path, read, run_dir.parent / "ocr")
        baseline = Baseline(config.baseline)
        prepare_run_dir(run_dir, config.overwrite)
        save_config(config, run_dir / CONFIG_FILE, "eval.py")
        return run_mteb(baseline, [task for task, _ in text_tasks], run_dir, benchmark="local", config=config)
    hub_tasks, local_tasks, benchmark = select_tasks(config)
    copies = {item.partition("=")[0] for item in config.task_data}
    hub_tasks = load_hub_data(hub_tasks, copies)
    encoder = load_encoder(config)
    prepare_run_dir(run_dir, config.overwrite)
    save_config(config, run_dir / CONFIG_FILE, "eval.py")
    return run_mteb(encoder, hub_tasks + local_tasks, run_dir, benchmark=benchmark, config=config)
