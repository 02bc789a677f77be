"""The InternVL family (InternVL3.5: InternViT + pixel-shuffle MLP projector + Qwen3 LM), docs/CONTRACT.md §2-§3.

- Loading: transformers-native InternVL (`model_type == "internvl"`) loads as `InternVLModel` (no LM head);
  original checkpoints (`model_type == "internvl_chat"`, e.g. OpenGVLab/InternVL3_5-1B-Instruct) are converted
  in-process: config translation, weight renaming, fused vision qkv split. No remote code runs.
- Pages: dynamic tiling into `tile_size` tiles (up to `max_tiles`, + a thumbnail when there is more than one
  tile) exactly as transformers' GotOcr2 image processor (its PIL backend: no torchvision), and a page prompt
  whose `<image>` becomes `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`.
- Tiny model: the same architecture at toy size (112-px tiles of 14-px patches, 16 image tokens per tile), in
  either layout, for tests and the CPU demo (`python -m colintern.testing.tiny OUT [--layout native|remote]`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from colintern.backbones.base import (BackboneFamily, LoadedBackbone, TransformersProcessorFiles, image_processor_file,
                                     load_tokenizer, read_state_dict)
from colintern.retriever.config import ColInternConfig
from colintern.errors import UserError
from colintern.backbones.processor import PageProcessor, check_page_image, grid_boxes, page_keep_mask
from colintern.testing.toy_tokenizer import build_tokenizer, write_original_layout

log = logging.getLogger("colintern")


# -- loading ------------------------------------------------------------------------------------------
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


def _internvl_facts(model: Any, tokenizer: Any, layout: str) -> LoadedBackbone:
    config = model.config
    vision, text = config.vision_config, config.text_config
    tile, patch = int(vision.image_size[0]), int(vision.patch_size[0])
    tokens_per_tile = int((tile // patch) ** 2 * config.downsample_ratio ** 2)
    signature = {
        "model_type": "internvl", "text_model_type": text.model_type, "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers, "vocab_size": text.vocab_size,
        "vision_hidden_size": vision.hidden_size, "vision_layers": vision.num_hidden_layers,
    }
    return LoadedBackbone(model=model, tokenizer=tokenizer, family="internvl", layout=layout,
                          hidden_size=int(text.hidden_size), signature=signature, tile_size=tile,
                          image_tokens_per_tile=tokens_per_tile)


_BACKBONE_CLASS = None


def _backbone_class():
    """InternVLModel that loads the -HF checkpoints' `InternVLForConditionalGeneration` weights without reporting
    their untied lm_head (InternVL3.5-1B stores one) as unexpected: retrieval needs hidden states, not logits.

    It keeps transformers' class name (a saved config names a class transformers knows). transformers applies its
    checkpoint key conversions to classes outside its package only when they are registered, so the same
    conversions as InternVL's are registered for that name (what the real class would use anyway)."""
    global _BACKBONE_CLASS
    if _BACKBONE_CLASS is None:
        from transformers import InternVLModel as Base
        from transformers import conversion_mapping as conversions

        class InternVLModel(Base):
            # transformers 5 saves InternVL in the hub's layout, where the head is `language_model.lm_head`
            _keys_to_ignore_on_load_unexpected = [r"(^|\.)lm_head\."]

        if "InternVLModel" not in conversions.USER_REGISTERED_MAPPINGS:
            same = conversions.get_checkpoint_conversion_mapping("InternVLModel") or \
                conversions.get_checkpoint_conversion_mapping("internvl")
            conversions.register_checkpoint_conversion_mapping("InternVLModel", same, overwrite=True)
        _BACKBONE_CLASS = InternVLModel
    return _BACKBONE_CLASS


