"""Tests for bench/: each script in its smallest configuration (JSON keys, positive finite numbers), the model-FLOP
formula against torch's FLOP counter, the mining extrapolation arithmetic, and ColIntern's background
preprocessing (the bottleneck fix the encoding benchmark led to) giving identical embeddings."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colintern.errors import UserError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


encode = load_bench("encode")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def noise_page(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------------- encode


def test_page_flops_match_torch_flop_counter(tiny_model_dir, one_thread):
    """The analytic model FLOPs equal what torch's FlopCounterMode counts, module by module.

    With sdpa the counter sees no attention on a CPU (so the linear/conv terms are compared alone); with eager
    attention it sees QK^T and AV as matmuls over the full (non-causal) square, i.e. lm_attention_full."""
    from torch.utils.flop_counter import FlopCounterMode

    for attn in ("sdpa", "eager"):
        model = encode.local_model(tiny_model_dir, torch.device("cpu"), torch.float32, attn)
        encode.with_max_tiles(model, 12)
        page = encode.synthetic_page(12, model.config.tile_size, 0)
        assert model.processor.num_tiles(page) == 13
        inputs = model.processor.process_images([page, page])
        seq_len = int(inputs["attention_mask"][0].sum())
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(inputs)
        counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
        f = encode.page_flops(model.backbone.config, 13, seq_len, model.config.dim)
        eager = attn == "eager"
        assert counts["ColIntern.backbone.vision_tower"] == 2 * (f["vision_linear"] + f["patch_embed"]
                                                                 + eager * f["vision_attention"])
        assert counts["ColIntern.backbone.multi_modal_projector"] == 2 * f["projector"]
        assert counts["ColIntern.backbone.language_model"] == 2 * (f["lm_linear"] + eager * f["lm_attention_full"])
        assert counts["ColIntern.head"] == 2 * f["head"]
    assert f["lm_attention"] * 2 == f["lm_attention_full"]
    assert f["total"] == sum(v for k, v in f.items() if k not in ("total", "lm_attention_full"))


def test_page_flops_internvl35_1b_golden():
    """InternVL3.5-1B, one 448-px tile and a 273-token page: hand-computed terms."""
    config = encode.internvl35_1b_config(image_token_id=5, attn="sdpa")
    f = encode.page_flops(config, tiles=1, seq_len=273, head_dim_out=128)
    assert f["vision_linear"] == 2 * 1025 * 24 * (4 * 1024**2 + 2 * 1024 * 4096)
    assert f["vision_attention"] == 4 * 1025**2 * 1024 * 24
    assert f["patch_embed"] == 2 * 1024 * 588 * 1024
    assert f["projector"] == 2 * 256 * (4096 * 1024 + 1024 * 1024)
    assert f["lm_linear"] == 2 * 273 * 28 * (1024 * 2048 + 2 * 1024 * 1024 + 2048 * 1024 + 3 * 1024 * 3072)
    assert f["lm_attention"] == 4 * 273**2 * 2048 * 28 / 2
    assert f["head"] == 2 * 273 * 1024 * 128
    assert f["total"] == pytest.approx(975.356e9, rel=1e-6)


@pytest.mark.parametrize("tiles,grid", [(1, (1, 1)), (4, (2, 2)), (6, (2, 3)), (12, (3, 4))])
def test_page_grid(tiles, grid):
    assert encode.page_grid(tiles) == grid


def test_encode_bench_smallest(tiny_model_dir, tmp_path, one_thread):
    out = tmp_path / "encode.json"
    assert encode.main(["--model_dir", tiny_model_dir, "--device", "cpu", "--tiles", "1", "4", "--batch_sizes", "1",
                        "2", "--attn", "sdpa", "flash_attention_2", "--dtype", "fp32", "--repeats", "1",
                        "--warmup", "0", "--json_out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("date", "device", "torch", "transformers", "matmul_tflops", "loadavg_before", "rows", "skipped"):
        assert key in result
    assert positive_finite(result["matmul_tflops"]["fp32"])
    assert [(r["max_tiles"], r["batch"]) for r in result["rows"]] == [(1, 1), (1, 2), (4, 1), (4, 2)]
    assert result["skipped"] == [{"dtype": "fp32", "attn": "flash_attention_2", "reason": "needs CUDA"}]
    for row in result["rows"]:
        assert row["status"] == "ok"
        for key in ("pages_per_s", "tokens_per_s", "tflops", "mfu", "peak_mem_gib", "preprocess_ms_per_page",
                    "e2e_pages_per_s", "gflop_per_page"):
            assert positive_finite(row[key]), (key, row[key])
        assert row["tiles_total"] == (1 if row["max_tiles"] == 1 else 5)
        assert row["tokens_per_s"] == pytest.approx(row["pages_per_s"] * row["seq_len"])
        flops = encode.page_flops(_tiny_config(tiny_model_dir), row["tiles_total"], row["seq_len"], 128)
        assert row["gflop_per_page"] == pytest.approx(flops["total"] / 1e9)
        assert row["mfu"] == pytest.approx(row["tflops"] / result["matmul_tflops"]["fp32"])


def _tiny_config(model_dir: str):
    from transformers import InternVLConfig

    return InternVLConfig.from_pretrained(model_dir)


def test_encode_pipeline_simulation(tiny_model_dir, tmp_path, one_thread):
    """--simulate_tflops: end-to-end rows per prep_workers value, none faster than the simulated device."""
    out = tmp_path / "sim.json"
    assert encode.main(["--model_dir", tiny_model_dir, "--device", "cpu", "--tiles", "4", "--batch_sizes", "2",
                        "--attn", "sdpa", "--dtype", "fp32", "--repeats", "1", "--warmup", "0", "--simulate_tflops",
                        "0.002", "--prep_workers", "0", "2", "--e2e_pages", "6", "--json_out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["prep_workers"] for r in rows] == [0, 2]
    for row in rows:
        assert positive_finite(row["e2e_pages_per_s"]) and positive_finite(row["sim_device_pages_per_s"])
        assert row["e2e_pages_per_s"] <= row["sim_device_pages_per_s"] * 1.05
        assert row["sim_device_pages_per_s"] == pytest.approx(0.002e12 / (row["gflop_per_page"] * 1e9))


# ----------------------------------------------------------------------- the fix: background preprocessing


def test_prep_workers_give_identical_embeddings(tiny_model_dir, one_thread):
    """ColIntern.prep_workers > 0 prepares later batches in background threads: same vectors, same order."""
    from colintern import ColIntern
    from colintern.model import default_prep_workers

    model = ColIntern.from_pretrained(tiny_model_dir, max_tiles=4)
    pages = [noise_page(w, h, i) for i, (w, h) in enumerate([(112, 112), (224, 224), (336, 112), (224, 300),
                                                             (112, 224), (300, 200), (150, 150)])]
    queries = ["red circle", "which page shows a blue star on a green background", "the word delta", "table"]
    assert default_prep_workers("cpu") == 0 and default_prep_workers("cuda") >= 1
    assert model.prep_workers is None  # -> default_prep_workers(device): 0 on this CPU

    seen: list[str] = []
    process = model.processor.process_images

    def spy(images):
        seen.append(threading.current_thread().name)
        return process(images)

    model.prep_workers = 0
    serial_docs = model.encode_images(pages, batch_size=2)
    serial_queries = model.encode_queries(queries, batch_size=1)
    model.prep_workers = 2
    model.processor.process_images = spy
    docs = model.encode_images(pages, batch_size=2)
    assert len(seen) == 4 and seen[0] == threading.current_thread().name
    assert all(name.startswith("colintern-prep") for name in seen[1:])
    queries_out = model.encode_queries(queries, batch_size=1)
    for a, b in zip(serial_docs + serial_queries, docs + queries_out):
        assert torch.equal(a, b)
    # an unusable page in a batch prepared in the background is still one UserError naming it
    with pytest.raises(UserError, match="image has size 0x0"):
        model.encode_images(pages + [Image.new("RGB", (0, 0))], batch_size=2)
