"""The GPU suite: everything a GPU must show, in one command that fits a short loan of one H100/H200 (8 minutes).

    PYTHONPATH=. python bench/gpu_suite.py       # on the GPU machine (no ColIntern installed): outputs/bench/gpu_suite/
    python bench/gpu_suite.py --dry_run          # tiny shapes on a CPU, in seconds (make test runs it)

Sections, each skipped (and said so) when the time budget left is below its estimate, each failure recorded
(with its last traceback line) without stopping the others:
  env       versions, device, and whether each optional part runs here or why not: flash-attn, bitsandbytes
            (an 8-bit AdamW step), FAISS on the GPU, mteb
  ceiling   the bf16 (and fp32) matmul rate measured now: the denominator of every MFU
  encode    page encoding of a random InternVL3.5-1B (bf16, sdpa, and flash-attention 2 when it runs) at 1, 4+1
            and 12+1 tiles and two batch sizes, and of a random Qwen3-VL-2B at 768 visual tokens: pages/s, LM
            tokens/s, MFU (FLOPs counted from the forward itself: every linear/conv layer and every attention
            call) and peak memory. Target: >= 40 % MFU at 4+1 tiles (about 60 pages/s for the 1B model on an H100)
  numerics  bf16-on-the-GPU against fp32 embeddings of the same pages and queries (same weights): cosine
  maxsim    colintern.retriever.scoring.maxsim against mteb's max_sim (or its algorithm restated when mteb is absent) on the
            same ragged inputs: speed-up and max difference against float64. Target: >= 5x
  mining    exact mining (mine.py's exact_search over a page store) of 10,000 pages on the GPU: queries/s
  gpu_paths the GPU-only code paths run for real on the tiny model: the TF32 guard from both torch APIs, the head
            seeded under a CUDA default device, a paged 8-bit AdamW resume, --compile_heads, fp16 + LoRA, mine.py on
            CUDA against the CPU
  train     train.py at real size on a random InternVL3.5-1B (LoRA + gradient checkpointing, batch 8 and 32,
            with and without GradCache, without checkpointing at 32; --auto_batch's choice; paged 8-bit AdamW when
            bitsandbytes runs):
            pairs/s and peak memory. Target: >= 33 pairs/s (one epoch of colpali_train_set in <= 1 h)
Writes results.json (every number, with date, device and versions) and results.md (the tables), and prints the
tables. Needs torch, transformers, peft, accelerate and Pillow (the GPU machine has them); mteb, faiss,
bitsandbytes and flash-attn are optional. Nothing is installed here and nothing leaves the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from benchlib import env, matmul_tflops, reset_peak, sync, timed  # noqa: E402

from colintern.cli import run_cli, setup_logging  # noqa: E402
from colintern.errors import UserError  # noqa: E402
from colintern.files import atomic_write_json, atomic_write_text  # noqa: E402
from colintern.device import peak_memory_gib  # noqa: E402

log = logging.getLogger("colintern.bench.gpu_suite")

TARGETS = {"encode_mfu_4_tiles": 0.40, "maxsim_speedup": 5.0, "train_pairs_per_s": 33.0}


# ------------------------------------------------------------------------------------------------ the suite


class Suite:
    """Runs sections within a time budget; collects rows, notes and failures."""

    def __init__(self, args: argparse.Namespace, device: torch.device, work: Path):
        self.args, self.device, self.work = args, device, work
        self.start = time.perf_counter()
        self.results: dict[str, Any] = {"env": env(device), "dry_run": args.dry_run, "targets": TARGETS,
                                        "sections": {}}
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.ceiling_tflops: float | None = None

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def run(self, name: str, section: Callable[["Suite"], dict[str, Any]], estimate_s: float) -> None:
        record: dict[str, Any] = {"estimate_s": estimate_s}
        if self.args.sections and name not in self.args.sections:
            return
        if self.left() < estimate_s and not self.args.dry_run:
            record["status"] = f"skipped: {self.left():.0f} s left of the budget, about {estimate_s:.0f} s needed"
        else:
            t0 = time.perf_counter()
            try:
                record.update(section(self))
                record["status"] = "ok"
            except Exception as err:  # noqa: BLE001 - a broken section must not stop the others
                tail = traceback.format_exc().strip().splitlines()[-1]
                record["status"] = f"failed: {type(err).__name__}: {err}"[:500]
                record["traceback_last_line"] = tail
                log.error("section %s failed: %s", name, record["status"])
            record["seconds"] = round(time.perf_counter() - t0, 2)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        log.info("section %s: %s", name, record["status"])
        self.results["sections"][name] = record

    def size(self, real: Any, dry: Any) -> Any:
        return dry if self.args.dry_run else real

    def tiny(self, family: str) -> str:
        """A tiny model folder of that family (dry runs), built once."""
        path = self.work / f"tiny_{family}"
        if not path.exists():
            from colintern.backbones.registry import get_family

            get_family(family).build_tiny(str(path), seed=0)
        return str(path)

    def tokenizer_dir(self) -> Path:
        """A folder with the toy tokenizer (its special-token ids fit the real vocabularies), built once."""
        path = self.work / "tokenizer"
        if not path.exists():
            from colintern.testing.toy_tokenizer import build_tokenizer

            build_tokenizer(str(path))
        return path


# ------------------------------------------------------------------------------------------------ sections


def section_env(suite: Suite) -> dict[str, Any]:
    """Which optional parts run here, and why not."""
    device = suite.device
    parts: dict[str, str] = {}
    try:
        from transformers.utils import is_flash_attn_2_available

        parts["flash_attn"] = "runs" if device.type == "cuda" and is_flash_attn_2_available() else \
            "skipped: " + ("needs CUDA" if device.type != "cuda" else "flash-attn is not installed")
    except ImportError as err:
        parts["flash_attn"] = f"skipped: {err}"
    try:
        import bitsandbytes as bnb

        probe = torch.nn.Parameter(torch.zeros(100_000, device=device))  # paged from 100,000 elements
        probe.grad = torch.ones_like(probe)
        (bnb.optim.PagedAdamW8bit if device.type == "cuda" else bnb.optim.AdamW8bit)([probe], lr=1e-3).step()
        parts["bitsandbytes"] = "runs (8-bit AdamW step)"
    except Exception as err:  # noqa: BLE001
        parts["bitsandbytes"] = f"skipped: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    try:
        import faiss

        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        parts["faiss"] = f"runs on {gpus} GPU(s)" if gpus else "skipped on the GPU: faiss-cpu (no GPU support)"
    except ImportError:
        parts["faiss"] = "skipped: not installed"
    try:
        import mteb

        parts["mteb"] = f"runs ({mteb.__version__})"
    except ImportError:
        parts["mteb"] = "skipped: not installed (maxsim compares against its algorithm restated)"
    try:  # the page processors use transformers' PIL image processors (GotOcr2, Qwen2-VL), new in 5.x releases
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil  # noqa: F401
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: F401

        parts["pil_image_processors"] = "runs"
    except ImportError as err:
        parts["pil_image_processors"] = (f"missing ({err}): bring transformers==5.23.0 (pip download --no-deps "
                                         "transformers==5.23.0, about 11 MiB) and put it first on PYTHONPATH")
    for name, state in parts.items():
        log.info("%s: %s", name, state)
    return {"optional": parts}


def section_ceiling(suite: Suite) -> dict[str, Any]:
    n = suite.size(8192, 256)
    rates = {str(dtype).replace("torch.", ""): matmul_tflops(suite.device, dtype, n=n)
             for dtype in ({torch.bfloat16, torch.float32} if suite.device.type == "cuda" else {torch.float32})}
    suite.ceiling_tflops = rates.get("bfloat16", rates["float32"])
    return {"matmul_tflops": rates}


class FlopCounter:
    """FLOPs of one forward pass, counted from what runs: 2 x in x out per output row of every nn.Linear,
    2 x kernel x out per output position of every conv, and 4 x Lq x Lk x head_dim per head of every
    scaled_dot_product_attention call (halved when causal)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.total = model, 0.0

    def __enter__(self) -> "FlopCounter":
        def linear(module, inputs, output):
            self.total += 2.0 * output.numel() * module.in_features

        def conv(module, inputs, output):
            kernel = math.prod(module.kernel_size) * module.in_channels // module.groups
            self.total += 2.0 * output.numel() * kernel

        self.hooks = []
        for module in self.model.modules():
            if isinstance(module, torch.nn.Linear):
                self.hooks.append(module.register_forward_hook(linear))
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
                self.hooks.append(module.register_forward_hook(conv))
        self.sdpa = torch.nn.functional.scaled_dot_product_attention

        def counted(query, key, value, *args, **kwargs):
            lq, lk, d = query.shape[-2], key.shape[-2], query.shape[-1]
            heads = math.prod(query.shape[:-2])
            causal = kwargs.get("is_causal", False)
            self.total += 4.0 * heads * lq * lk * d * (0.5 if causal else 1.0)
            return self.sdpa(query, key, value, *args, **kwargs)

        torch.nn.functional.scaled_dot_product_attention = counted
        return self

    def __exit__(self, *exc: Any) -> None:
        for hook in self.hooks:
            hook.remove()
        torch.nn.functional.scaled_dot_product_attention = self.sdpa


