"""Faults a new user hit, each reproduced and now one line (or a warning naming the file) with an exit status
that says whether anything was done: checkpoints of the other task, moved base models, changed or deleted files,
huge PDF pages, undecodable bytes, unreadable folders, concurrent Qdrant local mode, long queries, bad flags, and
the training data a checkpoint records for mteb."""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest

from colintern import ColIntern
from colintern.retriever.checkpoint import atomic_torch_save, base_model_of, load_checkpoint, resolve_recorded_model
from colintern.cli import run_cli
from colintern.errors import UserError
from helpers import load_script, search_page, search_run as run

pytestmark = pytest.mark.usefixtures("one_thread")
ITR_LINE = "is an image-text retrieval checkpoint (train.py --task itr): it has no page retrieval head"


@pytest.fixture(scope="module")
def itr_ckpt(tiny_model_dir, tmp_path_factory) -> str:
    """What train.py --task itr writes, as far as any loader reads before refusing it."""
    model = ColIntern.from_pretrained(tiny_model_dir, max_tiles=2, dim=32)
    path = tmp_path_factory.mktemp("itr") / "colintern_heads_epoch1.pt"
    atomic_torch_save({"format_version": 2, "task": "itr", "config": model.config.to_dict(), "itr": {},
                       "itr_heads": {}, "training": None}, str(path))
    return str(path)


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_image_text_checkpoint_is_one_line_in_every_retrieval_script(itr_ckpt, tiny_model_dir, synthetic_small_dir,
                                                                        search_docs, tmp_path, capsys):
    code, _, err = run(capsys, "index", "--ckpt", itr_ckpt, "--inputs", search_docs, "--index", tmp_path / "ix")
    assert code == 2 and ITR_LINE in one_error_line(err) and not (tmp_path / "ix").exists()
    code, _, err = run(capsys, "export_model", "--ckpt", itr_ckpt, "--out", tmp_path / "export")
    assert code == 2 and ITR_LINE in one_error_line(err)
    scripts = {name: load_script(name) for name in ("eval", "mine", "train")}
    argvs = {
        "eval": ["--ckpt", itr_ckpt, "--local_dataset", os.path.join(synthetic_small_dir, "eval"), "--out_dir",
                 str(tmp_path / "eval"), "--device", "cpu"],
        "mine": ["--ckpt", itr_ckpt, "--model_id", tiny_model_dir, "--hub_name",
                 os.path.join(synthetic_small_dir, "train"), "--out_jsonl", str(tmp_path / "mine" / "m.jsonl")],
        "train": ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"),
                  "--resume_ckpt", itr_ckpt, "--out_dir", str(tmp_path / "train"), "--num_workers", "0",
                  "--device", "cpu"],
    }
    for name, argv in argvs.items():
        code = run_cli(scripts[name].main, argv)
        assert code == 2 and ITR_LINE in one_error_line(capsys.readouterr().err), name
    assert not (tmp_path / "mine").exists()  # mine.py refuses before it makes its output folder


def test_a_retrieval_checkpoint_is_refused_by_the_image_text_loaders(search_ckpt):
    with pytest.raises(UserError, match="is a page retrieval checkpoint, not an image-text one"):
        load_checkpoint(search_ckpt, task="itr")


def test_checkpoints_record_an_absolute_base_model_and_old_relative_ones_are_found(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.chdir(Path(tiny_model_dir).parent)
    relative = Path(tiny_model_dir).name
    model = ColIntern.from_pretrained(relative, max_tiles=2, dim=32)
    assert model.config.base_model == tiny_model_dir  # given relative, recorded absolute
    # a checkpoint written before that rule, recording "tiny0" relative to where training ran
    run_dir = Path(tiny_model_dir).parent / "outputs" / "train"
    payload = {"config": {"base_model": relative}}
    monkeypatch.chdir(tmp_path)  # anywhere else: found from the folders above the checkpoint
    assert base_model_of(payload, str(run_dir / "colintern_heads_epoch1.pt")) == tiny_model_dir
    assert resolve_recorded_model("org/model", tmp_path / "x.pt") == "org/model"  # a hub id stays one


def test_an_index_works_from_any_directory_and_query_takes_model_id(tiny_model_dir, search_ckpt, search_docs,
                                                                    tmp_path, capsys, monkeypatch):
    from colintern.index.page_index import PageIndex

    index = tmp_path / "index"
    assert run(capsys, "index", "--ckpt", search_ckpt, "--model_id", tiny_model_dir, "--inputs",
               search_docs / "c.png", "--index", index, "--dpi", 72)[0] == 0
    opened = PageIndex.open(index)
    assert opened.meta["model_id"] == tiny_model_dir
    opened.meta["model_id"] = "moved/tiny"  # as an index built elsewhere with a relative path records it
    opened.save_meta()
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "query", "--index", index, "red")
    assert code == 2 and "'moved/tiny'" in one_error_line(err)
    code, out, err = run(capsys, "query", "--index", index, "--model_id", tiny_model_dir, "--json", "red")
    assert code == 0 and json.loads(out)["results"][0]["file"] == str(search_docs / "c.png"), err


