"""Single-vector retrieval (seed 002): pooling against float64 references, instruction and EOS handling,
bidirectional attention, batch invariance in every pooling x attention cell on both backbones, learnability, and
the rest of the toolkit (dense scoring, mining with another model's checkpoint, mteb) on single-vector models."""
from __future__ import annotations

import json
import os

import pytest
import torch

from colintern import ColIntern
from colintern.retriever.pooling import LatentAttentionPooler, last_kept, masked_mean, pool
from colintern.retriever.scoring import dense_scores, maxsim
from helpers import load_script, max_diff, noisy_page

PAGES = [noisy_page(224, 300, (255, 0, 0), 1), noisy_page(100, 100, (0, 0, 255), 2),
         noisy_page(120, 500, (0, 200, 0), 3)]
QUERIES = ["red page", "a blue square with the word delta", "x"]
CELLS = [(p, a) for p in ("last", "mean", "latent") for a in ("causal", "bidirectional")]
SMALL_LATENT = {"num_latents": 16, "heads": 2, "dim_head": 16, "mlp_mult": 2}

pytestmark = pytest.mark.usefixtures("one_thread")


def single(folder: str, pooling: str = "mean", attention: str = "causal", **extra) -> ColIntern:
    """A new single-vector model as train.py builds one (no augmentation, queries end with the EOS token)."""
    from colintern.backbones.base import load_tokenizer

    if pooling == "latent":
        extra.setdefault("latent", SMALL_LATENT)
    return ColIntern.from_pretrained(folder, embedding="single", pooling=pooling, attention=attention,
                                     n_augmentation=0, query_suffix=load_tokenizer(folder).eos_token,
                                     max_tiles=2, max_visual_tokens=64, **extra)


