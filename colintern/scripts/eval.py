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

import logging
import sys

from colintern.cli import parse_config, run_cli, setup_logging
from colintern.settings import EvalConfig

log = logging.getLogger("colintern.eval")
OUT_FLAG = "--out_dir"  # named in one-line errors about the output location (full disk, ...)
EPILOG = ("Outputs: OUT_DIR/RUN_NAME/summary.json (per-task nDCG, MAP, recall, precision and hit rate at k, and their "
          "average), mteb's result files beside it, the resolved settings as eval_config.yaml, and with --save_run "
          "runs/TASK.json (top-100 pages per query); docs/CONTRACT.md §8.")


def parse_args(argv: list[str] | None) -> EvalConfig:
    """eval.py's flags (and --config FILE) as an EvalConfig."""
    return parse_config(EvalConfig, argv, __doc__, epilog=EPILOG, prog="eval.py")


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.verbose)
    from colintern.eval.run import evaluate, format_table, list_benchmarks

    if config.list_benchmarks:
        print("\n".join(list_benchmarks()))
        return 0
    summary = evaluate(config)
    if config.itr_dataset:
        from colintern.itr.evaluate import format_table as itr_table

        print(itr_table(summary))
    else:
        print(format_table(summary))
    print(f"wrote {config.run_dir / 'summary.json'}")
    return 0


def console() -> None:
    """The command line: one-line errors, the exit status (`python eval.py`, `colintern-eval`)."""
    sys.exit(run_cli(main, out_flag=OUT_FLAG))


if __name__ == "__main__":
    console()
