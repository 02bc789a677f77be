"""ColIntern: a vision-language backbone + a linear head -> bags of L2-normalised token vectors (docs/CONTRACT.md §4).

    m = ColIntern.from_pretrained(model_id, ckpt=None, device="cpu", dtype=None)
    docs = m.encode_images(list_of_pil, batch_size=8)    # list of (L_i, dim) float32 CPU tensors
    qs = m.encode_queries(list_of_str, batch_size=32)

Every token vector is head(last hidden state) / ||.||, computed in float32. Padding is masked, never scored,
and right padding keeps a causal LM's hidden states independent of what else is in the batch.
"""
from __future__ import annotations

import importlib
import itertools
import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from colintern.backbones.base import LM_LORA_TARGETS, LoadedBackbone
from colintern.retriever.checkpoint import check_compatible, load_checkpoint, recorded_model_id
from colintern.retriever.config import ColInternConfig
from colintern.device import resolve_device
from colintern.errors import UserError
from colintern.retriever.export import HEAD_FILE
from colintern.backbones.registry import get_family, load_backbone
from colintern.retriever.pooling import LatentAttentionPooler, latent_settings, pool, set_text_attention

log = logging.getLogger("colintern")

NORM_EPS = 1e-6


def default_prep_workers(device: str | torch.device) -> int:
    """Background preprocessing threads of encode_*: none on a CPU (the model needs the cores), else up to 4."""
    if torch.device(device).type == "cpu":
        return 0
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if not str(device).startswith("cuda"):
            return torch.float32
        if not torch.cuda.is_bf16_supported():  # pre-Ampere GPUs: fp16 would train without loss scaling
            log.info("this GPU has no bf16: using fp32 (pass --dtype fp16 for inference in half precision)")
            return torch.float32
        return torch.bfloat16
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise UserError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def resolve_attn_implementation(use_flash_attn: bool, device: str | torch.device,
                                dtype: torch.dtype = torch.bfloat16) -> str:
    """flash_attention_2 when asked for and it can run here, else sdpa with one warning saying why.

    transformers' is_flash_attn_2_available() only reads package metadata; an installed flash-attn that cannot be
    imported (a wheel built for another torch or CUDA) would then crash model loading. Flash-attention also needs
    bf16/fp16 and an Ampere or newer GPU (compute capability 8.0); otherwise it fails at the first forward."""
    if not use_flash_attn:
        return "sdpa"
    device = torch.device(device)
    why = None
    if device.type != "cuda":
        why = "CUDA-only"
    elif dtype not in (torch.bfloat16, torch.float16):
        why = f"for bf16/fp16 only, not {str(dtype).replace('torch.', '')}"
    elif torch.cuda.get_device_capability(device)[0] < 8:
        major, minor = torch.cuda.get_device_capability(device)
        why = f"for Ampere or newer GPUs only (compute capability 8.0; this one has {major}.{minor})"
    else:
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            why = "not installed"
        else:
            try:  # metadata can exist for a package that cannot be imported
                importlib.import_module("flash_attn")
            except Exception as err:  # noqa: BLE001 - ImportError, OSError from a mismatched CUDA build, ...
                first = str(err).splitlines()[0] if str(err) else ""
                why = f"installed but not importable ({type(err).__name__}: {first})"
    if why is None:
        return "flash_attention_2"
    log.warning("flash-attention 2 was asked for but is %s; using sdpa", why)
    return "sdpa"


def is_exported_model(model_id: str) -> bool:
    """Whether model_id is a folder written by search.py export_model (it holds its trained head and config)."""
    return os.path.isfile(os.path.join(model_id, HEAD_FILE))


def has_trained_head(model_id: str) -> bool:
    """Whether model_id brings its own trained head: an exported ColIntern folder or a colpali-engine checkpoint."""
    from colintern.retriever.colpali_engine import colpali_checkpoint

    return is_exported_model(model_id) or colpali_checkpoint(model_id) is not None


