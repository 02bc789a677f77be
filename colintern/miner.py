"""Hard-negative mining as a job (mine.py is its command line): encode the corpus once, search every query, write
the triples resumably, measure the approximation, merge shards.

    Miner(args)                  model, dataset, page plan, page store (encoded or reused), query pairs, method
    Miner.run()                  search -> PartialOutput (resumable lines) -> recall check -> meta -> final name
    merge_shards(out, n, keep)   join the shard files of a sharded run (the last shard to finish calls it)

The search itself is in `colintern/mining.py`, the page store in `colintern/page_store.py`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from colintern.device import resolve_device
from colintern.errors import UserError
from colintern.files import (atomic_write_json, byte_offset_of_line, count_complete_lines, file_lock, file_sha256,
                             fingerprint, make_output_dir)

log = logging.getLogger("colintern.mine")

SCORE_DOC = "sum over query tokens of the max over page tokens of the inner product (exact MaxSim)"


# ---------------------------------------------------------------- output paths and shards


def sorted_histogram(histogram: dict[str, int]) -> dict[str, int]:
    """{number of negatives (as a JSON key): lines} in increasing number."""
    return {k: histogram[k] for k in sorted(histogram, key=int)}


def format_histogram(histogram: dict[str, int]) -> str:
    """'0: 25 lines, 3: 4 lines, 8: 134 lines'."""
    return ", ".join(f"{n}: {lines} line{'s' if lines != 1 else ''}" for n, lines in histogram.items()) or "-"



def output_paths(out: str, shard_id: int, num_shards: int) -> dict[str, Path]:
    """Where this process writes: the final file (shard file when sharded), its partial, state and meta."""
    stem = out[:-len(".jsonl")] if out.endswith(".jsonl") else out
    final = Path(out) if num_shards == 1 else Path(f"{stem}.shard-{shard_id:05d}-of-{num_shards:05d}.jsonl")
    fstem = str(final)[:-len(".jsonl")] if str(final).endswith(".jsonl") else str(final)
    return {"final": final, "partial": Path(f"{final}.partial"), "state": Path(f"{final}.partial.json"),
            "meta": Path(f"{fstem}.meta.json"), "merged": Path(out), "merged_meta": Path(f"{stem}.meta.json"),
            "emb_dir": Path(f"{stem}.pages"), "merge_lock": Path(f"{stem}.merge.lock")}


def shard_files(out: str, num_shards: int) -> list[dict[str, Path]]:
    return [output_paths(out, i, num_shards) for i in range(num_shards)]


def _merged_recall(metas: list[dict[str, Any]]) -> dict[str, Any] | None:
    recalls = [m["candidate_recall"] for m in metas if m.get("candidate_recall")]
    if not recalls:
        return None
    merged = {key: sum(r[key] for r in recalls) for key in
              ("queries", "queries_with_negatives", "exact_negatives", "candidate_hits", "negatives_hits")}
    total = merged["exact_negatives"]
    return {**merged, "k": recalls[0]["k"],
            "candidate_recall": round(merged["candidate_hits"] / total, 6) if total else None,
            "negatives_overlap": round(merged["negatives_hits"] / total, 6) if total else None}


def merge_shards(out: str, num_shards: int, keep_pages: bool) -> dict[str, Any]:
    """Join the shard files into `out` (shard order = dataset order), merge their meta, remove the parts."""
    parts = shard_files(out, num_shards)
    missing = [str(p["final"]) for p in parts if not p["final"].is_file() or not p["meta"].is_file()]
    if missing:
        raise UserError(f"cannot merge {out}: {len(missing)} of {num_shards} shards are not finished "
                        f"(first missing: {missing[0]})")
    metas = [json.loads(p["meta"].read_text()) for p in parts]
    merged = Path(out)
    tmp = Path(f"{out}.partial")
    with open(tmp, "wb") as f:
        for p in parts:
            with open(p["final"], "rb") as src:
                shutil.copyfileobj(src, f)
        f.flush()
        os.fsync(f.fileno())
    meta = dict(metas[0])
    counts = {}
    for key, value in metas[0]["counts"].items():
        if key in ("queries", "lines", "fn_filtered", "short_lines"):
            counts[key] = sum(m["counts"][key] for m in metas)
        else:
            counts[key] = value  # corpus-wide numbers are the same in every shard
    histograms = [m["counts"].get("negatives_per_line", {}) for m in metas]
    counts["negatives_per_line"] = sorted_histogram(
        {n: sum(h.get(n, 0) for h in histograms) for h in histograms for n in h})
    meta["counts"] = counts
    if meta.get("faiss"):
        meta["faiss"] = dict(meta["faiss"], deepened_queries=sum(m["faiss"]["deepened_queries"] for m in metas))
    meta["seconds"] = {key: round(max(m["seconds"][key] for m in metas), 3) for key in metas[0]["seconds"]}
    meta["shard"] = {"num_shards": num_shards, "merged": [str(p["final"]) for p in parts]}
    recall = _merged_recall(metas)
    if recall:
        meta["candidate_recall"] = recall
    meta["out_jsonl"] = str(merged)
    atomic_write_json(output_paths(out, 0, 1)["meta"], meta)
    os.replace(tmp, merged)
    for p in parts:
        for key in ("final", "meta"):
            p[key].unlink(missing_ok=True)
    store = meta.get("page_store")
    if store and not keep_pages and Path(store).is_dir():
        remove_store(Path(store))
    log.info("merged %d shards (%d lines) into %s", num_shards, counts["lines"], merged)
    return meta


def try_merge(out: str, num_shards: int, keep_pages: bool, paths: dict[str, Path]) -> dict[str, Any] | None:
    """The last shard to finish merges all of them (under a lock, so only one does); returns the merged meta."""
    meta = None
    with file_lock(paths["merge_lock"]):
        parts = shard_files(out, num_shards)
        if all(p["final"].is_file() and p["meta"].is_file() for p in parts):
            meta = merge_shards(out, num_shards, keep_pages)
    if paths["merged"].is_file():
        paths["merge_lock"].unlink(missing_ok=True)
    return meta


def remove_store(store_dir: Path) -> None:
    shutil.rmtree(store_dir, ignore_errors=True)
    try:
        store_dir.parent.rmdir()  # the --emb_dir folder, when nothing else is left in it
    except OSError:
        pass


# ---------------------------------------------------------------- the resumable output


class PartialOutput:
    """`<final>.partial` plus its state file `<final>.partial.json`: lines are appended batch by batch and fsynced,
    then the state records how many lines (and counters) are done. A resumed run checks the settings, truncates a
    half-written batch and continues; `finish` writes the meta and renames the partial to the final name."""

    def __init__(self, paths: dict[str, Path], settings: dict[str, Any], resume: bool, n_total: int):
        self.paths = paths
        self.state: dict[str, Any] = {"settings": settings, "lines": 0, "fn_filtered": 0, "short_lines": 0,
                                      "deepened": 0, "search_seconds": 0.0}
        self.resumed = False
        partial, state_file = paths["partial"], paths["state"]
        if resume and partial.is_file() and state_file.is_file():
            saved = json.loads(state_file.read_text())
            if saved.get("settings") != settings:
                diff = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                              if settings.get(k) != saved.get("settings", {}).get(k))
                raise UserError(f"cannot resume {partial}: it was written with other settings "
                                f"({', '.join(diff)} differ); rerun without --resume to start over")
            n_lines, _ = count_complete_lines(partial)
            if n_lines < saved["lines"]:
                raise UserError(f"cannot resume {partial}: it has {n_lines} lines but its state says "
                                f"{saved['lines']}; rerun without --resume to start over")
            self.state = saved
            self.resumed = True
            log.info("resuming %s after %d of %d lines", partial, saved["lines"], n_total)
        elif resume:
            log.info("nothing to resume at %s: starting a new run", partial)
        make_output_dir(partial.parent, "--out_jsonl")
        keep_bytes = byte_offset_of_line(partial, self.state["lines"]) if self.resumed else 0
        with open(partial, "ab" if self.resumed else "wb") as f:
            f.truncate(keep_bytes)  # drop lines written after the last recorded batch (a crash mid-batch)
        atomic_write_json(state_file, self.state)

    @property
    def lines(self) -> int:
        return self.state["lines"]

    def append(self, out, lines: list[str], first: int, seconds: float) -> None:
        """Write lines first..first+len(lines)-1 durably, then record them in the state."""
        out.write("".join(lines).encode("utf-8"))
        out.flush()
        os.fsync(out.fileno())
        self.state["lines"] = first + len(lines)
        self.state["search_seconds"] += seconds
        atomic_write_json(self.paths["state"], self.state)

    def finish(self, meta: dict[str, Any]) -> None:
        atomic_write_json(self.paths["meta"], meta)
        os.replace(self.paths["partial"], self.paths["final"])
        self.paths["state"].unlink(missing_ok=True)


# ---------------------------------------------------------------- the corpus: a page dataset, or local pages


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")


@dataclass
class Corpus:
    """What mining reads: rows of (query or None, page image), and how to name them in messages and output."""

    dataset: Any                           # columns query (None: a page no query asks for), image, image_filename
    name: str                              # the dataset id or the triples file (meta, store identity)
    split: str | None
    label: str                             # for messages: "dataset NAME split S" / "FILE"
    where: Callable[[int], str]            # a row in messages: "NAME row 3", "FILE line 4", "pages/x.png"
    path_of_row: Callable[[int], str]      # a row's page in the output triples
    page_only: frozenset[int] = frozenset()
    paths_doc: str = ""                    # what the output paths are, for the meta


def load_corpus(args: argparse.Namespace, report: Any) -> Corpus:
    """The corpus of --hub_name (a page dataset) or of --train_jsonl/--root (+ --pages): every form train.py
    trains on (docs/CONTRACT.md §7)."""
    from colintern.data import load_page_dataset, pseudo_path

    if args.train_jsonl:
        return local_corpus(args.train_jsonl, args.root, args.pages, report)
    dataset = load_page_dataset(args.hub_name, args.split, strict=False)
    if args.limit is not None and args.limit < len(dataset):
        dataset = dataset.select(range(args.limit))
    if len(dataset) == 0:
        raise UserError(f"dataset {args.hub_name} split {args.split} is empty: nothing to mine")
    return Corpus(dataset, args.hub_name, args.split, f"dataset {args.hub_name} split {args.split}",
                  where=lambda row: f"{args.hub_name} row {row}",
                  path_of_row=lambda row: pseudo_path(args.hub_name, args.split, row),
                  paths_doc="<dataset>/<split>/doc_<row>.png pseudo-paths (row = the page's representative row)")


class LocalRows:
    """The few `datasets.Dataset` calls mining makes (len, column access, row access, select, select_columns), over
    in-memory columns: mining local pages needs no `datasets` package (the GPU machines of docs/BENCHMARKS.md have
    none). Image values are {"path", "bytes"} dicts, as datasets.Image(decode=False) gives them."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            return self.columns[key]
        return {name: values[key] for name, values in self.columns.items()}

    def select_columns(self, names: list[str]) -> "LocalRows":
        return LocalRows({name: self.columns[name] for name in names})

    def select(self, indices: Any) -> "LocalRows":
        rows = list(indices)
        return LocalRows({name: [values[i] for i in rows] for name, values in self.columns.items()})


