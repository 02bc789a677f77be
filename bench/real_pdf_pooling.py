"""Token pooling on real PDF pages: build a page set from PDFs, train the tiny model on it, measure K = 1..4.

    python bench/real_pdf_pooling.py --pdfs /usr/share/doc/libtasn1-doc/libtasn1.pdf \\
        /usr/share/doc/shared-mime-info/shared-mime-info-spec.pdf --out outputs/bench/real_pdf_pooling

Every page is rendered with search.py's renderer (pypdfium2, --dpi); its text layer gives the queries: three slices
of twelve words past the running head train the model, and the first slice is asked again at evaluation ("seen":
what pooling keeps of a model that tells these real pages apart), beside a slice never trained on ("unseen": the
tiny model cannot read, so this row is near chance and says how much of "seen" is memory). The tiny model is the
only one this machine can train; a real backbone would read the text. Writes OUT/data (triples), OUT/eval_seen and
OUT/eval_unseen (BEIR layout), OUT/train (the checkpoint) and OUT/pooling.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchlib import env, print_table, write_json  # noqa: E402

from colintern.cli import run_cli, setup_logging  # noqa: E402

SLICES = {"train": [(4, 16), (16, 28), (28, 40)], "seen": (4, 16), "unseen": (40, 52)}


def build_sets(pdfs: list[str], dpi: int, out: Path) -> int:
    """Render every page with text; write the training triples and both BEIR sets; returns the page count."""
    import pypdfium2 as pdfium

    from colintern.index.sources import PageSource, render_page

    (out / "data" / "pages").mkdir(parents=True, exist_ok=True)
    triples, corpus = [], []
    queries: dict[str, list[dict]] = {"seen": [], "unseen": []}
    for pdf in pdfs:
        document = pdfium.PdfDocument(pdf)
        for i in range(len(document)):
            words = document[i].get_textpage().get_text_range().split()
            if len(words) < SLICES["unseen"][1]:
                continue  # too little text for the three training slices and the unseen one
            name = f"{Path(pdf).stem}_p{i + 1:03d}.png"
            render_page(PageSource(pdf, "", i + 1, "pdf"), dpi).save(out / "data" / "pages" / name)
            triples += [{"query": " ".join(words[a:b]), "pos": f"pages/{name}"} for a, b in SLICES["train"]]
            corpus.append({"corpus-id": name, "image": f"../data/pages/{name}"})
            for kind in ("seen", "unseen"):
                a, b = SLICES[kind]
                queries[kind].append({"query-id": name, "query": " ".join(words[a:b])})
        document.close()
    (out / "data" / "train.jsonl").write_text("".join(json.dumps(t) + "\n" for t in triples))
    for kind in ("seen", "unseen"):
        folder = out / f"eval_{kind}"
        folder.mkdir(exist_ok=True)
        for file, rows in (("corpus", corpus), ("queries", queries[kind]),
                           ("qrels", [{"query-id": q["query-id"], "corpus-id": q["query-id"], "score": 1}
                                      for q in queries[kind]])):
            (folder / f"{file}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(corpus)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pdfs", nargs="+", required=True, help="PDF files")
    p.add_argument("--out", default="outputs/bench/real_pdf_pooling", help="output folder (default: %(default)s)")
    p.add_argument("--dpi", type=int, default=40, help="rendering resolution (default: 40)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default: 30)")
    p.add_argument("--factors", nargs="+", type=int, default=[1, 2, 3, 4], help="pool factors (default: 1 2 3 4)")
    args = p.parse_args(argv)
    setup_logging()
    import token_pooling
    from train_step import load_train_module

    from colintern.backbones.registry import get_family
    from colintern.retriever.model import ColIntern

    out = Path(args.out)
    n_pages = build_sets(args.pdfs, args.dpi, out)
    tiny = out / "tiny"
    if not tiny.exists():
        get_family("internvl").build_tiny(str(tiny), seed=0)
    train = load_train_module()
    code = train.main(["--model_id", str(tiny), "--train_jsonl", str(out / "data" / "train.jsonl"), "--root",
                       str(out / "data"), "--out_dir", str(out / "train"), "--overwrite", "--batch_size", "16",
                       "--epochs", str(args.epochs), "--lr", "2e-3", "--lora", "--tau", "0.05", "--seed", "0",
                       "--device", "cpu", "--save_every", "0"])
    if code:
        return code
    ckpt = sorted((out / "train").glob("colintern_heads_*.pt"))[-1]
    model = ColIntern.from_pretrained(str(tiny), ckpt=str(ckpt), device="cpu")
    result = {"env": env(model.device), "pdfs": args.pdfs, "pages": n_pages, "dpi": args.dpi, "ckpt": str(ckpt)}
    for kind in ("seen", "unseen"):
        rows = token_pooling.measure(model, str(out / f"eval_{kind}"), args.factors)
        print(f"\n{kind} queries ({n_pages} real pages)")
        print_table(rows, [("pool_factor", "K", "d"), ("ndcg_at_5", "nDCG@5", ".4f"),
                           ("ndcg_at_5_kept", "kept", ".1%"), ("recall_at_5", "R@5", ".4f"),
                           ("vectors_per_page", "vectors/page", ".1f"), ("bytes_per_page", "bytes/page", ".0f")])
        result[kind] = rows
    write_json(str(out / "pooling.json"), result)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, out_flag="--out"))
