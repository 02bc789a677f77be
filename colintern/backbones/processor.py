"""Turn page images and query strings into model inputs, exactly as the ColIntern config says (docs/CONTRACT.md §3).

The rules every family shares live here: what a page is (`page_size_problem`, `to_rgb`, `check_page_image`),
which tokens become embeddings (`page_keep_mask`), and `PageProcessor`, the base class with the query path
(`query_prefix + text + n_augmentation x augmentation_token`, every token attended and kept). Each family's
page path is in its module (`colintern/backbones/internvl.py`, `colintern/backbones/qwen3vl.py`).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from colintern.retriever.config import ColInternConfig
from colintern.errors import UserError

log = logging.getLogger("colintern")
CLIP_WARNINGS = 5  # queries over max_query_length reported one by one, then no more

MAX_ASPECT_RATIO = 50.0  # wider or taller than 50:1 is not a page (e.g. a 20000x50 strip)


def page_size_problem(width: int, height: int) -> str | None:
    """Why a width x height image cannot be a page, or None: the one size rule of the API and the batch jobs."""
    if width <= 0 or height <= 0:
        return f"empty image: {width}x{height} pixels"
    ratio = max(width / height, height / width)
    if ratio > MAX_ASPECT_RATIO:
        return f"extreme aspect ratio: {width}x{height} pixels ({ratio:.0f}:1, limit {MAX_ASPECT_RATIO:.0f}:1)"
    return None


MIN_PAGE_SIDE = 32  # a side below this has too few pixels to read: allowed, but worth a warning


def page_size_note(width: int, height: int) -> str | None:
    """What is odd, though allowed, about a width x height page (a warning, not an error), or None."""
    if min(width, height) < MIN_PAGE_SIDE:
        return f"tiny page ({width}x{height} pixels): it is upscaled to fill a tile and carries little to read"
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        return (f"very large page ({width}x{height} = {width * height / 1e6:.0f} Mpx): decoding it takes "
                f"{width * height * 3 / 2**30:.1f} GiB; it is downscaled to the tile grid")
    return None


class PageModeError(ValueError):
    """A page whose pixels cannot be converted to 8-bit RGB faithfully (the reason says why)."""


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey pages -> 8-bit grey with the same content.

    PIL's own conversion clips (a 16-bit page becomes nearly all white), so the values are rescaled: 16-bit
    samples by 1/257 (65535 -> 255); 32-bit integers as 8-bit when they lie in 0..255, as 16-bit in 0..65535;
    floats as 8-bit in 0..255 or as fractions in 0..1. Other ranges have no faithful reading: PageModeError."""
    values = np.asarray(image, dtype=np.float64)  # (H, W)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not np.isfinite(values).all():
        raise PageModeError(f"unsupported pixel values: {image.mode} image with NaN or infinite samples")
    if image.mode.startswith("I;16"):
        scale = 1 / 257
    elif image.mode == "I" and low >= 0 and high <= 255:
        scale = 1.0
    elif image.mode == "I" and low >= 0 and high <= 65535:
        scale = 1 / 257
    elif image.mode == "F" and low >= 0 and high <= 1:
        scale = 255.0
    elif image.mode == "F" and low >= 0 and high <= 255:
        scale = 1.0
    else:
        raise PageModeError(f"unsupported pixel values: {image.mode} image with samples from {low:g} to {high:g} "
                            "(expected 0..255 or 0..65535, or 0..1 for floats); convert it to 8-bit first")
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))  # (H, W) -> L


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy with the same content, whatever the PIL mode: transparent areas become white (as on a
    printed page) rather than black, and 16-bit, 32-bit and float pages are rescaled, not clipped.
    PageModeError for a page that cannot be converted faithfully."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_l(image).convert("RGB")
    if mode == "RGBa":  # premultiplied alpha: PIL converts it to straight alpha
        image, mode = image.convert("RGBA"), "RGBA"
    elif mode == "La":  # premultiplied grey + alpha, which PIL cannot convert: divide by alpha here
        grey_alpha = np.asarray(image).astype(np.float64)  # (H, W, 2)
        alpha = grey_alpha[..., 1]
        grey = np.where(alpha > 0, grey_alpha[..., 0] * 255 / np.maximum(alpha, 1), 0)
        straight = np.dstack([np.clip(np.rint(grey), 0, 255), alpha]).astype(np.uint8)  # (H, W, 2)
        image = Image.fromarray(straight)  # LA
        mode = "LA"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        page = Image.new("RGB", rgba.size, (255, 255, 255))
        page.paste(rgba, mask=rgba.getchannel("A"))
        return page
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise PageModeError(f"unsupported pixel format: cannot convert a {mode} image to RGB ({err})") from None


def check_page_image(image: Any, where: str) -> Image.Image:
    """Return an RGB PIL image (the same one when it is RGB already), or raise UserError naming `where`."""
    if not isinstance(image, Image.Image):
        raise UserError(f"{where}: expected a PIL image, got {type(image).__name__}")
    problem = page_size_problem(*image.size)
    if problem:
        raise UserError(f"{where}: {problem}; crop or split it into pages, or drop it")
    note = page_size_note(*image.size)
    if note:
        log.warning("%s: %s", where, note)
    if image.mode == "RGB":
        return image
    try:
        return to_rgb(image)
    except PageModeError as err:
        raise UserError(f"{where}: {err}") from None


