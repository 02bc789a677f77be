"""Turn page images and query strings into model inputs, exactly as the ColIntern config says (SPEC §3).

InternVL pages: dynamic tiling into `tile_size` tiles (up to `max_tiles`, + a thumbnail when there is more
than one tile) with transformers' GotOcr2 image processor (its PIL backend: no torchvision), and a page prompt
whose `<image>` becomes `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`.
Queries: `query_prefix + text + n_augmentation x augmentation_token`, every token attended and kept.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from colintern.config import ColInternConfig
from colintern.errors import UserError

MAX_ASPECT_RATIO = 50.0  # wider or taller than 50:1 is not a page (e.g. a 20000x50 strip)


def page_size_problem(width: int, height: int) -> str | None:
    """Why a width x height image cannot be a page, or None: the one size rule of the API and the batch jobs."""
    if width <= 0 or height <= 0:
        return f"empty image: {width}x{height} pixels"
    ratio = max(width / height, height / width)
    if ratio > MAX_ASPECT_RATIO:
        return f"extreme aspect ratio: {width}x{height} pixels ({ratio:.0f}:1, limit {MAX_ASPECT_RATIO:.0f}:1)"
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy; transparent areas become white (as on a printed page) rather than black."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        page = Image.new("RGB", rgba.size, (255, 255, 255))
        page.paste(rgba, mask=rgba.getchannel("A"))
        return page
    return image.convert("RGB")


def check_page_image(image: Any, where: str) -> Image.Image:
    """Return an RGB PIL image (the same one when it is RGB already), or raise UserError naming `where`."""
    if not isinstance(image, Image.Image):
        raise UserError(f"{where}: expected a PIL image, got {type(image).__name__}")
    problem = page_size_problem(*image.size)
    if problem:
        raise UserError(f"{where}: {problem}; crop or split it into pages, or drop it")
    return image if image.mode == "RGB" else to_rgb(image)


def check_query(text: Any, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: empty query; every query needs some text")
    return text


def page_keep_mask(attention_mask: torch.Tensor, is_image: torch.Tensor, mode: str) -> torch.Tensor:
    """Which page tokens become embeddings (B, L) bool.

    "all": every real token; "image": image tokens only; "page": every real token from the first image token on.
    In a causal LM the prompt tokens before the image cannot see the page, so their vectors are the same for every
    page: "page" drops exactly those page-independent tokens.
    """
    keep = attention_mask.bool()
    if mode == "image":
        return keep & is_image
    if mode == "page":
        return keep & (is_image.long().cumsum(dim=1) > 0)
    return keep


class InternVLProcessor:
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

        self.tokenizer = tokenizer
        self.config = config
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
        self.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        tokenizer.padding_side = config.padding_side
        if tokenizer.pad_token is None:
            raise UserError("the tokenizer has no pad token; set one in its tokenizer_config.json")

    # -- sizes ---------------------------------------------------------------------------------------
    def num_tiles(self, image: Image.Image) -> int:
        """Tiles the page will be cut into (thumbnail included) — cheap, used to sort pages by cost."""
        width, height = image.size
        return self.image_processor.get_number_of_image_patches(height, width, {})

    def page_cost(self, image: Image.Image) -> int:
        return self.num_tiles(image) * self.config.image_tokens_per_tile

    # -- pages -----------------------------------------------------------------------------------------
    def tile_bytes(self, image: Image.Image) -> np.ndarray:
        """One RGB page -> (tiles, 3, S, S) uint8: GotOcr2's grid tiles, row by row, then the thumbnail."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        size = self.config.tile_size
        resample = self.image_processor.resample
        width, height = image.size
        cols, rows = (get_optimal_tiled_canvas((height, width), (size, size), 1, self.config.max_tiles)
                      if self.config.max_tiles > 1 else (1, 1))
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

    # -- queries ---------------------------------------------------------------------------------------
    def format_query(self, text: str) -> str:
        cfg = self.config
        return cfg.query_prefix + text + cfg.augmentation_token * cfg.n_augmentation

    def process_queries(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Batch of queries -> input_ids (B, L), attention_mask (B, L), keep_mask (B, L)."""
        formatted = [self.format_query(check_query(t, f"query {i}")) for i, t in enumerate(texts)]
        batch = self.tokenizer(formatted, padding="longest", truncation=True, return_tensors="pt",
                               max_length=self.config.max_query_length + self.config.n_augmentation,
                               add_special_tokens=False)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "keep_mask": batch["attention_mask"].bool()}


def make_processor(tokenizer: Any, config: ColInternConfig):
    """The processor for the config's backbone kind."""
    if config.backbone == "internvl":
        return InternVLProcessor(tokenizer, config)
    if config.backbone == "qwen3_vl":
        from colintern.qwen3vl import Qwen3VLProcessor

        return Qwen3VLProcessor(tokenizer, config)
    raise UserError(f"unknown backbone kind {config.backbone!r}")
