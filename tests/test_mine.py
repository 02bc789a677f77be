"""mine.py: hard-negative mining on a small corpus built from the synthetic set (tiny model, CPU).

The corpus (`corpus` fixture) holds the awkward cases on purpose: a page shared by non-adjacent rows, one
query text asked of two pages, one page stored twice under two file names, a corrupt image, an empty query and
a repeated (query, page) row.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import torch

from colintern import ColIntern
from colintern.retriever.checkpoint import save_checkpoint
from colintern.retriever.config import ColInternConfig
from colintern.data.datasets import ImageResolver, load_page_dataset, parse_pseudo_path
from colintern.data.triples import read_triples_jsonl
from colintern.errors import UserError
from helpers import load_script, perturb_lora

REPO = Path(__file__).resolve().parents[1]
N_SOURCE_ROWS = 36  # 12 synthetic pages x 3 queries



mine = load_script("mine")


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir, tmp_path_factory) -> str:
    """A checkpoint with a non-trivial LoRA and max_tiles=2 (pages of 65 tokens instead of 129)."""
    m = ColIntern.from_pretrained(tiny_model_dir, max_tiles=2)
    m.add_lora(4, 8, 0.0)
    torch.manual_seed(0)
    perturb_lora(m, 0.05)
    path = str(tmp_path_factory.mktemp("mine_ckpt") / "colintern_heads_epoch1.pt")
    save_checkpoint(path, **m.checkpoint_parts(), training=None, metrics={})
    return path


@pytest.fixture(scope="module")
def corpus(synthetic_dir, tmp_path_factory) -> str:
    """save_to_disk dataset: 36 synthetic rows (12 pages) + 6 awkward rows (see the module docstring)."""
    import datasets

    src = load_page_dataset(str(Path(synthetic_dir) / "train"))
    rows = [{"query": src[i]["query"], "image": src[i]["image"], "image_filename": src[i]["image_filename"]}
            for i in range(N_SOURCE_ROWS)]
    rows += [
        {"query": "a question about the second page", "image": rows[3]["image"],           # row 36: page 1 again
         "image_filename": rows[3]["image_filename"]},
        {"query": rows[0]["query"], "image": rows[6]["image"],                               # row 37: text of row 0
         "image_filename": rows[6]["image_filename"]},                                      #   asked of page 2
        {"query": "a corrupt page", "image": {"bytes": b"not an image", "path": None},       # row 38
         "image_filename": "corrupt.png"},
        {"query": "   ", "image": rows[9]["image"], "image_filename": rows[9]["image_filename"]},  # row 39
        dict(rows[1]),                                                                       # row 40: = row 1
        {"query": "the same picture under another name", "image": rows[12]["image"],         # row 41: page 4
         "image_filename": "copy_of_page_4.png"},                                           #   as a new file
    ]
    features = datasets.Features({"query": datasets.Value("string"), "image": datasets.Image(),
                                  "image_filename": datasets.Value("string")})
    out = str(tmp_path_factory.mktemp("mine_corpus") / "corpus")
    datasets.Dataset.from_list(rows, features=features).save_to_disk(out)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mine_work")


def run_mine(tiny_model_dir, ckpt, corpus, out, *extra, emb_dir=None) -> dict:
    """mine.main in-process; returns the meta sidecar. Page embeddings are shared across runs via emb_dir."""
    argv = ["--model_id", tiny_model_dir, "--hub_name", corpus, "--split", "train", "--out_jsonl", str(out),
            "--quiet", "--keep_pages", "--emb_dir", str(emb_dir or Path(out).parent.parent / "pages")]
    if ckpt:
        argv += ["--ckpt", ckpt]
    assert mine.main(argv + [str(a) for a in extra]) == 0
    meta = Path(str(out)[:-len(".jsonl")] + ".meta.json")
    return json.loads(meta.read_text()) if meta.exists() else {}


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def row_of(path: str) -> int:
    return parse_pseudo_path(path)[2]


def sha(image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def exact_all(tiny_model_dir, ckpt, corpus, work):
    """Exact run keeping every non-positive page as a negative (no filter): the reference of later tests."""
    out = work / "exact_all" / "mined.jsonl"
    meta = run_mine(tiny_model_dir, ckpt, corpus, out, "--method", "exact", "--k", 50, "--fn_filter", 0)
    return out, meta


def test_no_positive_is_a_negative_and_scores_are_exact(exact_all, tiny_model_dir, ckpt, corpus):
    out, meta = exact_all
    lines = read_lines(out)
    # 42 rows: corrupt (38) and empty query (39) are skipped, row 40 repeats row 1 -> 39 lines
    assert meta["counts"]["skipped_rows"] == 2 and meta["counts"]["duplicate_rows"] == 1
    assert meta["counts"]["skipped_by_reason"] == {"corrupt image": 1, "empty query": 1}
    assert len(lines) == 39 == meta["counts"]["lines"]
    assert meta["counts"]["pages"] == 14 and meta["counts"]["pages_valid"] == 13
    per_line = [len(ln["negs"]) for ln in lines]  # the histogram of negatives per line, as the meta reports it
    assert meta["counts"]["negatives_per_line"] == {str(n): per_line.count(n) for n in sorted(set(per_line))}
    assert [ln["query"] for ln in lines].count("a corrupt page") == 0

    triples, skipped = read_triples_jsonl(str(out))  # what train.py --train_jsonl reads
    assert len(triples) == 39 and skipped == []
    resolver = ImageResolver()
    cache: dict[str, object] = {}

    def image(path):
        if path not in cache:
            cache[path] = resolver.load(path)
        return cache[path]

    model = ColIntern.from_pretrained(tiny_model_dir, ckpt=ckpt)
    base = ColIntern.from_pretrained(tiny_model_dir, max_tiles=2)  # same formatting, no LoRA, untrained head
    all_paths = sorted({p for ln in lines for p in [ln["pos"], *ln["negs"]]}, key=row_of)
    assert len(all_paths) == 13  # every usable page, named by its representative row
    docs = dict(zip(all_paths, model.encode_images([image(p) for p in all_paths])))
    # the checkpoint's formatting (max_tiles=2: at most 2 tiles + thumbnail) was used, not the default 6 tiles
    assert meta["counts"]["page_tokens"] == sum(d.shape[0] for d in docs.values()) < 13 * 65
    texts = sorted({ln["query"] for ln in lines})
    qs = dict(zip(texts, model.encode_queries(texts)))
    positives_by_text: dict[str, set[str]] = {}
    for ln in lines:
        positives_by_text.setdefault(ln["query"], set()).add(sha(image(ln["pos"])))
    copies = {sha(image(all_paths[i])) for i in range(13)}
    assert len(copies) == 12  # page 4 is stored twice (rows 12 and 41)
    lora_changes_scores = False
    for ln in lines:
        pos_images = positives_by_text[ln["query"]]
        assert not pos_images & {sha(image(n)) for n in ln["negs"]}, ln  # no positive, by content
        # with k above the corpus and no filter: negatives = every page whose content is not a positive
        expected = {p for p in all_paths if sha(image(p)) not in pos_images}
        assert set(ln["negs"]) == expected and len(ln["negs"]) == len(expected)
        # scores: float64 MaxSim (sum over query tokens) of the checkpoint model (LoRA included), pages stored
        # as fp16 (the on-disk format); within 1e-3 of the unrounded pages
        q = qs[ln["query"]].double()
        ref = {p: float((q @ docs[p].half().double().T).max(1).values.sum()) for p in all_paths}
        full = float((q @ docs[ln["pos"]].double().T).max(1).values.sum())
        assert abs(full - ref[ln["pos"]]) < 1e-3
        assert ln["scores"]["pos"] == pytest.approx(ref[ln["pos"]], abs=2e-5)
        assert ln["scores"]["negs"] == pytest.approx([ref[n] for n in ln["negs"]], abs=2e-5)
        assert ln["scores"]["negs"] == sorted(ln["scores"]["negs"], reverse=True)
        if not lora_changes_scores:
            qb = base.encode_queries([ln["query"]])[0].double()
            db = base.encode_images([image(ln["pos"])])[0].double()
            lora_changes_scores = abs(float((qb @ db.T).max(1).values.sum()) - ref[ln["pos"]]) > 1e-2
    assert lora_changes_scores
    # the awkward rows: row 36 shares page 1 (row 3); row 37 asks row 0's question of page 2
    by_row = {ln["query"]: ln for ln in lines}
    assert row_of(by_row["a question about the second page"]["pos"]) == 3
    same_text = [ln for ln in lines if ln["query"] == lines[0]["query"]]
    assert sorted(row_of(ln["pos"]) for ln in same_text) == [0, 6]
    for ln in same_text:
        assert {row_of(n) for n in ln["negs"]} & {0, 6} == set()
    copy_line = by_row["the same picture under another name"]
    assert row_of(copy_line["pos"]) == 41 and 12 not in {row_of(n) for n in copy_line["negs"]}
    # every pseudo-path resolves to the row's own image
    src = load_page_dataset(corpus)
    for ln in lines[:3]:
        assert sha(image(ln["pos"])) == sha(resolver.load(ln["pos"]))
        assert parse_pseudo_path(ln["pos"])[:2] == (corpus, "train")
    assert src[row_of(lines[0]["pos"])]["image_filename"] == src[0]["image_filename"]


def test_fn_filter_and_skip_top_remove_what_they_should(exact_all, tiny_model_dir, ckpt, corpus, work):
    ref = read_lines(exact_all[0])
    r = 0.97
    out = work / "filtered" / "mined.jsonl"
    meta = run_mine(tiny_model_dir, ckpt, corpus, out, "--method", "exact", "--k", 4, "--fn_filter", r,
                    "--skip_top", 1)
    got = read_lines(out)
    dropped = 0
    for full, line in zip(ref, got):
        assert line["query"] == full["query"] and line["pos"] == full["pos"]
        thr = np.float32(full["scores"]["pos"]) * np.float32(r)
        kept = [(n, s) for n, s in zip(full["negs"], full["scores"]["negs"]) if s <= thr + 1e-5]
        dropped += len(full["negs"]) - len(kept)
        assert line["negs"] == [n for n, _ in kept[1:5]]
        assert all(s <= line["scores"]["pos"] * r + 1e-5 for s in line["scores"]["negs"])
    assert 0 < dropped < sum(len(ln["negs"]) for ln in ref)  # the filter bites, but not everywhere
    assert meta["counts"]["fn_filtered"] == dropped
    assert meta["filters"] == {"fn_filter": r, "skip_top": 1, "positives": meta["filters"]["positives"]}


@pytest.mark.parametrize("index", ["Flat", "IVF4,Flat"])
def test_faiss_equals_exact_when_candidates_cover_the_corpus(index, tiny_model_dir, ckpt, corpus, work):
    exact_out = work / "cmp_exact" / "mined.jsonl"
    if not exact_out.exists():
        run_mine(tiny_model_dir, ckpt, corpus, exact_out, "--method", "exact", "--k", 5)
    out = work / f"cmp_{index.replace(',', '_')}" / "mined.jsonl"
    meta = run_mine(tiny_model_dir, ckpt, corpus, out, "--method", "faiss", "--k", 5, "--candidates", 13,
                    "--token_k", 8, "--faiss_index", index, "--nprobe", 4, "--recall_sample", 10)
    exact, approx = read_lines(exact_out), read_lines(out)
    assert [ln["negs"] for ln in approx] == [ln["negs"] for ln in exact]
    for a, b in zip(approx, exact):
        assert a["scores"]["pos"] == b["scores"]["pos"]
        assert a["scores"]["negs"] == pytest.approx(b["scores"]["negs"], abs=1e-5)
    assert meta["candidate_recall"]["candidate_recall"] == 1.0 and meta["candidate_recall"]["queries"] == 10
    assert meta["faiss"]["factory"] == index and meta["faiss"]["n_tokens"] == meta["counts"]["page_tokens"]


def test_auto_method_is_exact_on_small_corpora_and_on_a_gpu(tiny_model_dir, ckpt, corpus, work):
    """The default --method auto searches this 13-page corpus exactly (the same file as --method exact) and says
    why in the meta; above AUTO_EXACT_MAX_TOKENS on a CPU it takes FAISS."""
    from colintern.mine.search import AUTO_EXACT_MAX_TOKENS, choose_method

    exact_out = work / "auto_exact" / "mined.jsonl"
    run_mine(tiny_model_dir, ckpt, corpus, exact_out, "--method", "exact", "--k", 4)
    out = work / "auto" / "mined.jsonl"
    meta = run_mine(tiny_model_dir, ckpt, corpus, out, "--k", 4)
    assert out.read_bytes() == exact_out.read_bytes()
    assert meta["method"] == "exact" and meta["method_asked"] == "auto" and meta["faiss"] is None
    assert meta["method_why"] == (f"{meta['counts']['page_tokens']:,} page tokens <= 3,000,000: exact is as fast "
                                  "as FAISS here")
    assert choose_method("auto", AUTO_EXACT_MAX_TOKENS, on_gpu=False)[0] == "exact"
    assert choose_method("auto", AUTO_EXACT_MAX_TOKENS + 1, on_gpu=False)[0] == "faiss"
    assert choose_method("auto", 10**9, on_gpu=True)[0] == "exact"
    assert choose_method("faiss", 10, on_gpu=True) == ("faiss", "asked for")


def test_faiss_recall_is_measured_against_exact(tiny_model_dir, ckpt, corpus, work):
    """A shallow first stage: the meta's recall is what a direct comparison with exact search gives."""
    exact_out = work / "shallow_exact" / "mined.jsonl"
    run_mine(tiny_model_dir, ckpt, corpus, exact_out, "--method", "exact", "--k", 3, "--fn_filter", 0)
    out = work / "shallow" / "mined.jsonl"
    meta = run_mine(tiny_model_dir, ckpt, corpus, out, "--method", "faiss", "--k", 3, "--candidates", 4,
                    "--token_k", 4, "--fn_filter", 0, "--recall_sample", 1000, "--deepen", 0)
    exact, approx = read_lines(exact_out), read_lines(out)
    hits = sum(len(set(a["negs"]) & set(e["negs"])) for a, e in zip(approx, exact))
    total = sum(len(e["negs"]) for e in exact)
    rec = meta["candidate_recall"]
    assert rec["queries"] == 39 and rec["exact_negatives"] == total == 39 * 3
    assert rec["negatives_overlap"] == pytest.approx(hits / total, abs=1e-6) and hits < total
    assert rec["candidate_recall"] >= rec["negatives_overlap"]


