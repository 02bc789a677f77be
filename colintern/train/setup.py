"""Setting up a retrieval run before its first step: the model to train and what of it trains, a new model's config
from the settings, the compiled head (falling back to the eager one at any compiler failure), and auto-batch's
choice of micro-batch on a GPU."""
from __future__ import annotations

import logging
from typing import Any

import torch

from colintern.settings import TrainConfig
from colintern.train.distributed import all_gather_object
from colintern.errors import UserError
from colintern.retriever.config import LATER_FIELDS
from colintern.train.losses import late_interaction_loss
from colintern.train.step import is_out_of_memory, probe_batch_size


log = logging.getLogger("colintern.train")


def new_model_settings(config: TrainConfig) -> dict[str, Any]:
    """ColInternConfig fields of a new model from the flags (a checkpoint keeps its own). A single-vector model
    drops ColBERT's query augmentation and ends queries with the tokenizer's EOS (NV-Embed's add_eos), so that
    pooling 'last' reads the same token for every query."""
    settings: dict[str, Any] = {"dim": config.dim, "embedding": config.embedding, "pooling": config.pooling,
                                "attention": config.attention, "instruction": config.instruction}
    if config.embedding == "single":
        from colintern.backbones.base import load_tokenizer

        settings.update(n_augmentation=0, query_suffix=load_tokenizer(config.model_id).eos_token or "")
    latent = {k: v for k, v in (("num_latents", config.latent_size), ("heads", config.latent_heads)) if v}
    if latent:
        if (config.pooling or "mean") != "latent":
            raise UserError("--latent_size/--latent_heads set the latent pooler: pass --pooling latent too")
        settings["latent"] = latent
    return settings


class CompiledOrEager:
    """The compiled embedding head, falling back to the eager one for good at the first failure.

    torch.compile recompiles when a call brings new guards (a batch of 1 at an epoch's end, a longer page, another
    dtype), so a compiler failure can surface mid-training, not only in the warm-up: it warns once and the step
    runs eagerly (the same function, so the same numbers). Out-of-memory errors are not compiler failures and
    propagate (auto_batch's probe and the training loop handle them)."""

    def __init__(self, compiled, eager) -> None:
        self.compiled, self.eager = compiled, eager

    def __call__(self, hidden: torch.Tensor, keep: torch.Tensor):
        if self.compiled is not None:
            try:
                return self.compiled(hidden, keep)
            except Exception as err:  # noqa: BLE001 - compilation can fail in many ways
                if is_out_of_memory(err):
                    raise
                self.compiled = None
                warn_compile_failed(err)
        return self.eager(hidden, keep)


def warn_compile_failed(err: BaseException) -> None:
    log.warning("--compile_heads: torch.compile failed (%s: %s); using the eager head", type(err).__name__,
                str(err).splitlines()[0] if str(err) else "")


def compile_embed(model, backend: str, device: torch.device):
    """torch.compile the embedding head; a failure (e.g. no C++ compiler), now or at a later recompilation, warns
    and keeps the eager head."""
    try:
        compiled = torch.compile(model.embed, backend=backend, dynamic=True)
        hidden = torch.zeros(2, 3, model.config.hidden_size, dtype=next(model.backbone.parameters()).dtype,
                             device=device)
        keep = torch.ones(2, 3, dtype=torch.bool, device=device)
        compiled(hidden, keep)[0].sum().backward()  # compile forward and backward now, not mid-step
        model.head.zero_grad(set_to_none=True)
        log.info("compiled the projection head (torch.compile backend %s)", backend)
        return CompiledOrEager(compiled, model.embed)
    except Exception as err:  # noqa: BLE001 - compilation can fail in many ways
        model.head.zero_grad(set_to_none=True)
        warn_compile_failed(err)
        return model.embed


