"""Tests for bench/: each script in its smallest configuration (JSON keys, positive finite numbers), the model-FLOP
formula against torch's FLOP counter, the mining extrapolation arithmetic, and ColIntern's background
preprocessing (the bottleneck fix the encoding benchmark led to) giving identical embeddings."""
from __future__ import annotations

import json
import os
import math
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colintern.errors import UserError
from helpers import noisy_page
from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def load_bench(name: str):
    return load_script(f"bench/{name}", f"bench_{name}")


encode = load_bench("encode")


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


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
    config = encode.internvl35_1b_config(5, "sdpa")
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
                        "--warmup", "0", "--matmul_n", "256", "--json_out", str(out)]) == 0
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
    assert result["matmul_tflops"]["fp32"] == max(result["matmul_tflops_runs"]["fp32"])


def _tiny_config(model_dir: str):
    from transformers import InternVLConfig

    return InternVLConfig.from_pretrained(model_dir)


def test_encode_pipeline_simulation(tiny_model_dir, tmp_path, one_thread):
    """--simulate_tflops: end-to-end rows per prep_workers value, none faster than the simulated device."""
    out = tmp_path / "sim.json"
    assert encode.main(["--model_dir", tiny_model_dir, "--device", "cpu", "--tiles", "4", "--batch_sizes", "2",
                        "--attn", "sdpa", "--dtype", "fp32", "--repeats", "1", "--warmup", "0", "--simulate_tflops",
                        "0.002", "--prep_workers", "0", "2", "--e2e_pages", "6", "--matmul_n", "256",
                        "--json_out", str(out)]) == 0
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
    from colintern.retriever.model import default_prep_workers

    model = ColIntern.from_pretrained(tiny_model_dir, max_tiles=4)
    sizes = [(112, 112), (224, 224), (336, 112), (224, 300), (112, 224), (300, 200), (150, 150)]
    pages = [noisy_page(w, h, (40 * i, 200 - 20 * i, 90), seed=i) for i, (w, h) in enumerate(sizes)]
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
    with pytest.raises(UserError, match="empty image: 0x0 pixels"):
        model.encode_images(pages + [Image.new("RGB", (0, 0))], batch_size=2)


# ---------------------------------------------------------------------------------------------------- train_step


