"""Backbone families and the generic loading they share (docs/CONTRACT.md §2).

A backbone family (InternVL in `colintern/backbones/internvl.py`, Qwen3-VL in `colintern/backbones/qwen3vl.py`) implements the small
`BackboneFamily` interface below: load a model folder, build the page/query processor, name the modules LoRA adapts,
build a tiny random model for tests, and say whether its LM is causal. `colintern/backbones/registry.py` maps each
`config.json` `model_type` to its family; nothing else in the package asks which backbone it is running.

Files are located with `transformers.utils.cached_file`, which resolves a local directory and a hub id the
same way (and works offline for a local directory or a cached hub id).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from colintern.errors import UserError

if TYPE_CHECKING:
    from colintern.retriever.config import ColInternConfig
    from colintern.backbones.processor import PageProcessor

# The language model's linear layers that LoRA adapts (Qwen2/Qwen3 names; both families' LMs use them).
LM_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoadedBackbone:
    """A loaded backbone and the facts ColIntern needs about it."""

    model: nn.Module            # InternVLModel (or Qwen3VLModel): forward(...).last_hidden_state
    tokenizer: Any
    family: str                 # the family's name, also stored as ColInternConfig.backbone: "internvl" | "qwen3_vl"
    layout: str                 # "native" | "remote"
    hidden_size: int
    signature: dict[str, Any]   # architecture facts a checkpoint must match
    tile_size: int = 0
    image_tokens_per_tile: int = 0
    config_defaults: dict[str, Any] = field(default_factory=dict)  # family-specific ColInternConfig defaults
    weights: str = ""           # fingerprint of the weight files (weights_fingerprint), "" when unknown
    head_state: dict[str, torch.Tensor] | None = None  # a published retriever's own head (colpali_engine.py)


@dataclass
class TransformersProcessorFiles:
    """How transformers' own processor for a family reproduces ColIntern's page inputs, for a model folder that
    other libraries load (the sentence-transformers export, colintern/retriever/st_layout.py)."""

    processor_class: str             # processor_config.json: the transformers processor class
    image_processor: dict[str, Any]  # preprocessor_config.json: the image processor and its settings
    processor_settings: dict[str, Any] = field(default_factory=dict)  # more processor_config.json entries
    tokenizer_tokens: dict[str, str] = field(default_factory=dict)    # named tokens the processor reads from
                                                                       # the tokenizer (extra_special_tokens)
    image_placeholder: str = "<image>"  # what a page prompt's "<image>" becomes in the chat template's text


def image_processor_file(config: "ColInternConfig", image_processor_type: str, processor_class: str,
                         **settings: Any) -> dict[str, Any]:
    """preprocessor_config.json of a transformers image processor that resizes bicubic, rescales by 1/255 and
    normalises with the config's mean and std, as ColIntern's processors do; `settings` are the family's own."""
    return {"image_processor_type": image_processor_type, "processor_class": processor_class, **settings,
            "resample": 3, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "do_convert_rgb": True, "image_mean": list(config.image_mean), "image_std": list(config.image_std)}


