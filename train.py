#!/usr/bin/env python
"""Train ColIntern: a projection head (+ optional LoRA) on InternVL3.5 / Qwen3-VL for late-interaction retrieval.

Phase 1, in-batch negatives (SPEC §5, §7):
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
import json
import logging
import math
import os
import re
import resource
import sys
import time
from functools import partial

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from colintern.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from colintern.data import SkipReport  # noqa: E402
from colintern.distributed import (all_gather_object, all_reduce_gradients, all_reduce_mean,  # noqa: E402
                                   broadcast_object, cleanup, gather_padded, init_distributed)
from colintern.errors import UserError, run_cli  # noqa: E402
from colintern.gradcache import gradcache_backward  # noqa: E402
from colintern.losses import late_interaction_loss  # noqa: E402
from colintern.training import (LOSS_TXT, METRICS_JSONL, Embedder, FailOnSave, Fingerprint, HiddenCache,  # noqa: E402
                                MicroBatches, append_line, diff_args, fault, format_loss_line, load_hub_examples,
                                load_jsonl_examples, lr_factor, make_loader, make_plan, prepare_logs,
                                probe_batch_size, rng_state, seed_everything, set_rng_state, step_loss,
                                worst_case_page)

log = logging.getLogger("colintern.train")

# Arguments that change what training computes: a checkpoint continues the same phase only if they match.
PHASE_ARGS = ("batch_size", "grad_accum", "epochs", "lr", "seed", "loss", "tau", "warmup_ratio", "weight_decay",
              "max_grad_norm", "max_steps", "fn_filter", "lora", "lora_r", "lora_alpha", "lora_dropout",
              "lora_vision", "optimizer", "grad_cache", "auto_batch", "auto_max_batch", "auto_target_frac", "dtype")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    g.add_argument("--grad_cache", action="store_true", help="GradCache: exact in-batch negatives over "
                   "batch_size x grad_accum pairs (x processes) with the activation memory of one micro-batch")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute backbone activations in "
                   "the backward pass (less memory, ~30%% slower; LoRA mode only)")

    g = p.add_argument_group("hardware")
    g.add_argument("--device_map", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available). "
                   "Asking for CUDA on a machine without it is an error. Under torchrun each process uses "
                   "cuda:LOCAL_RANK")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="backbone dtype (default: bf16 on CUDA, fp32 on CPU); head and LoRA stay fp32")
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
    g.add_argument("--resume_ckpt", default=None, help="continue from a checkpoint: the same phase resumes "
                   "exactly; another phase starts from its weights (see above)")
    g.add_argument("--new_phase", action="store_true", help="with --resume_ckpt of this same phase: start a "
                   "new phase from its weights instead of continuing it")
    g.add_argument("--log_every", type=int, default=1, help="write a training_loss.txt line (loss averaged "
                   "over the last N steps) every N steps (default: 1); metrics.jsonl gets every step")
    args = p.parse_args(argv)
    if not args.train_hub and not args.train_jsonl:
        raise UserError("pass --train_hub (in-batch phase) or --train_jsonl (hard-negative phase)")
    if args.train_hub and args.train_jsonl:
        raise UserError("pass only one of --train_hub and --train_jsonl")
    for name in ("batch_size", "grad_accum", "epochs", "log_every", "prefetch_factor", "auto_max_batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("num_workers", "save_every", "max_steps", "num_negs", "cache_mem_gb", "cache_disk_gb",
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
    return args


def resolve_device(device_map: str) -> str:
    """--device_map -> a torch device string; CUDA asked for but absent is a user error (not a silent CPU run)."""
    want = device_map.strip().lower()
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", want):
        raise UserError(f"--device_map {device_map!r}: use cpu, cuda, cuda:N or auto")
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device_map {device_map}: CUDA is not available on this machine; "
                            "use --device_map cpu (or auto)")
        index = int(want.split(":")[1]) if ":" in want else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device_map {device_map}: only {torch.cuda.device_count()} CUDA device(s)")
    return want


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                   device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer asked for; bitsandbytes' 8-bit AdamW falls back to torch AdamW when it cannot run here."""
    if name != "adamw":
        try:
            import bitsandbytes as bnb

            cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
            if name == "paged_adamw_8bit" and device.type != "cuda":
                log.info("--optimizer paged_adamw_8bit: paging needs CUDA; using non-paged 8-bit AdamW on %s",
                         device.type)
                cls = bnb.optim.AdamW8bit
            probe = torch.nn.Parameter(torch.zeros(4096, device=device))  # one step proves the kernels run here
            probe.grad = torch.ones_like(probe)
            cls([probe], lr=1e-3).step()
            return cls(params, lr=lr, weight_decay=weight_decay), name
        except Exception as err:  # noqa: BLE001 - ImportError, missing CUDA kernels, ...
            log.warning("--optimizer %s needs a working bitsandbytes on %s (%s: %s); falling back to torch "
                        "AdamW (32-bit states)", name, device.type, type(err).__name__, str(err).splitlines()[0]
                        if str(err) else "")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), "adamw"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist = init_distributed(resolve_device(args.device_map))
    rank, world, device, is_main = dist.rank, dist.world_size, dist.device, dist.is_main
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return train(args, rank, world, device, is_main)
    finally:  # an in-process caller (tests, notebooks) gets its global torch settings back
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.set_num_threads(threads)
        cleanup()


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device, is_main: bool) -> int:
    from colintern import ColIntern

    t_run = time.perf_counter()
    os.makedirs(args.out_dir, exist_ok=True)
    if device.type == "cpu":
        # Bit-exact resume: the CPU backward of advanced indexing (the loss's best-token gather, the page table)
        # otherwise accumulates in parallel, in an order that changes from run to run.
        torch.use_deterministic_algorithms(True, warn_only=True)

    # ---- data -------------------------------------------------------------------------------------------
    report = SkipReport(strict=args.strict, logger=log)
    if args.train_hub:
        data = load_hub_examples(args.train_hub, args.split, report)
    else:
        data = load_jsonl_examples(args.train_jsonl, args.root, report)
    examples = data.examples
    num_negs = args.num_negs if data.kind == "jsonl" else 0
    log.info("%d training examples (%s%s)", len(examples), "in-batch negatives" if data.kind == "hub" else
             "in-batch + hard negatives", f", {num_negs} per query" if num_negs else "")

    # ---- model ------------------------------------------------------------------------------------------
    payload = load_checkpoint(args.resume_ckpt) if args.resume_ckpt else None
    if payload is not None and args.dim is not None and payload["config"].get("dim") != args.dim:
        raise UserError(f"--dim {args.dim} differs from {args.resume_ckpt}'s dim {payload['config'].get('dim')}; "
                        "drop --dim to continue from this checkpoint")
    seed_everything(args.seed)  # identical on every rank: the LoRA initialisation must be the same everywhere
    model = ColIntern.from_pretrained(args.model_id, ckpt=args.resume_ckpt, device=str(device), dtype=args.dtype,
                                      use_flash_attn=args.use_flash_attn, max_tiles=args.max_tiles,
                                      max_visual_tokens=args.max_visual_tokens,
                                      dim=None if payload is not None else args.dim)
    if args.lora and model.lora_config is None:
        model.add_lora(args.lora_r, args.lora_alpha, args.lora_dropout, include_vision=args.lora_vision)
    elif args.lora:
        saved = model.lora_config
        if (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) != (args.lora_r, args.lora_alpha,
                                                                         args.lora_dropout):
            log.warning("continuing the checkpoint's LoRA adapters (r=%s, alpha=%s, dropout=%s); --lora_r/"
                        "--lora_alpha/--lora_dropout apply only to new adapters", saved["r"], saved["lora_alpha"],
                        saved["lora_dropout"])
    elif model.lora_config is not None:
        log.info("%s has LoRA adapters: they stay frozen (heads-only mode); pass --lora to keep training them",
                 args.resume_ckpt)
    train_backbone = args.lora
    for name, param in model.backbone.named_parameters():
        param.requires_grad_(train_backbone and "lora_" in name)
    model.head.requires_grad_(True)
    model.train(train_backbone)  # LoRA dropout on; the frozen backbone runs in eval mode
    params = [p for p in model.parameters() if p.requires_grad]
    log.info("mode: %s; %.3fM trainable parameters", "LoRA + head" if train_backbone else
             "head only (frozen backbone, cached hidden states)", sum(p.numel() for p in params) / 1e6)
    log.info("device %s, backbone %s, %d torch thread(s)", device, str(model.backbone.dtype).replace("torch.", ""),
             torch.get_num_threads())
    if args.gradient_checkpointing:
        if train_backbone:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            log.warning("--gradient_checkpointing has no effect in heads-only mode (no backbone gradients)")
    project = model.project
    if args.compile_heads:
        project = compile_project(model, args.compile_backend, device)
    seed_everything(args.seed + rank)  # dropout differs between ranks, as in any data-parallel run

    # ---- phase: continue the checkpoint's, or start a new one ---------------------------------------------
    phase_args = {k: getattr(args, k) for k in PHASE_ARGS}
    phase_args.update(num_negs=num_negs, world_size=world, split=args.split if data.kind == "hub" else None,
                      model={k: v for k, v in model.config.to_dict().items() if k != "base_model"})
    fingerprint = Fingerprint(json.dumps([data.kind, data.identity], sort_keys=True), phase_args)
    saved = payload.get("training") if payload is not None else None
    same_phase = bool(saved) and saved["phase"]["id"] == fingerprint.phase_id and not saved["phase_done"] \
        and not args.new_phase
    if same_phase and saved["phase"]["fingerprint"] != fingerprint.value:
        diffs = diff_args(saved["phase"]["args"], phase_args)
        raise UserError(f"{args.resume_ckpt} is a checkpoint of this phase (same data) trained with other "
                        f"arguments ({'; '.join(diffs[:4]) or 'model config'}); pass the same arguments to "
                        "continue it exactly, or add --new_phase to start a new phase from its weights")
    if same_phase:
        ph = saved["phase"]
        batch_size, phase_index, start_epoch, start_step = ph["batch_size"], ph["index"], ph["start_epoch"], \
            ph["start_step"]
        step, phase_step, epoch, position = saved["step"], saved["phase_step"], saved["epoch"], \
            saved["epoch_position"]
        log.info("resuming phase %d from %s: step %d (epoch %d, step %d of the epoch)", phase_index,
                 args.resume_ckpt, step, epoch, position)
    else:
        batch_size = args.batch_size
        phase_index = saved["phase"]["index"] + 1 if saved else 1
        start_step = step = saved["step"] if saved else 0
        start_epoch = epoch = saved["epoch"] + 1 if saved else 1
        phase_step = position = 0
        if payload is not None:
            log.info("new phase %d from the weights of %s: fresh optimizer and schedule, starting at epoch %d, "
                     "step %d", phase_index, args.resume_ckpt, epoch, step)

    # ---- batch size (auto_batch), steps, optimizer, schedule ------------------------------------------
    if args.auto_batch and not same_phase:
        batch_size = auto_batch(args, model, project, params, num_negs, train_backbone, device, world)
    plan = make_plan(len(examples), args.seed, epoch, batch_size, world, args.grad_accum)
    steps_per_epoch = plan.steps
    if steps_per_epoch == 0:
        need = batch_size * args.grad_accum * world
        raise UserError(f"{len(examples)} training examples are fewer than one optimizer step needs "
                        f"(batch_size {batch_size} x grad_accum {args.grad_accum} x {world} processes = {need}); "
                        "lower --batch_size or --grad_accum")
    phase_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        phase_steps = min(phase_steps, args.max_steps)
    last_epoch = start_epoch + math.ceil(phase_steps / steps_per_epoch) - 1
    warmup = math.ceil(args.warmup_ratio * phase_steps)
    optimizer, opt_name = make_optimizer(args.optimizer, params, args.lr, args.weight_decay, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, total=phase_steps, warmup=warmup))
    if same_phase:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    dropped = len(examples) - steps_per_epoch * args.grad_accum * batch_size * world
    log.info("phase %d: %d epoch(s) x %d steps (%d pairs per step = %d per micro-batch x %d accumulation x %d "
             "processes%s), %d steps in all, warm-up %d; %s", phase_index, last_epoch - start_epoch + 1,
             steps_per_epoch, batch_size * args.grad_accum * world, batch_size, args.grad_accum, world,
             f"; {dropped} examples per epoch do not fill a step" if dropped else "", phase_steps, warmup, opt_name)

    # ---- logs -------------------------------------------------------------------------------------------
    if is_main:
        prepare_logs(args.out_dir, step if payload is not None else None)
        if payload is not None:
            append_line(args.out_dir, LOSS_TXT, f"# {'resumed' if same_phase else f'phase {phase_index}'} from "
                        f"{args.resume_ckpt} at step {step}, epoch {epoch}: "
                        f"{args.train_hub or args.train_jsonl}")

    # ---- heads-only: the hidden-state cache (rebuilt up to the resume point so results stay exact) ------
    cache = None
    if not train_backbone:
        cache = HiddenCache(int(args.cache_mem_gb * 1e9), int(args.cache_disk_gb * 1e9),
                            os.path.join(args.out_dir, f".hidden_cache_rank{rank}.bin"))
    embedder = Embedder(model, project, train_backbone, cache)
    pin = device.type == "cuda"

    def epoch_batches(e: int, first: int, last: int, skip: frozenset[str]) -> tuple:
        """Plan of epoch e and a loader of this rank's micro-batches first..last-1."""
        p = make_plan(len(examples), args.seed, e, batch_size, world, args.grad_accum)
        rows = [p.rank_rows(j, rank) for j in range(first, last)]
        ds = MicroBatches(examples, rows, model.processor, num_negs, data.datasets, skip)
        return p, make_loader(ds, args.num_workers, args.prefetch_factor, pin)

    skip_at_epoch_start = None
    if same_phase and cache is not None and args.cache_mem_gb + args.cache_disk_gb > 0 and (
            epoch > start_epoch or position > 0):
        log.info("rebuilding the hidden-state cache up to the resume point (%d epoch(s) + %d steps of "
                 "forward passes)", epoch - start_epoch, position)
        with torch.no_grad():
            for e in range(start_epoch, epoch + 1):
                skip = cache.keys()
                if e == epoch:
                    skip_at_epoch_start = skip
                upto = steps_per_epoch * args.grad_accum if e < epoch else position * args.grad_accum
                _, loader = epoch_batches(e, 0, upto, skip)
                for batch in loader:
                    embedder.queries(batch)
                    embedder.pages(batch)
    if same_phase:
        set_rng_state(saved["rng"][rank])

    # ---- the training loop ----------------------------------------------------------------------------
    loss_kwargs = {"kind": args.loss, "temperature": args.tau, "fn_filter": args.fn_filter}
    seen_skips: set[tuple[str, str]] = set()
    last_ckpt = args.resume_ckpt
    last_metrics: dict = dict(payload.get("metrics", {})) if payload is not None else {}
    window: list[float] = []  # losses since the last training_loss.txt line (restored on resume)
    if is_main and payload is not None:
        with open(os.path.join(args.out_dir, METRICS_JSONL), encoding="utf-8") as f:
            done = [json.loads(line) for line in f if line.strip()]
        window = [r["loss"] for r in done if r["step"] > step - step % args.log_every]
    run_steps, run_pairs, t_train = 0, 0, time.perf_counter()
    epoch_seconds: dict[int, float] = {}
    A, B = args.grad_accum, batch_size

    def note_skips(batch: dict) -> None:
        for b, p in enumerate(batch["pos_row"].tolist()):
            if p in batch["bad"] and (batch["where"][b], batch["bad"][p][1]) not in seen_skips:
                seen_skips.add((batch["where"][b], batch["bad"][p][1]))
                report.add(batch["where"][b], f"{batch['bad'][p][1]} (pos {batch['pos_label'][b]})"
                           if data.kind == "jsonl" else batch["bad"][p][1])
            for n in batch["neg_row"][b].tolist():
                if n in batch["bad"] and (batch["where"][b], batch["bad"][n][1]) not in seen_skips:
                    seen_skips.add((batch["where"][b], batch["bad"][n][1]))
                    report.add(batch["where"][b], f"{batch['bad'][n][1]} (negative {batch['bad'][n][0]})")

    def run_step(p, js: list[int], batches: list[dict]) -> float:
        """Forward + backward of one optimizer step; returns this rank's loss."""
        kw = {"num_negs": num_negs, "rank": rank, "gather": gather_padded, "loss_fn": late_interaction_loss,
              "loss_kwargs": loss_kwargs}
        if args.grad_cache:
            keys = [examples[i].pos.key for r in range(world) for j in js for i in p.rank_rows(j, r)]
            closures = []
            for batch in batches:
                closures += [partial(embedder.queries, batch), partial(embedder.pages, batch)]
            return float(gradcache_backward(closures, lambda parts: step_loss(parts, batches, all_keys=keys, **kw)))
        total = 0.0
        for j, batch in zip(js, batches):
            keys = [examples[i].pos.key for i in p.micro[j]]
            loss = step_loss([embedder.queries(batch), embedder.pages(batch)], [batch], all_keys=keys, **kw)
            (loss / A).backward()
            total += float(loss.detach()) / A
        return total

    def save(path: str, training: dict) -> None:
        """Write a checkpoint on rank 0 (atomic); a failure stops the run with the previous file intact."""
        nonlocal last_ckpt
        rngs = all_gather_object(rng_state())
        error = None
        if args.resume_ckpt and os.path.realpath(path) == os.path.realpath(args.resume_ckpt):
            log.warning("not overwriting %s, the checkpoint this run resumed from", path)
            return
        if is_main:
            parts = model.checkpoint_parts()
            training = {**training, "rng": rngs}
            if fault("save_error", step):
                training["fault"] = FailOnSave()  # fails in the middle of writing the temp file
            try:
                save_checkpoint(path, config=parts["config"], head=parts["head"], lora=parts["lora"],
                                training=training, metrics=last_metrics)
            except OSError as err:
                error = f"{type(err).__name__}: {err}"
        error = broadcast_object(error)
        if error:
            raise UserError(f"could not write checkpoint {path} ({error}); the previous checkpoint "
                            f"{last_ckpt or '(none)'} is intact")
        last_ckpt = path
        log.info("saved %s", path)

    def training_state(done: bool) -> dict:
        return {
            "phase": {"id": fingerprint.phase_id, "fingerprint": fingerprint.value, "args": phase_args,
                      "index": phase_index, "kind": data.kind, "start_step": start_step,
                      "start_epoch": start_epoch, "steps": phase_steps, "steps_per_epoch": steps_per_epoch,
                      "batch_size": batch_size, "world_size": world},
            "step": step, "phase_step": phase_step, "epoch": epoch, "epoch_position": position,
            "phase_done": done, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "skipped": report.count,
        }

    bar = tqdm(total=phase_steps, initial=phase_step, desc=f"phase {phase_index}", unit="step",
               disable=not is_main, dynamic_ncols=True)
    try:
        first_epoch = epoch
        while phase_step < phase_steps:
            if position >= steps_per_epoch:  # resumed from an epoch-end checkpoint
                epoch, position = epoch + 1, 0
            end = min(steps_per_epoch, position + phase_steps - phase_step)
            skip = cache.keys() if cache is not None else frozenset()
            if epoch == first_epoch and skip_at_epoch_start is not None:
                skip = skip_at_epoch_start
            p, loader = epoch_batches(epoch, position * A, end * A, skip)
            it = iter(loader)
            t_epoch, computed_before = time.perf_counter(), embedder.items_computed
            full_epoch = position == 0
            for pos in range(position, end):
                t0 = time.perf_counter()
                js = [pos * A + m for m in range(A)]
                batches = [next(it) for _ in js]
                for batch in batches:
                    note_skips(batch)
                loss = all_reduce_mean(run_step(p, js, batches))
                all_reduce_gradients(params)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf")))
                if fault("nan", step + 1):
                    loss = float("nan")
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    raise UserError(f"training diverged: loss {loss}, grad_norm {grad_norm} at step {step + 1} "
                                    f"(epoch {epoch}); stopped without saving. Last good checkpoint: "
                                    f"{last_ckpt or '(none written yet)'}. Lower --lr, raise --tau or check the data")
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step, phase_step, position = step + 1, phase_step + 1, pos + 1
                seconds = time.perf_counter() - t0
                pairs = B * A * world
                run_steps, run_pairs = run_steps + 1, run_pairs + pairs
                last_metrics = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                "pairs_per_s": pairs / seconds, "seconds": seconds}
                window.append(loss)
                if is_main:
                    append_line(args.out_dir, METRICS_JSONL, json.dumps(last_metrics))
                    if step % args.log_every == 0:
                        append_line(args.out_dir, LOSS_TXT, format_loss_line(step, epoch, sum(window) / len(window), lr,
                                                                             grad_norm, pairs / seconds))
                        window = []
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", pairs_s=f"{pairs / seconds:.1f}", epoch=epoch)
                epoch_done = position == steps_per_epoch
                done = phase_step == phase_steps
                if (args.save_every and step % args.save_every == 0) or (done and not epoch_done):
                    save(os.path.join(args.out_dir, f"colintern_heads_step{step}.pt"), training_state(done))
                if epoch_done:
                    save(os.path.join(args.out_dir, f"colintern_heads_epoch{epoch}.pt"), training_state(done))
                fault("kill", step)
                if fault("raise", step):
                    raise RuntimeError(f"injected failure after step {step}")
            if full_epoch and position == steps_per_epoch:
                epoch_seconds[epoch] = time.perf_counter() - t_epoch
                base = min(epoch_seconds)  # the first full epoch of this run: the one that filled the cache
                if is_main and cache is not None and epoch > base:
                    msg = (f"epoch {epoch}: {epoch_seconds[epoch]:.1f} s vs {epoch_seconds[base]:.1f} s for epoch "
                           f"{base}: "
                           f"{epoch_seconds[base] / max(epoch_seconds[epoch], 1e-9):.1f}x faster with the hidden-state "
                           f"cache ({len(cache)} items cached, {cache.mem_used / 1e9:.2f} GB memory + "
                           f"{cache.disk_used / 1e9:.2f} GB disk; {embedder.items_computed - computed_before} "
                           "items still went through the backbone)")
                    log.info(msg)
                    append_line(args.out_dir, LOSS_TXT, "# " + msg)
    finally:
        bar.close()
        if cache is not None:
            cache.close()

    # ---- summary ----------------------------------------------------------------------------------------
    seconds = time.perf_counter() - t_train
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
    summary = (f"done: phase {phase_index}, {run_steps} steps in this run (global step {step}, epoch {epoch}) in "
               f"{seconds:.1f} s, {run_pairs / max(seconds, 1e-9):.1f} pairs/s, peak memory {peak}, "
               f"{report.summary()}; last checkpoint {last_ckpt} (total {time.perf_counter() - t_run:.1f} s)")
    if is_main:
        log.info(summary)
        for item in report.items[:20]:
            log.info("  skipped %s: %s", item.where, item.reason)
        append_line(args.out_dir, LOSS_TXT, "# " + summary)
        print(summary, flush=True)
    return 0


