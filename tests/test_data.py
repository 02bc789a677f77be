"""The data layer (colintern.data.datasets): dataset loading, bad rows, pseudo-paths, triples, BEIR directories."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from colintern.data.report import BadRowError, SkipReport
from colintern.data.datasets import (ImageResolver, iter_page_rows, load_page_dataset, page_key, page_keys,
                                     parse_pseudo_path, pseudo_path)
from colintern.data.images import decode_image
from colintern.data.beir import load_beir_dir
from colintern.data.triples import read_triples_jsonl
from colintern.errors import UserError


def _png(width: int = 40, height: int = 60, colour=(10, 200, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_zero_size() -> bytes:
    """A PNG whose header says 0x0 (PIL refuses to write one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _rows_signature(ds) -> list[tuple]:
    """(query, image_filename, sha1 of image bytes) for every row."""
    return [(r["query"], r["image_filename"], hashlib.sha1(r["image"]["bytes"]).hexdigest()) for r in ds]


# ---------------------------------------------------------------- load_page_dataset


def test_load_page_dataset_same_rows_through_every_form(synthetic_dir):
    root = Path(synthetic_dir)
    forms = [root / "hub" / "colintern-synthetic", root / "train",
             root / "train_parquet" / "train-00000-of-00001.parquet", root / "train_parquet" / "*.parquet"]
    signatures = []
    for form in forms:
        ds = load_page_dataset(str(form), split="train")
        assert len(ds) == 720
        assert not ds.features["image"].decode  # left undecoded; decode_image does it per row
        signatures.append(_rows_signature(ds))
    assert all(sig == signatures[0] for sig in signatures[1:])
    assert signatures[0][0][1] == "synthetic/page_0000.png"


def test_load_page_dataset_errors(synthetic_dir, tmp_path):
    import datasets

    start = time.perf_counter()
    with pytest.raises(UserError, match=r"cannot load dataset vidore/colpali_train_set: not found locally and the "
                                        r"hub is unreachable \(HF_HUB_OFFLINE=1\)"):
        load_page_dataset("vidore/colpali_train_set")
    assert time.perf_counter() - start < 15
    with pytest.raises(UserError, match="no such file or directory"):
        load_page_dataset(str(tmp_path / "absent"))
    with pytest.raises(UserError, match="no files match"):
        load_page_dataset(str(tmp_path / "*.parquet"))
    no_image = tmp_path / "no_image"
    datasets.Dataset.from_dict({"query": ["q"], "text": ["t"]}).save_to_disk(str(no_image))
    with pytest.raises(UserError, match="lacks column\\(s\\) image; found columns: query, text"):
        load_page_dataset(str(no_image))
    both = tmp_path / "dict"
    features = datasets.Features({"query": datasets.Value("string"), "image": datasets.Image()})
    split = datasets.Dataset.from_dict({"query": ["a"], "image": [{"bytes": _png(), "path": None}]}, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(both))
    assert len(load_page_dataset(str(both), split="test")) == 1
    with pytest.raises(UserError, match="no split 'dev' \\(splits: train, test\\)"):
        load_page_dataset(str(both), split="dev")
    hub_folder = Path(synthetic_dir) / "hub" / "colintern-synthetic"
    with pytest.raises(UserError, match="cannot load dataset .*colintern-synthetic: .*Unknown split \"dev\""):
        load_page_dataset(str(hub_folder), split="dev")


def test_hub_like_folders_never_share_a_stale_cache(tmp_path):
    """datasets caches README-config folders by folder name; two corpora (or a regenerated one) must not collide."""
    from colintern.testing.synthetic import generate

    queries = {}
    for name, seed in (("a", 1), ("b", 2)):
        generate(str(tmp_path / name), n_train_pages=6, n_eval_pages=2, seed=seed)
        queries[name] = load_page_dataset(str(tmp_path / name / "hub" / "colintern-synthetic"))["query"]
    assert queries["a"] != queries["b"]
    generate(str(tmp_path / "a"), n_train_pages=6, n_eval_pages=2, seed=2)  # regenerate in place
    assert load_page_dataset(str(tmp_path / "a" / "hub" / "colintern-synthetic"))["query"] == queries["b"]


def _bad_rows_dataset(tmp_path: Path):
    """Rows: good, corrupt, truncated, 20000x50, empty query, good (no image_filename column)."""
    import datasets

    good = _png()
    truncated = _png(300, 300, (1, 2, 3))
    truncated = truncated[: len(truncated) // 2]
    rows = {
        "query": ["fine", "corrupt", "truncated", "too wide", "   ", "fine again"],
        "image": [{"bytes": b, "path": None} for b in
                  (good, b"not an image at all", truncated, _png(20000, 50), good, _png(50, 40, (9, 9, 9)))],
    }
    features = datasets.Features({"query": datasets.Value("string"), "image": datasets.Image()})
    path = tmp_path / "bad_rows"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return path


def test_bad_dataset_rows_reported_with_row_number_and_skipped(tmp_path):
    path = _bad_rows_dataset(tmp_path)
    ds = load_page_dataset(str(path))
    report = SkipReport()
    rows = list(iter_page_rows(ds, "bad", report))
    assert [r.index for r in rows] == [0, 5]
    assert rows[0].image.size == (40, 60) and rows[0].image.mode == "RGB"
    assert rows[0].query == "fine" and rows[0].key.startswith("sha1:")
    assert [(s.where, s.kind) for s in report.items] == [
        ("bad row 1", "corrupt image"), ("bad row 2", "truncated image"),
        ("bad row 3", "extreme aspect ratio"), ("bad row 4", "empty query")]
    assert "20000x50" in report.items[2].reason
    assert report.summary() == ("skipped 4 items: corrupt image x1, truncated image x1, extreme aspect ratio x1, "
                                "empty query x1")
    with pytest.raises(BadRowError, match="^bad row 1: corrupt image"):
        list(iter_page_rows(ds, "bad", SkipReport(strict=True)))
    with pytest.raises(BadRowError, match="row 1: corrupt image"):
        load_page_dataset(str(path), strict=True)


def test_skip_report_logs_every_skip(caplog):
    report = SkipReport()
    with caplog.at_level("WARNING", logger="colintern.data.datasets"):
        report.add("f.jsonl line 3", "empty query: blank text")
        report.add("f.jsonl line 4", "empty query: missing")
    assert report.count == 2 and report.counts() == {"empty query": 2}
    assert [r.getMessage() for r in caplog.records] == ["skipped f.jsonl line 3: empty query: blank text",
                                                        "skipped f.jsonl line 4: empty query: missing"]
    assert SkipReport().summary() == "skipped 0 items"


# ---------------------------------------------------------------- decode_image


def test_decode_image_accepts_every_form(tmp_path):
    data = _png(30, 20, (200, 10, 10))
    file = tmp_path / "a.png"
    file.write_bytes(data)
    for value in (data, {"bytes": data, "path": None}, {"bytes": None, "path": str(file)}, str(file), file,
                  Image.open(io.BytesIO(data))):
        image = decode_image(value, "x")
        assert image.mode == "RGB" and image.size == (30, 20) and image.getpixel((0, 0)) == (200, 10, 10)
    transparent = decode_image(_png(8, 8, (0, 0, 0, 0), mode="RGBA"), "x")
    assert transparent.getpixel((3, 3)) == (255, 255, 255)  # transparent becomes white paper, not black
    grey = decode_image(_png(8, 8, 77, mode="L"), "x")
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize("value, reason", [
    (None, "missing image: no image value"),
    ({"bytes": None, "path": None}, "missing image: no bytes and no path"),
    (b"", "missing image: empty bytes"),
    ("/nonexistent/page.png", "missing image: file not found: /nonexistent/page.png"),
    (b"\x00garbage" * 20, "corrupt image: not a recognised image format (160 bytes)"),
    (_png(300, 300)[:200], "truncated image"),
    (_png_zero_size(), "empty image: 0x0 pixels"),
    (Image.new("RGB", (0, 0)), "empty image: 0x0 pixels"),
    (_png(20000, 50), "extreme aspect ratio: 20000x50 pixels (400:1, limit 50:1)"),
    (_png(50, 20000), "extreme aspect ratio: 50x20000 pixels (400:1, limit 50:1)"),
])
def test_decode_image_bad_values(value, reason):
    with pytest.raises(BadRowError) as info:
        decode_image(value, "ds row 7")
    assert info.value.where == "ds row 7"
    assert info.value.reason.startswith(reason), info.value.reason
    assert str(info.value).startswith(f"ds row 7: {reason}")
    assert isinstance(info.value, UserError)


def test_decode_image_accepts_50_to_1():
    assert decode_image(_png(1000, 20), "x").size == (1000, 20)


# ---------------------------------------------------------------- page keys and pseudo-paths


def test_page_key_filename_or_content_hash(synthetic_dir):
    data = _png()
    assert page_key({"image_filename": "doc/p1.png", "image": {"bytes": data}}, 0) == "doc/p1.png"
    by_hash = page_key({"image": {"bytes": data, "path": None}}, 3)
    assert by_hash == "sha1:" + hashlib.sha1(data).hexdigest()
    assert page_key({"image_filename": "", "image": {"bytes": data}}, 9) == by_hash
    assert page_key({"image": None}, 4) == "row:4"
    ds = load_page_dataset(str(Path(synthetic_dir) / "train"))
    keys = page_keys(ds)
    assert len(keys) == 720 and len(set(keys)) == 240 and keys[0] == keys[1] == keys[2] != keys[3]


@pytest.mark.parametrize("name, split, index", [
    ("vidore/colpali_train_set", "train", 42),
    ("/tmp/x", "train", 3),
    ("relative/local/dir", "test", 0),
    ("a/b/c/d", "validation", 123456),
    ("plain", "train", 7),
])
def test_pseudo_path_round_trip(name, split, index):
    path = pseudo_path(name, split, index)
    assert parse_pseudo_path(path) == (name, split, index)


def test_pseudo_path_examples_and_non_pseudo_paths():
    assert pseudo_path("vidore/colpali_train_set", "train", 42) == "vidore/colpali_train_set/train/doc_42.png"
    assert parse_pseudo_path("vidore/colpali_train_set/train/doc_42.png") == ("vidore/colpali_train_set", "train", 42)
    assert parse_pseudo_path("/tmp/x/train/doc_3.png") == ("/tmp/x", "train", 3)
    for path in ("doc_3.png", "train/doc_3.png", "images/page_0001.png", "x/train/doc_3.jpg", "x/train/doc_.png",
                 "x/train/doc_3.png.bak"):
        assert parse_pseudo_path(path) is None, path


# ---------------------------------------------------------------- ImageResolver


def test_image_resolver_files_and_pseudo_paths(synthetic_dir, tmp_path):
    import datasets

    root = Path(synthetic_dir)
    resolver = ImageResolver(str(root / "eval"))
    page = resolver.load("images/page_0240.png")
    assert page.mode == "RGB" and page.size == Image.open(root / "eval/images/page_0240.png").size
    train = str(root / "train")
    row5 = resolver.load(pseudo_path(train, "train", 5))
    expected = datasets.load_from_disk(train)[5]["image"].convert("RGB")
    assert row5.tobytes() == expected.tobytes()
    assert resolver.dataset(train, "train") is resolver.dataset(train, "train")  # loaded once
    with pytest.raises(BadRowError, match=r"doc_720\.png: missing image: row 720 out of range .* 720 rows"):
        resolver.load(pseudo_path(train, "train", 720))
    with pytest.raises(BadRowError, match="images/nope.png: missing image: file not found"):
        resolver.load("images/nope.png")
    # A dataset name relative to root resolves under root.
    relative = ImageResolver(synthetic_dir)
    assert relative.load("train/train/doc_5.png").tobytes() == row5.tobytes()
    with pytest.raises(UserError, match="hub is unreachable"):
        ImageResolver(str(tmp_path)).load("someone/unknown_set/train/doc_1.png")


# ---------------------------------------------------------------- triples files


def _write_triples(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_read_triples_reports_bad_lines(tmp_path):
    path = _write_triples(tmp_path / "t.jsonl", [
        json.dumps({"query": "q1", "pos": "a.png", "negs": ["b.png", "c.png"], "scores": {"pos": 1.0}}),  # 1
        '{"query": "broken", "pos": ',  # 2 malformed JSON
        "",  # 3 blank: ignored
        json.dumps({"query": "  ", "pos": "a.png", "negs": []}),  # 4 empty query
        json.dumps({"query": "q5", "negs": []}),  # 5 missing pos
        json.dumps({"query": "q6", "pos": "a.png", "negs": "b.png"}),  # 6 negs not a list
        json.dumps({"query": "q7", "pos": "x/train/doc_3.png"}),  # 7 ok, no negs
        json.dumps(["not", "an", "object"]),  # 8
    ])
    triples, skipped = read_triples_jsonl(path)
    assert [(t.query, t.pos, t.negs, t.line) for t in triples] == [
        ("q1", "a.png", ["b.png", "c.png"], 1), ("q7", "x/train/doc_3.png", [], 7)]
    assert triples[0].extra == {"scores": {"pos": 1.0}}
    assert [(s.where, s.kind) for s in skipped] == [
        (f"{path} line 2", "malformed JSON"), (f"{path} line 4", "empty query"), (f"{path} line 5", "missing pos"),
        (f"{path} line 6", "bad negs"), (f"{path} line 8", "malformed JSON")]
    with pytest.raises(BadRowError, match=rf"^{path} line 2: malformed JSON"):
        read_triples_jsonl(path, strict=True)
    report = SkipReport()
    read_triples_jsonl(path, report=report)
    assert report.count == 5 and report.counts()["malformed JSON"] == 2


def test_read_triples_file_errors(tmp_path):
    with pytest.raises(UserError, match="triples file not found"):
        read_triples_jsonl(str(tmp_path / "none.jsonl"))
    path = _write_triples(tmp_path / "bad.jsonl", ["{", json.dumps({"query": "", "pos": "a"})])
    with pytest.raises(UserError, match=r"no valid triples \(2 lines skipped\); first problem: .* line 1: malformed"):
        read_triples_jsonl(path)


# ---------------------------------------------------------------- BEIR directories


def test_load_beir_dir_synthetic(synthetic_dir):
    corpus, queries, qrels = load_beir_dir(str(Path(synthetic_dir) / "eval"))
    assert len(corpus) == 60 and len(queries) == len(qrels) >= 60
    assert corpus["page_0240"] == str(Path(synthetic_dir) / "eval" / "images" / "page_0240.png")
    assert all(set(rel) <= set(corpus) and set(rel.values()) == {1} for rel in qrels.values())
    first = json.loads((Path(synthetic_dir) / "eval" / "queries.jsonl").read_text().splitlines()[0])
    assert queries[first["query-id"]] == first["query"]


def _copy_eval(synthetic_dir: str, tmp_path: Path) -> Path:
    target = tmp_path / "eval"
    shutil.copytree(Path(synthetic_dir) / "eval", target)
    return target


def _append(path: Path, row: dict) -> int:
    """Append a JSONL row; return its 1-based line number."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [json.dumps(row)]) + "\n")
    return len(lines) + 1


def test_load_beir_dir_errors(synthetic_dir, tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        load_beir_dir(str(tmp_path / "nothing"))
    missing = _copy_eval(synthetic_dir, tmp_path / "m")
    (missing / "qrels.jsonl").unlink()
    with pytest.raises(UserError, match="missing qrels.jsonl or qrels.parquet"):
        load_beir_dir(str(missing))

    unknown_doc = _copy_eval(synthetic_dir, tmp_path / "d")
    line = _append(unknown_doc / "qrels.jsonl", {"query-id": "q_0000", "corpus-id": "page_9999", "score": 1})
    with pytest.raises(UserError, match=rf"qrels.jsonl line {line}: unknown corpus-id 'page_9999' "
                                        r"\(not in corpus.jsonl\)"):
        load_beir_dir(str(unknown_doc))

    unknown_query = _copy_eval(synthetic_dir, tmp_path / "q")
    line = _append(unknown_query / "qrels.jsonl", {"query-id": "q_9999", "corpus-id": "page_0240", "score": 1})
    with pytest.raises(UserError, match=rf"qrels.jsonl line {line}: unknown query-id 'q_9999'"):
        load_beir_dir(str(unknown_query))

    bad_image = _copy_eval(synthetic_dir, tmp_path / "i")
    (bad_image / "images" / "page_0241.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"corpus.jsonl line 2: corpus-id 'page_0241': corrupt image"):
        load_beir_dir(str(bad_image))
    (bad_image / "images" / "page_0241.png").unlink()
    with pytest.raises(UserError, match=r"corpus-id 'page_0241': missing image: file not found"):
        load_beir_dir(str(bad_image))


def test_non_utf8_bytes_are_a_bad_line_in_every_jsonl_reader(synthetic_dir, tmp_path):
    """Latin-1 bytes in a line: a reported bad line naming file and line (skipped in triples, fatal under --strict
    and in an evaluation set, which is used whole); never a traceback, never U+FFFD in the data."""
    triples = tmp_path / "triples.jsonl"
    triples.write_bytes(b'{"query": "ok", "pos": "a.png"}\n{"query": "caf\xe9", "pos": "b.png"}\n'
                        b'{"query": "fine", "pos": "c.png"}\n')
    report = SkipReport()
    got, skipped = read_triples_jsonl(str(triples), report=report)
    assert [t.query for t in got] == ["ok", "fine"]
    assert [(s.where, s.reason) for s in skipped] == [
        (f"{triples} line 2", "not valid UTF-8: byte 0xe9 at byte 15 of the line")]
    assert report.counts() == {"not valid UTF-8": 1}
    with pytest.raises(BadRowError, match=rf"^{triples} line 2: not valid UTF-8"):
        read_triples_jsonl(str(triples), strict=True)

    beir = _copy_eval(synthetic_dir, tmp_path / "utf8")
    with open(beir / "queries.jsonl", "ab") as f:
        f.write(b'{"query-id": "q_9998", "query": "r\xe9sum\xe9"}\n')
    n_lines = len((beir / "queries.jsonl").read_bytes().splitlines())
    with pytest.raises(UserError, match=rf"^queries.jsonl line {n_lines}: not valid UTF-8: byte 0xe9 at byte 35 "
                                        r"of the line$"):
        load_beir_dir(str(beir))


def test_load_beir_dir_parquet_with_embedded_images(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "pq"
    root.mkdir()
    images = [{"bytes": _png(20, 30, (i * 40, 0, 0)), "path": None} for i in range(3)]
    pq.write_table(pa.table({"corpus-id": ["d0", "d1", "d2"], "image": images}), root / "corpus.parquet")
    pq.write_table(pa.table({"query-id": ["q0", "q1"], "query": ["first", "second"]}), root / "queries.parquet")
    pq.write_table(pa.table({"query-id": ["q0", "q1", "q1"], "corpus-id": ["d0", "d1", "d2"], "score": [1, 1, 2]}),
                   root / "qrels.parquet")
    corpus, queries, qrels = load_beir_dir(str(root))
    assert corpus["d1"] == images[1]["bytes"]
    assert decode_image(corpus["d2"], "d2").getpixel((0, 0)) == (80, 0, 0)
    assert queries == {"q0": "first", "q1": "second"}
    assert qrels == {"q0": {"d0": 1}, "q1": {"d1": 1, "d2": 2}}
    pq.write_table(pa.table({"query-id": ["q0", "q1"], "corpus-id": ["d0", "dX"], "score": [1, 1]}),
                   root / "qrels.parquet")
    with pytest.raises(UserError, match=r"qrels.parquet row 1: unknown corpus-id 'dX' \(not in corpus.parquet\)"):
        load_beir_dir(str(root))


# ---------------------------------------------------------------------------------------------------------
# Every PIL mode keeps its content


def _grey_reference() -> np.ndarray:
    """(48, 64) uint8: every byte value (a gradient) plus a dark box, so a clipped or blank page cannot pass."""
    grey = (np.arange(48 * 64).reshape(48, 64) % 256).astype(np.uint8)
    grey[10:20, 30:50] = 7
    return grey


def _png_of(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "I;16", "I;16B", "I", "I-8bit", "F", "F-unit", "P", "PA", "LA", "La", "1",
                                  "CMYK", "YCbCr", "RGBA", "RGBa", "P-transparency", "png-16bit", "png-P"])
def test_every_pil_mode_decodes_to_the_same_page(mode):
    """The 8-bit grey reference, written in each mode, decodes to the same RGB page (exactly; YCbCr within its
    rounding). A 16-bit PNG used to become an almost blank page (PIL clips I;16 to 255)."""
    grey = _grey_reference()
    ref = np.repeat(grey[:, :, None], 3, axis=2)  # (H, W, 3)
    wide = grey.astype(np.uint16) * 257  # 16-bit samples of the same content
    alpha = np.full_like(grey, 255)
    images = {
        "L": lambda: Image.fromarray(grey),
        "I;16": lambda: Image.fromarray(wide),
        "I;16B": lambda: Image.frombytes("I;16B", (64, 48), wide.astype(">u2").tobytes()),
        "I": lambda: Image.fromarray(wide.astype(np.int32)),
        "I-8bit": lambda: Image.fromarray(grey.astype(np.int32)),
        "F": lambda: Image.fromarray(grey.astype(np.float32)),
        "F-unit": lambda: Image.fromarray(grey.astype(np.float32) / 255),
        "P": lambda: Image.fromarray(grey).convert("P", palette=Image.Palette.ADAPTIVE, colors=256),
        "PA": lambda: Image.fromarray(grey).convert("P", palette=Image.Palette.ADAPTIVE).convert("PA"),
        "LA": lambda: Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]),
        "La": lambda: Image.frombytes("La", (64, 48), np.dstack([grey, alpha]).tobytes()),
        "1": lambda: Image.fromarray(grey).point(lambda v: 255 if v >= 128 else 0).convert("1"),
        "CMYK": lambda: Image.fromarray(ref).convert("CMYK"),
        "YCbCr": lambda: Image.fromarray(ref).convert("YCbCr"),
        "RGBA": lambda: Image.fromarray(np.dstack([ref, alpha])),
        "RGBa": lambda: Image.fromarray(np.dstack([ref, alpha])).convert("RGBa"),
        "P-transparency": lambda: Image.fromarray(grey).convert("P", palette=Image.Palette.ADAPTIVE),
        "png-16bit": lambda: _png_of(Image.fromarray(wide)),
        "png-P": lambda: _png_of(Image.fromarray(grey).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)),
    }
    value = images[mode]()
    if mode == "1":
        ref = np.repeat(np.where(grey >= 128, 255, 0).astype(np.uint8)[:, :, None], 3, axis=2)
    got = np.asarray(decode_image(value, "row 0"))
    assert got.dtype == np.uint8 and got.shape == ref.shape
    tolerance = 2 if mode == "YCbCr" else 0
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= tolerance, mode


def test_transparent_areas_become_white_and_unreadable_ranges_are_reported():
    grey = _grey_reference()
    alpha = np.full_like(grey, 255)
    alpha[:, :8] = 0  # a transparent left margin
    page = np.asarray(decode_image(Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]), "row 1"))
    assert (page[:, :8] == 255).all() and np.array_equal(page[:, 8:, 0], grey[:, 8:])
    signed = Image.fromarray(grey.astype(np.int32) - 300)
    with pytest.raises(BadRowError, match=r"^row 2: unsupported pixel values: I image with samples from -300 to -45 "):
        decode_image(signed, "row 2")
    with pytest.raises(BadRowError, match=r"^row 3: unsupported pixel values: F image with NaN"):
        decode_image(Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32)), "row 3")


def test_image_folder_with_non_utf8_metadata_is_one_line(tmp_path):
    folder = tmp_path / "pages"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 60), (10 * i, 20, 30)).save(folder / f"p{i}.png")
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": "p0.png", "query": "first page"}\n'
                                            b'{"file_name": "p1.png", "query": "second page"}\n')
    dataset = load_page_dataset(str(folder), "train")
    assert sorted(dataset["query"]) == ["first page", "second page"]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "metadata.jsonl").write_bytes(b'{"file_name": "p0.png", "query": "first page"}\n'
                                         b'{"file_name": "p1.png", "query": "\xe9t\xe9"}\n')
    with pytest.raises(UserError, match=rf"^{bad / 'metadata.jsonl'} line 2: not valid UTF-8: byte 0xe9 at byte 35 "
                                        r"of the line; save the file as UTF-8$"):
        load_page_dataset(str(bad), "train")


def test_odd_page_sizes_are_said_once_in_our_words(monkeypatch, caplog):
    """A 1x1 page is allowed but named; PIL's raw DecompressionBombWarning (which lands inside progress bars)
    becomes one log line with the size and the memory it takes."""
    import logging
    import warnings

    caplog.set_level(logging.WARNING)
    decode_image(Image.new("RGB", (1, 1)), "row 7")
    assert "row 7: tiny page (1x1 pixels): it is upscaled to fill a tile and carries little to read" in caplog.text
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 40x40 page is now "very large"
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, format="PNG")
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        page = decode_image(buf.getvalue(), "row 8")
    assert page.size == (40, 40)
    assert not [w for w in raised if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "row 8: very large page (40x40 = 0 Mpx): decoding it takes 0.0 GiB" in caplog.text
