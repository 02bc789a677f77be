"""Backbone loading: one code path for hub ids and local directories (SPEC §2).

- transformers-native InternVL (`model_type == "internvl"`) loads as `InternVLModel` (no LM head).
- Original InternVL checkpoints (`model_type == "internvl_chat"`, e.g. OpenGVLab/InternVL3_5-1B-Instruct) are
  converted in-process: config translation, weight renaming, fused vision qkv split. No remote code runs.
- Qwen3-VL (`model_type == "qwen3_vl"`) is loaded by `colintern.qwen3vl`.

Files are located with `transformers.utils.cached_file`, which resolves a local directory and a hub id the
same way (and works offline for a local directory or a cached hub id).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from colintern.errors import UserError

log = logging.getLogger("colintern")

# Keys of the original configs that have no meaning in the transformers classes.
_DROP_CONFIG_KEYS = {
    "_name_or_path", "_attn_implementation_autoset", "auto_map", "use_bfloat16", "use_flash_attn",
    "architectures", "transformers_version", "drop_path_rate", "initializer_factor", "attn_implementation",
    "torch_dtype", "dtype", "_attn_implementation",
}

# Original InternViT / projector names -> transformers-native names (applied in order).
_VISION_RENAMES = [
    (r"^vision_model\.", "vision_tower."),
    (r"\.layers\.", ".layer."),
    (r"embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"\.ls(\d)$", r".lambda_\1"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
]
_PROJECTOR_RENAMES = {"mlp1.0.": "multi_modal_projector.layer_norm.", "mlp1.1.": "multi_modal_projector.linear_1.",
                      "mlp1.3.": "multi_modal_projector.linear_2."}


@dataclass
class LoadedBackbone:
    """A loaded backbone and the facts ColIntern needs about it."""

    model: nn.Module            # InternVLModel (or Qwen3VLModel): forward(...).last_hidden_state
    tokenizer: Any
    kind: str                   # "internvl" | "qwen3_vl"
    layout: str                 # "native" | "remote"
    hidden_size: int
    signature: dict[str, Any]   # architecture facts a checkpoint must match
    tile_size: int = 0
    image_tokens_per_tile: int = 0
    config_defaults: dict[str, Any] = field(default_factory=dict)  # backbone-specific ColInternConfig defaults


def resolve_file(model_id: str, filename: str, required: bool = True) -> str | None:
    """Path of `filename` in a local directory or hub repo (cached); one clear line when it can't be had."""
    from transformers.utils import cached_file

    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        if os.path.isfile(path):
            return path
        if required:
            raise UserError(f"{model_id}: no {filename} in this directory; is it a model folder?")
        return None
    if os.path.sep in model_id and model_id.startswith((".", "/", "~")):
        raise UserError(f"model path {model_id} does not exist; pass a local model directory or a hub id")
    try:
        return cached_file(model_id, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; the user needs one line
        if not required:
            return None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
        hint = " (HF_HUB_OFFLINE=1: only cached models and local directories can be used)" if offline else ""
        raise UserError(f"cannot load {filename} of model {model_id!r}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}{hint}") from None


def read_model_config(model_id: str) -> dict[str, Any]:
    """config.json of a model as a plain dict (no class registry, so no remote code is needed)."""
    path = resolve_file(model_id, "config.json", required=False)
    if path is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
        where = "not a local directory, and the hub is unreachable (HF_HUB_OFFLINE=1)" if offline else \
            "not a local directory and not found on the hub"
        raise UserError(f"model {model_id!r}: config.json not found ({where}); pass a model directory or hub id")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable config.json ({err})") from None


def load_backbone(model_id: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                  device: str | torch.device = "cpu") -> LoadedBackbone:
    """Load the backbone named by `model_id` (hub id or local directory), whatever its layout."""
    raw = read_model_config(model_id)
    model_type = raw.get("model_type")
    if model_type == "internvl":
        loaded = _load_internvl_native(model_id, raw, dtype, attn_implementation)
    elif model_type == "internvl_chat":
        loaded = _load_internvl_remote(model_id, raw, dtype, attn_implementation)
    elif model_type == "qwen3_vl":
        from colintern import qwen3vl

        loaded = qwen3vl.load_qwen3vl(model_id, raw, dtype, attn_implementation)
    else:
        raise UserError(f"model {model_id!r} has model_type {model_type!r}; ColIntern supports 'internvl' "
                        "(transformers InternVL), 'internvl_chat' (original InternVL) and 'qwen3_vl'")
    loaded.model.to(device)
    loaded.model.eval()
    return loaded


def load_tokenizer(model_id: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_id, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot load the tokenizer of {model_id!r}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from None


def _internvl_facts(model: nn.Module, tokenizer: Any, layout: str) -> LoadedBackbone:
    config = model.config
    vision, text = config.vision_config, config.text_config
    tile = int(vision.image_size[0])
    patch = int(vision.patch_size[0])
    tokens_per_tile = int((tile // patch) ** 2 * config.downsample_ratio ** 2)
    signature = {
        "model_type": "internvl", "text_model_type": text.model_type, "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers, "vocab_size": text.vocab_size,
        "vision_hidden_size": vision.hidden_size, "vision_layers": vision.num_hidden_layers,
    }
    return LoadedBackbone(model=model, tokenizer=tokenizer, kind="internvl", layout=layout,
                          hidden_size=int(text.hidden_size), signature=signature, tile_size=tile,
                          image_tokens_per_tile=tokens_per_tile)


def _load_internvl_native(model_id: str, raw: dict, dtype: torch.dtype, attn: str) -> LoadedBackbone:
    from transformers import InternVLModel

    tokenizer = load_tokenizer(model_id)
    try:
        model = InternVLModel.from_pretrained(model_id, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load InternVL weights from {model_id!r}: {str(err).splitlines()[0]}") from None
    return _internvl_facts(model, tokenizer, "native")


def convert_internvl_chat_config(raw: dict, image_token_id: int):
    """Translate an original `internvl_chat` config.json into a transformers `InternVLConfig`."""
    from transformers import AutoConfig, InternVLConfig, InternVLVisionConfig

    if raw.get("ps_version", "v2") != "v2":
        raise UserError(f"InternVL pixel-shuffle version {raw.get('ps_version')!r} is not supported (only 'v2')")
    vision = {k: v for k, v in raw["vision_config"].items() if k not in _DROP_CONFIG_KEYS}
    vision.pop("model_type", None)
    renames = {"qkv_bias": "attention_bias", "qk_normalization": "use_qk_norm", "dropout": "hidden_dropout_prob"}
    for old, new in renames.items():
        if old in vision:
            vision[new] = vision.pop(old)
    if "attention_probs_dropout_prob" in vision:
        vision["attention_dropout"] = vision.pop("attention_probs_dropout_prob")
    if raw.get("force_image_size"):
        vision["image_size"] = raw["force_image_size"]
    known_vision = set(InternVLVisionConfig().to_dict())
    vision = {k: v for k, v in vision.items() if k in known_vision}
    vision["use_absolute_position_embeddings"] = True
    vision["use_mean_pooling"] = True  # the chat model has no final vision layernorm

    llm = {k: v for k, v in raw["llm_config"].items() if k not in _DROP_CONFIG_KEYS}
    llm_type = llm.pop("model_type")
    text_config = AutoConfig.for_model(llm_type, **llm)
    image_size = vision.get("image_size", 448)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    patch = vision.get("patch_size", 14)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    ratio = float(raw.get("downsample_ratio", 0.5))
    return InternVLConfig(
        vision_config=InternVLVisionConfig(**vision).to_dict(), text_config=text_config.to_dict(),
        image_token_id=image_token_id, downsample_ratio=ratio,
        image_seq_length=int((image_size // patch) ** 2 * ratio ** 2),
        vision_feature_layer=int(raw.get("select_layer", -1)), projector_hidden_act="gelu",
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
    )


def convert_internvl_chat_state_dict(state: dict[str, torch.Tensor], vision_hidden: int) -> dict[str, torch.Tensor]:
    """Rename original InternVL weights to `InternVLModel` names; split fused qkv; drop the LM head."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("vision_model."):
            new = key
            for pattern, repl in _VISION_RENAMES:
                new = re.sub(pattern, repl, new)
            if ".attention.qkv." in new:
                q, k, v = value.split(vision_hidden, dim=0)  # (3H, H) -> 3 x (H, H); bias (3H,) likewise
                for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[new.replace(".attention.qkv.", f".attention.{name}.")] = part.contiguous()
                continue
            out[new] = value
        elif key.startswith("mlp1."):
            prefix = next((p for p in _PROJECTOR_RENAMES if key.startswith(p)), None)
            if prefix is None:
                raise UserError(f"unexpected projector weight {key!r} in an InternVL checkpoint")
            out[_PROJECTOR_RENAMES[prefix] + key[len(prefix):]] = value
        elif key.startswith("language_model.model."):
            out["language_model." + key[len("language_model.model."):]] = value
        elif key.startswith(("language_model.lm_head.", "language_model.output.")):
            continue  # retrieval needs hidden states, not logits
        else:
            raise UserError(f"unexpected weight {key!r} in an InternVL checkpoint; unsupported variant")
    return out


def read_state_dict(model_id: str) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint (single or sharded safetensors; .bin read with weights_only=True)."""
    from safetensors.torch import load_file

    index = resolve_file(model_id, "model.safetensors.index.json", required=False)
    if index is not None:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(resolve_file(model_id, shard)))
        return state
    single = resolve_file(model_id, "model.safetensors", required=False)
    if single is not None:
        return load_file(single)
    binary = resolve_file(model_id, "pytorch_model.bin", required=False)
    if binary is not None:
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise UserError(f"model {model_id!r}: no model.safetensors(.index.json) or pytorch_model.bin found")


def _load_internvl_remote(model_id: str, raw: dict, dtype: torch.dtype, attn: str) -> LoadedBackbone:
    from transformers import InternVLModel

    tokenizer = load_tokenizer(model_id)
    image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise UserError(f"{model_id}: the tokenizer has no <IMG_CONTEXT> token; not an InternVL chat checkpoint?")
    config = convert_internvl_chat_config(raw, image_token_id)
    config._attn_implementation = attn
    state = convert_internvl_chat_state_dict(read_state_dict(model_id), config.vision_config.hidden_size)
    model = InternVLModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied input/output embeddings are not stored twice; nothing else may be missing.
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise UserError(f"{model_id}: converted InternVL weights do not fit (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model.to(dtype)
    log.info("converted original InternVL checkpoint %s in-process (no remote code)", model_id)
    return _internvl_facts(model, tokenizer, "remote")
