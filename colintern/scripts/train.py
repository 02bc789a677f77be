#!/usr/bin/env python
"""Train ColIntern: a projection head (+ optional LoRA) on InternVL3.5 / Qwen3-VL for late-interaction retrieval.

Phase 1, in-batch negatives (docs/CONTRACT.md §5, §7):
    python train.py --model_id OpenGVLab/InternVL3_5-1B-Instruct --train_hub vidore/colpali_train_set \\
        --batch_size 4 --grad_accum 4 --epochs 1 --lr 5e-5 --lora --optimizer paged_adamw_8bit --save_every 50
Phase 2, mined hard negatives (mine.py's output), continuing from phase 1's weights:
    python train.py --model_id OpenGVLab/InternVL3_5-1B-Instruct --train_jsonl outputs/mine/mined_triples.jsonl \\
        --resume_ckpt outputs/train/colintern_heads_epoch1.pt --batch_size 8 --grad_accum 4
Multi-GPU (data parallel; page embeddings are all-gathered so every query sees every rank's pages):
    torchrun --nproc_per_node 4 train.py ...   or   accelerate launch --multi_gpu --num_processes 4 train.py ...
(without GPUs the same commands run CPU processes over gloo).

Modes: without --lora only the head is trained; the backbone (and any LoRA loaded from --resume_ckpt) is
frozen, so hidden states are cached (--cache_mem_gb / --cache_disk_gb) and later epochs skip the backbone.
With --lora, LoRA adapters on the language model's linear layers are trained together with the head.

--resume_ckpt: a checkpoint of the same phase (same data, same arguments) continues exactly where it stopped
(optimizer, schedule, data position, RNG); a checkpoint of another phase (e.g. the in-batch epoch-1 file when
training on --train_jsonl) starts a new phase from its weights: fresh optimizer and schedule, step and epoch
numbers continue, and the file resumed from is never overwritten.

Outputs in --out_dir: colintern_heads_step{N}.pt every --save_every steps, colintern_heads_epoch{E}.pt at each
epoch end, training_loss.txt (one line per --log_every steps) and metrics.jsonl (one object per step).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from colintern.cli import run_cli, setup_logging  # noqa: E402
from colintern.device import resolve_device, torch_threads  # noqa: E402
from colintern.distributed import cleanup, init_distributed  # noqa: E402
from colintern.errors import UserError  # noqa: E402
from colintern.trainer import Trainer  # noqa: E402

log = logging.getLogger("colintern.train")
OUT_FLAG = "--out_dir"  # named in one-line errors about the output location (full disk, ...)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["retrieval", "itr"], default="retrieval", help="retrieval: page retrieval "
                   "(this help); itr: image-text retrieval with contrastive, matching, box and relation heads "
                   "(seed 004; its flags: train.py --task itr --help) (default: retrieval)")
    g = p.add_argument_group("model and data")
    g.add_argument("--model_id", required=True, help="base model: hub id or local directory (InternVL3.5, "
                   "original internvl_chat or transformers-native, or Qwen3-VL)")
    g.add_argument("--train_hub", help="phase 1 (in-batch negatives): page dataset with query/image columns: hub "
                   "id, local repository folder, save_to_disk directory or parquet file/glob")
    g.add_argument("--split", default="train", help="dataset split of --train_hub (default: train)")
    g.add_argument("--train_jsonl", help="phase 2 (hard negatives): {query, pos, negs} lines, e.g. mine.py's "
                   "output; paths are local images under --root or pseudo-paths <dataset>/<split>/doc_<i>.png")
    g.add_argument("--root", default=None, help="directory that relative image paths of --train_jsonl are "
                   "relative to (default: the working directory)")
    g.add_argument("--num_negs", type=int, default=1, help="hard negatives per query from --train_jsonl, "
                   "hardest first, in the same softmax as the in-batch pages (default: 1; 0 = in-batch only)")
    g.add_argument("--max_tiles", type=int, default=None, help="max 448-px tiles per page (default: the "
                   "checkpoint's, else 6); a thumbnail is added when a page has more than one tile")
    g.add_argument("--max_visual_tokens", type=int, default=None, help="Qwen3-VL: cap of visual tokens per page "
                   "(ColQwen3's --max-visual-tokens; default: the checkpoint's, else 768)")
    g.add_argument("--dim", type=int, default=None, help="token vector size of a new head (default 128); "
                   "must match the checkpoint when resuming")
    g.add_argument("--strict", action="store_true", help="stop at the first bad row instead of reporting and "
                   "skipping it")

    g = p.add_argument_group("single-vector retrieval (seed 002; a new model only: a checkpoint keeps its own)")
    g.add_argument("--embedding", choices=["multi", "single"], default=None, help="multi: a vector per kept "
                   "token, scored by MaxSim (ColPali); single: one pooled vector per item, scored by the dot "
                   "product (NV-Embed) (default: multi)")
    g.add_argument("--pooling", choices=["last", "mean", "latent"], default=None, help="single: the last kept "
                   "token (queries end with the EOS token), the mean of the kept tokens, or NV-Embed's latent "
                   "attention then the mean (default: mean)")
    g.add_argument("--attention", choices=["causal", "bidirectional"], default=None, help="the language model's "
                   "attention: causal as pretrained, or bidirectional (every token sees every real token; padding "
                   "stays masked) (default: causal)")
    g.add_argument("--instruction", default=None, help="single: queries become 'Instruct: INSTRUCTION\\nQuery: "
                   "TEXT'; the instruction shapes the text's states but is left out of the pooled vector "
                   "(default: none, 'Query: TEXT')")
    g.add_argument("--latent_size", type=int, default=None, help="pooling latent: latent vectors (default: 512, "
                   "NV-Embed's)")
    g.add_argument("--latent_heads", type=int, default=None, help="pooling latent: attention heads (default: 8)")
    g.add_argument("--no_page_check", action="store_true", help="skip decoding every page before training "
                   "(about 20-30 ms per 150-dpi page per core, docs/BENCHMARKS.md); bad pages are then found only "
                   "when a batch reaches them (default: check)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=4, help="pairs per micro-batch per process (default: 4)")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step (default: 1). "
                   "Without --grad_cache each micro-batch is its own softmax (B in-batch candidates per "
                   "process); with --grad_cache the step is one softmax over batch_size x grad_accum pairs")
    g.add_argument("--epochs", type=int, default=1, help="epochs of this phase (default: 1)")
    g.add_argument("--max_steps", type=int, default=0, help="stop this phase after N optimizer steps "
                   "(default: 0 = all epochs); the schedule decays over min(epochs x steps/epoch, N)")
    g.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default: 5e-5)")
    g.add_argument("--warmup_ratio", type=float, default=0.025, help="share of the phase's steps spent in "
                   "linear warm-up, followed by linear decay to 0 (default: 0.025)")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm (default: 1.0; "
                   "0 = no clipping)")
    g.add_argument("--optimizer", choices=["adamw", "adamw_8bit", "paged_adamw_8bit"], default="adamw",
                   help="torch AdamW, or bitsandbytes' 8-bit AdamW (paged: states in CUDA unified memory); "
                        "without a usable bitsandbytes the 8-bit ones fall back to AdamW with a warning")
    g.add_argument("--loss", choices=["ce", "pairwise"], default="ce", help="ce: softmax cross-entropy over "
                   "the candidates; pairwise: softplus of (hardest negative - positive) / tau, ColQwen3's "
                   "'pairwise' (default: ce)")
    g.add_argument("--tau", type=float, default=0.02, help="temperature of the loss (default: 0.02)")
    g.add_argument("--fn_filter", type=float, default=None, help="false-negative guard: drop a candidate "
                   "scoring above this ratio x the positive's score (e.g. 0.95; default: off)")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, LoRA init and dropout (default: 0)")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters on the language model's linear "
                   "layers together with the head (default: head only, frozen backbone)")
    g.add_argument("--lora_r", type=int, default=32, help="LoRA rank (default: 32)")
    g.add_argument("--lora_alpha", type=int, default=32, help="LoRA alpha (default: 32)")
    g.add_argument("--lora_dropout", type=float, default=0.1, help="LoRA dropout (default: 0.1)")
    g.add_argument("--lora_vision", action="store_true", help="also put LoRA on the vision tower (default: no)")
    g.add_argument("--lora_preset", choices=["nv-embed"], default=None, help="nv-embed: --lora with NV-Embed's "
                   "settings, r 16, alpha 32, dropout 0.1 (overrides --lora_r/--lora_alpha/--lora_dropout)")
    g.add_argument("--gather", choices=["global", "local"], default="global", help="global: every process's "
                   "pages join each query's softmax (gathered across GPUs); local: each process only its own "
                   "(the seed's ablation) (default: global)")
    g.add_argument("--grad_cache", action="store_true", help="GradCache: exact in-batch negatives over "
                   "batch_size x grad_accum pairs (x processes) with the activation memory of one micro-batch")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute the language model's "
                   "activations in the backward pass (the vision tower's too with --lora_vision; a frozen tower has "
                   "no backward to save memory for): less memory, slower; LoRA mode only")

    g = p.add_argument_group("hardware")
    g.add_argument("--device", "--device_map", dest="device", default="auto", help="cpu, cuda, cuda:N or "
                   "auto (CUDA when available; --device_map is the seed's name). Asking for CUDA on a machine "
                   "without it is an error. Under torchrun each process uses cuda:LOCAL_RANK (default: auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="backbone dtype (default: bf16 on CUDA, fp32 on CPU); head and LoRA stay fp32")
    g.add_argument("--allow_other_base", action="store_true",
                   help="continue a --resume_ckpt on a base model of the same architecture but other weights than "
                        "the one it was trained on (default: refuse; the checkpoint records its base weights)")
    g.add_argument("--use_flash_attn", action="store_true", help="flash-attention 2 (CUDA, flash-attn "
                   "installed); otherwise a warning and sdpa")
    g.add_argument("--compile_heads", action="store_true", help="torch.compile the projection head")
    g.add_argument("--compile_backend", default=os.environ.get("COLINTERN_COMPILE_BACKEND", "inductor"),
                   help="torch.compile backend for --compile_heads (default: $COLINTERN_COMPILE_BACKEND or "
                        "inductor; aot_eager needs no C++ compiler)")
    g.add_argument("--auto_batch", action="store_true", help="CUDA: probe forward+backward at the worst-case "
                   "page size and use the largest batch <= --auto_max_batch within --auto_target_frac of GPU "
                   "memory (on CPU: keeps --batch_size)")
    g.add_argument("--auto_target_frac", type=float, default=0.8, help="share of GPU memory auto_batch may "
                   "use (default: 0.8)")
    g.add_argument("--auto_max_batch", type=int, default=32, help="largest batch auto_batch tries (default: 32)")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the training process "
                   "(default: torch's default, one per core). On a busy, shared CPU small models can train several "
                   "times faster with 1; on a quiet one the default is faster (docs/BENCHMARKS.md). Irrelevant on "
                   "a GPU")
    g.add_argument("--num_workers", type=int, default=2, help="DataLoader processes decoding and tiling "
                   "images (default: 2; 0 = in the main process)")
    g.add_argument("--prefetch_factor", type=int, default=2, help="micro-batches each worker prepares ahead "
                   "(default: 2)")
    g.add_argument("--cache_mem_gb", type=float, default=4.0, help="heads-only mode: CPU memory for cached "
                   "backbone hidden states of pages and queries (default: 4 GB; 0 = none). A resumed run rebuilds "
                   "the cache up to its resume point (forward passes only), so results stay bit-identical")
    g.add_argument("--cache_disk_gb", type=float, default=0.0, help="heads-only mode: further cache in a file "
                   "under --out_dir once memory is full (default: 0 = none)")

    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--out_dir", default="outputs/train", help="checkpoints and logs (default: outputs/train)")
    g.add_argument("--save_every", type=int, default=2500, help="write colintern_heads_step{N}.pt every N "
                   "optimizer steps (default: 2500; 0 = only at epoch ends)")
    g.add_argument("--save_total_limit", type=int, default=0, help="keep only the newest N step checkpoints "
                   "(colintern_heads_step*.pt; epoch checkpoints are always kept); default: 0 = keep all")
    g.add_argument("--resume_ckpt", default=None, help="continue from a checkpoint (a path, or latest: the newest "
                   "in --out_dir): the same phase resumes exactly; another phase starts from its weights (see above)")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out_dir (its checkpoints "
                   "and logs are deleted); without it, a non-empty --out_dir needs --resume_ckpt")
    g.add_argument("--new_phase", action="store_true", help="with --resume_ckpt of this same phase: start a "
                   "new phase from its weights instead of continuing it")
    g.add_argument("-v", "--verbose", action="store_true", help="log details (default: progress and results)")
    g.add_argument("--report_to", nargs="+", choices=["none", "tensorboard", "wandb"], default=["none"],
                   help="also send every step's metrics to TensorBoard (--out_dir/tensorboard) and/or Weights & "
                        "Biases (WANDB_PROJECT, WANDB_MODE=offline work); metrics.jsonl is always written "
                        "(default: none)")
    g.add_argument("--eval_local", default=None, metavar="DIR", help="evaluate during training on a local "
                   "BEIR-layout set (docs/CONTRACT.md §7): nDCG@5/10 and recall@5 as eval_* fields of metrics.jsonl, "
                   "plotted by plot_training_loss.py (default: none)")
    g.add_argument("--eval_every", type=int, default=0, help="with --eval_local: evaluate every N optimizer steps, "
                   "and always at each epoch end and at the end of the phase (default: 0 = only there)")
    g.add_argument("--log_every", type=int, default=1, help="write a training_loss.txt line (loss averaged "
                   "over the last N steps) every N steps (default: 1); metrics.jsonl gets every step")
    args = p.parse_args(argv)
    if args.lora_preset == "nv-embed":
        args.lora, args.lora_r, args.lora_alpha, args.lora_dropout = True, 16, 32, 0.1
    given = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args.device_flag = "--device_map" if any(a.startswith("--device_map") for a in given) else "--device"
    if not args.train_hub and not args.train_jsonl:
        raise UserError("pass --train_hub (in-batch phase) or --train_jsonl (hard-negative phase)")
    if args.train_hub and args.train_jsonl:
        raise UserError("pass only one of --train_hub and --train_jsonl")
    for name in ("batch_size", "grad_accum", "epochs", "log_every", "prefetch_factor", "auto_max_batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("num_workers", "save_every", "save_total_limit", "eval_every", "max_steps", "num_negs",
                 "cache_mem_gb", "cache_disk_gb",
                 "weight_decay", "max_grad_norm", "warmup_ratio"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if not args.lr > 0 or not args.tau > 0:
        raise UserError(f"--lr and --tau must be positive (got {args.lr}, {args.tau})")
    if not 0 < args.auto_target_frac <= 1:
        raise UserError(f"--auto_target_frac must be in (0, 1], got {args.auto_target_frac}")
    if args.warmup_ratio >= 1:
        raise UserError(f"--warmup_ratio must be below 1, got {args.warmup_ratio}")
    single_only = [f"--{name}" for name in ("pooling", "instruction", "latent_size", "latent_heads")
                   if getattr(args, name) is not None]
    if single_only and args.embedding == "multi" or single_only and args.embedding is None and not args.resume_ckpt:
        raise UserError(f"{', '.join(single_only)} only apply to single-vector models: add --embedding single, or "
                        "leave them out for a multi-vector (ColPali) model")
    return args


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else [str(a) for a in argv]
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--task", choices=["retrieval", "itr"], default="retrieval")
    if task.parse_known_args(given)[0].task == "itr":  # seed 004: its own flags (train.py --task itr --help)
        from colintern.itr_train import main as itr_main

        return itr_main(given)
    args = parse_args(argv)
    dist = init_distributed(resolve_device(args.device, flag=args.device_flag))
    setup_logging(args.verbose, quiet=not dist.is_main)
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        with torch_threads(args.threads):
            summary = Trainer(args, dist).run()
        if dist.is_main:
            print(summary, flush=True)
        return 0
    finally:  # an in-process caller (tests, notebooks) gets its global torch settings back
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        cleanup()


def console() -> None:
    """The command line: one-line errors, the exit status (`python train.py`, `colintern-train`)."""
    sys.exit(run_cli(main, out_flag=OUT_FLAG))


if __name__ == "__main__":
    console()
