"""The backbone-family contract, once per family (`tiny_backbone` is parametrised over every registered family):
the registry, the embedding seam, batch independence, token boxes for similarity maps, the memory-probe page,
LoRA on language model and vision tower, and checkpoint round trips. A new family adds one fixture parameter."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from colintern import ColIntern, UserError
from colintern.backbones.base import BackboneFamily, read_model_config
from colintern.retriever.checkpoint import load_checkpoint, save_checkpoint
from colintern.backbones.registry import BY_MODEL_TYPE, FAMILIES, get_family
from colintern.backbones.processor import PageProcessor
from helpers import max_diff, noisy_page

PAGES = [noisy_page(224, 300, (255, 0, 0), 1), noisy_page(100, 100, (0, 0, 255), 2),
         noisy_page(600, 200, (0, 255, 0), 3), noisy_page(120, 900, (200, 200, 0), 6)]
QUERIES = ["red page", "a blue square with the word delta", "which page shows a green triangle?", "x"]
# Small page caps keep the tiny models fast; each family reads only its own field.
CAPS = {"max_tiles": 4, "max_visual_tokens": 64}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def family_model(tiny_backbone) -> tuple[str, str, ColIntern]:
    name, folder = tiny_backbone
    return name, folder, ColIntern.from_pretrained(folder, **CAPS)


def test_registry_finds_the_family_by_model_type_and_by_name(family_model):
    name, folder, model = family_model
    family = BY_MODEL_TYPE[read_model_config(folder)["model_type"]]
    assert family is get_family(name) is FAMILIES[name] is model.family
    assert isinstance(family, BackboneFamily) and family.name == model.config.backbone == name
    assert isinstance(model.processor, PageProcessor)
    assert family.causal  # both families' LMs are causal: keep_page_tokens="page" drops the page-blind prefix
    with pytest.raises(UserError, match=r"unknown backbone family 'nope'"):
        get_family("nope")


def test_embed_is_head_then_l2_then_mask_against_float64(family_model):
    """The one embedding seam, checked against a float64 reference of head -> normalise -> zero where not kept."""
    _, _, model = family_model
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, model.config.hidden_size, generator=g)  # (B, L, H)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]], dtype=torch.bool)
    emb, mask = model.embed(hidden, keep)
    w, b = model.head.weight.double(), model.head.bias.double()
    ref = hidden.double() @ w.T + b  # (B, L, dim)
    ref = ref / ref.norm(dim=-1, keepdim=True) * keep.unsqueeze(-1)
    assert emb.shape == (3, 5, model.config.dim) and emb.dtype == torch.float32
    assert torch.equal(mask, keep)
    assert (emb.double() - ref).abs().max().item() < 1e-6
    assert torch.equal(emb[~keep], torch.zeros_like(emb[~keep]))


def test_embeddings_count_page_tokens_and_are_unit_vectors(family_model):
    """A page keeps its tokens from the first image token to its last real token (keep_page_tokens "page"), of
    which page_cost are image tokens; every vector has unit norm."""
    _, _, model = family_model
    docs = model.encode_images(PAGES)
    for page, emb in zip(PAGES, docs):
        inputs = model.processor.process_images([page])
        ids, real = inputs["input_ids"][0], inputs["attention_mask"][0].bool()
        is_image = ids == model.processor.image_token_id
        first = int(is_image.nonzero()[0])
        assert int(is_image.sum()) == model.processor.page_cost(page)
        assert emb.shape == (int(real[first:].sum()), model.config.dim)
    for emb in docs + model.encode_queries(QUERIES):
        assert emb.dtype == torch.float32 and torch.isfinite(emb).all()
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(emb.shape[0]), atol=1e-5, rtol=0)


def test_item_embedding_is_the_same_alone_and_in_a_mixed_batch(family_model):
    """Right padding (and, for Qwen3-VL, M-RoPE positions from the attention mask): an item ignores its batch."""
    _, _, model = family_model
    batched = model.encode_images(PAGES, batch_size=len(PAGES))
    alone = [model.encode_images([p], batch_size=1)[0] for p in PAGES]
    assert max_diff(batched, alone) < 1e-4
    batched_q = model.encode_queries(QUERIES, batch_size=len(QUERIES))
    alone_q = [model.encode_queries([q], batch_size=1)[0] for q in QUERIES]
    assert max_diff(batched_q, alone_q) < 1e-4


def test_image_token_boxes_tile_the_page(family_model):
    """One box per image token, in [0, 1]; the boxes of one view cover the page exactly once (InternVL adds a
    thumbnail view on multi-tile pages, SmolVLM a global image), so the areas sum to the number of views."""
    name, _, model = family_model
    proc = model.processor
    for page in PAGES:
        boxes = proc.image_token_boxes(page)  # (n, 4)
        ids = proc.process_images([page])["input_ids"][0]
        assert boxes.shape == (int((ids == proc.image_token_id).sum()), 4) == (proc.page_cost(page), 4)
        assert boxes.min() >= 0 and boxes.max() <= 1 and (boxes[:, 2] > boxes[:, 0]).all()
        views = 1 + ((name == "internvl" and proc.num_tiles(page) > 1) or (name == "smolvlm" and proc.grid(page)[0] > 0))
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
        assert area == pytest.approx(views, abs=1e-9)
    if name == "smolvlm":  # 2 x 2 tiles of 4x4 tokens, then the global image: token 5 is row 1, col 1 of tile 1
        boxes = proc.image_token_boxes(noisy_page(100, 100, (9, 9, 9), 0))
        assert proc.grid(noisy_page(100, 100, (9, 9, 9), 0)) == (2, 2) and boxes.shape == (80, 4)
        np.testing.assert_allclose(boxes[5], [0.125, 0.125, 0.25, 0.25])
        np.testing.assert_allclose(boxes[16], [0.5, 0.0, 0.625, 0.125])  # first token of the top right tile
        np.testing.assert_allclose(boxes[64], [0.0, 0.0, 0.25, 0.25])  # first global-image token
    if name == "internvl":  # a 1x2 grid (+ thumbnail) of 4x4-token tiles: token 5 is row 1, col 1 of the top tile
        page = noisy_page(112, 224, (9, 9, 9), 0)
        boxes = proc.image_token_boxes(page)
        assert proc.num_tiles(page) == 3 and boxes.shape == (48, 4)
        np.testing.assert_allclose(boxes[5], [0.25, 0.125, 0.5, 0.25])
        np.testing.assert_allclose(boxes[16], [0.0, 0.5, 0.25, 0.625])  # first token of the bottom tile
        np.testing.assert_allclose(boxes[32], [0.0, 0.0, 0.25, 0.25])  # first thumbnail token


def test_worst_case_page_is_the_costliest_page_the_config_allows(family_model):
    name, _, model = family_model
    worst = model.processor.worst_case_page()
    cost = model.processor.page_cost(worst)
    side = model.config.longest_edge // model.config.tile_size  # SmolVLM: tiles along each side of a square page
    expected = {"internvl": (CAPS["max_tiles"] + 1) * model.config.image_tokens_per_tile,
                "smolvlm": (side * side + 1) * model.config.image_tokens_per_tile}.get(name, CAPS["max_visual_tokens"])
    assert cost == expected
    assert all(model.processor.page_cost(p) <= cost for p in PAGES)


def test_lora_reaches_lm_and_vision_tower_and_round_trips(family_model, tmp_path):
    name, folder, _ = family_model
    m = ColIntern.from_pretrained(folder, dim=64, head_seed=3, **CAPS)
    m.add_lora(r=4, lora_alpha=8, lora_dropout=0.0, include_vision=True)
    lora = [n for n, _ in m.backbone.named_parameters() if "lora_" in n]
    vision = m.family.vision_tower(m.backbone)
    vision_lora = [n for n, _ in vision.named_parameters() if "lora_" in n]
    lm_lora = [n for n, _ in m.family.language_model(m.backbone).named_parameters() if "lora_" in n]
    assert vision_lora and lm_lora and len(vision_lora) + len(lm_lora) == len(lora)
    with torch.no_grad():
        for n, p in m.backbone.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)  # a non-zero adapter, so the round trip has something to reproduce
    path = tmp_path / "ckpt.pt"
    parts = m.checkpoint_parts()
    save_checkpoint(str(path), config=parts["config"], head=parts["head"], lora=parts["lora"])
    loaded = ColIntern.from_pretrained(folder, ckpt=str(path))
    assert loaded.config == m.config and loaded.lora_config == m.lora_config
    assert max_diff(m.encode_images(PAGES[:2]), loaded.encode_images(PAGES[:2])) == 0.0
    assert max_diff(m.encode_queries(QUERIES[:2]), loaded.encode_queries(QUERIES[:2])) == 0.0


def test_a_checkpoint_of_the_other_family_is_refused(family_model, tiny_model_dir, tiny_qwen_dir, tmp_path):
    name, folder, model = family_model
    other = tiny_qwen_dir if name == "internvl" else tiny_model_dir
    path = tmp_path / "ckpt.pt"
    parts = model.checkpoint_parts()
    save_checkpoint(str(path), config=parts["config"], head=parts["head"])
    assert load_checkpoint(str(path))["config"]["backbone"] == name
    with pytest.raises(UserError, match=r"was trained on base model .* does not match the model being loaded"):
        ColIntern.from_pretrained(other, ckpt=str(path))
