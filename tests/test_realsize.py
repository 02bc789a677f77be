"""Real-size smoke test: random weights at the InternVL3.5-1B shapes, bf16, one single-tile page and one query."""
from __future__ import annotations

import time

import torch
from PIL import Image

from colintern.backbones.base import LoadedBackbone, load_tokenizer
from colintern.retriever.model import ColIntern, config_for_backbone
from colintern.backbones.internvl import internvl35_1b_config


def test_internvl35_1b_shapes_bf16(tiny_model_dir):
    from transformers import InternVLModel

    tokenizer = load_tokenizer(tiny_model_dir)  # ids < 151936, so the tiny tokenizer drives the big model
    config = internvl35_1b_config(tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), "sdpa")
    start = time.time()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        backbone = InternVLModel(config).eval()
    finally:
        torch.set_default_dtype(previous)
    n_params = sum(p.numel() for p in backbone.parameters())
    assert 0.7e9 < n_params < 1.1e9, n_params  # InternVL3.5-1B without its LM head
    assert backbone.vision_tower.encoder.layer[0].attention.q_proj.bias is not None
    loaded = LoadedBackbone(model=backbone, tokenizer=tokenizer, family="internvl", layout="native", hidden_size=1024,
                            signature={"model_type": "internvl", "hidden_size": 1024}, tile_size=448,
                            image_tokens_per_tile=256)
    model = ColIntern(loaded, config_for_backbone(loaded, "random-InternVL3_5-1B"))
    page = Image.new("RGB", (448, 448), (240, 240, 240))
    doc = model.encode_images([page])[0]
    query = model.encode_queries(["what is the total revenue in 2023?"])[0]
    after_image = len(tokenizer("</img>" + model.config.page_prompt.split("<image>")[1], add_special_tokens=False)["input_ids"])
    assert model.processor.num_tiles(page) == 1
    assert doc.shape == (256 + after_image, 128) and doc.dtype == torch.float32
    assert torch.isfinite(doc).all() and torch.isfinite(query).all()
    torch.testing.assert_close(doc.norm(dim=-1), torch.ones(doc.shape[0]), atol=1e-4, rtol=0)
    assert query.shape[0] == len(tokenizer("Query: what is the total revenue in 2023?", add_special_tokens=False)["input_ids"]) + 10
    assert time.time() - start < 300
