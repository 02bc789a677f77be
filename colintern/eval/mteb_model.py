"""ColIntern as an mteb 2.x encoder: late interaction (MaxSim) over text queries and page images.

    from colintern.eval.mteb_model import ColInternMTEB
    encoder = ColInternMTEB("OpenGVLab/InternVL3_5-1B-Instruct", ckpt="outputs/train/colintern_heads_epoch1.pt")
    mteb.evaluate(encoder, mteb.get_benchmark("ViDoRe(v1)").tasks, cache=mteb.ResultCache("outputs/eval/x"))

What mteb sees:
- `mteb_model_meta`: a ModelMeta declaring model_type ["late-interaction"], similarity "MaxSim", modalities
  ["image", "text"], embed_dim = the head's dim. Its name is "colintern/<model>[__<ckpt stem>]" and its revision
  a fingerprint of (model, checkpoint bytes, ColIntern config, dtype), so results of different checkpoints or
  settings never share an mteb cache folder.
- `encode(dataloader, prompt_type=...)`: a list of (L_i, dim) float32 CPU tensors, one per item, real tokens
  only (ragged, never padded). Pages are sorted by tile count and batched by ColIntern.encode_images; queries are
  formatted exactly once, by the ColIntern processor, from the checkpoint's config (query_prefix + text +
  n_augmentation x augmentation_token). The task's own prompt ("Find a screenshot ...") is not used, and nothing
  here adds a prefix or suffix (mteb's ColPali wrapper once added them twice).
- `similarity(qs, docs)`: `colintern.retriever.scoring.maxsim`, the exact sum-over-query-tokens MaxSim, computed on the
  model's device and returned on CPU.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType
from PIL import Image
from tqdm.auto import tqdm

from colintern.data.report import BadRowError
from colintern.data.images import decode_image
from colintern.device import resolve_device
from colintern.errors import UserError
from colintern.files import file_sha256, fingerprint
from colintern.retriever.token_pooling import pool_tokens
from colintern.backbones.processor import require_query_text
from colintern.retriever.scoring import maxsim

log = logging.getLogger("colintern.mteb")

PAGES_PER_WINDOW = 16  # pages decoded at once = batch_size x this (bounds memory on large corpora)


# ------------------------------------------------------------------------------------------------ metadata


def _slug(text: str) -> str:
    """A filesystem-safe name piece."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "model"


def model_display_name(model_id: str, ckpt: str | None) -> str:
    """'colintern/<model basename>[__<ckpt stem>]' (mteb wants 'org/name' and turns '/' into '__' on disk)."""
    name = _slug(Path(model_id.rstrip("/")).name)
    if ckpt:
        name += "__" + _slug(Path(ckpt).stem)
    return f"colintern/{name}"


def model_fingerprint(model_id: str, ckpt: str | None, config: dict[str, Any], dtype: str) -> str:
    """12 hex digits identifying what the embeddings mean: backbone, checkpoint bytes, formatting config, dtype."""
    model_key = str(Path(model_id).resolve()) if os.path.isdir(model_id) else model_id
    payload = {"model": model_key, "ckpt": file_sha256(ckpt) if ckpt else None, "config": config, "dtype": dtype}
    return fingerprint(payload, n=12)


def _load_from_meta(model_name: str, revision: str | None = None, **kwargs: Any) -> "ColInternMTEB":
    """ModelMeta.loader: rebuild the encoder from loader_kwargs (model_id, ckpt, dtype, ...)."""
    model_id = kwargs.pop("model_id")
    return ColInternMTEB(model_id, **kwargs)


# mteb tasks whose data a training set contains: mteb marks a model's results on them as not zero-shot. The ViDoRe
# v1 tasks built from DocVQA, InfoVQA, TAT-DQA and arXivQA share their sources with vidore/colpali_train_set (as
# mteb's own ColPali entries declare).
TRAINING_SET_TASKS = {
    "vidore/colpali_train_set": {"VidoreDocVQARetrieval", "VidoreInfoVQARetrieval", "VidoreTatdqaRetrieval",
                                 "VidoreArxivQARetrieval"},
}


def exported_head(model_id: str) -> str | None:
    """The head file of a folder written by search.py export_model (its training record names the data)."""
    from colintern.retriever.export import HEAD_FILE

    path = os.path.join(model_id, HEAD_FILE)
    return path if os.path.isfile(path) else None


