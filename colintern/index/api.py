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
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colintern.errors import UserError
from colintern.files import display
from colintern.settings import IndexConfig, QdrantOptions, SearchSettings

log = logging.getLogger("colintern.search")


def load_model(model_id: str | None, ckpt: str | None, device: str) -> tuple[str, Any]:
    """(the base model id in use, the model): the checkpoint's own base model unless model_id is given; a warning
    when there is no trained head (no checkpoint, and not an exported model folder)."""
    from colintern.retriever.checkpoint import base_model_of, load_checkpoint, recorded_model_id
    from colintern.retriever.model import ColIntern, has_trained_head

    if ckpt is None and model_id is None:
        raise UserError("pass --ckpt (a trained ColIntern checkpoint) or --model_id")
    if ckpt is not None and not Path(ckpt).is_file():
        raise UserError(f"--ckpt {ckpt}: no such file")
    model_id = recorded_model_id(model_id or base_model_of(load_checkpoint(str(ckpt)), str(ckpt)))
    if ckpt is None and not has_trained_head(model_id):
        log.warning("no --ckpt: the base model %s with an UNTRAINED head; results will be close to random", model_id)
    return model_id, ColIntern.from_pretrained(model_id, ckpt=ckpt, device=device)


@dataclass
class Added:
    """What adding files to an index did."""

    pages: int          # pages encoded and added now
    files: int          # files looked at
    total: int          # pages in the index now
    report: Any         # the skipped files and pages (colintern.data.report.SkipReport)
    index: Any          # the PageIndex written
    model: Any          # the model that encoded them (the index's: it also encodes its queries)


def add_files(config: IndexConfig, model: Any = None, show_progress: bool = False) -> Added:
    """Encode the pages of config.inputs that the index does not hold yet (search.py index, Index.add): resumable,
    under the writer lock; a new index records the model (config.ckpt / model_id), dpi and pool factor. `model`: an
    already loaded model of this index (Index.add), else loaded here."""
    from colintern.retriever.checkpoint import load_checkpoint
    from colintern.data.report import SkipReport
    from colintern.device import resolve_device
    from colintern.index.page_index import PageIndex, check_new_index_folder, writer_lock
    from colintern.index.sources import find_inputs
    from colintern.index.encoding import index_pages

    files = find_inputs(config.inputs)
    config = with_index_model(config)
    if config.ckpt:
        load_checkpoint(config.ckpt)  # one line for a missing, foreign or image-text checkpoint, before any loading
    check_new_index_folder(Path(config.index))
    with writer_lock(config.index):
        if model is None:
            model_id, model = load_model(config.model_id, config.ckpt, resolve_device(config.device))
        else:
            model_id = str(config.model_id)  # Index.add: the id the index records
        index = PageIndex.create_or_open(config.index, model_id, config.ckpt, model.config.to_dict(), config.dpi,
                                         config.pool_factor)
        for name in index.redo_files:  # files of damaged segments dropped on open: encoded again
            if not Path(name).is_file():
                log.warning("%s: its pages were in a damaged segment and the file is gone; they are no longer in "
                            "the index", display(name))
            elif Path(name) not in files:
                files.append(Path(name))
        record_file_meta(index, files, parse_pairs(config.meta, "--meta"))
        report = SkipReport(strict=config.strict, logger=log)
        todo = index.plan(files, report)
        added = index_pages(index, model, todo, report, config.batch_size, config.segment_pages,
                            show_progress=show_progress)
        index.done_redoing()
        index.mark_verified()
        indexed_files = {p["file"] for p in index.pages}
        if report.count and not any(str(f) in indexed_files for f in files):
            raise UserError(f"no page indexed: every input was bad ({report.summary()}); see the warnings above")
        segments, freed = compact_index(index)  # the pages of changed and removed files: their space back
        if segments:
            log.info("compacted %d segment(s) holding replaced or removed pages: %d bytes freed", segments, freed)
            index = PageIndex.open(config.index)
    return Added(pages=added, files=len(files), total=len(index.pages), report=report, index=index, model=model)


def with_index_model(config: IndexConfig) -> IndexConfig:
    """Extending an existing index without --ckpt or --model_id: the checkpoint and base model it was built with."""
    from dataclasses import replace

    from colintern.retriever.checkpoint import resolve_recorded_model

    recorded = Path(config.index) / "index.json"
    if config.ckpt or config.model_id or not recorded.is_file():
        return config
    try:
        meta = json.loads(recorded.read_text(encoding="utf-8"))
        ckpt, model_id = meta.get("ckpt"), resolve_recorded_model(meta["model_id"], recorded)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return config  # a damaged index.json: opening the index names the damage (and rebuilds it)
    log.info("extending %s with its own model: %s", config.index, ckpt or model_id)
    return replace(config, ckpt=ckpt, model_id=model_id)