def test_train_step_bench_smallest(tiny_model_dir, synthetic_small_dir, tmp_path, one_thread):
    """Every mode through the real train.py (in this process): pairs/s x s/step = pairs per step, peak memory."""
    train_step = load_bench("train_step")
    out = tmp_path / "train_step.json"
    assert train_step.main(["--model_id", tiny_model_dir, "--data_dir", synthetic_small_dir, "--batch_sizes", "8",
                            "--modes", "lora_gc", "heads", "gradcache", "--gc_micro", "4", "--steps", "1",
                            "--warmup_steps", "1", "--num_workers", "0", "--device", "cpu", "--in_process",
                            "--json_out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("date", "device", "torch", "transformers", "peft", "loadavg_before", "rows_in_corpus", "rows"):
        assert key in result
    n_rows = result["rows_in_corpus"]
    assert n_rows == 120
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"lora_gc", "heads", "gradcache"}
    assert (rows["gradcache"]["micro_batch"], rows["gradcache"]["grad_accum"]) == (4, 2)
    assert (rows["lora_gc"]["micro_batch"], rows["lora_gc"]["grad_accum"]) == (8, 1)
    for mode, row in rows.items():
        assert row["status"] == "ok"
        for key in ("pairs_per_s", "s_per_step", "peak_mem_gib", "wall_s"):
            assert positive_finite(row[key]), (mode, key, row[key])
        assert row["pairs_per_s"] * row["s_per_step"] == pytest.approx(8)  # every step trains 8 pairs
        assert len(row["metrics"]) == row["max_steps"]
    assert rows["lora_gc"]["steps_measured"] == 1 and rows["lora_gc"]["max_steps"] == 2
    # heads: two whole epochs of 120 // 8 = 15 steps; each epoch measured without its first step
    assert rows["heads"]["max_steps"] == 30 and rows["heads"]["steps_measured"] == 14
    assert {m["epoch"] for m in rows["heads"]["metrics"]} == {1, 2}
    assert positive_finite(rows["heads"]["uncached_pairs_per_s"]) and positive_finite(rows["heads"]["cached_speedup"])


def test_train_step_steady_arithmetic():
    train_step = load_bench("train_step")
    metrics = [{"seconds": 10.0, "pairs_per_s": 0.8}, {"seconds": 2.0, "pairs_per_s": 4.0},
               {"seconds": 4.0, "pairs_per_s": 2.0}]
    s = train_step.steady(metrics, 1)
    assert s == {"pairs_per_s": 16 / 6, "s_per_step": 3.0, "steps": 2}
    assert train_step.steady(metrics, 3) is None


# ---------------------------------------------------------------------------------------------------- mining


def test_mining_bench_smallest(tmp_path):
    mining = load_bench("mining")
    out = tmp_path / "mining.json"
    assert mining.main(["--sizes", "10", "20", "40", "--d_len", "50", "150", "--faiss_pages", "30",
                        "--faiss_queries", "8", "--faiss_index", "Flat", "--k", "5", "--candidates", "100",
                        "--device", "cpu", "--matmul_n", "256", "--json_out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("date", "device", "torch", "faiss", "fp32_ceiling_gflops", "exact", "extrapolation", "faiss"):
        assert key in result
    rows = result["exact"]
    assert [r["n"] for r in rows] == [10, 20, 40]
    for r in rows:
        for key in ("seconds", "gflop", "gflops", "pairs_per_s"):
            assert positive_finite(r[key])
        assert r["gflop"] == pytest.approx(2 * 128 * r["query_tokens"] * r["page_tokens"] / 1e9)
    # the extrapolation: least squares of t = a N^2 through the origin, then a x queries x pages
    ex = result["extrapolation"]
    n2 = np.array([r["n"] ** 2 for r in rows], dtype=np.float64)
    t = np.array([r["seconds"] for r in rows])
    a = float((n2 * t).sum() / (n2 * n2).sum())
    assert ex["fit_a_s_per_pair"] == pytest.approx(a, rel=1e-12)
    assert ex["target_queries"] == ex["target_pages"] == 118_695
    assert ex["fit_seconds"] == pytest.approx(a * 118_695**2, rel=1e-12)
    assert ex["fit_days"] == pytest.approx(ex["fit_seconds"] / 86400)
    assert ex["work_gflop"] == pytest.approx(2 * 128 * 118_695 * 30 * 118_695 * 100 / 1e9)
    assert ex["rate_seconds"] == pytest.approx(ex["work_gflop"] / rows[-1]["gflops"])
    # FAISS with candidates covering all 30 pages re-ranks the whole corpus: exactly exact's negatives
    faiss_rows = {r["method"] + r["index"]: r for r in result["faiss"]["rows"]}
    assert faiss_rows["faissFlat"]["candidate_recall"] == 1.0
    assert faiss_rows["faissFlat"]["negatives_overlap"] == 1.0
    assert positive_finite(faiss_rows["faissFlat"]["search_s"]) and positive_finite(faiss_rows["exact-"]["search_s"])
    pooled = faiss_rows["pooled (seed)Flat, 1 vector/page"]
    assert pooled["candidate_recall"] == 1.0  # 100 candidates hold all 29 other pages
    assert 0 <= pooled["negatives_overlap"] <= 1


def test_fit_quadratic_exact():
    mining = load_bench("mining")
    assert mining.fit_quadratic([100, 200, 400], [1.0, 4.0, 16.0]) == pytest.approx(1e-4)
    queries, pages = mining.clustered_corpus(5, 7, (3, 4), (10, 12), 16, seed=0)
    assert len(queries) == 7 and len(pages) == 5
    assert all(3 <= q.shape[0] <= 4 and q.shape[1] == 16 for q in queries)
    assert all(10 <= p.shape[0] <= 12 for p in pages)
    torch.testing.assert_close(torch.cat(pages).norm(dim=1), torch.ones(sum(p.shape[0] for p in pages)))


@pytest.mark.parametrize("chunk_tokens", [40, 300, None])
def test_rerank_blocks_equal_float64_reference(chunk_tokens, tmp_path):
    """own_candidate_scores packs candidates shortest-first into blocks of at most chunk_tokens padded tokens
    (a page longer than the budget gets a block of its own); every score equals float64 MaxSim of the stored
    fp16 page, in the caller's candidate order."""
    from colintern.mine.search import own_candidate_scores

    mining = load_bench("mining")
    rng = np.random.default_rng(3)
    pages = [torch.nn.functional.normalize(torch.randn(int(n), 16), dim=1) for n in rng.integers(5, 120, 40)]
    pages[7] = torch.nn.functional.normalize(torch.randn(200, 16), dim=1)  # longer than the 40/300 budgets
    store = mining.write_page_store(tmp_path / "store", pages, pages_per_part=16)
    query = torch.nn.functional.normalize(torch.randn(9, 16), dim=1)
    ids = np.concatenate([rng.permutation(np.delete(np.arange(40), 7))[:30], [7]])
    rng.shuffle(ids)
    got = own_candidate_scores(query, ids, store, "cpu", chunk_tokens=chunk_tokens)
    want = [(query.double() @ pages[u].half().double().T).amax(1).sum().item() for u in ids]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    assert own_candidate_scores(query, np.empty(0, dtype=np.int64), store, "cpu").shape == (0,)


# ---------------------------------------------------------------------------------------------------- scoring


def test_scoring_bench_smallest(tmp_path, one_thread, capsys):
    """bench/scoring.py end to end on a tiny workload: both scorers within fp32 rounding of float64, the ratio
    printed, the zero-padding artefact shown (mteb 0.0 where the truth is -1.4), LIK skipped with its reason."""
    scoring = load_bench("scoring")
    out = tmp_path / "scoring.json"
    assert scoring.main(["--n_queries", "6", "--n_docs", "9", "--d_len", "30", "90", "--ref_pairs", "40",
                         "--device", "cpu", "--json_out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["results"]
    assert set(rows) == {"colintern.maxsim", "mteb max_sim (padded)"}
    for r in rows.values():
        assert r["max_abs_err"] < 1e-5 and positive_finite(r["seconds"])
        assert r["slower_than_ours"] == pytest.approx(r["seconds"] / rows["colintern.maxsim"]["seconds"])
    assert result["real_gflop"] == pytest.approx(2 * 128 * result["query_tokens"] * result["doc_tokens"] / 1e9)
    assert result["padding_artefact"]["reference"] == pytest.approx(-1.4)
    assert result["padding_artefact"]["colintern"] == pytest.approx(-1.4)
    assert result["padding_artefact"]["mteb_padded"] == 0.0
    assert result["skipped"] == {"late-interaction-kernels varlen": "needs CUDA (Triton kernels)"}
    printed = capsys.readouterr().out
    assert "x faster than mteb max_sim (padded inputs)" in printed
    assert "skipped late-interaction-kernels varlen: needs CUDA (Triton kernels)" in printed


# ---------------------------------------------------------------------------------------------------- preprocess


def test_preprocess_bench_on_a_rendered_pdf(tmp_path, one_thread):
    """bench/preprocess.py renders a real PDF (written here by matplotlib: an A4 portrait and an A4 landscape
    page) with pypdfium2 and finds ColIntern's tiling bit-identical to GotOcr2's. Tiles: one at max_tiles 1; a
    2x3 / 3x2 grid + thumbnail (7) at max_tiles 6; at 12 the portrait page stays 2x3 + 1 while the landscape one
    (aspect 1.41) becomes 4x3 + 1 = 13 (4/3 is closer than 3/2)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    pdf = tmp_path / "two_pages.pdf"
    with PdfPages(pdf) as out:
        for size in ((8.27, 11.69), (11.69, 8.27)):  # A4 in inches
            fig = plt.figure(figsize=size)
            fig.text(0.1, 0.9, "Annual report 2026", fontsize=28)
            ax = fig.add_axes([0.1, 0.2, 0.8, 0.5])
            ax.bar(range(6), [3, 1, 4, 1, 5, 9])
            out.savefig(fig)
            plt.close(fig)
    preprocess = load_bench("preprocess")
    result_path = tmp_path / "preprocess.json"
    assert preprocess.main(["--pdf", str(pdf), "--dpi", "72", "--max_tiles", "1", "6", "12", "--repeats", "1",
                            "--json_out", str(result_path)]) == 0
    result = json.loads(result_path.read_text())
    assert result["page_sizes"] == {"596x842": 1, "842x596": 1}  # 8.27 x 11.69 in at 72 dpi, rounded up
    rows = {r["max_tiles"]: r for r in result["rows"]}
    assert {k: r["tiles_per_page"] for k, r in rows.items()} == {1: {"1": 2}, 6: {"7": 2}, 12: {"7": 1, "13": 1}}
    assert all(r["bit_identical"] and r["pages"] == 2 for r in rows.values())
    assert all(positive_finite(r["gotocr2_ms_per_page"]) and positive_finite(r["colintern_ms_per_page"])
               for r in rows.values())
    with pytest.raises(UserError, match="cannot open it as a PDF"):
        preprocess.main(["--pdf", str(tmp_path / "preprocess.json"), "--json_out", str(tmp_path / "x.json")])
    with pytest.raises(UserError, match="^--pdf .*missing.pdf: no such file$"):
        preprocess.main(["--pdf", str(tmp_path / "missing.pdf"), "--json_out", str(tmp_path / "x.json")])


def test_gpu_suite_dry_run_runs_every_section_and_counts_flops_right(tmp_path, tiny_model_dir):
    """bench/gpu_suite.py --dry_run (tiny shapes, CPU) so the suite never rots before a GPU machine runs it; its
    FLOP counter (hooks on the forward pass) equals the validated per-page formula of bench/encode.py."""
    suite = load_bench("gpu_suite")
    from colintern import ColIntern

    model = ColIntern.from_pretrained(tiny_model_dir, max_tiles=4)
    for tiles in (1, 4):
        inputs = model.processor.process_images([encode.synthetic_page(tiles, 112, tiles)])
        with torch.inference_mode(), suite.FlopCounter(model) as counted:
            model(inputs)
        want = encode.page_flops(model.backbone.config, inputs["pixel_values"].shape[0],
                                 int(inputs["attention_mask"][0].sum()), model.config.dim)["total"]
        assert counted.total == pytest.approx(want, rel=1e-9)
    assert suite.main(["--dry_run", "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {name: r["status"] for name, r in results["sections"].items()} == {name: "ok" for name in suite.SECTIONS}
    encode_rows = results["sections"]["encode"]["rows"]
    assert {r["family"] for r in encode_rows} == {"tiny internvl", "tiny internvl single/bidir", "tiny qwen3-vl"}
    assert all(r["pages_per_s"] > 0 and 0 < r["mfu"] for r in encode_rows)
    assert results["sections"]["numerics"]["cosine_min"] > 0.9999  # fp32 against fp32 on a CPU
    maxsim = results["sections"]["maxsim"]
    assert maxsim["colintern_err"]["max_abs_err"] < 1e-4 and maxsim["speedup"] > 0
    fused = {r["kernel"]: r for r in maxsim["fused"]}  # the Triton kernel, in its interpreter on a CPU
    assert set(fused) == {"gemm (colintern.retriever.scoring, fp32)", "fused float32", "fused float16"}
    assert fused["fused float32"]["max_rel_err"] < 1e-5 and fused["fused float16"]["max_rel_err"] < 2e-3
    assert all(r["status"] == "ok" for r in results["sections"]["train"]["rows"])
    assert results["sections"]["mining"]["resident_equals_streamed"] is True
    checks = results["sections"]["gpu_paths"]["checks"]  # on a CPU: the same code paths, CPU expectations
    assert {name: c["ok"] for name, c in checks.items()} == {name: True for name in checks} and len(checks) == 6
    assert checks["fp16_lora_warning"]["warned"] and checks["compile_heads"]["compiled"]
    assert checks["mine_on_gpu"]["negatives_jaccard_gpu_vs_cpu"] == 1.0
    assert (tmp_path / "out" / "results.md").read_text().startswith("# GPU suite (dry run): ")


def test_token_pooling_bench_keeps_k1_and_counts_bytes(tmp_path, tiny_model_dir, synthetic_small_dir):
    pooling = load_bench("token_pooling")
    out = tmp_path / "pool.json"
    assert pooling.main(["--model_id", tiny_model_dir, "--eval_dir", os.path.join(synthetic_small_dir, "eval"),
                         "--factors", "1", "3", "--json_out", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["pool_factor"] for r in rows] == [1, 3] and rows[0]["ndcg_at_5_kept"] == 1.0
    assert rows[1]["vectors_per_page"] < rows[0]["vectors_per_page"] / 2.5
    assert rows[0]["bytes_per_page"] == rows[0]["vectors_per_page"] * 128 * 2
    assert (tmp_path / "p.png").stat().st_size > 5000


def test_search_latency_bench_rows_are_consistent(tmp_path):
    """bench/search_latency.py at a small size: exact is its own reference (recall 1), a FAISS first stage whose
    candidates cover the index equals it, and Qdrant's local mode returns exact's top 10."""
    pytest.importorskip("faiss")
    pytest.importorskip("qdrant_client")
    bench = load_bench("search_latency")
    out = tmp_path / "latency.json"
    assert bench.main(["--pages", "24", "--queries", "3", "--faiss_grid", "4,24,16", "--pooled_pages", "6",
                       "--qdrant_pages", "8", "--json_out", str(out)]) == 0
    rows = {r["backend"].split(" (")[0]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["exact"]["recall_at_10_vs_exact"] == 1.0 and rows["exact"]["target_in_top_10"] == 1.0
    assert rows["faiss + exact re-rank"]["recall_at_10_vs_exact"] == 1.0  # 24 candidates = every page
    assert rows["qdrant local mode"]["recall_at_10_vs_exact"] == 1.0
    pooled = rows["exact, pool factor 3"]
    assert pooled["bytes_per_page"] < 0.4 * rows["exact, pool factor 1"]["bytes_per_page"]


def test_real_pdf_pooling_bench_builds_its_sets_from_page_text(tmp_path):
    bench = load_bench("real_pdf_pooling")
    pdf = os.path.join(os.path.dirname(__file__), "fixtures", "real_pages.pdf")
    out = tmp_path / "rp"
    assert bench.main(["--pdfs", pdf, "--out", str(out), "--epochs", "1", "--factors", "1", "3"]) == 0
    result = json.loads((out / "pooling.json").read_text())
    assert result["pages"] == 6 and len((out / "data" / "train.jsonl").read_text().splitlines()) == 18
    queries = [json.loads(x)["query"] for x in (out / "eval_seen" / "queries.jsonl").read_text().splitlines()]
    triples = [json.loads(x)["query"] for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert set(queries) <= set(triples)  # "seen": the first training slice of each page
    for kind in ("seen", "unseen"):
        k1, k3 = result[kind]
        assert k1["ndcg_at_5_kept"] == 1.0 and k3["vectors_per_page"] < 0.4 * k1["vectors_per_page"]


def test_teacher_mining_bench_pairs_every_arm_with_in_batch_and_reruns_nothing(tmp_path, search_ckpt,
                                                                               synthetic_tiny_dir, capfd):
    """bench/teacher_mining.py on the tiny corpus, 2 seeds: each arm's scores are its eval summaries, the gains are
    the paired per-seed differences with scipy's paired t-test, the unfiltered mining filtered nothing, and a rerun
    finds every step done (and refuses other settings in the same folder)."""
    from scipy.stats import ttest_rel

    bench = load_bench("teacher_mining")
    out = tmp_path / "teacher_mining"
    argv = ["--teacher", search_ckpt, "--data", synthetic_tiny_dir, "--student", "qwen2_5_vl", "--seeds", "0", "1",
            "--batch_size", "4", "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads((out / "teacher_mining.json").read_text())
    scores = result["scores"]
    runs = {"epoch 1 (in-batch)": "epoch1", "in-batch": "in-batch", "teacher, filtered": "teacher_filtered",
            "teacher, unfiltered": "teacher_unfiltered"}
    assert list(scores) == list(runs)
    for arm, slug in runs.items():
        for seed, score in zip((0, 1), scores[arm]):
            summary = json.loads((out / "eval" / f"{slug}_seed{seed}" / "summary.json").read_text())
            assert score == summary["average"]["ndcg_at_5"]
    rows = {row["arm"]: row for row in result["rows"]}
    for arm in ("teacher, filtered", "teacher, unfiltered"):
        paired = [a - b for a, b in zip(scores[arm], scores["in-batch"])]
        assert rows[arm]["gain"] == pytest.approx(sum(paired) / 2, abs=1e-12)
        assert rows[arm]["wins"] == sum(d > 0 for d in paired)
        expected = ttest_rel(scores[arm], scores["in-batch"]).pvalue
        assert rows[arm]["p"] == pytest.approx(expected, nan_ok=True)
    assert result["mined"]["teacher, unfiltered"]["fn_filtered"] == 0
    assert result["teacher_meta"]["teacher, filtered"]["given"] == search_ckpt
    teacher_summary = json.loads((out / "eval" / "teacher1" / "summary.json").read_text())
    assert result["teachers"] == {search_ckpt: teacher_summary["average"]["ndcg_at_5"]}
    capfd.readouterr()
    assert bench.main(argv) == 0
    printed = capfd.readouterr().out
    assert "# done already" in printed and not any(line.startswith("$ ") for line in printed.splitlines())
    with pytest.raises(UserError, match=r"holds a run with other --teacher, --lr .*pass another --out"):
        bench.main([*argv[2:], "--teacher", str(out / "other.pt"), "--lr", "0.5"])
