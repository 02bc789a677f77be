"""Qwen3-VL backbone (the "ColQwen3" recipe) behind the same interface as InternVL (docs/CONTRACT.md §2, §3).

- `load_qwen3vl`: transformers' `Qwen3VLModel` (vision tower `.visual` + text model `.language_model`, no LM
  head) from a hub id or a local directory, the same code path for both; nothing remote is executed.
- `Qwen3VLProcessor`: pages at their own aspect ratio (no tiling), resized so that at most
  `config.max_visual_tokens` visual tokens (after the 2x2 patch merge) come out, with transformers' Qwen2-VL
  image processor PIL backend (no torchvision). The page prompt's `<image>` becomes
  `<|vision_start|>` + `<|image_pad|>` x n + `<|vision_end|>`. Queries: the same prefix + augmentation scheme
  as InternVL. Right padding; M-RoPE position ids are computed inside the model from input_ids,
  image_grid_thw, mm_token_type_ids and attention_mask, so padding never moves a real token.
- `build_tiny_qwen3vl`: a tiny random Qwen3-VL for tests (`python -m colintern.testing.tiny OUT --backbone qwen3_vl`).
- `Qwen3VLFamily`: the family object registered in `colintern/backbones/registry.py`.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Sequence

import torch
from PIL import Image

import numpy as np
from torch import nn

from colintern.backbones.base import (BackboneFamily, LoadedBackbone, TransformersProcessorFiles, image_processor_file,
                                      load_tokenizer, resolve_file, save_tiny_model)
from colintern.retriever.config import ColInternConfig
from colintern.errors import UserError
from colintern.backbones.processor import PageProcessor, check_page_image, grid_boxes, page_keep_mask
from colintern.testing.toy_tokenizer import build_tokenizer

log = logging.getLogger("colintern")

# ColQwen2/ColQwen3 page prompt (colpali-engine's visual_prompt_prefix); "<image>" is expanded by the processor.
QWEN_PAGE_PROMPT = "<|im_start|>user\n<image>Describe the image.<|im_end|><|endoftext|>"
# Qwen3-VL preprocessor defaults, used when a model folder has no preprocessor_config.json.
QWEN3VL_IMAGE_MEAN = [0.5, 0.5, 0.5]
QWEN3VL_IMAGE_STD = [0.5, 0.5, 0.5]
QWEN3VL_MIN_PIXELS = 65536  # Qwen3-VL's size.shortest_edge: 64 visual tokens of 32x32 px
# Vision-tower linear layers that LoRA adapts when --lora_vision is asked for (fused qkv + output projection).
VISION_LORA_TARGETS = r".*blocks\.\d+\.attn\.(qkv|proj)"


# -- loading ------------------------------------------------------------------------------------------
def _read_preprocessor(model_id: str) -> dict[str, Any]:
    """The image processor's settings: preprocessor_config.json, or (what transformers 5 saves) the
    "image_processor" section of processor_config.json; {} when neither exists (Qwen3-VL's defaults)."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = resolve_file(model_id, name, required=False)
        if path is None:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: unreadable {name} ({err})") from None
        if name == "preprocessor_config.json" or "image_processor" in saved:
            return saved.get("image_processor", saved) if name == "processor_config.json" else saved
    return {}


def qwen3vl_signature(config) -> dict[str, Any]:
    """Architecture facts a checkpoint must match; patch/merge sizes are also what the processor needs."""
    vision, text = config.vision_config, config.text_config
    return {
        "model_type": config.model_type, "text_model_type": text.model_type, "hidden_size": int(text.hidden_size),
        "num_hidden_layers": int(text.num_hidden_layers), "vocab_size": int(text.vocab_size),
        "vision_hidden_size": int(vision.hidden_size), "vision_layers": int(vision.depth),
        "patch_size": int(vision.patch_size), "spatial_merge_size": int(vision.spatial_merge_size),
        "temporal_patch_size": int(vision.temporal_patch_size),
    }


_BACKBONE_CLASSES: dict[str, type] = {}


def backbone_class(base: str = "Qwen3VLModel"):
    """transformers' `base` (Qwen3VLModel, Qwen2_5_VLModel) that skips the LM head of a
    `...ForConditionalGeneration` checkpoint quietly (untied in the larger models; retrieval needs hidden states, not
    logits), and a colpali-engine checkpoint's `custom_text_proj` (colintern/retriever/colpali_engine.py reads it). It keeps transformers' class name, and transformers' checkpoint key conversions for that class are
    registered under it (transformers applies them to classes outside its package only when registered), as for
    InternVL (colintern/backbones/internvl.py)."""
    if base not in _BACKBONE_CLASSES:
        import transformers
        from transformers import conversion_mapping as conversions

        model_type = {"Qwen3VLModel": "qwen3_vl", "Qwen2_5_VLModel": "qwen2_5_vl"}.get(base, "")
        if base not in conversions.USER_REGISTERED_MAPPINGS:
            same = conversions.get_checkpoint_conversion_mapping(base) or \
                conversions.get_checkpoint_conversion_mapping(model_type)
            if same:
                conversions.register_checkpoint_conversion_mapping(base, same, overwrite=True)
        ignored = [r"^lm_head\.", r"(^|\.)custom_text_proj\."]
        _BACKBONE_CLASSES[base] = type(base, (getattr(transformers, base),),
                                       {"_keys_to_ignore_on_load_unexpected": ignored})
    return _BACKBONE_CLASSES[base]


def load_qwen3vl(model_id: str, raw_config: dict, dtype: torch.dtype = torch.float32,
                 attn_implementation: str = "sdpa", family: "Qwen3VLFamily | None" = None) -> LoadedBackbone:
    """Load a Qwen-VL checkpoint of `family` (Qwen3-VL by default; hub id or local directory) as its transformers
    model without LM head + tokenizer + config defaults."""
    family = family or FAMILY
    try:
        model_class = backbone_class(family.model_class)
    except (ImportError, AttributeError):
        raise UserError(f"this transformers has no {family.title} support; upgrade transformers") from None

    tokenizer = load_tokenizer(model_id)
    for token in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise UserError(f"{model_id}: the tokenizer has no {token} token; not a {family.title} checkpoint?")
    try:
        model = model_class.from_pretrained(model_id, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load {family.title} weights from {model_id!r}: {str(err).splitlines()[0]}") from None
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    if model.config.image_token_id != image_pad:
        raise UserError(f"{model_id}: config image_token_id {model.config.image_token_id} is not the tokenizer's "
                        f"<|image_pad|> id {image_pad}; the model folder is inconsistent")
    return describe_qwen3vl(model, tokenizer, _read_preprocessor(model_id), family)


def describe_qwen3vl(model: nn.Module, tokenizer: Any, pre: dict[str, Any],
                     family: "Qwen3VLFamily | None" = None) -> LoadedBackbone:
    """A loaded Qwen-VL model as a LoadedBackbone: its signature and the ColQwen formatting defaults (image
    normalisation and the smallest page size from its preprocessor_config.json `pre`, {} for the family's defaults)."""
    family = family or FAMILY
    signature = qwen3vl_signature(model.config)
    factor = signature["patch_size"] * signature["spatial_merge_size"]
    min_pixels = pre.get("min_pixels") or (pre.get("size") or {}).get("shortest_edge") or family.min_pixels
    defaults = {  # formatting defaults of a fresh ColIntern config on this backbone (ColQwen recipe)
        "page_prompt": QWEN_PAGE_PROMPT, "image_token": "<|image_pad|>", "image_start_token": "<|vision_start|>",
        "image_end_token": "<|vision_end|>", "image_mean": [float(x) for x in pre.get("image_mean", family.image_mean)],
        "image_std": [float(x) for x in pre.get("image_std", family.image_std)],
        "min_visual_tokens": max(1, math.ceil(int(min_pixels) / factor ** 2)),
        "query_prefix": "Query: ", "augmentation_token": "<|endoftext|>", "n_augmentation": 10,
    }
    return LoadedBackbone(model=model, tokenizer=tokenizer, family=family.name, layout="native",
                          hidden_size=signature["hidden_size"], signature=signature, config_defaults=defaults)


# -- processor ----------------------------------------------------------------------------------------
class Qwen3VLProcessor(PageProcessor):
    """Processor for Qwen3-VL backbones: dynamic resolution capped at `max_visual_tokens`."""

    def __init__(self, tokenizer: Any, config: ColInternConfig):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        sig = config.signature
        missing = [k for k in ("patch_size", "spatial_merge_size", "temporal_patch_size") if k not in sig]
        if missing:
            raise UserError(f"ColIntern config for a qwen3_vl backbone lacks signature fields {missing}")
        if not 1 <= config.min_visual_tokens <= config.max_visual_tokens:
            raise UserError(f"--max_visual_tokens {config.max_visual_tokens} is below this model's smallest page, "
                            f"{config.min_visual_tokens} visual tokens (its image processor's size.shortest_edge); "
                            f"pass at least {config.min_visual_tokens}")
        super().__init__(tokenizer, config)
        self.patch_size = int(sig["patch_size"])
        self.merge_size = int(sig["spatial_merge_size"])
        self.factor = self.patch_size * self.merge_size  # px per side of one visual token
        self.min_pixels = config.min_visual_tokens * self.factor ** 2
        self.max_pixels = config.max_visual_tokens * self.factor ** 2
        # The processor only cuts the page into patches: resized_size decides the size (Qwen's min and max rules
        # and the cap), and a page is resized to it beforehand. Given the real min, the processor would scale a page
        # that the cap had shrunk below it back up, past the cap (a small page at a cap near 64 tokens).
        self.image_processor = Qwen2VLImageProcessorPil(
            min_pixels=self.factor ** 2, max_pixels=self.max_pixels, patch_size=self.patch_size,
            temporal_patch_size=int(sig["temporal_patch_size"]), merge_size=self.merge_size,
            image_mean=config.image_mean, image_std=config.image_std, do_convert_rgb=True,
        )

    # -- sizes ---------------------------------------------------------------------------------------
    def resized_size(self, image: Image.Image) -> tuple[int, int]:
        """(height, width) the page is resized to: multiples of `factor`, at most max_visual_tokens tokens."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        width, height = image.size
        h, w = smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)
        # smart_resize keeps each side >= factor, which can overshoot the cap for a very long thin page.
        while (h // self.factor) * (w // self.factor) > self.config.max_visual_tokens:
            if h >= w:
                h -= self.factor
            else:
                w -= self.factor
        return h, w

    def page_cost(self, image: Image.Image) -> int:
        """Visual tokens of the page after the patch merge (<= max_visual_tokens)."""
        h, w = self.resized_size(image)
        return (h // self.factor) * (w // self.factor)

    def worst_case_page(self) -> Image.Image:
        """A blank page with the most visual tokens the config allows (for memory probes): a x b tokens with
        a x b as close to max_visual_tokens as an aspect ratio within 50:1 allows."""
        n = self.config.max_visual_tokens
        a = max((k for k in range(1, math.isqrt(n) + 1) if n // k <= 50 * k), key=lambda k: (k * (n // k), k))
        return Image.new("RGB", (self.factor * a, self.factor * (n // a)), (255, 255, 255))

    def image_token_boxes(self, image: Image.Image) -> np.ndarray:
        """The page is resized whole (no crop) to h x w px; its merged visual tokens form a row-major
        (h / factor) x (w / factor) grid over the page."""
        h, w = self.resized_size(image)
        return grid_boxes(0.0, 0.0, 1.0, 1.0, w // self.factor, h // self.factor)

    # -- pages -----------------------------------------------------------------------------------------
    def process_images(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Pages -> input_ids (B, L), attention_mask (B, L), mm_token_type_ids (B, L), pixel_values
        (sum of patches, 3 * temporal * patch * patch), image_grid_thw (B, 3), keep_mask (B, L)."""
        cfg = self.config
        pixel_values, grids, texts = [], [], []
        for i, image in enumerate(images):
            image = check_page_image(image, f"image {i}")
            h, w = self.resized_size(image)
            if image.size != (w, h):
                image = image.resize((w, h), Image.Resampling.BICUBIC)  # the processor keeps this size as it is
            out = self.image_processor(image, return_tensors="pt")
            grid = out["image_grid_thw"][0]  # (3,) = (1, h / patch, w / patch)
            if (int(grid[1]) * self.patch_size, int(grid[2]) * self.patch_size) != (h, w):
                raise RuntimeError(f"image {i}: processor resized to {grid.tolist()}, expected {(h, w)}")
            n_tokens = int(grid.prod()) // self.merge_size ** 2
            pixel_values.append(out["pixel_values"])  # (patches, 3 * temporal * patch * patch)
            grids.append(grid)
            image_text = cfg.image_start_token + cfg.image_token * n_tokens + cfg.image_end_token
            texts.append(cfg.page_prompt.replace("<image>", image_text))
        batch = self.tokenizer(texts, padding="longest", return_tensors="pt", add_special_tokens=False)
        is_image = batch["input_ids"] == self.image_token_id  # (B, L)
        keep = page_keep_mask(batch["attention_mask"], is_image, cfg.keep_page_tokens)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "mm_token_type_ids": is_image.long(), "pixel_values": torch.cat(pixel_values, dim=0),
                "image_grid_thw": torch.stack(grids).long(), "keep_mask": keep}


# -- tiny model ----------------------------------------------------------------------------------------
def tiny_qwen3vl_config(vocab_size: int, token_ids: dict[str, int]):
    """Qwen3-VL architecture at toy size: 2-block vision tower (16-px patches, 2x2 merge, DeepStack taps at
    blocks 0 and 1), 2-layer Qwen3 text model with interleaved M-RoPE, hidden 128."""
    from transformers import Qwen3VLConfig

    vision = {
        "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "in_channels": 3,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 128,
        "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1], "hidden_act": "gelu_pytorch_tanh",
    }
    text = {
        "vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "pad_token_id": token_ids["pad"], "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [6, 5, 5],
                            "mrope_interleaved": True},
    }
    return Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=token_ids["image"],
                         video_token_id=token_ids["image"], vision_start_token_id=token_ids["start"],
                         vision_end_token_id=token_ids["end"], tie_word_embeddings=True)


