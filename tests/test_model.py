"""Foundation: backbone loading (both layouts), processor, batch-independent embeddings, checkpoints, bad input."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from colintern import ColIntern, UserError
from colintern.retriever.checkpoint import load_checkpoint, save_checkpoint
from colintern.retriever.config import ColInternConfig
from helpers import noisy_page, max_diff, perturb_lora

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




PAGES = [noisy_page(224, 300, (255, 0, 0), 1), noisy_page(100, 100, (0, 0, 255), 2), noisy_page(600, 200, (0, 255, 0), 3),
         noisy_page(120, 900, (200, 200, 0), 4), noisy_page(50, 60, (0, 0, 0), 5), noisy_page(448, 448, (10, 200, 100), 6),
         noisy_page(300, 224, (90, 20, 200), 7), noisy_page(1000, 1400, (255, 255, 255), 8)]
QUERIES = ["red page", "a blue square with the word delta", "which page shows a green triangle on a white background?",
           "x", "chart", "table of revenue per year in the annual report", "gamma", "find the star"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return ColIntern.from_pretrained(tiny_model_dir, max_tiles=4)



def test_remote_layout_converts_to_identical_embeddings(model, tiny_model_dir, tiny_remote_dir):
    remote = ColIntern.from_pretrained(tiny_remote_dir, max_tiles=4)
    assert remote.config.source_layout == "remote" and model.config.source_layout == "native"
    assert remote.signature == model.signature
    native_state = model.backbone.state_dict()
    remote_state = remote.backbone.state_dict()
    assert set(native_state) == set(remote_state)
    assert all(torch.equal(native_state[k], remote_state[k]) for k in native_state)
    assert max_diff(model.encode_images(PAGES[:4]), remote.encode_images(PAGES[:4])) < 1e-6
    assert max_diff(model.encode_queries(QUERIES[:4]), remote.encode_queries(QUERIES[:4])) < 1e-6


@pytest.mark.parametrize("max_tiles", [1, 4, 12])
def test_tiling_is_bit_identical_to_transformers_gotocr2(tiny_model_dir, max_tiles):
    """processor.tile_page (one resize, a byte -> float table) gives exactly the pixel values of transformers'
    GotOcr2ImageProcessorPil (resize, crop, then float64 rescale and float32 normalise per tile): 1 tile, grids
    with a thumbnail, extreme aspect ratios, a 1x1 page, grey and RGBA inputs, the real 448-px size."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from colintern.backbones.internvl import InternVLProcessor
    from colintern.backbones.processor import check_page_image

    pages = PAGES + [noisy_page(1, 1, (7, 7, 7), 9), noisy_page(2000, 60, (30, 60, 90), 10),
                     noisy_page(330, 700, (120, 40, 10), 11).convert("L"),
                     noisy_page(500, 380, (1, 2, 3), 12).convert("RGBA")]
    tiny = ColIntern.from_pretrained(tiny_model_dir)
    for tile_size in (112, 448):
        config = dataclasses.replace(tiny.config, tile_size=tile_size, max_tiles=max_tiles)
        proc = InternVLProcessor(tiny.processor.tokenizer, config)
        reference = GotOcr2ImageProcessorPil(
            size={"height": tile_size, "width": tile_size}, crop_to_patches=True, min_patches=1,
            max_patches=max_tiles, image_mean=config.image_mean, image_std=config.image_std, do_convert_rgb=True)
        wants = []
        for i, page in enumerate(pages):
            want = reference(page, return_tensors="pt")["pixel_values"]  # (tiles, 3, S, S)
            got = proc.tile_page(check_page_image(page, f"page {i}"))
            assert got.dtype == torch.float32 and torch.equal(got, want), (tile_size, i, page.size)
            assert got.shape[0] == proc.num_tiles(page)
            wants.append(want)
        assert torch.equal(proc.process_images(pages)["pixel_values"], torch.cat(wants))  # the batch path too


def test_embedding_shapes_norms_and_token_counts(model):
    docs = model.encode_images(PAGES)
    proc = model.processor
    # keep_page_tokens="page": the image tokens and everything after them ("</img>" + the rest of the prompt).
    assert model.config.keep_page_tokens == "page"
    after_image = len(model.tokenizer("</img>" + model.config.page_prompt.split("<image>")[1],
                                      add_special_tokens=False)["input_ids"])
    for image, emb in zip(PAGES, docs):
        tiles = proc.num_tiles(image)
        assert emb.shape == (tiles * model.config.image_tokens_per_tile + after_image, 128)
        assert emb.dtype == torch.float32 and emb.device.type == "cpu"
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(emb.shape[0]), atol=1e-5, rtol=0)
    # Tiling: a 100x100 page is one tile (no thumbnail); 1000x1400 (w/h 0.71) takes the closest grid, 1x2, + a thumbnail;
    # a square 448x448 page (4x the 112-px tile area) fills a 2x2 grid + a thumbnail; 120x900 (w/h 0.13) becomes a 1x4 column + a thumbnail.
    assert proc.num_tiles(PAGES[1]) == 1
    assert proc.num_tiles(PAGES[7]) == 3
    assert proc.num_tiles(PAGES[5]) == 5 and proc.num_tiles(PAGES[3]) == 5
    queries = model.encode_queries(QUERIES[:2])
    n_text = len(model.tokenizer("Query: red page", add_special_tokens=False)["input_ids"])
    assert queries[0].shape == (n_text + model.config.n_augmentation, 128)


