"""Qwen3-VL backbone (the ColQwen3 recipe): tiny model, processor, batch independence, LoRA, training
signal, checkpoints, cross-backbone mismatch."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from colintern import ColIntern, UserError
from colintern.retriever.checkpoint import load_checkpoint, save_checkpoint
from colintern.train.losses import late_interaction_loss
from helpers import noisy_page, load_script, max_diff

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 64  # small cap so the tiny model runs fast; the default (768) is checked on a huge page




PAGES = [noisy_page(224, 300, (255, 0, 0), 1), noisy_page(100, 100, (0, 0, 255), 2), noisy_page(600, 200, (0, 255, 0), 3),
         noisy_page(50, 60, (0, 0, 0), 4), noisy_page(3000, 4000, (255, 255, 255), 5), noisy_page(120, 900, (200, 200, 0), 6)]
# Visual tokens after the 2x2 merge (32x32 px each), by smart_resize with min 4 and max 64 tokens:
# 224x300 -> 224x288 (7x9); 100x100 -> 96x96 (3x3); 600x200 -> shrunk to 416x128 (13x4); 50x60 -> 64x64
# (2x2); 3000x4000 -> shrunk to 192x288 (6x9); 120x900 -> 128x896 (4x28 = 112) shrunk to 64x672 (2x21).
GOLDEN_TOKENS = [7 * 9, 3 * 3, 13 * 4, 2 * 2, 6 * 9, 2 * 21]
QUERIES = ["red page", "a blue square with the word delta", "which page shows a green triangle?", "x",
           "chart of revenue", "gamma"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_qwen_dir):
    # min_visual_tokens 4 (Qwen3-VL's is 64, the tiny model's default too): small pages keep the small grids these
    # tests count; the real minimum is checked in test_config_records_the_colqwen3_formatting
    return ColIntern.from_pretrained(tiny_qwen_dir, max_visual_tokens=MAX_TOKENS, min_visual_tokens=4)



def test_tiny_model_folder_is_a_seeded_qwen3_vl(tiny_qwen_dir, tmp_path):
    from safetensors.torch import load_file

    from colintern.backbones.qwen3vl import build_tiny_qwen3vl

    cfg = json.load(open(os.path.join(tiny_qwen_dir, "config.json")))
    assert cfg["model_type"] == "qwen3_vl" and cfg["architectures"] == ["Qwen3VLForConditionalGeneration"]
    vision, text = cfg["vision_config"], cfg["text_config"]
    assert (vision["depth"], vision["patch_size"], vision["spatial_merge_size"]) == (2, 16, 2)
    assert all(0 <= i < vision["depth"] for i in vision["deepstack_visual_indexes"])
    assert (text["num_hidden_layers"], text["hidden_size"]) == (2, 128)
    pre = json.load(open(os.path.join(tiny_qwen_dir, "preprocessor_config.json")))
    assert pre["patch_size"] == 16 and pre["merge_size"] == 2
    again = build_tiny_qwen3vl(str(tmp_path / "again"), seed=0)
    a, b = load_file(os.path.join(tiny_qwen_dir, "model.safetensors")), load_file(os.path.join(again, "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    other = load_file(os.path.join(build_tiny_qwen3vl(str(tmp_path / "seed1"), seed=1), "model.safetensors"))
    assert not torch.equal(a["model.visual.patch_embed.proj.weight"], other["model.visual.patch_embed.proj.weight"])


def test_config_records_the_colqwen3_formatting(tiny_qwen_dir):
    model = ColIntern.from_pretrained(tiny_qwen_dir, max_visual_tokens=MAX_TOKENS)
    cfg = model.config
    assert cfg.backbone == "qwen3_vl" and cfg.source_layout == "native" and cfg.hidden_size == 128
    assert cfg.page_prompt == "<|im_start|>user\n<image>Describe the image.<|im_end|><|endoftext|>"
    assert (cfg.image_start_token, cfg.image_token, cfg.image_end_token) == \
        ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
    assert cfg.image_mean == [0.5, 0.5, 0.5] and cfg.image_std == [0.5, 0.5, 0.5]
    assert cfg.max_visual_tokens == MAX_TOKENS and cfg.min_visual_tokens == 64  # Qwen3-VL's: 64 x 32 x 32 px
    assert (cfg.query_prefix, cfg.augmentation_token, cfg.n_augmentation) == ("Query: ", "<|endoftext|>", 10)
    assert model.signature["patch_size"] == 16 and model.signature["spatial_merge_size"] == 2
    assert model.processor.format_query("abc") == "Query: abc" + "<|endoftext|>" * 10


def test_page_inputs_follow_the_prompt_and_the_token_cap(model):
    proc, tok = model.processor, model.tokenizer
    assert [proc.page_cost(p) for p in PAGES] == GOLDEN_TOKENS
    inputs = proc.process_images(PAGES[:3])
    assert inputs["image_grid_thw"].tolist() == [[1, 18, 14], [1, 6, 6], [1, 8, 26]]  # 16-px patches
    assert inputs["pixel_values"].shape == (18 * 14 + 6 * 6 + 8 * 26, 3 * 2 * 16 * 16)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert torch.equal(inputs["mm_token_type_ids"], (ids == tok.convert_tokens_to_ids("<|image_pad|>")).long())
    assert inputs["mm_token_type_ids"].sum(1).tolist() == GOLDEN_TOKENS[:3]
    # right padding: every row starts with its prompt, padding only at the end
    assert all(mask[i, : mask[i].sum()].all() and not mask[i, mask[i].sum():].any() for i in range(3))
    text = tok.decode(ids[1, : mask[1].sum()])
    assert text == ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 9 +
                    "<|vision_end|>Describe the image.<|im_end|><|endoftext|>")
    # keep_page_tokens="page": real tokens from the first <|image_pad|> on (the prefix cannot see the page)
    is_image = ids == tok.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(inputs["keep_mask"], mask.bool() & (is_image.cumsum(1) > 0))


def test_embeddings_shapes_norms_and_finite(model):
    docs = model.encode_images(PAGES)
    # keep_page_tokens="page": the image tokens, <|vision_end|> and the rest of the prompt after the image
    n_after = len(model.tokenizer("<|vision_end|>" + model.config.page_prompt.split("<image>")[1],
                                  add_special_tokens=False)["input_ids"])
    assert [d.shape for d in docs] == [(n + n_after, 128) for n in GOLDEN_TOKENS]
    for emb in docs:
        assert emb.dtype == torch.float32 and torch.isfinite(emb).all()
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(emb.shape[0]), atol=1e-5, rtol=0)
    assert (docs[0][-5:] - docs[1][-5:]).abs().max() > 1e-3  # the image reaches the trailing prompt tokens
    qs = model.encode_queries(QUERIES)
    n_text = len(model.tokenizer("Query: red page", add_special_tokens=False)["input_ids"])
    assert qs[0].shape == (n_text + 10, 128)
    assert all(torch.isfinite(q).all() for q in qs)
    torch.testing.assert_close(qs[1].norm(dim=-1), torch.ones(qs[1].shape[0]), atol=1e-5, rtol=0)


def test_visual_tokens_never_exceed_the_cap(tiny_qwen_dir, model):
    huge = Image.new("RGB", (6000, 8000), (240, 240, 240))
    default = ColIntern.from_pretrained(tiny_qwen_dir)  # the ColQwen3 default, 768 visual tokens
    assert default.config.max_visual_tokens == 768
    inputs = default.processor.process_images([huge])
    n_image = int(inputs["mm_token_type_ids"].sum())
    assert n_image == default.processor.page_cost(huge) == 24 * 32 == 768  # 768x1024 px: exactly the cap
    assert default.processor.worst_case_page().size == (24 * 32, 32 * 32)  # for memory probes: the cap exactly
    assert model.processor.worst_case_page().size == (8 * 32, 8 * 32)
    assert model.processor.page_cost(model.processor.worst_case_page()) == MAX_TOKENS
    # A 50:1 strip under a 16-token cap: smart_resize alone would keep 1 x 28 tokens; the cap wins.
    strip = noisy_page(5000, 100, (0, 0, 0), 9)
    capped = ColIntern.from_pretrained(tiny_qwen_dir, max_visual_tokens=16, min_visual_tokens=4)  # below Qwen's 64
    assert capped.processor.page_cost(strip) == 16
    inputs = capped.processor.process_images([strip])
    assert int(inputs["mm_token_type_ids"].sum()) == 16 and inputs["image_grid_thw"].tolist() == [[1, 2, 32]]
    n_after = len(capped.tokenizer("<|vision_end|>" + capped.config.page_prompt.split("<image>")[1],
                                   add_special_tokens=False)["input_ids"])
    assert capped.encode_images([strip])[0].shape[0] == int(inputs["keep_mask"].sum()) == 16 + n_after


def test_lora_only_on_the_language_model(tiny_qwen_dir):
    m = ColIntern.from_pretrained(tiny_qwen_dir, max_visual_tokens=MAX_TOKENS)
    m.add_lora(r=4, lora_alpha=8, lora_dropout=0.0)
    lora = {n: p for n, p in m.backbone.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 7 * 2  # 2 layers x (q, k, v, o, gate, up, down) x (A, B)
    assert all(n.startswith("language_model.layers.") and p.dtype == torch.float32 for n, p in lora.items())
    assert not any("lora_" in n for n, _ in m.backbone.visual.named_parameters())
    v = ColIntern.from_pretrained(tiny_qwen_dir, max_visual_tokens=MAX_TOKENS)
    v.add_lora(r=4, lora_alpha=8, lora_dropout=0.0, include_vision=True)
    vision = sorted({n.split(".lora_")[0] for n, _ in v.backbone.visual.named_parameters() if "lora_" in n})
    assert vision == ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.1.attn.proj", "blocks.1.attn.qkv"]


def test_a_few_steps_of_late_interaction_loss_make_it_fall(tiny_qwen_dir):
    """LoRA + head, in-batch CE on 4 synthetic pairs: the loss falls and every query ranks its own page first.

    Only image tokens are kept here: with a causal LM the prompt tokens before the image are identical for every
    page, and on 4 pairs of a random tiny model the optimiser can park all queries on them (loss = log 4).
    """
    from colintern.train.losses import late_interaction_scores

    torch.manual_seed(0)
    m = ColIntern.from_pretrained(tiny_qwen_dir, max_visual_tokens=16, min_visual_tokens=4, keep_page_tokens="image")
    m.add_lora(r=4, lora_alpha=8, lora_dropout=0.0)
    trainable = {n for n, _ in m.named_parameters() if "lora_" in n or n.startswith("head.")}
    for n, p in m.named_parameters():
        p.requires_grad_(n in trainable)
    colours = [(255, 0, 0), (0, 0, 255), (0, 200, 0), (230, 230, 0)]
    pages = [noisy_page(96 + 32 * i, 128, c, i) for i, c in enumerate(colours)]
    queries = ["red page", "blue page", "green page", "yellow page"]
    page_inputs, query_inputs = m.processor.process_images(pages), m.processor.process_queries(queries)
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    m.train()
    losses = []
    for _ in range(8):
        d, d_mask = m(page_inputs)  # (4, Ld, 128), (4, Ld)
        q, q_mask = m(query_inputs)  # (4, Lq, 128), (4, Lq)
        loss = late_interaction_loss(q, q_mask, d, d_mask, kind="ce", temperature=0.05)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] > 2.0 and losses[-1] < 0.1, losses  # log(4) = 1.39 is chance
    assert not any("lora_" in n and p.grad is not None for n, p in m.backbone.visual.named_parameters())
    m.eval()
    with torch.no_grad():
        (d, d_mask), (q, q_mask) = m(page_inputs), m(query_inputs)
        scores = late_interaction_scores(q, q_mask, d, d_mask)  # (4, 4)
    assert scores.argmax(dim=1).tolist() == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def qwen_ckpt(tiny_qwen_dir, tmp_path_factory) -> tuple[ColIntern, str]:
    """A checkpoint with its own cap, dim and head seed, and non-trivial LoRA adapters (LoRA B starts at zero)."""
    m = ColIntern.from_pretrained(tiny_qwen_dir, max_visual_tokens=32, min_visual_tokens=4, dim=64, head_seed=5)
    m.add_lora(r=4, lora_alpha=8, lora_dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.backbone.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    path = str(tmp_path_factory.mktemp("qwen_ckpt") / "colintern_heads_step1.pt")
    save_checkpoint(path, **m.checkpoint_parts(), training={"step": 1}, metrics={"loss": 0.5})
    return m, path


def test_checkpoint_round_trip_reproduces_embeddings_exactly(tiny_qwen_dir, qwen_ckpt):
    m, path = qwen_ckpt
    payload = load_checkpoint(path)
    assert payload["config"]["backbone"] == "qwen3_vl" and payload["config"]["max_visual_tokens"] == 32
    assert payload["lora"]["config"]["r"] == 4 and len(payload["lora"]["state"]) == 28
    loaded = ColIntern.from_pretrained(tiny_qwen_dir, ckpt=path)  # cap, dim, prompt come from the checkpoint
    assert loaded.config == m.config and loaded.processor.max_pixels == 32 * 32 * 32
    assert max_diff(m.encode_images(PAGES[:4]), loaded.encode_images(PAGES[:4])) == 0.0
    assert max_diff(m.encode_queries(QUERIES[:3]), loaded.encode_queries(QUERIES[:3])) == 0.0


def test_checkpoint_of_the_other_backbone_fails_clearly(tiny_qwen_dir, tiny_model_dir, tmp_path):
    qwen = ColIntern.from_pretrained(tiny_qwen_dir)
    intern = ColIntern.from_pretrained(tiny_model_dir)
    assert qwen.config.hidden_size == intern.config.hidden_size == 128  # same dims: only the signature differs
    q_path, i_path = str(tmp_path / "qwen.pt"), str(tmp_path / "intern.pt")
    save_checkpoint(q_path, **qwen.checkpoint_parts())
    save_checkpoint(i_path, **intern.checkpoint_parts())
    with pytest.raises(UserError, match=r"trained on base model .*model_type: checkpoint 'internvl' vs model 'qwen3_vl'"):
        ColIntern.from_pretrained(tiny_qwen_dir, ckpt=i_path)
    with pytest.raises(UserError, match=r"trained on base model .*model_type: checkpoint 'qwen3_vl' vs model 'internvl'"):
        ColIntern.from_pretrained(tiny_model_dir, ckpt=q_path)


# ------------------------------------------------------------------------------------------ scripts, end to end



def ndcg(qrels: dict, run: dict, k: int) -> float:
    """Independent float64 nDCG@k (gain = relevance, log2 discount, ties by id descending as trec_eval)."""
    values = []
    for qid, rels in qrels.items():
        ranked = sorted(run[qid].items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:k]
        dcg = sum(rels.get(doc, 0) / math.log2(i + 2) for i, (doc, _) in enumerate(ranked))
        ideal = sorted(rels.values(), reverse=True)[:k]
        values.append(dcg / sum(r / math.log2(i + 2) for i, r in enumerate(ideal)))
    return sum(values) / len(values)


def test_eval_script_on_a_qwen3_vl_checkpoint(tiny_qwen_dir, qwen_ckpt, tmp_path):
    """eval.py --ckpt (base model from the checkpoint) on a local BEIR set: its run scores are this model's MaxSim,
    its nDCG is the run's."""
    from colintern.retriever.scoring import maxsim

    _, ckpt = qwen_ckpt
    root = tmp_path / "qset"
    (root / "images").mkdir(parents=True)
    for i, p in enumerate(PAGES[:5]):
        p.save(root / "images" / f"p{i}.png")
    queries = {f"q{i}": QUERIES[i] for i in range(4)}
    qrels = {"q0": {"p0": 1}, "q1": {"p1": 1, "p4": 2}, "q2": {"p2": 1}, "q3": {"p3": 1}}
    (root / "corpus.jsonl").write_text("".join(json.dumps({"corpus-id": f"p{i}", "image": f"images/p{i}.png"}) + "\n"
                                              for i in range(5)))
    (root / "queries.jsonl").write_text("".join(json.dumps({"query-id": q, "query": t}) + "\n"
                                               for q, t in queries.items()))
    (root / "qrels.jsonl").write_text("".join(json.dumps({"query-id": q, "corpus-id": c, "score": r}) + "\n"
                                             for q, rels in qrels.items() for c, r in rels.items()))
    ev = load_script("eval")
    assert ev.main(["--ckpt", ckpt, "--local_dataset", str(root), "--out_dir", str(tmp_path / "out"),
                    "--run_name", "qwen", "--save_run", "--batch_size", "2", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "out" / "qwen" / "summary.json").read_text())
    assert summary["model"] == tiny_qwen_dir and summary["ckpt"] == ckpt
    run = json.loads((tmp_path / "out" / "qwen" / "runs" / "qset.json").read_text())
    model = ColIntern.from_pretrained(tiny_qwen_dir, ckpt=ckpt)
    pages = [Image.open(root / "images" / f"p{i}.png").convert("RGB") for i in range(5)]
    direct = maxsim(model.encode_queries(list(queries.values())), model.encode_images(pages), device="cpu")
    for i, qid in enumerate(queries):
        for j in range(5):
            assert run[qid][f"p{j}"] == pytest.approx(float(direct[i, j]), abs=2e-5)
    for k in (5, 10):
        assert summary["tasks"]["qset"][f"ndcg_at_{k}"] == pytest.approx(ndcg(qrels, run, k), abs=1e-6)