def test_deepening_recovers_what_the_filter_ate(tiny_model_dir, ckpt, corpus, work):
    """With a biting fn_filter, 4 candidates leave short lists; deepening (4 -> 16 >= 13 pages) gives exact's."""
    args = ("--k", 3, "--fn_filter", 0.97)
    exact_out = work / "deep_exact" / "mined.jsonl"
    exact_meta = run_mine(tiny_model_dir, ckpt, corpus, exact_out, "--method", "exact", *args)
    faiss = ("--method", "faiss", "--candidates", 4, "--token_k", 4, "--recall_sample", 1000)
    shallow = run_mine(tiny_model_dir, ckpt, corpus, work / "deep0" / "mined.jsonl", *args, *faiss, "--deepen", 0)
    deep = run_mine(tiny_model_dir, ckpt, corpus, work / "deep1" / "mined.jsonl", *args, *faiss, "--deepen", 1)
    assert shallow["counts"]["short_lines"] > exact_meta["counts"]["short_lines"]
    assert shallow["faiss"]["deepened_queries"] == 0 and deep["faiss"]["deepened_queries"] > 0
    assert deep["candidate_recall"]["candidate_recall"] > shallow["candidate_recall"]["candidate_recall"]
    exact = read_lines(exact_out)
    short = [i for i, ln in enumerate(read_lines(work / "deep0" / "mined.jsonl")) if len(ln["negs"]) < 3]
    deep_lines = read_lines(work / "deep1" / "mined.jsonl")
    assert len(short) > 10 and all(deep_lines[i]["negs"] == exact[i]["negs"] for i in short)
    assert deep["counts"]["short_lines"] == exact_meta["counts"]["short_lines"]


