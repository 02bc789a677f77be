"""Query latency of search.py's backends on an index of real InternVL shape, on this machine, in one run.

    python bench/search_latency.py --json_out outputs/bench/search_latency.json        # 10,000 pages (~20 min)
    python bench/search_latency.py --pages 300 --queries 5 --qdrant_pages 100 --pooled_pages 100   # a smoke run

The index: --pages pages of 128-d unit token vectors, 1,000-2,600 tokens each (mean ~1,800, InternVL3.5 at 4+1
tiles), written as a search.py index folder (fp16 segments) without a model. Tokens are noisy copies of "visual
words" of the page's topic (as bench/mining.py's clustered corpus); a query is ~25 noisy copies of tokens of its
target page, so exact search has a right answer and an approximate one can miss it (pure random vectors would make
every page tie). Rows, each with build seconds, bytes per page, median ms per query and recall@10 against exact:
  exact     search.py's exact MaxSim over every page (colintern.index.page_search.exact_topk): the ceiling, ~115 GFLOP
            per query at 10,000 pages
  faiss     the FAISS first stage (IVF-PQ over every page token: centroid interaction picks the candidates) + exact
            re-rank, for each --faiss_grid setting (nprobe = centroids per query token)
  pooled    exact over the pages pooled with --pool_factor 3, on the first --pooled_pages pages (Ward pooling costs
            ~0.16 s per page here), beside exact on the same pages
  qdrant    Qdrant's embedded local mode (pure Python/numpy: every vector in memory) on the first --qdrant_pages
            pages, beside exact on the same pages. A Qdrant server (Rust, HNSW) is not available on this machine.
"""
from __future__ import annotations

import argparse
import logging
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchlib import env  # noqa: E402

from colintern.cli import run_cli, setup_logging  # noqa: E402
from colintern.errors import UserError  # noqa: E402
from colintern.files import atomic_write_json  # noqa: E402

log = logging.getLogger("colintern.bench.search_latency")
DIM = 128


class Corpus:
    """Deterministic pages and queries: page u is regenerated from its own seed, so queries need no stored copy."""

    def __init__(self, seed: int = 0, n_words: int = 8192, n_topics: int = 64, topic_words: int = 256):
        rng = np.random.default_rng(seed)
        words = rng.standard_normal((n_words, DIM)).astype(np.float32)
        self.words = words / np.linalg.norm(words, axis=1, keepdims=True)
        self.vocab = np.stack([rng.choice(n_words, topic_words, replace=False) for _ in range(n_topics)])
        self.seed = seed

    def page(self, u: int) -> np.ndarray:
        """(L, 128) float32 unit vectors, L in [1000, 2600]."""
        rng = np.random.default_rng([self.seed, u])
        n = int(rng.integers(1000, 2601))
        own = self.vocab[u % len(self.vocab)][rng.integers(0, self.vocab.shape[1], n)]
        ids = np.where(rng.random(n) < 0.8, own, rng.integers(0, len(self.words), n))
        x = self.words[ids] + 0.35 / math.sqrt(DIM) * rng.standard_normal((n, DIM)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def query(self, i: int, n_pages: int) -> tuple[torch.Tensor, int]:
        """(~25, 128) query for target page i * 7919 % n_pages, and that page."""
        target = (i * 7919) % n_pages
        rng = np.random.default_rng([self.seed, 10**9 + i])
        page = self.page(target)
        picks = page[rng.integers(0, len(page), int(rng.integers(20, 31)))]
        x = picks + 0.5 / math.sqrt(DIM) * rng.standard_normal(picks.shape).astype(np.float32)
        return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True)), target


