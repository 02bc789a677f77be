"""search.py export_model writes a sentence-transformers 6 folder: loaded by sentence-transformers in a process where
colintern cannot be imported (tests/st_encode.py), it gives ColIntern's query and page embeddings and MaxSim scores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from colintern import ColIntern
from colintern.retriever.checkpoint import save_checkpoint
from colintern.retriever.scoring import maxsim
from helpers import REPO, noisy_page, perturb_lora
from helpers import search_run as run

pytestmark = pytest.mark.usefixtures("one_thread")

QUERIES = ["a red page with the word alpha", "where is the quarterly table?"]
PAGE_SIZES = [(300, 420), (640, 200), (150, 150)]  # tall (InternVL: 2 tiles + thumbnail), wide, small


def export(tmp_path, capsys, folder: str, **settings) -> tuple[object, str]:
    """A LoRA checkpoint (adapters in the LM and the vision tower, perturbed so they matter) exported by the CLI;
    returns (the checkpoint's ColIntern, the export folder)."""
    torch.manual_seed(0)
    model = ColIntern.from_pretrained(folder, max_tiles=2, max_visual_tokens=64, dim=16, **settings)
    model.add_lora(r=4, lora_alpha=8, lora_dropout=0.0, include_vision=True)
    perturb_lora(model, 0.05)
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(str(ckpt), **model.checkpoint_parts())
    out = tmp_path / "exported"
    code, _, err = run(capsys, "export_model", "--ckpt", ckpt, "--model_id", folder, "--out", out,
                       "--repo_id", "me/tiny")
    assert code == 0, err
    return ColIntern.from_pretrained(folder, ckpt=str(ckpt)), str(out)


def st_encode(tmp_path, folder: str) -> dict[str, np.ndarray]:
    """sentence-transformers' embeddings and scores of QUERIES and the pages, from a process without colintern."""
    pages = tmp_path / "pages"
    pages.mkdir()
    for i, (w, h) in enumerate(PAGE_SIZES):
        noisy_page(w, h, (40 + 70 * i, 200 - 60 * i, 90), seed=i).save(pages / f"p{i}.png")
    (tmp_path / "queries.json").write_text(json.dumps(QUERIES))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, str(REPO / "tests" / "st_encode.py"), folder, str(tmp_path / "queries.json"),
                           str(pages), str(tmp_path / "st.npz")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(tmp_path / "st.npz"))


def page_images():
    return [noisy_page(w, h, (40 + 70 * i, 200 - 60 * i, 90), seed=i) for i, (w, h) in enumerate(PAGE_SIZES)]