def test_query_formatting_is_from_the_config(model):
    assert model.processor.format_query("abc") == "Query: abc" + "<|endoftext|>" * 10
    inputs = model.processor.process_queries(["abc", "a much longer query text"])
    # Augmentation tokens are real (attended and kept) even though they equal the pad token.
    assert inputs["keep_mask"][0].sum() == inputs["attention_mask"][0].sum()
    assert inputs["attention_mask"][0].sum() < inputs["attention_mask"].shape[1]


def test_keep_page_token_modes(tiny_model_dir, model):
    m = ColIntern.from_pretrained(tiny_model_dir, max_tiles=4, keep_page_tokens="image")
    docs = m.encode_images(PAGES[:3])
    assert [d.shape[0] for d in docs] == [m.processor.num_tiles(p) * 16 for p in PAGES[:3]]
    everything = ColIntern.from_pretrained(tiny_model_dir, max_tiles=4, keep_page_tokens="all")
    full = everything.encode_images(PAGES[:3])
    page_only = model.encode_images(PAGES[:3])
    n_before = len(m.tokenizer(m.config.page_prompt.split("<image>")[0] + "<img>", add_special_tokens=False)["input_ids"])
    for f, p in zip(full, page_only):
        assert f.shape[0] == p.shape[0] + n_before
        torch.testing.assert_close(f[n_before:], p, atol=1e-6, rtol=0)  # same vectors, prefix dropped
    # The dropped prefix is page-independent: a causal LM's tokens before the image cannot see the page.
    torch.testing.assert_close(full[0][:n_before], full[1][:n_before], atol=1e-5, rtol=0)


def test_checkpoint_round_trip_with_lora_reproduces_embeddings(tiny_model_dir, tmp_path):
    m = ColIntern.from_pretrained(tiny_model_dir, max_tiles=2, dim=64, head_seed=3)
    m.add_lora(r=4, lora_alpha=8, lora_dropout=0.0)
    torch.manual_seed(0)
    perturb_lora(m, 0.05)
    assert not any("lora_" in n for n, _ in m.backbone.vision_tower.named_parameters())
    path = str(tmp_path / "colintern_heads_step1.pt")
    save_checkpoint(path, **m.checkpoint_parts(), training={"step": 1}, metrics={"loss": 0.5})
    payload = load_checkpoint(path)
    assert payload["format_version"] == 2 and payload["config"]["dim"] == 64 and payload["config"]["max_tiles"] == 2
    assert payload["metrics"] == {"loss": 0.5} and payload["lora"]["config"]["r"] == 4
    loaded = ColIntern.from_pretrained(tiny_model_dir, ckpt=path)  # formatting comes from the checkpoint
    assert loaded.config == m.config
    assert max_diff(m.encode_images(PAGES[:3]), loaded.encode_images(PAGES[:3])) == 0.0
    assert max_diff(m.encode_queries(QUERIES[:3]), loaded.encode_queries(QUERIES[:3])) == 0.0


def test_checkpoint_write_is_atomic(tiny_model_dir, tmp_path, monkeypatch):
    m = ColIntern.from_pretrained(tiny_model_dir)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, **m.checkpoint_parts(), metrics={"loss": 1.0})
    before = open(path, "rb").read()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, **m.checkpoint_parts(), metrics={"loss": 2.0})
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp_")] == []
    assert load_checkpoint(path)["metrics"] == {"loss": 1.0}