def encode_rows(suite: Suite, model, family: str, pages: dict[str, Any], batches: list[int]) -> list[dict]:
    """Forward-pass speed of each (page kind, batch): pages/s, tokens/s, MFU, peak memory."""
    from encode import to_device

    rows = []
    repeats, warmup = suite.size(3, 1), suite.size(1, 0)
    for kind, page in pages.items():
        for batch in batches:
            inputs = to_device(model.processor.process_images([page] * batch), suite.device)
            with torch.inference_mode(), FlopCounter(model) as flops:
                model(inputs)
            reset_peak(suite.device)
            with torch.inference_mode():
                for _ in range(warmup):
                    model(inputs)
                times = [timed(lambda: model(inputs), suite.device)[0] for _ in range(repeats)]
            sync(suite.device)
            t = statistics.median(times)
            seq = int(inputs["attention_mask"][0].sum())
            rows.append({"family": family, "attn": model.backbone.config._attn_implementation, "pages": kind,
                         "batch": batch, "seq_len": seq, "gflop_per_page": flops.total / batch / 1e9,
                         "pages_per_s": batch / t, "tokens_per_s": batch * seq / t,
                         "mfu": flops.total / t / 1e12 / suite.ceiling_tflops if suite.ceiling_tflops else None,
                         "peak_mem_gib": peak_memory_gib(suite.device)[0]})
            log.info("encode %s %s %s batch %d: %.1f pages/s, MFU %s", family, rows[-1]["attn"], kind, batch,
                     rows[-1]["pages_per_s"], f"{rows[-1]['mfu']:.1%}" if rows[-1]["mfu"] is not None else "-")
    return rows


