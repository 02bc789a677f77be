"""python -m colintern.data.make_dataset on real PDFs (six pages of the GNU Libtasn1 manual, four of the freedesktop.org
shared-MIME-info specification, tests/fixtures/): queries from each page's own text layer point at that page,
evaluation holds out whole documents, running headers are never queries, a page without text is reported, and
train.py and eval.py read the result as it is."""
from __future__ import annotations

import json
import os
import re

import pytest
from PIL import Image

from colintern.cli import run_cli
from colintern.data.make_dataset import main, text_lines
from helpers import FIXTURES, load_script

pytestmark = pytest.mark.usefixtures("one_thread")
PDFS = [FIXTURES / "real_pages.pdf", FIXTURES / "real_pages_mime.pdf"]


def page_text(pdf, number: int) -> str:
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(str(pdf))
    try:
        return " ".join(text_lines(document[number - 1].get_textpage().get_text_range()))
    finally:
        document.close()


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("made") / "set"
    scan = out.parent / "scan.pdf"  # a page with no text layer, as a scanned document has
    Image.new("RGB", (300, 400), (250, 250, 250)).save(scan)
    assert run_cli(main, ["--inputs", *map(str, PDFS), str(scan), "--out", str(out), "--dpi", "72"]) == 0
    return out, scan


def test_queries_come_from_their_own_page_and_evaluation_holds_out_whole_documents(made):
    out, scan = made
    record = json.loads((out / "dataset.json").read_text())
    split = {d["file"]: d["split"] for d in record["documents"]}
    assert sorted(split.values()) == ["eval", "train", "train"] and split[str(scan)] == "train"  # no text: never held
    held = next(d for d in record["documents"] if d["split"] == "eval")
    by_name = {d["document"]: d["file"] for d in record["documents"]}
    train = rows(out / "train.jsonl")
    assert len(train) >= 12 and all(row["negs"] == [] for row in train)
    for row in train:
        document, page = re.fullmatch(r"pages/(.+)/page-(\d+)\.png", row["pos"]).groups()
        assert (out / row["pos"]).is_file() and document != held["document"]
        own = page_text(by_name[document], int(page))
        assert row["query"] in own  # the sentence is on its page ...
        others = [page_text(pdf, n) for pdf in PDFS for n in range(1, 7 if pdf == PDFS[0] else 5)
                  if not (str(pdf) == by_name[document] and n == int(page))]
        assert not any(row["query"] in text for text in others)  # ... and on no other page
    corpus = {r["corpus-id"]: r for r in rows(out / "eval" / "corpus.jsonl")}
    queries, qrels = rows(out / "eval" / "queries.jsonl"), rows(out / "eval" / "qrels.jsonl")
    assert len(corpus) == held["pages"] and {c.split("/")[0] for c in corpus} == {held["document"]}
    assert all((out / "eval" / c["image"]).is_file() for c in corpus.values())
    assert {q["query-id"] for q in queries} == {r["query-id"] for r in qrels}
    for q, r in zip(queries, qrels):
        number = int(r["corpus-id"].rsplit("-", 1)[1])
        assert q["query"] in page_text(held["file"], number)
    for cid, row in corpus.items():  # each page's own text layer rides along, for text baselines
        assert " ".join(row["text"].split("\n")) == page_text(held["file"], int(cid.rsplit("-", 1)[1]))


def test_headers_are_never_queries_and_a_page_without_text_is_reported(made):
    out, scan = made
    queries = [r["query"] for r in rows(out / "train.jsonl")] + [q["query"] for q in rows(out / "eval" / "queries.jsonl")]
    assert not any(q.startswith("Shared MIME-info Database") for q in queries)  # the spec's running header
    record = json.loads((out / "dataset.json").read_text())
    assert record["left_out"] == [{"file": str(scan), "page": 1, "why": "no text layer"}]
    assert record["counts"]["pages_left_out"] == 1


