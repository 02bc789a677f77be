"""Qdrant's own engine, embedded: `--backend qdrant-edge --path DIR` (qdrant-edge-py, the Rust shard in-process).

qdrant-client's local mode (`--backend qdrant --path`) re-implements Qdrant's API in Python and numpy; qdrant-edge-py
runs the engine itself, with its storage, write-ahead log and MaxSim multivector scoring, in this process. The
layout of the points is qdrant_store's (one point per page, id = the page's uid, its token vectors as a float16
multivector compared by MaxSim over dot products, payload {file, page, sha256, index_id}), and so are the sync and
the search (qdrant_store.PageMirror). The shard lives in DIR/<collection>; ColIntern processes take turns on a lock
in DIR. Every batch of points is in the write-ahead log when it returns, so it survives a SIGKILL.

What the edge engine does not do that a server does: no HNSW graph is built by default (queries scan exactly, which
is what ColIntern wants on one machine), no distribution or replication, one process per shard at a time.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from colintern.errors import UserError
from colintern.files import file_lock, make_output_dir
from colintern.index.page_index import PageIndex
from colintern.index.qdrant_store import LOCAL_LOCK, PageMirror

log = logging.getLogger("colintern.search")


class EdgePages(PageMirror):
    """One shard of Qdrant's engine holding the pages of one index."""

    backend = "qdrant-edge"

    def __init__(self, index: PageIndex, path: str | None, collection: str | None = None):
        try:
            import qdrant_edge
        except ImportError:
            raise UserError("--backend qdrant-edge needs qdrant-edge-py: pip install qdrant-edge-py") from None
        if not path:
            raise UserError("--backend qdrant-edge: give --path DIR (the folder of the embedded shard)")
        self.qe = qdrant_edge
        make_output_dir(path, "--path")
        self._lock = contextlib.ExitStack()
        if not self._lock.enter_context(file_lock(os.path.join(path, LOCAL_LOCK), blocking=False)):
            log.info("waiting for another process to finish with the Qdrant folder %s", path)
            self._lock.enter_context(file_lock(os.path.join(path, LOCAL_LOCK)))
        super().__init__(index, path, collection)
        self.shard: Any = None

    def close(self) -> None:
        if self.shard is not None:
            self.shard.flush()
            self.shard.close()
            self.shard = None
        self._lock.close()

    def ensure_collection(self, create: bool = True) -> None:
        """Open the shard (create it the first time) and check that it holds this index's pages."""
        if self.shard is not None:
            return
        qe, dim = self.qe, int(self.index.meta["config"]["dim"])
        config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(
            size=dim, distance=qe.Distance.Dot, datatype=qe.VectorStorageDatatype.Float16,
            multivector_config=qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim)))
        folder = Path(str(self.where)) / self.collection
        try:
            if folder.is_dir() and any(folder.iterdir()):
                self.shard = qe.EdgeShard.load(str(folder), config)
            elif not create:
                raise self.missing()
            else:
                self.shard = qe.EdgeShard.create(str(folder), config)
                log.info("created Qdrant edge shard %s (dim %d, MaxSim)", folder, dim)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - the engine reports every refusal as its own exception types
            raise UserError(f"Qdrant edge shard {folder}: {str(err).splitlines()[0]}; pass another --collection or "
                            "--path") from None
        records, _ = self.shard.scroll(qe.ScrollRequest(limit=1, with_payload=True, with_vector=False))
        if records and (records[0].payload or {}).get("index_id") != self.index_id:
            raise UserError(f"Qdrant edge shard {folder} holds another index's pages; pass another --collection")
        self.record_collection()

    def scroll_ids(self, offset: Any) -> tuple[list[int], Any]:
        records, offset = self.shard.scroll(self.qe.ScrollRequest(offset=offset, limit=10_000, with_payload=False,
                                                                   with_vector=False))
        return [int(r.id) for r in records], offset

    def delete(self, ids: list[int]) -> None:
        self.shard.update(self.qe.UpdateOperation.delete_points(list[Any](ids)))

    def upsert(self, points: list[tuple[int, np.ndarray, dict[str, Any]]]) -> None:
        self.shard.update(self.qe.UpdateOperation.upsert_points(
            [self.qe.Point(uid, vectors.tolist(), payload) for uid, vectors, payload in points]))

    def count(self) -> int:
        return int(self.shard.count(self.qe.CountRequest(exact=True)))

    def query(self, q: np.ndarray, k: int, only: list[int] | None, exact_scan: bool) -> list[tuple[float, int]]:
        qe = self.qe
        points = self.shard.query(qe.QueryRequest(
            limit=k, query=qe.Query.Nearest(q.tolist()), params=qe.SearchParams(exact=True), with_payload=False,
            filter=qe.Filter(must=[qe.HasIdCondition(set(only))]) if only is not None else None))
        return [(float(p.score), int(p.id)) for p in points]
