"""Model export: a trained ColIntern as one folder a user can publish (search.py export_model).

The folder holds the base model's weights with the LoRA adapters merged in (transformers' own layout, so
`--model_id FOLDER` loads it like any model), its tokenizer and preprocessor files, `colintern_head.pt`: the
head (and pooler) with the ColIntern config, and README.md, the model card (model_card.py).
`ColIntern.from_pretrained(FOLDER)` finds the head file and gives the checkpoint's embeddings (merging LoRA changes
only float rounding: tested within 1e-5).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from colintern.errors import UserError

log = logging.getLogger("colintern")

HEAD_FILE = "colintern_head.pt"  # what makes a model folder a ColIntern folder


def merge_lora(backbone: torch.nn.Module) -> int:
    """Fold every LoRA adapter into its base layer's weight and put the plain layer back; returns how many."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(backbone.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = backbone.get_submodule(parent_name) if parent_name else backbone
            setattr(parent, child, module.get_base_layer())
            merged += 1
    return merged


def export_model(model: Any, out: str | Path, source_model_id: str, card: str | None = None,
                 datasets: list[str] | None = None) -> Path:
    """Write `model` (a loaded ColIntern, LoRA or not) as a self-contained model folder at `out`, with `card` as its
    README.md (colintern.retriever.model_card). `datasets`: what the checkpoint trained on, kept in the head file's
    training record (mteb's training_datasets reads it)."""
    from colintern.backbones.base import resolve_file, weights_fingerprint
    from colintern.retriever.checkpoint import save_checkpoint
    from colintern.retriever.st_layout import sentence_transformers_gap, write_sentence_transformers_files

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose a new one")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        n = merge_lora(model.backbone) if model.lora_config is not None else 0
        model.backbone.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        gap = sentence_transformers_gap(model.config)
        if gap is None:
            write_sentence_transformers_files(tmp, model)
        else:
            log.warning("no sentence-transformers layout: %s; the folder loads with ColIntern only", gap)
            extra = resolve_file(source_model_id, "preprocessor_config.json", required=False)
            if extra:
                shutil.copy(extra, tmp / "preprocessor_config.json")
        model.config.base_model = str(out.resolve())
        # the merged weights are this folder's own: record their fingerprint, so the head only pairs with them
        model.config.base_weights = weights_fingerprint(str(tmp))
        model.lora_config = None
        save_checkpoint(str(tmp / HEAD_FILE), **model.checkpoint_parts(),
                        training=None if datasets is None else {"datasets": list(datasets)})
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        if out.exists():
            out.rmdir()  # an empty folder (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%d LoRA layers merged) to %s", source_model_id, n, out)
    return out