def compile_project(model, backend: str, device: torch.device):
    """torch.compile the head's projection; a failure (e.g. no C++ compiler) warns and keeps the eager head."""
    try:
        compiled = torch.compile(model.project, backend=backend, dynamic=True)
        hidden = torch.zeros(2, 3, model.config.hidden_size, dtype=next(model.backbone.parameters()).dtype,
                             device=device)
        keep = torch.ones(2, 3, dtype=torch.bool, device=device)
        compiled(hidden, keep).sum().backward()  # compile forward and backward now, not mid-step
        model.head.zero_grad(set_to_none=True)
        log.info("compiled the projection head (torch.compile backend %s)", backend)
        return compiled
    except Exception as err:  # noqa: BLE001 - compilation can fail in many ways
        model.head.zero_grad(set_to_none=True)
        log.warning("--compile_heads: torch.compile failed (%s: %s); using the eager head", type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "")
        return model.project


def auto_batch(args, model, project, params, num_negs: int, train_backbone: bool, device: torch.device,
               world: int) -> int:
    """The micro-batch size: probed on CUDA (worst-case pages), else --batch_size."""
    if device.type != "cuda":
        log.info("--auto_batch probes GPU memory and needs CUDA; on %s it keeps --batch_size %d", device.type,
                 args.batch_size)
        return args.batch_size
    page = worst_case_page(model.processor, model.config)
    query = " ".join(["which page shows the revenue table of the annual report"] * 6)

    def embed_step(b: int) -> None:
        q_in = model.processor.process_queries([query] * b)
        p_in = model.processor.process_images([page] * (b * (1 + num_negs)))
        with torch.set_grad_enabled(train_backbone):
            hq, hp = model.hidden_states(q_in), model.hidden_states(p_in)
        q_keep, p_keep = q_in["keep_mask"].to(device), p_in["keep_mask"].to(device)
        q, d = project(hq, q_keep), project(hp, p_keep)  # (b, Lq, D), (b(1+K), Lp, D)
        neg = d[b:].view(b, num_negs, *d.shape[1:]) if num_negs else None
        neg_mask = p_keep[b:].view(b, num_negs, -1) if num_negs else None
        loss = late_interaction_loss(q, q_keep, d[:b], p_keep[:b], neg, neg_mask, kind=args.loss,
                                     temperature=args.tau)
        loss.backward()

    state_bytes = sum(p.numel() for p in params) * (8 if args.optimizer == "adamw" else 2)
    chosen, notes = probe_batch_size(embed_step, params, max_batch=args.auto_max_batch,
                                     target_frac=args.auto_target_frac, device=device, extra_bytes=state_bytes)
    chosen = min(all_gather_object(chosen))
    torch.cuda.reset_peak_memory_stats(device)  # the summary's peak memory is training's, not the probes'
    log.info("auto_batch: micro-batch %d (%s)", chosen, "; ".join(notes))
    return chosen


if __name__ == "__main__":
    sys.exit(run_cli(main))