def internvl_model(suite: Suite, dtype: torch.dtype, attn: str = "sdpa"):
    """A random InternVL3.5-1B on the device (dry run: the tiny model)."""
    from encode import random_internvl35_1b

    from colintern.retriever.model import ColIntern

    if suite.args.dry_run:
        return ColIntern.from_pretrained(suite.tiny("internvl"), device=str(suite.device), dtype=dtype)
    return random_internvl35_1b(str(suite.tokenizer_dir()), suite.device, dtype, attn, seed=0)


def qwen_model(suite: Suite, dtype: torch.dtype):
    """A random Qwen3-VL-2B on the device (dry run: the tiny model)."""
    from encode import build_on

    from colintern.backbones.base import load_tokenizer
    from colintern.retriever.model import ColIntern, config_for_backbone
    from colintern.backbones.qwen3vl import backbone_class, describe_qwen3vl, qwen3vl_2b_config, qwen3vl_token_ids

    if suite.args.dry_run:
        return ColIntern.from_pretrained(suite.tiny("qwen3_vl"), device=str(suite.device), dtype=dtype,
                                         max_visual_tokens=64)
    tokenizer = load_tokenizer(str(suite.tokenizer_dir()))
    config = qwen3vl_2b_config(qwen3vl_token_ids(tokenizer))
    torch.manual_seed(0)
    backbone = build_on(suite.device, dtype, lambda: backbone_class()(config).eval())
    loaded = describe_qwen3vl(backbone, tokenizer, {})
    return ColIntern(loaded, config_for_backbone(loaded, "random-Qwen3-VL-2B")).to(suite.device)


def single_vector(model):
    """The same backbone as a single-vector (mean-pooled), bidirectional ColIntern with a fresh head."""
    import dataclasses

    from colintern.backbones.base import LoadedBackbone
    from colintern.retriever.model import ColIntern

    loaded = LoadedBackbone(model=model.backbone, tokenizer=model.tokenizer, family=model.config.backbone,
                            layout="native", hidden_size=model.config.hidden_size, signature=model.signature)
    config = dataclasses.replace(model.config, embedding="single", pooling="mean", attention="bidirectional",
                                 n_augmentation=0)
    return ColIntern(loaded, config).to(next(model.backbone.parameters()).device)


def section_encode(suite: Suite) -> dict[str, Any]:
    from encode import synthetic_page

    rows = []
    tile = suite.size(448, 112)
    tiles = suite.size([1, 4, 12], [1, 2])
    batches = suite.size([4, 16], [1, 2])
    attns = ["sdpa"]
    if "runs" in suite.results["sections"].get("env", {}).get("optional", {}).get("flash_attn", ""):
        attns.append("flash_attention_2")
    for attn in attns:
        model = internvl_model(suite, suite.dtype, attn)
        model.config.max_tiles = max(tiles)
        model.processor.image_processor.max_patches = max(tiles)
        pages = {f"{t}+1 tiles" if t > 1 else "1 tile": synthetic_page(t, tile, seed=t) for t in tiles}
        rows += encode_rows(suite, model, "internvl3.5-1b" if not suite.args.dry_run else "tiny internvl", pages,
                            batches)
        if attn == "sdpa":  # the same backbone as a single-vector bidirectional retriever (seed 002)
            single = single_vector(model)
            four = {k: v for k, v in pages.items() if k.startswith(str(max(tiles)))}
            rows += [dict(r, family=r["family"] + " single/bidir")
                     for r in encode_rows(suite, single, "internvl3.5-1b" if not suite.args.dry_run else
                                          "tiny internvl", four, batches[-1:])]
            del single
        del model
    model = qwen_model(suite, suite.dtype)
    page = model.processor.worst_case_page()
    rows += encode_rows(suite, model, "qwen3-vl-2b" if not suite.args.dry_run else "tiny qwen3-vl",
                        {f"{model.processor.page_cost(page)} visual tokens": page}, batches)
    four = [r for r in rows if r["family"] == "internvl3.5-1b" and r["pages"] == "4+1 tiles" and r["mfu"]]
    best = max((r["mfu"] for r in four), default=None)
    return {"rows": rows, "best_mfu_4_tiles": best,
            "meets_target": None if best is None else best >= TARGETS["encode_mfu_4_tiles"]}