def test_interrupted_and_resumed_run_writes_the_same_file(tiny_model_dir, ckpt, corpus, work, monkeypatch):
    args = ("--method", "faiss", "--k", 4, "--search_batch", 8, "--pages_per_part", 4, "--candidates", 6,
            "--token_k", 16)
    import colintern.mine.search as mining
    import colintern.mine.page_store as page_store

    out = work / "resume" / "mined.jsonl"
    emb = work / "resume_pages"
    real_encode, real_search = page_store.encode_part, mining.faiss_search
    calls = {"encode": 0, "search": 0, "die_encode": 3, "die_search": None}

    def encode_part(*a, **kw):
        calls["encode"] += 1
        if calls["encode"] == calls["die_encode"]:
            raise KeyboardInterrupt
        return real_encode(*a, **kw)

    def search_then_die(*a, **kw):
        calls["search"] += 1
        if calls["search"] == calls["die_search"]:
            raise KeyboardInterrupt
        return real_search(*a, **kw)

    monkeypatch.setattr(page_store, "encode_part", encode_part)  # dies in the 3rd of 4 page parts
    with pytest.raises(KeyboardInterrupt):
        run_mine(tiny_model_dir, ckpt, corpus, out, *args, emb_dir=emb)
    assert calls["encode"] == 3
    calls["die_search"] = 3
    monkeypatch.setattr(mining, "faiss_search", search_then_die)  # dies in the 3rd batch of queries
    with pytest.raises(KeyboardInterrupt):
        run_mine(tiny_model_dir, ckpt, corpus, out, *args, "--resume", emb_dir=emb)
    assert calls["encode"] == 3 + 2  # only the two missing parts were encoded again
    calls["die_search"] = None
    partial = Path(f"{out}.partial")
    assert not out.exists() and len(partial.read_text().splitlines()) == 16  # never a half-written final file
    with partial.open("a") as f:  # a crash in the middle of writing the next batch
        f.write(partial.read_text().splitlines(keepends=True)[0] + '{"query": "torn')
    meta = run_mine(tiny_model_dir, ckpt, corpus, out, *args, "--resume", emb_dir=emb)
    full = work / "resume_full" / "mined.jsonl"  # the same run without interruptions
    run_mine(tiny_model_dir, ckpt, corpus, full, *args, emb_dir=emb)
    assert out.read_bytes() == full.read_bytes()
    assert not partial.exists() and not Path(f"{out}.partial.json").exists()
    assert meta["resumed"] and meta["pages_encoded_here"] == 0 and calls["encode"] == 5
    with pytest.raises(UserError, match="written with other settings .*k"):  # resume needs the same settings
        partial.write_text("")
        Path(f"{out}.partial.json").write_text(json.dumps({"settings": {"k": 99}, "lines": 0}))
        run_mine(tiny_model_dir, ckpt, corpus, out, *args, "--resume", emb_dir=emb)