def _load_internvl_native(model_id: str, raw: dict, dtype: torch.dtype, attn: str) -> LoadedBackbone:
    tokenizer = load_tokenizer(model_id)
    image_token_id = _img_context_id(model_id, tokenizer)
    if raw.get("image_token_id") is not None and raw["image_token_id"] != image_token_id:
        raise UserError(f"{model_id}: config image_token_id {raw['image_token_id']} is not the tokenizer's "
                        f"<IMG_CONTEXT> id {image_token_id}; the model folder is inconsistent")
    try:
        model = _backbone_class().from_pretrained(model_id, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load InternVL weights from {model_id!r}: {str(err).splitlines()[0]}") from None
    return _internvl_facts(model, tokenizer, "native")


def _img_context_id(model_id: str, tokenizer: Any) -> int:
    image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise UserError(f"{model_id}: the tokenizer has no <IMG_CONTEXT> token; not an InternVL checkpoint?")
    return int(image_token_id)


def convert_internvl_chat_config(raw: dict, image_token_id: int):
    """Translate an original `internvl_chat` config.json into a transformers `InternVLConfig`."""
    from transformers import AutoConfig, InternVLConfig, InternVLVisionConfig

    # Keys whose absence InternVL's own code fills with a default that changes what the model computes: required
    # here, rather than guessed (its InternVLChatConfig defaults ps_version to 'v1').
    missing = [key for key in ("ps_version", "downsample_ratio", "vision_config", "llm_config") if key not in raw]
    if missing:
        raise UserError(f"this internvl_chat config.json lacks {', '.join(missing)}; InternVL's own code would "
                        "fill in defaults (ps_version 'v1') that change the model: use the checkpoint's own config")
    if raw["ps_version"] != "v2":
        raise UserError(f"InternVL pixel-shuffle version {raw['ps_version']!r} is not supported (only 'v2')")
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


def _load_internvl_remote(model_id: str, raw: dict, dtype: torch.dtype, attn: str) -> LoadedBackbone:
    from transformers import InternVLModel

    tokenizer = load_tokenizer(model_id)
    config = convert_internvl_chat_config(raw, _img_context_id(model_id, tokenizer))
    config._attn_implementation = attn
    state = convert_internvl_chat_state_dict(read_state_dict(model_id), config.vision_config.hidden_size)
    model = InternVLModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied input/output embeddings are not stored twice; nothing else may be missing.
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise UserError(f"{model_id}: converted InternVL weights do not fit (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model.to(dtype=dtype)  # type: ignore[call-arg]  # transformers' wrapper of to() is typed as a plain function
    log.info("converted original InternVL checkpoint %s in-process (no remote code)", model_id)
    return _internvl_facts(model, tokenizer, "remote")


# -- processor ----------------------------------------------------------------------------------------
class InternVLProcessor(PageProcessor):
    """Processor for InternVL backbones (tokenizer + GotOcr2's tiling, bit-identical but vectorised).

    GotOcr2ImageProcessorPil resizes the page once to the tile grid, crops the tiles, then rescales and normalises
    them tile by tile in float64/float32 NumPy passes, and stacks them. The pixel values only depend on (channel,
    uint8 value), so `tile_page` does the same resize and crop on the uint8 canvas and maps every byte through a
    (3, 256) table built by that processor's own rescale + normalize: the same float32 numbers with less
    work (1.4x faster at one tile on real pages; at 6+1 and 12+1 tiles PIL's resizes dominate both; see
    docs/BENCHMARKS.md). tests/test_model.py checks bitwise equality.
    """

    def __init__(self, tokenizer: Any, config: ColInternConfig):
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        super().__init__(tokenizer, config)
        self.image_processor = GotOcr2ImageProcessorPil(
            size={"height": config.tile_size, "width": config.tile_size}, crop_to_patches=True, min_patches=1,
            max_patches=config.max_tiles, image_mean=config.image_mean, image_std=config.image_std,
            do_convert_rgb=True,
        )
        if not config.use_thumbnail:
            raise UserError("use_thumbnail=False is not supported by the GotOcr2 tiling of InternVL")
        levels = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256))  # (C, 1, 256): every byte value
        rescaled = self.image_processor.rescale(levels, 1 / 255) if self.image_processor.do_rescale else levels
        table = self.image_processor.normalize(rescaled, config.image_mean, config.image_std)  # (3, 1, 256)
        self.pixel_table = np.ascontiguousarray(table, dtype=np.float32).reshape(3, 256)  # [channel, byte]

    # -- sizes ---------------------------------------------------------------------------------------
    def num_tiles(self, image: Image.Image) -> int:
        """Tiles the page will be cut into (thumbnail included) — cheap, used to sort pages by cost."""
        width, height = image.size
        return self.image_processor.get_number_of_image_patches(height, width, {})

    def page_cost(self, image: Image.Image) -> int:
        return self.num_tiles(image) * self.config.image_tokens_per_tile

    def grid(self, image: Image.Image) -> tuple[int, int]:
        """(cols, rows) of the tile grid GotOcr2 cuts the page into (1 x 1: a single tile, no thumbnail)."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        size = self.config.tile_size
        width, height = image.size
        if self.config.max_tiles <= 1:
            return 1, 1
        return get_optimal_tiled_canvas((height, width), (size, size), 1, self.config.max_tiles)

    def worst_case_page(self) -> Image.Image:
        """max_tiles tiles in a row (+ the thumbnail): the most image tokens a page can become."""
        size = self.config.tile_size
        return Image.new("RGB", (size * self.config.max_tiles, size), (255, 255, 255))

    def image_token_boxes(self, image: Image.Image) -> np.ndarray:
        """Each tile's k x k tokens (k = sqrt(tokens per tile); pixel shuffle keeps them row-major) cover that tile's
        share of the page; the thumbnail's tokens then cover the whole page at a coarser grid."""
        cols, rows = self.grid(image)
        k = math.isqrt(self.config.image_tokens_per_tile)
        tiles = [grid_boxes(c / cols, r / rows, (c + 1) / cols, (r + 1) / rows, k, k)
                 for r in range(rows) for c in range(cols)]
        if rows * cols > 1:
            tiles.append(grid_boxes(0.0, 0.0, 1.0, 1.0, k, k))
        return np.concatenate(tiles)

    # -- pages -----------------------------------------------------------------------------------------
    def tile_bytes(self, image: Image.Image) -> np.ndarray:
        """One RGB page -> (tiles, 3, S, S) uint8: GotOcr2's grid tiles, row by row, then the thumbnail."""
        size = self.config.tile_size
        resample = self.image_processor.resample
        cols, rows = self.grid(image)
        canvas = np.asarray(image.resize((cols * size, rows * size), resample=resample))  # (rows*S, cols*S, 3) u8
        tiles = canvas.reshape(rows, size, cols, size, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, size, size)
        if rows * cols == 1:
            return tiles
        thumbnail = np.asarray(image.resize((size, size), resample=resample)).transpose(2, 0, 1)  # (3, S, S)
        return np.concatenate([tiles, thumbnail[None]])

    def pixels(self, tiles: np.ndarray) -> torch.Tensor:
        """(T, 3, S, S) uint8 -> (T, 3, S, S) float32 pixel values, one table lookup per byte."""
        out = np.empty(tiles.shape, dtype=np.float32)
        for channel in range(3):
            np.take(self.pixel_table[channel], tiles[:, channel], out=out[:, channel])
        return torch.from_numpy(out)

    def tile_page(self, image: Image.Image) -> torch.Tensor:
        """One RGB page -> (tiles, 3, S, S) float32, exactly GotOcr2ImageProcessorPil's pixel_values."""
        return self.pixels(self.tile_bytes(image))

    def batch_pixels(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, list[int]]:
        """Pages -> (pixel values (T, 3, S, S) float32 of all their tiles, in order; tiles per page).

        Tiles stay uint8 until the whole batch is concatenated; one table lookup then writes the float output."""
        page_tiles = [self.tile_bytes(check_page_image(image, f"image {i}")) for i, image in enumerate(images)]
        return self.pixels(np.concatenate(page_tiles)), [t.shape[0] for t in page_tiles]

    def process_images(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Batch of pages -> input_ids (B, L), attention_mask (B, L), pixel_values (T, 3, S, S), keep_mask (B, L)."""
        cfg = self.config
        pixel_values, tiles_per_page = self.batch_pixels(images)
        texts = [cfg.page_prompt.replace("<image>", cfg.image_start_token
                                         + cfg.image_token * (tiles * cfg.image_tokens_per_tile) + cfg.image_end_token)
                 for tiles in tiles_per_page]
        batch = self.tokenizer(texts, padding="longest", return_tensors="pt", add_special_tokens=False)
        keep = page_keep_mask(batch["attention_mask"], batch["input_ids"] == self.image_token_id, cfg.keep_page_tokens)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "pixel_values": pixel_values, "keep_mask": keep}


# -- tiny model ---------------------------------------------------------------------------------------
def tiny_internvl_config(vocab_size: int, image_token_id: int, eos_token_id: int, pad_token_id: int):
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen3Config

    vision = InternVLVisionConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, attention_bias=True,
        use_qk_norm=False, image_size=112, patch_size=14, norm_type="layer_norm", layer_norm_eps=1e-6,
        use_mean_pooling=True, use_absolute_position_embeddings=True, hidden_act="gelu",
    )
    text = Qwen3Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-6,
        tie_word_embeddings=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    # Untied like InternVL3.5-1B(-HF), whose checkpoint stores an lm_head apart from the embeddings (untying draws
    # the lm_head after every other weight: the backbone's weights are the same as when the tiny model was tied).
    return InternVLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id,
                          image_seq_length=16, downsample_ratio=0.5, tie_word_embeddings=False)


def internvl35_1b_config(image_token_id: int, attn_implementation: str = "sdpa"):
    """The real InternVL3.5-1B shapes (InternViT-300M 1024 x 24 layers with qkv bias + Qwen3-0.6B 1024 x 28 layers,
    vocab 151936), for smoke tests and benchmarks with random weights."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen3Config

    vision = InternVLVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                  intermediate_size=4096, attention_bias=True, image_size=448, patch_size=14,
                                  use_mean_pooling=True, norm_type="layer_norm", layer_norm_eps=1e-6)
    text = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                       max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    config = InternVLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id,
                            image_seq_length=256, downsample_ratio=0.5)
    config._attn_implementation = attn_implementation
    return config


