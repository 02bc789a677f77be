"""Micro-batches and their embeddings: MicroBatches (a torch Dataset, so DataLoader workers decode and process
images in parallel) turns planned rows into processed queries and the batch's distinct pages; Embedder runs them
through the model (LoRA: with grad through the backbone; heads-only: frozen hidden states from HiddenCache)."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, BinaryIO, Sequence

import numpy as np
import torch

from colintern.data.report import BadRowError
from colintern.train.examples import Example, PageRef, load_page


log = logging.getLogger("colintern.train")


class MicroBatches(torch.utils.data.Dataset):
    """Item j = this rank's part of micro-batch j, processed: queries + the batch's distinct pages.

    Returned dict:
      queries:   processor output for the B queries; query_texts: their texts
      keys:      the U distinct page keys of the batch (positives first, then negatives)
      pos_row:   (B,) long, row of each query's positive in the page table (U rows + 1 empty row, index U)
      neg_row:   (B, K) long, rows of its hard negatives (U where it has fewer than K)
      loaded:    indices u of the pages whose pixels are in `pages` (in that order)
      pages:     processor output for the loaded pages, or None
      bad:       {u: (where, reason)} pages that could not be decoded
      where:     the B examples' source names
    Pages in `skip_keys` (already in the hidden-state cache) are not decoded at all.
    """

    def __init__(self, examples: Sequence[Example], rows: list[list[int]], processor: Any, num_negs: int,
                 datasets: dict[tuple[str, str], Any], skip_keys: frozenset[str] = frozenset()):
        self.examples = examples
        self.rows = rows
        self.processor = processor
        self.num_negs = num_negs
        self.datasets = datasets
        self.skip_keys = skip_keys

    def __len__(self) -> int:
        return len(self.rows)


    def __getitem__(self, j: int) -> dict[str, Any]:
        exs = [self.examples[i] for i in self.rows[j]]
        keys: list[str] = []
        refs: list[PageRef] = []
        index: dict[str, int] = {}

        def slot(ref: PageRef) -> int:
            if ref.key not in index:
                index[ref.key] = len(keys)
                keys.append(ref.key)
                refs.append(ref)
            return index[ref.key]

        pos = [slot(e.pos) for e in exs]
        negs = [[slot(n) for n in e.negs[:self.num_negs]] for e in exs]
        empty = len(keys)
        neg_row = torch.full((len(exs), self.num_negs), empty, dtype=torch.long)  # (B, K)
        for b, row in enumerate(negs):
            neg_row[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        images, loaded, bad = [], [], {}
        for u, ref in enumerate(refs):
            if "p:" + ref.key in self.skip_keys:
                continue
            try:
                images.append(load_page(ref, self.datasets))
                loaded.append(u)
            except BadRowError as err:
                bad[u] = (err.where, err.reason)
        return {
            "queries": self.processor.process_queries([e.query for e in exs]),
            "query_texts": [e.query for e in exs],
            "keys": keys,
            "pos_row": torch.tensor(pos, dtype=torch.long),
            "neg_row": neg_row,
            "loaded": loaded,
            "pages": self.processor.process_images(images) if images else None,
            "bad": bad,
            "where": [e.where for e in exs],
            "pos_label": [e.pos.label for e in exs],
        }


def _identity(x: Any) -> Any:
    return x


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode and resize images; leave the cores to the model


def make_loader(dataset: MicroBatches, num_workers: int, prefetch_factor: int, pin_memory: bool):
    """A DataLoader over whole micro-batches, in order; it never draws from the global RNG (resume exactness)."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, worker_init_fn=_worker_init, persistent_workers=False)
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                                       collate_fn=_identity, pin_memory=pin_memory,
                                       generator=torch.Generator().manual_seed(0), **kwargs)


