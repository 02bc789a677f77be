"""An index managed from Python and the command line: Index.open/search/info/remove are what search.py query, info
and remove run; filters (--files, --where with --meta or a sidecar FILE.meta.json) equal exact search over the
filtered subset; a removed file is never returned again, in both backends, and indexing it again brings it back;
--json --explain names each result's map file."""
from __future__ import annotations

import json
import shutil

import pytest

from colintern import Index
from helpers import search_run as run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def docs(search_docs, tmp_path):
    folder = tmp_path / "docs"
    shutil.copytree(search_docs, folder)
    (folder / "b.pdf.meta.json").write_text(json.dumps({"lang": "de", "team": "ops"}))
    return folder


@pytest.fixture
def built(tiny_model_dir, search_ckpt, docs, tmp_path, capsys):
    index = tmp_path / "index"
    base = ["index", "--ckpt", search_ckpt, "--model_id", tiny_model_dir, "--index", index, "--dpi", 72]
    assert run(capsys, *base, "--inputs", docs / "a.pdf", docs / "b.pdf", "--meta", "lang=en")[0] == 0
    assert run(capsys, *base, "--inputs", docs / "c.png", "--meta", "lang=fr", "--meta", "team=ops")[0] == 0
    return index, base


def query(capsys, index, *extra) -> list[dict]:
    code, out, err = run(capsys, "query", "--index", index, "--json", *extra)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_the_python_api_gives_what_the_command_line_prints(built, capsys):
    index, _ = built
    api = Index.open(index)
    queries = ["a red page with the word alpha", "blue gamma"]
    assert api.search(queries, k=4) == query(capsys, index, "--k", 4, *queries)
    assert api.search("blue gamma", k=2) == query(capsys, index, "--k", 2, "blue gamma")[0]["results"]
    info = api.info()
    code, out, _ = run(capsys, "info", "--index", index, "--json")
    assert code == 0 and json.loads(out) == info
    assert (info["pages"], info["files"], info["dim"], info["pool_factor"], info["file_meta_keys"]) == \
        (6, 3, 32, 1, ["lang", "team"])
    assert info["tokens"] == sum(p["length"] for p in api.pages.pages)
    assert info["bytes_on_disk"] == sum((index / s / "tokens.f16").stat().st_size for s in api.pages.meta["segments"])
    code, out, _ = run(capsys, "info", "--index", index)
    assert code == 0 and "pages: 6" in out and "pool_factor: 1" in out


def test_filters_equal_exact_search_over_the_filtered_pages(built, docs, capsys):
    index, _ = built
    api = Index.open(index)
    everything = api.search(["red page"], k=6)[0]["results"]
    # b.pdf: --meta lang=en, then its sidecar's lang=de on top; c.png: lang=fr
    for flags, keep in [(["--where", "lang=de"], {str(docs / "b.pdf")}),
                        (["--where", "team=ops"], {str(docs / "b.pdf"), str(docs / "c.png")}),
                        (["--where", "lang=en"], {str(docs / "a.pdf")}),
                        (["--files", "*.pdf", "--where", "team=ops"], {str(docs / "b.pdf")}),
                        (["--files", "c.png"], {str(docs / "c.png")})]:
        got = query(capsys, index, "--k", 6, *flags, "red page")[0]["results"]
        want = [r for r in everything if r["file"] in keep]
        assert [(r["file"], r["page"]) for r in got] == [(r["file"], r["page"]) for r in want], flags
        assert all(abs(g["score"] - w["score"]) < 1e-5 for g, w in zip(got, want))
    code, _, err = run(capsys, "query", "--index", index, "--where", "lang=xx", "red")
    assert code == 2 and "holds no page that passes the filters" in err
    code, _, err = run(capsys, "query", "--index", index, "--where", "lang", "red")
    assert code == 2 and "--where 'lang': expected KEY=VALUE" in err