def build_index(folder: Path, corpus: Corpus, n_pages: int, pool_factor: int = 1):
    """A search.py index folder of the first n_pages pages (pooled when pool_factor > 1)."""
    from tqdm.auto import tqdm

    from colintern.index.page_index import PageIndex
    from colintern.index.sources import PageSource
    from colintern.retriever.token_pooling import pool_tokens

    index = PageIndex.create_or_open(folder, "synthetic", None, {"dim": DIM}, 150, pool_factor)
    if len(index.pages) == n_pages:  # a --work folder of an earlier run: the same deterministic pages
        return index
    if index.pages:
        raise UserError(f"{folder} holds {len(index.pages)} pages, not {n_pages}: use another --work folder")
    batch = []
    for u in tqdm(range(n_pages), desc=f"build index (K={pool_factor})", unit="page", disable=not sys.stderr.isatty()):
        vectors = pool_tokens(torch.from_numpy(corpus.page(u)), pool_factor)
        batch.append((PageSource(f"doc{u // 100}.pdf", f"sha{u // 100}", u % 100 + 1, "pdf"), vectors, 0, 0, (1, 1)))
        if len(batch) == 256:
            index.commit(batch)
            batch = []
    if batch:
        index.commit(batch)
    return index


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def timed_queries(search: Callable[[list[torch.Tensor]], tuple[np.ndarray, np.ndarray]],
                  qs: list[torch.Tensor]) -> tuple[list[float], np.ndarray]:
    """Each query alone (the latency a user sees): seconds per query and the (n_q, 10) ids."""
    seconds, ids = [], []
    for q in qs:
        t0 = time.perf_counter()
        _, i = search([q])
        seconds.append(time.perf_counter() - t0)
        ids.append(i[0])
    return seconds, np.stack(ids)


