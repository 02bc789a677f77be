"""Page-encoding speed of ColIntern at the real InternVL3.5-1B shapes: pages/s, tokens/s, MFU and peak memory.

The backbone is InternVL3.5-1B's architecture (InternViT-300M 448-px tiles + Qwen3-0.6B, 1024 hidden) with
random weights: speed depends on shapes, not on weight values. Synthetic pages are sized so that the GotOcr2
tiling of ColIntern (max_tiles = T) cuts them into exactly T tiles (+ a thumbnail when T > 1): 1, 4+1, 12+1
tiles, i.e. 256, 1280 and 3328 image tokens per page.

For every (dtype, attention implementation, tiles, batch size) it measures
  - model: the forward pass alone (ColIntern.forward on a pre-processed batch already on the device):
    pages/s, LM tokens/s, model FLOPs utilisation (MFU) and peak memory;
  - preprocess: the CPU time of processor.process_images per page (tiling, resizing, normalising);
  - e2e: ColIntern.encode_images end to end (preprocessing + forward + copy back), pages/s.
MFU = model FLOPs per page x pages/s / the device's measured matmul rate in the same dtype (a big square
matmul timed here). Model FLOPs: 2 x in x out per token of every linear / conv layer of the vision tower,
projector, language model and head, plus attention (QK^T and AV: 4 x L^2 x width per layer; the language
model's causal attention counted at half, the vision tower's bidirectional attention in full).
Peak memory: torch.cuda.max_memory_allocated per configuration on a GPU; on a CPU the process's peak RSS.

    python bench/encode.py                                   # GPU: 1/4/12 tiles, sdpa + flash-attn, bf16
    python bench/encode.py --device cpu --tiles 1 --batch_sizes 1 --attn sdpa --dtype bf16 fp32 \\
        --repeats 1 --warmup 0                               # the CPU smoke run recorded in docs/BENCHMARKS.md
    python bench/encode.py --model_dir tiny_model --device cpu --tiles 1 4 --batch_sizes 1 2   # any local model
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchlib import (env, loadavg, matmul_tflops, print_table, reset_peak, sync,  # noqa: E402
                      timed, write_json)

from colintern.cli import run_cli, setup_logging  # noqa: E402
from colintern.errors import UserError  # noqa: E402
from colintern.device import peak_memory_gib  # noqa: E402
from colintern.backbones.internvl import internvl35_1b_config  # noqa: E402  (the real shapes, shared with tests/test_realsize.py)

log = logging.getLogger("colintern.bench.encode")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MFU_TARGET = 0.40  # target: >= 40 % of the GPU's measured bf16 matmul rate


def build_on(device: torch.device, dtype: torch.dtype, build):
    """build() with its parameters created directly on `device` in `dtype` (no full-size CPU fp32 copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return build()
    finally:
        torch.set_default_dtype(previous)


def random_internvl35_1b(tokenizer_dir: str, device: torch.device, dtype: torch.dtype, attn: str, seed: int):
    """ColIntern on a randomly initialised InternVL3.5-1B backbone, built directly on the device."""
    from transformers import InternVLModel

    from colintern.backbones.base import LoadedBackbone, load_tokenizer
    from colintern.retriever.model import ColIntern, config_for_backbone

    tokenizer = load_tokenizer(tokenizer_dir)  # any InternVL tokenizer: its ids only need to be < 151936
    config = internvl35_1b_config(tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), attn)  # colintern.testing.tiny
    torch.manual_seed(seed)
    backbone = build_on(device, dtype, lambda: InternVLModel(config).eval())
    text = config.text_config
    loaded = LoadedBackbone(model=backbone, tokenizer=tokenizer, family="internvl", layout="native",
                            hidden_size=text.hidden_size, tile_size=448, image_tokens_per_tile=256,
                            signature={"model_type": "internvl", "hidden_size": text.hidden_size})
    return ColIntern(loaded, config_for_backbone(loaded, "random-InternVL3_5-1B")).to(device)


def save_random_internvl35_1b(out_dir: str, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                              seed: int = 0) -> str:
    """Write a model folder with InternVL3.5-1B's shapes and random weights (+ the tiny model's tokenizer), so
    scripts that take --model_id (train.py, mine.py) can run at the real size offline. Returns out_dir."""
    from colintern.testing.toy_tokenizer import build_tokenizer

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    model = random_internvl35_1b(out_dir, device, dtype, "sdpa", seed)
    backbone = model.backbone
    backbone.config.text_config.pad_token_id = tokenizer.pad_token_id
    backbone.config.text_config.eos_token_id = tokenizer.eos_token_id
    backbone.save_pretrained(out_dir)
    log.info("wrote a random-weight InternVL3.5-1B-shaped model (%s) to %s", str(dtype).split(".")[-1], out_dir)
    return out_dir


