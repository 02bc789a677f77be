r"""Mine hard negatives for ColIntern training (SPEC §7, §8).

    python mine.py --model_id OpenGVLab/InternVL3_5-1B-Instruct --ckpt outputs/train/colintern_heads_epoch1.pt \
        --hub_name vidore/colpali_train_set --split train --out_jsonl outputs/mine/mined_triples.jsonl \
        --k 20 --doc_batch 16 --query_batch 64

Every distinct page of the dataset (rows sharing image_filename, or the same image bytes, are one page) is
encoded once with the checkpoint's head, LoRA and formatting, and written to disk as fp16 token vectors. Each
(query, page) row then gets the `--k` best-scoring pages that are not its positives, found either exactly
(`--method exact`: late-interaction MaxSim against every page, streamed from disk) or with a FAISS first
stage over every page token vector re-ranked by exact MaxSim (`--method faiss`, see colintern/mining.py for
why token vectors and not a pooled page vector). The default `--method auto` picks exact on a GPU and for
corpora up to 3M page tokens, where it is as fast as FAISS, and FAISS above that. A page scoring above
`--fn_filter` x the positive's score is treated as a probable unlabelled positive and dropped.

Output, one line per (query, page) pair, in dataset order:
    {"query": str, "pos": "<dataset>/<split>/doc_<i>.png", "negs": [...],
     "scores": {"pos": float, "negs": [float, ...]}}
plus `<name>.meta.json` (settings, counts, timings, candidate recall). Lines go to `<out>.partial` as they are
produced; `--resume` continues an interrupted run; the final name appears only when the file is complete.

Scale-out: `--num_shards N --shard_id i` (or torchrun's RANK/WORLD_SIZE) gives each process 1/N of the
queries; processes sharing a filesystem also split the page encoding. Each shard writes
`<name>.shard-<i>-of-<N>.jsonl`; the last shard to finish merges them (or run `--merge` yourself).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from colintern.errors import UserError, run_cli

log = logging.getLogger("colintern.mine")

SCORE_DOC = "sum over query tokens of the max over page tokens of the inner product (exact MaxSim)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model_id", required=False,
                   help="base model: hub id or local directory (the one the checkpoint was trained on)")
    g.add_argument("--ckpt", default=None,
                   help="ColIntern checkpoint (colintern_heads_*.pt): head, LoRA and formatting. Without it "
                        "the base model with an untrained head is used (a warning says so)")
    g.add_argument("--hub_name", default=None,
                   help="page dataset: hub id, local repository folder, save_to_disk directory or parquet "
                        "file/glob, with the vidore/colpali_train_set columns (query, image, image_filename)")
    g.add_argument("--split", default="train", help="dataset split (default: train)")
    g.add_argument("--limit", type=int, default=None, help="use only the first N rows (default: all)")
    g.add_argument("--dedupe", choices=["auto", "filename", "hash"], default="auto",
                   help="what makes two rows the same page: image_filename, a hash of the image bytes, or auto "
                        "(image_filename when every row has one, else hash). Default: auto")
    g.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    g = p.add_argument_group("output")
    g.add_argument("--out_jsonl", default="outputs/mine/mined_triples.jsonl",
                   help="output triples file (default: outputs/mine/mined_triples.jsonl); the meta sidecar is "
                        "written beside it as <name>.meta.json")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from <out>.partial (same settings required); without it "
                        "a leftover partial file is discarded")
    g.add_argument("--emb_dir", default=None,
                   help="where page embeddings go (fp16 memory-mapped files, one subdirectory per model+data "
                        "fingerprint). Default: <out without .jsonl>.pages/")
    g.add_argument("--keep_pages", action="store_true",
                   help="keep the page embeddings after a complete run (default: delete them; a resumed run "
                        "reuses them either way)")
    g = p.add_argument_group("mining")
    g.add_argument("--k", type=int, default=20, help="hard negatives per query (default: 20)")
    g.add_argument("--method", choices=["auto", "faiss", "exact"], default="auto",
                   help="exact: exact MaxSim against every page (streamed part by part; fast on a GPU); faiss: "
                        "FAISS first stage over page token vectors + exact MaxSim re-rank of the candidates; auto: "
                        "exact on a GPU or up to 3M page tokens (~2,300 pages), where it is as fast as FAISS "
                        "(docs/BENCHMARKS.md), else faiss. Default: auto")
    g.add_argument("--candidates", type=int, default=100,
                   help="faiss: pages per query re-ranked exactly (default: 100); at least the number of pages "
                        "makes faiss equal to exact")
    g.add_argument("--token_k", type=int, default=256,
                   help="faiss: nearest page tokens retrieved per query token (default: 256; at most 2048 on "
                        "a GPU index)")
    g.add_argument("--faiss_index", default="auto",
                   help="faiss index_factory string (inner product). auto: Flat (exact) up to 3M page tokens, "
                        "else IVF<4*sqrt(N)>,PQ32. Default: auto")
    g.add_argument("--nprobe", type=int, default=32, help="faiss IVF lists searched per query token (default: 32)")
    g.add_argument("--deepen", type=int, default=2,
                   help="faiss: a query left with fewer than k negatives after positives and the fn filter is "
                        "searched again with 4x --candidates and --token_k, up to N times (default: 2; 0: never)")
    g.add_argument("--fn_filter", type=float, default=0.95,
                   help="drop candidates scoring above r x the positive's score as probable false negatives "
                        "(default: 0.95; 0 disables)")
    g.add_argument("--skip_top", type=int, default=0,
                   help="also skip the N best remaining candidates before taking k (default: 0)")
    g.add_argument("--recall_sample", type=int, default=200,
                   help="faiss: queries (per shard) checked against exact search to measure candidate recall "
                        "(default: 200; 0 disables)")
    g = p.add_argument_group("compute")
    g.add_argument("--doc_batch", type=int, default=16, help="pages per encoder batch (default: 16)")
    g.add_argument("--query_batch", type=int, default=64, help="queries per encoder batch (default: 64)")
    g.add_argument("--search_batch", type=int, default=1024,
                   help="queries scored and written per step; also the resume granularity (default: 1024)")
    g.add_argument("--pages_per_part", type=int, default=1024,
                   help="pages per embedding file part: the unit of shared encoding and of resume (default: 1024)")
    g.add_argument("--no_gpu", action="store_true", help="use the CPU even when a GPU is available")
    g.add_argument("--dtype", default=None,
                   help="backbone dtype: bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--use_flash_attn", action="store_true", help="flash-attention 2 when installed (GPU)")
    g = p.add_argument_group("sharding")
    g.add_argument("--num_shards", type=int, default=None,
                   help="split the queries over N processes (default: WORLD_SIZE under torchrun, else 1)")
    g.add_argument("--shard_id", type=int, default=None, help="this process's shard, 0..N-1 (default: RANK or 0)")
    g.add_argument("--merge", action="store_true",
                   help="only join the N shard files of --out_jsonl into it (with --num_shards N)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.num_shards is None:
        args.num_shards = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if args.shard_id is None:
        args.shard_id = int(os.environ.get("RANK", "0") or 0) if args.num_shards > 1 else 0
    for name in ("k", "candidates", "token_k", "doc_batch", "query_batch", "search_batch", "pages_per_part",
                 "num_shards", "nprobe"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.skip_top < 0 or args.recall_sample < 0 or args.fn_filter < 0 or args.deepen < 0:
        raise UserError("--skip_top, --recall_sample, --fn_filter and --deepen must not be negative")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if not 0 <= args.shard_id < args.num_shards:
        raise UserError(f"--shard_id must be in 0..{args.num_shards - 1}, got {args.shard_id}")
    if args.merge and args.num_shards < 2:
        raise UserError("--merge joins shard files: pass --num_shards N (N >= 2) as used for the shards")
    if not args.merge and (not args.model_id or not args.hub_name):
        raise UserError("--model_id and --hub_name are required (except with --merge)")
    return args


# ---------------------------------------------------------------- output paths


def output_paths(out: str, shard_id: int, num_shards: int) -> dict[str, Path]:
    """Where this process writes: the final file (shard file when sharded), its partial, state and meta."""
    stem = out[:-len(".jsonl")] if out.endswith(".jsonl") else out
    final = Path(out) if num_shards == 1 else Path(f"{stem}.shard-{shard_id:05d}-of-{num_shards:05d}.jsonl")
    fstem = str(final)[:-len(".jsonl")] if str(final).endswith(".jsonl") else str(final)
    return {"final": final, "partial": Path(f"{final}.partial"), "state": Path(f"{final}.partial.json"),
            "meta": Path(f"{fstem}.meta.json"), "merged": Path(out), "merged_meta": Path(f"{stem}.meta.json"),
            "emb_dir": Path(f"{stem}.pages"), "merge_lock": Path(f"{stem}.merge.lock")}


def shard_files(out: str, num_shards: int) -> list[dict[str, Path]]:
    return [output_paths(out, i, num_shards) for i in range(num_shards)]


# ---------------------------------------------------------------- merge


def merge_shards(out: str, num_shards: int, keep_pages: bool) -> dict:
    """Join the shard files into `out` (shard order = dataset order), merge their meta, remove the parts."""
    from colintern.mining import atomic_write_json

    parts = shard_files(out, num_shards)
    missing = [str(p["final"]) for p in parts if not p["final"].is_file() or not p["meta"].is_file()]
    if missing:
        raise UserError(f"cannot merge {out}: {len(missing)} of {num_shards} shards are not finished "
                        f"(first missing: {missing[0]})")
    metas = [json.loads(p["meta"].read_text()) for p in parts]
    merged = Path(out)
    tmp = Path(f"{out}.partial")
    with open(tmp, "wb") as f:
        for p in parts:
            with open(p["final"], "rb") as src:
                shutil.copyfileobj(src, f)
        f.flush()
        os.fsync(f.fileno())
    meta = dict(metas[0])
    counts = {}
    for key, value in metas[0]["counts"].items():
        if key in ("queries", "lines", "fn_filtered", "short_lines"):
            counts[key] = sum(m["counts"][key] for m in metas)
        else:
            counts[key] = value  # corpus-wide numbers are the same in every shard
    meta["counts"] = counts
    if meta.get("faiss"):
        meta["faiss"] = dict(meta["faiss"], deepened_queries=sum(m["faiss"]["deepened_queries"] for m in metas))
    meta["seconds"] = {key: round(max(m["seconds"][key] for m in metas), 3) for key in metas[0]["seconds"]}
    meta["shard"] = {"num_shards": num_shards, "merged": [str(p["final"]) for p in parts]}
    recalls = [m["candidate_recall"] for m in metas if m.get("candidate_recall")]
    if recalls:
        merged_recall = {key: sum(r[key] for r in recalls) for key in
                         ("queries", "queries_with_negatives", "exact_negatives", "candidate_hits", "negatives_hits")}
        total = merged_recall["exact_negatives"]
        meta["candidate_recall"] = {
            **merged_recall, "k": recalls[0]["k"],
            "candidate_recall": round(merged_recall["candidate_hits"] / total, 6) if total else None,
            "negatives_overlap": round(merged_recall["negatives_hits"] / total, 6) if total else None}
    meta["out_jsonl"] = str(merged)
    atomic_write_json(output_paths(out, 0, 1)["meta"], meta)
    os.replace(tmp, merged)
    for p in parts:
        for key in ("final", "meta"):
            p[key].unlink(missing_ok=True)
    store = meta.get("page_store")
    if store and not keep_pages and Path(store).is_dir():
        remove_store(Path(store))
    log.info("merged %d shards (%d lines) into %s", num_shards, counts["lines"], merged)
    return meta


def remove_store(store_dir: Path) -> None:
    shutil.rmtree(store_dir, ignore_errors=True)
    try:
        store_dir.parent.rmdir()  # the --emb_dir folder, when nothing else is left in it
    except OSError:
        pass


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.merge:
        meta = merge_shards(args.out_jsonl, args.num_shards, args.keep_pages)
        print(f"merged {args.num_shards} shards: {meta['counts']['lines']} lines -> {args.out_jsonl}")
        return 0

    from colintern import ColIntern
    from colintern.data import check_query, load_page_dataset, pseudo_path, SkipReport
    from colintern.mining import (PageStore, StoreSpec, atomic_write_json, byte_offset_of_line, count_complete_lines,
                                  ensure_page_store, exact_search, faiss_search, file_sha256, fingerprint,
                                  keys_digest, plan_pages, plan_pairs, positive_scores, unique_texts,
                                  build_faiss_index, choose_method)
    from colintern.scoring import maxsim

    t_start = time.time()
    sharded = args.num_shards > 1
    paths = output_paths(args.out_jsonl, args.shard_id, args.num_shards)
    show = not args.quiet
    if args.resume and paths["final"].is_file() and not paths["partial"].is_file():
        print(f"{paths['final']} is already complete; nothing to resume")
        if sharded:
            try_merge(args, paths)
        return 0
    if paths["partial"].exists() and not args.resume:
        log.warning("discarding the unfinished %s (pass --resume to continue it)", paths["partial"])

    # -- device, model, data
    use_gpu = torch.cuda.is_available() and not args.no_gpu
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    device = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}" if use_gpu else "cpu"
    if args.ckpt is None:
        log.warning("no --ckpt: mining with the base model %s and an UNTRAINED head; negatives will be close to "
                    "random. Pass --ckpt outputs/train/colintern_heads_epoch1.pt", args.model_id)
    model = ColIntern.from_pretrained(args.model_id, ckpt=args.ckpt, device=device, dtype=args.dtype,
                                      use_flash_attn=args.use_flash_attn)
    ckpt_sha = file_sha256(args.ckpt) if args.ckpt else None
    dtype_name = str(next(model.backbone.parameters()).dtype).replace("torch.", "")
    dataset = load_page_dataset(args.hub_name, args.split, strict=False)
    if args.limit is not None and args.limit < len(dataset):
        dataset = dataset.select(range(args.limit))
    if len(dataset) == 0:
        raise UserError(f"dataset {args.hub_name} split {args.split} is empty: nothing to mine")
    plan = plan_pages(dataset, args.hub_name, args.dedupe, show_progress=show)
    log.info("model %s%s on %s (%s); %d rows -> %d unique pages (dedupe by %s)", args.model_id,
             f" + {args.ckpt}" if args.ckpt else "", device, dtype_name, len(dataset), plan.n_pages, plan.dedupe)

    # -- page embeddings on disk (shared by shards, kept across resumes)
    spec = StoreSpec(model_id=args.model_id, ckpt_sha256=ckpt_sha, config=model.config.to_dict(), dtype=dtype_name,
                     dataset=args.hub_name, split=args.split, limit=args.limit, dedupe=plan.dedupe,
                     keys_sha256=keys_digest(plan), n_pages=plan.n_pages, pages_per_part=args.pages_per_part)
    emb_dir = Path(args.emb_dir) if args.emb_dir else paths["emb_dir"]
    store_dir = emb_dir / spec.id
    if emb_dir.is_dir():
        stale = [d.name for d in emb_dir.iterdir() if d.is_dir() and d.name != spec.id]
        if stale:
            log.warning("%s also holds page embeddings of other runs (%s); delete them to free disk space",
                        emb_dir, ", ".join(stale[:3]))

    def encode_pages(pils: list) -> list[torch.Tensor]:
        return model.encode_images(pils, batch_size=args.doc_batch, show_progress=False)

    t0 = time.time()
    enc = ensure_page_store(store_dir, spec, plan, dataset, args.hub_name, encode_pages, window=args.doc_batch * 8,
                            strict=args.strict, shard_id=args.shard_id, num_shards=args.num_shards,
                            show_progress=show)
    store = PageStore(store_dir, spec)
    t_encode = time.time() - t0
    report = SkipReport(strict=args.strict, logger=log)
    image_bad = store.skipped_rows()
    pair_plan = plan_pairs(dataset["query"], plan, store, {r for r, _ in image_bad}, check_query, args.hub_name)
    for row, reason in sorted(image_bad + pair_plan.bad_rows):
        report.add(f"{args.hub_name} row {row}", reason)
    if store.n_valid == 0:
        raise UserError(f"dataset {args.hub_name} split {args.split}: none of its {len(dataset)} rows has a "
                        f"decodable image ({report.summary()})")
    if not pair_plan.pairs:
        raise UserError(f"dataset {args.hub_name} split {args.split}: no usable queries ({report.summary()})")
    if store.n_valid == 1:
        log.warning("the corpus has a single page: every query gets an empty negatives list")
    pairs_all = pair_plan.pairs
    lo = args.shard_id * len(pairs_all) // args.num_shards
    hi = (args.shard_id + 1) * len(pairs_all) // args.num_shards
    pairs = pairs_all[lo:hi]
    fn_filter = args.fn_filter if args.fn_filter > 0 else None
    method, why = choose_method(args.method, store.n_tokens, use_gpu)
    log.info("search method: %s (%s)", method, why)

    # -- resume state
    settings = {"store": spec.id, "method": method, "k": args.k, "skip_top": args.skip_top,
                "fn_filter": fn_filter, "search_batch": args.search_batch, "shard": [args.shard_id, args.num_shards],
                "pairs": [lo, hi], "model_id": args.model_id, "ckpt_sha256": ckpt_sha,
                "pairs_digest": fingerprint([(p.row, p.text, p.page) for p in pairs])}
    if method == "faiss":
        settings.update(candidates=args.candidates, token_k=args.token_k, faiss_index=args.faiss_index,
                        nprobe=args.nprobe, deepen=args.deepen)
    state = {"settings": settings, "lines": 0, "fn_filtered": 0, "short_lines": 0, "deepened": 0,
             "search_seconds": 0.0}
    resumed = False
    if args.resume and paths["partial"].is_file() and paths["state"].is_file():
        saved = json.loads(paths["state"].read_text())
        if saved.get("settings") != settings:
            diff = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                          if settings.get(k) != saved.get("settings", {}).get(k))
            raise UserError(f"cannot resume {paths['partial']}: it was written with other settings "
                            f"({', '.join(diff)} differ); rerun without --resume to start over")
        n_lines, _ = count_complete_lines(paths["partial"])
        if n_lines < saved["lines"]:
            raise UserError(f"cannot resume {paths['partial']}: it has {n_lines} lines but its state says "
                            f"{saved['lines']}; rerun without --resume to start over")
        state = saved
        resumed = True
        log.info("resuming %s after %d of %d lines", paths["partial"], state["lines"], len(pairs))
    elif args.resume:
        log.info("nothing to resume at %s: starting a new run", paths["partial"])
    paths["partial"].parent.mkdir(parents=True, exist_ok=True)
    keep_bytes = byte_offset_of_line(paths["partial"], state["lines"]) if resumed else 0
    with open(paths["partial"], "ab" if resumed else "wb") as f:
        f.truncate(keep_bytes)  # drop lines written after the last recorded batch (a crash mid-batch)
    atomic_write_json(paths["state"], state)

    # -- search
    index, faiss_info = None, None
    faiss_gpu = False
    token_k = args.token_k
    if method == "faiss":
        import faiss

        faiss_gpu = use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if faiss_gpu and token_k > 2048:
            log.warning("--token_k %d is above the GPU index limit: using 2048", token_k)
            token_k = 2048
        t0 = time.time()
        index, faiss_info = build_faiss_index(store, args.faiss_index, args.nprobe, faiss_gpu, local_rank,
                                              store_dir / f"faiss-{fingerprint(args.faiss_index)}.index", show)
        faiss_info["build_seconds"] = round(time.time() - t0, 3)
        if use_gpu and not faiss_gpu:
            log.info("faiss has no GPU support in this install (faiss-cpu): the first stage runs on the CPU")
    score_device = device
    rep = store.rep_rows

    def path_of(u: int) -> str:
        return pseudo_path(args.hub_name, args.split, int(rep[u]))

    def run_batch(batch):
        texts, which = unique_texts(batch)
        qs = model.encode_queries(texts, batch_size=args.query_batch, show_progress=False)
        pos = positive_scores(qs, which, batch, store, score_device)
        if method == "exact":
            res = exact_search(qs, which, batch, pos, pair_plan.positives, store, maxsim, score_device, args.k,
                               args.skip_top, fn_filter)
            return qs, which, pos, res, None
        res, cands, n_deepened = faiss_search(qs, which, batch, pos, pair_plan.positives, store, index, score_device,
                                              args.k, args.skip_top, fn_filter, token_k, args.candidates,
                                              args.deepen, 2048 if faiss_gpu else None)
        return qs, which, pos, res, (cands, n_deepened)

    B = args.search_batch
    with tqdm(total=len(pairs), initial=state["lines"], desc=f"mine [{method}]", unit="query",
              dynamic_ncols=True, disable=not show) as bar, open(paths["partial"], "ab") as out:
        for b0 in range(state["lines"], len(pairs), B):
            t0 = time.time()
            batch = pairs[b0:b0 + B]
            _, _, pos, res, extra = run_batch(batch)
            state["deepened"] = state.get("deepened", 0) + (extra[1] if extra else 0)
            lines = []
            for p, s_pos, (negs, scores, n_filtered) in zip(batch, pos, res):
                lines.append(json.dumps({"query": p.text, "pos": path_of(p.page),
                                         "negs": [path_of(u) for u in negs],
                                         "scores": {"pos": round(float(s_pos), 6),
                                                    "negs": [round(float(s), 6) for s in scores]}},
                                        ensure_ascii=False) + "\n")
                state["fn_filtered"] += n_filtered
                state["short_lines"] += int(len(negs) < args.k)
            out.write("".join(lines).encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())
            state["lines"] = b0 + len(batch)
            state["search_seconds"] += time.time() - t0
            atomic_write_json(paths["state"], state)
            bar.update(len(batch))
            bar.set_postfix(queries_per_s=f"{state['lines'] / max(state['search_seconds'], 1e-9):.1f}")

    # -- honesty about the approximation: FAISS candidates vs exact top-k on a sample of queries
    recall = None
    t_recall = 0.0
    if method == "faiss" and args.recall_sample > 0 and pairs:
        t0 = time.time()
        m = min(args.recall_sample, len(pairs))
        sample = np.unique(np.linspace(0, len(pairs) - 1, m).round().astype(int))
        cand_hits, neg_hits, total = 0, 0, 0
        n_checked = 0
        for s0 in tqdm(range(0, len(sample), B), desc="recall check", disable=not show, dynamic_ncols=True):
            batch = [pairs[i] for i in sample[s0:s0 + B]]
            qs, which, pos, res, (cands, _) = run_batch(batch)
            exact = exact_search(qs, which, batch, pos, pair_plan.positives, store, maxsim, score_device, args.k,
                                 args.skip_top, fn_filter)
            for r, ((negs_f, _, _), (negs_e, _, _)) in enumerate(zip(res, exact)):
                if len(negs_e) == 0:
                    continue
                n_checked += 1
                total += len(negs_e)
                cand_hits += int(np.isin(negs_e, cands[which[r]]).sum())
                neg_hits += int(np.isin(negs_e, negs_f).sum())
        recall = {"queries": int(len(sample)), "queries_with_negatives": n_checked, "k": args.k,
                  "exact_negatives": total, "candidate_hits": cand_hits, "negatives_hits": neg_hits,
                  "candidate_recall": round(cand_hits / total, 6) if total else None,
                  "negatives_overlap": round(neg_hits / total, 6) if total else None}
        t_recall = time.time() - t0

    # -- meta, then the final name (the jsonl appears only complete)
    part_secs = sum(p["seconds"] for p in store.parts)
    part_pages = sum(p["pages_encoded"] for p in store.parts)
    t_total = time.time() - t_start
    meta = {
        "checkpoint": args.ckpt, "checkpoint_sha256": ckpt_sha, "model": args.model_id, "dataset": args.hub_name,
        "split": args.split, "limit": args.limit, "method": method, "method_asked": args.method,
        "method_why": why, "k": args.k,
        "score": SCORE_DOC,
        "filters": {"fn_filter": fn_filter, "skip_top": args.skip_top,
                    "positives": f"rows sharing the page (dedupe by {plan.dedupe}) and rows with the same query text"},
        "faiss": None if faiss_info is None else {**faiss_info, "candidates": args.candidates, "token_k": token_k,
                                                  "deepen": args.deepen, "deepened_queries": state["deepened"],
                                                  "indexed": "every page token vector (inner product)"},
        "counts": {"rows": len(dataset), "pages": plan.n_pages, "pages_valid": store.n_valid,
                   "page_tokens": store.n_tokens, "queries": len(pairs), "lines": state["lines"],
                   "queries_total": len(pairs_all), "skipped_rows": report.count,
                   "skipped_by_reason": report.counts(), "duplicate_rows": pair_plan.duplicate_rows,
                   "fn_filtered": state["fn_filtered"], "short_lines": state["short_lines"]},
        "seconds": {"encode_pages": round(t_encode, 3), "search": round(state["search_seconds"], 3),
                    "recall_check": round(t_recall, 3), "total": round(t_total, 3)},
        "pages_per_s": round(part_pages / part_secs, 3) if part_secs > 0 else None,
        "pages_encoded_here": enc["pages_encoded"],
        "queries_per_s": round(state["lines"] / state["search_seconds"], 3) if state["search_seconds"] else None,
        "candidate_recall": recall,
        "device": device, "dtype": dtype_name, "resumed": resumed,
        "shard": {"shard_id": args.shard_id, "num_shards": args.num_shards, "pairs": [lo, hi]},
        "page_store": str(store_dir), "out_jsonl": str(paths["final"]),
        "format": {"line": '{"query", "pos", "negs", "scores": {"pos", "negs"}}',
                   "paths": "<dataset>/<split>/doc_<row>.png pseudo-paths (row = the page's representative row)"},
    }
    atomic_write_json(paths["meta"], meta)
    os.replace(paths["partial"], paths["final"])
    paths["state"].unlink(missing_ok=True)
    if not sharded and not args.keep_pages:
        remove_store(store_dir)

    # -- summary
    print(f"mined {state['lines']} queries -> {paths['final']}  (meta: {paths['meta']})")
    print(f"  pages: {plan.n_pages} unique from {len(dataset)} rows ({store.n_valid} usable, {store.n_tokens} "
          f"token vectors); skipped rows: {report.count}; duplicate rows: {pair_plan.duplicate_rows}")
    pps = meta["pages_per_s"]
    qps = meta["queries_per_s"]
    print(f"  seconds: encode {t_encode:.1f} ({pps if pps is not None else '-'} pages/s), search "
          f"{state['search_seconds']:.1f} ({qps if qps is not None else '-'} queries/s), total {t_total:.1f}")
    print(f"  fn_filter dropped {state['fn_filtered']} candidates; {state['short_lines']} lines have fewer than "
          f"{args.k} negatives")
    if recall and recall["exact_negatives"]:
        print(f"  candidate recall@{args.k} vs exact ({recall['queries']} queries): {recall['candidate_recall']:.4f}; "
              f"negatives identical to exact: {recall['negatives_overlap']:.4f}")
    elif recall:
        print(f"  candidate recall: n/a (exact search finds no negatives for the {recall['queries']} sampled queries)")
    if state["lines"] and state["short_lines"] > state["lines"] // 2 and fn_filter:
        log.warning("%d of %d queries got fewer than %d negatives: the fn_filter (%.2f x the positive's score) "
                    "dropped %d candidates. Nearly uniform scores mean an untrained or collapsed checkpoint; "
                    "lower --fn_filter or check the checkpoint", state["short_lines"], state["lines"], args.k,
                    fn_filter, state["fn_filtered"])
    if report.count:
        print(f"  {report.summary()}")
    if sharded:
        try_merge(args, paths)
    return 0


def try_merge(args: argparse.Namespace, paths: dict[str, Path]) -> None:
    """The last shard to finish merges all of them (under a lock, so only one does)."""
    from colintern.mining import file_lock

    with file_lock(paths["merge_lock"]):
        parts = shard_files(args.out_jsonl, args.num_shards)
        if all(p["final"].is_file() and p["meta"].is_file() for p in parts):
            meta = merge_shards(args.out_jsonl, args.num_shards, args.keep_pages)
            print(f"merged {args.num_shards} shards: {meta['counts']['lines']} lines -> {args.out_jsonl}")
    if paths["merged"].is_file():
        paths["merge_lock"].unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(run_cli(main))