def require_query_text(text: Any, where: str) -> str:
    """The query text unchanged, or a UserError naming `where` (API input; data rows use data.clean_query)."""
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


class PageProcessor:
    """Turns pages and queries into one backbone family's model inputs, as the ColIntern config says.

    Shared by every family: the tokenizer set-up and the query path (`format_query`, `process_queries`).
    Each family implements the page path: `process_images`, `page_cost` (tokens a page becomes, to sort pages by
    cost), `worst_case_page` (the costliest page the config allows, for memory probes) and `image_token_boxes`
    (where each image token sits on the page, for similarity maps).
    """

    def __init__(self, tokenizer: Any, config: ColInternConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        self.suffix_tokens = len(tokenizer(config.query_suffix, add_special_tokens=False)["input_ids"]) \
            if config.query_suffix else 0
        tokenizer.padding_side = config.padding_side
        if tokenizer.pad_token is None:
            raise UserError("the tokenizer has no pad token; set one in its tokenizer_config.json")

    # -- pages (per family) ------------------------------------------------------------------------------
    def process_images(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Batch of pages -> model inputs, including input_ids (B, L), attention_mask (B, L), keep_mask (B, L)."""
        raise NotImplementedError

    def page_cost(self, image: Image.Image) -> int:
        """Image tokens the page becomes (cheap: used to sort pages by cost)."""
        raise NotImplementedError

    def worst_case_page(self) -> Image.Image:
        """A blank page with the most image tokens the config allows (for memory probes)."""
        raise NotImplementedError

    def image_token_boxes(self, image: Image.Image) -> np.ndarray:
        """(n_image_tokens, 4) float64 boxes (x0, y0, x1, y1) in page coordinates normalised to [0, 1], one per
        image token of the page, in the order the tokens appear in `process_images`' input_ids."""
        raise NotImplementedError

    # -- queries (shared) ----------------------------------------------------------------------------------
    def query_prefix(self) -> str:
        """What comes before a query's text: the NV-Embed instruction when the config has one."""
        cfg = self.config
        return f"Instruct: {cfg.instruction}\nQuery: " if cfg.instruction else cfg.query_prefix

    def format_query(self, text: str) -> str:
        cfg = self.config
        return self.query_prefix() + text + cfg.augmentation_token * cfg.n_augmentation + cfg.query_suffix

    def clip_query(self, text: str, i: int) -> str:
        """The query cut to max_query_length tokens, with a warning (the first few times): cutting the formatted
        string instead would drop the augmentation tokens and the suffix, not the excess text."""
        limit, prefix = self.config.max_query_length, self.query_prefix()
        if len(prefix) + len(text) <= limit:  # a token covers at least one character
            return text
        tokens = self.tokenizer(prefix + text, add_special_tokens=False, return_offsets_mapping=True)
        if len(tokens["input_ids"]) <= limit:  # max_query_length counts the prefix's tokens too
            return text
        self.clipped = getattr(self, "clipped", 0) + 1
        if self.clipped <= CLIP_WARNINGS:
            log.warning("query %d has %d tokens with its prefix: only the first %d are used (max_query_length)%s",
                        i + 1, len(tokens["input_ids"]), limit, "; further cut queries are not reported"
                        if self.clipped == CLIP_WARNINGS else "")
        return text[:max(0, tokens["offset_mapping"][limit - 1][1] - len(prefix))]

    def process_queries(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Batch of queries -> input_ids (B, L), attention_mask (B, L), keep_mask (B, L).

        Multi-vector: every real token is kept. Single-vector: the prefix (instruction) tokens still shape the
        others through attention but are left out of the pooled vector (NV-Embed); a token that straddles the end
        of the prefix (a space-led word) counts as text."""
        cfg = self.config
        formatted = [self.format_query(self.clip_query(require_query_text(t, f"query {i}"), i))
                     for i, t in enumerate(texts)]
        single = cfg.embedding == "single"
        batch = self.tokenizer(formatted, padding="longest", truncation=True, return_tensors="pt",
                               max_length=cfg.max_query_length + cfg.n_augmentation + self.suffix_tokens,
                               add_special_tokens=False, return_offsets_mapping=single)
        keep = batch["attention_mask"].bool()
        if single:
            ends = batch["offset_mapping"][..., 1]  # (B, L) character where each token ends
            keep = keep & (ends > len(self.query_prefix()))  # " red" after "Query: " straddles: it is text
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "keep_mask": keep}


def grid_boxes(x0: float, y0: float, x1: float, y1: float, cols: int, rows: int) -> np.ndarray:
    """(rows * cols, 4) boxes of a cols x rows grid over the rectangle (x0, y0)-(x1, y1), row by row."""
    xs = np.linspace(x0, x1, cols + 1)
    ys = np.linspace(y0, y1, rows + 1)
    grid_x, grid_y = np.meshgrid(np.arange(cols), np.arange(rows))  # (rows, cols) each
    gx, gy = grid_x.ravel(), grid_y.ravel()  # (rows * cols,)
    return np.stack([xs[gx], ys[gy], xs[gx + 1], ys[gy + 1]], axis=1)
