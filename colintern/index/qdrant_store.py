"""Qdrant as the engine behind search.py: the index's pages mirrored into a collection that scores MaxSim natively.

The index folder stays the record (model, checkpoint, files, pages, resume, similarity maps); with
`--backend qdrant` every committed page is also upserted as one point: id = the page's uid in the index (stable
when a changed file's old pages are hidden), one
multivector (its token vectors exactly as the folder stores them, float16 values), payload {file, page, sha256,
index_id}. The collection uses Qdrant's MAX_SIM comparator over dot products, i.e. the same sum-MaxSim as the
embedded store, so both return the same pages with the same scores (up to float32 summation order).

    --path DIR    qdrant-client's embedded local mode (no server; exact scan; pure Python)
    --url URL     a Qdrant server or cluster (e.g. http://localhost:6333); QDRANT_API_KEY is read from the
                  environment. Queries there go through its HNSW graph unless --exact_scan is given.

A sync compares the point ids in the collection with the index's pages and upserts the missing ones, so an
interrupted `search.py index --backend qdrant` is finished by running it again. `--backend qdrant-edge` is the same
on Qdrant's engine embedded (qdrant_edge_store.py); PageMirror holds what both do.
"""
from __future__ import annotations

import contextlib
import logging
import os
import uuid
from typing import Any

import numpy as np

from colintern import hooks
from colintern.errors import UserError
from colintern.files import file_lock, make_output_dir
from colintern.index.page_index import PageIndex

log = logging.getLogger("colintern.search")

LOCAL_LOCK = ".colintern.lock"
UPSERT_VECTORS = 65_536  # token vectors per upsert request (about 16 MiB of JSON floats at dim 128)


def _client(url: str | None, path: str | None):
    try:
        from qdrant_client import QdrantClient
    except ImportError:
        raise UserError("--backend qdrant needs qdrant-client: pip install qdrant-client") from None
    if bool(url) == bool(path):
        raise UserError("--backend qdrant: give --url URL (a server) or --path DIR (embedded local mode), one of them")
    if url:
        return QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY"), timeout=120), None
    # Local mode lets one process in at a time (a second gets a RuntimeError): every ColIntern process waits its
    # turn on this lock instead, released by close() or when the holder dies.
    assert path is not None  # one of url and path, checked above
    make_output_dir(path, "--path")
    lock = contextlib.ExitStack()
    if not lock.enter_context(file_lock(os.path.join(path, LOCAL_LOCK), blocking=False)):
        log.info("waiting for another process to finish with the Qdrant folder %s", path)
        lock.enter_context(file_lock(os.path.join(path, LOCAL_LOCK)))
    try:
        return QdrantClient(path=path), lock
    except RuntimeError as err:  # held by a program that is not ColIntern
        lock.close()
        raise UserError(f"--path {path}: {str(err).splitlines()[0]}; close the other program using it") from None


