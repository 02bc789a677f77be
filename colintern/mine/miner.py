"""Hard-negative mining as a job (mine.py is its command line): encode the corpus once, search every query, write
the triples resumably, measure the approximation, merge shards.

    mine(config)                 what mine.py does: merge, or check, mine this shard and merge when all are done
    Miner(config)                model, dataset, page plan, page store (encoded or reused), query pairs, method
    Miner.run()                  search -> PartialOutput (resumable lines) -> recall check -> meta -> final name
    merge_shards(out, n, keep)   join the shard files of a sharded run (the last shard to finish calls it)

The search itself is in `colintern/mine/search.py`, the page store in `colintern/mine/page_store.py`, the corpus in
`colintern/mine/corpus.py`, the partial output and the shards in `colintern/mine/output.py`."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from colintern.retriever.checkpoint import load_checkpoint
from colintern.errors import UserError
from colintern.files import (make_output_dir)
from colintern.cli import save_config
from colintern.settings import MineConfig
from colintern.mine.output import format_histogram, merge_shards, output_paths, remove_store, sorted_histogram, try_merge
from colintern.mine.prepare import PreparedMining


log = logging.getLogger("colintern.mine")


SCORE_DOC = "sum over query tokens of the max over page tokens of the inner product (exact MaxSim)"


class Miner(PreparedMining):
    """One mining run (one shard of it when sharded)."""

    # -- search ------------------------------------------------------------------------------------------
    def path_of(self, u: int) -> str:
        """What the output calls page u: a pseudo-path into the dataset, or the local path as the input wrote it."""
        return self.corpus.path_of_row(int(self.store.rep_rows[u]))

    def exact(self, qs: list[torch.Tensor], which: np.ndarray, batch: list, pos: np.ndarray) -> list:
        """Exact MaxSim against every page: [(negs, scores, n_filtered)] per pair."""
        from colintern.mine.search import exact_search
        from colintern.retriever.scoring import maxsim

        config = self.config
        if self.device.startswith("cuda"):
            self.store.make_resident(self.device)  # once: later batches scan the copy already on the GPU
        return exact_search(qs, which, batch, pos, self.pair_plan.positives, self.store, maxsim, self.device,
                            config.k, config.skip_top, self.fn_filter)

    def search_batch(self, batch: list) -> tuple:
        """(query embeddings, which, positive scores, [(negs, scores, n_filtered)], faiss extras or None)."""
        from colintern.mine.search import faiss_search, positive_scores, unique_texts

        config = self.config
        texts, which = unique_texts(batch)
        qs = self.model.encode_queries(texts, batch_size=config.query_batch, show_progress=False)
        pos = positive_scores(qs, which, batch, self.store, self.device)
        if self.method == "exact":
            return qs, which, pos, self.exact(qs, which, batch, pos), None
        res, cands, n_deepened = faiss_search(qs, which, batch, pos, self.pair_plan.positives, self.store,
                                              self.index, self.device, config.k, config.skip_top, self.fn_filter,
                                              self.token_k, config.candidates, config.deepen,
                                              2048 if self.faiss_gpu else None)
        return qs, which, pos, res, (cands, n_deepened)

    def search(self) -> None:
        """Every pair of this shard from where the output stands, batch by batch, each batch durable."""
        config, state = self.config, self.output.state
        size = config.search_batch
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
                    state["short_lines"] += int(len(negs) < config.k)
                    histogram = state.setdefault("negatives_histogram", {})
                    histogram[str(len(negs))] = histogram.get(str(len(negs)), 0) + 1
                self.output.append(out, lines, b0, time.time() - t0)
                bar.update(len(batch))
                bar.set_postfix(queries_per_s=f"{state['lines'] / max(state['search_seconds'], 1e-9):.1f}")

    def recall_check(self) -> tuple[dict[str, Any] | None, float]:
        """Honesty about the approximation: FAISS candidates vs exact top-k on a sample of queries."""
        config = self.config
        if self.method != "faiss" or config.recall_sample <= 0 or not self.pairs:
            return None, 0.0
        t0 = time.time()
        m = min(config.recall_sample, len(self.pairs))
        sample = np.unique(np.linspace(0, len(self.pairs) - 1, m).round().astype(int))
        cand_hits, neg_hits, total, n_checked = 0, 0, 0, 0
        size = config.search_batch
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
        recall = {"queries": int(len(sample)), "queries_with_negatives": n_checked, "k": config.k,
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
        if self.config.num_shards == 1 and not self.config.keep_pages:
            remove_store(self.store_dir)
        return self.summary(meta, recall)

    def teacher_kind(self) -> str:
        from colintern.retriever.colpali_engine import colpali_checkpoint

        colpali = colpali_checkpoint(self.model_id)
        return f"colpali-engine {colpali.kind.name}" if colpali else "exported ColIntern model"

    def meta(self, recall: dict[str, Any] | None, t_recall: float) -> dict[str, Any]:
        config, state, plan, store = self.config, self.output.state, self.plan, self.store
        part_secs = sum(p["seconds"] for p in store.parts)
        part_pages = sum(p["pages_encoded"] for p in store.parts)
        faiss = None if self.faiss_info is None else {
            **self.faiss_info, "candidates": config.candidates, "token_k": self.token_k, "deepen": config.deepen,
            "deepened_queries": state["deepened"], "indexed": "every page token vector (inner product)"}
        return {
            "checkpoint": config.ckpt, "checkpoint_sha256": self.ckpt_sha, "model": config.model_id,
            "teacher": None if config.teacher is None else {
                "given": config.teacher, "family": self.model.config.backbone, "dim": self.model.config.dim,
                "kind": "ColIntern checkpoint" if config.ckpt else self.teacher_kind()},
            "dataset": self.corpus.name, "split": self.corpus.split, "limit": config.limit, "method": self.method,
            "method_asked": config.method, "method_why": self.method_why, "k": config.k, "score": SCORE_DOC,
            "filters": {"fn_filter": self.fn_filter, "skip_top": config.skip_top,
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
            "shard": {"shard_id": config.shard_id, "num_shards": config.num_shards, "pairs": [self.lo, self.hi]},
            "page_store": str(self.store_dir), "out_jsonl": str(self.paths["final"]),
            "format": {"line": '{"query", "pos", "negs", "scores": {"pos", "negs"}}',
                       "paths": self.corpus.paths_doc},
        }

    def summary(self, meta: dict[str, Any], recall: dict[str, Any] | None) -> list[str]:
        config, state, counts, seconds = self.config, self.output.state, meta["counts"], meta["seconds"]
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
            f"{config.k} negatives",
            f"  negatives per line: {format_histogram(counts['negatives_per_line'])}",
        ]
        if recall and recall["exact_negatives"]:
            lines.append(f"  candidate recall@{config.k} vs exact ({recall['queries']} queries): "
                         f"{recall['candidate_recall']:.4f}; negatives identical to exact: "
                         f"{recall['negatives_overlap']:.4f}")
        elif recall:
            lines.append(f"  candidate recall: n/a (exact search finds no negatives for the {recall['queries']} "
                         "sampled queries)")
        if state["lines"] and state["short_lines"] > state["lines"] // 2 and self.fn_filter:
            log.warning("%d of %d queries got fewer than %d negatives: the fn_filter (%.2f x the positive's score) "
                        "dropped %d candidates. Nearly uniform scores mean an untrained or collapsed checkpoint; "
                        "lower --fn_filter or check the checkpoint", state["short_lines"], state["lines"], config.k,
                        self.fn_filter, state["fn_filtered"])
        if self.report.count:
            lines.append(f"  {self.report.summary()}")
        return lines


CONFIG_SUFFIX = ".config.yaml"  # the resolved settings, beside the output: mined_triples.config.yaml


def mine(config: MineConfig) -> Iterator[str]:
    """mine.py (or from Python with a MineConfig): mine one shard, or --merge the shards; yields the result lines
    mine.py prints. Under torchrun every process calls it for its shard, and the last one to finish merges."""
    if config.merge:
        merged = merge_shards(config.out_jsonl, config.num_shards, config.keep_pages)
        yield f"merged {config.num_shards} shards: {merged['counts']['lines']} lines -> {config.out_jsonl}"
        return
    if Path(config.out_jsonl).is_dir():
        raise UserError(f"--out_jsonl {config.out_jsonl} is a folder; name a .jsonl file")
    if config.ckpt:
        load_checkpoint(config.ckpt)  # a missing, foreign or image-text checkpoint: one line, no output folder made
    make_output_dir(Path(config.out_jsonl).parent, "--out_jsonl")  # before the model loads: fail fast
    paths = output_paths(config.out_jsonl, config.shard_id, config.num_shards)
    if config.resume and paths["final"].is_file() and not paths["partial"].is_file():
        yield f"{paths['final']} is already complete; nothing to resume"
    else:
        if paths["partial"].exists() and not config.resume:
            log.warning("discarding the unfinished %s (pass --resume to continue it)", paths["partial"])
        if config.shard_id == 0:
            out = Path(config.out_jsonl)
            save_config(config, out.with_name(out.name.removesuffix(".jsonl") + CONFIG_SUFFIX), "mine.py")
        yield from Miner(config).run()
    if config.num_shards > 1:
        meta = try_merge(config.out_jsonl, config.num_shards, config.keep_pages, paths)
        if meta is not None:
            yield f"merged {config.num_shards} shards: {meta['counts']['lines']} lines -> {config.out_jsonl}"