def section_numerics(suite: Suite) -> dict[str, Any]:
    """bf16 on this device against fp32 of the same weights: cosine of every token vector."""
    from encode import synthetic_page

    reference = internvl_model(suite, torch.float32)
    low = internvl_model(suite, suite.dtype)
    low.load_state_dict(reference.state_dict())  # the same weights, cast to the low dtype
    pages = [synthetic_page(tiles, suite.size(448, 112), seed=tiles) for tiles in (1, 2)]
    queries = ["what is the total revenue in 2023?", "figure 3 caption"]
    cos = []
    for a, b in zip(reference.encode_images(pages) + reference.encode_queries(queries),
                    low.encode_images(pages) + low.encode_queries(queries)):
        cos.append(torch.nn.functional.cosine_similarity(a, b, dim=-1))  # (L,)
    every = torch.cat(cos)
    return {"low_dtype": str(suite.dtype).replace("torch.", ""), "tokens": int(every.numel()),
            "cosine_min": float(every.min()), "cosine_mean": float(every.mean())}


def mteb_or_restated() -> tuple[Callable, str]:
    """mteb's max_sim, or (mteb absent) its algorithm restated: zero-padded einsum, max over pages, sum."""
    try:
        from mteb.similarity_functions import max_sim

        return max_sim, "mteb.similarity_functions.max_sim"
    except ImportError:
        def restated(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            scores = torch.einsum("ash,bth->abst", a, b)  # (Q, D, Lq, Ld)
            return scores.max(dim=-1).values.sum(dim=-1)

        return restated, "mteb's max_sim algorithm restated (mteb not installed)"


def section_maxsim(suite: Suite) -> dict[str, Any]:
    from scoring import errors, ragged, reference_sample, time_it
    from torch.nn.utils.rnn import pad_sequence

    from colintern.retriever.scoring import maxsim

    g = torch.Generator().manual_seed(0)
    n_q, n_d = suite.size((256, 2000), (8, 24))
    qs, docs = ragged(n_q, 20, 40, 128, g), ragged(n_d, 300, 1800, 128, g) if not suite.args.dry_run else \
        ragged(n_d, 30, 180, 128, g)
    qi, di, ref = reference_sample(qs, docs, suite.size(200, 20), g)
    device = suite.device
    repeats = suite.size(3, 1)
    docs_here = [d.to(device) for d in docs]  # pages already on the GPU, as the other side's are (its pads below)
    ours_t, ours = time_it(lambda: maxsim(qs, docs_here, device=device), repeats, device)
    ours_cpu_t, _ = time_it(lambda: maxsim(qs, docs, device=device), repeats, device)
    their_fn, theirs_name = mteb_or_restated()
    q_pad = pad_sequence([q.to(device) for q in qs], batch_first=True)
    chunk = suite.size(50, 8)  # pages per call: the padded (Q, D, Lq, Ld) tensor must fit in memory
    d_pads = [pad_sequence([d.to(device) for d in docs[i:i + chunk]], batch_first=True)
              for i in range(0, len(docs), chunk)]
    their_t, theirs = time_it(lambda: torch.cat([their_fn(q_pad, d) for d in d_pads], dim=1), repeats, device)
    speedup = statistics.median(their_t) / statistics.median(ours_t)
    tiles = []  # (padded doc tokens per bucket, query tokens per GEMM): is the default tile the right one here?
    for doc_chunk, query_chunk in suite.size([(16384, 4096), (65536, 4096), (16384, 16384), (65536, 16384)],
                                             [(512, 64), (2048, 256)]):
        t, _ = time_it(lambda: maxsim(qs, docs_here, device=device, doc_chunk=doc_chunk, query_chunk=query_chunk),
                       2, device)
        tiles.append({"doc_chunk": doc_chunk, "query_chunk": query_chunk, "seconds": min(t)})
    flop = 2 * sum(q.shape[0] for q in qs) * sum(d.shape[0] for d in docs) * qs[0].shape[1]
    fused = fused_rows(suite, qs, docs, (qi, di, ref), statistics.median(their_t), flop, repeats)
    return {"fused": fused, "tiles": tiles, "colintern_tflops": flop / statistics.median(ours_t) / 1e12,"queries": n_q, "pages": n_d, "against": theirs_name, "colintern_s": ours_t,
            "colintern_pages_in_cpu_memory_s": ours_cpu_t, "other_s": their_t, "speedup": speedup, "colintern_err": errors(ours, qi, di, ref), "other_err": errors(theirs, qi, di, ref),
            "meets_target": speedup >= TARGETS["maxsim_speedup"]}


def fused_rows(suite: Suite, qs: list, docs: list, sample: tuple, other_s: float, flop: int,
               repeats: int) -> list[dict[str, Any]]:
    """The fused Triton kernel (colintern.retriever.maxsim_kernel) in float32 (IEEE), float16 and bfloat16 inputs against the
    GEMM path (COLINTERN_FUSED_MAXSIM=0) and the other scorer: seconds, TFLOP/s, speedup, error against float64 of
    the float32 vectors. On a CPU dry run it runs in Triton's interpreter (no bfloat16 there: its tl.dot is wrong)."""
    import os

    from scoring import errors, time_it

    from colintern.retriever import maxsim_kernel
    from colintern.retriever.scoring import maxsim

    device = suite.device
    os.environ["COLINTERN_FUSED_MAXSIM"] = "0"
    try:
        gemm_t, _ = time_it(lambda: maxsim(qs, [d.to(device) for d in docs], device=device), repeats, device)
    finally:
        os.environ.pop("COLINTERN_FUSED_MAXSIM")
    rows = [{"kernel": "gemm (colintern.retriever.scoring, fp32)", "seconds": gemm_t,
             "speedup_vs_other": other_s / statistics.median(gemm_t)}]
    if not maxsim_kernel.available():
        return rows + [{"kernel": "fused", "skipped": "Triton is not importable here"}]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        if dtype == torch.bfloat16 and device.type == "cpu":
            continue
        q_in, d_in = [q.to(device, dtype) for q in qs], [d.to(device, dtype) for d in docs]
        t, scores = time_it(lambda: maxsim_kernel.maxsim_fused(q_in, d_in, device=device), repeats, device)
        seconds = statistics.median(t)
        rows.append({"kernel": f"fused {str(dtype).replace('torch.', '')}", "seconds": t,
                     "tflops": flop / seconds / 1e12, "speedup_vs_other": other_s / seconds,
                     "speedup_vs_gemm": statistics.median(gemm_t) / seconds, **errors(scores, *sample),
                     "meets_target": other_s / seconds >= TARGETS["maxsim_speedup"]})
    return rows


def section_mining(suite: Suite) -> dict[str, Any]:
    from mining import clustered_corpus, write_page_store

    from colintern.mine.search import Pair, exact_search, positive_scores
    from colintern.retriever.scoring import maxsim

    n_pages, n_queries = suite.size((10_000, 1_000), (60, 20))
    qs, pages = clustered_corpus(n_pages, n_queries, (20, 40), suite.size((300, 1800), (30, 180)), 128, seed=0)
    store = write_page_store(suite.work / "store", pages)
    pairs = [Pair(row=i, text=f"query {i}", page=i % n_pages) for i in range(n_queries)]
    positives = {p.text: np.asarray([p.page]) for p in pairs}
    batch = suite.size(250, 10)  # queries per search batch (mine.py --search_batch): each batch scans the store

    def search() -> list:
        out = []
        for start in range(0, n_queries, batch):
            which = np.arange(start, min(start + batch, n_queries))
            part = [pairs[i] for i in which]
            batch_qs = [qs[i] for i in which]  # the batch's own queries, as Miner.search_batch passes them
            local = np.arange(len(which))
            pos = positive_scores(batch_qs, local, part, store, suite.device)
            out += exact_search(batch_qs, local, part, pos, positives, store, maxsim, suite.device, 20, 0, 0.95)
        return out

    streamed_s, streamed = timed(search, suite.device)
    resident = store.make_resident(suite.device, None if suite.device.type == "cuda" else 1 << 40)
    seconds, result = timed(search, suite.device)
    same = all(np.array_equal(a[0], b[0]) for a, b in zip(streamed, result))
    per_query = seconds / n_queries
    return {"pages": n_pages, "page_tokens": store.n_tokens, "queries": n_queries, "search_batch": batch,
            "streamed_s": streamed_s, "resident": resident, "search_s": seconds, "queries_per_s": n_queries / seconds,
            "resident_equals_streamed": same,
            "colpali_train_set_hours": per_query * 118_695 * (118_695 / n_pages) / 3600,
            "negatives_per_query": float(np.mean([len(r[0]) for r in result]))}


def section_train(suite: Suite) -> dict[str, Any]:
    """train.py in this process on a random real-size model and synthetic pages (no datasets package needed)."""
    from encode import save_random_internvl35_1b
    from train_step import run_in_this_process

    if suite.args.dry_run:
        model_dir = suite.tiny("internvl")
    else:
        model_dir = save_random_internvl35_1b(str(suite.work / "internvl35_1b"), suite.device)
    n_rows = suite.size(32 * 8, 16)
    triples = write_triples(suite.work / "data", n_rows, suite.size(896, 112))
    steps = suite.size(6, 2)
    configs = suite.size(
        [("lora_gc", 8, []), ("lora_gc", 32, []), ("lora_no_gc", 32, ["--no_gradient_checkpointing"]),
         ("gradcache", 32, ["--grad_cache", "--grad_accum", "4"]), ("auto_batch", 0, ["--auto_batch"])],
        [("lora_gc", 2, []), ("lora_no_gc", 2, ["--no_gradient_checkpointing"]),
         ("gradcache", 4, ["--grad_cache", "--grad_accum", "2"])])
    if "runs" in suite.results["sections"].get("env", {}).get("optional", {}).get("bitsandbytes", ""):
        configs.append(("paged_adamw_8bit", suite.size(8, 2), ["--optimizer", "paged_adamw_8bit"]))
    if suite.args.train_configs:
        configs = [c for c in configs if f"{c[0]}_{c[1]}" in suite.args.train_configs]
    rows = []
    for name, batch, extra in configs:
        out = suite.work / f"train_{name}_{batch}"
        micro = batch // 4 if "--grad_cache" in extra and not suite.args.dry_run else \
            batch // 2 if "--grad_cache" in extra else batch
        argv = ["--model_id", model_dir, "--train_jsonl", str(triples), "--root", str(triples.parent),
                "--out_dir", str(out), "--batch_size", str(max(1, micro)), "--max_steps", str(steps),
                "--save_every", "0", "--num_workers", suite.size("4", "0"), "--lora",
                *([] if "--no_gradient_checkpointing" in extra else ["--gradient_checkpointing"]), "--seed", "0",
                "--max_tiles", suite.size("4", "2"), "--device", str(suite.device), "--no_page_check",
                *[a for a in extra if a != "--no_gradient_checkpointing"]]
        reset_peak(suite.device)
        try:
            with collected_logs() as messages:
                result = run_in_this_process(argv, str(suite.device))
        except Exception as err:  # noqa: BLE001 - an OOM or a failure of one configuration is a row
            rows.append({"config": name, "batch": batch, "status": f"{type(err).__name__}: {err}"[:300]})
            continue
        chosen = [int(m.split()[2]) for m in messages if m.startswith("auto_batch: micro-batch ")]
        steady = result["metrics"][1:] or result["metrics"]
        pairs_s = statistics.median(r["pairs_per_s"] for r in steady)
        rows.append({"config": name, "batch": batch or (chosen[0] if chosen else None), "status": "ok",
                     "pairs_per_s": pairs_s, "peak_mem_gib": result["peak_mem_gib"], "steps": len(result["metrics"]),
                     "auto_batch_choice": chosen[0] if chosen else None})
        log.info("train %s batch %s: %.1f pairs/s, peak %.1f GiB", name, rows[-1]["batch"], pairs_s,
                 result["peak_mem_gib"])
    best = max((r["pairs_per_s"] for r in rows if r.get("status") == "ok"), default=None)
    return {"rows": rows, "best_pairs_per_s": best,
            "meets_target": None if best is None else best >= TARGETS["train_pairs_per_s"]}


def section_gpu_paths(suite: Suite) -> dict[str, Any]:
    """ColIntern's GPU-only code paths, run for real on the tiny model (CPU tests only simulate them): each check
    records what it observed and whether that is what the CPU simulation promised."""
    checks: dict[str, dict[str, Any]] = {}
    for name, check in (("tf32_guard", _check_tf32_guard), ("head_seed_under_cuda_default", _check_head_seed),
                        ("paged_optimizer_resume", _check_paged_resume), ("compile_heads", _check_compile_heads),
                        ("fp16_lora_warning", _check_fp16_lora), ("mine_on_gpu", _check_mine_on_gpu)):
        try:
            checks[name] = check(suite)
        except Exception as err:  # noqa: BLE001 - one broken path is a row, the others still run
            checks[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:400]}
        log.info("gpu path %s: %s", name, checks[name])
    return {"checks": checks, "all_ok": all(c.get("ok") for c in checks.values())}


