"""train.py's settings: data, single-vector options, optimisation, LoRA, hardware, checkpoints and logs."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from colintern.errors import UserError
from colintern.cli import Options, option
from colintern.settings.common import DeviceOptions, LogOptions, ModelOptions


def task_flag(parser: argparse.ArgumentParser) -> None:
    """train.py --task: which settings class the rest of the flags belong to (TrainConfig or ItrTrainConfig)."""
    parser.add_argument("--task", choices=["retrieval", "itr"], default="retrieval", help="retrieval: page retrieval; "
                        "itr: image-text retrieval with contrastive, matching, box and relation heads (seed 004; its "
                        "flags: train.py --task itr --help) (default: retrieval)")


@dataclass(frozen=True, kw_only=True)
class TrainDataOptions(Options):
    """training data"""

    train_hub: str | None = option(None, help="phase 1 (in-batch negatives): page dataset with query/image columns: "
                                              "hub id, local repository folder, save_to_disk directory or parquet "
                                              "file/glob")
    split: str = option("train", help="split of the page dataset (train.py --train_hub, mine.py --hub_name)")
    train_jsonl: str | None = option(None, help="{query, pos, negs} lines (docs/CONTRACT.md §7), e.g. mine.py's "
                                                "output; paths are local images under --root or pseudo-paths "
                                                "<dataset>/<split>/doc_<i>.png. train.py: phase 2 (hard negatives); "
                                                "mine.py: local pages instead of --hub_name, its queries mined against "
                                                "every distinct pos/neg page (and --pages)")
    root: str | None = option(None, help="directory that relative image paths of --train_jsonl (and mine.py "
                                         "--pages) are relative to (default: the working directory)")
    num_negs: int = option(1, at_least=0, help="hard negatives per query from --train_jsonl, hardest first, in the "
                                               "same softmax as the in-batch pages (default: 1; 0 = in-batch only)")
    max_tiles: int | None = option(None, at_least=1, help="max 448-px InternVL tiles per image (default: the "
                                   "checkpoint's, else 6; --task itr: 1, and 4 = 2 x 2 + thumbnail); a thumbnail is "
                                   "added when an image has more than one tile. Another value than the checkpoint's "
                                   "changes the embeddings (eval.py warns)")
    max_visual_tokens: int | None = option(None, at_least=1, help="Qwen3-VL: cap of visual tokens per page "
                                           "(ColQwen3's --max-visual-tokens; default: the checkpoint's, else 768)")
    dim: int | None = option(None, at_least=1, help="vector size of a new head: retrieval's token vectors (default "
                             "128), --task itr's contrastive vectors (default 256); must match the checkpoint when "
                             "resuming")
    strict: bool = option(False, help="stop at the first bad row instead of reporting and skipping it")
    no_page_check: bool = option(False, help="skip decoding every page before training (about 20-30 ms per 150-dpi "
                                             "page per core, docs/BENCHMARKS.md); bad pages are then found only when "
                                             "a batch reaches them (default: check)")

    def check(self) -> None:
        if not self.train_hub and not self.train_jsonl:
            raise UserError("pass --train_hub (in-batch phase) or --train_jsonl (hard-negative phase)")
        if self.train_hub and self.train_jsonl:
            raise UserError("pass only one of --train_hub and --train_jsonl")


@dataclass(frozen=True, kw_only=True)
class SingleVectorOptions(Options):
    """single-vector retrieval (seed 002; a new model only: a checkpoint keeps its own)"""

    embedding: str | None = option(None, choices=("multi", "single"), help="multi: a vector per kept token, scored "
                                   "by MaxSim (ColPali); single: one pooled vector per item, scored by the dot product "
                                   "(NV-Embed) (default: multi)")
    pooling: str | None = option(None, choices=("last", "mean", "latent"), help="single: the last kept token "
                                 "(queries end with the EOS token), the mean of the kept tokens, or NV-Embed's latent "
                                 "attention then the mean (default: mean)")
    attention: str | None = option(None, choices=("causal", "bidirectional"), help="the language model's attention: "
                                   "causal as pretrained, or bidirectional (every token sees every real token; "
                                   "padding stays masked) (default: causal)")
    instruction: str | None = option(None, help="single: queries become 'Instruct: INSTRUCTION\\nQuery: TEXT'; the "
                                     "instruction shapes the text's states but is left out of the pooled vector "
                                     "(default: none, 'Query: TEXT')")
    latent_size: int | None = option(None, at_least=1, help="pooling latent: latent vectors (default: 512, "
                                                           "NV-Embed's)")
    latent_heads: int | None = option(None, at_least=1, help="pooling latent: attention heads (default: 8)")


@dataclass(frozen=True, kw_only=True)
class OptimOptions(Options):
    """optimisation"""

    batch_size: int = option(4, at_least=1, help="items per forward pass: train.py's query-page pairs per "
                             "micro-batch per process (default 4; --task itr: captions per step, default 32), the "
                             "in-batch candidates; eval.py's and search.py's pages per encoder batch (default 8; pages "
                             "are sorted by tile count first)")
    grad_accum: int = option(1, at_least=1, help="micro-batches per optimizer step (default: 1). Without "
                             "--grad_cache each micro-batch is its own softmax (B in-batch candidates per process); "
                             "with --grad_cache the step is one softmax over batch_size x grad_accum pairs")
    epochs: int = option(1, at_least=1, help="epochs of this phase")
    max_steps: int = option(0, at_least=0, help="stop this phase after N optimizer steps (default: 0 = all epochs); "
                                                "the schedule decays over min(epochs x steps/epoch, N)")
    lr: float = option(5e-5, help="peak learning rate")
    warmup_ratio: float = option(0.025, at_least=0, help="share of the phase's steps spent in linear warm-up, "
                                                         "followed by linear decay to 0")
    weight_decay: float = option(0.0, at_least=0, help="AdamW weight decay")
    max_grad_norm: float = option(1.0, at_least=0, help="clip the gradient norm (default: 1.0; 0 = no clipping)")
    optimizer: str = option("adamw", choices=("adamw", "adamw_8bit", "paged_adamw_8bit"),
                            help="torch AdamW, or bitsandbytes' 8-bit AdamW (paged: states in CUDA unified memory); "
                                 "without a usable bitsandbytes the 8-bit ones fall back to AdamW with a warning")
    loss: str = option("ce", choices=("ce", "pairwise"), help="ce: softmax cross-entropy over the candidates; "
                       "pairwise: softplus of (hardest negative - positive) / tau, ColQwen3's 'pairwise'")
    tau: float = option(0.02, help="temperature of the loss")
    fn_filter: float | None = option(None, at_least=0, help="false-negative guard: drop a candidate scoring above "
                                     "this ratio x the positive's score (train.py default: off, e.g. 0.95; mine.py "
                                     "default: 0.95, NV-Retriever's; 0 disables)")
    seed: int = option(0, help="random seed: of the data order, LoRA init and dropout (train.py); of the generated "
                               "pages or scenes (synthetic data); of which documents are held out (make_dataset)")
    gather: str = option("global", choices=("global", "local"), help="global: every process's pages join each "
                         "query's softmax (gathered across GPUs); local: each process only its own (the seed's "
                         "ablation)")
    grad_cache: bool = option(False, help="GradCache: exact in-batch negatives over batch_size x grad_accum pairs "
                                          "(x processes) with the activation memory of one micro-batch")
    gradient_checkpointing: bool = option(False, help="recompute the language model's activations in the backward "
                                          "pass (the vision tower's too with --lora_vision; a frozen tower has no "
                                          "backward to save memory for): less memory, slower; LoRA mode only")

    def check(self) -> None:
        if not self.lr > 0 or not self.tau > 0:
            raise UserError(f"--lr and --tau must be positive (got {self.lr}, {self.tau})")
        if self.warmup_ratio >= 1:
            raise UserError(f"--warmup_ratio must be below 1, got {self.warmup_ratio}")


@dataclass(frozen=True, kw_only=True)
class LoraOptions(Options):
    """LoRA adapters"""

    lora: bool = option(False, help="train LoRA adapters on the language model's linear layers together with the "
                                    "head (default: head only, frozen backbone)")
    lora_r: int = option(32, at_least=1, help="LoRA rank")
    lora_alpha: int = option(32, at_least=1, help="LoRA alpha")
    lora_dropout: float = option(0.1, at_least=0, help="LoRA dropout")
    lora_vision: bool = option(False, help="also put LoRA on the vision tower (default: no)")
    lora_preset: str | None = option(None, choices=("nv-embed",), help="nv-embed: --lora with NV-Embed's settings, "
                                     "r 16, alpha 32, dropout 0.1 (overrides --lora_r/--lora_alpha/--lora_dropout)")

    def check(self) -> None:
        if self.lora_preset == "nv-embed":  # a preset is its values: the resolved config records them
            for name, value in (("lora", True), ("lora_r", 16), ("lora_alpha", 32), ("lora_dropout", 0.1)):
                object.__setattr__(self, name, value)


@dataclass(frozen=True, kw_only=True)
class TrainHardwareOptions(DeviceOptions):
    """hardware"""

    compile_heads: bool = option(False, help="torch.compile the projection head")
    compile_backend: str | None = option(None,
                                  help="torch.compile backend for --compile_heads (default: $COLINTERN_COMPILE_BACKEND "
                                       "or inductor; aot_eager needs no C++ compiler)")
    auto_batch: bool = option(False, help="CUDA: probe forward+backward at the worst-case page size and use the "
                                          "largest batch <= --auto_max_batch within --auto_target_frac of GPU memory "
                                          "(on CPU: keeps --batch_size)")
    auto_target_frac: float = option(0.8, help="share of GPU memory auto_batch may use")
    auto_max_batch: int = option(32, at_least=1, help="largest batch auto_batch tries")
    prefetch_factor: int = option(2, at_least=1, help="micro-batches each worker prepares ahead")
    cache_mem_gb: float = option(4.0, at_least=0, help="heads-only mode: CPU memory for cached backbone hidden "
                                 "states of pages and queries (default: 4 GB; 0 = none). A resumed run rebuilds the "
                                 "cache up to its resume point (forward passes only), so results stay bit-identical")
    cache_disk_gb: float = option(0.0, at_least=0, help="heads-only mode: further cache in a file under --out_dir "
                                                       "once memory is full (default: 0 = none)")

    def check(self) -> None:
        if not 0 < self.auto_target_frac <= 1:
            raise UserError(f"--auto_target_frac must be in (0, 1], got {self.auto_target_frac}")


@dataclass(frozen=True, kw_only=True)
class TrainOutputOptions(Options):
    """checkpoints and logs"""

    out_dir: str = option("outputs/train", help="output folder: train.py's checkpoints and logs; eval.py's run "
                                                "directories (--run_name)")
    save_every: int = option(2500, at_least=0, help="write colintern_heads_step{N}.pt every N optimizer steps "
                                                    "(default: 2500; 0 = only at epoch ends)")
    save_total_limit: int = option(0, at_least=0, help="keep only the newest N step checkpoints "
                                   "(colintern_heads_step*.pt; epoch checkpoints are always kept); default: 0 = keep "
                                   "all")
    resume_ckpt: str | None = option(None, help="continue from a checkpoint (a path, or latest: the newest in "
                                     "--out_dir): the same phase resumes exactly; another phase starts from its "
                                     "weights (see above)")
    overwrite: bool = option(False, help="replace an earlier run: train.py deletes its checkpoints and logs in "
                                         "--out_dir (without it, a non-empty --out_dir needs --resume_ckpt); eval.py "
                                         "recomputes a run directory instead of refusing a finished run or resuming "
                                         "an interrupted one; make_dataset replaces an earlier dataset in --out")
    new_phase: bool = option(False, help="with --resume_ckpt of this same phase: start a new phase from its weights "
                                         "instead of continuing it")
    report_to: list[str] = option(["none"], choices=("none", "tensorboard", "wandb"),
                                  help="also send every step's metrics to TensorBoard (--out_dir/tensorboard) and/or "
                                       "Weights & Biases (WANDB_PROJECT, WANDB_MODE=offline work); metrics.jsonl is "
                                       "always written (default: none)")
    eval_local: str | None = option(None, metavar="DIR", help="evaluate during training on a local BEIR-layout set "
                                    "(docs/CONTRACT.md §7): nDCG@5/10 and recall@5 as eval_* fields of metrics.jsonl, "
                                    "plotted by plot_training_loss.py (default: none)")
    eval_every: int = option(0, at_least=0, help="with --eval_local: evaluate every N optimizer steps, and always at "
                                                 "each epoch end and at the end of the phase (default: 0 = only "
                                                 "there)")
    log_every: int = option(1, at_least=1, help="write a training_loss.txt line (loss averaged over the last N "
                                                "steps) every N steps (default: 1); metrics.jsonl gets every step")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(ModelOptions, TrainDataOptions, SingleVectorOptions, OptimOptions, LoraOptions,
                  TrainHardwareOptions, TrainOutputOptions, LogOptions):
    """Everything one phase of retrieval training needs (train.py's flags)."""

    def check(self) -> None:
        single_only = [f"--{name}" for name in ("pooling", "instruction", "latent_size", "latent_heads")
                       if getattr(self, name) is not None]
        if single_only and (self.embedding == "multi" or self.embedding is None and not self.resume_ckpt):
            raise UserError(f"{', '.join(single_only)} only apply to single-vector models: add --embedding single, "
                            "or leave them out for a multi-vector (ColPali) model")
