"""search.py: index real rendered PDF pages, query them (equal to in-memory exact MaxSim), add files
incrementally, resume an interrupted index without duplicates, similarity maps in page coordinates, Parquet export,
and every bad input as one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from colintern import ColIntern
from colintern.checkpoint import save_checkpoint
from colintern.cli import run_cli
from helpers import load_script, max_diff, perturb_lora

search = load_script("search")

pytestmark = pytest.mark.usefixtures("one_thread")
COLOURS = [(200, 30, 30), (30, 160, 30), (30, 30, 200), (220, 200, 40), (40, 190, 200), (120, 60, 160)]
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]


def page(i: int) -> Image.Image:
    image = Image.new("RGB", (170, 220), COLOURS[i % 6])
    draw = ImageDraw.Draw(image)
    draw.rectangle((20 + 10 * i, 30, 90 + 10 * i, 100), fill=(255, 255, 255))
    draw.text((25, 150), WORDS[i % 6], fill=(0, 0, 0))
    return image


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    pages = [page(i) for i in range(6)]
    pages[0].save(folder / "a.pdf", save_all=True, append_images=pages[1:3])
    pages[3].save(folder / "b.pdf", save_all=True, append_images=pages[4:5])
    pages[5].save(folder / "c.png")
    return folder


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir, tmp_path_factory):
    model = ColIntern.from_pretrained(tiny_model_dir, max_tiles=2, dim=32)
    path = tmp_path_factory.mktemp("ckpt") / "colintern_heads_step1.pt"
    save_checkpoint(str(path), **model.checkpoint_parts())
    return str(path)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = run_cli(search.main, [str(a) for a in argv], out_flag=search.OUT_FLAG)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


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
    from colintern.page_index import PageIndex, render_page
    from colintern.scoring import maxsim

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
    from colintern.page_index import PageIndex

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
    from colintern.simmap import paint, token_maps

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

    from colintern.page_index import PageIndex

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
    code, out, err = run(capsys, *base, "--inputs", bad / "broken.pdf", bad / "ok.png", bad / "notes.txt",
                         "--index", tmp_path / "i1")
    assert code == 0 and "Traceback" not in err
    assert out.strip().endswith("; skipped 2 items: bad PDF x1, not a PDF or an image x1")
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
    from colintern.token_pooling import pool_tokens

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
    from colintern.page_index import PageIndex

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
                       "--index", tmp_path / "k3", "--dpi", 72)
    assert code == 2 and "was built with --pool_factor 3; pass the same or use a new --index folder" in err


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
    assert printed.strip() == f"exported {ckpt} on {folder} to {out}: load it with --model_id {out}"
    exported = ColIntern.from_pretrained(str(out))
    original = ColIntern.from_pretrained(folder, ckpt=str(ckpt))
    assert exported.lora_config is None and not any("lora_" in n for n, _ in exported.backbone.named_parameters())
    pages, queries = [page(0), page(3)], ["a red page", "delta"]
    assert max_diff(exported.encode_images(pages), original.encode_images(pages)) < 1e-5
    assert max_diff(exported.encode_queries(queries), original.encode_queries(queries)) < 1e-5
    code, _, err = run(capsys, "export_model", "--ckpt", ckpt, "--model_id", folder, "--out", out)
    assert code == 2 and "exists and is not an empty folder" in err
