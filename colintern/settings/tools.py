"""The other commands' settings: make_dataset, the synthetic data and tiny models, the demos, reports and plots."""
from __future__ import annotations

from dataclasses import MISSING, dataclass

from colintern.errors import UserError
from colintern.cli import Options, option, with_default
from colintern.settings.common import CheckpointOptions, DeviceOptions, LogOptions, ModelOptions
from colintern.settings.train import (LoraOptions, OptimOptions, SingleVectorOptions, TrainDataOptions,
                                      TrainOutputOptions)
from colintern.settings.mine import MiningOptions
from colintern.settings.search import IndexConfig, RenderOptions, SearchOutputOptions


@dataclass(frozen=True, kw_only=True)
class SyntheticOptions(Options):
    """synthetic data"""

    queries_per_page: int = option(3, at_least=1, help="queries per page: synthetic training rows per page (the demo "
                                   "default: 6); make_dataset: at most this many from a page's text (default: 3)")
    n_train: int = option(600, at_least=1, help="training scenes")
    n_eval: int = option(80, at_least=1, help="held-out scenes, each with its twin")


@dataclass(frozen=True, kw_only=True)
class DatasetConfig(RenderOptions, LogOptions):
    """python -m colintern.data.make_dataset: PDFs -> train.jsonl + a BEIR eval set held out by document"""

    inputs: list[str] = with_default(IndexConfig, "inputs", MISSING)
    out: str = with_default(SearchOutputOptions, "out", MISSING)
    eval_fraction: float = option(0.2, help="share of the documents held out for evaluation, at least one (default: "
                                            "0.2); 0 writes no eval set")
    queries_per_page: int = with_default(SyntheticOptions, "queries_per_page", 3)
    min_words: int = option(5, at_least=1, help="shorter sentences are not queries")
    max_words: int = option(30, at_least=1, help="longer sentences are not queries either")
    boilerplate_share: float = option(0.3, help="a line on at least this share of a document's pages (and on two or "
                                                "more) is a header or footer, never a query")
    seed: int = with_default(OptimOptions, "seed", 0)
    overwrite: bool = with_default(TrainOutputOptions, "overwrite", False)
    dpi: int = with_default(RenderOptions, "dpi", 150)
    generator: str | None = option(None, metavar="MODEL", help="queries written by this vision-language model (hub id "
                                   "or folder of a family ColIntern loads, with its LM head, e.g. "
                                   "Qwen/Qwen3-VL-2B-Instruct) from each page's image, instead of the text layer's "
                                   "sentences; resumable (OUT/generated.jsonl)")
    max_new_tokens: int = option(96, at_least=1, help="longest generated answer, in tokens (sanity: longest answer)")
    batch_size: int = with_default(OptimOptions, "batch_size", 4)
    device: str = with_default(DeviceOptions, "device", "auto")

    def check(self) -> None:
        if not 0 <= self.eval_fraction < 1:
            raise UserError(f"--eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0 < self.boilerplate_share <= 1:
            raise UserError(f"--boilerplate_share must be in (0, 1], got {self.boilerplate_share}")


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig(SyntheticOptions, LogOptions):
    """python -m colintern.testing.synthetic: a page retrieval set, in the colpali_train_set schema and BEIR layout"""

    out: str = with_default(SearchOutputOptions, "out", MISSING, positional=True)
    n_train_pages: int = option(240, at_least=1, help="distinct training pages, in the colpali_train_set schema")
    n_eval_pages: int = option(60, at_least=1, help="held-out pages of the BEIR-layout evaluation set under OUT/eval")
    seed: int = with_default(OptimOptions, "seed", 0)
    page_size: int = option(224, at_least=16, help="width of portrait pages in pixels")


@dataclass(frozen=True, kw_only=True)
class ScenesConfig(LogOptions):
    """python -m colintern.itr.model.scenes: generated scenes for seed 004's image-text retrieval"""

    out: str = with_default(SearchOutputOptions, "out", MISSING, positional=True)
    n_train: int = with_default(SyntheticOptions, "n_train", 600)
    n_eval: int = with_default(SyntheticOptions, "n_eval", 80)
    size: int = option(224, at_least=16, help="image side in pixels")
    seed: int = with_default(OptimOptions, "seed", 0)


@dataclass(frozen=True, kw_only=True)
class TinyConfig(LogOptions):
    """python -m colintern.testing.tiny: a tiny random model of a backbone family, saved like the real one"""

    out: str = with_default(SearchOutputOptions, "out", MISSING, positional=True)
    backbone: str = option("internvl", help="backbone family to build (internvl, qwen3_vl, qwen2_5_vl, smolvlm)")
    layout: str | None = option(None, choices=("native", "remote"), help="internvl only: transformers-native "
                                "InternVL or original internvl_chat checkpoint layout (default: native)")
    seed: int = with_default(OptimOptions, "seed", 0)


@dataclass(frozen=True, kw_only=True)
class SanityConfig(LogOptions):
    """python -m colintern.backbones.sanity: the backbone still answers questions (its LM head, generation)"""

    model_id: str = with_default(ModelOptions, "model_id", MISSING)
    ckpt: str | None = with_default(CheckpointOptions, "ckpt", None)
    question: list[str] | None = option(None, help="questions to answer (default: three fixed ones)")
    max_new_tokens: int = with_default(DatasetConfig, "max_new_tokens", 32)
    device: str = with_default(DeviceOptions, "device", "auto")


@dataclass(frozen=True, kw_only=True)
class DemoConfig(LogOptions):
    """python -m colintern.scripts.demo: the whole workflow on a tiny model and synthetic pages"""

    out: str = with_default(SearchOutputOptions, "out", "outputs/demo")
    train_pages: int = option(480, at_least=1, help="synthetic train pages (python -m colintern.testing.synthetic "
                                                    "--n_train_pages)")
    queries_per_page: int = with_default(SyntheticOptions, "queries_per_page", 6)
    eval_pages: int = option(60, at_least=1, help="held-out evaluation pages (about 1.5 queries each)")
    batch_size: int = with_default(OptimOptions, "batch_size", 16)
    lr: float = with_default(OptimOptions, "lr", 1e-3)
    lora_r: int = with_default(LoraOptions, "lora_r", 16)
    lora_alpha: int = with_default(LoraOptions, "lora_alpha", 32)
    tau: float = with_default(OptimOptions, "tau", 0.02)
    max_tiles: int = with_default(TrainDataOptions, "max_tiles", 2)
    num_negs: int = with_default(TrainDataOptions, "num_negs", 1)
    seed: int = with_default(OptimOptions, "seed", 0)
    k: int = with_default(MiningOptions, "k", 20)
    mine_method: str = option("exact", choices=("exact", "faiss"), help="mine.py --method: exact MaxSim against "
                              "every page is fastest for a few hundred pages; faiss is what large corpora use")
    threads: int = with_default(DeviceOptions, "threads", 1)
    num_workers: int = with_default(DeviceOptions, "num_workers", 1)
    min_gain: float = option(0.3, help="exit with status 1 (after writing everything) when epoch 2's held-out nDCG@5 "
                                       "is not at least this much above the untrained base's; a negative value never "
                                       "fails (default: 0.3)")


@dataclass(frozen=True, kw_only=True)
class AblateConfig(LogOptions):
    """python -m colintern.scripts.ablate: the seed-002 single-vector grid"""

    model_id: str | None = with_default(ModelOptions, "model_id", None)
    train_hub: str | None = with_default(TrainDataOptions, "train_hub", None)
    eval_dir: str | None = option(None, help="held-out BEIR-layout set (default: the synthetic one)")
    out: str = with_default(SearchOutputOptions, "out", "outputs/ablate")
    poolings: list[str] = option(["last", "mean", "latent"], choices=("last", "mean", "latent"), help="pooling axis")
    attentions: list[str] = option(["causal", "bidirectional"], choices=("causal", "bidirectional"),
                                   help="attention axis")
    gathers: list[str] = option(["global"], choices=("global", "local"), help="gather axis, as one process "
                                                                              "contrasts it (default: global only)")
    seeds: list[int] = option([0, 1], help="seeds per cell")
    epochs: int = with_default(OptimOptions, "epochs", 2)
    batch_size: int = with_default(OptimOptions, "batch_size", 16)
    lr: float = with_default(OptimOptions, "lr", 1e-3)
    tau: float = with_default(OptimOptions, "tau", 0.05)
    max_tiles: int = with_default(TrainDataOptions, "max_tiles", 2)
    latent_size: int = with_default(SingleVectorOptions, "latent_size", 16)
    latent_heads: int = with_default(SingleVectorOptions, "latent_heads", 2)
    threads: int = with_default(DeviceOptions, "threads", 1)

    def check(self) -> None:
        if self.batch_size < 2 or self.batch_size % 2:
            raise UserError(f"--batch_size must be even and at least 2 (the gather axis splits it), got "
                            f"{self.batch_size}")


@dataclass(frozen=True, kw_only=True)
class ItrDemoConfig(LogOptions):
    """python -m colintern.itr.model.demo: seed 004 single-stage against two-stage at equal steps"""

    out: str = with_default(SearchOutputOptions, "out", "outputs/itr_demo")
    epochs: int = with_default(OptimOptions, "epochs", 10)
    stage1_epochs: int = option(4, at_least=1, help="of those, ITC-only epochs of the two-stage run")
    n_train: int = with_default(SyntheticOptions, "n_train", 2000)
    n_eval: int = with_default(SyntheticOptions, "n_eval", 60)
    threads: int = with_default(DeviceOptions, "threads", 2)

    def check(self) -> None:
        if not 0 < self.stage1_epochs < self.epochs:
            raise UserError("--stage1_epochs must be between 1 and --epochs - 1")


@dataclass(frozen=True, kw_only=True)
class ReportOptions(Options):
    """report"""

    labels: list[str] | None = option(None, metavar="LABEL", help="one label per input or run, in order (the plots' "
                                      "default: each file's parent folder name, or the file name without .json)")


@dataclass(frozen=True, kw_only=True)
class CompareConfig(LogOptions):
    """python -m colintern.itr.model.report compare: metrics of eval summaries side by side"""

    runs: list[str] = option(help="eval.py run folders (or summary.json files)")
    labels: list[str] = with_default(ReportOptions, "labels", MISSING)
    out: str = with_default(SearchOutputOptions, "out", MISSING)

    def check(self) -> None:
        if len(self.labels) != len(self.runs):
            raise UserError(f"--labels: {len(self.labels)} label(s) for {len(self.runs)} run(s); give one per run")


@dataclass(frozen=True, kw_only=True)
class EfficiencyConfig(LogOptions):
    """python -m colintern.itr.model.report efficiency: epochs to 95 % of the best T2I R@1, time, throughput, parameters"""

    train: list[str] = option(metavar="LABEL=DIR[,DIR]", help="each run's training folders, stage by stage")
    evals: list[str] = option(metavar="LABEL=PREFIX", help="each run's per-epoch eval folders PREFIX1, PREFIX2, ... "
                                                          "(epochs counted over all stages)")
    out: str = with_default(SearchOutputOptions, "out", MISSING)


@dataclass(frozen=True, kw_only=True)
class PlotLossConfig(ReportOptions, LogOptions):
    """plot_training_loss.py: training loss curves (and eval points) of one or more runs"""

    input: list[str] = option(metavar="FILE", help="one or more logs: training_loss.txt or metrics.jsonl files (or "
                              "directories holding one); several runs are drawn on the same axes")
    output: str = option("outputs/training_loss.png", metavar="PNG", help="image to write; parent directories are "
                         "created; the extension picks the format")
    smooth: int = option(1, at_least=1, metavar="N", help="trailing moving average over N logged points, drawn over "
                         "the faint raw curve; N larger than a run is clamped to its length (default: 1 = no "
                         "smoothing)")
    logy: bool = option(False, help="logarithmic loss axis (default: linear)")
    # not train.py's --lr (a rate): a switch of this plot, the one flag name two scripts use for different things
    lr: bool = option(False, help="also draw the learning rate of the first --input on a second y axis (default: "
                                  "off)")


PLOT_METRICS = ["ndcg_at_5", "ndcg_at_10", "recall_at_5"]


@dataclass(frozen=True, kw_only=True)
class PlotMetricsConfig(ReportOptions, LogOptions):
    """plot_vidore_metrics.py: eval summaries of several runs as charts and tables"""

    inputs: list[str] = with_default(IndexConfig, "inputs", MISSING)
    outdir: str = option("outputs/plots", metavar="DIR", help="where the charts, metrics.md and metrics.csv go; "
                                                             "created if missing")
    metrics: list[str] = option(PLOT_METRICS, metavar="METRIC", help="per-task metrics to chart and tabulate; every "
                                "task of every run must have them")
    main_metric: str | None = option(None, metavar="METRIC", help="metric for main_metric_across_runs.png (default: "
                                     "the first summary's \"main_metric\", else ndcg_at_5)")
