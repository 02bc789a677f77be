r"""Mine hard negatives for ColIntern training (docs/CONTRACT.md §7, §8).

    python mine.py --model_id OpenGVLab/InternVL3_5-1B-Instruct --ckpt outputs/train/colintern_heads_epoch1.pt \
        --hub_name vidore/colpali_train_set --split train --out_jsonl outputs/mine/mined_triples.jsonl \
        --k 20 --doc_batch 16 --query_batch 64
Local pages (the corpus of train.py --train_jsonl FILE --root DIR; --pages adds a folder of candidate pages):
    python mine.py --model_id ... --ckpt ... --train_jsonl data/train.jsonl --root data --pages data/pages \
        --out_jsonl outputs/mine/mined_triples.jsonl

Every distinct page of the dataset (rows sharing image_filename, or the same image bytes, are one page) is
encoded once with the checkpoint's head, LoRA and formatting, and written to disk as fp16 token vectors. Each
(query, page) row then gets the `--k` best-scoring pages that are not its positives, found either exactly
(`--method exact`: late-interaction MaxSim against every page, streamed from disk) or with a FAISS first
stage over every page token vector re-ranked by exact MaxSim (`--method faiss`, see colintern/mine/search.py for
why token vectors and not a pooled page vector). The default `--method auto` picks exact on a GPU and for
corpora up to 3M page tokens, where it is as fast as FAISS, and FAISS above that. A page scoring above
`--fn_filter` x the positive's score is treated as a probable unlabelled positive and dropped.

Output, one line per (query, page) pair, in dataset order:
    {"query": str, "pos": "<dataset>/<split>/doc_<i>.png", "negs": [...],
     "scores": {"pos": float, "negs": [float, ...]}}
(with --train_jsonl, pages are named by their paths relative to --root, as the input file names them)
plus `<name>.meta.json` (settings, counts, timings, candidate recall). Lines go to `<out>.partial` as they are
produced; `--resume` continues an interrupted run; the final name appears only when the file is complete.

Scale-out: `--num_shards N --shard_id i` (or torchrun's RANK/WORLD_SIZE) gives each process 1/N of the
queries; processes sharing a filesystem also split the page encoding. Each shard writes
`<name>.shard-<i>-of-<N>.jsonl`; the last shard to finish merges them (or run `--merge` yourself).
"""
from __future__ import annotations

import logging
import sys

from colintern.cli import parse_config, run_cli, setup_logging
from colintern.mine.miner import mine
from colintern.settings import MineConfig

log = logging.getLogger("colintern.mine")
OUT_FLAG = "--out_jsonl"  # named in one-line errors about the output location (full disk, ...)


def parse_args(argv: list[str] | None) -> MineConfig:
    """mine.py's flags (and --config FILE) as a MineConfig."""
    return parse_config(MineConfig, argv, __doc__)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.verbose)
    for line in mine(config):
        print(line, flush=True)
    return 0


def console() -> None:
    """The command line: one-line errors, the exit status (`python mine.py`, `colintern-mine`)."""
    sys.exit(run_cli(main, out_flag=OUT_FLAG))


if __name__ == "__main__":
    console()