class HiddenCache:
    """Last hidden states of the kept tokens, (n, H) per key: in CPU memory up to mem_bytes, then in a file on disk
    up to disk_bytes, then not cached (recomputed). Entries are never evicted, so what is cached is a pure
    function of the order of insertions (which a resumed run replays). Values keep the model's dtype (bf16 on
    GPU, fp32 on CPU), so a cached value is exactly the value that was computed."""

    def __init__(self, mem_bytes: int, disk_bytes: int = 0, disk_path: str | None = None):
        self.mem_bytes, self.disk_bytes, self.disk_path = mem_bytes, disk_bytes, disk_path
        self.mem: dict[str, torch.Tensor] = {}
        self.disk: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        self.mem_used = self.disk_used = 0
        self.hits = self.misses = 0
        self._file: BinaryIO | None = None
        self._full_logged = False

    def __contains__(self, key: str) -> bool:
        return key in self.mem or key in self.disk

    def __len__(self) -> int:
        return len(self.mem) + len(self.disk)

    def keys(self) -> frozenset[str]:
        return frozenset(self.mem) | frozenset(self.disk)

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.mem:
            self.hits += 1
            return self.mem[key]
        if key in self.disk:
            self.hits += 1
            offset, shape, dtype = self.disk[key]
            nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
            assert self._file is not None  # written before it is read
            buf = bytearray(os.pread(self._file.fileno(), nbytes, offset))
            return torch.frombuffer(buf, dtype=dtype).view(shape)
        self.misses += 1
        return None

    def put(self, key: str, value: torch.Tensor) -> None:
        if key in self:
            return
        value = value.detach()
        nbytes = value.numel() * value.element_size()
        if self.mem_used + nbytes <= self.mem_bytes:
            self.mem[key] = value.to("cpu", copy=True)
            self.mem_used += nbytes
        elif self.disk_path and self.disk_used + nbytes <= self.disk_bytes:
            if self._file is None:
                os.makedirs(os.path.dirname(self.disk_path) or ".", exist_ok=True)
                self._file = open(self.disk_path, "w+b")  # noqa: SIM115 - lives as long as the cache
            cpu = value.to("cpu").contiguous()
            raw = cpu.view(torch.uint8) if cpu.dtype != torch.uint8 else cpu
            self._file.seek(self.disk_used)
            self._file.write(raw.numpy().tobytes())
            self._file.flush()
            self.disk[key] = (self.disk_used, tuple(cpu.shape), cpu.dtype)
            self.disk_used += nbytes
        elif not self._full_logged:
            self._full_logged = True
            log.info("hidden-state cache full (%.2f GB memory, %.2f GB disk): further items are recomputed",
                     self.mem_used / 1e9, self.disk_used / 1e9)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            if self.disk_path and os.path.exists(self.disk_path):
                os.unlink(self.disk_path)


