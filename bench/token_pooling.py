"""What hierarchical token pooling (--pool_factor K) keeps: nDCG@5 and index bytes per page for K = 1, 2, 3, 4.

    python bench/token_pooling.py --model_id outputs/demo/tiny --ckpt outputs/demo/train/colintern_heads_epoch2.pt \\
        --eval_dir outputs/demo/synthetic/eval --json_out outputs/bench/token_pooling.json --plot docs/assets/pooling.png
    python bench/token_pooling.py ... --eval_dir my_pdf_pages_beir   # any BEIR-layout set, e.g. rendered PDF pages

Pages are encoded once; each K pools every page's vectors (colintern/retriever/token_pooling.py) and scores the same queries
with exact MaxSim. Bytes per page are those search.py stores (float16). The published anchor for comparison:
pool factor 3 keeps about 97-98 % of nDCG@5 on ViDoRe (ColPali authors' token-pooling study).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchlib import env, print_table, write_json  # noqa: E402

from colintern.cli import run_cli, setup_logging  # noqa: E402
from colintern.errors import UserError  # noqa: E402


def measure(model, eval_dir: str, factors: list[int]) -> list[dict]:
    """One row per pool factor: nDCG@5/10, recall@5, vectors and float16 bytes per page, retention vs K = 1."""
    from colintern.eval.evaluation import LocalEvaluator
    from colintern.retriever.token_pooling import pool_tokens

    evaluator = LocalEvaluator(eval_dir)
    pages = model.encode_images(evaluator.pages, show_progress=False)  # encoded once for every K
    queries = model.encode_queries([evaluator.queries[q] for q in evaluator.query_ids], show_progress=False)
    rows = []
    for factor in factors:
        start = time.perf_counter()
        pooled = [pool_tokens(p, factor) for p in pages]
        scores = evaluator.score(queries, pooled)
        vectors = sum(p.shape[0] for p in pooled) / len(pooled)
        rows.append({"pool_factor": factor, **scores, "vectors_per_page": vectors,
                     "bytes_per_page": vectors * model.config.dim * 2, "seconds": time.perf_counter() - start})
    base = rows[0]["ndcg_at_5"] or float("nan")
    for row in rows:
        row["ndcg_at_5_kept"] = row["ndcg_at_5"] / base
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [r["pool_factor"] for r in rows]
    ax.plot(ks, [r["ndcg_at_5"] for r in rows], marker="o", label="nDCG@5")
    ax.set_xlabel("pool factor K")
    ax.set_ylabel("held-out nDCG@5")
    ax.set_xticks(ks)
    twin = ax.twinx()
    twin.bar(ks, [r["bytes_per_page"] / 1024 for r in rows], alpha=0.25, color="C1", label="KiB per page")
    twin.set_ylabel("index KiB per page (float16)")
    ax.set_title("Token pooling: quality kept vs index size")
    ax.grid(True, alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_id", required=True, help="base model")
    p.add_argument("--ckpt", default=None, help="trained checkpoint (default: none, an untrained head)")
    p.add_argument("--eval_dir", required=True, help="BEIR-layout evaluation set")
    p.add_argument("--factors", nargs="+", type=int, default=[1, 2, 3, 4], help="pool factors (default: 1 2 3 4)")
    p.add_argument("--json_out", default=None, help="write every number here")
    p.add_argument("--plot", default=None, help="write the quality/size plot here (PNG)")
    args = p.parse_args(argv)
    if min(args.factors) < 1 or args.factors[0] != 1:
        raise UserError("--factors must start with 1 (the reference) and be at least 1")
    setup_logging()
    from colintern.retriever.model import ColIntern

    model = ColIntern.from_pretrained(args.model_id, ckpt=args.ckpt, device="cpu")
    rows = measure(model, args.eval_dir, args.factors)
    print_table(rows, [("pool_factor", "K", "d"), ("ndcg_at_5", "nDCG@5", ".4f"), ("ndcg_at_5_kept", "kept", ".1%"),
                       ("recall_at_5", "R@5", ".4f"), ("vectors_per_page", "vectors/page", ".1f"),
                       ("bytes_per_page", "bytes/page", ".0f")])
    if args.json_out:
        write_json(args.json_out, {"env": env(model.device), "model": args.model_id, "ckpt": args.ckpt,
                                   "eval_dir": args.eval_dir, "rows": rows})
    if args.plot:
        plot(rows, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