def load_any_backbone(model_id: str, dtype: torch.dtype, attn: str, device: str | torch.device) -> LoadedBackbone:
    """The backbone of `model_id`: a model folder or hub id of any family, or a colpali-engine checkpoint (its
    adapters merged and its head kept, colintern/retriever/colpali_engine.py)."""
    from colintern.retriever.colpali_engine import colpali_checkpoint, load_colpali

    colpali = None if is_exported_model(model_id) else colpali_checkpoint(model_id)
    if colpali is None:
        return load_backbone(model_id, dtype=dtype, attn_implementation=attn, device=device)
    loaded = load_colpali(colpali, dtype, attn)
    loaded.model.to(device)
    loaded.model.eval()
    return loaded


def config_for_backbone(loaded: LoadedBackbone, model_id: str, **overrides: Any) -> ColInternConfig:
    """A fresh ColIntern config for a backbone (no checkpoint): facts from the backbone, formatting defaults."""
    config = ColInternConfig(base_model=recorded_model_id(model_id), backbone=loaded.family, source_layout=loaded.layout,
                             base_weights=loaded.weights,
                             signature=loaded.signature, hidden_size=loaded.hidden_size,
                             tile_size=loaded.tile_size or 448, image_tokens_per_tile=loaded.image_tokens_per_tile or 256)
    values = config.to_dict()
    values.update(loaded.config_defaults)  # e.g. the ColQwen3 page prompt and image tokens for qwen3_vl
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise UserError(f"unknown ColIntern config fields {unknown}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ColInternConfig.from_dict(values)


class ColIntern(nn.Module):
    """Backbone + head. Holds its ColInternConfig, the processor built from it, and optional LoRA adapters."""

    def __init__(self, loaded: LoadedBackbone, config: ColInternConfig):
        super().__init__()
        self.backbone = loaded.model
        self.tokenizer = loaded.tokenizer
        self.signature = loaded.signature
        self.config = config
        self.family = get_family(config.backbone)
        self.processor = self.family.make_processor(loaded.tokenizer, config)
        # fp32 whatever the backbone dtype; initialised on the CPU (its seeded generator is a CPU one, even under a
        # CUDA default device), then moved next to the backbone
        self.head = nn.Linear(config.hidden_size, config.dim, device="cpu")
        generator = torch.Generator().manual_seed(config.head_seed)
        with torch.no_grad():
            bound = config.hidden_size ** -0.5
            self.head.weight.copy_(torch.empty_like(self.head.weight).uniform_(-bound, bound, generator=generator))
            self.head.bias.zero_()
        self.pooler: nn.Module | None = None
        if config.embedding == "single" and config.pooling == "latent":
            with torch.device("cpu"):  # seeded by a CPU generator, like the head
                self.pooler = LatentAttentionPooler(config.hidden_size, **latent_settings(config.latent),
                                                    seed=config.head_seed)
        set_text_attention(self.family.language_model(self.backbone), config.attention)
        device = next(self.backbone.parameters()).device
        self.head.to(device)
        if self.pooler is not None:
            self.pooler.to(device)
        self.lora_config: dict[str, Any] | None = None
        # encode_images / encode_queries: background threads preparing the next batches (None: default_prep_workers)
        self.prep_workers: int | None = None

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_id: str, ckpt: str | None = None, device: str | None = "cpu",
                        dtype: str | torch.dtype | None = None, use_flash_attn: bool = False,
                        allow_other_base: bool = False, **config_overrides: Any) -> "ColIntern":
        """Load a backbone (hub id or local dir) and optionally a ColIntern checkpoint (head + LoRA + config).

        With a checkpoint, its config decides the formatting; an explicit override of a field that changes
        what the checkpoint means is applied with a warning.
        """
        device = resolve_device(device)
        if ckpt is None and is_exported_model(model_id):
            ckpt = os.path.join(model_id, HEAD_FILE)
            log.info("%s is an exported ColIntern model: loading its head and config from %s", model_id, HEAD_FILE)
        torch_dtype = resolve_dtype(dtype, device)
        attn = resolve_attn_implementation(use_flash_attn, device, torch_dtype)
        payload = load_checkpoint(ckpt) if ckpt else None
        loaded = load_any_backbone(model_id, torch_dtype, attn, device)
        if payload is None:
            model = cls(loaded, config_for_backbone(loaded, model_id, **config_overrides))
            if loaded.head_state is not None:  # a published retriever brings its trained head
                model.head.load_state_dict(loaded.head_state)
        else:
            check_compatible(payload, loaded.signature, str(ckpt), weights=loaded.weights,
                             allow_other_base=allow_other_base)
            values = dict(payload["config"])
            values["base_weights"] = loaded.weights or values.get("base_weights", "")  # the weights in use now
            for key, value in config_overrides.items():
                if value is not None and values.get(key) != value:
                    log.warning("overriding checkpoint setting %s=%r with %r: embeddings will differ from "
                                "those the checkpoint was trained with", key, values.get(key), value)
                    values[key] = value
            model = cls(loaded, ColInternConfig.from_dict(values))
            model.load_parts(payload)
        return model.to(device)

    def load_parts(self, payload: dict[str, Any]) -> None:
        """Load head, pooler and LoRA weights from a checkpoint payload."""
        self.head.load_state_dict(payload["head"])
        if (payload.get("pooler") is None) != (self.pooler is None):
            raise UserError(f"the checkpoint {'has' if payload.get('pooler') is not None else 'lacks'} latent pooler "
                            "weights, which its config does not match; the file is damaged or was edited")
        if self.pooler is not None:
            self.pooler.load_state_dict(payload["pooler"])
        if payload.get("lora"):
            lora = payload["lora"]
            self.add_lora(**lora["config"])
            self.load_lora_state(lora["state"])

    def checkpoint_activations(self, include_vision: bool = False) -> None:
        """Activation (gradient) checkpointing where gradients flow: the language model's layers, and the vision
        tower's only when it is trained too (--lora_vision). A frozen vision tower has no backward, so checkpointing it
        would only run its forward twice (about 73 % of a 4+1-tile InternVL page's forward FLOPs)."""
        target: Any = self.backbone if include_vision else self.family.language_model(self.backbone)
        kwargs = {"use_reentrant": False}
        enable = getattr(target, "activation_checkpointing_enable", None)  # transformers >= 5.2x
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # -- LoRA -----------------------------------------------------------------------------------------
    def add_lora(self, r: int = 32, lora_alpha: int = 32, lora_dropout: float = 0.1,
                 target_modules: Sequence[str] | None = None, include_vision: bool = False) -> None:
        """Inject LoRA adapters into the language model's linear layers (the vision tower only if asked)."""
        from peft import LoraConfig, inject_adapter_in_model

        if self.lora_config is not None:
            raise UserError("LoRA adapters are already attached to this model")
        targets = list(target_modules or LM_LORA_TARGETS)
        for module, module_targets in self.family.lora_modules(self.backbone, include_vision, targets):
            inject_adapter_in_model(LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                               target_modules=module_targets), module)
        self.lora_config = {"r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
                            "target_modules": targets, "include_vision": include_vision}
        device = next(self.head.parameters()).device
        for name, param in self.backbone.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(device=device, dtype=torch.float32)

    def lora_state(self) -> dict[str, torch.Tensor] | None:
        if self.lora_config is None:
            return None
        return {name: param.detach().cpu().clone() for name, param in self.backbone.named_parameters()
                if "lora_" in name}

    def load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.backbone.named_parameters())
        missing = [k for k in params if "lora_" in k and k not in state]
        unexpected = [k for k in state if k not in params]
        if missing or unexpected:
            raise UserError(f"LoRA weights do not fit this model (missing {missing[:2]}, unexpected {unexpected[:2]})")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def checkpoint_parts(self) -> dict[str, Any]:
        """What a checkpoint stores about the model itself (docs/CONTRACT.md §6)."""
        lora = None if self.lora_config is None else {"config": dict(self.lora_config), "state": self.lora_state()}
        pooler = None if self.pooler is None else self.pooler.state_dict()
        return {"config": self.config, "head": self.head.state_dict(), "lora": lora, "pooler": pooler}

    # -- forward ---------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def hidden_states(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden states (B, L, H) of a processed batch."""
        model_inputs = {k: v.to(self.device) for k, v in inputs.items() if k != "keep_mask"}
        out = self.backbone(**model_inputs, use_cache=False)
        return out.last_hidden_state

    def embed(self, hidden: torch.Tensor, keep_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The one place hidden states become embeddings: (B, L, H) hidden states and the (B, L) mask of the tokens
        to keep -> ((B, L, dim) float32 unit vectors, zero where not kept; the (B, L) bool mask of real vectors).

        Encoding, training (with or without the hidden-state cache) and the memory probe all call this, so a new
        output form (e.g. a pooled single vector, shapes (B, 1, dim) and (B, 1)) is one change here."""
        keep = keep_mask.to(hidden.device).bool()
        if self.config.embedding == "single":
            pooled = pool(hidden.float(), keep, self.config.pooling, self.pooler)  # (B, H)
            emb = self.head(pooled)[:, None]  # (B, 1, dim)
            keep = keep.any(dim=1, keepdim=True)  # (B, 1): an item with no kept token has no vector
        else:
            emb = self.head(hidden.float())  # (B, L, dim)
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        return emb * keep.unsqueeze(-1), keep

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Processed batch -> (embeddings (B, L, dim) float32, keep_mask (B, L) bool)."""
        return self.embed(self.hidden_states(inputs), inputs["keep_mask"].to(self.device))

    # -- encoding --------------------------------------------------------------------------------------
    def _prepared(self, items: Sequence[Any], batches: list[list[int]], process,
                  workers: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(indices, processed inputs) of each batch, in order.

        With workers > 0, up to `workers` later batches are processed in background threads while the caller runs
        the model on the current one, so a GPU no longer waits for the CPU work (decoding, tiling, resizing,
        normalising, tokenising) of every batch. Outputs are the same either way. The first batch is processed in
        this thread: it sets the fast tokenizer's padding state, which the workers then only read (reconfiguring
        it from two threads at once is not allowed).
        """
        if workers <= 0 or len(batches) < 2:
            for idx in batches:
                yield idx, process([items[i] for i in idx])
            return
        first = process([items[i] for i in batches[0]])
        pool = ThreadPoolExecutor(workers, thread_name_prefix="colintern-prep")
        try:
            todo = iter(batches[1:])
            pending: deque = deque((idx, pool.submit(process, [items[i] for i in idx]))
                                   for idx in itertools.islice(todo, workers))
            yield batches[0], first
            while pending:
                idx, future = pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(process, [items[i] for i in nxt])))
                yield idx, future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    @torch.inference_mode()
    def _encode(self, items: Sequence[Any], costs: list[int], process, batch_size: int, desc: str,
                show_progress: bool | None) -> list[torch.Tensor]:
        """Encode items in batches of similar cost (largest first); results in the input order."""
        was_training = self.training
        self.eval()
        order = sorted(range(len(items)), key=lambda i: -costs[i])
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        workers = default_prep_workers(self.device) if self.prep_workers is None else self.prep_workers
        results: list[torch.Tensor | None] = [None] * len(items)
        show = len(items) > batch_size if show_progress is None else show_progress
        with tqdm(total=len(items), desc=desc, unit="item", disable=not show, dynamic_ncols=True) as bar:
            for idx, inputs in self._prepared(items, batches, process, workers):
                emb, keep = self.forward(inputs)
                emb, keep = emb.cpu(), keep.cpu()
                for row, i in enumerate(idx):
                    results[i] = emb[row][keep[row]].clone()  # (L_i, dim) real tokens only
                bar.update(len(idx))
        self.train(was_training)
        return results  # type: ignore[return-value]

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 8,
                      show_progress: bool | None = None) -> list[torch.Tensor]:
        """Pages -> list of (L_i, dim) float32 CPU tensors."""
        costs = []
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise UserError(f"image {i}: expected a PIL image, got {type(image).__name__}")
            costs.append(self.processor.page_cost(image) if min(image.size) > 0 else 0)
        return self._encode(images, costs, self.processor.process_images, batch_size, "encode pages", show_progress)

    def encode_queries(self, queries: Sequence[str], batch_size: int = 32,
                       show_progress: bool | None = None) -> list[torch.Tensor]:
        """Queries -> list of (L_i, dim) float32 CPU tensors."""
        costs = [len(q) if isinstance(q, str) else 0 for q in queries]
        return self._encode(queries, costs, self.processor.process_queries, batch_size, "encode queries",
                            show_progress)
