"""Qwen2.5-VL, the backbone of ColQwen2.5 (docs/CONTRACT.md §2, §3).

The same design as Qwen3-VL (colintern/backbones/qwen3vl.py), so this family is that one with other classes and
defaults: transformers' `Qwen2_5_VLModel` (vision tower `.visual` with windowed attention, 14-px patches and a 2x2
merge, so 28 px per visual token; Qwen2 LM with M-RoPE, `.language_model`), pages at their own aspect ratio capped
at `max_visual_tokens` by Qwen's resize rule (transformers' Qwen2-VL image processor, PIL backend), CLIP's image
normalisation, and the ColQwen page prompt and query augmentation. Loading, the processor, LoRA targets (the vision
blocks' fused qkv and proj) and the export's processor files are Qwen3-VL's code.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from colintern.backbones.base import save_tiny_model
from colintern.backbones.qwen3vl import Qwen3VLFamily, qwen3vl_token_ids
from colintern.testing.toy_tokenizer import build_tokenizer

# Qwen2.5-VL's preprocessor defaults (OpenAI CLIP normalisation; at least 4 visual tokens of 28 x 28 px).
QWEN25VL_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
QWEN25VL_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
QWEN25VL_MIN_PIXELS = 56 * 56


def tiny_qwen25vl_config(vocab_size: int, token_ids: dict[str, int]):
    """Qwen2.5-VL architecture at toy size: 2-block vision tower (14-px patches, 2x2 merge, windowed attention in
    block 0, full in block 1), 2-layer Qwen2 text model with M-RoPE, hidden 128."""
    from transformers import Qwen2_5_VLConfig

    vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "in_chans": 3,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 128,
              "window_size": 112, "fullatt_block_indexes": [1], "hidden_act": "silu"}
    text = {"vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            "pad_token_id": token_ids["pad"], "eos_token_id": token_ids["eos"], "bos_token_id": None,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]}}
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=token_ids["image"],
                            video_token_id=token_ids["image"], vision_start_token_id=token_ids["start"],
                            vision_end_token_id=token_ids["end"], tie_word_embeddings=True)


def build_tiny_qwen25vl(out_dir: str, seed: int = 0) -> str:
    """Write a tiny random (seeded) Qwen2.5-VL to out_dir, loadable with `--model_id out_dir`; returns out_dir."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    token_ids = {**qwen3vl_token_ids(tokenizer), "eos": tokenizer.convert_tokens_to_ids("<|im_end|>")}
    config = tiny_qwen25vl_config(len(tokenizer), token_ids)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    preprocessor = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
                    "min_pixels": QWEN25VL_MIN_PIXELS, "max_pixels": 12845056, "patch_size": 14,
                    "temporal_patch_size": 2, "merge_size": 2, "do_resize": True, "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                    "image_mean": QWEN25VL_IMAGE_MEAN, "image_std": QWEN25VL_IMAGE_STD}
    return save_tiny_model(model, out_dir, "Qwen2.5-VL-architecture", preprocessor)


class Qwen25VLFamily(Qwen3VLFamily):
    name = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLModel"
    generator_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "Qwen2_5_VLProcessor"
    image_mean, image_std, min_pixels = QWEN25VL_IMAGE_MEAN, QWEN25VL_IMAGE_STD, QWEN25VL_MIN_PIXELS

    def build_tiny(self, out_dir: str, seed: int = 0, **options: Any) -> str:
        return build_tiny_qwen25vl(out_dir, seed=seed)


FAMILY = Qwen25VLFamily()
