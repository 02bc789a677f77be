"""Retrieval evaluation helpers (eval.py): mteb tasks from local BEIR dirs, hub task data that fails fast when it
cannot be downloaded, unrounded retrieval metrics, and top-k run files.

- `local_task(dir)`: a docs/CONTRACT.md §7 BEIR-layout directory as an mteb retrieval task (name = the directory name,
  text queries -> page images, main score ndcg_at_5), so local sets go through the same mteb evaluation as ViDoRe.
- `use_local_copy(task, dir)`: point an installed mteb task (e.g. VidoreDocVQARetrieval) at a local copy of its
  hub dataset repo (the same configs/files as on the hub); the task's own loading code runs unchanged.
- `load_task_data(task)`: load a task's data now, turning "no network", "offline and not cached" and "not found"
  into one UserError line (a quick probe of the hub replaces 30 s of download retries).
- `retrieval_metrics(qrels, results)`: mteb's retrieval metrics (pytrec_eval, same definitions, same queries)
  without mteb's rounding to 5 decimals.
- `top_run(results, k)`: the top-k pages per query, ranked as pytrec_eval ranks them (score, then id, descending).
"""
from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any, Mapping

from colintern.errors import UserError

log = logging.getLogger("colintern.eval.evaluation")

K_VALUES = (1, 3, 5, 10, 20, 100, 1000)  # mteb's AbsTaskRetrieval.k_values
HUB_PROBE_TIMEOUT_S = 5.0


# ------------------------------------------------------------------------------------------------ local tasks


def _table_digest(root: Path) -> str:
    """12 hex digits over the BEIR tables' bytes (the dataset 'revision' recorded in mteb's result files)."""
    digest = hashlib.sha256()
    for name in ("corpus", "queries", "qrels"):
        for path in sorted(root.rglob(f"{name}.*")) + sorted(root.rglob(f"{name}/*")):
            if path.is_file():
                digest.update(path.name.encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


LANGUAGE_CODES = {"english": "eng-Latn", "french": "fra-Latn", "spanish": "spa-Latn", "german": "deu-Latn",
                  "italian": "ita-Latn", "portuguese": "por-Latn", "dutch": "nld-Latn", "japanese": "jpn-Jpan",
                  "chinese": "zho-Hans"}


def language_code(subset: str) -> str:
    """A subset folder's language: a known name (english, french, ...) or an ISO code written as the name."""
    if subset.lower() in LANGUAGE_CODES:
        return LANGUAGE_CODES[subset.lower()]
    if len(subset) == 8 and subset[3] == "-":  # e.g. eng-Latn
        return subset
    raise UserError(f"language subset {subset!r}: name it after its language (english, french, ...) or its ISO "
                    "code (eng-Latn)")


def _load_beir_subset(root: Path, path: str) -> tuple[Any, Any, dict[str, dict[str, int]], int]:
    """(corpus dataset, queries dataset, qrels, unjudged queries) of one BEIR-layout folder."""
    import datasets

    from colintern.data.beir import load_beir_dir

    try:
        corpus, queries, qrels = load_beir_dir(str(root))
    except UserError as err:
        message = str(err)
        where = "--local_dataset" if str(root) in message or str(path) in message else f"--local_dataset {path}"
        raise UserError(f"{where}: {message}") from None
    images: list[dict[str, Any]] = [{"bytes": ref, "path": None} if isinstance(ref, bytes) else {"bytes": None, "path": ref}
              for ref in corpus.values()]
    corpus_ds = datasets.Dataset.from_dict(
        {"id": list(corpus), "image": images},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()}))
    queries_ds = datasets.Dataset.from_dict({"id": list(queries), "text": list(queries.values())})
    return corpus_ds, queries_ds, qrels, sum(1 for q in queries if q not in qrels)