def reference_file(meta: ModelMeta, repo_id: str, license: str, release_date: str, base_model: str) -> str:
    """mteb's reference implementation of an exported model, as the file a pull request to mteb would add under
    mteb/models/model_implementations/: the ModelMeta eval.py's encoder declares for that folder, named after its Hub
    repository, loaded through ColIntern. adapted_from: the base model when it is a Hub id (a local folder is
    nobody else's reference)."""
    from colintern.retriever.checkpoint import is_hub_id
    fields = meta.model_dump(exclude={"loader", "loader_kwargs", "name", "revision", "reference", "license",
                                      "release_date", "adapted_from"})
    shown = {"name": repo_id, "revision": None, "release_date": release_date, "license": license,
             "reference": f"https://huggingface.co/{repo_id}",
             "public_training_code": "https://github.com/colintern/colintern",
             "adapted_from": base_model if is_hub_id(base_model) else None,
             **{k: v for k, v in fields.items() if k != "public_training_code"}}
    body = "".join(f"    {k}={_literal(v)},\n" for k, v in shown.items() if k in ModelMeta.model_fields)
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", repo_id).strip("_").lower()
    return (f'''"""mteb reference implementation of {repo_id}: a ColIntern visual document retriever (written by search.py
export_model from the ModelMeta that eval.py's encoder declares for this model)."""
from __future__ import annotations

from mteb.models.model_meta import ModelMeta, ScoringFunction


def colintern_loader(model_name: str, revision: str | None = None, **kwargs):
    from colintern.eval.mteb_model import ColInternMTEB  # pip install colintern

    return ColInternMTEB(kwargs.pop("model_id", model_name), revision=revision, **kwargs)


{slug} = ModelMeta(
    loader=colintern_loader,
    loader_kwargs={{"model_id": {repo_id!r}}},
{body})
''')


def _literal(value: Any) -> str:
    """Python source of a ModelMeta field's value (sets sorted, the scoring function by name)."""
    if isinstance(value, ScoringFunction):
        return f"ScoringFunction.{value.name}"
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(repr(v) for v in sorted(value)) + "}" if value else "set()"
    return repr(value)


def training_datasets_of(ckpt: str | None) -> set[str] | None:
    """mteb's training_datasets for a checkpoint, from what its phases trained on (docs/CONTRACT.md §6): the mteb
    tasks each known training set overlaps; local or private data overlap none. None (unknown) for a checkpoint
    that does not record its data (written before it did) or no checkpoint at all."""
    if not ckpt or not os.path.isfile(ckpt):
        return None
    from colintern.retriever.checkpoint import load_checkpoint

    datasets = (load_checkpoint(ckpt).get("training") or {}).get("datasets")
    if datasets is None:
        return None
    return set().union(*(TRAINING_SET_TASKS.get(name.lower(), set()) for name in datasets))


def colintern_model_meta(model_id: str, ckpt: str | None, *, revision: str, dim: int, n_parameters: int | None,
                         loader_kwargs: dict[str, Any] | None = None, embedding: str = "multi",
                         training_datasets: set[str] | None = None) -> ModelMeta:
    """The mteb ModelMeta of a ColIntern model, text + image: late interaction scored by MaxSim, or (a
    single-vector checkpoint) a dense model scored by the dot product."""
    single = embedding == "single"
    return ModelMeta(
        loader=_load_from_meta,  # type: ignore[arg-type]  # mteb types the loader by its own protocols
        loader_kwargs={"model_id": model_id, "ckpt": ckpt, **(loader_kwargs or {})},
        name=model_display_name(model_id, ckpt),
        revision=revision,
        release_date=None,
        languages=None,
        n_parameters=n_parameters,
        memory_usage_mb=None,
        max_tokens=None,
        embed_dim=dim,
        license=None,
        open_weights=True,
        public_training_code=None,
        public_training_data=None,
        framework=["PyTorch", "Transformers"],
        reference=None,
        similarity_fn_name=ScoringFunction.DOT_PRODUCT if single else ScoringFunction.MAX_SIM,
        use_instructions=True,  # a fixed query format (prefix + augmentation tokens) from the checkpoint config
        training_datasets=training_datasets,
        adapted_from=model_id,
        modalities=["image", "text"],
        model_type=["dense"] if single else ["late-interaction"],
    )


# ------------------------------------------------------------------------------------------------ images


def page_cost(processor: Any, value: Any, where: str) -> int:
    """The page's encoding cost (tokens) from its image header, without decoding pixels."""
    if isinstance(value, Image.Image):
        return processor.page_cost(value)
    data = value
    if isinstance(value, dict):
        data = value.get("bytes") or value.get("path")
    if isinstance(data, (bytes, bytearray, memoryview)):
        source: Any = io.BytesIO(bytes(data))
    elif isinstance(data, (str, os.PathLike)):
        if not os.path.isfile(data):
            raise BadRowError(where, f"missing image: file not found: {data}")
        source = data
    else:
        raise BadRowError(where, f"missing image: unsupported image value of type {type(value).__name__}")
    try:
        with Image.open(source) as image:  # lazy: only the header is read
            if min(image.size) <= 0:
                raise BadRowError(where, f"empty image: {image.size[0]}x{image.size[1]} pixels")
            return processor.page_cost(image)
    except BadRowError:
        raise
    except Exception as err:  # PIL raises many types for corrupt headers
        raise BadRowError(where, f"corrupt image: {type(err).__name__}: {err}") from None