def test_poolings_against_float64_references():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)  # (B, L, H)
    keep = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    want_mean = torch.stack([hidden[0, :3].mean(0), hidden[1, [1, 3, 4]].mean(0), torch.zeros(8, dtype=torch.float64)])
    torch.testing.assert_close(masked_mean(hidden, keep), want_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(last_kept(hidden, keep)[:2], torch.stack([hidden[0, 2], hidden[1, 4]]), rtol=0, atol=0)
    pooler = LatentAttentionPooler(8, **SMALL_LATENT, seed=3).double()
    got = pool(hidden, keep, "latent", pooler)
    with torch.no_grad():  # the same computation written out: tokens attend to the latents, MLP, masked mean
        heads, dh = SMALL_LATENT["heads"], SMALL_LATENT["dim_head"]
        q = pooler.to_q(pooler.norm_tokens(hidden)).view(3, 5, heads, dh)  # (B, L, heads, dh)
        k, v = pooler.to_kv(pooler.norm_latents(pooler.latents)).view(-1, 2, heads, dh).unbind(1)  # (r, heads, dh)
        attn = torch.softmax(torch.einsum("blhd,rhd->bhlr", q, k) / dh ** 0.5, dim=-1)
        mixed = torch.einsum("bhlr,rhd->blhd", attn, v).reshape(3, 5, heads * dh)
        h = hidden + pooler.to_out(mixed)
        h = h + pooler.mlp(pooler.norm_mlp(h))
        want = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_instruction_is_left_out_of_the_pool_and_last_reads_the_eos(tiny_backbone):
    _, folder = tiny_backbone
    model = single(folder, "last", instruction="Given a question, retrieve the page that answers it")
    proc, tok = model.processor, model.tokenizer
    text = "red page"
    formatted = proc.format_query(text)
    assert formatted == "Instruct: Given a question, retrieve the page that answers it\nQuery: red page" + tok.eos_token
    inputs = proc.process_queries([text, "a much longer query about the blue square"])
    ids, keep = inputs["input_ids"][0], inputs["keep_mask"][0]
    kept_text = tok.decode(ids[keep])
    assert kept_text == " red page" + tok.eos_token or kept_text == "red page" + tok.eos_token
    assert not keep[:len(tok(proc.query_prefix(), add_special_tokens=False)["input_ids"]) - 1].any()
    hidden = model.hidden_states(inputs)  # (B, L, H)
    emb, mask = model.embed(hidden, inputs["keep_mask"])
    eos = int(inputs["attention_mask"][0].sum()) - 1  # right padding: the last real token is the EOS
    assert ids[eos] == tok.eos_token_id and emb.shape == (2, 1, model.config.dim) and mask.all()
    want = torch.nn.functional.normalize(model.head(hidden[0, eos].float()).double(), dim=-1)
    assert (emb[0, 0].double() - want).abs().max() < 1e-6


def test_bidirectional_lets_the_first_token_see_the_last(tiny_backbone):
    """Causal: the first token's state ignores what follows it; bidirectional: it changes (both backbones)."""
    _, folder = tiny_backbone
    for attention, changes in (("causal", False), ("bidirectional", True)):
        model = single(folder, "mean", attention)
        a = model.hidden_states(model.processor.process_queries(["red page with a circle"]))[0, 0]
        b = model.hidden_states(model.processor.process_queries(["red page with a square"]))[0, 0]
        assert bool((a - b).abs().max() > 1e-3) == changes, attention
        lm = model.family.language_model(model.backbone)
        assert getattr(lm.config, "is_causal", True) == (attention == "causal")


@pytest.mark.parametrize("pooling, attention", CELLS)
def test_every_cell_is_batch_invariant_on_both_backbones(tiny_backbone, pooling, attention):
    _, folder = tiny_backbone
    model = single(folder, pooling, attention)
    pages = model.encode_images(PAGES, batch_size=len(PAGES))
    alone = [model.encode_images([p], batch_size=1)[0] for p in PAGES]
    queries = model.encode_queries(QUERIES, batch_size=len(QUERIES))
    queries_alone = [model.encode_queries([q], batch_size=1)[0] for q in QUERIES]
    assert all(e.shape == (1, model.config.dim) for e in pages + queries)
    assert max_diff(pages, alone) <= 1e-5 and max_diff(queries, queries_alone) <= 1e-5
    torch.testing.assert_close(torch.cat(pages).norm(dim=-1), torch.ones(len(PAGES)), rtol=0, atol=1e-5)


def test_dense_scoring_is_maxsim_of_one_token():
    g = torch.Generator().manual_seed(1)
    qs = [torch.nn.functional.normalize(torch.randn(1, 16, generator=g), dim=-1) for _ in range(5)]
    docs = [torch.nn.functional.normalize(torch.randn(1, 16, generator=g), dim=-1) for _ in range(7)]
    want = (torch.cat(qs).double() @ torch.cat(docs).double().T)
    assert (maxsim(qs, docs, device="cpu").double() - want).abs().max() < 1e-6
    assert (dense_scores(qs, docs, doc_chunk=3).double() - want).abs().max() < 1e-6


@pytest.mark.parametrize("pooling, attention", [("mean", "causal"), ("latent", "bidirectional")])
def test_single_vector_lora_training_learns(tiny_model_dir, synthetic_dir, tmp_path, pooling, attention):
    """nDCG@5 on the held-out synthetic pages rises by at least 0.10 over the untrained base (measured +0.27 to
    +0.41 in the four cells tried; docs/BENCHMARKS.md)."""
    from colintern.eval.evaluation import LocalEvaluator

    train = load_script("train")
    extra = ["--latent_size", "16", "--latent_heads", "2"] if pooling == "latent" else []
    out = tmp_path / "run"
    assert train.main(["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_dir, "train"),
                       "--embedding", "single", "--pooling", pooling, "--attention", attention, *extra,
                       "--lora_preset", "nv-embed", "--lr", "1e-3", "--batch_size", "16", "--epochs", "2",
                       "--max_tiles", "2", "--num_workers", "0", "--save_every", "0", "--tau", "0.05",
                       "--out_dir", str(out)]) == 0
    evaluator = LocalEvaluator(os.path.join(synthetic_dir, "eval"))
    trained = ColIntern.from_pretrained(tiny_model_dir, ckpt=str(out / "colintern_heads_epoch2.pt"))
    assert (trained.config.embedding, trained.config.pooling, trained.config.attention) == ("single", pooling,
                                                                                            attention)
    base = single(tiny_model_dir, pooling, attention, latent={"num_latents": 16, "heads": 2} if pooling == "latent"
                  else {})
    gain = evaluator(trained)["ndcg_at_5"] - evaluator(base)["ndcg_at_5"]
    assert gain >= 0.10, gain


def test_mine_with_a_multi_vector_model_then_train_and_mine_a_single_vector_one(tiny_model_dir, synthetic_small_dir,
                                                                               tmp_path):
    """Better negatives from another model: a multi-vector checkpoint mines, a single-vector model trains on the
    triples; mine.py and the mteb wrapper then run unchanged on the single-vector checkpoint."""
    train, mine = load_script("train"), load_script("mine")
    data = os.path.join(synthetic_small_dir, "train")
    common = ["--model_id", tiny_model_dir, "--num_workers", "0", "--max_tiles", "2", "--batch_size", "8",
              "--save_every", "0"]
    assert train.main(common + ["--train_hub", data, "--max_steps", "2", "--out_dir", str(tmp_path / "multi")]) == 0
    mined = tmp_path / "mined.jsonl"
    assert mine.main(["--model_id", tiny_model_dir, "--ckpt", str(tmp_path / "multi" / "colintern_heads_step2.pt"),
                      "--hub_name", data, "--out_jsonl", str(mined), "--k", "3", "--method", "exact", "--quiet"]) == 0
    assert train.main(common + ["--train_jsonl", str(mined), "--num_negs", "1", "--embedding", "single",
                                "--max_steps", "2", "--out_dir", str(tmp_path / "single")]) == 0
    ckpt = str(tmp_path / "single" / "colintern_heads_step2.pt")
    again = tmp_path / "mined_single.jsonl"
    assert mine.main(["--model_id", tiny_model_dir, "--ckpt", ckpt, "--hub_name", data, "--out_jsonl", str(again),
                      "--k", "3", "--method", "exact", "--quiet"]) == 0
    meta = json.loads((tmp_path / "mined_single.meta.json").read_text())
    assert meta["counts"]["lines"] == len(again.read_text().splitlines()) > 0
    assert meta["counts"]["page_tokens"] == meta["counts"]["pages_valid"]  # one vector per page
    from mteb_model import ColInternMTEB

    encoder = ColInternMTEB(tiny_model_dir, ckpt=ckpt, device="cpu", show_progress=False)
    assert encoder.mteb_model_meta.model_type == ["dense"] and str(encoder.mteb_model_meta.similarity_fn_name) == "dot"
    evaluate = load_script("eval")
    assert evaluate.main(["--ckpt", ckpt, "--model_id", tiny_model_dir, "--local_dataset",
                          os.path.join(synthetic_small_dir, "eval"), "--out_dir", str(tmp_path / "eval"),
                          "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "eval" / "colintern_heads_step2" / "summary.json").read_text())
    assert summary["config"]["embedding"] == "single" and 0.0 <= summary["average"]["ndcg_at_5"] <= 1.0


def test_heads_only_training_of_a_latent_pooler_uses_the_hidden_state_cache(tiny_model_dir, synthetic_small_dir,
                                                                            tmp_path):
    """Heads only (frozen backbone): the pooler and head train on cached hidden states; the saved pooler reproduces
    the trained model's embeddings."""
    from colintern.retriever.checkpoint import load_checkpoint

    train = load_script("train")
    out = tmp_path / "run"
    assert train.main(["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"),
                       "--embedding", "single", "--pooling", "latent", "--latent_size", "8", "--latent_heads", "2",
                       "--batch_size", "8", "--epochs", "2", "--lr", "1e-3", "--max_tiles", "2", "--num_workers",
                       "0", "--save_every", "0", "--out_dir", str(out)]) == 0
    first, second = (load_checkpoint(str(out / f"colintern_heads_epoch{e}.pt")) for e in (1, 2))
    assert second["lora"] is None and set(second["pooler"]) == set(first["pooler"])
    assert any(not torch.equal(first["pooler"][k], second["pooler"][k]) for k in first["pooler"])  # it trained
    assert "faster with the hidden-state cache" in (out / "training_loss.txt").read_text()
    model = ColIntern.from_pretrained(tiny_model_dir, ckpt=str(out / "colintern_heads_epoch2.pt"))
    again = ColIntern.from_pretrained(tiny_model_dir, ckpt=str(out / "colintern_heads_epoch2.pt"))
    assert max_diff(model.encode_queries(QUERIES), again.encode_queries(QUERIES)) == 0.0
