"""Reusable pieces of train.py: training examples, the epoch plan, the micro-batch loader, the frozen-backbone
hidden-state cache, the step loss, the logs and the resume bookkeeping.

Data flow of one optimizer step (docs/CONTRACT.md §5, §7):
    examples (query, positive page, hard negatives)  --epoch_plan-->  global micro-batches of W*B examples
    rank r takes rows r*B .. r*B+B-1 of each micro-batch; MicroBatches (a torch Dataset, so DataLoader workers
    can decode and process images in parallel) turns them into processed queries + the batch's distinct pages;
    train.py embeds them, `step_loss` gathers pages across ranks and applies late_interaction_loss.

Everything that decides the order of work is a pure function of (seed, epoch, position), so a resumed run
repeats exactly what an uninterrupted one does.
"""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from colintern.data import (BadRowError, ImageResolver, SkipReport, clean_query, decode_image, load_page_dataset,
                            page_keys, read_triples_jsonl)
from colintern.errors import UserError
from colintern.files import atomic_write_text, file_digest, note_path, sha1_of_parts

log = logging.getLogger("colintern.train")


# ---------------------------------------------------------------------------------------------------------
# Examples


@dataclass(frozen=True)
class PageRef:
    """Where a page comes from: a row of a dataset split or a local image file. `key` is its identity."""

    key: str                       # page identity: duplicates share it (exclusion, cache)
    label: str                     # how messages name it ("NAME row 3", "pages/a.png")
    dataset: tuple[str, str] | None = None  # (name, split) for dataset rows
    row: int = -1
    path: str | None = None        # local file


@dataclass(frozen=True)
class Example:
    """One training pair (+ hard negatives). `where` names its source row/line in messages."""

    query: str
    pos: PageRef
    negs: tuple[PageRef, ...]
    where: str


@dataclass
class TrainData:
    """Examples of one phase plus what identifies the data (for the checkpoint fingerprint)."""

    examples: list[Example]
    datasets: dict[tuple[str, str], Any]
    identity: dict[str, Any]
    kind: str                      # "hub" (in-batch) or "jsonl" (in-batch + hard negatives)


def load_hub_examples(name: str, split: str, report: SkipReport) -> TrainData:
    """Rows of a page dataset (hub id, local repository folder, save_to_disk dir, parquet) as examples.

    Queries are checked now (one column read); images are decoded lazily by the loader workers, so a corrupt
    image is reported when its batch is built, and its query is left out of that batch's loss.
    """
    dataset = load_page_dataset(name, split)
    keys = page_keys(dataset)
    queries = dataset["query"]
    examples = []
    for i, (query, key) in enumerate(zip(queries, keys)):
        where = f"{name} row {i}"
        try:
            text = clean_query(query, where)
        except BadRowError as err:
            report.add_error(err)
            continue
        examples.append(Example(text, PageRef(key, where, (name, split), i), (), where))
    if not examples:
        raise UserError(f"{name}: no usable rows ({report.summary()})")
    identity = {"kind": "hub", "split": split, "rows": len(dataset),
                "content": sha1_of_parts([e.query for e in examples], [e.pos.key for e in examples])}
    return TrainData(examples, {(name, split): dataset}, identity, "hub")


def load_jsonl_examples(path: str, root: str | None, report: SkipReport) -> TrainData:
    """Triples (docs/CONTRACT.md §7) as examples; pseudo-paths become dataset rows, other paths local files under root.

    Checked now: JSON, query, that local files exist and that pseudo-path rows are in range. A bad positive
    skips the line; a bad negative drops only that negative (both reported).
    """
    triples, _ = read_triples_jsonl(path, strict=report.strict, report=report)
    resolver = ImageResolver(root)
    key_cache: dict[tuple[str, str], list[str]] = {}

    def ref(p: str) -> PageRef:
        local, row = resolver.locate(p)  # relative paths live under --root; pseudo-paths name dataset rows
        if local is not None:
            return PageRef("file:" + str(local.resolve()), p, path=str(local))
        name, split, index = row
        dataset = resolver.dataset(name, split)
        if (name, split) not in key_cache:
            key_cache[(name, split)] = page_keys(dataset)
        return PageRef(f"{name}/{split}:" + key_cache[(name, split)][index], p, (name, split), index)

    examples = []
    for t in triples:
        where = f"{path} line {t.line}"
        try:
            pos = ref(t.pos)
        except BadRowError as err:
            report.add(where, f"{err.reason} (pos {t.pos})")
            continue
        negs = []
        for n in t.negs:
            try:
                neg = ref(n)
            except BadRowError as err:
                report.add(where, f"{err.reason} (negative {n})")
                continue
            if neg.key != pos.key:  # a negative that is the positive itself is not a negative
                negs.append(neg)
        examples.append(Example(t.query, pos, tuple(negs), where))
    if not examples:
        raise UserError(f"{path}: no usable triples ({report.summary()})")
    digest = file_digest(path, "sha1")  # stored in checkpoints: the algorithm must not change
    identity = {"kind": "jsonl", "lines": len(triples), "content": digest}
    datasets = {k: resolver.dataset(*k) for k in key_cache}
    return TrainData(examples, datasets, identity, "jsonl")


