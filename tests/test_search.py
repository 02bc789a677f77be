"""search.py: index real rendered PDF pages, query them (equal to in-memory exact MaxSim), add files
incrementally, resume an interrupted index without duplicates, similarity maps in page coordinates, Parquet export,
and every bad input as one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from colintern import ColIntern
from colintern.retriever.checkpoint import save_checkpoint
from helpers import REPO, load_script, max_diff, perturb_lora, search_page as page, search_run as run

search = load_script("search")


@pytest.fixture
def docs(search_docs):
    return search_docs


@pytest.fixture
def ckpt(search_ckpt):
    return search_ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


def test_index_and_query_equal_exact_maxsim_in_memory(tiny_model_dir, ckpt, docs, tmp_path, capsys):
    index = tmp_path / "index"
    code, out, err = run(capsys, "index", "--ckpt", ckpt, "--model_id", tiny_model_dir, "--inputs", docs, "--index",
                         index, "--dpi", 72, "--segment_pages", 2)
    assert code == 0, err
    assert out.strip() == f"indexed 6 new page(s) from 3 file(s); 6 page(s) in {index}"
    queries = ["a red page with the word alpha", "blue gamma"]
    code, out, _ = run(capsys, "query", "--index", index, "--k", 6, "--json", *queries)
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["query"] for line in lines] == queries
    # the same pages rendered the same way, scored in memory: the same ranking, scores within fp16 storage error
    from colintern.index.page_index import PageIndex
    from colintern.index.sources import render_page
    from colintern.retriever.scoring import maxsim

    model = ColIntern.from_pretrained(tiny_model_dir, ckpt=ckpt)
    opened = PageIndex.open(index)
    sources = [opened.source(i) for i in range(len(opened.pages))]
    scores = maxsim(model.encode_queries(queries), model.encode_images([render_page(s, 72) for s in sources]))
    for qi, line in enumerate(lines):
        got = [(r["file"], r["page"]) for r in line["results"]]
        order = torch.argsort(scores[qi], descending=True).tolist()
        assert got == [(sources[i].file, sources[i].page) for i in order]
        assert all(abs(r["score"] - float(scores[qi, i])) < 2e-2 for r, i in zip(line["results"], order))
    assert [r["rank"] for r in lines[0]["results"]] == [1, 2, 3, 4, 5, 6]


def test_adding_files_encodes_only_new_pages_and_a_rerun_resumes_without_duplicates(tiny_model_dir, ckpt, docs,
                                                                                   tmp_path, capsys, monkeypatch):
    from colintern.index.page_index import PageIndex

    index = tmp_path / "index"
    base = ["index", "--ckpt", ckpt, "--model_id", tiny_model_dir, "--index", index, "--dpi", 72,
            "--segment_pages", 2]
    assert run(capsys, *base, "--inputs", docs / "a.pdf")[1].startswith("indexed 3 new page(s)")
    real_commit, calls = PageIndex.commit, []

    def dies_on_the_second_segment(self, entries):
        calls.append(len(entries))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the first new segment was committed
        return real_commit(self, entries)

    monkeypatch.setattr(PageIndex, "commit", dies_on_the_second_segment)
    assert run(capsys, *base, "--inputs", docs)[0] == 130
    monkeypatch.setattr(PageIndex, "commit", real_commit)
    (index / "seg-00009").mkdir()  # a segment renamed into place but never named by index.json
    code, out, _ = run(capsys, *base, "--inputs", docs)
    assert code == 0 and out.startswith("indexed 1 new page(s) from 3 file(s); 6 page(s)")
    opened = PageIndex.open(index)
    keys = [(p["sha256"], p["page"]) for p in opened.pages]
    assert len(keys) == len(set(keys)) == 6 and not (index / "seg-00009").exists()
    assert run(capsys, *base, "--inputs", docs)[1].startswith("indexed 0 new page(s)")


def test_similarity_maps_put_a_planted_match_where_its_token_is(tiny_backbone):
    """Plant the query in image token j: the map's maximum is inside token j's box (and, for InternVL, the same
    value appears in the thumbnail, which covers the page at a coarser grid)."""
    from colintern.retriever.simmap import paint, token_maps

    name, folder = tiny_backbone
    model = ColIntern.from_pretrained(folder, max_tiles=2, max_visual_tokens=64)
    image = page(2).resize((112, 224))
    boxes = model.processor.image_token_boxes(image)
    g = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(len(boxes), 16, generator=g), dim=-1) * 0.3
    query = torch.nn.functional.normalize(torch.randn(2, 16, generator=g), dim=-1)
    j = 5
    vectors[j] = query[1]
    sims, best = token_maps(query, vectors)
    assert sims.shape == (2, len(boxes)) and int(np.argmax(best)) == j
    heat = paint(best, boxes, 112, 224)
    x0, y0, x1, y1 = boxes[j]
    cy, cx = int((y0 + y1) / 2 * 224), int((x0 + x1) / 2 * 112)
    assert heat[cy, cx] == pytest.approx(best[j]) and np.nanmax(heat) == pytest.approx(best[j])
    assert not np.isnan(heat).any()  # every pixel of the page is covered by some token


def test_export_to_parquet_round_trips(tiny_model_dir, ckpt, docs, tmp_path, capsys):
    import pyarrow.parquet as pq

    from colintern.index.page_index import PageIndex

    index = tmp_path / "index"
    run(capsys, "index", "--ckpt", ckpt, "--model_id", tiny_model_dir, "--inputs", docs / "b.pdf", "--index", index,
        "--dpi", 72)
    code, out, _ = run(capsys, "export", "--index", index, "--out", tmp_path / "pages.parquet")
    assert code == 0 and out.strip() == f"exported 2 page(s) to {tmp_path / 'pages.parquet'}"
    table = pq.read_table(tmp_path / "pages.parquet").to_pylist()
    opened = PageIndex.open(index)
    assert [(r["file"], r["page"]) for r in table] == [(str(docs / "b.pdf"), 1), (str(docs / "b.pdf"), 2)]
    for i, row in enumerate(table):
        assert torch.equal(torch.tensor(row["vectors"], dtype=torch.float32), opened.vectors(i))


def test_bad_inputs_are_one_line(tiny_model_dir, ckpt, docs, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    (bad / "notes.txt").write_text("hello")
    page(0).save(bad / "ok.png")
    base = ["index", "--ckpt", ckpt, "--model_id", tiny_model_dir, "--dpi", 72]
    code, out, err = run(capsys, *base, "--inputs", bad / "broken.pdf", bad / "ok.png", "--index", tmp_path / "i1")
    assert code == 1 and "Traceback" not in err  # 1: something was skipped (named in a warning)
    assert out.strip().endswith("; skipped 1 item: bad PDF x1")
    code, out, err = run(capsys, *base, "--inputs", bad / "broken.pdf", "--index", tmp_path / "i0")
    assert code == 2 and out == "" and err.strip().splitlines()[-1] == \
        "error: no page indexed: every input was bad (skipped 1 item: bad PDF x1); see the warnings above"
    code, _, err = run(capsys, *base, "--inputs", bad / "broken.pdf", "--index", tmp_path / "i2", "--strict")
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: {bad / 'broken.pdf'}: bad PDF: not a "
                                                                  "readable PDF")
    code, _, err = run(capsys, *base, "--inputs", tmp_path / "nope.pdf", "--index", tmp_path / "i3")
    assert code == 2 and err.strip() == f"error: --inputs {tmp_path / 'nope.pdf'}: no such file or folder"
    other = ColIntern.from_pretrained(tiny_model_dir, max_tiles=2, dim=16)
    other_ckpt = tmp_path / "other.pt"
    save_checkpoint(str(other_ckpt), **other.checkpoint_parts())
    code, _, err = run(capsys, "index", "--ckpt", other_ckpt, "--model_id", tiny_model_dir, "--dpi", 72, "--inputs",
                       bad / "ok.png", "--index", tmp_path / "i1")
    assert code == 2 and "was built with another model or checkpoint" in err.strip().splitlines()[-1]
    code, _, err = run(capsys, "query", "--index", tmp_path / "nowhere", "x")
    assert code == 2 and err.strip() == f"error: --index {tmp_path / 'nowhere'}: no index.json; build one with " \
                                        "search.py index"


def test_token_pooling_keeps_k1_and_cuts_vectors_by_k():
    from colintern.retriever.token_pooling import pool_tokens

    g = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    assert torch.equal(pool_tokens(vectors, 1), vectors)
    for k in (2, 3, 4):
        pooled = pool_tokens(vectors, k)
        assert pooled.shape == (-(-50 // k), 16)
    # two tight groups pooled by 5: their two means, exactly
    a, b = torch.zeros(5, 4), torch.zeros(5, 4)
    a[:, 0], b[:, 1] = 1.0, 1.0
    a[:, 2] = torch.linspace(-0.01, 0.01, 5)
    pooled = pool_tokens(torch.cat([a, b]), 5)
    assert sorted(pooled[:, 0].tolist()) == pytest.approx([0.0, 1.0]) and pooled[:, 2].abs().max() < 1e-6


def test_a_pooled_index_stores_about_k_times_fewer_vectors(tiny_model_dir, ckpt, docs, tmp_path, capsys):
    from colintern.index.page_index import PageIndex

    sizes = {}
    for k in (1, 3):
        index = tmp_path / f"k{k}"
        assert run(capsys, "index", "--ckpt", ckpt, "--model_id", tiny_model_dir, "--inputs", docs / "a.pdf",
                   "--index", index, "--dpi", 72, "--pool_factor", k)[0] == 0
        opened = PageIndex.open(index)
        sizes[k] = [p["length"] for p in opened.pages]
    assert [-(-n // 3) for n in sizes[1]] == sizes[3]
    code, out, _ = run(capsys, "query", "--index", tmp_path / "k3", "--k", 2, "--json", "alpha")
    assert code == 0 and len(json.loads(out)["results"]) == 2
    code, _, err = run(capsys, "index", "--ckpt", ckpt, "--model_id", tiny_model_dir, "--inputs", docs / "b.pdf",
                       "--index", tmp_path / "k3", "--dpi", 72, "--pool_factor", 1)
    assert code == 2 and "was built with --pool_factor 3; leave --pool_factor out to extend it" in err
    # extending takes the settings the index stores (pool factor, DPI) when they are left out
    code, out, err = run(capsys, "index", "--ckpt", ckpt, "--model_id", tiny_model_dir, "--inputs", docs / "b.pdf",
                         "--index", tmp_path / "k3")
    assert code == 0 and out.strip() == f"indexed 2 new page(s) from 1 file(s); 5 page(s) in {tmp_path / 'k3'}", err
    extended = PageIndex.open(tmp_path / "k3")
    assert (extended.meta["pool_factor"], extended.meta["dpi"]) == (3, 72)
    assert all(p["length"] <= -(-sizes[1][0] // 3) + 1 for p in extended.pages)


def test_export_model_is_one_folder_with_the_checkpoints_embeddings(tiny_backbone, tmp_path, capsys):
    """LoRA merged into the base weights, the head and config beside them: ColIntern.from_pretrained(FOLDER) gives
    the checkpoint's embeddings (within 1e-5), with no adapter left."""
    name, folder = tiny_backbone
    model = ColIntern.from_pretrained(folder, max_tiles=2, max_visual_tokens=64, dim=32)
    model.add_lora(r=4, lora_alpha=8, lora_dropout=0.0, include_vision=True)
    perturb_lora(model, 0.05)
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(str(ckpt), **model.checkpoint_parts())
    out = tmp_path / "exported"
    code, printed, err = run(capsys, "export_model", "--ckpt", ckpt, "--model_id", folder, "--out", out)
    assert code == 0, err
    assert printed.strip() == (f"exported {ckpt} on {folder} to {out}: load it with --model_id {out}; its model card "
                               f"is {out}/README.md; publish it with: hf upload colintern-exported {out} .")
    exported = ColIntern.from_pretrained(str(out))
    original = ColIntern.from_pretrained(folder, ckpt=str(ckpt))
    assert exported.lora_config is None and not any("lora_" in n for n, _ in exported.backbone.named_parameters())
    pages, queries = [page(0), page(3)], ["a red page", "delta"]
    assert max_diff(exported.encode_images(pages), original.encode_images(pages)) < 1e-5
    assert max_diff(exported.encode_queries(queries), original.encode_queries(queries)) < 1e-5
    code, _, err = run(capsys, "export_model", "--ckpt", ckpt, "--model_id", folder, "--out", out)
    assert code == 2 and "exists and is not an empty folder" in err