def pad_rows(rows: list[torch.Tensor | None], hidden: int, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged (n_i, H) rows (None = empty) -> (N, Lmax, H) zeros-padded and the (N, Lmax) bool mask."""
    lmax = max([1] + [r.shape[0] for r in rows if r is not None])
    out = torch.zeros(len(rows), lmax, hidden, dtype=dtype, device=device)  # (N, Lmax, H)
    mask = torch.zeros(len(rows), lmax, dtype=torch.bool, device=device)  # (N, Lmax)
    for i, r in enumerate(rows):
        if r is not None and r.shape[0]:
            out[i, :r.shape[0]] = r.to(device=device, dtype=dtype)
            mask[i, :r.shape[0]] = True
    return out, mask


class Embedder:
    """Turns a MicroBatches item into (query emb, mask) and a page table (U+1 rows, the last one empty).

    train_backbone=True (LoRA): hidden states with grad. False (heads only): the backbone is frozen, its hidden
    states come from `cache` when present, else are computed without grad and cached; only `embed` (the head)
    runs with grad. A value taken from the cache is bit-identical to the one computed, so caching changes speed,
    not results.
    """

    def __init__(self, model: Any, embed, train_backbone: bool, cache: HiddenCache | None):
        self.model = model
        self.embed = embed  # model.embed, or its torch.compile'd version
        self.train_backbone = train_backbone
        self.cache = cache if cache is not None else HiddenCache(0)
        self.hidden_size = model.config.hidden_size
        self.page_forward_s = 0.0  # seconds spent in backbone forwards (pages and queries)
        self.items_computed = 0  # items that went through the backbone

    def _dtype(self) -> torch.dtype:
        return next(self.model.backbone.parameters()).dtype

    def _frozen(self, keys: list[str], inputs: dict[str, torch.Tensor] | None, have: list[int],
                skip: set[int]) -> list[torch.Tensor | None]:
        """Kept-token hidden states (n_i, H) per key: cached, or computed over `inputs` (rows = `have`)."""
        fresh: dict[int, torch.Tensor] = {}
        if inputs is not None and any(keys[u] not in self.cache for u in have):
            start = time.perf_counter()
            with torch.no_grad():
                hidden = self.model.hidden_states(inputs)  # (n, L, H)
            keep = inputs["keep_mask"].to(hidden.device)
            for j, u in enumerate(have):
                if keys[u] not in self.cache:
                    value = hidden[j][keep[j]]  # (n_keep, H)
                    self.cache.put(keys[u], value)
                    fresh[u] = value
            self.page_forward_s += time.perf_counter() - start
            self.items_computed += len(have)
        rows: list[torch.Tensor | None] = []
        for u, key in enumerate(keys):
            if u in skip:
                rows.append(None)
                continue
            value = self.cache.get(key)
            if value is None:
                value = fresh.get(u)
            if value is None:
                raise RuntimeError(f"no hidden state for {key}: neither cached nor loaded")
            rows.append(value)
        return rows

    def queries(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Lq, D) float32 query embeddings and their (B, Lq) mask."""
        inputs = batch["queries"]
        if self.train_backbone:
            keep = inputs["keep_mask"].to(self.model.device)
            return self.embed(self.model.hidden_states(inputs), keep)
        keys = ["q:" + t for t in batch["query_texts"]]
        rows = self._frozen(keys, inputs, list(range(len(keys))), set())
        hidden, mask = pad_rows(rows, self.hidden_size, self._dtype(), self.model.device)
        return self.embed(hidden, mask)

    def pages(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Page table (U+1, L, D) float32 for the batch's distinct pages + one empty row, and its mask."""
        keys = ["p:" + k for k in batch["keys"]]
        n_u = len(keys)
        bad = set(batch["bad"])
        if self.train_backbone:
            loaded = batch["loaded"]
            dim = self.model.config.dim
            if batch["pages"] is None:
                empty = torch.zeros(n_u + 1, 1, dim, device=self.model.device)
                return empty, torch.zeros(n_u + 1, 1, dtype=torch.bool, device=self.model.device)
            start = time.perf_counter()
            keep = batch["pages"]["keep_mask"].to(self.model.device)  # (n, L)
            emb, keep = self.embed(self.model.hidden_states(batch["pages"]), keep)  # (n, L, D), (n, L)
            self.page_forward_s += time.perf_counter() - start
            self.items_computed += len(loaded)
            where = torch.full((n_u + 1,), len(loaded), dtype=torch.long)
            where[torch.tensor(loaded, dtype=torch.long)] = torch.arange(len(loaded))
            where = where.to(emb.device)
            table = torch.cat([emb, emb.new_zeros(1, *emb.shape[1:])])[where]  # (U+1, L, D)
            mask = torch.cat([keep, keep.new_zeros(1, keep.shape[1])])[where]  # (U+1, L)
            return table, mask
        rows = self._frozen(keys, batch["pages"], batch["loaded"], bad) + [None]
        hidden, mask = pad_rows(rows, self.hidden_size, self._dtype(), self.model.device)
        return self.embed(hidden, mask)
