"""--backend qdrant-edge: Qdrant's own engine (qdrant-edge-py) in the process. On real rendered pages it returns the
embedded exact search's top k (scores within 1e-3), a second process finds the shard as the first left it, filters
restrict it to the pages that pass, and a sync killed (SIGKILL) after its first batch is finished by the next run
without a page lost or sent twice."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import FIXTURES, REPO, search_run as run

pytest.importorskip("qdrant_edge")
pytestmark = pytest.mark.usefixtures("one_thread")
QUERIES = ["a red page with the word alpha", "the DER encoding of a structure", "tag class and number"]


def query_json(capsys, index, *extra) -> list[dict]:
    code, out, err = run(capsys, "query", "--index", index, "--k", 8, "--json", "--device", "cpu", *extra, *QUERIES)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def same_results(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert [(r["file"], r["page"]) for r in x["results"]] == [(r["file"], r["page"]) for r in y["results"]]
        assert all(abs(r["score"] - s["score"]) < 1e-3 for r, s in zip(x["results"], y["results"]))


def test_the_engine_returns_exact_searchs_top_k_and_persists_across_processes(tiny_model_dir, search_ckpt,
                                                                                search_docs, tmp_path, capsys):
    index, shards = tmp_path / "index", tmp_path / "edge"
    edge = ["--backend", "qdrant-edge", "--path", shards]
    code, out, err = run(capsys, "index", "--ckpt", search_ckpt, "--model_id", tiny_model_dir, "--inputs", search_docs,
                         FIXTURES / "real_pages.pdf", "--index", index, "--dpi", 72, "--device", "cpu", *edge)
    assert code == 0, err
    assert out.splitlines()[-1] == f"Qdrant collection colintern_index at {shards}: 12 page(s) sent, 12 in all"
    embedded = query_json(capsys, index)
    same_results(query_json(capsys, index, *edge), embedded)
    code, out, _ = run(capsys, "info", "--index", index, "--json")
    assert json.loads(out)["backends"] == ["embedded", "qdrant-edge"]
    # another process opens the shard the first one wrote
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "search.py"), "query", "--index", str(index), "--k", "8",
                           "--json", "--device", "cpu", "--backend", "qdrant-edge", "--path", str(shards), *QUERIES],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    same_results([json.loads(line) for line in done.stdout.splitlines()], embedded)
    # filters: the engine searches only the points of the pages that pass
    only_pdf = query_json(capsys, index, "--files", "*real_pages.pdf", *edge)
    assert all(r["file"].endswith("real_pages.pdf") for line in only_pdf for r in line["results"])
    same_results(only_pdf, query_json(capsys, index, "--files", "*real_pages.pdf"))
    # a removed file leaves the shard on the next sync
    assert run(capsys, "remove", "--index", index, FIXTURES / "real_pages.pdf", *edge)[0] == 0
    assert all(not r["file"].endswith("real_pages.pdf") for line in query_json(capsys, index, *edge)
               for r in line["results"])


def test_a_sync_killed_midway_is_finished_by_the_next_run(tiny_model_dir, search_ckpt, search_docs, tmp_path,
                                                          capsys):
    index, shards = tmp_path / "index", tmp_path / "edge"
    edge = ["--backend", "qdrant-edge", "--path", str(shards)]
    assert run(capsys, "index", "--ckpt", search_ckpt, "--model_id", tiny_model_dir, "--inputs", search_docs,
               "--index", index, "--dpi", 72, "--device", "cpu")[0] == 0  # 6 pages, no shard yet
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLINTERN_UPSERT_PAGES": "2", "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-m", "colintern.testing.faults", "kill@2", "search", "index",
                             "--index", str(index), "--inputs", str(search_docs), "--device", "cpu", *edge],
                            capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert killed.returncode == -9, killed.stderr  # SIGKILL after the second batch of two pages
    code, out, err = run(capsys, "index", "--index", index, "--inputs", search_docs, "--device", "cpu", *edge)
    assert code == 0, err
    assert out.splitlines()[-1] == f"Qdrant collection colintern_index at {shards}: 2 page(s) sent, 6 in all"
    same_results(query_json(capsys, index, *edge), query_json(capsys, index))