# ---------------------------------------------------------------------------------------------------------
# The plan: which examples go into which micro-batch, for every epoch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a permutation from a generator seeded with (seed, epoch)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2 ** 63))
    return torch.randperm(n, generator=g).tolist()


@dataclass
class Plan:
    """Micro-batches of one epoch. micro[j] holds W*B example indices; rank r uses micro[j][r*B:(r+1)*B]."""

    micro: list[list[int]]
    batch_size: int
    world_size: int
    grad_accum: int

    @property
    def steps(self) -> int:
        return len(self.micro) // self.grad_accum

    def rank_rows(self, j: int, rank: int) -> list[int]:
        b = self.batch_size
        return self.micro[j][rank * b:(rank + 1) * b]


def make_plan(n: int, seed: int, epoch: int, batch_size: int, world_size: int, grad_accum: int) -> Plan:
    """Split the epoch's permutation into whole optimizer steps (the incomplete tail is dropped)."""
    order = epoch_order(n, seed, epoch)
    global_batch = batch_size * world_size
    steps = n // (global_batch * grad_accum)
    micro = [order[j * global_batch:(j + 1) * global_batch] for j in range(steps * grad_accum)]
    return Plan(micro, batch_size, world_size, grad_accum)


# ---------------------------------------------------------------------------------------------------------
# Pages: decoding, and checking every page before training starts


def load_page(ref: PageRef, datasets: dict[tuple[str, str], Any]):
    """The RGB page behind a PageRef (BadRowError naming ref.label when it cannot be decoded)."""
    if ref.path is not None:
        return decode_image(ref.path, ref.label)
    return decode_image(datasets[ref.dataset][ref.row]["image"], ref.label)


def check_pages(examples: Sequence[Example], datasets: dict[tuple[str, str], Any], num_negs: int,
                workers: int, show_progress: bool = True) -> dict[str, tuple[str, str]]:
    """Decode every distinct page the examples train on (positives and their first num_negs negatives), in
    `workers` threads (decoding releases the GIL): {page key: (label, reason)} of the pages that fail. Run before
    training, so every bad page is reported up front, not when (or if) a batch reaches it."""
    refs: dict[str, PageRef] = {}
    for e in examples:
        for ref in (e.pos, *e.negs[:num_negs]):
            refs.setdefault(ref.key, ref)

    def check(ref: PageRef) -> tuple[str, tuple[str, str]] | None:
        try:
            load_page(ref, datasets)
        except BadRowError as err:
            return ref.key, (err.where, err.reason)
        return None

    bad: dict[str, tuple[str, str]] = {}
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="colintern-check") as pool, \
            tqdm(total=len(refs), desc="check pages", unit="page", disable=not show_progress,
                 dynamic_ncols=True) as bar:
        for result in pool.map(check, refs.values()):
            if result is not None:
                bad[result[0]] = result[1]
            bar.update(1)
    return bad


# ---------------------------------------------------------------------------------------------------------
# Micro-batches (built in DataLoader workers)


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


# ---------------------------------------------------------------------------------------------------------
# Hidden-state cache of a frozen backbone


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
        self._file = None
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


# ---------------------------------------------------------------------------------------------------------
# The loss of one step


