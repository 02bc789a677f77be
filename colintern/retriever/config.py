"""ColInternConfig: every choice that changes what an embedding means (docs/CONTRACT.md §3).

It is saved in every checkpoint and every script reads it back from there, so a change of a code default
never silently changes what an old checkpoint means. Only plain Python values live here (it goes into
`torch.save` and is read with `weights_only=True`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from colintern.errors import UserError

# Bump when the meaning of a stored field changes.
CONFIG_VERSION = 1

PAGE_TOKEN_CHOICES = ("page", "all", "image")
# Fields added after the first checkpoints, with the value that reproduces what those checkpoints mean.
LATER_FIELDS = {"embedding": "multi", "pooling": "mean", "attention": "causal", "latent": {}, "instruction": "",
                "query_suffix": "", "longest_edge": 0}
EMBEDDINGS = ("multi", "single")
POOLINGS = ("last", "mean", "latent")  # colintern/retriever/pooling.py
ATTENTIONS = ("causal", "bidirectional")


@dataclass
class ColInternConfig:
    """Formatting and head settings of one ColIntern model."""

    base_model: str = ""               # --model_id as given (hub id or local directory)
    backbone: str = "internvl"         # "internvl" | "qwen3_vl"
    source_layout: str = "native"      # "native" (transformers) | "remote" (original internvl_chat, converted)
    signature: dict[str, Any] = field(default_factory=dict)  # architecture facts that must match at load time
    base_weights: str = ""             # fingerprint of the base weight files ("": not recorded, not checked)
    hidden_size: int = 0               # H of the language model
    dim: int = 128                     # output token dimension
    head_seed: int = 0                 # seed of the deterministic head initialisation
    # Pages (InternVL): tiles of tile_size px, up to max_tiles, + a thumbnail when more than one tile.
    tile_size: int = 448
    max_tiles: int = 6
    use_thumbnail: bool = True
    image_tokens_per_tile: int = 256
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    image_token: str = "<IMG_CONTEXT>"
    image_start_token: str = "<img>"
    image_end_token: str = "</img>"
    # Pages (Qwen3-VL): dynamic resolution capped by this many visual tokens.
    max_visual_tokens: int = 768
    min_visual_tokens: int = 4         # smaller pages are upscaled to at least this many visual tokens
    # Pages (SmolVLM / Idefics3): resized to this longest edge, then cut into tile_size tiles + a global image.
    longest_edge: int = 0
    page_prompt: str = "<|im_start|>user\n<image>\nDescribe the document page.<|im_end|>\n"
    keep_page_tokens: str = "page"     # "page": real tokens from the image on (those before it are the same for
                                       # every page in a causal LM); "all" real tokens; or only "image" tokens
    # Queries: query_prefix + text + n_augmentation x augmentation_token (ColPali's query augmentation).
    query_prefix: str = "Query: "
    augmentation_token: str = "<|endoftext|>"
    n_augmentation: int = 10
    max_query_length: int = 256
    padding_side: str = "right"        # right padding keeps causal hidden states independent of the batch
    # Single-vector retrieval (docs/CONTRACT.md §11); the defaults are the multi-vector causal model of before.
    embedding: str = "multi"           # "multi": every kept token a vector (MaxSim) | "single": one pooled vector
    pooling: str = "mean"              # single: "last" kept token | "mean" of kept tokens | "latent" (NV-Embed)
    attention: str = "causal"          # the LM's attention: "causal" | "bidirectional"
    latent: dict[str, Any] = field(default_factory=dict)  # pooling "latent": num_latents, heads, dim_head, mlp_mult
    instruction: str = ""              # queries become "Instruct: {instruction}\nQuery: {text}" (NV-Embed style)
    query_suffix: str = ""             # appended to every query after the augmentation (single: the EOS token)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.keep_page_tokens not in PAGE_TOKEN_CHOICES:
            raise UserError(f"keep_page_tokens must be one of {PAGE_TOKEN_CHOICES}, got {self.keep_page_tokens!r}")
        if self.padding_side not in ("right", "left"):
            raise UserError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.dim <= 0 or self.max_tiles <= 0:
            raise UserError(f"dim and max_tiles must be positive (dim={self.dim}, max_tiles={self.max_tiles})")
        for name, value, choices in (("embedding", self.embedding, EMBEDDINGS), ("pooling", self.pooling, POOLINGS),
                                     ("attention", self.attention, ATTENTIONS)):
            if value not in choices:
                raise UserError(f"{name} must be one of {choices}, got {value!r}")
        if self.latent and self.pooling != "latent":
            raise UserError(f"latent pooler settings {self.latent} need pooling 'latent', not {self.pooling!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def meaning(self) -> dict[str, Any]:
        """What the embeddings mean, for fingerprints: not where the base model was read from (base_model,
        base_weights), and a field added later only when it differs from the value that reproduces the older
        checkpoints (so their fingerprints, and a resume of their phase, stay valid)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("base_model", "base_weights")
                and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ColInternConfig":
        """Rebuild from a checkpoint; unknown keys (from a newer ColIntern) are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"checkpoint config has fields this ColIntern does not know: {unknown}; upgrade colintern")
        if values.get("version", CONFIG_VERSION) > CONFIG_VERSION:
            raise UserError(f"checkpoint config version {values['version']} is newer than supported ({CONFIG_VERSION})")
        return cls(**values)