def query_json(capsys, index, *extra) -> list[dict]:
    code, out, err = run(capsys, "query", "--index", index, "--k", 6, "--json", *extra, "a red page with the word alpha",
                         "blue gamma", "yellow omega")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def same_results(a: list[dict], b: list[dict], tol: float) -> None:
    for x, y in zip(a, b, strict=True):
        assert [(r["file"], r["page"]) for r in x["results"]] == [(r["file"], r["page"]) for r in y["results"]]
        assert max(abs(r["score"] - s["score"]) for r, s in zip(x["results"], y["results"])) <= tol


def test_qdrant_local_mode_returns_the_embedded_top_k_and_follows_the_index(tiny_model_dir, ckpt, docs, tmp_path,
                                                                          capsys):
    """Qdrant's native MaxSim over the same stored vectors: the same pages in the same order, scores within 1e-3;
    a rerun sends nothing; a changed file's old pages leave the collection and its new ones enter it."""
    pytest.importorskip("qdrant_client")
    import shutil

    folder = tmp_path / "docs"
    shutil.copytree(docs, folder)
    index, qdrant = tmp_path / "index", tmp_path / "qdrant"
    base = ["index", "--ckpt", ckpt, "--model_id", tiny_model_dir, "--inputs", folder, "--index", index, "--dpi", 72,
            "--segment_pages", 4, "--backend", "qdrant", "--path", qdrant]
    code, out, err = run(capsys, *base)
    assert code == 0, err
    assert out.splitlines()[-1] == f"Qdrant collection colintern_index at {qdrant}: 6 page(s) sent, 6 in all"
    embedded = query_json(capsys, index)
    same_results(query_json(capsys, index, "--backend", "qdrant", "--path", qdrant), embedded, 1e-3)
    assert run(capsys, *base)[1].splitlines()[-1].endswith(": 0 page(s) sent, 6 in all")
    page(5).rotate(90).save(folder / "c.png")  # c.png changed: its old page is hidden, the new one indexed
    # 2 sent: c.png's new page, and b.pdf's page 2, whose segment the next write compacted to drop c.png's old page
    # (compaction gives the pages it rewrites new uids, so Qdrant receives them again)
    assert run(capsys, *base)[1].splitlines()[-1].endswith(": 2 page(s) sent, 6 in all")
    same_results(query_json(capsys, index, "--backend", "qdrant", "--path", qdrant), query_json(capsys, index), 1e-3)
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(qdrant))
    assert client.count("colintern_index", exact=True).count == 6
    client.close()
    # a second index may not write into this one's collection
    other = ["index", "--ckpt", ckpt, "--model_id", tiny_model_dir, "--inputs", folder / "c.png", "--index",
             tmp_path / "other", "--dpi", 72, "--backend", "qdrant", "--path", qdrant, "--collection", "colintern_index"]
    code, _, err = run(capsys, *other)
    assert code == 2 and err.strip().endswith("holds another index's pages; pass another --collection")
    assert "Traceback" not in err
    code, _, err = run(capsys, "query", "--index", index, "--backend", "qdrant", "x")
    assert code == 2 and "give --url URL (a server) or --path DIR" in err and "Traceback" not in err


