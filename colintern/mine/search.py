"""Hard-negative search over a page store (colintern/mine/page_store.py): candidates and negative selection.

Per query (colintern/mine/miner.py drives it): the positive score, then candidates (exact: every page; faiss: first
stage + exact re-rank), then select_negatives (positives removed, false-negative filter, skip_top, top k).

Scores are the exact late-interaction score of colintern.retriever.scoring.maxsim: the SUM over query tokens of the max
over page tokens (ColBERT / ColPali / mteb). The docs/CONTRACT.md §5 loss uses the mean over query tokens; the
ranking of pages for one query and the ratio of fn_filter are the same under both.

Why FAISS indexes page *token* vectors (the ColBERT / PLAID first stage) and not one vector per page: a mean-
pooled page vector (the seed's miner) throws away the late interaction, so its neighbours are pages that look
alike on average, not pages that answer the query's individual terms. Indexing every page token vector in an
inner-product index and searching with every query token finds pages that own a token close to some query
token; a page's approximate score is sum_i max(best hit of query token i on the page, tau_i), where tau_i (the
score of token i's last hit) stands in for hits that were not retrieved (XTR's missing-similarity imputation,
an upper bound of the true max). The top `candidates` pages by that score are re-ranked with exact MaxSim;
`candidate_recall` (mine.py) measures how much of the exact top-k the candidates hold.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from colintern.data.report import BadRowError
from colintern.mine.page_store import PagePlan, PageStore, PageTokens
from colintern.retriever.scoring import exact_fp32

log = logging.getLogger("colintern.mine.search")


# ---------------------------------------------------------------- queries and positives


@dataclass
class Pair:
    """One output line: a query text and its own positive page."""

    row: int                 # first dataset row with this (query, page)
    text: str
    page: int                # unique page index of the positive


@dataclass
class PairPlan:
    pairs: list[Pair]
    positives: dict[str, np.ndarray]   # query text -> every page that is a positive for it (sorted)
    duplicate_rows: int                # rows repeating an earlier (query, page)
    bad_rows: list[tuple[int, str]] = field(default_factory=list)


def plan_pairs(queries: Sequence[Any], plan: PagePlan, store: PageStore, bad_image_rows: set[int],
               check: Callable[[Any, str], str], where: Callable[[int], str],
               page_only: frozenset[int] = frozenset()) -> PairPlan:
    """One pair per distinct (query text, page), in dataset order.

    The positives of a query are all rows that share its page, the pages of other rows with the same query
    text (the same question asked of two pages: neither may be the other's negative), and pages whose image
    bytes equal a positive's (the same page stored under two file names).
    Rows with an empty query, a failed image, or a page without any decodable image are reported, not used.
    Rows in `page_only` (a corpus page no query asks for, e.g. a triples file's negatives) only add pages.
    """
    bad: list[tuple[int, str]] = []
    positives: dict[str, set[int]] = {}
    seen: set[tuple[str, int]] = set()
    pairs: list[Pair] = []
    duplicates = 0
    for row, value in enumerate(queries):
        if row in bad_image_rows or row in page_only:
            continue  # reported by the encoder with its reason / a page without a query
        u = int(plan.page_of_row[row])
        try:
            text = check(value, where(row))
        except BadRowError as err:
            bad.append((row, err.reason))
            continue
        if not store.valid[u]:
            bad.append((row, "missing image: no row of its page has a decodable image"))
            continue
        positives.setdefault(text, set()).add(u)
        if (text, u) in seen:
            duplicates += 1
            continue
        seen.add((text, u))
        pairs.append(Pair(row=row, text=text, page=u))
    # pages with the same image bytes under another name are the same page: positives too
    same_content: dict[str, list[int]] = {}
    for page in store.valid_ids:
        same_content.setdefault(store.sha1[page], []).append(int(page))
    for pages in positives.values():
        pages.update([v for u in list(pages) for v in same_content.get(store.sha1[u], ())])
    pos = {t: np.asarray(sorted(s), dtype=np.int64) for t, s in positives.items()}
    return PairPlan(pairs=pairs, positives=pos, duplicate_rows=duplicates, bad_rows=bad)


# ---------------------------------------------------------------- scoring and selection


def unique_texts(pairs: Sequence[Pair]) -> tuple[list[str], np.ndarray]:
    """Distinct query texts of a batch (first-appearance order) and each pair's index into them."""
    index: dict[str, int] = {}
    which = np.asarray([index.setdefault(p.text, len(index)) for p in pairs], dtype=np.int64)
    return list(index), which


def rerank_chunk_tokens(device: Any) -> int:
    """Padded page tokens scored per GEMM in a re-rank.

    On a CPU a 4,096-token block (2 MiB of fp32) and its similarity tile stay in cache between the fp16 -> fp32
    conversion, the GEMM and the max: 4x faster than one block of all candidates (bench/mining.py, BENCHMARKS.md).
    On a GPU fewer, larger transfers and launches win.
    """
    return 4096 if torch.device(device).type == "cpu" else 1 << 20


@torch.no_grad()
def own_candidate_scores(q: torch.Tensor, ids: np.ndarray, store: PageTokens, device: Any,
                         chunk_tokens: int | None = None) -> np.ndarray:
    """Exact sum-MaxSim of ONE query against its own list of pages -> (len(ids),) float32.

    colintern.retriever.scoring.maxsim scores every query against every page; re-ranking needs each query against its
    own candidates only. Candidates are taken shortest first and packed into padded (n, Lmax, dim) blocks of at
    most chunk_tokens tokens (padding = copies of a real token, exact; sorting keeps it small), one GEMM each.
    """
    out = np.empty(len(ids), dtype=np.float32)
    if not len(ids):
        return out
    budget = chunk_tokens or rerank_chunk_tokens(device)
    order = np.argsort(store.lengths[ids], kind="stable")  # (n,) shortest first
    lengths = store.lengths[ids][order]
    qd = q.to(device=device, dtype=torch.float32)  # (Lq, dim)
    with exact_fp32(torch.device(device)):
        start = 0
        while start < len(ids):
            # the block's Lmax is its last (longest) page: grow while n x Lmax fits the budget (at least 1 page)
            block_sizes = np.arange(1, len(ids) - start + 1) * lengths[start:]  # ascending
            end = start + max(1, int(np.searchsorted(block_sizes, budget, side="right")))
            sel = order[start:end]
            block = store.padded(ids[sel], device)  # (n, Lmax, dim)
            n, lmax, dim = block.shape
            sim = qd @ block.view(n * lmax, dim).T  # (Lq, n*Lmax)
            out[sel] = sim.view(-1, n, lmax).amax(-1).sum(0).cpu().numpy()  # (n,)
            start = end
    return out


def positive_scores(qs: list[torch.Tensor], which: np.ndarray, pairs: Sequence[Pair], store: PageStore,
                    device: Any) -> np.ndarray:
    """(n_pairs,) float32 exact score of every pair's own positive page (the same for both methods)."""
    return np.asarray([own_candidate_scores(qs[which[r]], np.asarray([p.page]), store, device)[0]
                       for r, p in enumerate(pairs)], dtype=np.float32)


def select_negatives(pages: np.ndarray, scores: np.ndarray, positives: np.ndarray, threshold: float | None,
                     skip_top: int, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Negatives of one query from scored candidates -> (pages, scores, number dropped by the fn filter).

    Positives are removed; with a threshold (fn_filter x positive score) every candidate scoring above it is
    dropped as a probable false negative; the rest is ranked by score (ties: lower page index first) and
    ranks skip_top .. skip_top+k-1 are returned.
    """
    keep = ~np.isin(pages, positives)
    n_filtered = 0
    if threshold is not None:
        above = keep & (scores > threshold)
        n_filtered = int(above.sum())
        keep &= ~above
    p, s = pages[keep], scores[keep]
    order = np.lexsort((p, -s))[skip_top:skip_top + k]
    return p[order], s[order], n_filtered


def exact_search(qs: list[torch.Tensor], which: np.ndarray, pairs: Sequence[Pair], pos_scores: np.ndarray,
                 positives: dict[str, np.ndarray], store: PageStore, maxsim: Callable, device: Any,
                 k: int, skip_top: int, fn_filter: float | None) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Score every valid page exactly, streaming the store part by part; keep a running top-(k+skip_top).

    Positives and fn-filtered pages are masked (-inf) before the running top-k, so the result equals
    select_negatives over the whole corpus.
    """
    n = len(pairs)
    depth = k + skip_top
    thr = (torch.from_numpy(pos_scores * fn_filter).unsqueeze(1) if fn_filter
           else torch.full((n, 1), float("inf")))  # (n, 1)
    run_v = torch.empty(n, 0)
    run_i = torch.empty(n, 0, dtype=torch.long)
    filtered = torch.zeros(n, dtype=torch.long)
    which_t = torch.from_numpy(which)
    pos_lists = [positives[p.text] for p in pairs]
    for ids, docs in store.iter_parts(device):
        s = maxsim(qs, docs, device=device)[which_t]  # (n, n_part) float32
        ids_t = torch.from_numpy(ids)
        is_pos = torch.zeros_like(s, dtype=torch.bool)
        for r, pl in enumerate(pos_lists):
            hit = np.flatnonzero(np.isin(ids, pl))
            if len(hit):
                is_pos[r, torch.from_numpy(hit)] = True
        above = (s > thr) & ~is_pos
        filtered += above.sum(1)
        s = s.masked_fill(is_pos | above, float("-inf"))
        cat_v = torch.cat([run_v, s], 1)
        cat_i = torch.cat([run_i, ids_t.expand(n, len(ids))], 1)
        # stable: among equal scores the running entries (lower page ids) stay first, then ascending ids
        v, order = torch.sort(cat_v, dim=1, descending=True, stable=True)
        run_v, run_i = v[:, :depth], cat_i.gather(1, order[:, :depth])
    out = []
    for r in range(n):
        finite = torch.isfinite(run_v[r])
        values, ids_r = run_v[r][finite].numpy(), run_i[r][finite].numpy()
        out.append((ids_r[skip_top:], values[skip_top:], int(filtered[r])))
    return out


# Below this many page tokens exact search is as fast as FAISS and has no approximation; above it an IVF-PQ first
# stage pays for its build. Measured on a 2-core CPU (docs/BENCHMARKS.md, "Mining"), per query / build: 1.3M tokens
# exact 58 ms, IVF1024,PQ32 35 ms / 35 s, Flat 78 ms (the same GEMMs as exact plus top-k heaps); 2.6M tokens exact
# 134 ms, IVF8192,PQ32 (auto) 53 ms / 209 s. With one query per page the totals meet near 3M tokens.
AUTO_EXACT_MAX_TOKENS = 3_000_000


def choose_method(method: str, n_tokens: int, on_gpu: bool) -> tuple[str, str]:
    """--method auto -> ("exact" | "faiss", why): exact on a GPU or up to AUTO_EXACT_MAX_TOKENS page tokens."""
    if method != "auto":
        return method, "asked for"
    if on_gpu:
        return "exact", "exact MaxSim runs at GEMM speed on a GPU"
    if n_tokens <= AUTO_EXACT_MAX_TOKENS:
        return "exact", f"{n_tokens:,} page tokens <= {AUTO_EXACT_MAX_TOKENS:,}: exact is as fast as FAISS here"
    return "faiss", f"{n_tokens:,} page tokens > {AUTO_EXACT_MAX_TOKENS:,}: an IVF-PQ first stage is faster"


def faiss_candidates(index: Any, qs_np: list[np.ndarray], store: PageTokens, token_k: int,
                     n_candidates: int) -> list[np.ndarray]:
    """First stage: the n_candidates pages with the best approximate score, per query (best first).

    Every query token retrieves its token_k nearest page tokens; a page's approximate score is
    sum_i max(tau_i, best hit of token i on the page) with tau_i the score of token i's last hit. Pages
    without any hit all score sum_i tau_i and fill remaining slots in page order, so `n_candidates` is a
    true depth: when it covers the corpus, the candidates are the whole corpus.
    """
    lens = [q.shape[0] for q in qs_np]
    all_tok = np.concatenate(qs_np).astype(np.float32, copy=False)  # (T, dim)
    kk = min(token_k, store.n_tokens)
    dist, ids = index.search(all_tok, kk)  # (T, kk): scores descending per row, token ids (-1 = none)
    pages = store.token_pages(ids)  # (T, kk)
    n_pages = store.spec.n_pages
    n_cand = min(n_candidates, store.n_valid)
    out = []
    start = 0
    for length in lens:
        d, p = dist[start:start + length], pages[start:start + length]  # (Lq, kk)
        start += length
        ok = p >= 0
        # tau_i: the score of token i's last hit (0 when it retrieved nothing)
        tau = np.where(ok.any(1), np.where(ok, d, np.inf).min(1), 0.0)  # (Lq,)
        rows, cols = np.nonzero(ok)  # row-major: within a row, hits come best first
        key = rows * n_pages + p[rows, cols]
        _, first = np.unique(key, return_index=True)  # first hit = best hit of (token, page)
        best_rows, best_pages = rows[first], p[rows[first], cols[first]]
        gain = d[best_rows, cols[first]] - tau[best_rows]  # >= 0
        hit_pages, inv = np.unique(best_pages, return_inverse=True)
        approx = tau.sum() + np.bincount(inv.reshape(-1), weights=gain, minlength=len(hit_pages))
        cand = hit_pages[np.lexsort((hit_pages, -approx))[:n_cand]]
        if len(cand) < n_cand:  # too few pages were hit: fill with unhit pages (all tied at sum(tau))
            extra = store.valid_ids[:n_cand + len(hit_pages)]
            extra = extra[~np.isin(extra, hit_pages)][:n_cand - len(cand)]
            cand = np.concatenate([cand, extra])
        out.append(cand.astype(np.int64))
    return out


def faiss_search(qs: list[torch.Tensor], which: np.ndarray, pairs: Sequence[Pair], pos_scores: np.ndarray,
                 positives: dict[str, np.ndarray], store: PageStore, index: Any, device: Any,
                 k: int, skip_top: int, fn_filter: float | None, token_k: int, n_candidates: int,
                 deepen: int = 0, max_token_k: int | None = None
                 ) -> tuple[list[tuple[np.ndarray, np.ndarray, int]], list[np.ndarray], int]:
    """FAISS first stage + exact re-rank -> (per pair (negs, scores, n_filtered), per text candidates, deepened).

    Positives and the false-negative filter can eat a query's best candidates (a page set with many near
    duplicates, or an undertrained model whose scores are all close). A query left with fewer than k negatives
    whose candidates do not cover the corpus is searched again with 4x the depth (candidates and token_k), up
    to `deepen` times, so that it gets what exact search would give it instead of a short list.
    """
    qs_np = [q.float().numpy() for q in qs]
    cands: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(qs)
    cand_scores: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * len(qs)
    out: list[tuple[np.ndarray, np.ndarray, int] | None] = [None] * len(pairs)
    todo = list(range(len(qs)))  # unique texts still to (re)search
    depth, tk = n_candidates, token_k
    deepened: set[int] = set()
    for round_ in range(deepen + 1):
        found = faiss_candidates(index, [qs_np[u] for u in todo], store, tk, depth)
        for u, c in zip(todo, found):
            cands[u] = c
            cand_scores[u] = own_candidate_scores(qs[u], c, store, device)
        redo = set()
        todo_set = set(todo)
        for r, p in enumerate(pairs):
            u = int(which[r])
            if u not in todo_set:
                continue
            thr = float(pos_scores[r] * fn_filter) if fn_filter else None
            chosen = out[r] = select_negatives(cands[u], cand_scores[u], positives[p.text], thr, skip_top, k)
            if len(chosen[0]) < k and len(cands[u]) < store.n_valid:
                redo.add(u)
        if not redo or round_ == deepen:
            break
        todo = sorted(redo)
        deepened.update(redo)
        depth *= 4
        tk = min(tk * 4, max_token_k) if max_token_k else tk * 4
    return out, cands, len(deepened)  # type: ignore[return-value]
