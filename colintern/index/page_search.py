"""Query-time search over a search.py index folder: exact MaxSim, or a FAISS first stage + exact re-rank.

    exact   every query against every page (colintern.retriever.scoring.maxsim_topk): the ceiling, no approximation
    faiss   a FAISS index over every page token, built once and cached in the index folder. Large indexes (IVF-PQ):
            PLAID-style centroid interaction ranks the pages by the similarity of each query token to the IVF
            centroids of the page's tokens (nprobe centroids per query token). Small ones (Flat): each query
            token retrieves its token_k nearest page tokens, as mine.py does (colintern.mine.search.faiss_candidates).
            Either way the best `candidates` pages are re-ranked by exact MaxSim.
    auto    exact up to AUTO_FAISS_MIN_TOKENS page tokens, FAISS above (docs/BENCHMARKS.md, "Search latency").

`--check_recall` also runs exact search and logs the FAISS result's recall@k against it: the number to watch when
choosing --nprobe / --candidates.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from colintern.errors import UserError
from colintern.index.page_index import PageIndex
from colintern.mine.page_store import PageTokens

log = logging.getLogger("colintern.search")

# Above this many page tokens a query answered by the FAISS first stage is faster than exact MaxSim on a CPU
# (bench/search_latency.py: exact costs ~2 * 128 * 25 FLOP per page token and query; FAISS IVF-PQ about constant).
AUTO_FAISS_MIN_TOKENS = 2_000_000


class TokenView(PageTokens):
    """The visible pages of an index as the page store the mining FAISS functions read: token vectors in page
    order (global token id -> page), lengths, and (from PageTokens) padded fp32 blocks for the exact re-rank."""

    def __init__(self, index: PageIndex):
        self.index = index
        self.dim = int(index.meta["config"]["dim"])
        self.lengths = np.asarray([p["length"] for p in index.pages], dtype=np.int64)  # (n_pages,)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])  # (n_pages+1,) global token offsets
        self.n_tokens = int(self.starts[-1])
        self.n_valid = len(index.pages)
        self.valid_ids = np.arange(self.n_valid)
        self.spec = type("Spec", (), {"n_pages": self.n_valid})()

    def page_array(self, u: int) -> np.ndarray:
        return self.index.page_rows(u)  # (L, dim) fp16

    def iter_token_chunks(self, chunk: int = 1 << 18) -> Iterator[np.ndarray]:
        """Every page token in global token order, float32 (n, dim) chunks of about `chunk` rows."""
        buffer: list[np.ndarray] = []
        rows = 0
        for u in range(self.n_valid):
            buffer.append(self.page_array(u))
            rows += len(buffer[-1])
            if rows >= chunk:
                yield np.concatenate(buffer).astype(np.float32)
                buffer, rows = [], 0
        if buffer:
            yield np.concatenate(buffer).astype(np.float32)

    def sample_tokens(self, n: int, seed: int = 0) -> np.ndarray:
        """n token vectors drawn uniformly without replacement (float32), to train an IVF index."""
        picks = np.sort(np.random.default_rng(seed).choice(self.n_tokens, size=min(n, self.n_tokens), replace=False))
        pages = self.token_pages(picks)
        return np.stack([self.page_array(int(u))[t - self.starts[u]] for t, u in zip(picks, pages)]).astype(np.float32)



def resident_pages(index: PageIndex, device: Any = "cpu", start: int = 0, end: int | None = None) -> Any:
    """Pages start..end of the index (default: all) packed as float32 in memory (colintern.retriever.scoring.PackedDocs):
    what exact search scores. Kept by a process that answers many queries (search.py serve, Index.keep_resident), it
    costs 4 bytes per stored value, twice the index's tokens.f16 files, and each query then only computes."""
    from colintern.retriever.scoring import PackedDocs

    end = len(index.pages) if end is None else end
    return PackedDocs([p["length"] for p in index.pages[start:end]],
                      lambda u: torch.from_numpy(np.array(index.page_rows(start + u))), device)