def _check_tf32_guard(suite: Suite) -> dict[str, Any]:
    """maxsim stays float32-exact after a caller enabled TF32 through either API, and leaves that choice alone."""
    from scoring import errors, ragged, reference_sample

    from colintern.retriever.scoring import maxsim

    g = torch.Generator().manual_seed(0)
    qs, docs = ragged(16, 5, 30, 128, g), ragged(64, 50, 400, 128, g)
    qi, di, ref = reference_sample(qs, docs, 100, g)
    mm = torch.backends.cuda.matmul
    mm.allow_tf32 = True  # the legacy switch
    legacy_err = errors(maxsim(qs, docs, device=suite.device), qi, di, ref)["max_abs_err"]
    legacy_kept = mm.allow_tf32 is True
    mm.allow_tf32 = False
    old = mm.fp32_precision
    mm.fp32_precision = "tf32"  # the new API, as H100 notebooks set it
    new_err = errors(maxsim(qs, docs, device=suite.device), qi, di, ref)["max_abs_err"]
    new_kept = mm.fp32_precision == "tf32"
    mm.fp32_precision = old
    return {"ok": max(legacy_err, new_err) < 1e-4 and legacy_kept and new_kept, "max_abs_err_legacy": legacy_err,
            "max_abs_err_new_api": new_err, "caller_state_kept": [legacy_kept, new_kept]}


