"""Hard-negative mining cost: exact MaxSim of N queries x N pages at growing N, extrapolated to colpali_train_set,
and the FAISS first stage of mine.py (time and candidate recall against exact search).

Embeddings are synthetic but shaped like ColIntern's: queries of 20-40 tokens, pages of 800-1800 tokens (InternVL
with up to 6+1 tiles of 256 tokens), dim 128, unit vectors. They are clustered like real page embeddings so
that the FAISS recall is not trivially 0 or 1: tokens are noisy copies of "visual words", each page draws most of
its words from its topic's vocabulary, and a query's tokens are noisy copies of tokens of its own page. Exact
timing depends only on the shapes; the recall printed here describes this synthetic data, not a real model
(mine.py measures the real one on every run: candidate_recall in its .meta.json).

1. Exact: colintern.retriever.scoring.maxsim (what mine.py --method exact runs, part by part) on N x N, timed at each N.
   Work grows as N^2: time = a x N^2 is fitted (least squares through the origin) and extrapolated to
   --target_queries x --target_pages (default 118,695 x 118,695: colpali_train_set has 118,695 rows; assuming
   every row its own page is the upper bound, mine.py dedupes pages by image_filename).
2. FAISS: the pages are written as a colintern.mine.search page store (fp16, the on-disk format mine.py uses) and
   searched with colintern.mine.search.faiss_search (token-level FAISS first stage + exact re-rank), per index type,
   against colintern.mine.search.exact_search; candidate recall@k = share of exact's k best negatives among the
   FAISS candidates (mine.py's candidate_recall), negatives overlap = share of exact's negatives FAISS returns.
   The alternative users would otherwise pick, a single mean-pooled vector per page and query in a FAISS
   inner-product index (the seed's miner), is measured on the same data.

    python bench/mining.py                                   # sizes 125 250 500 1000, FAISS at 1000 pages
    python bench/mining.py --sizes 100 200 --faiss_pages 200 --faiss_queries 50 --faiss_index Flat   # quick
"""
from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchlib import env, loadavg, matmul_tflops, print_table, timed, write_json  # noqa: E402

from colintern.cli import run_cli, setup_logging  # noqa: E402
from colintern.errors import UserError  # noqa: E402

log = logging.getLogger("colintern.bench.mining")

COLPALI_TRAIN_ROWS = 118_695


# ---------------------------------------------------------------------------------------------- synthetic data


