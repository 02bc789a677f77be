"""Training examples and the epoch plan: queries with their positive and hard-negative pages (from a page
dataset or a triples file), which examples go into which micro-batch of every epoch (a pure function of seed,
epoch and position, so a resumed run repeats exactly what an uninterrupted one does), and checking every page
before training starts."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from colintern.data.report import BadRowError, SkipReport
from colintern.data.datasets import ImageResolver, clean_query, load_page_dataset, page_keys
from colintern.data.images import decode_image
from colintern.data.triples import read_triples_jsonl
from colintern.errors import UserError
from colintern.files import file_digest, sha1_of_parts


log = logging.getLogger("colintern.train")


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
        assert row is not None  # locate: a local file or a dataset row
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


def load_page(ref: PageRef, datasets: dict[tuple[str, str], Any]):
    """The RGB page behind a PageRef (BadRowError naming ref.label when it cannot be decoded)."""
    if ref.path is not None:
        return decode_image(ref.path, ref.label)
    assert ref.dataset is not None  # a PageRef is a file or a dataset row
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
