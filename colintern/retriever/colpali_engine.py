"""Published colpali-engine retrievers (ColQwen2.5, ColQwen3, ColSmol / ColIdefics3) as ColIntern models.

colpali-engine cannot be imported beside ColIntern (it needs torchvision and older torch/peft pins), so its
checkpoints are read here, as its code defines them (colpali_engine/models/qwen2_5/colqwen2_5/, qwen3/colqwen3/,
idefics3/colidefics3/ and colpali_engine/utils/processing_utils.py, illuin-tech/colpali at 9be8f19):

- A checkpoint is a PEFT adapter folder (adapter_config.json naming the base model, adapter_model.safetensors with
  LoRA on the language model and on the projection head, the processor and tokenizer files), or a full folder whose
  weights hold the head. The base model is the family's VLM plus the head: `custom_text_proj` (ColQwen2.5: 128
  dims, ColQwen3: 320) or `linear` (ColIdefics3: 128).
- Embeddings: last hidden state -> head -> divided by its norm -> zeroed where attention_mask is 0. Every real token
  of a query or a page is a vector (keep_page_tokens "all"; `mask_non_image_embeddings` is off by default).
- Processor: left padding; queries are query_prefix ("" in these processors) + text + 10 x the augmentation token
  (`<|endoftext|>`, `<end_of_utterance>`); a page is the visual prompt with the image expanded by transformers'
  processor, with the preprocessor_config.json of the checkpoint (Qwen: its max_pixels is the visual-token cap).

Loading merges the LoRA adapters into the weights they adapt (the language model's linear layers, the head):
W + (alpha / r) B A, as peft computes it (alpha / sqrt(r) with rsLoRA). The model is then a plain ColIntern model with
the checkpoint's formatting in its config, usable as --model_id, --teacher or a baseline. tests/test_colpali_engine.py
checks it against a restatement of colpali-engine's forward and processor on tiny checkpoints saved by peft.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import torch

from colintern.backbones.base import LoadedBackbone, load_tokenizer, resolve_file
from colintern.errors import UserError

log = logging.getLogger("colintern")

QWEN_PAGE_PROMPT = "<|im_start|>user\n<image>Describe the image.<|im_end|><|endoftext|>"
SMOL_PAGE_PROMPT = "<|im_start|>User:<image>Describe the image.<end_of_utterance>\nAssistant:"


@dataclass(frozen=True)
class ColpaliKind:
    """One colpali-engine model class: its head's name, its processor's formatting, and how its module paths map to
    ColIntern's backbone (transformers' class for the family)."""

    name: str
    head: str
    page_prompt: str  # the processor's visual_prompt_prefix, with the image as "<image>"
    augmentation_token: str
    renames: tuple[tuple[str, str], ...]  # checkpoint module path -> backbone module path (regex, in order)


KINDS = {
    "qwen2_5_vl": ColpaliKind("ColQwen2.5", "custom_text_proj", QWEN_PAGE_PROMPT, "<|endoftext|>",
                              ((r"^model\.layers\.", "language_model.layers."), (r"^model\.", "language_model."))),
    "qwen3_vl": ColpaliKind("ColQwen3", "custom_text_proj", QWEN_PAGE_PROMPT, "<|endoftext|>",
                            ((r"^model\.visual\.", "visual."), (r"^model\.language_model\.", "language_model."),
                             (r"^model\.", ""))),
    "idefics3": ColpaliKind("ColIdefics3 (ColSmol)", "linear", SMOL_PAGE_PROMPT, "<end_of_utterance>",
                            ((r"^model\.", ""),)),
}


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None


def _weight_names(model_id: str) -> set[str]:
    """The tensor names of a model folder's safetensors weights (headers only)."""
    index = resolve_file(model_id, "model.safetensors.index.json", required=False)
    if index is not None:
        return set(_read_json(index)["weight_map"])
    single = resolve_file(model_id, "model.safetensors", required=False)
    if single is None:
        return set()
    with open(single, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return set(json.loads(f.read(length))) - {"__metadata__"}


def _head_key(names: set[str] | dict[str, Any], head: str, suffix: str) -> str | None:
    for key in (f"{head}.{suffix}", f"base_model.model.{head}.{suffix}", f"model.{head}.{suffix}"):
        if key in names:
            return key
    return None


@dataclass
class ColpaliCheckpoint:
    """Where a colpali-engine checkpoint's parts are: the base model folder, the adapter folder (or None)."""

    model_id: str
    base: str
    adapter: str | None
    kind: ColpaliKind
    raw_config: dict[str, Any]


def colpali_checkpoint(model_id: str) -> ColpaliCheckpoint | None:
    """The colpali-engine checkpoint `model_id` is (an adapter folder or a full one with its head), else None."""
    from colintern.backbones.base import read_model_config

    adapter_config = resolve_file(model_id, "adapter_config.json", required=False)
    if adapter_config is not None:
        base = str(_read_json(adapter_config).get("base_model_name_or_path") or "")
        if not base:
            raise UserError(f"{adapter_config}: no base_model_name_or_path; which model do these adapters adapt?")
        if not os.path.isdir(base) and os.path.isdir(os.path.join(model_id, base)):
            base = os.path.join(model_id, base)
        raw = read_model_config(base)
        kind = KINDS.get(str(raw.get("model_type")))
        if kind is None:
            raise UserError(f"{model_id}: an adapter on a {raw.get('model_type')!r} model; ColIntern reads colpali-engine "
                            f"checkpoints of {sorted(KINDS)} models")
        return ColpaliCheckpoint(model_id, base, model_id, kind, raw)
    if resolve_file(model_id, "config.json", required=False) is None:
        return None
    raw = read_model_config(model_id)
    kind = KINDS.get(str(raw.get("model_type")))
    if kind is None or _head_key(_weight_names(model_id), kind.head, "weight") is None:
        return None
    return ColpaliCheckpoint(model_id, model_id, None, kind, raw)


def _lora_scale(adapter: dict[str, Any], where: str) -> float:
    if adapter.get("use_dora"):
        raise UserError(f"{where}: DoRA adapters are not supported; merge them with peft first")
    if adapter.get("rank_pattern") or adapter.get("alpha_pattern"):
        raise UserError(f"{where}: per-module LoRA ranks (rank_pattern/alpha_pattern) are not supported; merge the "
                        "adapters with peft first")
    r, alpha = int(adapter["r"]), float(adapter.get("lora_alpha", adapter["r"]))
    return alpha / math.sqrt(r) if adapter.get("use_rslora") else alpha / r


def _adapter_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = resolve_file(folder, "adapter_model.safetensors", required=False)
    if path is not None:
        return load_file(path)
    binary = resolve_file(folder, "adapter_model.bin", required=False)
    if binary is None:
        raise UserError(f"{folder}: adapter_config.json but no adapter_model.safetensors or adapter_model.bin")
    return torch.load(binary, map_location="cpu", weights_only=True)


def merge_adapters(checkpoint: ColpaliCheckpoint, backbone: torch.nn.Module, head: dict[str, torch.Tensor]) -> int:
    """Fold the checkpoint's LoRA adapters into `backbone`'s weights and `head` (in place); returns how many."""
    assert checkpoint.adapter is not None
    where = os.path.join(checkpoint.adapter, "adapter_config.json")
    scale = _lora_scale(_read_json(str(resolve_file(checkpoint.adapter, "adapter_config.json"))), where)
    weights = _adapter_weights(checkpoint.adapter)
    modules = dict(backbone.named_modules())
    merged = 0
    def linear(path: str) -> torch.nn.Linear:
        target = path
        for pattern, replacement in checkpoint.kind.renames:
            target = re.sub(pattern, replacement, target, count=1)
        module = modules.get(target)
        if not isinstance(module, torch.nn.Linear):
            raise UserError(f"{where}: weights for {path!r}, which is not a linear layer of the {checkpoint.kind.name} "
                            "backbone; is this adapter for another model?")
        return module

    def is_head(path: str) -> bool:
        return path.split(".")[-1] == checkpoint.kind.head and path.count(".") <= 1

    for key, value in weights.items():
        lora = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_A(?:\.[^.]+)?\.weight", key)
        if lora is None:  # a whole module saved beside the adapters (peft's modules_to_save): it replaces the base's
            if "lora_B" in key:
                continue
            whole = re.fullmatch(r"(?:base_model\.model\.)?(.+?)(?:\.modules_to_save\.[^.]+)?\.(weight|bias)", key)
            if whole is None:
                raise UserError(f"{where}: unexpected tensor {key!r} in the adapter weights")
            path, name = whole.group(1), whole.group(2)
            if is_head(path):
                head[name] = value.float().clone()
            else:
                with torch.no_grad():
                    getattr(linear(path), name).copy_(value)
            continue
        path = lora.group(1)
        lora_b = weights[key.replace("lora_A", "lora_B")]
        delta = scale * (lora_b.double() @ value.double())  # (out, in)
        if is_head(path):
            head["weight"] = (head["weight"].double() + delta).float()
        else:
            module = linear(path)
            with torch.no_grad():
                module.weight.copy_((module.weight.double() + delta).to(module.weight.dtype))
        merged += 1
    return merged


def processor_settings(checkpoint: ColpaliKind, pre: dict[str, Any], signature: dict[str, Any]) -> dict[str, Any]:
    """ColIntern config fields from the checkpoint's preprocessor_config.json: the sizes its processor uses."""
    settings: dict[str, Any] = {}
    if "image_mean" in pre:
        settings["image_mean"] = [float(x) for x in pre["image_mean"]]
        settings["image_std"] = [float(x) for x in pre["image_std"]]
    size = pre.get("size") or {}
    if "patch_size" in signature and "spatial_merge_size" in signature:  # Qwen: the pixel budget in visual tokens
        factor = signature["patch_size"] * signature["spatial_merge_size"]
        max_pixels = pre.get("max_pixels") or size.get("longest_edge")
        min_pixels = pre.get("min_pixels") or size.get("shortest_edge")
        if max_pixels:
            settings["max_visual_tokens"] = int(max_pixels) // factor ** 2
        if min_pixels:
            settings["min_visual_tokens"] = max(1, math.ceil(int(min_pixels) / factor ** 2))
    else:  # Idefics3: the longest edge and the tile
        if size.get("longest_edge"):
            settings["longest_edge"] = int(size["longest_edge"])
        if (pre.get("max_image_size") or {}).get("longest_edge"):
            settings["tile_size"] = int(pre["max_image_size"]["longest_edge"])
    return settings


def load_colpali(checkpoint: ColpaliCheckpoint, dtype: torch.dtype, attn_implementation: str) -> LoadedBackbone:
    """The checkpoint's backbone with its adapters merged, its head in `head_state`, its formatting in
    config_defaults."""
    from colintern.backbones.base import read_state_dict, weights_fingerprint
    from colintern.backbones.qwen3vl import _read_preprocessor
    from colintern.backbones.registry import BY_MODEL_TYPE

    kind = checkpoint.kind
    family = BY_MODEL_TYPE[str(checkpoint.raw_config["model_type"])]
    loaded = family.load(checkpoint.base, checkpoint.raw_config, torch.float32, attn_implementation)
    state = read_state_dict(checkpoint.base)
    weight_key, bias_key = _head_key(state, kind.head, "weight"), _head_key(state, kind.head, "bias")
    if weight_key is None:
        raise UserError(f"{checkpoint.base}: no {kind.head} weights; is this a {kind.name} base model?")
    head = {"weight": state[weight_key].float().clone(),
            "bias": state[bias_key].float().clone() if bias_key else torch.zeros(state[weight_key].shape[0])}
    del state
    merged = merge_adapters(checkpoint, loaded.model, head) if checkpoint.adapter else 0
    loaded.model.to(dtype)
    where = checkpoint.adapter or checkpoint.base
    if resolve_file(where, "tokenizer_config.json", required=False) is not None:
        loaded.tokenizer = load_tokenizer(where)
    pre = _read_preprocessor(where) or _read_preprocessor(checkpoint.base)
    loaded.config_defaults.update({
        "page_prompt": kind.page_prompt, "query_prefix": "", "augmentation_token": kind.augmentation_token,
        "n_augmentation": 10, "keep_page_tokens": "all", "padding_side": "left", "dim": int(head["weight"].shape[0]),
        **processor_settings(kind, pre, loaded.signature)})
    loaded.head_state = head
    loaded.weights = weights_fingerprint(checkpoint.base)
    log.info("%s is a colpali-engine %s checkpoint: base %s, %d LoRA adapters merged, %d-dim head", checkpoint.model_id,
             kind.name, checkpoint.base, merged, head["weight"].shape[0])
    return loaded