def _check_head_seed(suite: Suite) -> dict[str, Any]:
    """The projection head is seeded by a CPU generator: the same weights under a CUDA default device."""
    from colintern.retriever.model import ColIntern

    tiny = suite.tiny("internvl")
    on_cpu = ColIntern.from_pretrained(tiny, device="cpu", dtype="fp32").head.state_dict()
    torch.set_default_device(suite.device)
    try:
        on_gpu = ColIntern.from_pretrained(tiny, device=str(suite.device), dtype="fp32").head.state_dict()
    finally:
        torch.set_default_device("cpu")
    diff = max(float((on_cpu[k] - on_gpu[k].cpu()).abs().max()) for k in on_cpu)
    return {"ok": diff == 0.0, "max_abs_diff": diff}


def _check_paged_resume(suite: Suite) -> dict[str, Any]:
    """A paged 8-bit AdamW saved and loaded (weights_only, like a checkpoint) pages again after
    repage_optimizer_states, and continues bit for bit like the run that was never interrupted."""
    import io

    import bitsandbytes as bnb

    from colintern.train.optim import repage_optimizer_states

    g = torch.Generator(device=suite.device).manual_seed(0)
    start = torch.randn(300_000, device=suite.device, generator=g)
    grads = [torch.randn(300_000, device=suite.device, generator=g) for _ in range(4)]

    def optimizer(values: torch.Tensor):
        p = torch.nn.Parameter(values.clone())
        return p, bnb.optim.PagedAdamW8bit([p], lr=1e-3)

    p_ref, o_ref = optimizer(start)
    for grad in grads[:2]:
        p_ref.grad = grad.clone()
        o_ref.step()
    buf = io.BytesIO()
    torch.save(o_ref.state_dict(), buf)
    middle = p_ref.detach().clone()
    for grad in grads[2:]:
        p_ref.grad = grad.clone()
        o_ref.step()
    results = {}
    for repage in (False, True):
        buf.seek(0)
        p, o = optimizer(middle)
        o.load_state_dict(torch.load(buf, map_location="cpu", weights_only=True))
        moved = repage_optimizer_states(o) if repage else 0
        for grad in grads[2:]:
            p.grad = grad.clone()
            o.step()
        results[repage] = {"paged": bool(getattr(o.state[p]["state1"], "is_paged", False)), "moved": moved,
                           "equal_to_uninterrupted": torch.equal(p.detach(), p_ref.detach())}
    pages_here = suite.device.type == "cuda"  # bitsandbytes pages on CUDA only
    return {"ok": results[True]["paged"] == pages_here and results[True]["equal_to_uninterrupted"],
            "without_repage": results[False], "with_repage": results[True]}