def save_tiny_model(model: Any, out_dir: str, what: str, preprocessor: dict[str, Any] | None = None) -> str:
    """Save a family's tiny random model (and its preprocessor_config.json) to out_dir, say so; returns out_dir."""
    import logging

    model.save_pretrained(out_dir)
    if preprocessor is not None:
        with open(os.path.join(out_dir, "preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(preprocessor, f, indent=2)
    logging.getLogger("colintern").info("wrote tiny %s model (%.2fM parameters) to %s", what,
                                        sum(p.numel() for p in model.parameters()) / 1e6, out_dir)
    return out_dir


class BackboneFamily:
    """What ColIntern needs to know about one family of vision-language backbones.

    A new family subclasses this in its own module, implements the methods, and gets one line in
    `colintern.backbones.registry.FAMILIES`; docs/DESIGN.md walks through it.
    """

    name: str = ""                         # ColInternConfig.backbone, LoadedBackbone.family, --backbone of tiny
    model_types: tuple[str, ...] = ()      # config.json model_type values this family loads
    causal: bool = True                    # a causal LM: tokens before the image cannot see the page
    tiny_options: tuple[str, ...] = ()     # keyword options build_tiny accepts besides out_dir and seed
    vision_lora_targets: list[str] | str | None = None  # peft targets in the vision tower; None: the LM's

    def load(self, model_id: str, raw_config: dict[str, Any], dtype: torch.dtype,
             attn_implementation: str) -> LoadedBackbone:
        """Load `model_id` (hub id or local directory, config.json already read as `raw_config`)."""
        raise NotImplementedError

    def make_processor(self, tokenizer: Any, config: "ColInternConfig") -> "PageProcessor":
        """The processor that turns pages and queries into this family's model inputs."""
        raise NotImplementedError

    def language_model(self, backbone: Any) -> nn.Module:
        return backbone.language_model

    def vision_tower(self, backbone: Any) -> nn.Module:
        raise NotImplementedError

    def lora_modules(self, backbone: nn.Module, include_vision: bool,
                     lm_targets: list[str]) -> list[tuple[nn.Module, list[str] | str]]:
        """(module, peft target_modules) pairs that LoRA adapts: the language model's `lm_targets`, and with
        `include_vision` the vision tower's attention projections."""
        pairs: list[tuple[nn.Module, list[str] | str]] = [(self.language_model(backbone), lm_targets)]
        if include_vision:
            vision = lm_targets if self.vision_lora_targets is None else self.vision_lora_targets
            pairs.append((self.vision_tower(backbone), vision))
        return pairs

    def load_generator(self, model_id: str, dtype: torch.dtype) -> tuple[nn.Module, LoadedBackbone]:
        """The ...ForConditionalGeneration of a transformers-native folder (with its LM head, for the sanity
        check), and its inner backbone as a LoadedBackbone (LoRA loaded into it reaches the generator)."""
        raise NotImplementedError

    def transformers_processor(self, config: "ColInternConfig") -> TransformersProcessorFiles | None:
        """The files that make transformers' AutoProcessor prepare pages as this family's processor does under
        `config`; None when no transformers processor can (the export then has no page path outside ColIntern)."""
        return None

    def build_tiny(self, out_dir: str, seed: int = 0, **options: Any) -> str:
        """Write a tiny random model of this family's architecture to out_dir (tests, the demo); returns out_dir."""
        raise NotImplementedError


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


def load_tokenizer(model_id: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_id, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot load the tokenizer of {model_id!r}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from None


def read_state_dict(model_id: str) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint (single or sharded safetensors; .bin read with weights_only=True)."""
    from safetensors.torch import load_file

    index = resolve_file(model_id, "model.safetensors.index.json", required=False)
    if index is not None:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(resolve_file(model_id, shard))))
        return state
    single = resolve_file(model_id, "model.safetensors", required=False)
    if single is not None:
        return load_file(single)
    binary = resolve_file(model_id, "pytorch_model.bin", required=False)
    if binary is not None:
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise UserError(f"model {model_id!r}: no model.safetensors(.index.json) or pytorch_model.bin found")


FINGERPRINT_CHUNK = 1 << 16  # bytes read from each sampled tensor (start and middle of its data)


def _safetensors_samples(path: str) -> list[bytes]:
    """Bytes of a few tensors of one safetensors file: the first, middle and last tensor by name, 64 KiB from the
    start and from the middle of each one's data. Reading them is cheap (a few seeks), and models of the same
    architecture with different weights differ there."""
    import struct

    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        names = sorted(k for k in header if k != "__metadata__")
        picked = [names[0], names[len(names) // 2], names[-1]] if names else []
        out = []
        for name in picked:
            begin, end = header[name]["data_offsets"]
            out.append(name.encode() + json.dumps(header[name]["shape"]).encode() + header[name]["dtype"].encode())
            for start in (begin, begin + (end - begin) // 2):
                f.seek(8 + header_len + start)
                out.append(f.read(min(FINGERPRINT_CHUNK, end - start)))
        return out


def weights_fingerprint(model_id: str) -> str:
    """16 hex digits identifying a model's weight files (not their architecture, which the signature covers):
    a hub id and a local copy of it agree; another checkpoint of the same architecture differs. "" when the
    weights are in no file format read here."""
    import hashlib

    index = resolve_file(model_id, "model.safetensors.index.json", required=False)
    if index is not None:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [str(resolve_file(model_id, shard)) for shard in (shards[0], shards[-1])]
    else:
        single = resolve_file(model_id, "model.safetensors", required=False)
        files = [single] if single is not None else []
    if not files:
        return ""
    digest = hashlib.sha256()
    for path in dict.fromkeys(files):  # the first and last shard (once when there is one)
        for part in _safetensors_samples(path):
            digest.update(part)
    return digest.hexdigest()[:16]
