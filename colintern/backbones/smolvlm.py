"""SmolVLM / Idefics3, the backbone of ColSmol (docs/CONTRACT.md §2, §3).

- Loading: transformers' `Idefics3Model` (`model_type` "idefics3": SmolVLM-256M/500M-Instruct, Idefics3-8B) or
  `SmolVLMModel` ("smolvlm": SmolVLM2), without LM head: a SigLIP vision tower `.vision_model`, a pixel-shuffle
  connector, a Llama LM `.text_model`. Nothing remote runs.
- Pages (Idefics3's own rules, through transformers' Idefics3 image processor, PIL backend): the page is resized so
  its longest edge is `longest_edge` px (the model's preprocessor value), then to whole multiples of `tile_size`,
  cut into rows x cols tiles, and a global image (the page squeezed to one tile) follows. Each tile becomes
  `image_tokens_per_tile` `<image>` tokens, in a row-major grid (the connector's pixel shuffle keeps the order). The
  page prompt's `<image>` becomes transformers' own markup (`<fake_token_around_image><row_r_col_c>` + tokens per
  tile, a newline per row, then `<global-img>` + tokens), so the text is what Idefics3Processor would write.
- Queries: "Query: " + text + 10 x `<end_of_utterance>` (ColSmol's augmentation token; a colpali-engine checkpoint
  brings its own formatting, colintern/retriever/colpali_engine.py).
- Tiny model: 64-px tiles of 8-px patches, scale factor 2 (16 tokens per tile), pages resized to 128 px.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from colintern.backbones.base import (BackboneFamily, LoadedBackbone, TransformersProcessorFiles, image_processor_file,
                                      load_tokenizer, save_tiny_model)
from colintern.backbones.processor import PageProcessor, check_page_image, grid_boxes, page_keep_mask
from colintern.backbones.qwen3vl import _read_preprocessor
from colintern.errors import UserError
from colintern.retriever.config import ColInternConfig
from colintern.testing.toy_tokenizer import build_tokenizer

# ColSmol's page prompt (colpali-engine's ColIdefics3 visual prompt); "<image>" is expanded as Idefics3Processor does.
SMOLVLM_PAGE_PROMPT = "<|im_start|>User:<image>Describe the image.<end_of_utterance>\nAssistant:"
FAKE_TOKEN, GLOBAL_TOKEN, IMAGE_TOKEN = "<fake_token_around_image>", "<global-img>", "<image>"
MARKUP_TOKENS = (FAKE_TOKEN, IMAGE_TOKEN, GLOBAL_TOKEN, "<end_of_utterance>",
                 *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)))
MODEL_CLASSES = {"idefics3": ("Idefics3Model", "Idefics3ForConditionalGeneration", "Idefics3Processor"),
                 "smolvlm": ("SmolVLMModel", "SmolVLMForConditionalGeneration", "SmolVLMProcessor")}
IMAGE_MEAN = IMAGE_STD = [0.5, 0.5, 0.5]  # SmolVLM's, when a folder has no preprocessor_config.json
VISION_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # the SigLIP blocks' attention


# -- loading ------------------------------------------------------------------------------------------
def smolvlm_signature(config) -> dict[str, Any]:
    """Architecture facts a checkpoint must match; tile and token counts are also what the processor needs."""
    vision, text = config.vision_config, config.text_config
    return {"model_type": config.model_type, "text_model_type": text.model_type, "hidden_size": int(text.hidden_size),
            "num_hidden_layers": int(text.num_hidden_layers), "vocab_size": int(text.vocab_size),
            "vision_hidden_size": int(vision.hidden_size), "vision_layers": int(vision.num_hidden_layers),
            "vision_image_size": int(vision.image_size), "patch_size": int(vision.patch_size),
            "scale_factor": int(config.scale_factor)}


def backbone_class(base: str):
    """transformers' `base` (Idefics3Model, SmolVLMModel) that skips a generator checkpoint's LM head quietly, and a
    colpali-engine ColIdefics3 checkpoint's `linear` head (colintern/retriever/colpali_engine.py reads it)."""
    import transformers

    ignored = [r"(^|\.)lm_head\.", r"^linear\."]
    return type(base, (getattr(transformers, base),), {"_keys_to_ignore_on_load_unexpected": ignored})