def test_mine_script_on_qwen3_vl(tiny_qwen_dir, synthetic_tiny_dir, qwen_ckpt, tmp_path):
    """mine.py --method exact with a Qwen3-VL checkpoint (LoRA, 32-token cap, dim 64): every line's positive and
    negative scores are this model's MaxSim (pages stored in fp16), and its negatives are the best other pages."""
    from colintern.data.images import decode_image
    from colintern.data.datasets import load_page_dataset, parse_pseudo_path
    from colintern.retriever.scoring import maxsim

    _, ckpt = qwen_ckpt
    out = tmp_path / "mined.jsonl"
    mine = load_script("mine")
    assert mine.main(["--model_id", tiny_qwen_dir, "--ckpt", ckpt, "--hub_name",
                      os.path.join(synthetic_tiny_dir, "train"), "--method", "exact", "--k", "2", "--fn_filter", "0",
                      "--out_jsonl", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    data = load_page_dataset(os.path.join(synthetic_tiny_dir, "train"))
    assert len(rows) == len(data) == 24
    model = ColIntern.from_pretrained(tiny_qwen_dir, ckpt=ckpt)
    pages, index = [], {}
    for i, row in enumerate(data):
        if row["image_filename"] not in index:
            index[row["image_filename"]] = len(pages)
            pages.append(decode_image(row["image"], f"row {i}"))
    scores = maxsim(model.encode_queries([r["query"] for r in rows]), model.encode_images(pages), device="cpu")
    assert len(pages) == 8

    def page_of(path: str) -> int:
        _, _, row = parse_pseudo_path(path)
        return index[data[row]["image_filename"]]

    for i, (row, line) in enumerate(zip(data, rows)):
        pos, negs = index[row["image_filename"]], [page_of(p) for p in line["negs"]]
        assert line["query"] == row["query"] and page_of(line["pos"]) == pos
        assert len(negs) == 2 and pos not in negs
        assert line["scores"]["pos"] == pytest.approx(float(scores[i, pos]), rel=2e-3, abs=2e-3)
        assert line["scores"]["negs"] == pytest.approx([float(scores[i, j]) for j in negs], rel=2e-3, abs=2e-3)
        rest = [float(scores[i, j]) for j in range(8) if j != pos and j not in negs]
        assert min(line["scores"]["negs"]) >= max(rest) - 2e-3  # the hardest other pages were taken


@pytest.fixture(scope="module")
def trained(tiny_qwen_dir, synthetic_tiny_dir, tmp_path_factory) -> Path:
    """train.py --lora, 2 steps of 4 pairs (pairwise loss) on the tiny Qwen3-VL, a checkpoint after each step."""
    out = tmp_path_factory.mktemp("qwen_train")
    train = load_script("train")
    assert train.main(["--model_id", tiny_qwen_dir, "--train_hub", os.path.join(synthetic_tiny_dir, "train"),
                       "--batch_size", "4", "--max_steps", "2", "--lr", "1e-3", "--lora", "--lora_r", "4",
                       "--lora_alpha", "8", "--loss", "pairwise", "--tau", "0.02", "--save_every", "1",
                       "--device_map", "cpu", "--out_dir", str(out)]) == 0
    return out


def test_train_script_on_qwen3_vl(tiny_qwen_dir, synthetic_tiny_dir, trained):
    """Step 1's logged loss is the pairwise loss of the untrained model (LoRA B = 0) on the plan's first 4 pairs,
    recomputed here; checkpoints carry the Qwen3-VL config and LoRA on the language model only, and reload."""
    from colintern.data.images import decode_image
    from colintern.data.datasets import load_page_dataset
    from colintern.train.examples import make_plan

    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(math.isfinite(m["loss"]) for m in lines)
    data = load_page_dataset(os.path.join(synthetic_tiny_dir, "train"))
    rows = make_plan(len(data), 0, 1, 4, 1, 1).micro[0]  # seed 0, epoch 1, batch 4, 1 process, no accumulation
    m = ColIntern.from_pretrained(tiny_qwen_dir)
    with torch.no_grad():
        q, q_mask = m(m.processor.process_queries([data[i]["query"] for i in rows]))
        d, d_mask = m(m.processor.process_images([decode_image(data[i]["image"], f"row {i}") for i in rows]))
    names = [data[i]["image_filename"] for i in rows]
    exclude = torch.tensor([[a == b and r != c for c, b in enumerate(names)] for r, a in enumerate(names)])
    expected = late_interaction_loss(q, q_mask, d, d_mask, kind="pairwise", temperature=0.02, exclude=exclude)
    assert lines[0]["loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)

    payload = load_checkpoint(str(trained / "colintern_heads_step2.pt"))
    config = payload["config"]
    assert config["backbone"] == "qwen3_vl" and config["base_model"] == tiny_qwen_dir
    assert config["page_prompt"] == m.config.page_prompt and config["max_visual_tokens"] == 768
    lora = payload["lora"]["state"]
    assert len(lora) == 28 and all(k.startswith("language_model.") for k in lora)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at zero: it was trained
    assert not torch.equal(m.head.weight, payload["head"]["weight"])
    loaded = ColIntern.from_pretrained(tiny_qwen_dir, ckpt=str(trained / "colintern_heads_step2.pt"))
    assert torch.equal(loaded.head.weight, payload["head"]["weight"])
    assert loaded.encode_queries(["red page"])[0].shape[1] == 128