def test_checkpoint_for_another_base_model_fails_clearly(tiny_model_dir, tmp_path):
    m = ColIntern.from_pretrained(tiny_model_dir)
    config = m.config.to_dict()
    config["signature"] = dict(config["signature"], hidden_size=1024)
    config["base_model"] = "OpenGVLab/InternVL3_5-1B-Instruct"
    path = str(tmp_path / "other.pt")
    save_checkpoint(path, config=ColInternConfig.from_dict(config), head=m.head.state_dict())
    with pytest.raises(UserError, match="trained on base model 'OpenGVLab/InternVL3_5-1B-Instruct'"):
        ColIntern.from_pretrained(tiny_model_dir, ckpt=path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable ColIntern checkpoint"):
        ColIntern.from_pretrained(tiny_model_dir, ckpt=str(garbage))


def test_transparent_pages_are_white_in_the_api_as_in_the_datasets(model, tmp_path):
    """A transparent PNG given to encode_images (eval, the Python API) embeds exactly as the same file read by the
    dataset/JSONL loaders (training, mining): transparent areas are white paper in both, never black."""
    from colintern.data.images import decode_image

    page = noisy_page(224, 300, (200, 30, 30), 13).convert("RGBA")
    alpha = Image.new("L", page.size, 255)
    alpha.paste(0, (0, 0, 224, 150))  # the top half fully transparent
    page.putalpha(alpha)
    path = tmp_path / "transparent.png"
    page.save(path)
    from_file = decode_image(str(path), "transparent.png")
    assert from_file.getpixel((10, 10)) == (255, 255, 255)
    api, loaded = model.encode_images([Image.open(path)]), model.encode_images([from_file])
    assert torch.equal(api[0], loaded[0])


def test_bad_inputs_give_one_clear_line(model, tmp_path):
    with pytest.raises(UserError, match=r"^image 1: empty image: 0x0 pixels; crop or split it into pages, or drop it$"):
        model.encode_images([PAGES[0], Image.new("RGB", (0, 0))])
    with pytest.raises(UserError, match=r"^image 0: extreme aspect ratio: 20000x50 pixels \(400:1, limit 50:1\); crop"):
        model.encode_images([Image.new("RGB", (20000, 50))])
    with pytest.raises(UserError, match=r"query 1: empty query"):
        model.encode_queries(["fine", "   "])
    with pytest.raises(UserError, match=r"does not exist"):
        ColIntern.from_pretrained(str(tmp_path / "no_such_model"))
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UserError, match=r"model_type 'bert'"):
        ColIntern.from_pretrained(str(tmp_path / "weird"))
    with pytest.raises(UserError, match=r"hub is unreachable"):
        ColIntern.from_pretrained("OpenGVLab/InternVL3_5-1B-Instruct-not-cached")


def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "colintern.testing.tiny", str(tmp_path / "t"), "--layout", "nope"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_imports_and_encodes_without_torchvision(tiny_model_dir):
    """torchvision is never required: block its import and run the docs/CONTRACT.md §4 snippet."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torchvision"] = None  # any 'import torchvision' now raises ImportError
        from PIL import Image
        from colintern import ColIntern
        from colintern.retriever.scoring import maxsim
        m = ColIntern.from_pretrained({tiny_model_dir!r}, device="cpu")
        docs = m.encode_images([Image.new("RGB", (300, 400), "red"), Image.new("RGB", (64, 64), "blue")], batch_size=8)
        qs = m.encode_queries(["red page", "blue page"], batch_size=32)
        S = maxsim(qs, docs)
        assert S.shape == (2, 2) and S.dtype.is_floating_point
        assert "torchvision" not in [k for k, v in sys.modules.items() if v is not None]
        print("OK", tuple(S.shape))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK (2, 2)" in proc.stdout


def test_a_checkpoint_on_other_weights_of_the_same_architecture_is_refused(tiny_model_dir, tmp_path, caplog):
    """The checkpoint records a fingerprint of its base weight files: a copy of the same model loads, a model of the
    same architecture with other weights (another seed) is refused in one line unless allow_other_base."""
    import shutil

    from colintern.backbones.internvl import build_tiny_internvl

    m = ColIntern.from_pretrained(tiny_model_dir, max_tiles=2)
    assert len(m.config.base_weights) == 16
    path = str(tmp_path / "ckpt.pt")
    parts = m.checkpoint_parts()
    save_checkpoint(path, config=parts["config"], head=parts["head"])
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert ColIntern.from_pretrained(str(copy), ckpt=path).config.base_weights == m.config.base_weights
    other = build_tiny_internvl(str(tmp_path / "seed1"), seed=1)
    with pytest.raises(UserError, match=rf"^{path} was trained on base model '{tiny_model_dir}' \(weights "
                                        rf"{m.config.base_weights}\), and the model being loaded has the same "
                                        r"architecture but other weights \([0-9a-f]{16}\); pass the base model it "
                                        r"was trained on, or --allow_other_base to use it anyway$"):
        ColIntern.from_pretrained(other, ckpt=path)
    loaded = ColIntern.from_pretrained(other, ckpt=path, allow_other_base=True)
    assert "--allow_other_base: using it anyway" in caplog.text
    assert loaded.config.base_weights != m.config.base_weights  # now describes the weights in use


class _Payload:
    """Not a tensor or plain value: unpickling it would call os.system (it never runs: weights_only refuses)."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_unsafe_pickles_are_refused_without_advising_weights_only_false(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "config": {}, "x": _Payload()}, path)
    with pytest.raises(UserError) as err:
        load_checkpoint(str(path))
    message = str(err.value)
    assert message == (f"{path}: refusing to load: it holds Python objects other than tensors and plain values, "
                       "which could run code when unpickled (ColIntern checkpoints never do); use a checkpoint "
                       "written by train.py")
    assert "weights_only" not in message and not (tmp_path / "PWNED").exists()


def test_checkpoints_are_written_with_the_umask_like_logs(tiny_model_dir, tmp_path):
    m = ColIntern.from_pretrained(tiny_model_dir, max_tiles=2)
    old = os.umask(0o022)
    try:
        save_checkpoint(str(tmp_path / "a.pt"), config=m.config, head=m.head.state_dict())
        os.umask(0o077)
        save_checkpoint(str(tmp_path / "b.pt"), config=m.config, head=m.head.state_dict())
    finally:
        os.umask(old)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.pt").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]  # no temp file left
