"""The synthetic corpus: layout, schema, determinism, learnability properties (colintern.testing.synthetic)."""
from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from colintern.cli import run_cli
from colintern.errors import UserError
from colintern.testing.synthetic import COLOURS, SHAPES, TEMPLATES, TRAIN_COLUMNS, WORDS, generate, main


def _hashes(root: str) -> dict[str, str]:
    """sha1 of every file under root, keyed by relative path."""
    base = Path(root)
    return {str(p.relative_to(base)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(base.rglob("*")) if p.is_file()}


def _manifest(root: str) -> dict:
    return json.loads((Path(root) / "synthetic_manifest.json").read_text())


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_layout_and_counts(synthetic_dir):
    root = Path(synthetic_dir)
    for rel in ("train/dataset_info.json", "train/state.json", "train_parquet/train-00000-of-00001.parquet",
                "hub/colintern-synthetic/README.md", "hub/colintern-synthetic/data/train-00000-of-00001.parquet",
                "eval/corpus.jsonl", "eval/queries.jsonl", "eval/qrels.jsonl"):
        assert (root / rel).is_file(), rel
    assert len(list((root / "eval" / "images").glob("*.png"))) == 60
    summary = _manifest(synthetic_dir)
    assert (summary["train_pages"], summary["train_rows"], summary["eval_pages"]) == (240, 720, 60)
    assert 60 <= summary["eval_queries"] <= 120


def test_train_schema_and_rows_share_pages(synthetic_dir):
    import datasets

    ds = datasets.load_from_disk(str(Path(synthetic_dir) / "train"))
    assert tuple(ds.column_names) == TRAIN_COLUMNS
    assert isinstance(ds.features["image"], datasets.Image)
    assert len(ds) == 720
    rows = ds.remove_columns(["image"]).to_list()
    by_page = defaultdict(list)
    for row in rows:
        by_page[row["image_filename"]].append(row["query"])
        assert row["source"] == "synthetic" and row["options"] is None and row["answer"]
    assert len(by_page) == 240
    assert all(len(qs) == 3 and len(set(qs)) == 3 for qs in by_page.values())
    assert sorted(by_page)[:2] == ["synthetic/page_0000.png", "synthetic/page_0001.png"]
    # Rows of one page carry the same image bytes; different pages carry different bytes.
    images = ds.cast_column("image", datasets.Image(decode=False))["image"]
    bytes_by_page = defaultdict(set)
    for row, image in zip(rows, images):
        bytes_by_page[row["image_filename"]].add(hashlib.sha1(image["bytes"]).hexdigest())
    assert all(len(h) == 1 for h in bytes_by_page.values())
    assert len({next(iter(h)) for h in bytes_by_page.values()}) == 240


def test_deterministic_same_seed_identical_files(synthetic_dir, tmp_path):
    again = tmp_path / "again"
    generate(str(again))
    first, second = _hashes(synthetic_dir), _hashes(str(again))
    assert first.keys() == second.keys()
    assert first == second
    other = tmp_path / "other_seed"
    generate(str(other), n_train_pages=10, n_eval_pages=5, seed=1)
    assert (other / "eval" / "images").is_dir()
    assert _manifest(str(other))["pages"][0] != _manifest(synthetic_dir)["pages"][0]


def test_train_eval_combinations_disjoint_same_vocabulary(synthetic_dir):
    pages = _manifest(synthetic_dir)["pages"]
    combo = lambda p: (p["background"], p["colour"], p["shape"], p["word"])  # noqa: E731
    train = [combo(p) for p in pages if p["split"] == "train"]
    evals = [combo(p) for p in pages if p["split"] == "eval"]
    assert len(set(train)) == 240 and len(set(evals)) == 60  # unique within each split
    assert not set(train) & set(evals)  # eval pages are new combinations
    for slot in range(4):  # ...of attribute values the train split teaches
        assert {c[slot] for c in evals} <= {c[slot] for c in train}
    assert {c[0] for c in train} == set(COLOURS) and {c[2] for c in train} == set(SHAPES)
    assert {c[3] for c in train} == set(WORDS)
    assert all(c[0] != c[1] for c in train + evals)  # shape colour differs from the background
    # (background, colour, shape) is unique within a split, so 3-attribute queries name one page.
    assert len({c[:3] for c in train}) == 240 and len({c[:3] for c in evals}) == 60


def test_queries_name_at_least_two_attributes_and_mostly_one_page(synthetic_dir):
    import datasets

    pages = {f"synthetic/{p['page_id']}.png": p for p in _manifest(synthetic_dir)["pages"]}
    train_pages = [p for p in pages.values() if p["split"] == "train"]
    ds = datasets.load_from_disk(str(Path(synthetic_dir) / "train")).remove_columns(["image"])
    subset_of = {pattern: subset for subset, pattern in TEMPLATES}
    unique = 0
    for row in ds:
        page = pages[row["image_filename"]]
        q = row["query"]
        named = [page["background"] in q, page["colour"] in q, page["shape"] in q, page["word"] in q]
        assert sum(named) >= 2, q
        subset = subset_of[row["prompt"]]
        keys = {"b": "background", "c": "colour", "s": "shape", "w": "word"}
        matches = [p for p in train_pages if all(p[keys[k]] == page[keys[k]] for k in subset)]
        assert page in matches
        unique += len(matches) == 1
    assert unique == len(ds)  # every train query describes exactly its own page within the split


def test_eval_beir_files_consistent(synthetic_dir):
    root = Path(synthetic_dir) / "eval"
    corpus, queries, qrels = (_jsonl(root / f"{n}.jsonl") for n in ("corpus", "queries", "qrels"))
    assert len(corpus) == 60 and corpus[0] == {"corpus-id": "page_0240", "image": "images/page_0240.png"}
    ids = {c["corpus-id"] for c in corpus}
    assert all((root / c["image"]).is_file() for c in corpus)
    assert {r["query-id"] for r in qrels} == {q["query-id"] for q in queries}
    assert all(r["corpus-id"] in ids and r["score"] == 1 for r in qrels)
    per_page = Counter(r["corpus-id"] for r in qrels)
    assert set(per_page) == ids and all(1 <= n <= 2 for n in per_page.values())
    assert all(q["query"].strip() for q in queries)


def test_pages_look_as_described(synthetic_dir):
    root = Path(synthetic_dir)
    pages = _manifest(synthetic_dir)["pages"]
    for page in [p for p in pages if p["split"] == "eval"]:
        image = Image.open(root / "eval" / "images" / f"{page['page_id']}.png")
        assert image.size == (page["width"], page["height"])
        assert image.mode == "RGB"
        assert image.getpixel((2, 2)) == COLOURS[page["background"]]
        counts = {colour: n for n, colour in image.getcolors(maxcolors=1 << 16)}
        fg = counts.get(COLOURS[page["colour"]], 0)
        assert fg / (image.width * image.height) > 0.04, page  # the shape is big
    orientations = Counter(p["width"] > p["height"] for p in pages)
    assert orientations[False] > orientations[True] > 20  # mostly portrait, some landscape
    assert all(224 <= max(p["width"], p["height"]) <= 320 and min(p["width"], p["height"]) == 224 for p in pages)


def test_train_images_match_manifest(synthetic_dir):
    import datasets

    ds = datasets.load_from_disk(str(Path(synthetic_dir) / "train"))
    pages = {f"synthetic/{p['page_id']}.png": p for p in _manifest(synthetic_dir)["pages"]}
    for row in ds.select(range(0, 720, 60)):
        page = pages[row["image_filename"]]
        image = row["image"]
        assert image.size == (page["width"], page["height"])
        assert image.convert("RGB").getpixel((2, 2)) == COLOURS[page["background"]]
        assert page["word"] in row["answer"] and page["shape"] in row["answer"]


def test_cli_refuses_foreign_directory_and_bad_arguments(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert run_cli(main, [str(foreign), "--n_train_pages", "4", "--n_eval_pages", "2"]) == 2
    assert "not a colintern.testing.synthetic output" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="at most"):
        generate(str(tmp_path / "huge"), n_train_pages=5000, n_eval_pages=10)
    with pytest.raises(UserError, match="queries_per_page"):
        generate(str(tmp_path / "q"), n_train_pages=4, n_eval_pages=2, queries_per_page=0)


def test_cli_small_corpus_and_regenerate(tmp_path):
    out = tmp_path / "small"
    assert run_cli(main, [str(out), "--n_train_pages", "6", "--n_eval_pages", "3", "--queries_per_page", "2"]) == 0
    assert _manifest(str(out))["train_rows"] == 12
    first = _hashes(str(out))
    assert run_cli(main, [str(out), "--n_train_pages", "6", "--n_eval_pages", "3", "--queries_per_page", "2"]) == 0
    assert _hashes(str(out)) == first  # re-running over its own output is allowed and identical