def auto_batch(config: TrainConfig, model, embed, params, num_negs: int, train_backbone: bool,
               device: torch.device) -> int:
    """The micro-batch size: probed on CUDA (worst-case pages, the same on every rank), else --batch_size."""
    if device.type != "cuda":
        log.info("--auto_batch probes GPU memory and needs CUDA; on %s it keeps --batch_size %d", device.type,
                 config.batch_size)
        return config.batch_size
    page = model.processor.worst_case_page()
    query = " ".join(["which page shows the revenue table of the annual report"] * 6)

    def embed_step(b: int) -> None:
        q_in = model.processor.process_queries([query] * b)
        p_in = model.processor.process_images([page] * (b * (1 + num_negs)))
        with torch.set_grad_enabled(train_backbone):
            hq, hp = model.hidden_states(q_in), model.hidden_states(p_in)
        q, q_keep = embed(hq, q_in["keep_mask"])  # (b, Lq, D)
        d, p_keep = embed(hp, p_in["keep_mask"])  # (b(1+K), Lp, D)
        neg = d[b:].view(b, num_negs, *d.shape[1:]) if num_negs else None
        neg_mask = p_keep[b:].view(b, num_negs, -1) if num_negs else None
        loss = late_interaction_loss(q, q_keep, d[:b], p_keep[:b], neg, neg_mask, kind=config.loss,
                                     temperature=config.tau)
        loss.backward()

    state_bytes = sum(p.numel() for p in params) * (8 if config.optimizer == "adamw" else 2)
    try:
        chosen, notes = probe_batch_size(embed_step, params, max_batch=config.auto_max_batch,
                                         target_frac=config.auto_target_frac, device=device, extra_bytes=state_bytes)
        failure = None
    except UserError as err:  # every rank must hear of it, or the others wait in the gather below forever
        chosen, notes, failure = 0, [], str(err)
    choices = all_gather_object((chosen, failure))
    failures = [f for _, f in choices if f]
    if failures:
        raise UserError(failures[0])
    chosen = min(c for c, _ in choices)
    torch.cuda.reset_peak_memory_stats(device)  # the summary's peak memory is training's, not the probes'
    log.info("auto_batch: micro-batch %d (%s)", chosen, "; ".join(notes))
    return chosen


def load_training_model(config: TrainConfig, payload: dict[str, Any] | None, device: torch.device) -> Any:
    """The model to train: a checkpoint's (--resume_ckpt: its config, head and LoRA) or a new one from the settings,
    with new LoRA adapters when --lora asks for them. A setting that would change what a checkpoint's embeddings
    mean is refused: a checkpoint keeps its own."""
    from colintern.retriever.model import ColIntern

    for flag in ("dim", "embedding", "pooling", "attention", "instruction"):
        wanted, saved = getattr(config, flag), (payload or {}).get("config", {}).get(flag, LATER_FIELDS.get(flag))
        if payload is not None and wanted is not None and wanted != saved:
            raise UserError(f"--{flag} {wanted} differs from {config.resume_ckpt}'s {flag} {saved}; a checkpoint "
                            f"keeps its own: drop --{flag} to continue from it, or train a new model without "
                            "--resume_ckpt")
    model = ColIntern.from_pretrained(config.model_id, ckpt=config.resume_ckpt, device=str(device),
                                      dtype=config.dtype, use_flash_attn=config.use_flash_attn,
                                      max_tiles=config.max_tiles, max_visual_tokens=config.max_visual_tokens,
                                      allow_other_base=config.allow_other_base,
                                      **({} if payload is not None else new_model_settings(config)))
    if config.lora and model.lora_config is None:
        model.add_lora(config.lora_r, config.lora_alpha, config.lora_dropout, include_vision=config.lora_vision)
    elif config.lora:
        lora: dict[str, Any] = model.lora_config or {}
        if (lora["r"], lora["lora_alpha"], lora["lora_dropout"]) != (config.lora_r, config.lora_alpha,
                                                                      config.lora_dropout):
            log.warning("continuing the checkpoint's LoRA adapters (r=%s, alpha=%s, dropout=%s); --lora_r/"
                        "--lora_alpha/--lora_dropout apply only to new adapters", lora["r"],
                        lora["lora_alpha"], lora["lora_dropout"])
    elif model.lora_config is not None:
        log.info("%s has LoRA adapters: they stay frozen (heads-only mode); pass --lora to keep training them",
                 config.resume_ckpt)
    if model.config.attention == "bidirectional" and model.config.keep_page_tokens == "page":
        log.info("bidirectional attention: the page prompt's tokens before the image now see the page, but "
                 "keep_page_tokens 'page' still leaves them out (set by the checkpoint's config)")
    return model


def trainable_parameters(model: Any, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Mark what trains (the head, the latent pooler, and with --lora the adapters; nothing else of the backbone),
    set the train/eval modes, enable activation checkpointing where gradients flow; returns the trained parameters."""
    train_backbone = config.lora
    if train_backbone and model.backbone.dtype == torch.float16:
        log.warning("--dtype fp16 with --lora: backbone gradients flow in fp16 without loss scaling and can "
                    "underflow; prefer bf16 (or fp32 on GPUs without bf16)")
    for name, param in model.backbone.named_parameters():
        param.requires_grad_(train_backbone and "lora_" in name)
    model.head.requires_grad_(True)
    if model.pooler is not None:
        model.pooler.requires_grad_(True)
    model.train(train_backbone)  # LoRA dropout on; the frozen backbone runs in eval mode
    if config.gradient_checkpointing:
        if train_backbone:
            model.checkpoint_activations(include_vision=config.lora_vision)
        else:
            log.warning("--gradient_checkpointing has no effect in heads-only mode (no backbone gradients)")
    return [p for p in model.parameters() if p.requires_grad]