class PageMirror:
    """What both Qdrant backends share: the collection's name and owner, and the sync and search logic over a few
    primitives each backend implements (ids by scroll, delete, upsert, count, one query)."""

    def __init__(self, index: PageIndex, where: str | None, collection: str | None):
        self.index, self.where = index, where
        self.collection = collection or index.meta.get("qdrant_collection") or f"colintern_{index.folder.name}"
        if not index.meta.get("index_id"):  # identifies this index's points in a shared server
            index.meta["index_id"] = uuid.uuid4().hex
            index.save_meta()
        self.index_id = index.meta["index_id"]

    # -- per backend --------------------------------------------------------------------------------------------
    def ensure_collection(self, create: bool = True) -> None:
        """Open the collection, checking it is this index's; create it when missing (else a one-line error)."""
        raise NotImplementedError

    def missing(self) -> UserError:
        return UserError(f"no Qdrant collection {self.collection} at {self.where} yet: run search.py index ... "
                         "--backend qdrant (or qdrant-edge) to create and fill it")

    def scroll_ids(self, offset: Any) -> tuple[list[int], Any]:
        """One page of point ids and the offset of the next (None at the end)."""
        raise NotImplementedError

    def delete(self, ids: list[int]) -> None:
        raise NotImplementedError

    def upsert(self, points: list[tuple[int, np.ndarray, dict[str, Any]]]) -> None:
        """Write (id, (L, dim) float32 vectors, payload) points; durable when it returns."""
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def query(self, q: np.ndarray, k: int, only: list[int] | None, exact_scan: bool) -> list[tuple[float, int]]:
        """(score, point id) of the k best points for one (Lq, dim) query, among `only` when given."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------------------
    backend = "qdrant"  # the --backend name (info lists it)

    def record_collection(self) -> None:
        meta = self.index.meta
        if meta.get("qdrant_collection") != self.collection or meta.get("qdrant_backend", "qdrant") != self.backend:
            meta["qdrant_collection"], meta["qdrant_backend"] = self.collection, self.backend
            self.index.save_meta()

    def point_ids(self) -> set[int]:
        ids: set[int] = set()
        offset = None
        while True:
            page, offset = self.scroll_ids(offset)
            ids.update(page)
            if offset is None:
                return ids

    def sync(self, show_progress: bool = True) -> int:
        """Upsert every index page the collection lacks (and delete points of pages no longer in the index), in
        batches of at most UPSERT_VECTORS token vectors and $COLINTERN_UPSERT_PAGES pages (256), each durable when
        sent: a run killed midway keeps what it sent and the next sync sends the rest. Returns how many pages were
        sent."""
        from tqdm.auto import tqdm

        self.ensure_collection()
        present = self.point_ids()
        position = {page["uid"]: i for i, page in enumerate(self.index.pages)}
        stale = sorted(present - position.keys())  # pages hidden or removed since
        if stale:
            self.delete(stale)
        todo = sorted(position.keys() - present)
        max_pages = int(os.environ.get("COLINTERN_UPSERT_PAGES", "256"))
        batch: list[tuple[int, np.ndarray, dict[str, Any]]] = []
        size = sent = 0
        with tqdm(total=len(todo), desc="qdrant upsert", unit="page", disable=not show_progress) as bar:
            for n, uid in enumerate(todo, start=1):
                page = self.index.pages[position[uid]]
                vectors = self.index.vectors(position[uid]).numpy()  # (L, dim) float32 of the stored float16 values
                batch.append((uid, vectors, {"file": page["file"], "page": page["page"], "sha256": page["sha256"],
                                             "index_id": self.index_id}))
                size += len(vectors)
                if size >= UPSERT_VECTORS or len(batch) >= max_pages or n == len(todo):
                    self.upsert(batch)
                    sent += 1
                    hooks.call("upload", sent)
                    bar.update(len(batch))
                    batch, size = [], 0
        return len(todo)

    def topk(self, qs: list[Any], k: int, exact_scan: bool = False, subset: bool = False) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
        """(n_q, k) scores and page positions in the index from Qdrant's MaxSim (ties: lower position first).
        subset: the index is a filtered view (query --files/--where) and the search is restricted to its points
        (a has-id condition, so what passes is decided by the index folder, the same as for the embedded backend)."""
        self.ensure_collection(create=False)
        n = self.count()
        position = {page["uid"]: i for i, page in enumerate(self.index.pages)}
        if (n < len(position)) if subset else (n != len(position)):
            index = f"the {len(position)} that pass the filters" if subset else f"the index {len(position)}"
            raise UserError(f"Qdrant collection {self.collection} holds {n} page(s), {index}; run search.py index "
                            "... --backend qdrant again to sync it")
        k = min(k, len(position))
        values, ids = np.empty((len(qs), k), dtype=np.float32), np.empty((len(qs), k), dtype=np.int64)
        for r, q in enumerate(qs):
            points = self.query(np.asarray(q, dtype=np.float32), k, list(position) if subset else None, exact_scan)
            got = sorted(((score, position[uid]) for score, uid in points), key=lambda t: (-t[0], t[1]))
            values[r], ids[r] = [s for s, _ in got], [i for _, i in got]
        return values, ids


class QdrantPages(PageMirror):
    """One collection holding the pages of one index, through qdrant-client (a server, or its local mode)."""

    def __init__(self, index: PageIndex, url: str | None = None, path: str | None = None,
                 collection: str | None = None):
        from qdrant_client import models

        self.models = models
        self.client, self._lock = _client(url, path)
        super().__init__(index, url or path, collection)
        self.checked = False

    def close(self) -> None:
        self.client.close()
        if self._lock is not None:
            self._lock.close()

    def ensure_collection(self, create: bool = True) -> None:
        """Create the collection (MaxSim over dot products, float16 storage) or check that it is this index's."""
        if self.checked:
            return
        m, dim = self.models, int(self.index.meta["config"]["dim"])
        if not self.client.collection_exists(self.collection):
            if not create:
                raise self.missing()
            self.client.create_collection(self.collection, vectors_config=m.VectorParams(
                size=dim, distance=m.Distance.DOT, datatype=m.Datatype.FLOAT16,
                multivector_config=m.MultiVectorConfig(comparator=m.MultiVectorComparator.MAX_SIM)))
            log.info("created Qdrant collection %s at %s (dim %d, MaxSim)", self.collection, self.where, dim)
        else:
            params = self.client.get_collection(self.collection).config.params.vectors
            if getattr(params, "size", None) != dim or getattr(params, "multivector_config", None) is None:
                raise UserError(f"Qdrant collection {self.collection} at {self.where} is not a {dim}-d multivector "
                                "collection of this index; pass another --collection")
            first, _ = self.client.scroll(self.collection, limit=1, with_payload=["index_id"], with_vectors=False)
            if first and first[0].payload.get("index_id") != self.index_id:
                raise UserError(f"Qdrant collection {self.collection} at {self.where} holds another index's pages; "
                                "pass another --collection")
        self.record_collection()
        self.checked = True

    def scroll_ids(self, offset: Any) -> tuple[list[int], Any]:
        points, offset = self.client.scroll(self.collection, limit=10_000, offset=offset, with_payload=False,
                                            with_vectors=False)
        return [int(p.id) for p in points], offset

    def delete(self, ids: list[int]) -> None:
        self.client.delete(self.collection, points_selector=self.models.PointIdsList(points=list[Any](ids)))

    def upsert(self, points: list[tuple[int, np.ndarray, dict[str, Any]]]) -> None:
        self.client.upsert(self.collection, points=[self.models.PointStruct(id=uid, vector=vectors.tolist(),
                                                                            payload=payload)
                                                    for uid, vectors, payload in points], wait=True)

    def count(self) -> int:
        return int(self.client.count(self.collection, exact=True).count)

    def query(self, q: np.ndarray, k: int, only: list[int] | None, exact_scan: bool) -> list[tuple[float, int]]:
        m = self.models
        points = self.client.query_points(
            self.collection, query=q.tolist(), limit=k, with_payload=False,
            search_params=m.SearchParams(exact=True) if exact_scan else None,
            query_filter=m.Filter(must=[m.HasIdCondition(has_id=list[Any](only))]) if only is not None else None).points
        return [(float(p.score), int(p.id)) for p in points]