def test_the_faiss_first_stage_equals_exact_when_its_candidates_cover_the_index(tiny_model_dir, ckpt, docs, tmp_path,
                                                                              capsys, caplog):
    pytest.importorskip("faiss")
    import logging

    index = tmp_path / "index"
    assert run(capsys, "index", "--ckpt", ckpt, "--model_id", tiny_model_dir, "--inputs", docs, "--index", index,
               "--dpi", 72)[0] == 0
    exact = query_json(capsys, index, "--first_stage", "exact")
    caplog.set_level(logging.INFO, logger="colintern.search")
    same_results(query_json(capsys, index, "--first_stage", "faiss", "--candidates", 6, "--check_recall"), exact, 1e-5)
    assert "recall@6 of the FAISS first stage (Flat, 6 candidates) against exact MaxSim on these 3 queries: 1.0000" \
        in caplog.text
    assert "recall@10 1.000 against exact search on 8 probe queries" in caplog.text  # 6 candidates = every page
    assert len(list(index.glob("faiss-*.recall.json"))) == 1
    from colintern.index.page_index import PageIndex
    from colintern.index.page_search import FaissFirstStage, recall_at_k

    opened = PageIndex.open(index)
    model = ColIntern.from_pretrained(tiny_model_dir, ckpt=ckpt)
    qs = model.encode_queries(["a red page with the word alpha", "blue gamma"])
    few = FaissFirstStage(opened, candidates=2, token_k=1, show_progress=False)
    values, ids = few.topk(qs, 2, "cpu")  # two candidates per query: the top-2 of those, scored exactly
    for q, row_v, row_i in zip(qs, values, ids):
        for v, i in zip(row_v, row_i):
            want = float((q.double() @ opened.vectors(int(i)).double().T).max(1).values.sum())
            assert abs(v - want) < 1e-4
    assert recall_at_k(np.array([[1, 2], [3, 4]]), np.array([[2, 1], [3, 5]])) == 0.75