def describe_smolvlm(model: nn.Module, tokenizer: Any, pre: dict[str, Any]) -> LoadedBackbone:
    """A loaded Idefics3/SmolVLM model as a LoadedBackbone, with ColSmol's formatting and the preprocessor's sizes."""
    signature = smolvlm_signature(model.config)
    tile = int((pre.get("max_image_size") or {}).get("longest_edge") or signature["vision_image_size"])
    longest = int((pre.get("size") or {}).get("longest_edge") or 4 * tile)
    tokens = (signature["vision_image_size"] // signature["patch_size"]) ** 2 // signature["scale_factor"] ** 2
    defaults = {"page_prompt": SMOLVLM_PAGE_PROMPT, "image_token": IMAGE_TOKEN, "image_start_token": FAKE_TOKEN,
                "image_end_token": FAKE_TOKEN, "longest_edge": longest,
                "image_mean": [float(x) for x in pre.get("image_mean", IMAGE_MEAN)],
                "image_std": [float(x) for x in pre.get("image_std", IMAGE_STD)],
                "query_prefix": "Query: ", "augmentation_token": "<end_of_utterance>", "n_augmentation": 10}
    return LoadedBackbone(model=model, tokenizer=tokenizer, family="smolvlm", layout="native",
                          hidden_size=signature["hidden_size"], signature=signature, tile_size=tile,
                          image_tokens_per_tile=tokens, config_defaults=defaults)


def load_smolvlm(model_id: str, raw_config: dict, dtype: torch.dtype, attn_implementation: str) -> LoadedBackbone:
    tokenizer = load_tokenizer(model_id)
    for token in (IMAGE_TOKEN, FAKE_TOKEN, GLOBAL_TOKEN):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise UserError(f"{model_id}: the tokenizer has no {token} token; not a SmolVLM / Idefics3 checkpoint?")
    model_class = backbone_class(MODEL_CLASSES[raw_config["model_type"]][0])
    try:
        model = model_class.from_pretrained(model_id, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load SmolVLM weights from {model_id!r}: {str(err).splitlines()[0]}") from None
    if model.config.image_token_id != tokenizer.convert_tokens_to_ids(IMAGE_TOKEN):
        raise UserError(f"{model_id}: config image_token_id {model.config.image_token_id} is not the tokenizer's "
                        f"{IMAGE_TOKEN} id; the model folder is inconsistent")
    return describe_smolvlm(model, tokenizer, _read_preprocessor(model_id))


# -- processor ----------------------------------------------------------------------------------------
def image_markup(rows: int, cols: int, tokens: int) -> str:
    """The text one page becomes (Idefics3Processor's markup): rows x cols tiles, each `<fake_token_around_image>`
    `<row_r_col_c>` + its tokens, a newline after each row, then the global image; a page that fits one tile is the
    global image alone."""
    tile_text = "".join("".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>" + IMAGE_TOKEN * tokens for c in range(cols))
                        + "\n" for r in range(rows))
    return tile_text + ("\n" if rows * cols else "") + FAKE_TOKEN + GLOBAL_TOKEN + IMAGE_TOKEN * tokens + FAKE_TOKEN


class SmolVLMProcessor(PageProcessor):
    """Processor for SmolVLM / Idefics3 backbones: Idefics3's resize, tiles and global image."""

    def __init__(self, tokenizer: Any, config: ColInternConfig):
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        if config.longest_edge < config.tile_size:
            raise UserError(f"longest_edge {config.longest_edge} is below the tile size {config.tile_size}")
        super().__init__(tokenizer, config)
        self.image_processor = Idefics3ImageProcessorPil(
            size={"longest_edge": config.longest_edge}, max_image_size={"longest_edge": config.tile_size},
            do_image_splitting=True, do_pad=True, image_mean=config.image_mean, image_std=config.image_std)

    def grid(self, image: Image.Image) -> tuple[int, int]:
        """(cols, rows) of the page's tiles; (0, 0) when the page is one tile (the global image alone)."""
        width, height = image.size
        _, rows, cols = self.image_processor.get_number_of_image_patches(height, width, {})
        return cols, rows

    def page_cost(self, image: Image.Image) -> int:
        cols, rows = self.grid(image)
        return (rows * cols + 1 if rows * cols else 1) * self.config.image_tokens_per_tile

    def worst_case_page(self) -> Image.Image:
        """A square page: longest_edge / tile_size tiles a side, the most a page can become, + the global image."""
        return Image.new("RGB", (self.config.longest_edge, self.config.longest_edge), (255, 255, 255))

    def image_token_boxes(self, image: Image.Image) -> np.ndarray:
        """Each tile's k x k tokens cover its share of the page, row by row; the global image's cover the page."""
        cols, rows = self.grid(image)
        k = int(round(self.config.image_tokens_per_tile ** 0.5))
        tiles = [grid_boxes(c / cols, r / rows, (c + 1) / cols, (r + 1) / rows, k, k)
                 for r in range(rows) for c in range(cols)]
        return np.concatenate(tiles + [grid_boxes(0.0, 0.0, 1.0, 1.0, k, k)])

    def process_images(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Pages -> input_ids (B, L), attention_mask (B, L), pixel_values (B, N, 3, S, S) with all-zero padding
        images past each page's own N (the model drops those), pixel_attention_mask (B, N, S, S), keep_mask (B, L)."""
        cfg = self.config
        pages = [check_page_image(image, f"image {i}") for i, image in enumerate(images)]
        image_processor: Any = self.image_processor  # its typed __call__ knows neither nested lists nor its own kwargs
        out = image_processor([[page] for page in pages], return_row_col_info=True, return_tensors="pt")
        texts = [cfg.page_prompt.replace("<image>", image_markup(rows[0], cols[0], cfg.image_tokens_per_tile))
                 for rows, cols in zip(out["rows"], out["cols"])]
        batch = self.tokenizer(texts, padding="longest", return_tensors="pt", add_special_tokens=False)
        keep = page_keep_mask(batch["attention_mask"], batch["input_ids"] == self.image_token_id, cfg.keep_page_tokens)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "pixel_values": out["pixel_values"], "pixel_attention_mask": out["pixel_attention_mask"],
                "keep_mask": keep}


# -- tiny model ----------------------------------------------------------------------------------------
def tiny_idefics3_config(vocab_size: int, token_ids: dict[str, int]):
    """Idefics3 at toy size: a 2-layer SigLIP tower on 64-px tiles of 8-px patches, scale factor 2 (16 tokens per
    tile), a 2-layer Llama LM, hidden 128."""
    from transformers import Idefics3Config

    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 64, "patch_size": 8}
    text = {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 384,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "pad_token_id": token_ids["pad"], "eos_token_id": token_ids["eos"],
            "bos_token_id": None, "tie_word_embeddings": False}
    return Idefics3Config(vision_config=vision, text_config=text, scale_factor=2, image_token_id=token_ids["image"],
                          tie_word_embeddings=False)


def build_tiny_smolvlm(out_dir: str, seed: int = 0) -> str:
    """Write a tiny random (seeded) Idefics3 (SmolVLM-256M's architecture) to out_dir; returns out_dir."""
    from transformers import Idefics3ForConditionalGeneration

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, extra_special_tokens=MARKUP_TOKENS)
    ids = {"pad": tokenizer.pad_token_id, "eos": tokenizer.convert_tokens_to_ids("<end_of_utterance>"),
           "image": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}
    config = tiny_idefics3_config(len(tokenizer), ids)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    preprocessor = {"image_processor_type": "Idefics3ImageProcessor", "processor_class": "Idefics3Processor",
                    "size": {"longest_edge": 128}, "max_image_size": {"longest_edge": 64}, "do_image_splitting": True,
                    "do_pad": True, "resample": 1, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
                    "do_normalize": True, "do_convert_rgb": True, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD}
    return save_tiny_model(model, out_dir, "Idefics3 (SmolVLM-architecture)", preprocessor)