def resident_bytes(index: PageIndex) -> int:
    """The memory resident_pages would take (before the few padding tokens of its length buckets)."""
    return 4 * int(index.meta["config"]["dim"]) * sum(p["length"] for p in index.pages)


def exact_topk(index: PageIndex, qs: list[torch.Tensor], k: int, device: Any,
               group_tokens: int = 1 << 21, resident: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(n_q, k) scores and page ids by exact MaxSim against every page (best first, ties: lower page id).

    resident: every page from resident_pages (a warm process), scored as it is. Otherwise pages are packed as
    float32 a group of about group_tokens tokens at a time (1 GiB at dim 128) and the running top-k is merged group
    by group, so a large index never sits in memory as float32 all at once."""
    from colintern.retriever.scoring import maxsim_topk

    if resident is not None and len(resident) != len(index.pages):
        raise ValueError(f"resident pages ({len(resident)}) are not this index's ({len(index.pages)})")
    lengths = np.asarray([p["length"] for p in index.pages], dtype=np.int64)  # (n_pages,)
    values = np.empty((len(qs), 0), dtype=np.float32)
    ids = np.empty((len(qs), 0), dtype=np.int64)
    start = 0
    while start < len(lengths):
        end = len(lengths) if resident is not None else \
            start + max(1, int(np.searchsorted(np.cumsum(lengths[start:]), group_tokens, side="right")))
        pages = resident if resident is not None else resident_pages(index, device, start, end)
        v, i = maxsim_topk(qs, pages, k)  # (n_q, <= k), ties: lower id first
        values, ids = np.concatenate([values, v.numpy()], 1), np.concatenate([ids, i.numpy() + start], 1)
        order = np.argsort(-values, axis=1, kind="stable")[:, :k]  # earlier groups (lower ids) first among ties
        values, ids = np.take_along_axis(values, order, 1), np.take_along_axis(ids, order, 1)
        start = end
    refuse_non_finite(index, values, ids)
    return values, ids


def refuse_non_finite(index: PageIndex, values: np.ndarray, ids: np.ndarray) -> None:
    """A NaN or infinite score comes from damaged stored vectors (topk puts NaN first): one line naming the
    segment, instead of printing nan."""
    bad = sorted({index.pages[int(i)]["segment"] for i in ids[~np.isfinite(values)]})
    if bad:
        raise UserError(f"{index.folder}: segment(s) {', '.join(bad)} hold non-finite vectors (damaged); run "
                        f"search.py verify --index {index.folder}, then search.py index to encode them again")


class CentroidInteraction:
    """PLAID-style candidates from an IVF index: a page's approximate score is, summed over the query tokens, the best
    similarity between the token and the IVF centroids of the page's tokens.

    Built once from the index's inverted lists (which list each page token fell in) as centroid -> pages lists and
    cached beside the index. Per query token only its `nprobe` most similar centroids are walked, best last, so a page
    holding one of them gets its exact centroid maximum and every other page the last walked centroid's similarity
    (an upper bound for that token, as FAISS hits use). Cheap: a few thousand array writes per query token instead of
    a token search, and no per-page work."""

    def __init__(self, ivf: Any, view: TokenView, cache: Path):
        from colintern.index.faiss_index import list_token_ids

        if cache.is_file():
            try:
                with np.load(cache) as data:
                    self.centroids, self.indptr, self.pages = data["centroids"], data["indptr"], data["pages"]
                return
            except (OSError, ValueError, KeyError):
                log.info("%s is unreadable: building it again", cache.name)
        token_list = np.empty(view.n_tokens, dtype=np.int64)  # (T,) the IVF list of each page token
        for lst in range(ivf.nlist):
            token_list[list_token_ids(ivf, lst)] = lst
        page_of_token = np.repeat(np.arange(view.n_valid, dtype=np.int64), view.lengths)  # (T,)
        pairs = np.unique(token_list * view.n_valid + page_of_token)  # distinct (centroid, page), by centroid
        self.pages = (pairs % view.n_valid).astype(np.int32)  # (nnz,)
        self.indptr = np.searchsorted(pairs // view.n_valid, np.arange(ivf.nlist + 1)).astype(np.int64)
        self.centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist).astype(np.float32)  # (nlist, dim)
        from colintern.files import atomic_write

        atomic_write(cache, lambda f: np.savez(f, centroids=self.centroids, indptr=self.indptr, pages=self.pages))

    def candidates(self, q: np.ndarray, n_pages: int, nprobe: int, n: int) -> np.ndarray:
        """The n best pages of one query (Lq, dim) by approximate score, best first (ties: lower page)."""
        # torch, not numpy: numpy's BLAS threads would still be spinning when the re-rank's torch GEMMs start, and
        # on a 2-core machine that contention made the re-rank 3-5x slower
        sims = (torch.from_numpy(q) @ torch.from_numpy(self.centroids).T).numpy()  # (Lq, nlist)
        nprobe = min(nprobe, sims.shape[1])
        top = np.argpartition(-sims, nprobe - 1, axis=1)[:, :nprobe]  # (Lq, nprobe)
        total = np.zeros(n_pages, dtype=np.float64)
        for row, cents in zip(sims, top):
            cents = cents[np.argsort(row[cents])]  # ascending: the last write to a page is its best centroid
            best = np.full(n_pages, row[cents[0]], dtype=np.float32)
            for c in cents:
                best[self.pages[self.indptr[c]:self.indptr[c + 1]]] = row[c]
            total += best
        return np.argsort(-total, kind="stable")[:n]


class FaissFirstStage:
    """FAISS over every page token of the index (cached in the folder), then exact MaxSim over the candidates.

    With an IVF index (large indexes) the candidates come from CentroidInteraction (nprobe centroids per query
    token); with a Flat index (small ones) from the token search of mining (token_k neighbours per query token)."""

    def __init__(self, index: PageIndex, nprobe: int = 32, token_k: int = 128, candidates: int = 128,
                 factory: str = "auto", use_gpu: bool = False, show_progress: bool = True):
        from colintern.index.faiss_index import build_faiss_index, ivf_of

        self.view, self.token_k, self.candidates = TokenView(index), token_k, candidates
        factory = search_factory(self.view.n_tokens) if factory == "auto" else factory
        state = json.dumps([index.meta["segments"], index.meta.get("hidden", []), index.meta.get("hidden_uids", []),
                            factory]).encode()
        cache = Path(index.folder) / f"faiss-{hashlib.sha1(state).hexdigest()[:12]}.index"
        for stale in Path(index.folder).glob("faiss-*"):
            if not stale.name.startswith(cache.stem + "."):  # built for pages (or a factory) that changed since
                stale.unlink(missing_ok=True)
        self.faiss, self.info = build_faiss_index(self.view, factory, nprobe, use_gpu, 0, cache, show_progress)
        self.index, self.nprobe = index, nprobe
        self.centroid_stage = None
        if "IVF" in self.info["factory"] and not self.info.get("gpu"):
            self.centroid_stage = CentroidInteraction(ivf_of(self.faiss), self.view,
                                                      cache.with_suffix(".centroids.npz"))
        log.info("FAISS first stage: %s over %s page tokens (%s), %d candidates per query re-ranked exactly",
                 self.info["factory"], f"{self.view.n_tokens:,}", "cached" if cache.is_file() else "in memory",
                 candidates)
        self.recall_probe(cache.with_suffix(".recall.json"))

    def recall_probe(self, path: Path, n_queries: int = 8, k: int = 10) -> float:
        """recall@k of these settings against exact search on n_queries probe queries (~25 noisy copies of tokens of
        a random page each), measured once per index and settings, stored beside the cached index and logged on
        every use: what the first stage is known to lose before any user query is checked (--check_recall)."""
        key = f"nprobe={self.nprobe},candidates={self.candidates},token_k={self.token_k},k={k}"
        known = json.loads(path.read_text()) if path.is_file() else {}
        if key not in known:
            g = torch.Generator().manual_seed(0)
            qs = []
            for u in torch.randint(0, self.view.n_valid, (n_queries,), generator=g).tolist():
                page = torch.from_numpy(self.view.page_array(u).astype(np.float32))
                picks = page[torch.randint(0, len(page), (25,), generator=g)]
                noise = torch.randn(picks.shape, generator=g) * (0.5 / math.sqrt(picks.shape[1]))
                qs.append(torch.nn.functional.normalize(picks + noise, dim=-1))
            _, exact = exact_topk(self.index, qs, k, "cpu")
            _, found = self.topk(qs, k, "cpu")
            known[key] = recall_at_k(found, exact)
            from colintern.files import atomic_write_json

            atomic_write_json(path, known)
        log.info("FAISS first stage (%s): recall@%d %.3f against exact search on %d probe queries made from the "
                 "index's own pages; --check_recall measures it on your queries", key, k, known[key], n_queries)
        return known[key]

    def topk(self, qs: list[torch.Tensor], k: int, device: Any, resident: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(n_q, k) scores and page ids: exact scores of the best candidates (ties: lower page id). resident: the
        pages from resident_pages, read instead of the segments' memory maps (a warm process)."""
        from colintern.mine.search import faiss_candidates, own_candidate_scores

        k = min(k, self.view.n_valid)
        depth = max(self.candidates, k)
        if self.centroid_stage is not None:
            found = [self.centroid_stage.candidates(q.float().numpy(), self.view.n_valid, self.nprobe, depth)
                     for q in qs]
        else:
            found = faiss_candidates(self.faiss, [q.float().numpy() for q in qs], self.view, self.token_k, depth)
        values, ids = np.empty((len(qs), k), dtype=np.float32), np.empty((len(qs), k), dtype=np.int64)
        for r, (q, cand) in enumerate(zip(qs, found)):
            scores = (resident_candidate_scores(q, cand, resident) if resident is not None
                      else own_candidate_scores(q, cand, self.view, device))
            order = np.lexsort((cand, -scores))[:k]
            values[r], ids[r] = scores[order], cand[order]
        return values, ids


@torch.no_grad()
def resident_candidate_scores(q: torch.Tensor, cand: np.ndarray, resident: Any) -> np.ndarray:
    """Exact sum-MaxSim of one query (Lq, dim) against its candidate pages held in resident pages (PackedDocs): one
    GEMM per page on its float32 tokens where they lie (no copy, no widening) -> (len(cand),) float32."""
    from colintern.retriever.scoring import exact_fp32

    out = np.empty(len(cand), dtype=np.float32)
    qd = q.to(device=resident.device, dtype=torch.float32)  # (Lq, dim)
    with exact_fp32(resident.device):
        for r, u in enumerate(cand.tolist()):
            out[r] = float((qd @ resident.doc(u).T).amax(dim=1).sum())  # (Lq, L) -> best per query token -> sum
    return out


def search_factory(n_tokens: int) -> str:
    """The FAISS index of --first_stage faiss: exact "Flat" for small indexes, else IVF-PQ (32 bytes per token) with
    about 4 sqrt(n) lists, capped at 4,096: assigning every token to its list costs n x lists dot products at build
    time (18 M tokens x 16,384 lists would take ~20 min on 2 cores), and nprobe lists of 4,096 keep a query fast."""
    if n_tokens <= 200_000:
        return "Flat"
    lists = min(4096, int(2 ** round(math.log2(4 * math.sqrt(n_tokens)))))
    return f"IVF{lists},PQ32"


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found top-k ∩ exact top-k| / k."""
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / max(1, len(b)) for a, b in zip(found, exact)]))


def choose_first_stage(asked: str, n_tokens: int) -> tuple[str, str]:
    """--first_stage auto -> ("exact" | "faiss", why)."""
    if asked != "auto":
        return asked, "asked for"
    if n_tokens <= AUTO_FAISS_MIN_TOKENS:
        return "exact", f"{n_tokens:,} page tokens <= {AUTO_FAISS_MIN_TOKENS:,}"
    return "faiss", f"{n_tokens:,} page tokens > {AUTO_FAISS_MIN_TOKENS:,}"