def test_an_index_killed_mid_run_resumes_without_duplicate_pages(tiny_model_dir, ckpt, docs, tmp_path):
    """A real SIGKILL after the second committed segment, then the same command again."""
    import os
    import subprocess
    import sys

    from colintern.index.page_index import PageIndex

    index = tmp_path / "index"
    cmd = [sys.executable, str(REPO / "search.py"), "index", "--ckpt", ckpt, "--model_id", tiny_model_dir,
           "--inputs", str(docs), "--index", str(index), "--dpi", "72", "--segment_pages", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    faulty = [sys.executable, "-m", "colintern.testing.faults", "kill@2", "search", *cmd[2:]]  # SIGKILL: 2nd segment
    killed = subprocess.run(faulty, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    assert len(PageIndex.open(index).pages) == 4
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.startswith("indexed 2 new page(s) from 3 file(s); 6 page(s)")
    keys = [(p["sha256"], p["page"]) for p in PageIndex.open(index).pages]
    assert len(keys) == len(set(keys)) == 6 and not list(index.glob(".seg-*"))


def test_exact_search_in_groups_equals_one_pass_with_ties_to_the_lower_page(tmp_path):
    """exact_topk widens a few pages at a time and merges: the same top-k as maxsim_topk over everything, ties
    included (duplicate pages score the same: the lower page comes first)."""
    from colintern.index.page_index import PageIndex
    from colintern.index.sources import PageSource
    from colintern.index.page_search import exact_topk
    from colintern.retriever.scoring import maxsim_topk

    g = torch.Generator().manual_seed(0)
    pages = [torch.nn.functional.normalize(torch.randn(3 + i % 5, 16, generator=g), dim=-1).half().float()
             for i in range(9)]
    pages[7] = pages[2].clone()  # a tie
    index = PageIndex.create_or_open(tmp_path / "ix", "synthetic", None, {"dim": 16}, 72)
    index.commit([(PageSource(f"p{i}.png", str(i), 1, "image"), v, 0, 0, (1, 1)) for i, v in enumerate(pages)])
    qs = [torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1) for _ in range(3)] + [pages[2][:2]]
    want_v, want_i = maxsim_topk(qs, pages, 5, device="cpu")
    for group in (1, 10, 1 << 20):
        values, ids = exact_topk(index, qs, 5, "cpu", group_tokens=group)
        assert np.array_equal(ids, want_i.numpy()) and np.allclose(values, want_v.numpy(), atol=1e-6)
    assert ids[3, 0] == 2 and ids[3, 1] == 7


def page_texts(pdf) -> list[str]:
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(str(pdf))
    try:
        return [" ".join(document[i].get_textpage().get_text_range().split()) for i in range(len(document))]
    finally:
        document.close()


def test_a_trained_model_finds_each_real_pdf_page_from_its_own_text(tiny_model_dir, tmp_path, capsys):
    """Real rendered PDF pages (six pages of the GNU Libtasn1 manual, tests/fixtures/real_pages.pdf): train the tiny
    model on queries made from each page's own text, index the PDF, and each page is the top-1 result of its query.
    The untrained checkpoint of the same model is the control (it ranks by chance)."""
    from pathlib import Path

    from colintern.index.sources import PageSource, render_page

    pdf = Path(__file__).parent / "fixtures" / "real_pages.pdf"
    texts = page_texts(pdf)
    queries = [" ".join(text.split()[4:16]) for text in texts]  # words of the page, past its running head
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for i, query in enumerate(queries):
        render_page(PageSource(str(pdf), "", i + 1, "pdf"), 40).save(data / f"p{i}.png")
        lines += [json.dumps({"query": query, "pos": f"p{i}.png"}),
                  json.dumps({"query": " ".join(texts[i].split()[16:28]), "pos": f"p{i}.png"})]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    train = load_script("train")
    out = tmp_path / "train"
    assert train.main(["--model_id", tiny_model_dir, "--train_jsonl", str(data / "train.jsonl"), "--root", str(data),
                       "--out_dir", str(out), "--batch_size", "6", "--epochs", "30", "--lr", "2e-3", "--lora",
                       "--tau", "0.05", "--seed", "0", "--device", "cpu", "--save_every", "0",
                       "--no_page_check"]) == 0
    trained = sorted(out.glob("colintern_heads_*.pt"))[-1]
    top1 = {}
    for name, ckpt in (("trained", trained), ("untrained", None)):
        index = tmp_path / f"index_{name}"
        argv = ["index", "--model_id", tiny_model_dir, "--inputs", pdf, "--index", index, "--dpi", 40]
        assert run(capsys, *argv, *(["--ckpt", ckpt] if ckpt else []))[0] == 0
        code, stdout, _ = run(capsys, "query", "--index", index, "--k", 1, "--json", *queries)
        assert code == 0
        top1[name] = [json.loads(line)["results"][0]["page"] for line in stdout.splitlines()]
    assert top1["trained"] == [1, 2, 3, 4, 5, 6], top1
    assert top1["untrained"] != top1["trained"]


def test_centroid_interaction_scores_pages_by_their_centroids_and_reranks_exactly(tmp_path):
    """Large indexes: with every centroid walked, a page's approximate score is exactly Σ_i max over the centroids of
    its tokens of q_i·c (float64 brute force); with every page as a candidate, the result is exact search's."""
    pytest.importorskip("faiss")
    import faiss

    from colintern.index.page_index import PageIndex
    from colintern.index.sources import PageSource
    from colintern.index.page_search import FaissFirstStage, exact_topk

    g = torch.Generator().manual_seed(0)
    pages = [torch.nn.functional.normalize(torch.randn(20 + i % 7, 16, generator=g), dim=-1).half().float()
             for i in range(30)]
    index = PageIndex.create_or_open(tmp_path / "ix", "synthetic", None, {"dim": 16}, 72)
    index.commit([(PageSource(f"p{i}.png", str(i), 1, "image"), v, 0, 0, (1, 1)) for i, v in enumerate(pages)])
    stage = FaissFirstStage(index, nprobe=8, candidates=30, factory="IVF8,Flat", show_progress=False)
    assert stage.centroid_stage is not None and list(tmp_path.glob("ix/faiss-*.centroids.npz"))
    q = torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=-1)
    ivf = faiss.extract_index_ivf(stage.faiss)
    centroids = torch.from_numpy(ivf.quantizer.reconstruct_n(0, ivf.nlist)).double()
    brute = []
    for page_vectors in pages:
        lists = ivf.quantizer.search(page_vectors.numpy(), 1)[1][:, 0]  # each token's IVF list
        brute.append(float((q.double() @ centroids[np.unique(lists)].T).max(1).values.sum()))
    got = stage.centroid_stage.candidates(q.numpy(), len(pages), ivf.nlist, len(pages))
    want = sorted(range(len(pages)), key=lambda u: (-round(brute[u], 5), u))
    assert [round(brute[u], 5) for u in got] == [round(brute[u], 5) for u in want]
    qs = [q, pages[3][:4]]
    assert np.array_equal(stage.topk(qs, 5, "cpu")[1], exact_topk(index, qs, 5, "cpu")[1])