def record_file_meta(index, files: list[Path], given: dict[str, str]) -> None:
    """Each file's metadata for query --where: --meta's pairs, then its sidecar FILE.meta.json (a JSON object)
    on top; saved now when anything changed."""
    table = index.meta.setdefault("file_meta", {})
    before = json.dumps(table, sort_keys=True)
    for path in files:
        values = dict(given)
        sidecar = Path(f"{path}.meta.json")
        if sidecar.is_file():
            try:
                extra = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as err:
                raise UserError(f"{display(sidecar)}: not a readable JSON object ({err})") from None
            if not isinstance(extra, dict):
                raise UserError(f"{display(sidecar)}: expected a JSON object of KEY: VALUE")
            values.update({str(k): str(v) for k, v in extra.items()})
        if values:
            table[str(path)] = {**table.get(str(path), {}), **values}
    if json.dumps(table, sort_keys=True) != before:
        index.save_meta()


def parse_pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    """KEY=VALUE items of a flag as a dict; one line for an item without '='."""
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE")
        pairs[key] = value
    return pairs


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
        from colintern.index.page_index import PageIndex

        self.folder, self.model_id, self.device = Path(folder), model_id, device
        self.pages = PageIndex.open(folder)
        self._model: Any = None
        self.resident: Any = None  # keep_resident(): the pages as float32 in memory, for many queries
        self.stages: dict[tuple, Any] = {}  # keep_resident(): FAISS first stages kept for the next queries

    @classmethod
    def open(cls, folder: str | Path, model_id: str | None = None, device: str = "auto") -> "Index":
        """An existing index; model_id overrides the base model it records (an index moved to another machine)."""
        return cls(folder, model_id, device)

    @property
    def model(self) -> Any:
        if self._model is None:
            from colintern.retriever.checkpoint import resolve_recorded_model
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

    @classmethod
    def create(cls, folder: str | Path, inputs: list[str | Path], ckpt: str | None = None,
               model_id: str | None = None, device: str = "auto", **settings: Any) -> "Index":
        """A new index of `inputs` (or more files added to an existing one): search.py index from Python. `settings`
        are IndexConfig's other fields (dpi, pool_factor, batch_size, meta, strict, ...)."""
        from colintern.device import resolve_device

        config = IndexConfig(index=str(folder), inputs=[str(p) for p in inputs], ckpt=ckpt, model_id=model_id,
                             device=device, **settings)
        added = add_files(config)
        index = cls(folder, model_id, resolve_device(device))
        index._model = added.model  # loaded once: the model that built the index encodes its queries
        return index

    def add(self, inputs: list[str | Path], **settings: Any) -> Added:
        """Add files (PDFs, images, folders) with the index's own model, checkpoint, dpi and pool factor; only new
        or changed pages are encoded. `settings`: batch_size, segment_pages, meta (["key=value"]), strict."""
        meta = self.pages.meta
        config = IndexConfig(index=str(self.folder), inputs=[str(p) for p in inputs], ckpt=meta.get("ckpt"),
                             model_id=meta["model_id"], device=str(self.device), **settings)
        added = add_files(config, model=self.model)
        from colintern.index.page_index import PageIndex

        self.pages = PageIndex.open(self.folder)
        return added

    def info(self) -> dict[str, Any]:
        return self.pages.info()

    def keep_resident(self, max_bytes: int) -> bool:
        """Pack every page once as float32 in memory when that takes at most max_bytes, so that each later exact
        search only computes (a warm service); whether it did. The index must not change while it is resident."""
        from colintern.index.page_search import resident_bytes, resident_pages

        need = resident_bytes(self.pages)
        if need > max_bytes:
            log.warning("the index needs %.2f GB as float32 in memory, over the %.2f GB allowed: each exact search "
                        "reads and widens the pages again", need / 1e9, max_bytes / 1e9)
            return False
        self.resident, self.stages = resident_pages(self.pages), {}
        log.info("%d pages resident in memory as float32 (%.2f GB)", len(self.pages.pages),
                 self.resident.nbytes / 1e9)
        return True

    def search(self, queries: str | list[str], k: int = 5, files: str | None = None,
               where: dict[str, str] | None = None, settings: SearchSettings | None = None) -> Any:
        """The top k pages of each query: a list of {"rank", "score", "file", "page"} for one query string, a list
        of {"query", "results"} for a list of them (one `query --json` line each)."""
        from dataclasses import replace

        single = isinstance(queries, str)
        texts: list[str] = [queries] if isinstance(queries, str) else list(queries)
        settings = replace(settings or SearchSettings(), k=k)
        lines = self.ranked(texts, settings, files, where)[0]
        return lines[0]["results"] if single else lines

    def ranked(self, queries: list[str], settings: SearchSettings, files: str | None = None,
               where: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], Any, list[Any], Any]:
        """(one {"query", "results"} per query, the view searched, the query vectors, (n_q, k) positions in it)."""
        view = self.pages
        keep = page_filter(files, where)
        if keep is not None:
            view = self.pages.subset(keep)
            log.info("filters: %s over the %d of %d pages that pass", "exact search" if settings.backend == "embedded"
                     else "Qdrant restricted to their points", len(view.pages), len(self.pages.pages))
        if not view.pages:
            raise UserError(f"--index {self.folder} holds no page" + (" that passes the filters" if keep else
                                                                     " yet; add some with search.py index"))
        qs = self.model.encode_queries(queries, show_progress=False)
        values, ids = rank(view, qs, settings if keep is None else _exact(settings), self.device,
                           subset=keep is not None, resident=None if keep is not None else self.resident,
                           stages=None if keep is not None or self.resident is None else self.stages)  # (n_q, k)
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
        from colintern.index.page_index import PageIndex

        self.pages = PageIndex.open(self.folder)
        return result

    def remove(self, patterns: list[str]) -> tuple[list[str], int]:
        """Take files (paths, folders or globs) out of the index under the writer lock; (files, pages) removed."""
        from colintern.index.page_index import PageIndex, writer_lock

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


    from colintern.index.page_index import PageIndex, writer_lock

    with writer_lock(folder):
        result = compact_index(PageIndex.open(folder, writer=True))
    if result[0]:
        log.info("compacted %d segment(s) of %s: %d bytes freed", result[0], folder, result[1])
    return result