# -- the family ---------------------------------------------------------------------------------------
class SmolVLMFamily(BackboneFamily):
    name = "smolvlm"
    model_types = ("idefics3", "smolvlm")
    causal = True
    vision_lora_targets = VISION_LORA_TARGETS

    def load(self, model_id: str, raw_config: dict[str, Any], dtype: torch.dtype,
             attn_implementation: str) -> LoadedBackbone:
        return load_smolvlm(model_id, raw_config, dtype, attn_implementation)

    def make_processor(self, tokenizer: Any, config: ColInternConfig) -> SmolVLMProcessor:
        return SmolVLMProcessor(tokenizer, config)

    def language_model(self, backbone: Any) -> nn.Module:
        return backbone.text_model

    def vision_tower(self, backbone: Any) -> nn.Module:
        return backbone.vision_model

    def load_generator(self, model_id: str, dtype: torch.dtype) -> tuple[nn.Module, LoadedBackbone]:
        import transformers

        from colintern.backbones.base import read_model_config

        classes = MODEL_CLASSES[read_model_config(model_id)["model_type"]]
        tokenizer = load_tokenizer(model_id)
        generator = getattr(transformers, classes[1]).from_pretrained(model_id, dtype=dtype)
        return generator, describe_smolvlm(generator.model, tokenizer, _read_preprocessor(model_id))

    def transformers_processor(self, config: ColInternConfig) -> TransformersProcessorFiles:
        """transformers' Idefics3Processor (it has no video processor, so no torchvision either): the same resize,
        tiles and markup as SmolVLMProcessor here, `<image>` in the chat template expanded by it."""
        tiles = image_processor_file(config, "Idefics3ImageProcessor", "Idefics3Processor", do_image_splitting=True,
                                     size={"longest_edge": config.longest_edge}, do_pad=True,
                                     max_image_size={"longest_edge": config.tile_size})
        tiles["resample"] = 1  # LANCZOS, Idefics3's
        return TransformersProcessorFiles("Idefics3Processor", tiles, {"image_seq_len": config.image_tokens_per_tile},
                                          {}, image_placeholder=IMAGE_TOKEN)

    def build_tiny(self, out_dir: str, seed: int = 0, **options: Any) -> str:
        return build_tiny_smolvlm(out_dir, seed=seed)


FAMILY = SmolVLMFamily()