def qwen3vl_token_ids(tokenizer: Any) -> dict[str, int]:
    """The special-token ids a Qwen3-VL config names, from a tokenizer that has them."""
    return {"image": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            "start": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            "end": tokenizer.convert_tokens_to_ids("<|vision_end|>"), "pad": tokenizer.pad_token_id}


def qwen3vl_2b_config(token_ids: dict[str, int], attn_implementation: str = "sdpa"):
    """Qwen3-VL-2B's shapes (vision 24 x 1024 with DeepStack taps at 5/11/17, 16-px patches, 2x2 merge; Qwen3 LM
    28 x 2048, 16 heads, 8 KV heads, vocab 151936), for benchmarks with random weights."""
    from transformers import Qwen3VLConfig

    vision = {
        "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "in_channels": 3,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 2048,
        "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17], "hidden_act": "gelu_pytorch_tanh",
    }
    text = {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6, "pad_token_id": token_ids["pad"], "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                            "mrope_interleaved": True},
    }
    config = Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=token_ids["image"],
                           video_token_id=token_ids["image"], vision_start_token_id=token_ids["start"],
                           vision_end_token_id=token_ids["end"], tie_word_embeddings=True)
    config._attn_implementation = attn_implementation
    return config


def build_tiny_qwen3vl(out_dir: str, seed: int = 0) -> str:
    """Write a tiny random (seeded) Qwen3-VL to out_dir, loadable with `--model_id out_dir`; returns out_dir."""
    from transformers import Qwen3VLForConditionalGeneration

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    config = tiny_qwen3vl_config(len(tokenizer), qwen3vl_token_ids(tokenizer))
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    preprocessor = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor",
                    # Qwen3-VL's own limits: at least 64 tokens of 32 x 32 px a page (a page below that is scaled
                    # up), so a --max_visual_tokens under 64 fails here as on the real model
                    "size": {"shortest_edge": QWEN3VL_MIN_PIXELS, "longest_edge": 16384 * 32 * 32},
                    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "do_resize": True,
                    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                    "image_mean": QWEN3VL_IMAGE_MEAN, "image_std": QWEN3VL_IMAGE_STD}
    return save_tiny_model(model, out_dir, "Qwen3-VL-architecture", preprocessor)