def compact_index(index: Any) -> tuple[int, int]:
    """compact() on a PageIndex opened by a writer who holds the lock (search.py index compacts after its pages are
    in: the space of replaced and removed pages is reclaimed by the next write, as by `compact`)."""
    import shutil

    import numpy as np
    import torch

    from colintern.index.page_index import PAGES_PER_SEGMENT_MAX
    from colintern.index.segments import PAGES, TOKENS, segment_number
    from colintern.index.sources import PageSource

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
    return len(stale), freed


def _exact(settings: SearchSettings) -> SearchSettings:
    from dataclasses import replace

    return replace(settings, first_stage="exact", check_recall=False)


def open_store(index: Any, settings: QdrantOptions) -> Any:
    """The Qdrant mirror of an index: qdrant-client (a server, or its Python local mode) or the engine embedded."""
    if settings.backend == "qdrant-edge":
        from colintern.index.qdrant_edge_store import EdgePages

        if settings.url:
            raise UserError("--backend qdrant-edge runs the engine in this process: give --path DIR, not --url "
                            "(--backend qdrant --url talks to a server)")
        return EdgePages(index, settings.path, settings.collection)
    from colintern.index.qdrant_store import QdrantPages

    return QdrantPages(index, settings.url, settings.path, settings.collection)


def rank(index: Any, qs: list, settings: SearchSettings, device: Any, subset: bool = False, resident: Any = None,
         stages: dict[tuple, Any] | None = None):
    """(n_q, k) scores and page positions from the chosen backend (and first stage), with check_recall. `subset`:
    the index is a filtered view; Qdrant then searches only its points (the index folder decides what passes).
    `resident`: the pages packed in memory (Index.keep_resident), scored by exact search and the FAISS re-rank;
    `stages`: FAISS first stages by their settings, kept between calls (a warm process)."""
    import sys

    from colintern.index.page_search import FaissFirstStage, TokenView, choose_first_stage, exact_topk, recall_at_k

    if settings.backend != "embedded":
        store = open_store(index, settings)
        try:
            values, ids = store.topk([q.numpy() for q in qs], settings.k, exact_scan=settings.exact_scan,
                                     subset=subset)
        finally:
            store.close()
        what = f"Qdrant ({store.collection})"
    else:
        method, why = choose_first_stage(settings.first_stage, TokenView(index).n_tokens)
        log.info("first stage: %s (%s)", method, why)
        if method == "exact":
            return exact_topk(index, qs, settings.k, device, resident=resident)
        key = (settings.nprobe, settings.token_k, settings.candidates, settings.faiss_factory)
        stage = (stages or {}).get(key)
        if stage is None:
            stage = FaissFirstStage(index, settings.nprobe, settings.token_k, settings.candidates,
                                    settings.faiss_factory, show_progress=sys.stderr.isatty())
            if stages is not None:
                stages[key] = stage
        values, ids = stage.topk(qs, settings.k, device, resident=resident)
        what = f"the FAISS first stage ({stage.info['factory']}, {settings.candidates} candidates)"
    if settings.check_recall:
        _, exact_ids = exact_topk(index, qs, settings.k, device, resident=resident)
        log.info("recall@%d of %s against exact MaxSim on these %d queries: %.4f", settings.k, what, len(qs),
                 recall_at_k(ids, exact_ids))
    return values, ids
