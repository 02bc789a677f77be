"""Benchmark colintern.retriever.scoring.maxsim against mteb's max_sim on ViDoRe-like ragged embeddings.

Builds random L2-normalised multi-vector embeddings (queries 20-40 tokens, pages 300-1800 tokens, dim 128),
times both scorers on the same device, checks both against a float64 reference on a random sample of
(query, page) pairs, measures the device's plain fp32 matmul GFLOP/s as the ceiling, prints a table and
writes JSON.

mteb is called the way its retrieval evaluation calls a ColPali-style model: the encoder returns
zero-padded (N, Lmax, dim) tensors (``pad_sequence``, as mteb's ColPali wrappers do) and the scorer gets
``max_sim(query_embeddings, corpus_embeddings)``. ``--mteb_ragged`` also times mteb's list input path. On CUDA,
late-interaction-kernels' fused varlen kernel (what colpali-engine uses there when it is installed; fp16 dot
products) is timed too when importable.

    python bench/scoring.py           # CPU: 64 queries x 500 pages (under a minute); GPU: 256 x 2000
    python bench/scoring.py --full    # 256 queries x 2000 pages, the reference workload, on any device
                                      # (on a 2-core CPU mteb's padded scorer alone takes minutes)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Callable

import torch
from torch.nn.utils.rnn import pad_sequence

from benchlib import loadavg, matmul_tflops, sync  # noqa: E402

from colintern.retriever.scoring import maxsim  # noqa: E402


def ragged(n: int, lo: int, hi: int, dim: int, g: torch.Generator) -> list[torch.Tensor]:
    """n L2-normalised (L_i, dim) float32 tensors with L_i uniform in [lo, hi]."""
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    flat = torch.nn.functional.normalize(torch.randn(sum(lens), dim, generator=g), dim=-1)  # one big draw: fast
    return [t.clone() for t in torch.split(flat, lens)]  # independent storages, like real encoder output


def time_it(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> tuple[list[float], torch.Tensor]:
    """Wall-clock seconds of each call and the last result."""
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, out


def reference_sample(
    qs: list[torch.Tensor], docs: list[torch.Tensor], n_pairs: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 sum-MaxSim of n_pairs random (query, doc) pairs -> (qi, di, scores)."""
    qi = torch.randint(0, len(qs), (n_pairs,), generator=g)
    di = torch.randint(0, len(docs), (n_pairs,), generator=g)
    ref = torch.tensor(
        [float((qs[i].double() @ docs[j].double().T).max(dim=1).values.sum()) for i, j in zip(qi.tolist(), di.tolist())],
        dtype=torch.float64,
    )
    return qi, di, ref


def errors(scores: torch.Tensor, qi: torch.Tensor, di: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    got = scores.detach().cpu().double()[qi, di]
    err = (got - ref).abs()
    return {"max_abs_err": float(err.max()), "max_rel_err": float((err / ref.abs().clamp_min(1e-12)).max())}


def padding_artefact(mteb_max_sim: Callable | None) -> dict[str, float | None]:
    """A page whose similarities with the query are all negative, zero-padded next to a longer page."""
    q = torch.tensor([[1.0, 0.0], [0.8, 0.6]])  # (2, 2)
    short = torch.tensor([[-1.0, 0.0], [-0.6, -0.8]])  # every similarity with q is negative
    long = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [0.0, -1.0]])
    ref = float((q.double() @ short.double().T).max(dim=1).values.sum())
    ours = float(maxsim([q], [short, long], device="cpu")[0, 0])
    theirs = None
    if mteb_max_sim is not None:
        padded_docs = pad_sequence([short, long], batch_first=True)
        theirs = float(mteb_max_sim(q[None], padded_docs)[0, 0])
    return {"reference": ref, "colintern": ours, "mteb_padded": theirs}


