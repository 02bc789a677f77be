"""The search index cannot be silently corrupt (docs/CONTRACT.md §10, "Integrity"): every file has a checksum,
damage is named (one line or a warning), `verify` finds it, `export` refuses it, `index` encodes damaged pages
again or rebuilds a damaged index.json, and a second writer stops with one line."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from colintern.index.page_index import PageIndex, writer_lock
from helpers import search_run as run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built(tiny_model_dir, search_ckpt, search_docs, tmp_path_factory):
    """An index of the six pages in three segments of two, and the command that extends it."""
    from colintern.cli import run_cli
    from helpers import load_script

    folder = tmp_path_factory.mktemp("built") / "index"
    argv = ["index", "--ckpt", search_ckpt, "--model_id", tiny_model_dir, "--inputs", str(search_docs),
            "--index", str(folder), "--dpi", "72", "--segment_pages", "2"]
    assert run_cli(load_script("search").main, argv) == 0
    return folder, argv[:-6]


@pytest.fixture
def index(built, tmp_path):
    """A fresh copy of the built index (copy2 keeps the files' mtimes, as `cp -p` would)."""
    copy = tmp_path / "index"
    shutil.copytree(built[0], copy, copy_function=shutil.copy2)
    return copy


def pages_of(folder) -> list[tuple[str, int]]:
    return sorted((p["file"], p["page"]) for p in PageIndex.open(folder).pages)


def flip_bytes(path, at: int, data: bytes, keep_mtime: bool = False) -> None:
    """Overwrite bytes in place (as disk damage or a stray write would); keep_mtime puts the old mtime back."""
    before = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def extend(built, index, capsys, *more):
    return run(capsys, *built[1], "--inputs", *more, "--index", index, "--dpi", 72, "--segment_pages", 2)


def test_an_intact_index_verifies_and_records_a_checksum_for_every_file(index, capsys):
    code, out, _ = run(capsys, "verify", "--index", index)
    assert code == 0 and out.strip() == f"ok: 3 segment(s), 6 page(s) in {index} match their checksums"
    meta = json.loads((index / "index.json").read_text())
    assert meta["version"] == 2 and len(meta["checksum"]) == 64
    for name in meta["segments"]:
        record = meta["segment_files"][name]
        manifest = json.loads((index / name / "manifest.json").read_text())
        assert {k: v for k, v in manifest.items() if k != "checksum"} == record
        from colintern.files import file_sha256

        assert record["tokens"]["sha256"] == file_sha256(index / name / "tokens.f16")
        assert record["pages_file"]["sha256"] == file_sha256(index / name / "pages.json")
    assert json.loads((index / "header.json").read_text())["model_id"] == meta["model_id"]


def test_flipped_bytes_are_found_named_and_encoded_again(built, index, capsys, search_docs):
    want = pages_of(index)
    tokens = index / "seg-00001" / "tokens.f16"
    flip_bytes(tokens, 64, b"\x00\x3c" * 8)  # other finite values: rankings would change in silence
    code, out, err = run(capsys, "query", "--index", index, "--k", 6, "--json", "alpha")
    assert code == 0 and "seg-00001: damaged (seg-00001/tokens.f16: its sha256 is not the one recorded" in err
    assert len(json.loads(out)["results"]) == 4  # the damaged segment's two pages are left out, not scored
    code, out, _ = run(capsys, "verify", "--index", index)
    assert code == 1 and out.splitlines()[0] == \
        f"damaged: {index / 'seg-00001'}: seg-00001/tokens.f16: its sha256 is not the one recorded (bytes changed)"
    code, _, err = run(capsys, "export", "--index", index, "--out", index.parent / "x.parquet")
    assert code == 2 and err.strip().startswith(f"error: --index {index} is damaged (seg-00001/tokens.f16")
    assert not (index.parent / "x.parquet").exists()
    code, out, err = extend(built, index, capsys, search_docs)
    assert code == 0 and out.startswith("indexed 2 new page(s) from 3 file(s); 6 page(s)"), err
    assert pages_of(index) == want and not (index / "seg-00001").exists()
    assert run(capsys, "verify", "--index", index)[0] == 0


def test_damage_that_kept_the_mtime_is_found_by_verify_and_nan_never_prints(built, index, capsys):
    tokens = index / "seg-00000" / "tokens.f16"
    flip_bytes(tokens, 0, b"\x00\x7e" * 64, keep_mtime=True)  # float16 NaNs; the cheap check trusts the mtime
    code, out, err = run(capsys, "query", "--index", index, "--k", 3, "alpha")
    assert code == 2 and "nan" not in out.lower()
    assert err.strip().splitlines()[-1] == f"error: {index}: segment(s) seg-00000 hold non-finite vectors " \
        f"(damaged); run search.py verify --index {index}, then search.py index to encode them again"
    code, out, _ = run(capsys, "verify", "--index", index)
    assert code == 1 and "seg-00000/tokens.f16: its sha256 is not the one recorded" in out


@pytest.mark.parametrize("damage", ["truncate_rows", "delete_segment", "truncate_pages_json", "edit_manifest"])
def test_a_damaged_segment_is_named_refused_by_export_and_encoded_again(built, index, capsys, search_docs, damage):
    want = pages_of(index)
    seg = index / "seg-00002"
    if damage == "truncate_rows":  # a row-aligned cut: the file still parses as whole vectors
        size = (seg / "tokens.f16").stat().st_size
        os.truncate(seg / "tokens.f16", size - 32 * 2 * 5)
        why = "seg-00002/tokens.f16: " + f"{size - 320} bytes, {size} were written (truncated or overwritten)"
    elif damage == "delete_segment":
        shutil.rmtree(seg)
        why = "seg-00002/: the segment folder is missing"
    elif damage == "truncate_pages_json":
        os.truncate(seg / "pages.json", 40)
        why = "seg-00002/pages.json: its sha256 is not the one recorded (truncated or edited)"
    else:
        manifest = json.loads((seg / "manifest.json").read_text())
        manifest["n_pages"] = 5
        (seg / "manifest.json").write_text(json.dumps(manifest))
        why = "seg-00002/manifest.json: its checksum does not match its content (edited or damaged)"
    code, out, err = run(capsys, "query", "--index", index, "--k", 6, "--json", "alpha")
    assert code == 0 and f"seg-00002: damaged ({why})" in err and "Traceback" not in err
    assert len(json.loads(out)["results"]) == 4
    code, out, _ = run(capsys, "verify", "--index", index)
    assert code == 1 and out.splitlines()[0] == f"damaged: {seg}: {why}"
    code, _, err = run(capsys, "export", "--index", index, "--out", index.parent / "x.parquet")
    assert code == 2 and why in err
    code, out, err = extend(built, index, capsys, search_docs)
    assert code == 0 and out.startswith("indexed 2 new page(s)"), err
    assert pages_of(index) == want and run(capsys, "verify", "--index", index)[0] == 0


def test_repair_drops_damaged_segments_and_index_encodes_their_files_without_being_told(built, index, capsys,
                                                                                        search_docs):
    want = pages_of(index)
    os.truncate(index / "seg-00000" / "tokens.f16", 10)
    code, out, _ = run(capsys, "verify", "--index", index, "--repair")
    assert code == 0 and out.startswith("dropped the damaged segment(s); 4 page(s) left.")
    assert run(capsys, "verify", "--index", index)[0] == 0 and len(pages_of(index)) == 4
    # seg-00000 held a.pdf pages 1-2: `index` given only c.png still brings them back (the index remembers them)
    code, out, err = extend(built, index, capsys, search_docs / "c.png")
    assert code == 0 and out.startswith("indexed 2 new page(s) from 2 file(s); 6 page(s)"), err
    assert pages_of(index) == want


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_index_json_is_one_line_for_readers_and_rebuilt_by_index(built, index, capsys, search_docs, damage):
    want = pages_of(index)
    if damage == "truncate":
        os.truncate(index / "index.json", 100)
    else:
        (index / "index.json").unlink()
    code, _, err = run(capsys, "query", "--index", index, "alpha")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {index / 'index.json'}: ") and "search.py index" in err
    code, out, err = extend(built, index, capsys, search_docs)
    assert code == 0 and out.startswith("indexed 0 new page(s) from 3 file(s); 6 page(s)"), err
    assert "rebuilt from header.json and 3 intact segment(s)" in err
    assert pages_of(index) == want and run(capsys, "verify", "--index", index)[0] == 0


def test_a_changed_file_keeps_its_hidden_pages_hidden_after_a_rebuild(built, index, capsys, search_docs, tmp_path):
    """index.json rebuilt from the segments: a file indexed twice counts with its newest content only."""
    from helpers import search_page

    docs = tmp_path / "docs"
    shutil.copytree(search_docs, docs)
    code, _, err = extend(built, index, capsys, docs / "c.png")
    assert code == 0, err
    search_page(0).save(docs / "c.png")  # new content under the same name
    assert extend(built, index, capsys, docs / "c.png")[0] == 0
    before = [(p["file"], p["sha256"]) for p in PageIndex.open(index).pages]
    os.truncate(index / "index.json", 0)
    assert extend(built, index, capsys, docs / "c.png")[1].startswith("indexed 0 new page(s)")
    assert [(p["file"], p["sha256"]) for p in PageIndex.open(index).pages] == before


def test_a_second_writer_stops_with_one_line(built, index, capsys, search_docs):
    with writer_lock(index):
        code, out, err = extend(built, index, capsys, search_docs)
        assert code == 2 and out == ""
        assert err.strip().splitlines()[-1] == f"error: --index {index} is being written by another process " \
            "(search.py index, verify --repair or remove); wait for it to finish, or use another --index"
        assert run(capsys, "verify", "--index", index, "--repair")[0] == 2
        assert run(capsys, "query", "--index", index, "alpha")[0] == 0  # readers need no lock
    assert extend(built, index, capsys, search_docs)[0] == 0


def test_a_format_1_index_is_read_and_gets_checksums_from_its_next_writer(built, index, capsys, search_docs):
    """An index written before checksums (format 1: no header.json, manifests or checksums) still answers queries,
    and the next `index` adds the checksums."""
    meta = json.loads((index / "index.json").read_text())
    want = pages_of(index)
    for name in meta["segments"]:
        (index / name / "manifest.json").unlink()
    (index / "header.json").unlink()
    old = {k: v for k, v in meta.items() if k not in ("checksum", "segment_files")}
    old["version"] = 1
    (index / "index.json").write_text(json.dumps(old))
    assert pages_of(index) == want and run(capsys, "query", "--index", index, "alpha")[0] == 0
    code, out, err = extend(built, index, capsys, search_docs)
    assert code == 0 and out.startswith("indexed 0 new page(s)"), err
    upgraded = json.loads((index / "index.json").read_text())
    assert upgraded["version"] == 2 and set(upgraded["segment_files"]) == set(meta["segments"])
    assert run(capsys, "verify", "--index", index)[0] == 0 and (index / "header.json").is_file()


def test_a_copied_folder_is_hashed_once_then_trusted(built, index, tmp_path, capsys, search_docs):
    """copytree without copy2 gives new mtimes: readers hash the tokens (and find them intact); the next writer
    records the new mtimes so readers trust them again."""
    plain = tmp_path / "plain"
    shutil.copytree(index, plain, copy_function=shutil.copyfile)
    from colintern.index import segments

    calls = []
    real = segments.file_sha256
    segments.file_sha256 = lambda path: calls.append(path) or real(path)
    try:
        assert len(PageIndex.open(plain).pages) == 6 and len(calls) == 3
        assert extend(built, plain, capsys, search_docs)[0] == 0
        calls.clear()
        assert len(PageIndex.open(plain).pages) == 6 and calls == []
    finally:
        segments.file_sha256 = real


def test_exported_vectors_are_the_stored_float16_with_their_metadata(index, capsys, tmp_path):
    import pyarrow.parquet as pq

    code, out, _ = run(capsys, "export", "--index", index, "--out", tmp_path / "pages.parquet")
    assert code == 0 and out.strip() == f"exported 6 page(s) to {tmp_path / 'pages.parquet'}"
    table = pq.read_table(tmp_path / "pages.parquet")
    vectors = table.schema.field("vectors").type
    assert str(vectors.value_type.value_type) == "halffloat" and vectors.value_type.list_size == 32
    meta = json.loads(table.schema.metadata[b"colintern"])
    opened = PageIndex.open(index)
    assert (meta["dim"], meta["pool_factor"], meta["dtype"], meta["model_id"]) == \
        (32, 1, "float16", opened.meta["model_id"])
    for i, row in enumerate(table.to_pylist()):
        assert np.array_equal(np.asarray(row["vectors"], dtype=np.float16), opened.page_rows(i))
        assert os.fsdecode(row["file_bytes"]) == opened.pages[i]["file"] == row["file"]