def local_model(model_dir: str, device: torch.device, dtype: torch.dtype, attn: str):
    """A local model directory (real weights) with the attention implementation asked for."""
    from colintern.retriever.model import ColIntern

    model = ColIntern.from_pretrained(model_dir, device=str(device), dtype=dtype,
                                      use_flash_attn=attn == "flash_attention_2")
    model.backbone.config._attn_implementation = attn  # "eager" too (used by the FLOP-count test)
    return model


def with_max_tiles(model, max_tiles: int) -> None:
    """Re-make the model's processor for another max_tiles (the only formatting setting this varies)."""
    from colintern.backbones.registry import make_processor

    model.config = dataclasses.replace(model.config, max_tiles=max_tiles)
    model.processor = make_processor(model.tokenizer, model.config)


def page_grid(tiles: int) -> tuple[int, int]:
    """(columns, rows) of a portrait page cut into exactly `tiles` tiles: the factor pair closest to square."""
    cols = max(c for c in range(1, int(math.isqrt(tiles)) + 1) if tiles % c == 0)
    return cols, tiles // cols


def synthetic_page(tiles: int, tile_size: int, seed: int) -> Image.Image:
    """A noise page whose aspect ratio is exactly a cols x rows grid of tiles (so tiling gives that grid)."""
    cols, rows = page_grid(tiles)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(rows * tile_size, cols * tile_size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def page_flops(config, tiles: int, seq_len: int, head_dim_out: int) -> dict[str, float]:
    """Model FLOPs of encoding ONE page: `tiles` tiles (thumbnail included) and an LM sequence of seq_len tokens.

    2 FLOPs per multiply-add. Vision: per tile, (image/patch)^2 patches + 1 CLS token through every layer;
    projector: (patches x downsample^2) tokens per tile; LM and head: seq_len tokens. Attention: QK^T and AV
    are 2 x L^2 x width multiply-adds per layer; the LM's is causal, so half of it is needed.
    """
    v, t = config.vision_config, config.text_config
    image = v.image_size[0] if isinstance(v.image_size, (list, tuple)) else v.image_size
    patch = v.patch_size[0] if isinstance(v.patch_size, (list, tuple)) else v.patch_size
    patches = (image // patch) ** 2
    vt = patches + 1  # + CLS
    h, inter = v.hidden_size, v.intermediate_size
    vision_linear = 2 * tiles * vt * v.num_hidden_layers * (4 * h * h + 2 * h * inter)
    vision_attention = 4 * tiles * vt * vt * h * v.num_hidden_layers
    patch_embed = 2 * tiles * patches * (v.num_channels * patch * patch) * h
    ds = config.downsample_ratio
    proj_tokens = int(patches * ds * ds)
    proj_in = int(h / (ds * ds))
    lm_h = t.hidden_size
    projector = 2 * tiles * proj_tokens * (proj_in * lm_h + lm_h * lm_h)
    head_dim = getattr(t, "head_dim", None) or lm_h // t.num_attention_heads
    q_width, kv_width = t.num_attention_heads * head_dim, t.num_key_value_heads * head_dim
    per_token = lm_h * q_width + 2 * lm_h * kv_width + q_width * lm_h + 3 * lm_h * t.intermediate_size
    lm_linear = 2 * seq_len * t.num_hidden_layers * per_token
    lm_attention_full = 4 * seq_len * seq_len * q_width * t.num_hidden_layers
    head = 2 * seq_len * lm_h * head_dim_out
    out = {"vision_linear": vision_linear, "vision_attention": vision_attention, "patch_embed": patch_embed,
           "projector": projector, "lm_linear": lm_linear, "lm_attention": lm_attention_full / 2,
           "lm_attention_full": lm_attention_full, "head": head}
    out["total"] = sum(v for k, v in out.items() if k != "lm_attention_full")
    return {k: float(x) for k, x in out.items()}


def to_device(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def simulate_device(model, tflops: float) -> None:
    """Pipeline-only mode: the model's forward becomes a wait of (batch model FLOPs / tflops) seconds.

    time.sleep releases the GIL like a wait for a CUDA stream does, so end-to-end encode_images then shows what
    the CPU side (preprocessing, copies, Python) allows on a device of that speed, with no device at all.
    """
    def forward(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = inputs["input_ids"]  # (B, L)
        tiles = inputs["pixel_values"].shape[0] // ids.shape[0] if "pixel_values" in inputs else 0
        flops = page_flops(model.backbone.config, tiles, ids.shape[1], model.config.dim)["total"] * ids.shape[0]
        time.sleep(flops / (tflops * 1e12))
        return torch.zeros(*ids.shape, model.config.dim), inputs["keep_mask"]  # (B, L, dim), (B, L)

    model.forward = forward


def accelerator_prep_workers() -> int:
    """ColIntern's default number of preprocessing threads on an accelerator (0 where it has no such setting)."""
    from colintern.retriever import model as model_module

    return getattr(model_module, "default_prep_workers", lambda device: 0)("cuda")


def measure(model, page: Image.Image, batch: int, args, device: torch.device,
            peak_tflops: float) -> list[dict[str, Any]]:
    """One configuration: preprocessing, the model forward (timed repeats) and, optionally, encode_images.

    With --simulate_tflops: one row per --prep_workers value, end-to-end only, the values interleaved in every
    repeat so that bursts of background load hit them alike.
    """
    row: dict[str, Any] = {"batch": batch}
    pages = [page] * batch
    pre_times = [timed(lambda: model.processor.process_images(pages), torch.device("cpu"))[0]
                 for _ in range(max(1, min(args.repeats, 2)))]
    inputs = model.processor.process_images(pages)
    row["preprocess_ms_per_page"] = 1e3 * min(pre_times) / batch
    seq_len = int(inputs["attention_mask"][0].sum())
    tiles = inputs["pixel_values"].shape[0] // batch
    row.update(tiles_total=tiles, seq_len=seq_len, embeddings_per_page=int(inputs["keep_mask"][0].sum()))
    flops = page_flops(model.backbone.config, tiles, seq_len, model.config.dim)
    row["gflop_per_page"] = flops["total"] / 1e9
    row["flops_breakdown"] = flops
    if args.simulate_tflops:  # pipeline only: no forward pass to time
        row["sim_device_pages_per_s"] = args.simulate_tflops * 1e12 / flops["total"]
        workers = [accelerator_prep_workers() if w < 0 else w for w in args.prep_workers]
        n = max(batch, args.e2e_pages or 2 * batch)
        times: dict[int, list[float]] = {w: [] for w in workers}
        for rep in range(args.warmup + args.repeats):
            for w in workers:
                model.prep_workers = w
                seconds, _ = timed(lambda: model.encode_images([page] * n, batch_size=batch, show_progress=False),
                                   device)
                if rep >= args.warmup:
                    times[w].append(seconds)
        return [{**row, "prep_workers": w, "e2e_pages": n, "e2e_s": times[w],
                 "e2e_pages_per_s": n / statistics.median(times[w])} for w in workers]
    inputs = to_device(inputs, device)
    reset_peak(device)
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(inputs)
        times = [timed(lambda: model(inputs), device)[0] for _ in range(args.repeats)]
    sync(device)
    row["peak_mem_gib"], row["peak_mem_kind"] = peak_memory_gib(device)
    t = statistics.median(times)
    row.update(forward_s=times, pages_per_s=batch / t, tokens_per_s=batch * seq_len / t)
    row["tflops"] = flops["total"] * batch / t / 1e12
    row["mfu"] = row["tflops"] / peak_tflops
    if args.e2e:  # ColIntern.encode_images end to end: preprocessing + forward + copy back
        n = max(batch, args.e2e_pages or 2 * batch)
        e2e_s = [timed(lambda: model.encode_images([page] * n, batch_size=batch, show_progress=False), device)[0]
                 for _ in range(args.repeats)]
        row.update(e2e_pages=n, e2e_s=e2e_s, e2e_pages_per_s=n / statistics.median(e2e_s),
                   prep_workers=model.prep_workers if getattr(model, "prep_workers", None) is not None
                   else accelerator_prep_workers() if device.type != "cpu" else 0)
    return [row]


def log_row(row: dict[str, Any]) -> None:
    if row["status"] != "ok":
        note = row["status"]
    elif "pages_per_s" in row:
        note = f"{row['pages_per_s']:.2f} pages/s, MFU {100 * row['mfu']:.1f}%"
    else:
        note = (f"prep_workers {row['prep_workers']}: end to end {row['e2e_pages_per_s']:.1f} pages/s (the simulated "
                f"device alone: {row['sim_device_pages_per_s']:.1f})")
    log.info("%s %s %d tiles batch %d: %s", row["dtype"], row["attn"], row["max_tiles"], row["batch"], note)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default=None, help="benchmark a local model directory (real weights, loaded "
                   "with ColIntern.from_pretrained) instead of the random-weight InternVL3.5-1B (default)")
    p.add_argument("--tokenizer_dir", default=None, help="random model: a model folder whose InternVL tokenizer "
                   "formats the pages (default: the tiny model's, built in a temporary folder)")
    p.add_argument("--tiles", type=int, nargs="+", default=[1, 4, 12],
                   help="max_tiles values; each page is cut into exactly that many tiles, + a thumbnail when "
                        "above 1 (default: 1 4 12)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16, 32],
                   help="pages per forward pass (default: 1 4 16 32)")
    p.add_argument("--attn", nargs="+", default=["sdpa", "flash_attention_2"],
                   choices=["sdpa", "flash_attention_2", "eager"],
                   help="attention implementations; flash_attention_2 is skipped (and said so) without CUDA or "
                        "the flash-attn package (default: sdpa flash_attention_2)")
    p.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(DTYPES),
                   help="backbone dtypes (default: bf16); the head stays fp32")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=5, help="timed forward passes (and end-to-end runs) per "
                   "configuration; the median is reported (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forward passes first (default: 2)")
    p.add_argument("--no_e2e", dest="e2e", action="store_false",
                   help="skip the end-to-end encode_images measurement (default: measure it)")
    p.add_argument("--simulate_tflops", type=float, default=None, help="pipeline only: no real forward; the "
                   "backbone becomes a wait of (model FLOPs / this many TFLOP/s), e.g. 400 = 40%% of an H100's "
                   "989 dense bf16 TFLOP/s, and only end-to-end encode_images is timed (default: off)")
    p.add_argument("--prep_workers", type=int, nargs="+", default=[-1], help="with --simulate_tflops: values of "
                   "ColIntern.prep_workers (background preprocessing threads) to compare; 0 = serial, the code "
                   "before the prefetch fix; -1 = ColIntern's default on a GPU (default: -1)")
    p.add_argument("--e2e_pages", type=int, default=0, help="pages for the end-to-end measurement "
                   "(default: 2 x batch size)")
    p.add_argument("--matmul_n", type=int, default=None, help="size of the square matmul that measures the "
                   "device's ceiling, before and after the runs (default: 8192 on a GPU, 4096 on a CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and pages (default: 0)")
    p.add_argument("--json_out", default="outputs/bench/encode.json", help="result file "
                   "(default: outputs/bench/encode.json)")
    args = p.parse_args(argv)
    if min(args.tiles) < 1 or min(args.batch_sizes) < 1 or args.repeats < 1 or args.warmup < 0:
        raise UserError("--tiles, --batch_sizes and --repeats must be at least 1, --warmup at least 0")
    setup_logging()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine; use --device cpu")

    load_before = loadavg()
    peaks = {name: matmul_tflops(device, DTYPES[name], args.matmul_n) for name in args.dtype}
    log.info("measured %s matmul ceiling: %s", device.type, ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in peaks.items()))

    tok_dir, tmp = args.tokenizer_dir, None
    if args.model_dir is None and tok_dir is None:
        from colintern.backbones.internvl import build_tiny_internvl

        tmp = tempfile.TemporaryDirectory(prefix="bench_encode_")
        tok_dir = build_tiny_internvl(tmp.name, layout="native", seed=0)

    rows, skipped = [], []
    try:
        for dtype_name in args.dtype:
            for attn in args.attn:
                if attn == "flash_attention_2":
                    from transformers.utils import is_flash_attn_2_available

                    if device.type != "cuda" or not is_flash_attn_2_available():
                        why = "needs CUDA" if device.type != "cuda" else "flash-attn is not installed"
                        skipped.append({"dtype": dtype_name, "attn": attn, "reason": why})
                        log.warning("skipping flash_attention_2 (%s)", why)
                        continue
                t0 = time.perf_counter()
                try:
                    if args.model_dir:
                        model = local_model(args.model_dir, device, DTYPES[dtype_name], attn)
                    else:
                        model = random_internvl35_1b(tok_dir, device, DTYPES[dtype_name], attn, args.seed)
                except (UserError, ImportError, ValueError, RuntimeError) as err:  # e.g. an unusable attention
                    why = f"model build failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    skipped.append({"dtype": dtype_name, "attn": attn, "reason": why})
                    log.warning("skipping %s %s (%s)", dtype_name, attn, why)
                    continue
                if args.simulate_tflops:
                    simulate_device(model, args.simulate_tflops)
                n_params = sum(p.numel() for p in model.backbone.parameters())
                log.info("built %s (%.0fM parameters, %s, %s) in %.1f s", args.model_dir or "InternVL3.5-1B shapes",
                         n_params / 1e6, dtype_name, attn, time.perf_counter() - t0)
                weights_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
                for tiles in args.tiles:
                    with_max_tiles(model, tiles)
                    page = synthetic_page(tiles, model.config.tile_size, args.seed)
                    expected = tiles + (1 if tiles > 1 else 0)
                    got = model.processor.num_tiles(page)
                    if got != expected:
                        raise UserError(f"a {page.size[0]}x{page.size[1]} page gives {got} tiles, expected {expected}")
                    for batch in args.batch_sizes:
                        base = {"dtype": dtype_name, "attn": attn, "max_tiles": tiles, "batch": batch,
                                "params": n_params, "weights_gib": weights_gib, "load_before": loadavg()}
                        try:
                            new = [{**base, **r, "status": "ok"}
                                   for r in measure(model, page, batch, args, device, peaks[dtype_name])]
                        except torch.OutOfMemoryError:
                            new = [{**base, "status": "OOM"}]
                            torch.cuda.empty_cache()
                        except (RuntimeError, ValueError) as err:  # a kernel that cannot run this shape/dtype
                            new = [{**base, "status": f"error: {type(err).__name__}: "
                                                      f"{str(err).splitlines()[0][:120] if str(err) else ''}"}]
                            log.exception("%s %s %d tiles batch %d failed", dtype_name, attn, tiles, batch)
                        for row in new:
                            row["load_after"] = loadavg()
                        rows += new
                        for row in new:
                            log_row(row)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        if tmp is not None:
            tmp.cleanup()

    after = {name: matmul_tflops(device, DTYPES[name], args.matmul_n) for name in args.dtype}
    ceiling_runs = {name: [peaks[name], after[name]] for name in args.dtype}
    if any(after[name] > peaks[name] for name in args.dtype):  # the ceiling is the best of both measurements
        for r in rows:
            if r.get("tflops") is not None:
                r["mfu"] = r["tflops"] / max(ceiling_runs[r["dtype"]])
        peaks = {name: max(v) for name, v in ceiling_runs.items()}
    info = env(device)
    print(f"\nPage encoding, {args.model_dir or 'InternVL3.5-1B shapes, random weights'} on {info['device']}; "
          f"torch {info['torch']}, transformers {info['transformers']}, flash-attn {info['flash_attn']}; "
          f"matmul ceiling {', '.join(f'{k} {v:.2f} TFLOP/s' for k, v in peaks.items())}; "
          f"load {load_before} -> {loadavg()}")
    for r in rows:
        r["tiles_label"] = f"{r['max_tiles']}" + ("+1" if r["max_tiles"] > 1 else "")
        r["mfu_pct"] = 100 * r["mfu"] if r.get("mfu") is not None else None
    print_table(rows, [("dtype", "dtype", "s"), ("attn", "attention", "s"), ("tiles_label", "tiles", "s"),
                       ("batch", "batch", "d"), ("seq_len", "tokens/page", "d"), ("pages_per_s", "pages/s", ".2f"),
                       ("tokens_per_s", "tokens/s", ".0f"), ("tflops", "TFLOP/s", ".3g"), ("mfu_pct", "MFU %", ".1f"),
                       ("peak_mem_gib", "peak GiB", ".2f"), ("preprocess_ms_per_page", "prep ms/page", ".1f"),
                       ("prep_workers", "prep threads", "d"), ("e2e_pages_per_s", "e2e pages/s", ".2f"),
                       ("sim_device_pages_per_s", "sim device pages/s", ".1f"),
                       ("status", "status", "s")])
    for s in skipped:
        print(f"skipped: {s['dtype']} {s['attn']}: {s['reason']}")
    ok = [r for r in rows if r["status"] == "ok"]
    if device.type == "cuda" and ok:
        best = max(ok, key=lambda r: r["mfu"])
        print(f"best MFU {100 * best['mfu']:.1f}% ({best['attn']}, {best['tiles_label']} tiles, "
              f"batch {best['batch']}); "
              f"target {100 * MFU_TARGET:.0f}%: {'met' if best['mfu'] >= MFU_TARGET else 'NOT met'}")
    write_json(args.json_out, {
        "benchmark": "encode", **info, "model": args.model_dir or "InternVL3.5-1B shapes (random weights)",
        "matmul_tflops": peaks, "matmul_tflops_runs": ceiling_runs, "mfu_target": MFU_TARGET,
        "simulate_tflops": args.simulate_tflops, "repeats": args.repeats, "warmup": args.warmup,
        "loadavg_before": load_before, "loadavg_after": loadavg(), "rows": rows, "skipped": skipped,
        "flops_convention": "2 FLOPs per multiply-add of every linear/conv layer + attention QK^T and AV "
                            "(LM causal attention at half); per page, real tokens only",
    })
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
