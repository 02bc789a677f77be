"""ColIntern checkpoints (docs/CONTRACT.md §6): one `torch.save` file of tensors and plain values, written atomically.

Layout of the saved dict:
    format_version: int
    config:         ColInternConfig.to_dict()
    head:           head state_dict (tensors)
    lora:           {"config": plain dict, "state": {name: tensor}} or None
    pooler:         latent-attention pooler state_dict or None (format 2; absent in format 1)
    training:       {"step", "epoch", "epoch_position", "phase", "optimizer", "scheduler", "rng", "fingerprint", ...}
                    or None (plain values and tensors only)
    metrics:        dict of the last metrics
Always read back with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import logging
import os
import re
import pickle
from pathlib import Path
from typing import Any

import torch

from colintern.retriever.config import ColInternConfig
from colintern.errors import UserError
from colintern.files import atomic_write

FORMAT_VERSION = 2  # 2: + "pooler" (the latent-attention pooler of single-vector models, or None)

log = logging.getLogger("colintern")


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save through colintern.files.atomic_write: the old file survives any failure."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path: str, *, config: ColInternConfig, head: dict[str, torch.Tensor],
                    lora: dict[str, Any] | None = None, training: dict[str, Any] | None = None,
                    metrics: dict[str, Any] | None = None, pooler: dict[str, torch.Tensor] | None = None) -> None:
    payload = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "head": {k: v.detach().cpu() for k, v in head.items()},
        "lora": lora,
        "pooler": None if pooler is None else {k: v.detach().cpu() for k, v in pooler.items()},
        "training": training,
        "metrics": dict(metrics or {}),
    }
    atomic_torch_save(payload, path)


def load_checkpoint(path: str, task: str = "retrieval") -> dict[str, Any]:
    """Read a checkpoint safely (weights_only=True); one clear line for a missing or foreign file, or one of
    another task ("retrieval": what train.py writes by default; "itr": train.py --task itr; "any")."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own text suggests weights_only=False: never pass that advice on.
        if "GLOBAL" not in str(err):  # not a code-running pickle: a damaged or foreign file
            detail = [line for line in str(err).splitlines() if line.strip() and "weights_only" not in line.lower()
                      and "weights only" not in line.lower() and "documentation" not in line]
            raise UserError(f"{path}: not a readable ColIntern checkpoint (UnpicklingError: "
                            f"{detail[-1].strip() if detail else 'not a torch.save file'})") from None
        raise UserError(f"{path}: refusing to load: it holds Python objects other than tensors and plain values, "
                        "which could run code when unpickled (ColIntern checkpoints never do); use a checkpoint "
                        "written by train.py") from None
    except Exception as err:  # noqa: BLE001 - pickle/zip errors come in many types
        raise UserError(f"{path}: not a readable ColIntern checkpoint ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(payload, dict) or "format_version" not in payload or "config" not in payload:
        raise UserError(f"{path}: not a ColIntern checkpoint (no format_version/config)")
    if payload["format_version"] > FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {payload['format_version']} is newer than this ColIntern "
                        f"supports ({FORMAT_VERSION}); upgrade colintern")
    kind = payload.get("task", "retrieval")
    if task != "any" and kind != task:
        if kind == "itr":
            raise UserError(f"{path} is an image-text retrieval checkpoint (train.py --task itr): it has no page "
                            "retrieval head; evaluate it with eval.py --itr_dataset, or pass a checkpoint of "
                            "train.py without --task itr")
        raise UserError(f"{path} is a page retrieval checkpoint, not an image-text one (train.py --task itr)")
    return payload


def base_model_of(payload: dict[str, Any], ckpt: str) -> str:
    """The base model a checkpoint was trained on, as something loadable from here: an absolute folder or a hub id.

    Checkpoints before this rule recorded --model_id as typed, e.g. the relative `outputs/tiny`: such a path is
    taken relative to the working directory, then to each folder above the checkpoint (where training most likely
    ran); otherwise it is a hub id (loading says so when it is not, and --model_id overrides it)."""
    base = payload["config"].get("base_model") or ""
    if not base:
        raise UserError(f"{ckpt}: the checkpoint names no base model; pass --model_id")
    return resolve_recorded_model(base, ckpt)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """An ORG/NAME on the Hub, not a path on this machine (what a model card or mteb may name as a model or dataset)."""
    return bool(HUB_ID.match(name)) and not Path(name).exists()


def resolve_recorded_model(base: str, recorded_in: str | Path) -> str:
    """A base model recorded in a file (a checkpoint, an index.json): an absolute folder or hub id as is; a relative
    folder found from the working directory or from a folder above `recorded_in`, made absolute."""
    if os.path.isabs(base) or os.path.isdir(base):
        return recorded_model_id(base)
    for folder in Path(recorded_in).resolve().parents:
        if (folder / base).is_dir():
            log.info("%s records the base model as %s (relative): using %s", recorded_in, base, folder / base)
            return str(folder / base)
    return base


def recorded_model_id(model_id: str) -> str:
    """What a checkpoint records as its base model: a local folder as an absolute path (the checkpoint then works
    from any directory), a hub id as given."""
    return os.path.abspath(model_id) if os.path.isdir(model_id) else model_id


def check_compatible(payload: dict[str, Any], signature: dict[str, Any], path: str, dim: int | None = None,
                     weights: str = "", allow_other_base: bool = False) -> bool:
    """Fail clearly when a checkpoint was trained on another base model (architecture, or the same architecture
    with other weights) or dim. With allow_other_base, other weights only warn. Returns whether the weights match
    (True when either side has no fingerprint: checkpoints before fingerprints, weights in no known format)."""
    saved = payload["config"]
    saved_sig = saved.get("signature", {})
    diffs = [f"{k}: checkpoint {saved_sig.get(k)!r} vs model {signature.get(k)!r}"
             for k in sorted(set(saved_sig) | set(signature)) if saved_sig.get(k) != signature.get(k)]
    if diffs:
        raise UserError(f"{path} was trained on base model {saved.get('base_model')!r}, which does not match the "
                        f"model being loaded ({'; '.join(diffs[:3])}); pass the matching --model_id")
    if dim is not None and saved.get("dim") != dim:
        raise UserError(f"{path} has dim {saved.get('dim')}, but dim {dim} was asked for")
    saved_weights = saved.get("base_weights", "")
    if not saved_weights or not weights or saved_weights == weights:
        return True
    message = (f"{path} was trained on base model {saved.get('base_model')!r} (weights {saved_weights}), and the "
               f"model being loaded has the same architecture but other weights ({weights})")
    if not allow_other_base:
        raise UserError(f"{message}; pass the base model it was trained on, or --allow_other_base to use it anyway")
    log.warning("%s; --allow_other_base: using it anyway, its embeddings will differ from those it was trained "
                "to give", message)
    return False