def pad_cat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (emb (b, ..., L, D), mask (b, ..., L)) along dim 0, right-padding the token axis L with zeros
    and False (differentiable; padding never takes part in a score). The one concatenate-and-pad helper."""
    lmax = max(e.shape[-2] for e, _ in parts)
    embs = [F.pad(e, (0, 0, 0, lmax - e.shape[-2])) for e, _ in parts]
    masks = [F.pad(m, (0, lmax - m.shape[-1])) for _, m in parts]
    return torch.cat(embs, 0), torch.cat(masks, 0)


def exclude_matrix(row_keys: Sequence[str], col_keys: Sequence[str], offset: int) -> torch.Tensor:
    """(B, C) bool: True where column c holds the same page as query b's positive (c != b + offset).

    Several queries can share a page (colpali_train_set); such a duplicate must not count as a negative.
    """
    ids: dict[str, int] = {}
    r = torch.tensor([ids.setdefault(k, len(ids)) for k in row_keys], dtype=torch.long)
    c = torch.tensor([ids.setdefault(k, len(ids)) for k in col_keys], dtype=torch.long)
    ex = r[:, None] == c[None, :]  # (B, C)
    ex[torch.arange(len(row_keys)), torch.arange(len(row_keys)) + offset] = False
    return ex


def step_loss(parts: list[tuple[torch.Tensor, torch.Tensor]], batches: list[dict[str, Any]], *, num_negs: int,
              rank: int, all_keys: list[str], gather, loss_fn, loss_kwargs: dict[str, Any]) -> torch.Tensor:
    """Contrastive loss of this rank's queries of one step (one or, with GradCache, several micro-batches).

    parts: per micro-batch [(query emb (B, Lq, D), mask), (page table (U+1, L, D), mask)], in that order.
    all_keys: the positive page keys of every rank's rows of these micro-batches, in gathered order (rank-major),
    used to exclude duplicates of a query's positive page. Queries whose positive could not be decoded are left
    out (their page slot stays in the gathered batch as an empty, never-scored doc).
    """
    qs, ds, ns, valid = [], [], [], []
    for m, batch in enumerate(batches):
        q, q_mask = parts[2 * m]
        table, t_mask = parts[2 * m + 1]
        pos = batch["pos_row"].to(table.device)
        qs.append((q, q_mask))
        ds.append((table[pos], t_mask[pos]))  # (B, L, D)
        if num_negs:
            neg = batch["neg_row"].to(table.device)
            ns.append((table[neg], t_mask[neg]))  # (B, K, L, D)
        bad = batch["bad"]
        valid.extend(int(p) not in bad for p in batch["pos_row"].tolist())
    q, q_mask = pad_cat(qs)  # (n, Lq, D)
    d, d_mask = pad_cat(ds)  # (n, Ld, D)
    n = q.shape[0]
    d_all, d_all_mask = gather(d, d_mask)  # (W*n, L, D)
    offset = rank * n
    exclude = exclude_matrix(all_keys[offset:offset + n], all_keys, offset).to(q.device)  # (n, W*n)
    neg = neg_mask = None
    if num_negs:
        neg, neg_mask = pad_cat(ns)  # (n, K, Ln, D)
    if not all(valid):
        keep = torch.tensor(valid, device=q.device)
        if not keep.any():
            return d_all.sum() * 0.0 + q.sum() * 0.0  # nothing to learn here; keep the collectives in step
        rows = keep.nonzero().squeeze(1)
        cols = torch.arange(d_all.shape[0], device=q.device)
        block = torch.cat([rows, (~keep).nonzero().squeeze(1)]) + offset
        cols[offset:offset + n] = block  # this rank's valid positives first, so positive b sits at offset + b
        d_all, d_all_mask, exclude = d_all[cols], d_all_mask[cols], exclude[:, cols][rows]
        q, q_mask = q[rows], q_mask[rows]
        if num_negs:
            neg, neg_mask = neg[rows], neg_mask[rows]
    return loss_fn(q, q_mask, d_all, d_all_mask, neg, neg_mask, offset=offset, exclude=exclude, **loss_kwargs)


# ---------------------------------------------------------------------------------------------------------
# Learning-rate schedule


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total` (transformers' linear schedule)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


# ---------------------------------------------------------------------------------------------------------
# RNG state (checkpointed so that a resumed run draws the same dropout masks)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        # the training device's generator only: a resume may see fewer (or other) GPUs than were visible here
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # checkpoints before: one state per GPU visible then
            index = torch.cuda.current_device()
            if index >= len(cuda):
                log.warning("the checkpoint holds CUDA RNG states for %d GPU(s), none for cuda:%d: dropout draws "
                            "differ from an uninterrupted run", len(cuda), index)
                cuda = None
            else:
                cuda = cuda[index]
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)  # the current (training) device
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state({"bit_generator": npst["bit_generator"],
                         "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
                         "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# Logs: training_loss.txt and metrics.jsonl (docs/CONTRACT.md §8)


LOSS_TXT = "training_loss.txt"
METRICS_JSONL = "metrics.jsonl"


def format_loss_line(step: int, epoch: int, loss: float, lr: float, grad_norm: float, pairs_per_s: float) -> str:
    return (f"step {step} | epoch {epoch} | loss {loss:.6f} | lr {lr:.3e} | grad_norm {grad_norm:.4f} | "
            f"pairs/s {pairs_per_s:.1f}")


def _line_step(line: str, is_json: bool) -> int | None:
    try:
        if is_json:
            return int(json.loads(line)["step"])
        if line.startswith("step "):
            return int(line.split("|", 1)[0].split()[1])
    except (ValueError, KeyError, IndexError, json.JSONDecodeError):
        return None
    return None


def prepare_logs(out_dir: str, resume_step: int | None) -> None:
    """Start fresh logs (resume_step None) or keep only steps <= resume_step, so a resumed run appends without
    duplicating the steps it repeats. Notes (lines starting with '# ') are kept."""
    for name, is_json in ((LOSS_TXT, False), (METRICS_JSONL, True)):
        path = Path(out_dir) / name
        if resume_step is None or not path.exists():
            path.write_text("", encoding="utf-8")
            continue
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            step = _line_step(line, is_json)
            if step is None and (is_json or not line.startswith("# ")):
                continue  # a half-written last line of a killed run
            if step is None or step <= resume_step:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def append_line(out_dir: str, name: str, line: str) -> None:
    path = Path(out_dir) / name
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
    except OSError as err:
        raise note_path(err, path)


# ---------------------------------------------------------------------------------------------------------
# Fault injection for tests: COLINTERN_FAULT="kill@7" (SIGKILL after step 7), "nan@3" (NaN loss at step 3),
# "save_error@4" (writing the checkpoint of step 4 fails), "raise@5" (an exception after step 5).


def fault(kind: str, step: int) -> bool:
    spec = os.environ.get("COLINTERN_FAULT", "")
    for item in spec.split(","):
        name, _, at = item.partition("@")
        if name == kind and at and int(at) == step:
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            return True
    return False


class FailOnSave:
    """Put in a checkpoint payload to make torch.save fail halfway through writing (the "save_error" fault)."""

    def __reduce__(self):
        raise OSError(28, "No space left on device (injected)")


@dataclass
class Fingerprint:
    """What a checkpoint's training state must match to continue the same phase."""

    phase_id: str
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> str:
        return sha1_of_parts(self.phase_id, self.args)