# -- the family ---------------------------------------------------------------------------------------
class Qwen3VLFamily(BackboneFamily):
    """Qwen3-VL; Qwen2.5-VL (colintern/backbones/qwen25vl.py) is this family with other classes and defaults."""

    name = "qwen3_vl"
    title = "Qwen3-VL"
    model_types = ("qwen3_vl",)
    causal = True
    vision_lora_targets = VISION_LORA_TARGETS  # fused qkv + output projection of the vision blocks
    model_class = "Qwen3VLModel"  # transformers' classes of the backbone, the generator and the processor
    generator_class = "Qwen3VLForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"
    image_mean, image_std, min_pixels = QWEN3VL_IMAGE_MEAN, QWEN3VL_IMAGE_STD, QWEN3VL_MIN_PIXELS  # without a
    # preprocessor_config.json

    def load(self, model_id: str, raw_config: dict[str, Any], dtype: torch.dtype,
             attn_implementation: str) -> LoadedBackbone:
        return load_qwen3vl(model_id, raw_config, dtype, attn_implementation, family=self)

    def make_processor(self, tokenizer: Any, config: ColInternConfig) -> Qwen3VLProcessor:
        return Qwen3VLProcessor(tokenizer, config)

    def vision_tower(self, backbone: Any) -> nn.Module:
        return backbone.visual

    def load_generator(self, model_id: str, dtype: torch.dtype) -> tuple[nn.Module, LoadedBackbone]:
        import transformers

        tokenizer = load_tokenizer(model_id)
        generator = getattr(transformers, self.generator_class).from_pretrained(model_id, dtype=dtype)
        return generator, describe_qwen3vl(generator.model, tokenizer, _read_preprocessor(model_id), self)

    def transformers_processor(self, config: ColInternConfig) -> TransformersProcessorFiles:
        """transformers' Qwen3VLProcessor: the page resized by Qwen's rule to min..max_visual_tokens visual tokens (the
        size Qwen3VLProcessor here picks, except for pages so thin that the rule, keeping each side at least one
        token wide, overshoots the cap: ColIntern trims those further) and one `<|image_pad|>` per visual token."""
        sig = config.signature
        factor = int(sig["patch_size"]) * int(sig["spatial_merge_size"])
        image_processor = image_processor_file(
            config, "Qwen2VLImageProcessor", self.processor_class, patch_size=int(sig["patch_size"]),
            size={"shortest_edge": config.min_visual_tokens * factor ** 2,
                  "longest_edge": config.max_visual_tokens * factor ** 2},
            temporal_patch_size=int(sig["temporal_patch_size"]), merge_size=int(sig["spatial_merge_size"]))
        placeholder = config.image_start_token + config.image_token + config.image_end_token
        return TransformersProcessorFiles(self.processor_class, image_processor, {},
                                          {"image_token": config.image_token}, image_placeholder=placeholder)

    def build_tiny(self, out_dir: str, seed: int = 0, **options: Any) -> str:
        return build_tiny_qwen3vl(out_dir, seed=seed)


FAMILY = Qwen3VLFamily()
