"""eval.py --baseline: the ViDoRe paper's text rows on a real-PDF set. BM25 (mteb's) and a real pretrained text
model (all-MiniLM-L6-v2, from the package index) score the pages by their text layer through the same evaluator
and summary as a ColIntern model; pages without text are read by real Tesseract OCR, once (cached)."""
from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest

from helpers import FIXTURES

pytest.importorskip("bm25s")
pytestmark = pytest.mark.usefixtures("one_thread")
PDFS = [FIXTURES / "real_pages.pdf", FIXTURES / "real_pages_mime.pdf"]


@pytest.fixture(scope="module")
def real_set(tmp_path_factory):
    """make_dataset's evaluation set of the two real PDFs (the held-out document's pages, with their text layer)."""
    from colintern.data.make_dataset import make_dataset
    from colintern.settings import DatasetConfig

    out = tmp_path_factory.mktemp("baseline_data")
    make_dataset(DatasetConfig(inputs=[str(p) for p in PDFS], out=str(out / "data"), dpi=100))
    return out / "data" / "eval"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pytest.importorskip("all_minilm_l6_v2")
    import all_minilm_l6_v2

    return str(all_minilm_l6_v2.extract_model(str(tmp_path_factory.mktemp("minilm"))))


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_eval(*argv):
    from colintern.cli import run_cli
    from helpers import load_script

    return run_cli(load_script("eval").main, [str(a) for a in argv])


def test_bm25_finds_each_text_layer_querys_page(real_set, tmp_path):
    assert run_eval("--local_dataset", real_set, "--baseline", "bm25", "--out_dir", tmp_path) == 0
    summary = json.loads((tmp_path / "bm25" / "summary.json").read_text())
    scores = summary["tasks"]["eval"]
    # the queries are sentences of their own page (and of no other): BM25 ranks that page first every time
    assert scores["ndcg_at_1"] == 1.0 and scores["ndcg_at_5"] == 1.0 and summary["main_metric"] == "ndcg_at_5"
    assert summary["model"] == "bm25" and summary["model_name"] == "mteb/baseline-bm25s"
    assert not (tmp_path / "ocr").exists() or not any((tmp_path / "ocr").iterdir())  # every page had its text


def test_a_text_model_scores_what_its_own_embeddings_give(real_set, minilm, tmp_path):
    """nDCG@5 of --baseline text:all-MiniLM-L6-v2 equals the one computed here from the model's own embeddings."""
    from sentence_transformers import SentenceTransformer

    assert run_eval("--local_dataset", real_set, "--baseline", f"text:{minilm}", "--out_dir", tmp_path) == 0
    got = json.loads((tmp_path / "text-all-MiniLM-L6-v2" / "summary.json").read_text())["tasks"]["eval"]
    corpus, queries = rows(real_set / "corpus.jsonl"), rows(real_set / "queries.jsonl")
    qrels = {r["query-id"]: r["corpus-id"] for r in rows(real_set / "qrels.jsonl")}
    model = SentenceTransformer(minilm)
    pages = model.encode([c["text"] for c in corpus], normalize_embeddings=True)
    asked = model.encode([q["query"] for q in queries], normalize_embeddings=True)
    ndcg = []
    for q, vector in zip(queries, asked):
        order = [corpus[i]["corpus-id"] for i in np.argsort(-(pages @ vector), kind="stable")]
        rank = order.index(qrels[q["query-id"]])
        ndcg.append(1 / math.log2(rank + 2) if rank < 5 else 0.0)
    assert got["ndcg_at_5"] == pytest.approx(float(np.mean(ndcg)), abs=1e-4)  # mteb keeps 5 decimals
    assert 0.5 < got["ndcg_at_5"] <= 1.0
    # both baselines in plot_vidore_metrics.py's table, beside each other, as a model's runs would be
    from colintern.cli import run_cli
    from helpers import load_script

    assert run_eval("--local_dataset", real_set, "--baseline", "bm25", "--out_dir", tmp_path) == 0
    assert run_cli(load_script("plot_vidore_metrics").main, ["--inputs", str(tmp_path / "bm25"),
                                                            str(tmp_path / "text-all-MiniLM-L6-v2"),
                                                            "--outdir", str(tmp_path / "plots")]) == 0
    table = (tmp_path / "plots" / "metrics.csv").read_text().splitlines()
    assert "bm25,eval,ndcg_at_5,1.0" in table
    assert f"text-all-MiniLM-L6-v2,eval,ndcg_at_5,{got['ndcg_at_5']}" in table


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="Debian's tesseract-ocr is not installed (make ocr)")
def test_pages_without_text_are_read_by_ocr_once(real_set, tmp_path, monkeypatch):
    """Drop the text of two pages: Tesseract reads them from their images (its words are the text layer's words),
    the others keep their text, and a second run reads the cache without calling Tesseract."""
    from colintern.eval.baselines import text_task

    data = tmp_path / "set"
    shutil.copytree(real_set, data)
    corpus = rows(data / "corpus.jsonl")
    layer = {c["corpus-id"]: c["text"] for c in corpus}
    dropped = [c["corpus-id"] for c in corpus[:2]]
    for c in corpus[:2]:
        del c["text"]
    (data / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus))
    cache = tmp_path / "ocr"
    task, read = text_task(str(data), cache)
    assert read == 2 and len(list(cache.glob("*.json"))) == 2
    texts = dict(zip(task.dataset["default"]["test"]["corpus"]["id"], task.dataset["default"]["test"]["corpus"]["text"]))
    for cid in corpus:
        cid = cid["corpus-id"]
        if cid not in dropped:
            assert texts[cid] == layer[cid]
            continue
        truth, seen = (set(re.findall(r"[a-z0-9]{4,}", text.lower())) for text in (layer[cid], texts[cid]))
        assert len(truth & seen) >= 0.8 * len(truth), (cid, texts[cid][:300])  # real OCR of the rendered page
    import pytesseract

    monkeypatch.setattr(pytesseract, "image_to_string", lambda *a, **k: (_ for _ in ()).throw(AssertionError("OCR")))
    again, read = text_task(str(data), cache)
    assert read == 2 and list(again.dataset["default"]["test"]["corpus"]["text"]) == list(texts.values())
    # a cache file with a flipped byte is not trusted: the page is read by OCR again
    damaged = sorted(cache.glob("*.json"))[0]
    damaged.write_text(damaged.read_text().replace("e", "f", 1))
    calls = []
    monkeypatch.setattr(pytesseract, "image_to_string", lambda image, **k: calls.append(1) or "read again")
    third, _ = text_task(str(data), cache)
    assert calls == [1] and "read again" in list(third.dataset["default"]["test"]["corpus"]["text"])


def test_baseline_arguments_are_checked_before_anything_loads(tmp_path, capsys):
    assert run_eval("--baseline", "bm25", "--out_dir", tmp_path) == 2
    assert "--baseline scores --local_dataset sets by their text" in capsys.readouterr().err
    assert run_eval("--local_dataset", tmp_path, "--baseline", "tfidf", "--out_dir", tmp_path) == 2
    assert "use bm25 or text:MODEL" in capsys.readouterr().err
