"""An index from Python: the same code `search.py query`, `info` and `remove` run (docs/API.md).

    from colintern import Index
    index = Index.open("outputs/index")                # the model loads on the first search
    index.search("where is the warranty period?", k=5)  # [{"rank", "score", "file", "page"}, ...]
    index.search(["a", "b"], files="*/manuals/*", where={"lang": "en"})   # filtered: exact over the matching pages
    index.info()                                       # pages, files, tokens, bytes, model, pool factor, ...
    index.remove(["old.pdf", "drafts/"])               # under the writer lock
    index.compact()                                    # reclaim the space of removed and replaced pages

Filters: `files` is a glob matched against a page's file path or its name; `where` is {key: value} pairs that the
file's metadata (`search.py index --meta key=value`, or a sidecar FILE.meta.json) must all have. A filtered search
scores exactly the pages that pass (no FAISS first stage), so its results equal exact search over that subset.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colintern.errors import UserError

log = logging.getLogger("colintern.search")


@dataclass(frozen=True)
class SearchSettings:
    """How a query is answered: the backend and, on the embedded one, the first stage (search.py query's flags)."""

    k: int = 5
    first_stage: str = "auto"      # auto | exact | faiss
    candidates: int = 128
    nprobe: int = 32
    token_k: int = 128
    faiss_factory: str = "auto"
    check_recall: bool = False
    backend: str = "embedded"      # embedded | qdrant
    url: str | None = None
    path: str | None = None
    collection: str | None = None
    exact_scan: bool = False


def load_model(model_id: str | None, ckpt: str | None, device: str) -> tuple[str, Any]:
    """(the base model id in use, the model): the checkpoint's own base model unless model_id is given; a warning
    when there is no trained head (no checkpoint, and not an exported model folder)."""
    from colintern.checkpoint import base_model_of, load_checkpoint, recorded_model_id
    from colintern.model import ColIntern, is_exported_model

    if ckpt is None and model_id is None:
        raise UserError("pass --ckpt (a trained ColIntern checkpoint) or --model_id")
    if ckpt is not None and not Path(ckpt).is_file():
        raise UserError(f"--ckpt {ckpt}: no such file")
    model_id = recorded_model_id(model_id or base_model_of(load_checkpoint(ckpt), ckpt))
    if ckpt is None and not is_exported_model(model_id):
        log.warning("no --ckpt: the base model %s with an UNTRAINED head; results will be close to random", model_id)
    return model_id, ColIntern.from_pretrained(model_id, ckpt=ckpt, device=device)


def page_filter(files: str | None, where: dict[str, str] | None):
    """keep(page, file_meta) for PageIndex.subset, or None when there is no filter."""
    if not files and not where:
        return None

    def keep(page: dict[str, Any], meta: dict[str, str]) -> bool:
        if files and not (fnmatch.fnmatch(page["file"], files) or fnmatch.fnmatch(Path(page["file"]).name, files)):
            return False
        return all(str(meta.get(key)) == str(value) for key, value in (where or {}).items())

    return keep


class Index:
    """A search.py index folder with the model that encodes its queries (loaded on first use)."""

    def __init__(self, folder: str | Path, model_id: str | None = None, device: str = "auto"):
        from colintern.page_index import PageIndex

        self.folder, self.model_id, self.device = Path(folder), model_id, device
        self.pages = PageIndex.open(folder)
        self._model: Any = None

    @classmethod
    def open(cls, folder: str | Path, model_id: str | None = None, device: str = "auto") -> "Index":
        """An existing index; model_id overrides the base model it records (an index moved to another machine)."""
        return cls(folder, model_id, device)

    @property
    def model(self) -> Any:
        if self._model is None:
            from colintern.checkpoint import resolve_recorded_model
            from colintern.device import resolve_device
            from colintern.files import file_sha256

            meta = self.pages.meta
            ckpt = meta.get("ckpt")
            if ckpt and not Path(ckpt).is_file():
                raise UserError(f"the index's checkpoint {ckpt} (recorded in {self.folder / 'index.json'}) does not "
                                "exist here; put it back at that path or index again with the checkpoint where it is")
            if ckpt and file_sha256(ckpt) != meta.get("ckpt_sha256"):
                raise UserError(f"the index's checkpoint {ckpt} changed since the index was built (another sha256): "
                                "queries would be encoded by another model; restore it or index into a new --index")
            model_id = self.model_id or resolve_recorded_model(meta["model_id"], self.folder / "index.json")
            self.device = resolve_device(self.device)
            self._model = load_model(model_id, ckpt, self.device)[1]
        return self._model

    def info(self) -> dict[str, Any]:
        return self.pages.info()

    def search(self, queries: str | list[str], k: int = 5, files: str | None = None,
               where: dict[str, str] | None = None, settings: SearchSettings | None = None) -> Any:
        """The top k pages of each query: a list of {"rank", "score", "file", "page"} for one query string, a list
        of {"query", "results"} for a list of them (one `query --json` line each)."""
        from dataclasses import replace

        single = isinstance(queries, str)
        texts = [queries] if single else list(queries)
        settings = replace(settings or SearchSettings(), k=k)
        lines = self.ranked(texts, settings, files, where)[0]
        return lines[0]["results"] if single else lines

    def ranked(self, queries: list[str], settings: SearchSettings, files: str | None = None,
               where: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], Any, list[Any], Any]:
        """(one {"query", "results"} per query, the view searched, the query vectors, (n_q, k) positions in it)."""
        view = self.pages
        keep = page_filter(files, where)
        if keep is not None:
            if settings.backend != "embedded":
                raise UserError("--files/--where filters need the embedded backend for now (Qdrant payload "
                                "filters are not wired yet)")
            view = self.pages.subset(keep)
            log.info("filters: exact search over the %d of %d pages that pass", len(view.pages),
                     len(self.pages.pages))
        if not view.pages:
            raise UserError(f"--index {self.folder} holds no page" + (" that passes the filters" if keep else
                                                                     " yet; add some with search.py index"))
        qs = self.model.encode_queries(queries, show_progress=False)
        values, ids = rank(view, qs, settings if keep is None else _exact(settings), self.device)  # (n_q, k)
        lines = []
        for qi, query in enumerate(queries):
            results = [{"rank": rank_, "score": round(score, 6), "file": view.pages[i]["file"],
                        "page": view.pages[i]["page"]}
                       for rank_, (score, i) in enumerate(zip(values[qi].tolist(), ids[qi].tolist()), start=1)]
            lines.append({"query": query, "results": results})
        return lines, view, qs, ids

    def compact(self) -> tuple[int, int]:
        """Reclaim the space of removed and replaced pages: (segments rewritten, bytes freed); see compact()."""
        result = compact(self.folder)
        from colintern.page_index import PageIndex

        self.pages = PageIndex.open(self.folder)
        return result

    def remove(self, patterns: list[str]) -> tuple[list[str], int]:
        """Take files (paths, folders or globs) out of the index under the writer lock; (files, pages) removed."""
        from colintern.page_index import PageIndex, writer_lock

        with writer_lock(self.folder):
            index = PageIndex.open(self.folder, writer=True)
            removed = index.remove(patterns)
        self.pages = PageIndex.open(self.folder)
        return removed