def test_train_mine_and_eval_read_the_dataset_as_it_is(made, tiny_model_dir, tmp_path):
    out, _ = made
    train, mine = load_script("train"), load_script("mine")
    common = ["--model_id", tiny_model_dir, "--num_workers", "0", "--device", "cpu", "--max_tiles", "1", "--dim", "16"]
    assert train.main([*common, "--train_jsonl", str(out / "train.jsonl"), "--root", str(out), "--max_steps", "1",
                       "--batch_size", "2", "--out_dir", str(tmp_path / "run")]) == 0
    ckpt = sorted((tmp_path / "run").glob("colintern_heads_*.pt"))[-1]
    mined = tmp_path / "mined" / "mined.jsonl"
    assert mine.main(["--model_id", tiny_model_dir, "--ckpt", str(ckpt), "--train_jsonl", str(out / "train.jsonl"),
                      "--root", str(out), "--out_jsonl", str(mined), "--method", "exact", "--k", "2", "--quiet",
                      "--device", "cpu"]) == 0
    triples = rows(mined)
    assert len(triples) == len(rows(out / "train.jsonl")) and all(t["pos"] not in t["negs"] for t in triples)
    assert any(t["negs"] for t in triples) and all((out / n).is_file() for t in triples for n in t["negs"])
    evaluate = load_script("eval")
    assert evaluate.main(["--model_id", tiny_model_dir, "--local_dataset", str(out / "eval"), "--out_dir",
                          str(tmp_path / "eval"), "--run_name", "base", "--device", "cpu", "--max_tiles", "1"]) == 0
    summary = json.loads((tmp_path / "eval" / "base" / "summary.json").read_text())
    assert list(summary["tasks"]) == ["eval"] and 0 <= summary["average"]["ndcg_at_5"] <= 1


def test_one_document_cannot_be_split_by_document(tmp_path, capsys):
    code = run_cli(main, ["--inputs", str(PDFS[0]), "--out", str(tmp_path / "one")])
    assert code == 2 and capsys.readouterr().err.strip() == "error: a split by document needs at least two PDFs " \
        "with usable text (evaluation holds out whole documents); give more --inputs, or --eval_fraction 0 for a " \
        "training set only"
    assert not (tmp_path / "one").exists()
    assert run_cli(main, ["--inputs", str(PDFS[0]), "--out", str(tmp_path / "one"), "--eval_fraction", "0",
                          "--dpi", "72"]) == 0
    assert not (tmp_path / "one" / "eval").exists() and len(rows(tmp_path / "one" / "train.jsonl")) >= 6
    code = run_cli(main, ["--inputs", str(PDFS[0]), "--out", str(tmp_path / "one"), "--eval_fraction", "0"])
    assert code == 2 and "exists and is not an empty folder" in capsys.readouterr().err
    assert os.listdir(tmp_path / "one")  # the earlier dataset is intact


def test_make_dataset_from_python_equals_the_command(made, tmp_path):
    """docs/API.md: make_dataset(DatasetConfig(...)) is the command; the same inputs give the same files."""
    from colintern import DatasetConfig
    from colintern.data.make_dataset import make_dataset

    out, scan = made
    record = make_dataset(DatasetConfig(inputs=[*map(str, PDFS), str(scan)], out=str(tmp_path / "set"), dpi=72))
    assert record["counts"] == json.loads((out / "dataset.json").read_text())["counts"]
    for name in ("train.jsonl", "eval/queries.jsonl", "eval/qrels.jsonl"):
        assert (tmp_path / "set" / name).read_bytes() == (out / name).read_bytes(), name
    resolved = (tmp_path / "set" / "dataset_config.yaml").read_text()
    assert "dpi: 72\n" in resolved and resolved.startswith("# resolved settings of this run")