def test_shards_merge_into_the_single_run_file(tiny_model_dir, ckpt, corpus, work):
    args = ("--method", "faiss", "--k", 4, "--candidates", 6, "--token_k", 16, "--search_batch", 8)
    single = work / "single" / "mined.jsonl"
    run_mine(tiny_model_dir, ckpt, corpus, single, *args)
    out = work / "sharded" / "mined.jsonl"
    for shard in (2, 0):  # out of order; the last one to finish merges
        run_mine(tiny_model_dir, ckpt, corpus, out, *args, "--num_shards", 3, "--shard_id", shard)
        assert not out.exists()
    with pytest.raises(UserError, match="1 of 3 shards are not finished"):
        mine.main(["--merge", "--out_jsonl", str(out), "--num_shards", "3"])
    meta = run_mine(tiny_model_dir, ckpt, corpus, out, *args, "--num_shards", 3, "--shard_id", 1)
    assert out.read_bytes() == single.read_bytes()
    assert meta["counts"]["lines"] == 39 and json.loads(out.with_suffix(".meta.json").read_text())["shard"][
        "num_shards"] == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["mined.config.yaml", "mined.jsonl", "mined.meta.json"]


def test_hash_dedupe_without_image_filename(tiny_model_dir, ckpt, corpus, work):
    """No image_filename column: pages are identified by their bytes (page 4's two copies become one)."""
    import datasets

    ds = datasets.load_from_disk(corpus).remove_columns(["image_filename"])
    path = str(work / "no_filenames")
    ds.save_to_disk(path)
    out = work / "hash" / "mined.jsonl"
    meta = run_mine(tiny_model_dir, ckpt, path, out, "--method", "exact", "--k", 50, "--fn_filter", 0)
    assert meta["counts"]["pages"] == 13 and meta["counts"]["pages_valid"] == 12
    lines = read_lines(out)
    copy_line = next(ln for ln in lines if ln["query"] == "the same picture under another name")
    assert row_of(copy_line["pos"]) == 12 and len(copy_line["negs"]) == 11