def compact(folder: str | Path) -> tuple[int, int]:
    """Rewrite the segments that hold hidden pages (removed or changed files) without them, under the writer lock;
    returns (segments rewritten, bytes freed). The new segments are written first and index.json then swaps them in
    in one atomic write, so a crash leaves the old ones named (the new ones are leftovers the next writer removes):
    never a page lost or doubled. The rewritten pages get new uids, so a Qdrant collection re-uploads them on its
    next sync."""
    import shutil

    import numpy as np
    import torch

    from colintern.page_index import PAGES_PER_SEGMENT_MAX, PageIndex, PageSource, writer_lock
    from colintern.segments import PAGES, TOKENS, segment_number

    with writer_lock(folder):
        index = PageIndex.open(folder, writer=True)
        visible: dict[str, list[int]] = {}
        for i, page in enumerate(index.pages):
            visible.setdefault(page["segment"], []).append(i)
        stale = [name for name in index.meta["segments"]
                 if len(visible.get(name, [])) < index.meta["segment_files"][name]["n_pages"]]
        if not stale:
            return 0, 0
        freed = sum((index.folder / name / TOKENS).stat().st_size + (index.folder / name / PAGES).stat().st_size
                    for name in stale)
        fresh: dict[str, dict[str, Any]] = {}
        for name in stale:
            entries = [(PageSource(p["file"], p["sha256"], p["page"], p["kind"]),
                        torch.from_numpy(np.array(index.page_rows(i))),  # (L, dim) float16, the stored bytes
                        p["image_start"], p["image_tokens"], (p["width"], p["height"]))
                       for i in visible.get(name, []) for p in [index.pages[i]]]
            if entries:
                new, manifest = index.write_segment(entries, taken=list(fresh))
                fresh[new] = manifest
                freed -= manifest["tokens"]["bytes"] + manifest["pages_file"]["bytes"]
        gone = {segment_number(name) for name in stale}
        meta = index.meta
        meta["segments"] = [n for n in meta["segments"] if n not in stale] + list(fresh)
        for name in stale:
            meta["segment_files"].pop(name)
        meta["segment_files"].update(fresh)
        meta["hidden_uids"] = [u for u in meta.get("hidden_uids", []) if u // PAGES_PER_SEGMENT_MAX not in gone]
        index.save_meta()  # the one atomic switch
        for name in stale:
            shutil.rmtree(index.folder / name, ignore_errors=True)
    log.info("compacted %d segment(s) of %s: %d bytes freed", len(stale), folder, freed)
    return len(stale), freed


def _exact(settings: SearchSettings) -> SearchSettings:
    from dataclasses import replace

    return replace(settings, first_stage="exact", check_recall=False)


def rank(index: Any, qs: list, settings: SearchSettings, device: Any):
    """(n_q, k) scores and page positions from the chosen backend (and first stage), with check_recall."""
    import sys

    from colintern.page_search import FaissFirstStage, TokenView, choose_first_stage, exact_topk, recall_at_k

    if settings.backend == "qdrant":
        from colintern.qdrant_store import QdrantPages

        store = QdrantPages(index, settings.url, settings.path, settings.collection)
        try:
            values, ids = store.topk([q.numpy() for q in qs], settings.k, exact_scan=settings.exact_scan)
        finally:
            store.close()
        what = f"Qdrant ({store.collection})"
    else:
        method, why = choose_first_stage(settings.first_stage, TokenView(index).n_tokens)
        log.info("first stage: %s (%s)", method, why)
        if method == "exact":
            return exact_topk(index, qs, settings.k, device)
        stage = FaissFirstStage(index, settings.nprobe, settings.token_k, settings.candidates,
                                settings.faiss_factory, show_progress=sys.stderr.isatty())
        values, ids = stage.topk(qs, settings.k, device)
        what = f"the FAISS first stage ({stage.info['factory']}, {settings.candidates} candidates)"
    if settings.check_recall:
        _, exact_ids = exact_topk(index, qs, settings.k, device)
        log.info("recall@%d of %s against exact MaxSim on these %d queries: %.4f", settings.k, what, len(qs),
                 recall_at_k(ids, exact_ids))
    return values, ids
