"""The registry of backbone families: the one place that knows which families exist (docs/DESIGN.md, "Adding a
backbone"). Everything else asks a family object, never `if backbone == ...`."""
from __future__ import annotations

from typing import Any

import torch

from colintern.backbones import internvl, qwen3vl, qwen25vl, smolvlm
from colintern.backbones.base import BackboneFamily, LoadedBackbone, read_model_config, weights_fingerprint
from colintern.retriever.config import ColInternConfig
from colintern.errors import UserError
from colintern.backbones.processor import PageProcessor

FAMILIES: dict[str, BackboneFamily] = {family.name: family for family in (internvl.FAMILY, qwen3vl.FAMILY,
                                                                           qwen25vl.FAMILY, smolvlm.FAMILY)}
BY_MODEL_TYPE: dict[str, BackboneFamily] = {t: f for f in FAMILIES.values() for t in f.model_types}


def get_family(name: str) -> BackboneFamily:
    """The family called `name` (ColInternConfig.backbone)."""
    if name not in FAMILIES:
        raise UserError(f"unknown backbone family {name!r}; ColIntern knows {sorted(FAMILIES)}")
    return FAMILIES[name]


def load_backbone(model_id: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                  device: str | torch.device = "cpu") -> LoadedBackbone:
    """Load the backbone named by `model_id` (hub id or local directory), whatever its family and layout."""
    raw = read_model_config(model_id)
    model_type = raw.get("model_type")
    family = BY_MODEL_TYPE.get(str(model_type))
    if family is None:
        known = ", ".join(repr(t) for t in BY_MODEL_TYPE)
        raise UserError(f"model {model_id!r} has model_type {model_type!r}; ColIntern supports {known}")
    loaded = family.load(model_id, raw, dtype, attn_implementation)
    loaded.weights = weights_fingerprint(model_id)
    loaded.model.to(device)
    loaded.model.eval()
    return loaded


def make_processor(tokenizer: Any, config: ColInternConfig) -> PageProcessor:
    """The processor of the config's backbone family."""
    return get_family(config.backbone).make_processor(tokenizer, config)