def lik_scorer(qs: list[torch.Tensor], docs: list[torch.Tensor],
               device: torch.device) -> tuple[Callable[[], torch.Tensor] | None, str | None]:
    """late-interaction-kernels' packed (varlen) Triton MaxSim, what colpali-engine scores with on CUDA when that
    package is installed -> (call, None), or (None, why it cannot run here). It masks pads exactly but computes
    the dot products in fp16 on tensor cores (fp32 inputs are downcast), so its error column is not fp32's."""
    if device.type != "cuda":
        return None, "needs CUDA (Triton kernels)"
    try:
        from late_interaction_kernels import maxsim_varlen
    except ImportError as err:
        return None, f"not installed ({err}); pip install late-interaction-kernels"

    def offsets(items: list[torch.Tensor]) -> torch.Tensor:  # (n + 1,) int32 cumulative token counts
        lens = torch.tensor([0] + [t.shape[0] for t in items], device=device)
        return lens.cumsum(0).to(torch.int32)

    q_packed, d_packed = torch.cat(qs), torch.cat(docs)  # (Tq, dim), (Td, dim)
    cu_q, cu_d = offsets(qs), offsets(docs)
    max_q, max_d = max(q.shape[0] for q in qs), max(d.shape[0] for d in docs)
    return (lambda: maxsim_varlen(q_packed, d_packed, cu_q, cu_d, max_q, max_d)), None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_queries", type=int, default=None,
                   help="queries (default: 256 on a GPU or with --full, 64 on a CPU so the run stays under a minute)")
    p.add_argument("--n_docs", type=int, default=None,
                   help="pages (default: 2000 on a GPU or with --full, 500 on a CPU)")
    p.add_argument("--dim", type=int, default=128, help="token vector size (default: 128)")
    p.add_argument("--q_len", type=int, nargs=2, default=[20, 40], metavar=("MIN", "MAX"),
                   help="query length range in tokens (default: 20 40)")
    p.add_argument("--d_len", type=int, nargs=2, default=[300, 1800], metavar=("MIN", "MAX"),
                   help="page length range in tokens (default: 300 1800)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per scorer (best and median reported)")
    p.add_argument("--device", default=None, help="cpu / cuda; default: CUDA if available else CPU")
    p.add_argument("--ref_pairs", type=int, default=500, help="random pairs checked against float64")
    p.add_argument("--skip_mteb", action="store_true", help="time only colintern's maxsim")
    p.add_argument("--mteb_ragged", action="store_true", help="also time mteb's list (ragged) input path")
    p.add_argument("--skip_lik", action="store_true", help="do not time late-interaction-kernels' fused kernel "
                   "(colpali-engine's CUDA scorer; timed by default when installed and on CUDA)")
    p.add_argument("--quick", action="store_true", help="64 queries x 500 pages on any device")
    p.add_argument("--full", action="store_true", help="256 queries x 2000 pages on any device")
    p.add_argument("--seed", type=int, default=0, help="seed of the random embeddings (default: 0)")
    p.add_argument("--json_out", default="outputs/bench/scoring.json", help="JSON results (default: %(default)s)")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    big = args.full or (device.type == "cuda" and not args.quick)
    args.n_queries = args.n_queries or (256 if big else 64)
    args.n_docs = args.n_docs or (2000 if big else 500)
    g = torch.Generator().manual_seed(args.seed)
    qs = ragged(args.n_queries, *args.q_len, args.dim, g)
    docs = ragged(args.n_docs, *args.d_len, args.dim, g)
    if device.type == "cuda":  # mteb moves to the best device itself; give both the same starting point
        qs = [q.to(device) for q in qs]
        docs = [d.to(device) for d in docs]
    q_tok = sum(q.shape[0] for q in qs)
    d_tok = sum(d.shape[0] for d in docs)
    real_gflop = 2 * args.dim * q_tok * d_tok / 1e9
    padded_gflop = 2 * args.dim * len(qs) * max(q.shape[0] for q in qs) * len(docs) * max(d.shape[0] for d in docs) / 1e9

    load_before = loadavg()
    peak = matmul_tflops(device, torch.float32, repeats=2) * 1e3  # GFLOP/s
    qi, di, ref = reference_sample(qs, docs, args.ref_pairs, g)

    # scorers: name -> (call, work in GFLOP it actually performs)
    scorers: dict[str, tuple[Callable[[], torch.Tensor], float | None]] = {
        "colintern.maxsim": (lambda: maxsim(qs, docs, device=device), real_gflop),
    }
    mteb_version, mteb_max_sim = None, None
    if not args.skip_mteb:
        import mteb
        from mteb.similarity_functions import max_sim as mteb_max_sim

        mteb_version = mteb.__version__
        q_pad = pad_sequence(qs, batch_first=True)  # (Nq, Lq_max, dim), zero pads, as mteb's ColPali wrappers
        d_pad = pad_sequence(docs, batch_first=True)  # (Nd, Ld_max, dim)
        scorers["mteb max_sim (padded)"] = (lambda: mteb_max_sim(q_pad, d_pad), padded_gflop)
        if args.mteb_ragged:
            scorers["mteb max_sim (list)"] = (lambda: mteb_max_sim(qs, docs), None)

    skipped: dict[str, str] = {}
    if not args.skip_lik:
        call, why = lik_scorer(qs, docs, device)
        if call is None:
            skipped["late-interaction-kernels varlen"] = why
        else:
            scorers["LIK varlen (fp16 dot)"] = (call, real_gflop)

    # interleave the scorers on every repeat so a burst of background load hits them alike
    times: dict[str, list[float]] = {name: [] for name in scorers}
    errs: dict[str, dict[str, float]] = {}
    for rep in range(args.repeats):
        for name, (fn, _) in scorers.items():
            t, out = time_it(fn, 1, device)
            times[name] += t
            errs[name] = errors(out, qi, di, ref)
            del out
            print(f"  repeat {rep + 1}/{args.repeats} {name}: {t[0]:.2f} s", flush=True)
    rows: dict[str, dict] = {
        name: {"seconds": min(times[name]), "median_s": statistics.median(times[name]), "all_s": times[name],
               "gflop": scorers[name][1], **errs[name]}
        for name in scorers
    }
    load_after = loadavg()

    ours_s = rows["colintern.maxsim"]["seconds"]
    for r in rows.values():
        r["useful_gflops"] = real_gflop / r["seconds"]  # real-token work per second, comparable across rows
        r["slower_than_ours"] = r["seconds"] / ours_s  # > 1: colintern is this many times faster
    artefact = padding_artefact(mteb_max_sim)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()}-thread CPU ({platform.processor() or platform.machine()})"
    print(f"MaxSim: {len(qs)} queries ({q_tok} tokens) x {len(docs)} pages ({d_tok} tokens), dim {args.dim}, "
          f"on {dev_name}; torch {torch.__version__}, mteb {mteb_version}")
    print(f"real work {real_gflop:.0f} GFLOP (fully padded {padded_gflop:.0f}); plain fp32 matmul ceiling {peak:.0f} GFLOP/s; "
          f"load average before/after {load_before and load_before[0]}/{load_after and load_after[0]}")
    hdr = f"{'scorer':<24}{'best s':>9}{'median s':>10}{'useful GFLOP/s':>16}{'% ceiling':>11}{'time/ours':>11}{'max abs err':>13}{'max rel err':>13}"
    print(hdr)
    print("-" * len(hdr))
    for name, r in rows.items():
        print(f"{name:<24}{r['seconds']:>9.2f}{r['median_s']:>10.2f}{r['useful_gflops']:>16.1f}"
              f"{100 * r['useful_gflops'] / peak:>10.0f}%{r['slower_than_ours']:>11.2f}{r['max_abs_err']:>13.2e}{r['max_rel_err']:>13.2e}")
    if "mteb max_sim (padded)" in rows:
        ratio = rows["mteb max_sim (padded)"]["seconds"] / ours_s
        print(f"colintern is {ratio:.2f}x faster than mteb max_sim (padded inputs)")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"padding artefact (all-negative page): reference {artefact['reference']:.4f}, "
          f"colintern {artefact['colintern']:.4f}, mteb padded {artefact['mteb_padded']}")

    result = {
        "date": date.today().isoformat(),
        "device": dev_name,
        "torch": torch.__version__,
        "mteb": mteb_version,
        "n_queries": len(qs), "n_docs": len(docs), "dim": args.dim, "q_len": args.q_len, "d_len": args.d_len,
        "query_tokens": q_tok, "doc_tokens": d_tok, "real_gflop": real_gflop, "padded_gflop": padded_gflop,
        "repeats": args.repeats, "ref_pairs": args.ref_pairs, "matmul_ceiling_gflops": peak,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "results": rows, "skipped": skipped, "padding_artefact": artefact,
    }
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
