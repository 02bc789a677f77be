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
stage over every page token vector re-ranked by exact MaxSim (`--method faiss`, see colintern/mining.py for
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

import argparse
import logging
import os
import sys
from pathlib import Path

from colintern.cli import run_cli, setup_logging
from colintern.errors import UserError
from colintern.files import make_output_dir
from colintern.miner import Miner, merge_shards, output_paths, try_merge

log = logging.getLogger("colintern.mine")
OUT_FLAG = "--out_jsonl"  # named in one-line errors about the output location (full disk, ...)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model_id", required=False,
                   help="base model: hub id or local directory (the one the checkpoint was trained on)")
    g.add_argument("--ckpt", default=None,
                   help="ColIntern checkpoint (colintern_heads_*.pt): head, LoRA and formatting. Without it "
                        "the base model with an untrained head is used (a warning says so)")
    g.add_argument("--hub_name", default=None,
                   help="page dataset: hub id, local repository folder, save_to_disk directory or parquet "
                        "file/glob, with the vidore/colpali_train_set columns (query, image, image_filename)")
    g.add_argument("--split", default="train", help="dataset split of --hub_name (default: train)")
    g.add_argument("--train_jsonl", default=None,
                   help="instead of --hub_name, local pages: a triples file ({query, pos, negs} lines, "
                        "docs/CONTRACT.md §7) whose queries are mined against every distinct pos/neg page (and "
                        "--pages); the output names pages as this file does, for train.py --train_jsonl --root")
    g.add_argument("--root", default=None, help="folder the relative paths of --train_jsonl and --pages are "
                   "relative to (default: the working directory)")
    g.add_argument("--pages", default=None, metavar="DIR",
                   help="with --train_jsonl: every image file under DIR is a candidate page too (default: none)")
    g.add_argument("--limit", type=int, default=None, help="use only the first N rows (default: all)")
    g.add_argument("--dedupe", choices=["auto", "filename", "hash"], default="auto",
                   help="what makes two rows the same page: image_filename, a hash of the image bytes, or auto "
                        "(image_filename when every row has one, else hash). Default: auto")
    g.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    g = p.add_argument_group("output")
    g.add_argument("--out_jsonl", default="outputs/mine/mined_triples.jsonl",
                   help="output triples file (default: outputs/mine/mined_triples.jsonl); the meta sidecar is "
                        "written beside it as <name>.meta.json")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from <out>.partial (same settings required); without it "
                        "a leftover partial file is discarded")
    g.add_argument("--emb_dir", default=None,
                   help="where page embeddings go (fp16 memory-mapped files, one subdirectory per model+data "
                        "fingerprint). Default: <out without .jsonl>.pages/")
    g.add_argument("--keep_pages", action="store_true",
                   help="keep the page embeddings after a complete run (default: delete them; a resumed run "
                        "reuses them either way)")
    g = p.add_argument_group("mining")
    g.add_argument("--k", type=int, default=20, help="hard negatives per query (default: 20)")
    g.add_argument("--method", choices=["auto", "faiss", "exact"], default="auto",
                   help="exact: exact MaxSim against every page (streamed part by part; fast on a GPU); faiss: "
                        "FAISS first stage over page token vectors + exact MaxSim re-rank of the candidates; auto: "
                        "exact on a GPU or up to 3M page tokens (~2,300 pages), where it is as fast as FAISS "
                        "(docs/BENCHMARKS.md), else faiss. Default: auto")
    g.add_argument("--candidates", type=int, default=100,
                   help="faiss: pages per query re-ranked exactly (default: 100); at least the number of pages "
                        "makes faiss equal to exact")
    g.add_argument("--token_k", type=int, default=256,
                   help="faiss: nearest page tokens retrieved per query token (default: 256; at most 2048 on "
                        "a GPU index)")
    g.add_argument("--faiss_index", default="auto",
                   help="faiss index_factory string (inner product). auto: Flat (exact) up to 3M page tokens, "
                        "else IVF<4*sqrt(N)>,PQ32. Default: auto")
    g.add_argument("--nprobe", type=int, default=32, help="faiss IVF lists searched per query token (default: 32)")
    g.add_argument("--deepen", type=int, default=2,
                   help="faiss: a query left with fewer than k negatives after positives and the fn filter is "
                        "searched again with 4x --candidates and --token_k, up to N times (default: 2; 0: never)")
    g.add_argument("--fn_filter", type=float, default=0.95,
                   help="drop candidates scoring above r x the positive's score as probable false negatives "
                        "(default: 0.95; 0 disables)")
    g.add_argument("--skip_top", type=int, default=0,
                   help="also skip the N best remaining candidates before taking k (default: 0)")
    g.add_argument("--recall_sample", type=int, default=200,
                   help="faiss: queries (per shard) checked against exact search to measure candidate recall "
                        "(default: 200; 0 disables)")
    g = p.add_argument_group("compute")
    g.add_argument("--doc_batch", type=int, default=16, help="pages per encoder batch (default: 16)")
    g.add_argument("--query_batch", type=int, default=64, help="queries per encoder batch (default: 64)")
    g.add_argument("--search_batch", type=int, default=1024,
                   help="queries scored and written per step; also the resume granularity (default: 1024)")
    g.add_argument("--pages_per_part", type=int, default=1024,
                   help="pages per embedding file part: the unit of shared encoding and of resume (default: 1024)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto: CUDA when available, one GPU per "
                   "torchrun process (cuda:LOCAL_RANK); asking for CUDA without it is an error (default: auto)")
    g.add_argument("--no_gpu", action="store_true", help="the same as --device cpu")
    g.add_argument("--dtype", default=None,
                   help="backbone dtype: bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--allow_other_base", action="store_true",
                   help="mine with a --ckpt on a base model of the same architecture but other weights than the "
                        "one it was trained on (default: refuse; the checkpoint records its base weights)")
    g.add_argument("--use_flash_attn", action="store_true", help="flash-attention 2 when installed (GPU)")
    g = p.add_argument_group("sharding")
    g.add_argument("--num_shards", type=int, default=None,
                   help="split the queries over N processes (default: WORLD_SIZE under torchrun, else 1)")
    g.add_argument("--shard_id", type=int, default=None, help="this process's shard, 0..N-1 (default: RANK or 0)")
    g.add_argument("--merge", action="store_true",
                   help="only join the N shard files of --out_jsonl into it (with --num_shards N)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="log details (default: progress and results)")
    args = p.parse_args(argv)
    if args.no_gpu:
        args.device = "cpu"
    if args.num_shards is None:
        args.num_shards = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if args.shard_id is None:
        args.shard_id = int(os.environ.get("RANK", "0") or 0) if args.num_shards > 1 else 0
    for name in ("k", "candidates", "token_k", "doc_batch", "query_batch", "search_batch", "pages_per_part",
                 "num_shards", "nprobe"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.skip_top < 0 or args.recall_sample < 0 or args.fn_filter < 0 or args.deepen < 0:
        raise UserError("--skip_top, --recall_sample, --fn_filter and --deepen must not be negative")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if not 0 <= args.shard_id < args.num_shards:
        raise UserError(f"--shard_id must be in 0..{args.num_shards - 1}, got {args.shard_id}")
    if args.merge and args.num_shards < 2:
        raise UserError("--merge joins shard files: pass --num_shards N (N >= 2) as used for the shards")
    if not args.merge and (not args.model_id or not (args.hub_name or args.train_jsonl)):
        raise UserError("--model_id and --hub_name (a page dataset) or --train_jsonl (local pages) are required "
                        "(except with --merge)")
    if args.hub_name and args.train_jsonl:
        raise UserError("pass only one of --hub_name and --train_jsonl")
    if args.pages and not args.train_jsonl:
        raise UserError("--pages adds local pages to a --train_jsonl corpus; pass --train_jsonl too")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if args.merge:
        meta = merge_shards(args.out_jsonl, args.num_shards, args.keep_pages)
        print(f"merged {args.num_shards} shards: {meta['counts']['lines']} lines -> {args.out_jsonl}")
        return 0
    if Path(args.out_jsonl).is_dir():
        raise UserError(f"--out_jsonl {args.out_jsonl} is a folder; name a .jsonl file")
    if args.ckpt:
        from colintern.checkpoint import load_checkpoint

        load_checkpoint(args.ckpt)  # a missing, foreign or image-text checkpoint: one line, no output folder made
    make_output_dir(Path(args.out_jsonl).parent, "--out_jsonl")  # before the model loads: fail fast
    paths = output_paths(args.out_jsonl, args.shard_id, args.num_shards)
    if args.resume and paths["final"].is_file() and not paths["partial"].is_file():
        print(f"{paths['final']} is already complete; nothing to resume")
    else:
        if paths["partial"].exists() and not args.resume:
            log.warning("discarding the unfinished %s (pass --resume to continue it)", paths["partial"])
        for line in Miner(args).run():
            print(line)
    if args.num_shards > 1:
        meta = try_merge(args.out_jsonl, args.num_shards, args.keep_pages, paths)
        if meta is not None:
            print(f"merged {args.num_shards} shards: {meta['counts']['lines']} lines -> {args.out_jsonl}")
    return 0


def console() -> None:
    """The command line: one-line errors, the exit status (`python mine.py`, `colintern-mine`)."""
    sys.exit(run_cli(main, out_flag=OUT_FLAG))


if __name__ == "__main__":
    console()