def _tiny_train(suite: Suite, name: str, extra: list[str]) -> tuple[dict[str, Any], list[str]]:
    """train.py on the tiny model and small local pages, in this process; (result, its log messages)."""
    from train_step import run_in_this_process

    data = suite.work / "tiny_data"
    if not data.exists():
        write_triples(data, 16, 112)
    out = suite.work / f"tiny_{name}"
    argv = ["--model_id", suite.tiny("internvl"), "--train_jsonl", str(data / "train.jsonl"), "--root", str(data),
            "--out_dir", str(out), "--batch_size", "4", "--max_steps", "3", "--save_every", "0", "--seed", "0",
            "--device", str(suite.device), "--no_page_check", *extra]
    with collected_logs() as messages:
        result = run_in_this_process(argv, str(suite.device))
    result["out_dir"] = str(out)
    return result, messages


def _check_compile_heads(suite: Suite) -> dict[str, Any]:
    backend = ["--compile_backend", "eager"] if suite.args.dry_run else []  # a CPU dry run compiles no C++
    result, messages = _tiny_train(suite, "compile", ["--compile_heads", "--lora", *backend])
    compiled = any(m.startswith("compiled the projection head") for m in messages)
    failed = [m for m in messages if "torch.compile failed" in m]
    losses = [r["loss"] for r in result["metrics"]]
    return {"ok": compiled and not failed and all(math.isfinite(x) for x in losses), "compiled": compiled,
            "failures": failed, "losses": losses}


def _check_fp16_lora(suite: Suite) -> dict[str, Any]:
    result, messages = _tiny_train(suite, "fp16", ["--dtype", "fp16", "--lora"])
    warned = any("--dtype fp16 with --lora" in m for m in messages)
    losses = [r["loss"] for r in result["metrics"]]
    return {"ok": warned and all(math.isfinite(x) for x in losses), "warned": warned, "losses": losses}


def _check_mine_on_gpu(suite: Suite) -> dict[str, Any]:
    """mine.py --device cuda (exact, store resident) against --device cpu, fp32 on both: the same negatives."""
    import importlib.util

    train_result, _ = _tiny_train(suite, "for_mine", [])
    ckpt = sorted(Path(train_result["out_dir"]).glob("colintern_heads_*.pt"))[-1]
    spec = importlib.util.spec_from_file_location("colintern_mine_script", Path(__file__).resolve().parents[1] /
                                                  "mine.py")
    mine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mine)
    data = suite.work / "tiny_data"
    negatives: dict[int, list] = {}
    messages: list[str] = []
    for n, device in enumerate((str(suite.device), "cpu")):
        out = suite.work / f"mined_{n}.jsonl"
        with collected_logs() as logged:
            code = mine.main(["--model_id", suite.tiny("internvl"), "--ckpt", str(ckpt), "--train_jsonl",
                              str(data / "train.jsonl"), "--root", str(data), "--out_jsonl", str(out), "--k", "5",
                              "--method", "exact", "--device", device, "--dtype", "fp32"])
        messages += logged
        if code:
            raise UserError(f"mine.py --device {device} exited with {code}")
        negatives[n] = [json.loads(line)["negs"] for line in out.read_text().splitlines() if line.strip()]
    gpu, cpu = negatives[0], negatives[1]
    overlap = statistics.mean(len(set(a) & set(b)) / len(set(a) | set(b)) if a or b else 1.0 for a, b in zip(gpu, cpu))
    resident = any(m.startswith("page store resident on cuda") for m in messages) or suite.device.type != "cuda"
    return {"ok": resident and len(gpu) == len(cpu) and overlap >= 0.9, "store_resident": resident,
            "rows": len(gpu), "negatives_jaccard_gpu_vs_cpu": overlap}


