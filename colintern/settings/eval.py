"""eval.py's settings: tasks (mteb benchmarks, local sets), pages, image-text evaluation."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from colintern.errors import UserError
from colintern.cli import Options, option, with_default
from colintern.settings.common import CheckpointOptions, DeviceOptions, LogOptions, ModelOptions
from colintern.settings.train import OptimOptions, TrainDataOptions, TrainOutputOptions
from colintern.settings.itr import CocoOptions


DEFAULT_BENCHMARK = "ViDoRe(v1)"


@dataclass(frozen=True, kw_only=True)
class PoolOptions(Options):
    """pages"""

    pool_factor: int | None = option(None, at_least=1, help="hierarchical token pooling of every page: about K "
                                     "times fewer vectors (docs/BENCHMARKS.md measures what it keeps; no similarity "
                                     "maps). Default: 1, none (search.py index: the index's when extending one)")


@dataclass(frozen=True, kw_only=True)
class BenchmarkOptions(Options):
    """tasks"""

    benchmark: list[str] | None = option(None, metavar="NAME", help="mteb benchmark name(s), e.g. 'ViDoRe(v1)' "
                                         f"'ViDoRe(v2)' 'ViDoRe(v3)' (default: {DEFAULT_BENCHMARK}, unless only "
                                         "--local_dataset is given); see --list_benchmarks")
    tasks: list[str] | None = option(None, metavar="TASK", help="evaluate only these tasks of the benchmark(s); a "
                                     "name outside them is looked up among all mteb tasks (default: every task of the "
                                     "benchmark(s))")
    list_benchmarks: bool = option(False, help="print the benchmark names the installed mteb knows, one per line, "
                                               "and exit")
    local_dataset: list[str] = option([], metavar="DIR", help="local BEIR-layout evaluation set(s): a folder with "
                                      "corpus, queries and qrels as .jsonl or .parquet; corpus rows {corpus-id, image "
                                      "(bytes or a path relative to the folder)}, queries {query-id, query}, qrels "
                                      "{query-id, corpus-id, score} (docs/CONTRACT.md §7). Each becomes an mteb task "
                                      "named after its folder (default: none)")
    task_data: list[str] = option([], metavar="TASK=DIR", help="read an mteb task's dataset from a local copy of its "
                                  "hub repo (same configs and files), e.g. VidoreDocVQARetrieval=/data/docvqa_test_"
                                  "subsampled_beir (default: from the hub)")
    query_batch_size: int = option(32, at_least=1, help="queries per forward pass")
    run_name: str | None = option(None, help="run directory name under --out_dir (default: the checkpoint's file "
                                             "stem, or 'base')")
    save_run: bool = option(False, help="also write runs/<task>.json: the top 100 pages and scores per query")

    def check(self) -> None:
        for item in self.task_data:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise UserError(f"--task_data {item!r}: expected TASK=DIR")


@dataclass(frozen=True, kw_only=True)
class ItrEvalOptions(Options):
    """image-text retrieval (seed 004; a checkpoint of train.py --task itr)"""

    itr_dataset: str | None = option(None, metavar="DIR", help="a folder holding itr.jsonl (e.g. python -m "
                                     "colintern.itr.scenes OUT writes OUT/eval): T2I and I2T R@1/5/10, twin accuracy, box "
                                     "IoU/GIoU/L1 beside the mean-box prior, relation accuracy/macro-F1 beside the "
                                     "shuffled-image control (default: none)")
    itm_rerank: int = option(0, at_least=0, metavar="K", help="with --itr_dataset: also re-rank each caption's top K "
                                                              "images by the matching head (default: 0 = off)")


@dataclass(frozen=True, kw_only=True)
class EvalConfig(CheckpointOptions, BenchmarkOptions, PoolOptions, ItrEvalOptions, CocoOptions, LogOptions):
    """Everything eval.py needs."""

    model_id: str | None = with_default(ModelOptions, "model_id", None)
    allow_other_base: bool = with_default(ModelOptions, "allow_other_base", False)
    pool_factor: int = with_default(PoolOptions, "pool_factor", 1)
    batch_size: int = with_default(OptimOptions, "batch_size", 8)
    max_tiles: int | None = with_default(TrainDataOptions, "max_tiles", None)
    strict: bool = with_default(TrainDataOptions, "strict", False)
    device: str = with_default(DeviceOptions, "device", "auto")
    dtype: str = with_default(DeviceOptions, "dtype", "auto")
    use_flash_attn: bool = with_default(DeviceOptions, "use_flash_attn", False)
    out_dir: str = with_default(TrainOutputOptions, "out_dir", "outputs/eval")
    overwrite: bool = with_default(TrainOutputOptions, "overwrite", False)
    baseline: str | None = option(None, metavar="bm25|text:MODEL", help="score the --local_dataset pages by their "
                                  "text instead of a model: bm25 (mteb's BM25), or text:MODEL (a sentence-transformers "
                                  "text model); a page's text is its corpus row's \"text\", else Tesseract OCR of "
                                  "its image (cached) (default: none)")

    def check(self) -> None:
        if self.baseline is not None:
            from colintern.eval.baselines import check_baseline

            check_baseline(self.baseline)
            if not self.local_dataset or self.tasks or self.benchmark or self.ckpt or self.model_id:
                raise UserError("--baseline scores --local_dataset sets by their text: give --local_dataset, and no "
                                "--benchmark, --tasks, --ckpt or --model_id")
        name = self.run_label
        if not name or "/" in name or os.sep in name or name in (".", ".."):
            raise UserError(f"--run_name {name!r}: must be a plain directory name")

    @property
    def run_label(self) -> str:
        """--run_name, else the checkpoint's file stem, else the baseline's name, else 'base'."""
        if self.run_name or self.ckpt:
            return self.run_name or Path(str(self.ckpt)).stem
        if self.baseline:
            return self.baseline if self.baseline == "bm25" else "text-" + Path(self.baseline[5:].rstrip("/")).name
        return "base"

    @property
    def run_dir(self) -> Path:
        """OUT_DIR/RUN_NAME: where the run's summary.json and mteb's files go."""
        return Path(self.out_dir) / self.run_label