@pytest.mark.parametrize("backend", ["embedded", "qdrant"])
def test_a_removed_file_is_never_returned_again_and_can_come_back(built, docs, tmp_path, capsys, backend):
    index, base = built
    extra = [] if backend == "embedded" else ["--backend", "qdrant", "--path", tmp_path / "qdrant"]
    if extra:
        pytest.importorskip("qdrant_client")
        assert run(capsys, *base, "--inputs", docs, *extra)[0] == 0  # sync the collection
    code, out, err = run(capsys, "remove", "--index", index, str(docs / "a.pdf"), "*.png", *extra)
    assert code == 0 and out.startswith(f"removed 4 page(s) of 2 file(s) from {index}; 2 page(s) left"), err
    results = query(capsys, index, "--k", 6, *extra, "red page", "sigma")
    assert all(r["file"] == str(docs / "b.pdf") for line in results for r in line["results"])
    assert all(len(line["results"]) == 2 for line in results)
    code, _, err = run(capsys, "remove", "--index", index, str(docs / "nothing.pdf"))
    assert code == 2 and "no indexed file matches it" in err
    # indexed again (same content): its pages are back, encoded anew, not hidden with the removed ones
    code, out, err = run(capsys, *base, "--inputs", docs, *extra)
    assert code == 0 and out.startswith("indexed 4 new page(s) from 3 file(s); 6 page(s)"), err
    assert len(query(capsys, index, "--k", 6, *extra, "red page")[0]["results"]) == 6


def test_json_explain_names_each_results_map(built, tmp_path, capsys):
    index, _ = built
    maps = tmp_path / "maps"
    results = query(capsys, index, "--k", 3, "--explain", maps, "red page")[0]["results"]
    assert [r["map"] for r in results] == [str(maps / f"q001_r{r['rank']:02d}.png") for r in results]
    assert all((maps / f"q001_r{r['rank']:02d}.png").is_file() for r in results)


def test_removing_needs_the_writer_lock(built, docs, capsys):
    from colintern.index.page_index import writer_lock

    index, _ = built
    with writer_lock(index):
        code, _, err = run(capsys, "remove", "--index", index, str(docs / "a.pdf"))
    assert code == 2 and "is being written by another process" in err


def test_compact_reclaims_removed_pages_and_a_crash_loses_nothing(built, docs, capsys, monkeypatch):
    """compact rewrites the segments holding hidden pages: the same pages and scores afterwards (the stored float16
    bytes are copied), less on disk, verify clean; killed before its one index.json write, the old segments stay
    named and the new ones are leftovers: nothing lost or doubled."""
    from colintern.index.page_index import PageIndex

    index, _ = built
    assert run(capsys, "remove", "--index", index, str(docs / "a.pdf"))[0] == 0
    before = query(capsys, index, "--k", 6, "red page", "sigma")
    size = Index.open(index).info()["bytes_on_disk"]
    real = PageIndex.save_meta

    def killed(self):
        raise KeyboardInterrupt  # the moment before compact's one index.json write

    monkeypatch.setattr(PageIndex, "save_meta", killed)
    assert run(capsys, "compact", "--index", index)[0] == 130
    monkeypatch.setattr(PageIndex, "save_meta", real)
    assert query(capsys, index, "--k", 6, "red page", "sigma") == before
    code, out, err = run(capsys, "compact", "--index", index)
    assert code == 0 and out.startswith(f"compacted 1 segment(s) of {index}: "), err
    after = Index.open(index)
    assert after.info()["bytes_on_disk"] < size and after.info()["hidden_pages"] == 0
    assert query(capsys, index, "--k", 6, "red page", "sigma") == before
    assert run(capsys, "verify", "--index", index)[0] == 0
    assert sorted(p.name for p in index.glob("seg-*")) == sorted(after.pages.meta["segments"])
    assert run(capsys, "compact", "--index", index)[1].startswith("nothing to compact")


