"""mine.py's settings: pages and queries, output, mining, the FAISS first stage, compute and sharding."""
from __future__ import annotations

import os
from dataclasses import dataclass

from colintern.errors import UserError
from colintern.cli import Options, option, with_default
from colintern.settings.common import CheckpointOptions, DeviceOptions, LogOptions, ModelOptions
from colintern.settings.train import OptimOptions, TrainDataOptions


@dataclass(frozen=True, kw_only=True)
class MineDataOptions(Options):
    """pages and queries"""

    hub_name: str | None = option(None, help="page dataset: hub id, local repository folder, save_to_disk directory "
                                             "or parquet file/glob, with the vidore/colpali_train_set columns (query, "
                                             "image, image_filename)")
    pages: str | None = option(None, metavar="DIR", help="with --train_jsonl: every image file under DIR is a "
                                                        "candidate page too (default: none)")
    limit: int | None = option(None, at_least=1, help="use only the first N rows (default: all)")
    dedupe: str = option("auto", choices=("auto", "filename", "hash"), help="what makes two rows the same page: "
                         "image_filename, a hash of the image bytes, or auto (image_filename when every row has one, "
                         "else hash)")


@dataclass(frozen=True, kw_only=True)
class MineOutputOptions(Options):
    """output"""

    out_jsonl: str = option("outputs/mine/mined_triples.jsonl", help="output triples file; the meta sidecar is "
                            "written beside it as <name>.meta.json")
    resume: bool = option(False, help="continue an interrupted run from <out>.partial (same settings required); "
                                      "without it a leftover partial file is discarded")
    emb_dir: str | None = option(None, help="where page embeddings go (fp16 memory-mapped files, one subdirectory per "
                                            "model+data fingerprint) (default: <out without .jsonl>.pages/)")
    keep_pages: bool = option(False, help="keep the page embeddings after a complete run (default: delete them; a "
                                          "resumed run reuses them either way)")


@dataclass(frozen=True, kw_only=True)
class FirstStageOptions(Options):
    """FAISS first stage"""

    candidates: int = option(100, at_least=1, help="pages per query re-ranked exactly after the FAISS first stage "
                             "(mine.py default: 100, search.py: 128; docs/BENCHMARKS.md measures the trade-off); at "
                             "least the number of pages makes it equal to exact search")
    token_k: int = option(256, at_least=1, help="nearest page tokens per query token in a FAISS token search (mine.py "
                          "default: 256, at most 2048 on a GPU index; search.py on a small, Flat index: 128)")
    nprobe: int = option(32, at_least=1, help="lists (centroids) of a FAISS IVF index searched per query token")


@dataclass(frozen=True, kw_only=True)
class MiningOptions(Options):
    """mining"""

    k: int = option(20, at_least=1, help="how many per query: mine.py's hard negatives (default: 20), search.py "
                                         "query's results (default: 5)")
    method: str = option("auto", choices=("auto", "faiss", "exact"), help="exact: exact MaxSim against every page "
                         "(streamed part by part; fast on a GPU); faiss: FAISS first stage over page token vectors + "
                         "exact MaxSim re-rank of the candidates; auto: exact on a GPU or up to 3M page tokens (~2,300 "
                         "pages), where it is as fast as FAISS (docs/BENCHMARKS.md), else faiss")
    faiss_index: str = option("auto", help="faiss index_factory string (inner product). auto: Flat (exact) up to 3M "
                                           "page tokens, else IVF<4*sqrt(N)>,PQ32")
    deepen: int = option(2, at_least=0, help="faiss: a query left with fewer than k negatives after positives and the "
                                             "fn filter is searched again with 4x --candidates and --token_k, up to N "
                                             "times (default: 2; 0: never)")
    skip_top: int = option(0, at_least=0, help="also skip the N best remaining candidates before taking k")
    recall_sample: int = option(200, at_least=0, help="faiss: queries (per shard) checked against exact search to "
                                                      "measure candidate recall (default: 200; 0 disables)")


