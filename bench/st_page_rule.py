"""What the sentence-transformers export's page-token rule costs: nDCG@5 with ColIntern's rule and with the one the
exported folder's MultiVectorMask applies, on a local BEIR set.

    python bench/st_page_rule.py --ckpt outputs/demo/train2/colintern_heads_epoch2.pt \\
        --eval outputs/demo/synthetic/eval --out outputs/bench/st_page_rule

ColIntern keeps a page's tokens from the first image token on (keep_page_tokens "page"); sentence-transformers'
MultiVectorMask can only drop token ids, so the export drops the ids found only before the image
(colintern/retriever/st_layout.py) and a prompt token whose id also occurs after the image is scored too (InternVL's
default prompt: the "\\n" before the image). The second rule is applied here to the same forward pass, as the mask
does it (tests/test_st_export.py checks that sentence-transformers itself gives exactly these vectors). Writes
OUT/st_page_rule.json.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from benchlib import env, print_table, write_json  # noqa: E402

from colintern.cli import run_cli, setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a multi-vector ColIntern checkpoint")
    parser.add_argument("--eval", required=True, help="a local BEIR-layout page set")
    parser.add_argument("--out", default="outputs/bench/st_page_rule", help="where st_page_rule.json goes")
    parser.add_argument("--batch_size", type=int, default=8, help="pages per forward pass")
    options = parser.parse_args(argv)
    setup_logging()

    import torch
    from PIL import Image

    from colintern import ColIntern
    from colintern.data.beir import load_beir_dir
    from colintern.eval.evaluation import retrieval_metrics
    from colintern.retriever.checkpoint import load_checkpoint
    from colintern.retriever.scoring import maxsim
    from colintern.retriever.st_layout import page_token_mask

    corpus, queries, qrels = load_beir_dir(options.eval)
    model = ColIntern.from_pretrained(load_checkpoint(options.ckpt)["config"]["base_model"], ckpt=options.ckpt)
    mask_config, extra_tokens = page_token_mask(model.processor)
    skip = torch.tensor(model.tokenizer.convert_tokens_to_ids(mask_config["skiplist_words"]) or [-1])
    page_ids = list(corpus)
    images = [Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref).convert("RGB") for ref in corpus.values()]
    colintern_pages, st_pages = [], []
    with torch.inference_mode():
        for start in range(0, len(images), options.batch_size):
            inputs = model.processor.process_images(images[start:start + options.batch_size])
            hidden = model.hidden_states(inputs)  # (B, L, H)
            st_keep = inputs["attention_mask"].bool() & ~torch.isin(inputs["input_ids"], skip)  # (B, L)
            for keep_mask, out in ((inputs["keep_mask"], colintern_pages), (st_keep, st_pages)):
                emb, keep = model.embed(hidden, keep_mask)
                out += [emb[row][keep[row]].cpu() for row in range(emb.shape[0])]
    query_ids = list(queries)
    query_vectors = model.encode_queries(list(queries.values()))
    rows: list[dict] = []
    results = {}
    for name, pages in (("ColIntern (tokens from the image on)", colintern_pages),
                        (f"sentence-transformers export (+ {extra_tokens})", st_pages)):
        scores = maxsim(query_vectors, pages)  # (Q, P)
        run = {q: {page_ids[p]: float(scores[i, p]) for p in range(len(page_ids))} for i, q in enumerate(query_ids)}
        metrics = retrieval_metrics(qrels, run)
        vectors = sum(len(p) for p in pages) / len(pages)
        results[name] = {"ndcg_at_5": metrics["ndcg_at_5"], "ndcg_at_10": metrics["ndcg_at_10"],
                         "recall_at_5": metrics["recall_at_5"], "vectors_per_page": vectors}
        rows.append({"rule": name, **results[name]})
    print_table(rows, [("rule", "page tokens", "s"), ("ndcg_at_5", "nDCG@5", ".4f"), ("ndcg_at_10", "nDCG@10", ".4f"),
                       ("recall_at_5", "recall@5", ".4f"), ("vectors_per_page", "vectors/page", ".1f")])
    write_json(Path(options.out) / "st_page_rule.json",
               {"env": env(torch.device("cpu")), "ckpt": options.ckpt, "eval": options.eval, "queries": len(query_ids),
                "pages": len(page_ids), "extra_tokens": extra_tokens, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