def clustered_corpus(n_pages: int, n_queries: int, q_len: tuple[int, int], d_len: tuple[int, int], dim: int,
                     seed: int, n_words: int = 8192, n_topics: int = 64, topic_words: int = 256,
                     noise: float = 0.35, query_noise: float = 0.5) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(queries, pages): lists of (L, dim) float32 unit vectors; query i's own page is page i % n_pages.

    Page tokens: noisy copies of visual words (80 % from the page's topic vocabulary, 20 % from anywhere);
    query tokens: noisy copies of random tokens of the query's page.
    """
    rng = np.random.default_rng(seed)
    words = rng.standard_normal((n_words, dim)).astype(np.float32)
    words /= np.linalg.norm(words, axis=1, keepdims=True)
    vocab = np.stack([rng.choice(n_words, topic_words, replace=False) for _ in range(n_topics)])  # (topics, tw)
    d_lens = rng.integers(d_len[0], d_len[1] + 1, n_pages)
    topics = rng.integers(0, n_topics, n_pages)
    pages = []
    for u in range(n_pages):
        n = int(d_lens[u])
        own = vocab[topics[u]][rng.integers(0, topic_words, n)]
        anywhere = rng.integers(0, n_words, n)
        ids = np.where(rng.random(n) < 0.8, own, anywhere)
        x = words[ids] + noise / math.sqrt(dim) * rng.standard_normal((n, dim)).astype(np.float32)
        pages.append(torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True)))
    queries = []
    q_lens = rng.integers(q_len[0], q_len[1] + 1, n_queries)
    for i in range(n_queries):
        page = pages[i % n_pages].numpy()
        picks = page[rng.integers(0, page.shape[0], int(q_lens[i]))]
        x = picks + query_noise / math.sqrt(dim) * rng.standard_normal(picks.shape).astype(np.float32)
        queries.append(torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True)))
    return queries, pages


def write_page_store(store_dir: Path, pages: list[torch.Tensor], pages_per_part: int = 1024):
    """The pages as a colintern.mine.search page store (fp16 token file + part.json per part); returns PageStore."""
    from colintern.files import atomic_write_json
    from colintern.mine.page_store import PART_META, TOKENS_FILE, PageStore, StoreSpec, _part_dir

    spec = StoreSpec(model_id="synthetic", ckpt_sha256=None, config={}, dtype="fp16", dataset="synthetic",
                     split="train", limit=None, dedupe="filename", keys_sha256="", n_pages=len(pages),
                     pages_per_part=pages_per_part)
    for j, first in enumerate(range(0, len(pages), pages_per_part)):
        part = pages[first:first + pages_per_part]
        d = _part_dir(store_dir, j)
        d.mkdir(parents=True, exist_ok=True)
        flat = torch.cat(part).to(torch.float16).numpy().astype("<f2", copy=False)  # (T_j, dim)
        (d / TOKENS_FILE).write_bytes(np.ascontiguousarray(flat).tobytes())
        lengths = [int(p.shape[0]) for p in part]
        atomic_write_json(d / PART_META, {
            "part": j, "first_page": first, "n_pages": len(part), "dim": int(part[0].shape[1]),
            "n_tokens": sum(lengths), "lengths": lengths, "rep_rows": list(range(first, first + len(part))),
            "sha1": [f"synthetic-{u}" for u in range(first, first + len(part))], "skipped": [], "seconds": 0.0,
            "pages_encoded": len(part), "encoded_by": "bench/mining.py"})
    return PageStore(store_dir, spec)


# ------------------------------------------------------------------------------------------------- exact MaxSim


def fit_quadratic(sizes: list[int], seconds: list[float]) -> float:
    """a of seconds = a x N^2, least squares through the origin: a = sum(N^2 t) / sum(N^4)."""
    n2 = np.asarray(sizes, dtype=np.float64) ** 2
    return float((n2 * np.asarray(seconds)).sum() / (n2 * n2).sum())


def exact_rows(args, device: torch.device) -> list[dict[str, Any]]:
    from colintern.retriever.scoring import maxsim

    rows = []
    for n in args.sizes:
        qs, docs = clustered_corpus(n, n, args.q_len, args.d_len, args.dim, args.seed + n)
        q_tok, d_tok = sum(q.shape[0] for q in qs), sum(d.shape[0] for d in docs)
        gflop = 2 * args.dim * q_tok * d_tok / 1e9
        before = loadavg()
        score = functools.partial(maxsim, qs, docs, device=device)
        times = [timed(score, device)[0] for _ in range(args.repeats)]
        t = min(times)
        rows.append({"n": n, "query_tokens": q_tok, "page_tokens": d_tok, "gflop": gflop, "seconds": t,
                     "all_s": times, "gflops": gflop / t, "pairs_per_s": n * n / t, "load_before": before,
                     "load_after": loadavg()})
        log.info("exact MaxSim %d x %d: %.2f s (%.1f GFLOP/s)", n, n, t, gflop / t)
        del qs, docs
    return rows


def extrapolate(rows: list[dict[str, Any]], args) -> dict[str, Any]:
    """Time of target_queries x target_pages from the N^2 fit, and from the rate of the largest run."""
    a = fit_quadratic([r["n"] for r in rows], [r["seconds"] for r in rows])
    mean_q = (args.q_len[0] + args.q_len[1]) / 2
    mean_d = (args.d_len[0] + args.d_len[1]) / 2
    work_gflop = 2 * args.dim * args.target_queries * mean_q * args.target_pages * mean_d / 1e9
    largest = max(rows, key=lambda r: r["n"])
    fit_s = a * args.target_queries * args.target_pages  # a N^2 with N^2 -> queries x pages
    return {"target_queries": args.target_queries, "target_pages": args.target_pages, "fit_a_s_per_pair": a,
            "fit_seconds": fit_s, "fit_hours": fit_s / 3600, "fit_days": fit_s / 86400,
            "work_gflop": work_gflop, "rate_gflops_largest": largest["gflops"],
            "rate_seconds": work_gflop / largest["gflops"], "mean_query_tokens": mean_q, "mean_page_tokens": mean_d,
            "fit_residuals": [r["seconds"] - a * r["n"] ** 2 for r in rows]}


# ------------------------------------------------------------------------------------------------- FAISS vs exact


def pooled_row(qs: list[torch.Tensor], pages: list[torch.Tensor], pairs, exact, args) -> dict[str, Any]:
    """The single-vector alternative (the seed's miner): mean-pooled, L2-normalised page and query vectors in a
    FAISS inner-product index; a query's negatives are its nearest pages other than its positive."""
    import faiss

    t0 = time.perf_counter()
    page_vecs = np.stack([p.numpy().mean(0) for p in pages]).astype(np.float32)  # (P, dim)
    faiss.normalize_L2(page_vecs)
    index = faiss.IndexFlatIP(page_vecs.shape[1])
    index.add(page_vecs)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    q_vecs = np.stack([q.numpy().mean(0) for q in qs]).astype(np.float32)  # (Q, dim)
    faiss.normalize_L2(q_vecs)
    _, ids = index.search(q_vecs, min(len(pages), args.candidates + 1))  # (Q, candidates + 1)
    search_s = time.perf_counter() - t0
    cand_hits = neg_hits = total = 0
    for r, (p, (negs_e, _, _)) in enumerate(zip(pairs, exact)):
        found = ids[r][(ids[r] >= 0) & (ids[r] != p.page)]
        total += len(negs_e)
        cand_hits += int(np.isin(negs_e, found[:args.candidates]).sum())
        neg_hits += int(np.isin(negs_e, found[:args.k]).sum())
    return {"method": "pooled (seed)", "index": "Flat, 1 vector/page", "build_s": build_s, "search_s": search_s,
            "queries_per_s": len(qs) / search_s, "candidate_recall": cand_hits / total if total else None,
            "negatives_overlap": neg_hits / total if total else None, "speedup_vs_exact": None}


def faiss_rows(args, device: torch.device, tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """mine.py's two search paths on the same page store and queries: time and recall of FAISS vs exact."""
    from colintern.index.faiss_index import build_faiss_index
    from colintern.mine.search import Pair, exact_search, faiss_search, positive_scores
    from colintern.retriever.scoring import maxsim

    qs, pages = clustered_corpus(args.faiss_pages, args.faiss_queries, args.q_len, args.d_len, args.dim,
                                 args.seed + 7)
    store = write_page_store(tmp / "store", pages)
    pairs = [Pair(row=i, text=f"query {i}", page=i % len(pages)) for i in range(len(qs))]
    positives = {p.text: np.asarray([p.page]) for p in pairs}
    which = np.arange(len(qs))
    fn_filter = args.fn_filter or None
    pos = positive_scores(qs, which, pairs, store, device)
    t_exact, exact = timed(lambda: exact_search(qs, which, pairs, pos, positives, store, maxsim, device, args.k,
                                                0, fn_filter), device)
    info = {"pages": len(pages), "queries": len(qs), "page_tokens": store.n_tokens, "k": args.k,
            "fn_filter": fn_filter, "exact_seconds": t_exact, "exact_queries_per_s": len(qs) / t_exact}
    log.info("exact search: %d queries x %d pages in %.1f s", len(qs), len(pages), t_exact)
    rows = [{"method": "exact", "index": "-", "build_s": 0.0, "search_s": t_exact, "queries_per_s": len(qs) / t_exact,
             "candidate_recall": 1.0, "negatives_overlap": 1.0, "speedup_vs_exact": 1.0}]
    rows.append(pooled_row(qs, pages, pairs, exact, args))
    for factory in args.faiss_index:
        t0 = time.perf_counter()
        index, index_info = build_faiss_index(store, factory, args.nprobe, False, 0, None, show_progress=False)
        build_s = time.perf_counter() - t0
        t_search, (res, cands, deepened) = timed(functools.partial(
            faiss_search, qs, which, pairs, pos, positives, store, index, device, args.k, 0, fn_filter,
            args.token_k, args.candidates, args.deepen), device)
        cand_hits = neg_hits = total = 0
        for r, ((negs_f, _, _), (negs_e, _, _)) in enumerate(zip(res, exact)):
            total += len(negs_e)
            cand_hits += int(np.isin(negs_e, cands[which[r]]).sum())
            neg_hits += int(np.isin(negs_e, negs_f).sum())
        row = {"method": "faiss", "index": index_info["factory"], "build_s": build_s, "search_s": t_search,
               "queries_per_s": len(qs) / t_search, "candidate_recall": cand_hits / total if total else None,
               "negatives_overlap": neg_hits / total if total else None, "deepened": deepened,
               "speedup_vs_exact": t_exact / t_search, "nprobe": index_info.get("nprobe"),
               "token_k": args.token_k, "candidates": args.candidates}
        rows.append(row)
        log.info("faiss %s: build %.1f s, search %.1f s, candidate recall %.3f", row["index"], build_s, t_search,
                 row["candidate_recall"] or float("nan"))
        del index
    return rows, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[125, 250, 500, 1000],
                   help="N of the exact N queries x N pages runs (default: 125 250 500 1000)")
    p.add_argument("--q_len", type=int, nargs=2, default=[20, 40], metavar=("MIN", "MAX"),
                   help="query tokens, uniform (default: 20 40)")
    p.add_argument("--d_len", type=int, nargs=2, default=[800, 1800], metavar=("MIN", "MAX"),
                   help="page tokens, uniform (default: 800 1800)")
    p.add_argument("--dim", type=int, default=128, help="token dimension (default: 128)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per N, best kept (default: 1)")
    p.add_argument("--target_queries", type=int, default=COLPALI_TRAIN_ROWS,
                   help=f"queries to extrapolate to (default: {COLPALI_TRAIN_ROWS:,}, colpali_train_set's rows)")
    p.add_argument("--target_pages", type=int, default=COLPALI_TRAIN_ROWS,
                   help=f"pages to extrapolate to (default: {COLPALI_TRAIN_ROWS:,}: every row its own page, the "
                        "upper bound)")
    p.add_argument("--faiss_pages", type=int, default=1000, help="pages of the FAISS vs exact comparison "
                   "(default: 1000; 0 = skip it)")
    p.add_argument("--faiss_queries", type=int, default=200, help="queries of that comparison (default: 200, "
                   "mine.py's --recall_sample)")
    p.add_argument("--faiss_index", nargs="+", default=["Flat", "IVF1024,PQ32"],
                   help="FAISS index_factory strings to compare (default: Flat IVF1024,PQ32; mine.py's \"auto\" is "
                        "Flat up to 3M page tokens, IVF<~4 sqrt(tokens)>,PQ32 above; pass auto to run it)")
    p.add_argument("--k", type=int, default=20, help="negatives per query (default: 20, mine.py's)")
    p.add_argument("--candidates", type=int, default=100, help="FAISS candidates re-ranked (default: 100)")
    p.add_argument("--token_k", type=int, default=256, help="FAISS hits per query token (default: 256)")
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists searched (default: 32)")
    p.add_argument("--deepen", type=int, default=2, help="mine.py --deepen (default: 2)")
    p.add_argument("--fn_filter", type=float, default=0.95, help="mine.py --fn_filter (default: 0.95; 0 = off)")
    p.add_argument("--device", default=None, help="scoring device: cpu / cuda (default: cuda when available)")
    p.add_argument("--matmul_n", type=int, default=None, help="size of the square matmul that measures the "
                   "device's ceiling, before and after the runs (default: 8192 on a GPU, 4096 on a CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic embeddings (default: 0)")
    p.add_argument("--json_out", default="outputs/bench/mining.json", help="result file "
                   "(default: outputs/bench/mining.json)")
    args = p.parse_args(argv)
    if min(args.sizes) < 1 or args.repeats < 1 or args.faiss_pages < 0 or args.faiss_queries < 1:
        raise UserError("--sizes, --repeats and --faiss_queries must be at least 1, --faiss_pages at least 0")
    if not 1 <= args.q_len[0] <= args.q_len[1] or not 1 <= args.d_len[0] <= args.d_len[1]:
        raise UserError("--q_len and --d_len need 1 <= MIN <= MAX")
    setup_logging()
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load_before = loadavg()
    ceiling = matmul_tflops(device, torch.float32, args.matmul_n) * 1e3  # GFLOP/s, fp32 (MaxSim scores in fp32)

    rows = exact_rows(args, device)
    extra = extrapolate(rows, args)
    frows, finfo = [], None
    if args.faiss_pages:
        with tempfile.TemporaryDirectory(prefix="bench_mining_") as tmp:
            frows, finfo = faiss_rows(args, device, Path(tmp))

    ceiling = max(ceiling, matmul_tflops(device, torch.float32, args.matmul_n) * 1e3)  # best of before and after
    for r in frows:
        if r["method"] == "faiss":  # its cost is per query (first stage + re-rank of a fixed number of pages)
            r["seconds_per_query"] = r["search_s"] / finfo["queries"]
            r["target_hours_at_this_rate"] = r["seconds_per_query"] * args.target_queries / 3600
    info = env(device)
    print(f"\nMining, synthetic clustered embeddings (queries {args.q_len[0]}-{args.q_len[1]} tokens, pages "
          f"{args.d_len[0]}-{args.d_len[1]}, dim {args.dim}) on {info['device']}; torch {info['torch']}, faiss "
          f"{info['faiss']}; fp32 matmul ceiling {ceiling:.0f} GFLOP/s; load {load_before} -> {loadavg()}")
    print("\nexact MaxSim, N queries x N pages (colintern.retriever.scoring.maxsim):")
    for r in rows:
        r["pct_ceiling"] = 100 * r["gflops"] / ceiling
        r["fit_s"] = extra["fit_a_s_per_pair"] * r["n"] ** 2
    print_table(rows, [("n", "N", "d"), ("page_tokens", "page tokens", "d"), ("gflop", "GFLOP", ".0f"),
                       ("seconds", "seconds", ".2f"), ("fit_s", "fit a*N^2", ".2f"), ("gflops", "GFLOP/s", ".1f"),
                       ("pct_ceiling", "% ceiling", ".0f"), ("pairs_per_s", "pairs/s", ".0f")])
    print(f"extrapolated to {args.target_queries:,} queries x {args.target_pages:,} pages: "
          f"{extra['fit_hours']:.1f} h = {extra['fit_days']:.2f} days from the N^2 fit "
          f"(a = {extra['fit_a_s_per_pair']:.3e} s per pair); {extra['rate_seconds'] / 3600:.1f} h from the "
          f"work ({extra['work_gflop'] / 1e6:.1f} PFLOP) at the largest run's "
          f"{extra['rate_gflops_largest']:.1f} GFLOP/s")
    if frows:
        print(f"\nFAISS first stage + exact re-rank vs exact search (mine.py's paths): {finfo['queries']} queries x "
              f"{finfo['pages']} pages ({finfo['page_tokens']:,} page tokens), k={args.k}, candidates "
              f"{args.candidates}, token_k {args.token_k}, fn_filter {finfo['fn_filter']}:")
        print_table(frows, [("method", "method", "s"), ("index", "index", "s"), ("build_s", "build s", ".1f"),
                            ("search_s", "search s", ".2f"), ("queries_per_s", "queries/s", ".1f"),
                            ("speedup_vs_exact", "x exact", ".2f"), ("candidate_recall", "cand. recall@k", ".3f"),
                            ("negatives_overlap", "negs = exact", ".3f"),
                            ("target_hours_at_this_rate", f"h for {args.target_queries:,} q", ".1f")])
        print("(FAISS hours: this run's seconds per query x the target queries; its first stage grows with the "
              "index (IVF lists ~ sqrt(tokens)), so this is a lower bound)")
    write_json(args.json_out, {
        "benchmark": "mining", **info, "data": "synthetic clustered unit vectors (see bench/mining.py)",
        "q_len": args.q_len, "d_len": args.d_len, "dim": args.dim, "fp32_ceiling_gflops": ceiling,
        "loadavg_before": load_before, "loadavg_after": loadavg(), "exact": rows, "extrapolation": extra,
        "faiss": {"setup": finfo, "rows": frows} if frows else None,
    })
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