# Inverse of the loading renames above: native name -> original InternVL name.
_TO_REMOTE = [
    (r"^vision_tower\.", "vision_model."),
    (r"\.layer\.", ".layers."),
    (r"embeddings\.cls_token$", "embeddings.class_embedding"),
    (r"embeddings\.position_embeddings$", "embeddings.position_embedding"),
    (r"embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
    (r"\.lambda_(\d)$", r".ls\1"),
    (r"\.attention\.projection_layer\.", ".attn.proj."),
    (r"\.attention\.", ".attn."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
]


def to_remote_state_dict(native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write `InternVLForConditionalGeneration` weights the way an original InternVL checkpoint stores them."""
    flat = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in native.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in flat.items():
        if key.startswith("vision_tower."):
            new = key
            for pattern, repl in _TO_REMOTE:
                new = re.sub(pattern, repl, new)
            if ".attn.q_proj." in new:  # fuse q, k, v into one qkv projection: 3 x (H, H) -> (3H, H)
                parts = [flat[key.replace(".q_proj.", f".{p}.")] for p in ("q_proj", "k_proj", "v_proj")]
                out[new.replace(".attn.q_proj.", ".attn.qkv.")] = torch.cat(parts, dim=0).contiguous()
            elif ".attn.k_proj." not in new and ".attn.v_proj." not in new:
                out[new] = value.contiguous()
        elif key.startswith("multi_modal_projector."):
            names = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}
            part, rest = key[len("multi_modal_projector."):].split(".", 1)
            out[f"mlp1.{names[part]}.{rest}"] = value.contiguous()
        elif key.startswith("language_model."):
            out["language_model.model." + key[len("language_model."):]] = value.contiguous()
        elif key == "lm_head.weight":
            out["language_model.lm_head.weight"] = value.clone().contiguous()
    return out


def remote_config_json(config) -> dict:
    """An original-style `internvl_chat` config.json for the same architecture."""
    vision = config.vision_config
    text = config.text_config.to_dict()
    text["architectures"] = ["Qwen3ForCausalLM"]
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": config.downsample_ratio, "dynamic_image_size": True, "force_image_size": vision.image_size[0],
        "max_dynamic_patch": 12, "min_dynamic_patch": 1, "ps_version": "v2", "select_layer": -1,
        "template": "internvl2_5", "use_thumbnail": True,
        "vision_config": {
            "model_type": "intern_vit_6b", "architectures": ["InternVisionModel"], "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_hidden_layers, "num_attention_heads": vision.num_attention_heads,
            "intermediate_size": vision.intermediate_size, "qkv_bias": vision.attention_bias,
            "qk_normalization": vision.use_qk_norm, "norm_type": vision.norm_type, "layer_norm_eps": vision.layer_norm_eps,
            "image_size": vision.image_size[0], "patch_size": vision.patch_size[0], "num_channels": 3,
            "hidden_act": vision.hidden_act, "dropout": 0.0, "attention_dropout": 0.0, "drop_path_rate": 0.0,
            "initializer_range": 0.02, "initializer_factor": 1.0, "use_flash_attn": False,
        },
        "llm_config": text,
    }


def build_tiny_internvl(out_dir: str, layout: str = "native", seed: int = 0) -> str:
    """Write the tiny model to out_dir in the given layout; returns out_dir."""
    from safetensors.torch import save_file
    from transformers import InternVLForConditionalGeneration

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    config = tiny_internvl_config(
        vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    preprocessor = {"image_processor_type": "GotOcr2ImageProcessor", "size": {"height": 112, "width": 112},
                    "crop_to_patches": True, "min_patches": 1, "max_patches": 12, "do_resize": True,
                    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(preprocessor, f, indent=2)
    if layout == "native":
        model.save_pretrained(out_dir)
    elif layout == "remote":
        write_original_layout(out_dir)  # the tokenizer as the original repositories ship it (no tokenizer.json)
        state = to_remote_state_dict(model.state_dict())
        save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(remote_config_json(config), f, indent=2)
    else:
        raise UserError(f"--layout must be 'native' or 'remote', got {layout!r}")
    log.info("wrote tiny InternVL3.5-architecture model (%s layout, %.2fM parameters) to %s", layout,
             sum(p.numel() for p in model.parameters()) / 1e6, out_dir)
    return out_dir


# -- the family ---------------------------------------------------------------------------------------
class InternVLFamily(BackboneFamily):
    name = "internvl"
    model_types = ("internvl", "internvl_chat")
    causal = True
    tiny_options = ("layout",)

    def load(self, model_id: str, raw_config: dict[str, Any], dtype: torch.dtype,
             attn_implementation: str) -> LoadedBackbone:
        if raw_config.get("model_type") == "internvl_chat":
            return _load_internvl_remote(model_id, raw_config, dtype, attn_implementation)
        return _load_internvl_native(model_id, raw_config, dtype, attn_implementation)

    def make_processor(self, tokenizer: Any, config: ColInternConfig) -> InternVLProcessor:
        return InternVLProcessor(tokenizer, config)

    def vision_tower(self, backbone: Any) -> nn.Module:
        return backbone.vision_tower

    def load_generator(self, model_id: str, dtype: torch.dtype) -> tuple[nn.Module, LoadedBackbone]:
        from transformers import InternVLForConditionalGeneration

        tokenizer = load_tokenizer(model_id)
        generator = InternVLForConditionalGeneration.from_pretrained(model_id, dtype=dtype)
        return generator, _internvl_facts(generator.model, tokenizer, "native")

    def transformers_processor(self, config: ColInternConfig) -> TransformersProcessorFiles:
        """transformers' InternVLProcessor: GotOcr2's tiling with the settings InternVLProcessor here uses, and `<img>` +
        tiles x image_seq_length `<IMG_CONTEXT>` + `</img>` for the one context token the chat template writes."""
        tiling = image_processor_file(config, "GotOcr2ImageProcessor", "InternVLProcessor", crop_to_patches=True,
                                      size={"height": config.tile_size, "width": config.tile_size}, min_patches=1,
                                      max_patches=config.max_tiles)
        tokens = {"start_image_token": config.image_start_token, "end_image_token": config.image_end_token,
                  "context_image_token": config.image_token, "video_token": "<video>"}
        settings = {"image_seq_length": config.image_tokens_per_tile}
        return TransformersProcessorFiles("InternVLProcessor", tiling, settings, tokens, config.image_token)

    def build_tiny(self, out_dir: str, seed: int = 0, **options: Any) -> str:
        return build_tiny_internvl(out_dir, layout=options.get("layout") or "native", seed=seed)


FAMILY = InternVLFamily()