def test_the_next_write_reclaims_the_space_of_removed_and_replaced_pages(built, docs, capsys):
    """search.py index compacts after it adds: the segments holding pages of removed (or changed) files are
    rewritten without them, so the index holds no hidden page and the same searches give the same results."""
    from helpers import search_page

    index, base = built
    assert run(capsys, "remove", "--index", index, str(docs / "a.pdf"))[0] == 0
    removed = Index.open(index).info()
    assert removed["hidden_pages"] == 3
    before = query(capsys, index, "--k", 3, "red page", "sigma")
    search_page(4).save(docs / "d.png")
    code, out, err = run(capsys, *base, "--inputs", docs / "d.png")
    assert code == 0 and out.startswith("indexed 1 new page(s) from 1 file(s); 4 page(s)"), err
    after = Index.open(index).info()
    assert after["hidden_pages"] == 0 and after["pages"] == 4
    assert after["bytes_on_disk"] < removed["bytes_on_disk"]  # 4 pages stored instead of 6 (a.pdf's 3 were hidden)
    assert all((index / s).is_dir() for s in Index.open(index).pages.meta["segments"])
    results = {q["query"]: [(r["file"], r["page"], r["score"]) for r in q["results"]]
               for q in query(capsys, index, "--k", 4, "red page", "sigma")}
    for line in before:  # the three pages that were there before keep their scores; d.png joins them
        kept = [(r["file"], r["page"], r["score"]) for r in line["results"]]
        assert [hit for hit in results[line["query"]] if hit[0] != str(docs / "d.png")] == kept
    assert run(capsys, "verify", "--index", index)[0] == 0


def test_indexing_off_a_terminal_logs_its_progress_with_rate_and_eta(tiny_model_dir, search_ckpt, docs, tmp_path,
                                                                      capsys, monkeypatch):
    """stderr captured (not a terminal): no tqdm redraws, but progress lines with count, share, rate and ETA."""
    from colintern import cli

    monkeypatch.setattr(cli, "LOG_PROGRESS_EVERY", 0.0)
    code, out, err = run(capsys, "index", "--ckpt", search_ckpt, "--model_id", tiny_model_dir, "--index",
                         tmp_path / "index", "--dpi", 72, "--segment_pages", 2, "--inputs", docs)
    assert code == 0 and out.startswith("indexed 6 new page(s) from 3 file(s)"), err
    lines = [line for line in err.splitlines() if " index pages: " in line]
    counts = [line.split("index pages: ", 1)[1].split(" ", 1)[0] for line in lines]
    assert counts[:2] == ["2/6", "4/6"] and counts[-1] == "6/6", lines
    assert all(" page/s, ETA " in line and "%" in line for line in lines)
    assert not any(part.startswith("index pages") for part in err.replace("\r", "\n").splitlines())  # no tqdm bar


def test_filters_in_qdrant_give_the_embedded_filtered_results(built, docs, tmp_path, capsys):
    """--files/--where with --backend qdrant: Qdrant searches only the points of the pages that pass (decided by the
    index folder, as for the embedded backend): the same pages in the same order, scores within 1e-3."""
    pytest.importorskip("qdrant_client")
    index, base = built
    qdrant = ["--backend", "qdrant", "--path", tmp_path / "qdrant"]
    assert run(capsys, *base, "--inputs", docs, *qdrant)[0] == 0  # sync the collection
    for filters in (["--where", "lang=en"], ["--files", "*.png"], ["--where", "team=ops", "--where", "lang=de"]):
        embedded = query(capsys, index, "--k", 6, *filters, "red page", "sigma")
        other = query(capsys, index, "--k", 6, *filters, *qdrant, "red page", "sigma")
        for a, b in zip(embedded, other, strict=True):
            assert [(r["file"], r["page"]) for r in a["results"]] == [(r["file"], r["page"]) for r in b["results"]]
            assert max(abs(r["score"] - s["score"]) for r, s in zip(a["results"], b["results"])) <= 1e-3
    sizes = [len(query(capsys, index, "--k", 6, *f, *qdrant, "red")[0]["results"]) for f in
             (["--where", "lang=en"], ["--files", "*.png"], ["--where", "team=ops", "--where", "lang=de"])]
    assert sizes == [3, 1, 2]  # lang=en: a.pdf's 3 pages (b.pdf's sidecar says de); *.png: c.png; ops + de: b.pdf