@dataclass(frozen=True, kw_only=True)
class MineComputeOptions(Options):
    """compute"""

    doc_batch: int = option(16, at_least=1, help="pages per encoder batch")
    query_batch: int = option(64, at_least=1, help="queries per encoder batch")
    search_batch: int = option(1024, at_least=1, help="queries scored and written per step; also the resume "
                                                      "granularity")
    pages_per_part: int = option(1024, at_least=1, help="pages per embedding file part: the unit of shared encoding "
                                                        "and of resume")
    no_gpu: bool = option(False, help="the same as --device cpu")
    num_shards: int = option(0, at_least=0, help="split the queries over N processes (default: 0, WORLD_SIZE under "
                                                 "torchrun, else 1)")
    shard_id: int = option(-1, at_least=-1, help="this process's shard, 0..N-1 (default: -1, RANK under torchrun, "
                                                 "else 0)")
    merge: bool = option(False, help="only join the N shard files of --out_jsonl into it (with --num_shards N)")
    quiet: bool = option(False, help="no progress bars")


@dataclass(frozen=True, kw_only=True)
class MineConfig(CheckpointOptions, MineDataOptions, MineOutputOptions, MiningOptions, FirstStageOptions,
                 MineComputeOptions, LogOptions):
    """Everything mine.py needs. num_shards and shard_id default to torchrun's WORLD_SIZE and RANK."""

    model_id: str | None = with_default(ModelOptions, "model_id", None)
    teacher: str | None = option(None, help="the model that mines, instead of --model_id/--ckpt: any model ColIntern "
                                 "loads: a ColIntern checkpoint (.pt, on its recorded base model; any family), an "
                                 "exported ColIntern folder, or a published colpali-engine retriever (ColQwen2.5, "
                                 "ColQwen3, ColSmol; hub id or folder). Its negatives then train a student of any family "
                                 "(train.py --train_jsonl); the meta file records it")
    allow_other_base: bool = with_default(ModelOptions, "allow_other_base", False)
    split: str = with_default(TrainDataOptions, "split", "train")
    train_jsonl: str | None = with_default(TrainDataOptions, "train_jsonl", None)
    root: str | None = with_default(TrainDataOptions, "root", None)
    strict: bool = with_default(TrainDataOptions, "strict", False)
    fn_filter: float = with_default(OptimOptions, "fn_filter", 0.95)
    device: str = with_default(DeviceOptions, "device", "auto")
    dtype: str = with_default(DeviceOptions, "dtype", "auto")
    use_flash_attn: bool = with_default(DeviceOptions, "use_flash_attn", False)

    def check(self) -> None:
        if self.no_gpu:
            object.__setattr__(self, "device", "cpu")
        if self.num_shards == 0:
            object.__setattr__(self, "num_shards", int(os.environ.get("WORLD_SIZE", "1") or 1))
        if self.shard_id == -1:
            rank = int(os.environ.get("RANK", "0") or 0) if self.num_shards > 1 else 0
            object.__setattr__(self, "shard_id", rank)
        if not 0 <= self.shard_id < self.num_shards:
            raise UserError(f"--shard_id must be in 0..{self.num_shards - 1}, got {self.shard_id}")
        if self.merge and self.num_shards < 2:
            raise UserError("--merge joins shard files: pass --num_shards N (N >= 2) as used for the shards")
        if self.teacher is not None:
            if self.model_id or self.ckpt:
                raise UserError("pass --teacher, or --model_id with --ckpt, not both")
            if self.teacher.endswith(".pt") or os.path.isfile(self.teacher):  # a ColIntern checkpoint
                from colintern.retriever.checkpoint import base_model_of, load_checkpoint

                object.__setattr__(self, "ckpt", self.teacher)
                object.__setattr__(self, "model_id", base_model_of(load_checkpoint(self.teacher), self.teacher))
            else:
                object.__setattr__(self, "model_id", self.teacher)
        if not self.merge and (not self.model_id or not (self.hub_name or self.train_jsonl)):
            raise UserError("--model_id (or --teacher) and --hub_name (a page dataset) or --train_jsonl (local pages) "
                            "are required (except with --merge)")
        if self.hub_name and self.train_jsonl:
            raise UserError("pass only one of --hub_name and --train_jsonl")
        if self.pages and not self.train_jsonl:
            raise UserError("--pages adds local pages to a --train_jsonl corpus; pass --train_jsonl too")