def local_task(path: str, name: str | None = None) -> Any:
    """An mteb AbsTaskRetrieval over a local BEIR-layout set; its data is loaded (and checked) now.

    A folder holding corpus/queries/qrels is one English set. A folder of such folders named after languages
    (english/, french/, ... or ISO codes) is one multilingual task with a subset per language, as ViDoRe V3 is:
    the summary then reports each language and the English-only average beside the all-language one.
    A malformed set (missing table, bad row, duplicate id, qrel to an unknown page or query, unreadable image)
    raises a UserError naming the directory, file and line.
    """
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    root = Path(path).resolve()
    has_tables = any(root.glob("corpus.*")) or (root / "corpus").is_dir()
    subsets = sorted(p.name for p in root.iterdir() if p.is_dir() and (any(p.glob("corpus.*")) or
                                                                       (p / "corpus").is_dir())) \
        if root.is_dir() and not has_tables else []
    folders = {s: root / s for s in subsets} if subsets else {"default": root}
    data = {}
    for subset, folder in folders.items():
        corpus_ds, queries_ds, qrels, unjudged = _load_beir_subset(folder, path)
        if unjudged:
            log.warning("%s: %d queries have no qrels and are not evaluated", folder, unjudged)
        data[subset] = {"test": {"corpus": corpus_ds, "queries": queries_ds,
                                 "relevant_docs": {q: dict(d) for q, d in qrels.items()}, "top_ranked": None}}
    task_name = name or root.name
    metadata = TaskMetadata(
        name=task_name,
        description=f"Local BEIR-layout page retrieval set {root}",
        dataset={"path": str(root), "revision": _table_digest(root)},
        type="DocumentUnderstanding",
        category="t2i",
        modalities=["text", "image"],
        eval_splits=["test"],
        eval_langs={s: [language_code(s)] for s in subsets} if subsets else ["eng-Latn"],
        main_score="ndcg_at_5",
        license="not specified",
        annotations_creators="derived",
        sample_creation="found",
        dialect=[],
        bibtex_citation="",
    )

    class LocalBeirRetrieval(AbsTaskRetrieval):
        """A local BEIR-layout directory (docs/CONTRACT.md §7) as an mteb retrieval task."""

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            self.dataset = data  # type: ignore[assignment]  # mteb's RetrievalSplitData is a TypedDict of these
            self.data_loaded = True

    LocalBeirRetrieval.metadata = metadata
    LocalBeirRetrieval.__name__ = LocalBeirRetrieval.__qualname__ = f"Local_{task_name}"
    task = LocalBeirRetrieval()
    task.load_data()
    return task


def language_averages(subset_scores: dict[str, dict[str, dict[str, float]]], tasks: dict[str, Any],
                      task_scores: dict[str, dict[str, float]]) -> tuple[dict[str, dict[str, float]],
                                                                          dict[str, float] | None]:
    """(per language code: the mean over tasks of that language's scores; the English-only average).

    A multilingual task contributes each subset to its language; a monolingual one its score to its single
    language. The all-language average is the summary's "average" (the official ViDoRe V3 number)."""
    by_language: dict[str, list[dict[str, float]]] = {}
    for name, scores in task_scores.items():
        langs = tasks[name].metadata.eval_langs
        if isinstance(langs, dict) and name in subset_scores:
            for subset, metrics in subset_scores[name].items():
                code = (langs.get(subset.split("/")[0]) or ["und"])[0]
                by_language.setdefault(code, []).append(metrics)
        else:
            codes = langs if isinstance(langs, list) else [c for v in langs.values() for c in v]
            if len(codes) == 1:
                by_language.setdefault(codes[0], []).append(scores)

    def mean(items: list[dict[str, float]]) -> dict[str, float]:
        keys = [k for k in items[0] if all(k in d for d in items)]
        return {k: math.fsum(d[k] for d in items) / len(items) for k in keys}

    languages = {code: mean(items) for code, items in sorted(by_language.items())}
    english = [m for code, items in by_language.items() if code.startswith("eng") for m in items]
    return languages, mean(english) if english else None