@contextlib.contextmanager
def collected_logs() -> Iterator[list[str]]:
    """Every colintern log message emitted inside the block, in order (for the checks and the auto_batch choice)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.DEBUG)
    logging.getLogger("colintern").addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger("colintern").removeHandler(handler)


def write_triples(folder: Path, n_rows: int, size: int) -> Path:
    """n_rows distinct noise pages (size x size px) and a triples file asking one query of each."""
    from PIL import Image

    (folder / "pages").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n_rows):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "pages" / f"p{i}.png")
        lines.append(json.dumps({"query": f"which page shows the table of section {i}?", "pos": f"pages/p{i}.png"}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ output


def markdown(results: dict[str, Any]) -> str:
    env_ = results["env"]
    lines = [f"# GPU suite{' (dry run)' if results['dry_run'] else ''}: {env_['device']}, {env_['date']}", "",
             f"torch {env_['torch']}, CUDA {env_['cuda']}, transformers {env_['transformers']}, peft {env_['peft']}",
             "", "| section | status | seconds |", "| --- | --- | --- |"]
    for name, record in results["sections"].items():
        lines.append(f"| {name} | {record['status']} | {record.get('seconds', '-')} |")
    sections = results["sections"]
    if sections.get("env", {}).get("optional"):
        lines += ["", "## Optional parts", ""] + [f"- {k}: {v}" for k, v in sections["env"]["optional"].items()]
    if sections.get("encode", {}).get("rows"):
        lines += ["", "## Page encoding", "", "| model | attn | pages | batch | seq | GFLOP/page | pages/s | MFU | "
                  "peak GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sections["encode"]["rows"]:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            lines.append(f"| {r['family']} | {r['attn']} | {r['pages']} | {r['batch']} | {r['seq_len']} | "
                         f"{r['gflop_per_page']:.3g} | {r['pages_per_s']:.1f} | {mfu} | {r['peak_mem_gib']:.2f} |")
    for name in ("numerics", "maxsim", "mining", "gpu_paths"):
        record = sections.get(name, {})
        if record.get("status") == "ok":
            shown = {k: v for k, v in record.items() if k not in ("status", "estimate_s", "seconds")}
            lines += ["", f"## {name}", "", "```json", json.dumps(shown, indent=1, default=str), "```"]
    if sections.get("train", {}).get("rows"):
        lines += ["", "## Training step (train.py)", "", "| config | batch | status | pairs/s | peak GiB |",
                  "| --- | --- | --- | --- | --- |"]
        for r in sections["train"]["rows"]:
            lines.append(f"| {r['config']} | {r['batch']} | {r['status']} | {r.get('pairs_per_s', float('nan')):.1f} | "
                         f"{r.get('peak_mem_gib', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def write_results(suite: Suite, out: Path) -> str:
    """results.json and results.md as they stand now; returns the markdown."""
    suite.results["total_s"] = round(time.perf_counter() - suite.start, 1)
    atomic_write_json(out / "results.json", suite.results)
    text = markdown(suite.results)
    atomic_write_text(out / "results.md", text)
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_suite.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench/gpu_suite", help="results.json and results.md go here "
                   "(default: outputs/bench/gpu_suite)")
    p.add_argument("--dry_run", action="store_true", help="tiny shapes on whatever device there is (a CPU: "
                   "seconds), to check the suite itself; its numbers mean nothing")
    p.add_argument("--budget_s", type=float, default=480, help="stop starting sections after this many seconds "
                   "(default: 480, 8 minutes)")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=None,
                   help="run only these sections (default: all, in order)")
    p.add_argument("--train_configs", nargs="+", default=None, metavar="NAME_BATCH",
                   help="train section: only these configurations, e.g. lora_gc_32 lora_no_gc_32 (default: all)")
    return p.parse_args(argv)


SECTIONS: dict[str, tuple[Callable[[Suite], dict[str, Any]], float]] = {
    "env": (section_env, 5), "ceiling": (section_ceiling, 10), "encode": (section_encode, 120),
    "numerics": (section_numerics, 30), "maxsim": (section_maxsim, 30), "mining": (section_mining, 60),
    "gpu_paths": (section_gpu_paths, 60), "train": (section_train, 200),
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    if not torch.cuda.is_available() and not args.dry_run:
        raise UserError("the GPU suite needs a CUDA GPU; --dry_run runs it with tiny shapes on this machine")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as work:
        suite = Suite(args, device, Path(work))
        for name, (section, estimate) in SECTIONS.items():
            suite.run(name, section, estimate)
            write_results(suite, out)  # after every section: a run killed at its time limit keeps what it measured
    text = write_results(suite, out)
    print(text)
    print(f"written: {out / 'results.json'}, {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, out_flag="--out"))