def diff_args(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [f"--{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


# ---------------------------------------------------------------------------------------------------------
# Embedding a micro-batch (LoRA: with grad through the backbone; heads-only: cached frozen hidden states)


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


# ---------------------------------------------------------------------------------------------------------
# auto-batch: the largest micro-batch whose forward+backward fits in a share of GPU memory


def is_out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError, or the plain RuntimeError("CUDA out of memory") some kernels raise instead."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                             and "out of memory" in str(err).lower())


def probe_batch_size(embed_step, params: list[torch.nn.Parameter], *, max_batch: int,
                     target_frac: float, device: torch.device, extra_bytes: int = 0) -> tuple[int, list[str]]:
    """Largest b <= max_batch with peak memory of embed_step(b) (forward + backward) <= target_frac of the GPU.

    Doubling from 1 until a probe fails or exceeds the target, then bisection; a CUDA OOM counts as "too big"
    and is survived. extra_bytes (e.g. the optimizer state still to be allocated) is added to every peak.
    Returns (batch size, one note per probe).
    """
    total = torch.cuda.get_device_properties(device).total_memory
    budget = target_frac * total
    notes: list[str] = []
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all()

    def fits(b: int) -> bool:
        for p in params:
            p.grad = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            embed_step(b)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) + extra_bytes
            ok = peak <= budget
            notes.append(f"batch {b}: peak {peak / 2**30:.2f} GiB ({'fits' if ok else 'over'} "
                         f"{budget / 2**30:.2f} GiB)")
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(err):
                raise  # a real error, not memory
            ok = False
            notes.append(f"batch {b}: out of memory")
        finally:
            for p in params:
                p.grad = None
            torch.cuda.empty_cache()
        return ok

    try:
        good, bad, b = 0, max_batch + 1, 1
        while True:  # doubling until the first failure (or max_batch)
            if not fits(b):
                bad = b
                break
            good = b
            if b >= max_batch:
                break
            b = min(2 * b, max_batch)
        while bad - good > 1:  # bisection between the last fit and the first failure
            mid = (good + bad) // 2
            if fits(mid):
                good = mid
            else:
                bad = mid
    finally:
        torch.set_rng_state(cpu_rng)
        torch.cuda.set_rng_state_all(cuda_rng)
    if good == 0:
        raise UserError(f"auto_batch: even a batch of 1 does not fit in {target_frac:.0%} of GPU memory "
                        f"({'; '.join(notes)}); lower --max_tiles, use --lora with --gradient_checkpointing, "
                        "or raise --auto_target_frac")
    return good, notes