def local_corpus(triples_path: str, root: str | None, pages_dir: str | None, report: Any) -> Corpus:
    """Local pages: each triple's query asks for its positive (queries and positives are the file's); the pages
    are every distinct pos and neg path, plus with pages_dir every image file under it. Output paths are written
    as the file writes them (relative to --root), so train.py --train_jsonl OUT --root DIR reads them back."""
    from colintern.data import BadRowError, parse_pseudo_path, read_triples_jsonl

    base = Path(root) if root else Path(".")
    triples, _ = read_triples_jsonl(triples_path, strict=report.strict, report=report)
    rows: dict[str, list] = {"query": [], "image": [], "image_filename": []}
    wheres: list[str] = []
    seen: set[str] = set()

    def add(query: str | None, path: str, where: str) -> bool:
        if parse_pseudo_path(path) is not None and not (base / path).is_file():
            name = parse_pseudo_path(path)[0]
            raise UserError(f"{where}: {path} is a row of dataset {name}; mine that dataset with --hub_name {name}")
        key = os.path.normpath(path)
        file = Path(path) if Path(path).is_absolute() else base / path
        if not file.is_file():
            report.add_error(BadRowError(where, f"missing image: file not found: {file}"))
            return False
        if query is None and key in seen:
            return True
        seen.add(key)
        rows["query"].append(query)
        rows["image"].append({"path": str(file.resolve()), "bytes": None})
        rows["image_filename"].append(key)
        wheres.append(where)
        return True

    for t in triples:
        add(t.query, t.pos, f"{triples_path} line {t.line}")
    n_queries = len(wheres)
    for t in triples:
        for neg in t.negs:
            add(None, neg, f"{triples_path} line {t.line} (negative {neg})")
    if pages_dir:
        files = sorted(p for p in Path(pages_dir).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"--pages {pages_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        for file in files:
            rel = os.path.relpath(file, base)
            add(None, rel, rel)
    if not n_queries:
        raise UserError(f"{triples_path}: no triple has a usable positive page ({report.summary()})")
    dataset = LocalRows(rows)
    log.info("local corpus %s: %d queries, %d distinct pages", triples_path, n_queries, len(set(rows["image_filename"])))
    return Corpus(dataset, str(Path(triples_path).resolve()), None, str(triples_path), where=wheres.__getitem__,
                  path_of_row=rows["image_filename"].__getitem__, page_only=frozenset(range(n_queries, len(wheres))),
                  paths_doc="image paths relative to --root, as the input triples write them")


# ---------------------------------------------------------------- the miner


def mining_device(spec: str) -> str:
    """--device resolved by the one device policy; under torchrun each process takes cuda:LOCAL_RANK."""
    device = resolve_device(spec)
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        device = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # kernels and allocations of this process default to its own GPU
    return device


class Miner:
    """One mining run (one shard of it when sharded)."""

    def __init__(self, args: argparse.Namespace):
        from colintern.data import SkipReport, clean_query
        from colintern.mining import choose_method, plan_pairs
        from colintern.model import ColIntern, is_exported_model
        from colintern.page_store import PageStore, plan_pages

        self.args, self.t_start = args, time.time()
        self.paths = output_paths(args.out_jsonl, args.shard_id, args.num_shards)
        self.show = not args.quiet
        self.device = mining_device(args.device)
        self.use_gpu = self.device.startswith("cuda")
        if args.ckpt is None and not is_exported_model(args.model_id):
            log.warning("no --ckpt: mining with the base model %s and an UNTRAINED head; negatives will be close "
                        "to random. Pass --ckpt outputs/train/colintern_heads_epoch1.pt", args.model_id)
        self.model = ColIntern.from_pretrained(args.model_id, ckpt=args.ckpt, device=self.device, dtype=args.dtype,
                                               use_flash_attn=args.use_flash_attn,
                                               allow_other_base=args.allow_other_base)
        self.ckpt_sha = file_sha256(args.ckpt) if args.ckpt else None
        self.dtype_name = str(next(self.model.backbone.parameters()).dtype).replace("torch.", "")
        self.report = SkipReport(strict=args.strict, logger=log)
        self.corpus = load_corpus(args, self.report)
        dataset = self.corpus.dataset
        self.dataset = dataset
        self.plan = plan_pages(dataset, self.corpus.name, args.dedupe, show_progress=self.show)
        log.info("model %s%s on %s (%s); %d rows -> %d unique pages (dedupe by %s)", args.model_id,
                 f" + {args.ckpt}" if args.ckpt else "", self.device, self.dtype_name, len(dataset),
                 self.plan.n_pages, self.plan.dedupe)
        self._encode_pages()
        self.store = PageStore(self.store_dir, self.spec)
        image_bad = self.store.skipped_rows()
        self.pair_plan = plan_pairs(dataset["query"], self.plan, self.store, {r for r, _ in image_bad}, clean_query,
                                    self.corpus.where, self.corpus.page_only)
        for row, reason in sorted(image_bad + self.pair_plan.bad_rows):
            self.report.add(self.corpus.where(row), reason)
        if self.store.n_valid == 0:
            raise UserError(f"{self.corpus.label}: none of its {len(dataset)} rows has a decodable image "
                            f"({self.report.summary()})")
        if not self.pair_plan.pairs:
            raise UserError(f"{self.corpus.label}: no usable queries ({self.report.summary()})")
        if self.store.n_valid == 1:
            log.warning("the corpus has a single page: every query gets an empty negatives list")
        pairs_all = self.pair_plan.pairs
        self.lo = args.shard_id * len(pairs_all) // args.num_shards
        self.hi = (args.shard_id + 1) * len(pairs_all) // args.num_shards
        self.pairs = pairs_all[self.lo:self.hi]
        self.fn_filter = args.fn_filter if args.fn_filter > 0 else None
        self.method, self.method_why = choose_method(args.method, self.store.n_tokens, self.use_gpu)
        log.info("search method: %s (%s)", self.method, self.method_why)
        self.output = PartialOutput(self.paths, self._settings(), args.resume, len(self.pairs))
        self.index, self.faiss_info, self.faiss_gpu, self.token_k = None, None, False, args.token_k
        if self.method == "faiss":
            self._build_index()

    def _encode_pages(self) -> None:
        """Page embeddings on disk, shared by shards and kept across resumes."""
        from colintern.page_store import StoreSpec, ensure_page_store, keys_digest

        args, plan = self.args, self.plan
        self.spec = StoreSpec(model_id=args.model_id, ckpt_sha256=self.ckpt_sha, config=self.model.config.to_dict(),
                              dtype=self.dtype_name, dataset=self.corpus.name, split=self.corpus.split,
                              limit=args.limit,
                              dedupe=plan.dedupe, keys_sha256=keys_digest(plan), n_pages=plan.n_pages,
                              pages_per_part=args.pages_per_part)
        emb_dir = Path(args.emb_dir) if args.emb_dir else self.paths["emb_dir"]
        self.store_dir = emb_dir / self.spec.id
        if emb_dir.is_dir():
            stale = [d.name for d in emb_dir.iterdir() if d.is_dir() and d.name != self.spec.id]
            if stale:
                log.warning("%s also holds page embeddings of other runs (%s); delete them to free disk space",
                            emb_dir, ", ".join(stale[:3]))

        def encode_pages(pils: list) -> list[torch.Tensor]:
            return self.model.encode_images(pils, batch_size=args.doc_batch, show_progress=False)

        t0 = time.time()
        self.encoded = ensure_page_store(self.store_dir, self.spec, plan, self.dataset, self.corpus.where, encode_pages,
                                         window=args.doc_batch * 8, strict=args.strict, shard_id=args.shard_id,
                                         num_shards=args.num_shards, show_progress=self.show)
        self.t_encode = time.time() - t0

    def _settings(self) -> dict[str, Any]:
        """What a resumed run must share with the partial output it continues."""
        args = self.args
        settings = {"store": self.spec.id, "method": self.method, "k": args.k, "skip_top": args.skip_top,
                    "fn_filter": self.fn_filter, "search_batch": args.search_batch,
                    "shard": [args.shard_id, args.num_shards], "pairs": [self.lo, self.hi],
                    "model_id": args.model_id, "ckpt_sha256": self.ckpt_sha,
                    "pairs_digest": fingerprint([(p.row, p.text, p.page) for p in self.pairs])}
        if self.method == "faiss":
            settings.update(candidates=args.candidates, token_k=args.token_k, faiss_index=args.faiss_index,
                            nprobe=args.nprobe, deepen=args.deepen)
        return settings

    def _build_index(self) -> None:
        import faiss

        from colintern.mining import build_faiss_index

        args = self.args
        self.faiss_gpu = self.use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if self.faiss_gpu and self.token_k > 2048:
            log.warning("--token_k %d is above the GPU index limit: using 2048", self.token_k)
            self.token_k = 2048
        t0 = time.time()
        gpu_id = int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.index, self.faiss_info = build_faiss_index(
            self.store, args.faiss_index, args.nprobe, self.faiss_gpu, gpu_id,
            self.store_dir / f"faiss-{fingerprint(args.faiss_index)}.index", self.show)
        self.faiss_info["build_seconds"] = round(time.time() - t0, 3)
        if self.use_gpu and not self.faiss_gpu:
            log.info("faiss has no GPU support in this install (faiss-cpu): the first stage runs on the CPU")

    # -- search ------------------------------------------------------------------------------------------
    def path_of(self, u: int) -> str:
        """What the output calls page u: a pseudo-path into the dataset, or the local path as the input wrote it."""
        return self.corpus.path_of_row(int(self.store.rep_rows[u]))

    def exact(self, qs: list[torch.Tensor], which: np.ndarray, batch: list, pos: np.ndarray) -> list:
        """Exact MaxSim against every page: [(negs, scores, n_filtered)] per pair."""
        from colintern.mining import exact_search
        from colintern.scoring import maxsim

        args = self.args
        if self.device.startswith("cuda"):
            self.store.make_resident(self.device)  # once: later batches scan the copy already on the GPU
        return exact_search(qs, which, batch, pos, self.pair_plan.positives, self.store, maxsim, self.device,
                            args.k, args.skip_top, self.fn_filter)

    def search_batch(self, batch: list) -> tuple:
        """(query embeddings, which, positive scores, [(negs, scores, n_filtered)], faiss extras or None)."""
        from colintern.mining import faiss_search, positive_scores, unique_texts

        args = self.args
        texts, which = unique_texts(batch)
        qs = self.model.encode_queries(texts, batch_size=args.query_batch, show_progress=False)
        pos = positive_scores(qs, which, batch, self.store, self.device)
        if self.method == "exact":
            return qs, which, pos, self.exact(qs, which, batch, pos), None
        res, cands, n_deepened = faiss_search(qs, which, batch, pos, self.pair_plan.positives, self.store,
                                              self.index, self.device, args.k, args.skip_top, self.fn_filter,
                                              self.token_k, args.candidates, args.deepen,
                                              2048 if self.faiss_gpu else None)
        return qs, which, pos, res, (cands, n_deepened)

    def search(self) -> None:
        """Every pair of this shard from where the output stands, batch by batch, each batch durable."""
        args, state = self.args, self.output.state
        size = args.search_batch
        with tqdm(total=len(self.pairs), initial=state["lines"], desc=f"mine [{self.method}]", unit="query",
                  dynamic_ncols=True, disable=not self.show) as bar, open(self.paths["partial"], "ab") as out:
            for b0 in range(state["lines"], len(self.pairs), size):
                t0 = time.time()
                batch = self.pairs[b0:b0 + size]
                _, _, pos, res, extra = self.search_batch(batch)
                state["deepened"] = state.get("deepened", 0) + (extra[1] if extra else 0)
                lines = []
                for p, s_pos, (negs, scores, n_filtered) in zip(batch, pos, res):
                    lines.append(json.dumps({"query": p.text, "pos": self.path_of(p.page),
                                             "negs": [self.path_of(u) for u in negs],
                                             "scores": {"pos": round(float(s_pos), 6),
                                                        "negs": [round(float(s), 6) for s in scores]}},
                                            ensure_ascii=False) + "\n")
                    state["fn_filtered"] += n_filtered
                    state["short_lines"] += int(len(negs) < args.k)
                    histogram = state.setdefault("negatives_histogram", {})
                    histogram[str(len(negs))] = histogram.get(str(len(negs)), 0) + 1
                self.output.append(out, lines, b0, time.time() - t0)
                bar.update(len(batch))
                bar.set_postfix(queries_per_s=f"{state['lines'] / max(state['search_seconds'], 1e-9):.1f}")

    def recall_check(self) -> tuple[dict[str, Any] | None, float]:
        """Honesty about the approximation: FAISS candidates vs exact top-k on a sample of queries."""
        args = self.args
        if self.method != "faiss" or args.recall_sample <= 0 or not self.pairs:
            return None, 0.0
        t0 = time.time()
        m = min(args.recall_sample, len(self.pairs))
        sample = np.unique(np.linspace(0, len(self.pairs) - 1, m).round().astype(int))
        cand_hits, neg_hits, total, n_checked = 0, 0, 0, 0
        size = args.search_batch
        for s0 in tqdm(range(0, len(sample), size), desc="recall check", disable=not self.show, dynamic_ncols=True):
            batch = [self.pairs[i] for i in sample[s0:s0 + size]]
            qs, which, pos, res, (cands, _) = self.search_batch(batch)
            exact = self.exact(qs, which, batch, pos)
            for r, ((negs_f, _, _), (negs_e, _, _)) in enumerate(zip(res, exact)):
                if len(negs_e) == 0:
                    continue
                n_checked += 1
                total += len(negs_e)
                cand_hits += int(np.isin(negs_e, cands[which[r]]).sum())
                neg_hits += int(np.isin(negs_e, negs_f).sum())
        recall = {"queries": int(len(sample)), "queries_with_negatives": n_checked, "k": args.k,
                  "exact_negatives": total, "candidate_hits": cand_hits, "negatives_hits": neg_hits,
                  "candidate_recall": round(cand_hits / total, 6) if total else None,
                  "negatives_overlap": round(neg_hits / total, 6) if total else None}
        return recall, time.time() - t0

    # -- the whole run -----------------------------------------------------------------------------------
    def run(self) -> list[str]:
        """Search, check, write the meta and the final file; returns the summary lines to print."""
        self.search()
        recall, t_recall = self.recall_check()
        meta = self.meta(recall, t_recall)
        log.info("negatives per line: %s", format_histogram(meta["counts"]["negatives_per_line"]))
        self.output.finish(meta)
        if self.args.num_shards == 1 and not self.args.keep_pages:
            remove_store(self.store_dir)
        return self.summary(meta, recall)

    def meta(self, recall: dict[str, Any] | None, t_recall: float) -> dict[str, Any]:
        args, state, plan, store = self.args, self.output.state, self.plan, self.store
        part_secs = sum(p["seconds"] for p in store.parts)
        part_pages = sum(p["pages_encoded"] for p in store.parts)
        faiss = None if self.faiss_info is None else {
            **self.faiss_info, "candidates": args.candidates, "token_k": self.token_k, "deepen": args.deepen,
            "deepened_queries": state["deepened"], "indexed": "every page token vector (inner product)"}
        return {
            "checkpoint": args.ckpt, "checkpoint_sha256": self.ckpt_sha, "model": args.model_id,
            "dataset": self.corpus.name, "split": self.corpus.split, "limit": args.limit, "method": self.method,
            "method_asked": args.method, "method_why": self.method_why, "k": args.k, "score": SCORE_DOC,
            "filters": {"fn_filter": self.fn_filter, "skip_top": args.skip_top,
                        "positives": f"rows sharing the page (dedupe by {plan.dedupe}) and rows with the same "
                                     "query text"},
            "faiss": faiss,
            "counts": {"rows": len(self.dataset), "pages": plan.n_pages, "pages_valid": store.n_valid,
                       "page_tokens": store.n_tokens, "queries": len(self.pairs), "lines": state["lines"],
                       "queries_total": len(self.pair_plan.pairs), "skipped_rows": self.report.count,
                       "skipped_by_reason": self.report.counts(), "duplicate_rows": self.pair_plan.duplicate_rows,
                       "fn_filtered": state["fn_filtered"], "short_lines": state["short_lines"],
                       "negatives_per_line": sorted_histogram(state.get("negatives_histogram", {}))},
            "seconds": {"encode_pages": round(self.t_encode, 3), "search": round(state["search_seconds"], 3),
                        "recall_check": round(t_recall, 3), "total": round(time.time() - self.t_start, 3)},
            "pages_per_s": round(part_pages / part_secs, 3) if part_secs > 0 else None,
            "pages_encoded_here": self.encoded["pages_encoded"],
            "queries_per_s": round(state["lines"] / state["search_seconds"], 3) if state["search_seconds"] else None,
            "candidate_recall": recall,
            "device": self.device, "dtype": self.dtype_name, "resumed": self.output.resumed,
            "shard": {"shard_id": args.shard_id, "num_shards": args.num_shards, "pairs": [self.lo, self.hi]},
            "page_store": str(self.store_dir), "out_jsonl": str(self.paths["final"]),
            "format": {"line": '{"query", "pos", "negs", "scores": {"pos", "negs"}}',
                       "paths": self.corpus.paths_doc},
        }

    def summary(self, meta: dict[str, Any], recall: dict[str, Any] | None) -> list[str]:
        args, state, counts, seconds = self.args, self.output.state, meta["counts"], meta["seconds"]
        pps, qps = meta["pages_per_s"], meta["queries_per_s"]
        lines = [
            f"mined {state['lines']} queries -> {self.paths['final']}  (meta: {self.paths['meta']})",
            f"  pages: {counts['pages']} unique from {counts['rows']} rows ({counts['pages_valid']} usable, "
            f"{counts['page_tokens']} token vectors); skipped rows: {counts['skipped_rows']}; duplicate rows: "
            f"{counts['duplicate_rows']}",
            f"  seconds: encode {self.t_encode:.1f} ({pps if pps is not None else '-'} pages/s), search "
            f"{state['search_seconds']:.1f} ({qps if qps is not None else '-'} queries/s), total "
            f"{seconds['total']:.1f}",
            f"  fn_filter dropped {state['fn_filtered']} candidates; {state['short_lines']} lines have fewer than "
            f"{args.k} negatives",
            f"  negatives per line: {format_histogram(counts['negatives_per_line'])}",
        ]
        if recall and recall["exact_negatives"]:
            lines.append(f"  candidate recall@{args.k} vs exact ({recall['queries']} queries): "
                         f"{recall['candidate_recall']:.4f}; negatives identical to exact: "
                         f"{recall['negatives_overlap']:.4f}")
        elif recall:
            lines.append(f"  candidate recall: n/a (exact search finds no negatives for the {recall['queries']} "
                         "sampled queries)")
        if state["lines"] and state["short_lines"] > state["lines"] // 2 and self.fn_filter:
            log.warning("%d of %d queries got fewer than %d negatives: the fn_filter (%.2f x the positive's score) "
                        "dropped %d candidates. Nearly uniform scores mean an untrained or collapsed checkpoint; "
                        "lower --fn_filter or check the checkpoint", state["short_lines"], state["lines"], args.k,
                        self.fn_filter, state["fn_filtered"])
        if self.report.count:
            lines.append(f"  {self.report.summary()}")
        return lines