def test_explain_skips_a_changed_or_deleted_file_with_a_warning(tiny_model_dir, search_ckpt, search_docs, tmp_path,
                                                                capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        search_page(i).save(docs / f"p{i}.png")
    index = tmp_path / "index"
    assert run(capsys, "index", "--ckpt", search_ckpt, "--model_id", tiny_model_dir, "--inputs", docs,
               "--index", index)[0] == 0
    search_page(5).save(docs / "p1.png")  # other content under the indexed name
    (docs / "p2.png").unlink()
    maps = tmp_path / "maps"
    code, out, err = run(capsys, "query", "--index", index, "--k", 3, "--explain", maps, "--json", "red")
    assert code == 0, err
    assert f"{docs / 'p1.png'} page 1: the file changed since it was indexed; no similarity map" in err
    assert f"{docs / 'p2.png'} page 1: the file is gone; no similarity map" in err
    ranks = {r["file"]: r["rank"] for r in json.loads(out)["results"]}
    assert sorted(p.name for p in maps.iterdir()) == [f"q001_r{ranks[str(docs / 'p0.png')]:02d}.png"]


def test_a_huge_pdf_page_is_rendered_under_the_pixel_cap(tmp_path, monkeypatch, caplog):
    from PIL import Image

    from colintern.index import sources as page_index
    from colintern.index.sources import PageSource, render_page, render_scale

    assert render_scale(200 * 72, 200 * 72, 150) * 72 == pytest.approx(150 * (64e6 / 900e6) ** 0.5)
    assert render_scale(612, 792, 150) == 150 / 72  # a letter page is far below the cap
    path = tmp_path / "poster.pdf"
    Image.new("RGB", (400, 400), (255, 255, 255)).save(path, resolution=2.0)  # a 200 x 200 inch page
    monkeypatch.setattr(page_index, "MAX_RENDER_PIXELS", 1_000_000)
    caplog.set_level(logging.WARNING, logger="colintern.search")
    image = render_page(PageSource(str(path), "x", 1, "pdf"), 150)
    assert image.width * image.height <= 1_000_000 and image.width == pytest.approx(1000, abs=2)
    assert f"{path} page 1 is 200 x 200 in: rendered at 5 dpi instead of 150 to stay under 1 Mpx" in caplog.text


def test_undecodable_bytes_in_queries_and_file_names_never_break_the_output(tiny_model_dir, search_ckpt, tmp_path,
                                                                            capsys):
    import pyarrow.parquet as pq

    docs = tmp_path / "docs"
    docs.mkdir()
    raw = os.fsencode(str(docs)) + b"/bad\xff\xfe\nname.png"
    search_page(0).save(os.fsdecode(raw), format="PNG")
    index = tmp_path / "index"
    code, _, err = run(capsys, "index", "--ckpt", search_ckpt, "--model_id", tiny_model_dir, "--inputs", docs,
                       "--index", index)
    assert code == 0, err
    code, out, _ = run(capsys, "query", "--index", index, "red")
    assert code == 0 and "bad\\xff\\xfe\\nname.png page 1" in out and len(out.strip().splitlines()) == 2
    code, out, _ = run(capsys, "query", "--index", index, "--json", "red")
    out.encode("utf-8")  # valid UTF-8 (a lone surrogate could not be encoded)
    assert code == 0 and os.fsencode(json.loads(out)["results"][0]["file"]) == raw
    code, _, err = run(capsys, "query", "--index", index, "r\udcffd")  # argv bytes the locale could not decode
    assert code == 2 and one_error_line(err) == "error: query 1 is not valid UTF-8 text; pass UTF-8 (or use " \
        "--queries_file)"
    assert run(capsys, "export", "--index", index, "--out", tmp_path / "p.parquet")[0] == 0
    row = pq.read_table(tmp_path / "p.parquet").to_pylist()[0]
    assert row["file_bytes"] == raw and row["file"].endswith("bad\\xff\\xfe\\nname.png")


def test_an_unreadable_subfolder_is_a_warning_and_an_unreadable_input_folder_says_so(tmp_path, monkeypatch, caplog):
    from colintern.index.sources import find_inputs

    (tmp_path / "top" / "locked").mkdir(parents=True)
    search_page(0).save(tmp_path / "top" / "a.png")
    search_page(1).save(tmp_path / "top" / "locked" / "b.png")
    real = os.scandir

    def scandir(path):  # root reads every folder whatever its mode: refuse as the kernel would for a user
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    caplog.set_level(logging.WARNING, logger="colintern.search")
    assert find_inputs([str(tmp_path / "top")]) == [tmp_path / "top" / "a.png"]
    assert f"{tmp_path / 'top' / 'locked'}: cannot read this folder (permission denied); its files are not " \
           "indexed" in caplog.text
    with pytest.raises(UserError, match=r"locked: cannot read this folder \(permission denied\)$"):
        find_inputs([str(tmp_path / "top" / "locked")])


def test_two_processes_on_one_qdrant_folder_take_turns(tiny_model_dir, search_ckpt, search_docs, tmp_path, capsys):
    pytest.importorskip("qdrant_client")
    from colintern.index.page_index import PageIndex
    from colintern.index.qdrant_store import QdrantPages

    index, qdrant = tmp_path / "index", tmp_path / "qdrant"
    assert run(capsys, "index", "--ckpt", search_ckpt, "--model_id", tiny_model_dir, "--inputs", search_docs / "c.png",
               "--index", index, "--backend", "qdrant", "--path", qdrant)[0] == 0
    opened = PageIndex.open(index)
    first = QdrantPages(opened, path=str(qdrant))
    got: list[int] = []

    def second() -> None:
        store = QdrantPages(opened, path=str(qdrant))  # waits for `first` instead of a RuntimeError
        got.append(store.client.count(store.collection, exact=True).count)
        store.close()

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive() and got == []  # still waiting
    first.close()
    thread.join(30)
    assert got == [1]


def test_arguments_and_paths_are_checked_before_the_model_loads(tiny_model_dir, search_ckpt, search_docs, tmp_path,
                                                                capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(ColIntern, "from_pretrained", no_model)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    base = ["index", "--ckpt", search_ckpt, "--model_id", tiny_model_dir]
    cases = [
        ([*base, "--inputs", tmp_path / "notes.txt", "--index", tmp_path / "i"],
         f"error: --inputs {tmp_path / 'notes.txt'}: not a PDF or an image (.txt); search.py indexes .pdf and "),
        ([*base, "--inputs", search_docs, "--index", tmp_path / "full"],
         f"error: --index {tmp_path / 'full'} is not empty and holds no index; choose an empty or new folder"),
        ([*base, "--inputs", search_docs, "--index", tmp_path / "i", "--dpi", 100000],
         "error: --dpi 100000 is over 1200; pages are resized to the model's tiles, so 150 is plenty"),
    ]
    for argv, line in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and one_error_line(err).startswith(line)
    assert not (tmp_path / "i").exists()
    # a query: empty text is refused before the model loads (the index exists)
    monkeypatch.undo()
    assert run(capsys, *base, "--inputs", search_docs / "c.png", "--index", tmp_path / "ok")[0] == 0
    monkeypatch.setattr(ColIntern, "from_pretrained", no_model)
    code, _, err = run(capsys, "query", "--index", tmp_path / "ok", "red", "  ")
    assert code == 2 and one_error_line(err) == "error: query 2 is empty; give some text"


def test_long_queries_are_cut_with_a_warning_keeping_their_augmentation_tokens(tiny_model_dir, caplog):
    model = ColIntern.from_pretrained(tiny_model_dir, max_tiles=2, dim=32, max_query_length=8)
    processor, cfg = model.processor, model.config
    caplog.set_level(logging.WARNING, logger="colintern")
    long = " ".join(["word"] * 40)
    batch = processor.process_queries([long, "red page"])
    n = len(model.tokenizer(processor.query_prefix() + long, add_special_tokens=False)["input_ids"])
    assert n > 8 and f"query 1 has {n} tokens with its prefix: only the first 8 are used (max_query_length)" \
        in caplog.text
    aug = model.tokenizer.convert_tokens_to_ids(cfg.augmentation_token)
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert len(ids) == 8 + cfg.n_augmentation  # the text was cut, not the augmentation tokens
    assert ids[-cfg.n_augmentation:] == [aug] * cfg.n_augmentation and ids[-cfg.n_augmentation - 1] != aug
    assert "query 2" not in caplog.text


def test_single_vector_flags_on_a_multi_vector_model_are_refused(tiny_model_dir, synthetic_small_dir, tmp_path,
                                                                 capsys):
    train = load_script("train")
    argv = ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"), "--out_dir",
            str(tmp_path), "--pooling", "latent"]
    assert run_cli(train.main, argv) == 2
    assert one_error_line(capsys.readouterr().err) == "error: --pooling only apply to single-vector models: add " \
        "--embedding single, or leave them out for a multi-vector (ColPali) model"


def test_an_exported_folder_loads_without_the_untrained_head_warning(tiny_model_dir, search_ckpt, search_docs,
                                                                     tmp_path, capsys):
    assert run(capsys, "export_model", "--ckpt", search_ckpt, "--out", tmp_path / "export")[0] == 0
    code, _, err = run(capsys, "index", "--model_id", tmp_path / "export", "--inputs", search_docs / "c.png",
                       "--index", tmp_path / "ix")
    assert code == 0 and "UNTRAINED" not in err
    code, _, err = run(capsys, "index", "--model_id", tiny_model_dir, "--inputs", search_docs / "c.png", "--index",
                       tmp_path / "iy")
    assert code == 0 and "an UNTRAINED head" in err


def test_checkpoints_record_their_training_data_and_mteb_meta_declares_it(tiny_model_dir, synthetic_small_dir,
                                                                          tmp_path):
    mteb_model = load_script("mteb_model")
    train = load_script("train")
    hub = os.path.join(synthetic_small_dir, "train")
    out = tmp_path / "run"
    assert train.main(["--model_id", tiny_model_dir, "--train_hub", hub, "--max_steps", "1", "--batch_size", "4",
                       "--num_workers", "0", "--device", "cpu", "--out_dir", str(out), "--dim", "32",
                       "--max_tiles", "2"]) == 0
    ckpt = out / "colintern_heads_epoch1.pt"
    if not ckpt.exists():
        ckpt = sorted(out.glob("colintern_heads_*.pt"))[-1]
    payload = load_checkpoint(str(ckpt))
    assert payload["training"]["datasets"] == [hub]
    assert mteb_model.training_datasets_of(str(ckpt)) == set()  # local data: no mteb task seen
    payload["training"]["datasets"] = ["vidore/colpali_train_set"]
    atomic_torch_save(payload, str(tmp_path / "colpali.pt"))
    assert mteb_model.training_datasets_of(str(tmp_path / "colpali.pt")) == {
        "VidoreDocVQARetrieval", "VidoreInfoVQARetrieval", "VidoreTatdqaRetrieval", "VidoreArxivQARetrieval"}
    payload["training"].pop("datasets")  # written before checkpoints recorded their data: unknown
    atomic_torch_save(payload, str(tmp_path / "old.pt"))
    assert mteb_model.training_datasets_of(str(tmp_path / "old.pt")) is None
    meta = mteb_model.colintern_model_meta(tiny_model_dir, str(tmp_path / "colpali.pt"), revision="r", dim=32,
                                           n_parameters=1, training_datasets={"VidoreDocVQARetrieval"})
    assert meta.training_datasets == {"VidoreDocVQARetrieval"}


def test_image_text_training_takes_threads_workers_and_device_map(tmp_path):
    from types import SimpleNamespace

    from colintern.itr.model import open_images
    from colintern.itr.train import parse_args

    args = parse_args(["--model_id", "m", "--train_itr", "t.jsonl", "--threads", "1", "--num_workers", "2",
                       "--device_map", "cpu"])
    assert (args.threads, args.num_workers, args.device) == (1, 2, "cpu")
    images = [search_page(i) for i in range(5)]
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    rows = [SimpleNamespace(image=str(tmp_path / f"{i}.png")) for i in range(5)]
    decoded = open_images(rows, workers=3)  # in row order, the same pixels as one thread
    assert [im.tobytes() for im in decoded] == [im.tobytes() for im in images]
    with pytest.raises(UserError, match="--threads must be at least 1"):
        parse_args(["--model_id", "m", "--train_itr", "t.jsonl", "--threads", "0"])