def test_sentence_transformers_gives_colinterns_embeddings(tiny_backbone, tmp_path, capsys):
    """Queries on every backbone: equal within 1e-5. Pages: Qwen2.5-VL's and Qwen3-VL's equal within 1e-5 (their page
    prompt has no token before the image that also occurs after it). sentence-transformers' mask drops token ids,
    so a prompt token before the image whose id recurs after it is scored too: InternVL's "\\n" before the image,
    SmolVLM's "s", ":" and the first tile's <fake_token_around_image>. Those rows come first and are the same on every
    page; the other rows are ColIntern's within 1e-5. Scores: MaxSim over those."""
    name, folder = tiny_backbone
    original, out = export(tmp_path, capsys, folder)
    st = st_encode(tmp_path, out)
    queries = original.encode_queries(QUERIES)
    pages = original.encode_images(page_images())
    for i, q in enumerate(queries):
        assert st[f"query_{i}"].shape == tuple(q.shape)
        assert np.abs(st[f"query_{i}"] - q.numpy()).max() < 1e-5
    mask = json.loads(open(os.path.join(out, "2_MultiVectorMask", "config.json")).read())
    skipped = set(original.tokenizer.convert_tokens_to_ids(mask["skiplist_words"]))
    if name == "internvl":
        assert mask["skiplist_words"][0] == "<|im_start|>" and mask["skiplist_words"][-1] == "<img>"
    elif name == "smolvlm":  # "<|im_start|>User:" and the first tile's markup, less the tokens that recur after it
        assert mask["skiplist_words"][0] == "<|im_start|>" and mask["skiplist_words"][-1] == "<row_1_col_1>"
    else:
        assert mask["skiplist_words"] == ["<|im_start|>", "u", "s", "er", "Ċ", "<|vision_start|>"]
    for i, (image, p) in enumerate(zip(page_images(), pages)):
        inputs = original.processor.process_images([image])
        prefix = inputs["input_ids"][0][inputs["attention_mask"][0].bool() & ~inputs["keep_mask"][0]].tolist()
        extra = sum(1 for token in prefix if token not in skipped)  # prompt tokens whose id recurs after the image
        assert extra == {"internvl": 1, "smolvlm": 3}.get(name, 0)
        assert st[f"page_{i}"].shape == (p.shape[0] + extra, p.shape[1])
        assert np.abs(st[f"page_{i}"][extra:] - p.numpy()).max() < 1e-5
        if extra:  # the same vectors on every page
            assert np.abs(st[f"page_{i}"][:extra] - st["page_0"][:extra]).max() < 1e-6
    st_pages = [torch.from_numpy(st[f"page_{i}"]) for i in range(len(pages))]
    assert np.abs(st["scores"] - maxsim(queries, st_pages).numpy()).max() < 1e-4
    if name == "qwen3_vl":
        assert np.abs(st["scores"] - maxsim(queries, pages).numpy()).max() < 1e-4
    # the folder is transformers' own: a class transformers knows, its processor, the chat template
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["architectures"] == [{"internvl": "InternVLModel", "qwen3_vl": "Qwen3VLModel",
                                        "qwen2_5_vl": "Qwen2_5_VLModel", "smolvlm": "Idefics3Model"}[name]]
    modules = json.loads(open(os.path.join(out, "modules.json")).read())
    assert [m["path"] for m in modules] == ["", "1_Dense", "2_MultiVectorMask", "3_Normalize"]
    card = open(os.path.join(out, "README.md")).read()
    assert "model = MultiVectorEncoder('me/tiny')" in card
    assert ("also scores the page prompt's ['Ċ']" in card) == (name == "internvl")
    assert ("also scores the page prompt's" in card) == (name in ("internvl", "smolvlm"))


def test_single_vector_last_token_model_loads_as_a_sentence_transformer(tiny_qwen_dir, tmp_path, capsys):
    """A single-vector model with last-token pooling: a dense SentenceTransformer giving ColIntern's vectors."""
    original, out = export(tmp_path, capsys, tiny_qwen_dir, embedding="single", pooling="last")
    st = st_encode(tmp_path, out)
    queries = original.encode_queries(QUERIES)
    pages = original.encode_images(page_images())
    assert max(np.abs(st[f"query_{i}"] - q.numpy()).max() for i, q in enumerate(queries)) < 1e-5
    assert max(np.abs(st[f"page_{i}"] - p.numpy()).max() for i, p in enumerate(pages)) < 1e-5
    cosine = torch.cat(queries) @ torch.cat(pages).T  # (Q, P) unit vectors
    assert np.abs(st["scores"] - cosine.numpy()).max() < 1e-5
    modules = json.loads(open(os.path.join(out, "modules.json")).read())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Dense", "3_Normalize"]


def test_mean_pooled_single_vector_export_says_it_has_no_sentence_transformers_layout(tiny_model_dir, tmp_path,
                                                                                      capsys, caplog):
    _, out = export(tmp_path, capsys, tiny_model_dir, embedding="single", pooling="mean")
    assert not os.path.exists(os.path.join(out, "modules.json"))
    assert "sentence-transformers cannot load this model: its mean pooling leaves the query prefix out" in \
        open(os.path.join(out, "README.md")).read()
    assert ColIntern.from_pretrained(out).config.pooling == "mean"  # ColIntern still loads it