# ------------------------------------------------------------------------------------------------ encoder


class ColInternMTEB(AbsEncoder):
    """mteb encoder around a ColIntern model (or anything with encode_images / encode_queries / processor)."""

    def __init__(self, model_name: str, revision: str | None = None, *, device: str | None = None,
                 ckpt: str | None = None, dtype: str | None = None, max_tiles: int | None = None,
                 batch_size: int = 8, query_batch_size: int = 32, use_flash_attn: bool = False,
                 model: Any = None, show_progress: bool = True, allow_other_base: bool = False,
                 pool_factor: int = 1) -> None:
        """Load model_name (hub id or local dir) + optional checkpoint, or wrap an already built `model`."""
        from colintern.retriever.model import resolve_dtype

        self.model_id = model_name
        self.ckpt = ckpt
        self.pool_factor = pool_factor  # hierarchical token pooling of pages (colintern/retriever/token_pooling.py)
        self.device = resolve_device(device)
        self.dtype = str(resolve_dtype(dtype, self.device)).replace("torch.", "")
        if model is None:
            from colintern.retriever.model import ColIntern

            log.info("loading %s%s on %s (%s)", model_name, f" + {ckpt}" if ckpt else "", self.device, self.dtype)
            model = ColIntern.from_pretrained(model_name, ckpt=ckpt, device=self.device, dtype=dtype,
                                              use_flash_attn=use_flash_attn, max_tiles=max_tiles,
                                              allow_other_base=allow_other_base)
        self.model = model
        self.batch_size = batch_size
        self.query_batch_size = query_batch_size
        self.show_progress = show_progress
        config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
        self.config = config
        n_parameters = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else None
        meaning = {**config, "pool_factor": pool_factor} if pool_factor > 1 else config  # pooled pages differ
        fingerprint = revision or model_fingerprint(model_name, ckpt, meaning, self.dtype)
        self.mteb_model_meta = colintern_model_meta(
            model_name, ckpt, revision=fingerprint, dim=int(config["dim"]), n_parameters=n_parameters,
            loader_kwargs={"dtype": dtype, "max_tiles": max_tiles, "batch_size": batch_size,
                           "query_batch_size": query_batch_size, "pool_factor": pool_factor},
            embedding=str(config.get("embedding", "multi")),
            training_datasets=training_datasets_of(ckpt or exported_head(model_name)))
        self._warned_text_pages = False
        self._page_cache: tuple[str, list[torch.Tensor]] | None = None

    # -- mteb interface ---------------------------------------------------------------------------------
    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,  # type: ignore[override]
               prompt_type: PromptType | None = None, **kwargs: Any) -> list[torch.Tensor]:
        """A dataloader of queries (text) or pages (image) -> list of (L_i, dim) float32 CPU tensors."""
        dataset = inputs.dataset
        columns = set(getattr(dataset, "column_names", None) or [])
        if not columns:  # not a datasets.Dataset: gather the batches
            columns, dataset = self._gather(inputs)
        show = bool(kwargs.get("show_progress_bar", True)) and self.show_progress
        name = task_metadata.name
        if prompt_type == PromptType.query or "image" not in columns:
            if "image" in columns:
                raise UserError(f"{name}: queries are images; ColIntern encodes text queries and page images only")
            if "text" not in columns:
                raise UserError(f"{name}: no text column in the {prompt_type.value if prompt_type else ''} input "
                                f"(columns: {sorted(columns)})")
            texts = list(dataset["text"])
            return self.encode_queries(texts, show=show, where=f"{name} ({hf_subset}/{hf_split}) query")
        if "text" in columns and not self._warned_text_pages:
            log.warning("%s: documents have text and an image; ColIntern encodes the page image only", name)
            self._warned_text_pages = True
        return self.encode_pages(dataset, show=show, where=f"{name} ({hf_subset}/{hf_split}) corpus",
                                 cache_key=f"{name}/{hf_split}")

    def similarity(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """Exact MaxSim: (len(embeddings1), len(embeddings2)) float32 on CPU."""
        return maxsim(_as_list(embeddings1), _as_list(embeddings2), device=self.score_device)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """MaxSim of each pair (embeddings1[i], embeddings2[i]) -> (N,) float32."""
        a, b = _as_list(embeddings1), _as_list(embeddings2)
        if len(a) != len(b):
            raise ValueError(f"similarity_pairwise needs equal lengths, got {len(a)} and {len(b)}")
        return torch.stack([maxsim([q], [d], device=self.score_device)[0, 0] for q, d in zip(a, b)]) \
            if a else torch.zeros(0)

    @property
    def score_device(self) -> str:
        return str(self.device)

    # -- encoding -------------------------------------------------------------------------------------------
    def encode_queries(self, texts: Sequence[str], show: bool = True, where: str = "query") -> list[torch.Tensor]:
        """Raw query strings -> embeddings; the ColIntern processor adds the prefix/augmentation, once."""
        for i, text in enumerate(texts):
            require_query_text(text, f"{where} {i}")
        return self.model.encode_queries(list(texts), batch_size=self.query_batch_size, show_progress=show)

    def encode_pages(self, dataset: Any, show: bool = True, where: str = "corpus",
                     cache_key: str | None = None) -> list[torch.Tensor]:
        """Page images of a datasets.Dataset (or {"image": [...], "id": [...]}) -> embeddings, in input order.

        Costs (tiles) come from the image headers; pages are then decoded a window at a time, most tiles first,
        so similar pages share a batch and at most batch_size x PAGES_PER_WINDOW decoded pages are in memory.
        The last corpus is remembered (keyed by cache_key + ids + image bytes): the language subsets of a
        multilingual ViDoRe task share one corpus, which is then encoded once.
        """
        values = _raw_image_column(dataset)
        n = len(values)
        columns = dataset.column_names if hasattr(dataset, "column_names") else list(dataset)
        ids = [str(i) for i in dataset["id"]] if "id" in columns else None

        def label(i: int) -> str:
            return f"{where} row {i}" + (f" (id {ids[i]!r})" if ids is not None else "")

        processor = self.model.processor
        digest = hashlib.sha256(repr(cache_key).encode())
        costs = []
        for i in range(n):
            costs.append(page_cost(processor, values[i], label(i)))
            digest.update(f"{ids[i] if ids else i}\0".encode())
            digest.update(_image_identity(values[i]))
        key = digest.hexdigest()
        if self._page_cache is not None and self._page_cache[0] == key:
            log.info("%s: same %d pages as the previous subset; reusing their embeddings", where, n)
            return list(self._page_cache[1])
        self._page_cache = None
        order = sorted(range(n), key=lambda i: -costs[i])
        window = max(1, self.batch_size * PAGES_PER_WINDOW)
        out: list[torch.Tensor | None] = [None] * n
        start_time = time.perf_counter()
        with tqdm(total=n, desc="encode pages", unit="page", disable=not show, dynamic_ncols=True) as bar:
            for start in range(0, n, window):
                idx = order[start:start + window]
                pages = [decode_image(values[i], label(i)) for i in idx]
                embs = self.model.encode_images(pages, batch_size=self.batch_size, show_progress=False)
                for i, emb in zip(idx, embs):
                    out[i] = pool_tokens(emb, self.pool_factor) if self.pool_factor > 1 else emb
                bar.update(len(idx))
                bar.set_postfix(tokens_per_page=sum(costs[i] for i in idx) // len(idx))
        log.info("%s: encoded %d pages in %.1fs", where, n, time.perf_counter() - start_time)
        self._page_cache = (key, list(out))  # type: ignore[arg-type]  # every slot filled above
        return out  # type: ignore[return-value]

    @staticmethod
    def _gather(loader: Any) -> tuple[set[str], dict[str, list[Any]]]:
        """Concatenate a dataloader's batches into {column: list}."""
        columns: dict[str, list[Any]] = {}
        for batch in loader:
            for key, value in batch.items():
                columns.setdefault(key, []).extend(list(value))
        return set(columns), columns


def _image_identity(value: Any) -> bytes:
    """Bytes that identify an image value: its encoded bytes, or its path with size and mtime."""
    if isinstance(value, Image.Image):
        return f"{value.mode}{value.size}".encode() + value.tobytes()
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
        stat = os.stat(value)
        return f"{value}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    return repr(value).encode()


def _raw_image_column(dataset: Any) -> Any:
    """The image column without decoding: {"bytes", "path"} dicts for a datasets Image feature."""
    if isinstance(dataset, dict):
        return dataset["image"]
    import datasets

    feature = dataset.features.get("image")
    if isinstance(feature, datasets.Image) and feature.decode:
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    return dataset["image"]


def _as_list(embeddings: Any) -> list[torch.Tensor]:
    """Ragged list as is; a padded (N, L, dim) tensor is split into N (L, dim) items."""
    if isinstance(embeddings, torch.Tensor):
        if embeddings.ndim == 2:
            return [embeddings]
        return list(embeddings)
    return list(embeddings)