def test_bad_input_fails_with_one_clear_line(tiny_model_dir, ckpt, corpus, work, tmp_path):
    import datasets

    rows = [{"query": "q", "image": {"bytes": b"junk", "path": None}, "image_filename": "a.png"}]
    features = datasets.Features({"query": datasets.Value("string"), "image": datasets.Image(),
                                  "image_filename": datasets.Value("string")})
    broken = str(tmp_path / "broken")
    datasets.Dataset.from_list(rows, features=features).save_to_disk(broken)
    with pytest.raises(UserError, match="none of its 1 rows has a decodable image"):
        run_mine(tiny_model_dir, ckpt, broken, tmp_path / "o" / "m.jsonl")
    with pytest.raises(UserError, match=r"corpus row 38: corrupt image"):
        run_mine(tiny_model_dir, ckpt, corpus, tmp_path / "s" / "m.jsonl", "--strict", emb_dir=work / "pages")
    # a checkpoint for another base model: exit 2 and one line from the CLI
    m = ColIntern.from_pretrained(tiny_model_dir)
    config = m.config.to_dict()
    config["signature"] = dict(config["signature"], hidden_size=1024)
    config["base_model"] = "OpenGVLab/InternVL3_5-1B-Instruct"
    other = str(tmp_path / "other.pt")
    save_checkpoint(other, config=ColInternConfig.from_dict(config), head=m.head.state_dict())
    proc = subprocess.run([sys.executable, str(REPO / "mine.py"), "--model_id", tiny_model_dir, "--ckpt", other,
                           "--hub_name", corpus, "--out_jsonl", str(tmp_path / "x" / "m.jsonl"), "--k", "20",
                           "--doc_batch", "16", "--query_batch", "64", "--no_gpu", "--limit", "6"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "trained on base model 'OpenGVLab/InternVL3_5-1B-Instruct'" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x" / "m.jsonl").exists()


def test_output_trains_with_train_py(exact_all, tiny_model_dir, ckpt, tmp_path):
    """train.py --train_jsonl reads the mined file directly (pseudo-paths resolved, hard negatives used)."""
    from colintern.retriever.checkpoint import load_checkpoint

    train = load_script("train")
    out_dir = tmp_path / "phase2"
    assert train.main(["--model_id", tiny_model_dir, "--train_jsonl", str(exact_all[0]), "--resume_ckpt", ckpt,
                       "--max_steps", "2", "--batch_size", "4", "--num_negs", "2", "--num_workers", "0",
                       "--out_dir", str(out_dir), "--save_every", "1"]) == 0
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    saved = load_checkpoint(str(out_dir / "colintern_heads_step2.pt"))
    assert saved["config"]["max_tiles"] == 2 and saved["lora"] is not None


def test_mine_local_pages_from_a_triples_file_and_a_folder(tiny_model_dir, tmp_path):
    """mine.py mines what train.py --train_jsonl --root trains on: the queries and positives of the file, every
    distinct pos/neg page plus --pages as candidates; the output names pages as the input does (relative to
    --root), so train.py reads it back; a missing page is a reported bad line."""
    root = tmp_path / "data"
    (root / "pages" / "more").mkdir(parents=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (120, 120, 120)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (112, 140), colour).save(root / "pages" / ("more" if i >= 4 else "") / f"p{i}.png")
    lines = [{"query": "red page", "pos": "pages/p0.png", "negs": ["pages/p1.png"]},
             {"query": "green page", "pos": "pages/p1.png", "negs": ["pages/missing.png"]},
             {"query": "blue page", "pos": "pages/p2.png"},
             {"query": "yellow page", "pos": "pages/p3.png", "negs": ["pages/p2.png"]},
             {"query": "gone", "pos": "pages/nope.png"}]
    triples = root / "train.jsonl"
    triples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "mined" / "mined.jsonl"
    argv = ["--model_id", tiny_model_dir, "--train_jsonl", str(triples), "--root", str(root), "--pages",
            str(root / "pages"), "--out_jsonl", str(out), "--method", "exact", "--k", 10, "--fn_filter", 0,
            "--quiet", "--device", "cpu"]
    assert mine.main([str(a) for a in argv]) == 0
    mined = read_lines(out)
    meta = json.loads((tmp_path / "mined" / "mined.meta.json").read_text())
    assert [m["query"] for m in mined] == ["red page", "green page", "blue page", "yellow page"]
    assert meta["counts"]["pages"] == 6 and meta["counts"]["skipped_by_reason"] == {"missing image": 2}
    for m in mined:  # every other page of the corpus is a negative (no filter, k above the corpus size)
        assert sorted(m["negs"]) == sorted(f"pages/{'more/' if i >= 4 else ''}p{i}.png" for i in range(6)
                                           if f"pages/p{i}.png" != m["pos"] and f"pages/more/p{i}.png" != m["pos"])
    triples_back, skipped = read_triples_jsonl(str(out))  # what train.py --train_jsonl OUT --root DIR reads
    resolver = ImageResolver(str(root))
    assert skipped == [] and all(resolver.locate(p)[0] is not None for t in triples_back for p in [t.pos, *t.negs])
    with pytest.raises(UserError, match="pass only one of --hub_name and --train_jsonl"):
        mine.main([str(a) for a in argv + ["--hub_name", "x"]])


def test_local_pages_need_no_datasets_package(tmp_path, monkeypatch):
    """mine.py on a triples file builds its corpus without `datasets` (the GPU machines have none)."""
    import sys

    from PIL import Image

    from colintern.data.report import SkipReport
    from colintern.mine.corpus import local_corpus

    monkeypatch.setitem(sys.modules, "datasets", None)  # any `import datasets` now raises ImportError
    (tmp_path / "p").mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8), "white").save(tmp_path / "p" / f"{name}.png")
    triples = tmp_path / "t.jsonl"
    triples.write_text('{"query": "qa", "pos": "p/a.png", "negs": ["p/c.png"]}\n{"query": "qb", "pos": "p/b.png"}\n')
    corpus = local_corpus(str(triples), str(tmp_path), None, SkipReport(strict=False))
    rows = corpus.dataset
    assert len(rows) == 3 and rows.column_names == ["query", "image", "image_filename"]
    assert rows["query"] == ["qa", "qb", None] and rows["image_filename"] == ["p/a.png", "p/b.png", "p/c.png"]
    assert rows[2]["image"] == {"path": str((tmp_path / "p" / "c.png").resolve()), "bytes": None}
    assert rows.select([1]).select_columns(["query"])["query"] == ["qb"]