def test_generator_writes_the_queries_and_an_interrupted_run_resumes(tiny_model_dir, tmp_path, caplog):
    """--generator on the real PDFs with the tiny model's LM head: each page's answer is what greedy decoding of the
    prompt and the page gives (decoded here by hand, step by step), the queries are its lines, the model and prompt
    are recorded, and a run stopped after its first batch continues without generating those pages again."""
    import logging

    from PIL import Image

    from colintern.backbones.sanity import greedy
    from colintern.data import generate_queries as gq
    from colintern.data.make_dataset import make_dataset
    from colintern.settings import DatasetConfig

    out = tmp_path / "gen"
    config = DatasetConfig(inputs=[str(p) for p in PDFS], out=str(out), dpi=40, generator=tiny_model_dir,
                           device="cpu", min_words=1, max_words=200, max_new_tokens=8, batch_size=4)
    real_answer, pages_asked = gq.QuestionWriter.answer, []

    def stop_after_one_batch(self, images):
        if pages_asked:
            raise RuntimeError("interrupted")
        pages_asked.append(len(images))
        return real_answer(self, images)

    gq.QuestionWriter.answer = stop_after_one_batch
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            make_dataset(config)
    finally:
        gq.QuestionWriter.answer = real_answer
    assert not (out / "dataset.json").exists()
    cached = [json.loads(line) for line in (out / gq.CACHE).read_text().splitlines()]
    assert len(cached) == 4
    with caplog.at_level(logging.INFO, logger="colintern.data.make_dataset"):
        record = make_dataset(config)
    total = sum(d["pages"] for d in record["documents"])
    assert f"4 of {total} pages already have their questions" in caplog.text
    rows = [json.loads(line) for line in (out / gq.CACHE).read_text().splitlines()]
    assert len(rows) == total and rows[:4] == cached and len({r["key"] for r in rows}) == total
    assert record["queries_from"] == "generator"
    assert record["generator"]["model"] == tiny_model_dir and record["generator"]["prompt"] == gq.prompt_for(3)

    # a damaged cache line is one line naming it, not a traceback
    from colintern.errors import UserError

    lines = (out / gq.CACHE).read_text().splitlines()
    (out / gq.CACHE).write_text("\n".join([lines[0], "{not json", *lines[2:]]) + "\n")
    with pytest.raises(UserError, match=r"generated.jsonl:2: not a line this command wrote \(damaged\)"):
        gq.read_cache(out / gq.CACHE)
    (out / gq.CACHE).write_text("\n".join(lines) + "\n")

    # the first page's answer, decoded by hand from the same prompt and page
    writer = gq.QuestionWriter(tiny_model_dir, "cpu", 3, 8)
    first = rows[0]["page"].rsplit("/", 1)
    train_page = out / "pages" / first[0] / f"page-{int(first[1]):03d}.png"
    image = Image.open(train_page if train_page.exists() else out / "eval" / "pages" / first[0] /
                       f"page-{int(first[1]):03d}.png").convert("RGB")
    inputs = writer.model_inputs([image])
    tokens = greedy(writer.generator, inputs["input_ids"], 8, writer.tokenizer.eos_token_id,
                    pixel_values=inputs["pixel_values"])
    assert rows[0]["text"] == writer.tokenizer.decode(tokens, skip_special_tokens=True)
    # the queries are the answers' lines that pass the filter
    lines = {q for r in rows for q in gq.split_questions(r["text"])}
    queries = [json.loads(line)["query"] for line in (out / "train.jsonl").read_text().splitlines()]
    assert queries and set(queries) <= lines


def test_generator_batches_pages_of_different_sizes_like_one_at_a_time(tiny_qwen_dir):
    """Qwen3-VL's generator path: two rendered real pages of different sizes (different image-token counts, so the
    batch is left-padded) get the answers each gets alone."""
    from colintern.data.generate_queries import QuestionWriter
    from colintern.index.sources import PageSource, render_page

    writer = QuestionWriter(tiny_qwen_dir, "cpu", 3, 6)
    pages = [render_page(PageSource(str(PDFS[0]), "", 1, "pdf"), 40),
             render_page(PageSource(str(PDFS[1]), "", 2, "pdf"), 30)]
    assert pages[0].size != pages[1].size
    lengths = [int(writer.model_inputs([p])["input_ids"].shape[1]) for p in pages]
    assert lengths[0] != lengths[1]
    assert writer.answer(pages) == [writer.answer([p])[0] for p in pages]