def use_local_copy(task: Any, path: str) -> Any:
    """Make an installed mteb task read its dataset from a local copy of its hub repo (same configs and files)."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"--task_data {task.metadata.name}={path}: not a directory")
    dataset = {**task.metadata.dataset, "path": str(root.resolve())}
    task.metadata = task.metadata.model_copy(update={"dataset": dataset})
    task.data_loaded = False
    return task


# ------------------------------------------------------------------------------------------------ hub data


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) forbids network access."""
    from huggingface_hub import constants

    try:
        import datasets.config as dconfig

        datasets_offline = bool(getattr(dconfig, "HF_HUB_OFFLINE", False))
    except ImportError:  # pragma: no cover
        datasets_offline = False
    return bool(constants.HF_HUB_OFFLINE) or datasets_offline


def probe_hub(endpoint: str | None = None, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers within `timeout` seconds, else a short reason (one request, no retries)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    url = (endpoint or constants.ENDPOINT).rstrip("/") + "/api/datasets?limit=1"
    try:
        response = get_session().head(url, timeout=timeout)
    except Exception as err:  # DNS failure, refused connection, timeout, proxy error, ...
        return f"{type(err).__name__}: {err}"
    if response.status_code >= 500:
        return f"HTTP {response.status_code}"
    return None


_probe_result: dict[str, str | None] = {}


def load_task_data(task: Any, local: bool = False) -> None:
    """Load a task's data now; a dataset that cannot be had raises one UserError line.

    local: the task reads a local directory (no probe). Otherwise, when online mode is on, the hub is probed once
    (HUB_PROBE_TIMEOUT_S) so that a machine without network fails in seconds instead of retrying each file.
    """
    from huggingface_hub import constants

    name = task.metadata.name
    path = task.metadata.dataset.get("path")
    alternatives = (f"pass --task_data {name}=DIR (a local copy of the dataset repo {path}) or evaluate a local "
                    f"set with --local_dataset DIR")
    if not local and not hub_offline():
        if constants.ENDPOINT not in _probe_result:
            _probe_result[constants.ENDPOINT] = probe_hub()
        reason = _probe_result[constants.ENDPOINT]
        if reason is not None:
            raise UserError(f"{name}: cannot reach the Hugging Face Hub ({constants.ENDPOINT}: {reason}) to download "
                            f"{path}; connect to the network, set HF_HUB_OFFLINE=1 to use a cached copy, or "
                            f"{alternatives}")
    try:
        task.load_data()
    except Exception as err:  # classify; anything unexpected from the hub keeps its traceback
        message = _data_error(err)
        if local:  # a local copy that does not load is the user's to fix, whatever the exception
            reason = message or " ".join(f"{type(err).__name__}: {err}".split())[:300]
            raise UserError(f"{name}: cannot load the local copy {path} (expected the hub repo's configs and "
                            f"files, e.g. corpus/, queries/, qrels/ + README.md): {reason}") from None
        if message is None:
            raise
        if hub_offline():
            raise UserError(f"{name}: dataset {path} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                            f"forbids downloading it ({message}); run once with network access to cache it, or "
                            f"{alternatives}") from None
        raise UserError(f"{name}: cannot download dataset {path} ({message}); check the network or your Hugging "
                        f"Face access to it, or {alternatives}") from None


def _data_error(err: BaseException) -> str | None:
    """A one-line reason for a dataset loading failure we expect (network, cache, access), else None."""
    from datasets.exceptions import DatasetNotFoundError

    try:
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    except ImportError:  # pragma: no cover
        HfHubHTTPError = OfflineModeIsEnabled = ()  # type: ignore[assignment,misc]
    expected = (ConnectionError, TimeoutError, FileNotFoundError, DatasetNotFoundError, HfHubHTTPError,
                OfflineModeIsEnabled)
    if not isinstance(err, expected) and type(err).__module__.split(".")[0] not in ("httpx", "httpx2", "requests"):
        return None
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------------------------ metrics, runs


def retrieval_metrics(qrels: Mapping[str, Mapping[str, int]], results: Mapping[str, Mapping[str, float]],
                      k_values: tuple[int, ...] = K_VALUES) -> dict[str, float]:
    """ndcg/map/recall/precision/hit_rate at each k, as mteb computes them but unrounded (float64 means).

    Like mteb: pytrec_eval on the given qrels and results; the mean is over the queries pytrec_eval evaluates
    (those in both); hit_rate is pytrec_eval's success.
    """
    import pytrec_eval

    ks = ",".join(str(k) for k in k_values)
    measures = {f"ndcg_cut.{ks}", f"map_cut.{ks}", f"recall.{ks}", f"P.{ks}", f"success.{ks}"}
    qrels_int = {str(q): {str(d): int(s) for d, s in docs.items()} for q, docs in qrels.items()}
    run = {str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in results.items()}
    per_query = pytrec_eval.RelevanceEvaluator(qrels_int, measures).evaluate(run)
    if not per_query:
        raise UserError("no query has both qrels and retrieved pages; nothing to score")
    names = {"ndcg_cut": "ndcg_at", "map_cut": "map_at", "recall": "recall_at", "P": "precision_at",
             "success": "hit_rate_at"}
    out = {}
    for trec, ours in names.items():
        for k in k_values:
            out[f"{ours}_{k}"] = math.fsum(v[f"{trec}_{k}"] for v in per_query.values()) / len(per_query)
    return out


class LocalEvaluator:
    """Retrieval metrics of a model on a local BEIR-layout set, for evaluation during training (train.py
    --eval_local): the pages are decoded once; each call encodes pages and queries with the model as it is now,
    scores them with exact MaxSim and computes mteb's metrics (nDCG@5/10, recall@5) with pytrec_eval."""

    METRICS = ("ndcg_at_5", "ndcg_at_10", "recall_at_5")

    def __init__(self, path: str):
        from colintern.data.images import decode_image
        from colintern.data.beir import load_beir_dir

        corpus, self.queries, self.qrels = load_beir_dir(path)
        self.name = Path(path).name
        self.page_ids = list(corpus)
        self.pages = [decode_image(corpus[cid], f"{path}: corpus-id {cid!r}") for cid in self.page_ids]
        self.query_ids = [q for q in self.queries if q in self.qrels]

    def __call__(self, model: Any, batch_size: int = 8) -> dict[str, float]:
        docs = model.encode_images(self.pages, batch_size=batch_size, show_progress=False)
        qs = model.encode_queries([self.queries[q] for q in self.query_ids], show_progress=False)
        return self.score(qs, docs)

    def score(self, qs: list[Any], docs: list[Any]) -> dict[str, float]:
        """The metrics of query vectors `qs` (in query_ids order) against page vectors `docs` (page_ids order)."""
        from colintern.retriever.scoring import maxsim

        scores = maxsim(qs, docs)  # (n_queries, n_pages) exact
        results = {q: dict(zip(self.page_ids, row.tolist())) for q, row in zip(self.query_ids, scores)}
        metrics = retrieval_metrics(self.qrels, top_run(results, k=100))
        return {name: metrics[name] for name in self.METRICS}


def top_run(results: Mapping[str, Mapping[str, float]], k: int = 100) -> dict[str, dict[str, float]]:
    """The top-k pages per query, best first, ties broken by id descending (pytrec_eval's order)."""
    run = {}
    for qid, docs in results.items():
        ranked = sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k]
        run[qid] = {doc: float(score) for doc, score in ranked}
    return run


def task_qrels(task: Any, subset: str, split: str) -> dict[str, dict[str, int]]:
    """A loaded mteb retrieval task's qrels for one subset and split (either of mteb's dataset layouts)."""
    dataset = getattr(task, "dataset", None)
    if isinstance(dataset, dict) and subset in dataset and split in dataset[subset]:
        return dict(dataset[subset][split]["relevant_docs"])
    relevant = getattr(task, "relevant_docs", None)  # v1 layout, before mteb converts it
    if relevant is not None:
        return dict(relevant[subset][split] if task.metadata.is_multilingual else relevant[split])
    raise KeyError(f"{task.metadata.name}: no qrels for subset {subset!r}, split {split!r}")