def row(name: str, pages: int, build_s: float, bytes_per_page: float, seconds: list[float], ids: np.ndarray,
        exact_ids: np.ndarray, targets: list[int], **extra: Any) -> dict[str, Any]:
    from colintern.index.page_search import recall_at_k

    out = {"backend": name, "pages": pages, "build_s": round(build_s, 2), "bytes_per_page": round(bytes_per_page),
           "ms_per_query_median": round(1000 * statistics.median(seconds), 1),
           "ms_per_query_max": round(1000 * max(seconds), 1), "recall_at_10_vs_exact": recall_at_k(ids, exact_ids),
           "target_in_top_10": float(np.mean([t in r for t, r in zip(targets, ids.tolist())])), **extra}
    log.info("%s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pages", type=int, default=10_000, help="pages in the index (default: 10000)")
    p.add_argument("--queries", type=int, default=20, help="queries timed one by one (default: 20)")
    p.add_argument("--faiss_grid", nargs="+", default=["16,128,128", "32,128,128", "32,256,128", "64,128,128"],
                   metavar="NPROBE,CANDIDATES,TOKEN_K", help="FAISS first-stage settings to time on the one index "
                   "(default: %(default)s)")
    p.add_argument("--pooled_pages", type=int, default=1000, help="pages of the pooled comparison (default: 1000)")
    p.add_argument("--qdrant_pages", type=int, default=500, help="pages of the Qdrant local-mode comparison "
                   "(default: 500)")
    p.add_argument("--skip", nargs="*", choices=["pooled", "qdrant"], default=[], help="rows to leave out")
    p.add_argument("--resident_gb", type=float, default=12.0, help="the warm row (pages resident as float32, as "
                   "search.py serve keeps them) when they take at most this much memory (default: %(default)s)")
    p.add_argument("--work", default=None, help="folder for the index folders (default: a temporary folder, removed)")
    p.add_argument("--json_out", default="outputs/bench/search_latency.json", help="results (default: %(default)s)")
    args = p.parse_args(argv)
    setup_logging()
    from colintern.index.page_search import FaissFirstStage, exact_topk, resident_bytes, resident_pages

    corpus = Corpus()
    work = Path(args.work or tempfile.mkdtemp(prefix="search_latency_"))
    rows: list[dict[str, Any]] = []
    try:
        queries = [corpus.query(i, args.pages) for i in range(args.queries)]
        qs, targets = [q for q, _ in queries], [t for _, t in queries]
        t0 = time.perf_counter()
        index = build_index(work / "full", corpus, args.pages)
        build_s = time.perf_counter() - t0
        size = disk_bytes(work / "full") / args.pages
        n_tokens = sum(p["length"] for p in index.pages)
        exact_s, exact_ids = timed_queries(lambda q: exact_topk(index, q, 10, "cpu"), qs)
        rows.append(row("exact", args.pages, build_s, size, exact_s, exact_ids, exact_ids, targets,
                        page_tokens=n_tokens, gflop_per_query=round(2 * DIM * n_tokens * 25 / 1e9, 1)))
        resident = None
        if resident_bytes(index) <= args.resident_gb * 1e9:
            t0 = time.perf_counter()
            resident = resident_pages(index)
            pack_s = time.perf_counter() - t0
            rows.append(warm_row(index, resident, qs, targets, exact_ids, build_s, size, pack_s))
        t0 = time.perf_counter()
        stage = FaissFirstStage(index, show_progress=sys.stderr.isatty())
        faiss_build = time.perf_counter() - t0
        faiss_bytes = sum(f.stat().st_size for f in (work / "full").glob("faiss-*.index")) / args.pages
        for setting in args.faiss_grid:  # one index, searched with each (nprobe, candidates, token_k)
            nprobe, stage.candidates, stage.token_k = (int(v) for v in setting.split(","))
            stage.nprobe = nprobe
            for warm in ([False, True] if resident is not None else [False]):
                faiss_s, faiss_ids = timed_queries(lambda q: stage.topk(q, 10, "cpu", resident if warm else None),
                                                   qs)
                rows.append(row(f"faiss + exact re-rank (nprobe {nprobe}, {stage.candidates} candidates, token_k "
                                f"{stage.token_k}){', warm' if warm else ''}", args.pages, faiss_build,
                                size + faiss_bytes, faiss_s, faiss_ids, exact_ids, targets,
                                factory=stage.info["factory"], nprobe=nprobe, candidates=stage.candidates,
                                token_k=stage.token_k, faiss_bytes_per_page=round(faiss_bytes)))
        if resident is not None:
            resident = None  # the scorer's own float32 copy takes its place
            rows[1]["scorer_gflops"] = scorer_gflops(index, qs)
        rows += [] if "pooled" in args.skip else pooled_rows(args, corpus, work)
        rows += [] if "qdrant" in args.skip else qdrant_rows(args, corpus, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result = {"env": env(torch.device("cpu")), "args": vars(args), "rows": rows}
    atomic_write_json(Path(args.json_out), result)
    print(markdown(rows))
    print(f"written: {args.json_out}")
    return 0


def warm_row(index, resident, qs: list[torch.Tensor], targets: list[int], exact_ids: np.ndarray, build_s: float,
             size: float, pack_s: float) -> dict[str, Any]:
    """Exact search with the pages resident as float32 (search.py serve): each query alone, then every query in one
    call, with the useful GFLOP/s of both (2 x dim x query tokens x page tokens)."""
    from colintern.index.page_search import exact_topk

    seconds, ids = timed_queries(lambda q: exact_topk(index, q, 10, "cpu", resident=resident), qs)
    flop = 2 * DIM * sum(p["length"] for p in index.pages) * sum(q.shape[0] for q in qs)
    t0 = time.perf_counter()
    exact_topk(index, qs, 10, "cpu", resident=resident)
    batch_s = time.perf_counter() - t0
    return row("exact, warm (pages resident as float32)", len(index.pages), build_s, size, seconds, ids, exact_ids,
               targets, pack_s=round(pack_s, 2), resident_gb=round(resident.nbytes / 1e9, 2),
               one_query_gflops=round(flop / len(qs) / statistics.median(seconds) / 1e9, 1),
               batch_gflops=round(flop / batch_s / 1e9, 1))


def scorer_gflops(index, qs: list[torch.Tensor]) -> float:
    """Useful GFLOP/s of the scorer (colintern.retriever.scoring.maxsim_topk) on every query at once against the
    index's pages held as an in-memory list of float32 tensors: the rate warm search is measured against."""
    from colintern.retriever.scoring import maxsim_topk

    docs = [index.vectors(u) for u in range(len(index.pages))]  # (L, dim) float32 each
    t0 = time.perf_counter()
    maxsim_topk(qs, docs, 10, device="cpu")
    seconds = time.perf_counter() - t0
    return round(2 * DIM * sum(len(d) for d in docs) * sum(q.shape[0] for q in qs) / seconds / 1e9, 1)


def subset_queries(args, corpus: Corpus, n: int) -> tuple[list[torch.Tensor], list[int]]:
    """--queries queries whose target pages are among the first n."""
    queries = [corpus.query(i, n) for i in range(args.queries)]
    return [q for q, _ in queries], [t for _, t in queries]


def pooled_rows(args, corpus: Corpus, work: Path) -> list[dict[str, Any]]:
    """Exact over the first --pooled_pages pages, unpooled and pooled with K = 3."""
    from colintern.index.page_search import exact_topk

    n = min(args.pooled_pages, args.pages)
    qs, targets = subset_queries(args, corpus, n)
    rows = []
    exact_ids = None
    for factor in (1, 3):
        t0 = time.perf_counter()
        index = build_index(work / f"pooled{factor}_{n}", corpus, n, factor)
        build_s = time.perf_counter() - t0
        seconds, ids = timed_queries(lambda q: exact_topk(index, q, 10, "cpu"), qs)
        exact_ids = ids if exact_ids is None else exact_ids
        rows.append(row(f"exact, pool factor {factor}", n, build_s, disk_bytes(work / f"pooled{factor}_{n}") / n,
                        seconds, ids, exact_ids, targets))
    return rows


def qdrant_rows(args, corpus: Corpus, work: Path) -> list[dict[str, Any]]:
    """Qdrant local mode against exact on the first --qdrant_pages pages."""
    import importlib.util

    if importlib.util.find_spec("qdrant_client") is None:
        log.info("qdrant-client not installed: no Qdrant row")
        return []
    from colintern.index.page_search import exact_topk
    from colintern.index.qdrant_store import QdrantPages

    n = min(args.qdrant_pages, args.pages)
    qs, targets = subset_queries(args, corpus, n)
    index = build_index(work / f"qd_index_{n}", corpus, n)
    exact_s, exact_ids = timed_queries(lambda q: exact_topk(index, q, 10, "cpu"), qs)
    rows = [row("exact (Qdrant's pages)", n, 0.0, disk_bytes(work / f"qd_index_{n}") / n, exact_s, exact_ids,
                exact_ids, targets)]
    store = QdrantPages(index, path=str(work / "qdrant"))
    try:
        t0 = time.perf_counter()
        store.sync(show_progress=sys.stderr.isatty())
        build_s = time.perf_counter() - t0
        seconds, ids = timed_queries(lambda q: store.topk([x.numpy() for x in q], 10), qs)
    finally:
        store.close()
    rows.append(row("qdrant local mode", n, build_s, disk_bytes(work / "qdrant") / n, seconds, ids, exact_ids,
                    targets))
    from colintern.index.page_search import resident_pages

    resident = resident_pages(index)
    seconds, ids = timed_queries(lambda q: exact_topk(index, q, 10, "cpu", resident=resident), qs)
    rows.append(row("exact, warm (Qdrant's pages resident as float32)", n, 0.0, 0.0, seconds, ids, exact_ids,
                    targets))
    rows += qdrant_edge_rows(index, qs, targets, exact_ids, work / "qdrant_edge")
    return rows


def qdrant_edge_rows(index, qs: list[torch.Tensor], targets: list[int], exact_ids: np.ndarray,
                     folder: Path) -> list[dict[str, Any]]:
    """Qdrant's own engine (qdrant-edge-py: the Rust shard, in-process) with a float16 MaxSim multivector per page,
    searched by exact scan (SearchParams(exact=True)): the rate the warm exact path is held against (#27)."""
    import importlib.util

    if importlib.util.find_spec("qdrant_edge") is None:
        log.info("qdrant-edge-py not installed: no Qdrant edge row")
        return []
    import qdrant_edge as qe

    shutil.rmtree(folder, ignore_errors=True)
    params = qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Dot, datatype=qe.VectorStorageDatatype.Float16,
                                 multivector_config=qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim))
    t0 = time.perf_counter()
    shard = qe.EdgeShard.create(str(folder), qe.EdgeConfig(vectors=params))
    for start in range(0, len(index.pages), 64):
        points = [qe.Point(u, np.asarray(index.page_rows(u), dtype=np.float32).tolist())
                  for u in range(start, min(start + 64, len(index.pages)))]
        shard.update(qe.UpdateOperation.upsert_points(points))
    shard.flush()
    build_s = time.perf_counter() - t0

    def search(q: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        found = shard.query(qe.QueryRequest(limit=10, query=qe.Query.Nearest(q[0].tolist()),
                                            params=qe.SearchParams(exact=True)))
        return np.array([[p.score for p in found]]), np.array([[int(p.id) for p in found]])

    try:
        seconds, ids = timed_queries(search, qs)
    finally:
        shard.close()
    return [row("qdrant edge (the engine), exact scan", len(index.pages), build_s, disk_bytes(folder) / len(index.pages),
                seconds, ids, exact_ids, targets)]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| backend | pages | build s | bytes/page | ms/query (median) | recall@10 vs exact | target in top 10 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['pages']:,} | {r['build_s']} | {r['bytes_per_page']:,} | "
                     f"{r['ms_per_query_median']} | {r['recall_at_10_vs_exact']:.3f} | {r['target_in_top_10']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_cli(main, out_flag="--json_out"))
