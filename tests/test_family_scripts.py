"""Each script's main path on each backbone family's tiny model (`tiny_backbone` runs once per registered family):
train.py (LoRA, heads only), mine.py --teacher, eval.py, search.py index + query (and token pooling), each checked
against the model's own MaxSim."""
from __future__ import annotations

import json
import math
import os

import pytest
from PIL import Image

from colintern import ColIntern
from colintern.retriever.checkpoint import load_checkpoint
from colintern.retriever.scoring import maxsim
from helpers import load_script, search_page
from helpers import search_run as run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_script_runs_on_every_family(tiny_backbone, synthetic_tiny_dir, tmp_path, capsys):
    name, folder = tiny_backbone
    corpus = synthetic_tiny_dir
    train, mine, evaluate = load_script("train"), load_script("mine"), load_script("eval")
    assert train.main(["--model_id", folder, "--train_hub", os.path.join(corpus, "train"), "--batch_size", "4",
                       "--max_steps", "2", "--lr", "1e-3", "--lora", "--lora_r", "4", "--lora_alpha", "8",
                       "--max_tiles", "1", "--max_visual_tokens", "64", "--dim", "32", "--save_every", "2",
                       "--device", "cpu", "--out_dir", str(tmp_path / "train")]) == 0
    ckpt = str(tmp_path / "train" / "colintern_heads_step2.pt")
    payload = load_checkpoint(ckpt)
    assert payload["config"]["backbone"] == name and payload["lora"]["config"]["r"] == 4
    losses = [json.loads(line)["loss"] for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    model = ColIntern.from_pretrained(folder, ckpt=ckpt)
    # heads only (no --lora): one step moves the head, and the checkpoint holds no LoRA
    assert train.main(["--model_id", folder, "--train_hub", os.path.join(corpus, "train"), "--batch_size", "4",
                       "--max_steps", "1", "--warmup_ratio", "0", "--lr", "1e-3", "--max_tiles", "1",
                       "--max_visual_tokens", "64", "--dim", "32", "--save_every", "1", "--device", "cpu",
                       "--out_dir", str(tmp_path / "heads")]) == 0
    heads = load_checkpoint(str(tmp_path / "heads" / "colintern_heads_step1.pt"))
    fresh = ColIntern.from_pretrained(folder, max_tiles=1, max_visual_tokens=64, dim=32)
    assert heads["lora"] is None and not (heads["head"]["weight"] == fresh.head.weight).all()

    # mine.py --teacher CKPT (on its recorded base model): the mined positive's score is this model's MaxSim
    from colintern.data.datasets import load_page_dataset
    from colintern.data.images import decode_image

    mined = tmp_path / "mined.jsonl"
    assert mine.main(["--teacher", ckpt, "--hub_name", os.path.join(corpus, "train"), "--method", "exact", "--k", "1",
                      "--fn_filter", "0", "--out_jsonl", str(mined), "--quiet"]) == 0
    meta = json.loads(mined.with_suffix(".meta.json").read_text())
    assert meta["teacher"]["kind"] == "ColIntern checkpoint" and meta["model"] == folder and meta["checkpoint"] == ckpt
    rows = [json.loads(line) for line in mined.read_text().splitlines()]
    data = load_page_dataset(os.path.join(corpus, "train"))
    assert len(rows) == len(data) == 24
    first = maxsim(model.encode_queries([data[0]["query"]]), model.encode_images([decode_image(data[0]["image"], "0")]))
    assert rows[0]["scores"]["pos"] == pytest.approx(float(first[0, 0]), abs=2e-3)  # pages stored in float16

    # eval.py: the run's scores are the model's MaxSim
    assert evaluate.main(["--ckpt", ckpt, "--local_dataset", os.path.join(corpus, "eval"), "--out_dir",
                          str(tmp_path / "eval"), "--run_name", name, "--save_run", "--device", "cpu"]) == 0
    run_scores = json.loads((tmp_path / "eval" / name / "runs" / "eval.json").read_text())
    query_id, page_scores = next(iter(run_scores.items()))
    queries = {json.loads(line)["query-id"]: json.loads(line)["query"]
               for line in open(os.path.join(corpus, "eval", "queries.jsonl"))}
    corpus_rows = [json.loads(line) for line in open(os.path.join(corpus, "eval", "corpus.jsonl"))]
    pages = [Image.open(os.path.join(corpus, "eval", row["image"])).convert("RGB") for row in corpus_rows]
    direct = maxsim(model.encode_queries([queries[query_id]]), model.encode_images(pages))
    for j, row in enumerate(corpus_rows):
        assert page_scores[row["corpus-id"]] == pytest.approx(float(direct[0, j]), abs=2e-5)

    # search.py: index two pages, the query's top score is the model's MaxSim
    docs = tmp_path / "docs"
    docs.mkdir()
    search_page(0).save(docs / "a.png")
    search_page(3).save(docs / "b.png")
    code, _, err = run(capsys, "index", "--ckpt", ckpt, "--inputs", docs, "--index", tmp_path / "index")
    assert code == 0, err
    code, out, err = run(capsys, "query", "--index", tmp_path / "index", "--k", 2, "--json", "a red page")
    assert code == 0, err
    results = json.loads(out)["results"]
    direct = maxsim(model.encode_queries(["a red page"]), model.encode_images([search_page(0), search_page(3)]))
    for result in results:
        column = 0 if result["file"].endswith("a.png") else 1
        assert result["score"] == pytest.approx(float(direct[0, column]), abs=2e-3)
    # token pooling (--pool_factor 2): each page keeps ceil(n / 2) vectors
    from colintern.index.page_index import PageIndex

    code, _, err = run(capsys, "index", "--ckpt", ckpt, "--inputs", docs, "--index", tmp_path / "pooled",
                       "--pool_factor", 2)
    assert code == 0, err
    lengths = {p["file"]: p["length"] for p in PageIndex.open(tmp_path / "pooled").pages}
    full = model.encode_images([search_page(0), search_page(3)])
    assert sorted(lengths.values()) == sorted(-(-len(e) // 2) for e in full)


def test_smolvlm2_model_type_loads_the_same_model(tiny_smolvlm_dir, tmp_path):
    """SmolVLM2 folders (model_type "smolvlm") load through SmolVLMModel: the tiny Idefics3 relabelled as one gives
    the same embeddings (the same weights are read; the image rules are the same as Idefics3's)."""
    import shutil

    from helpers import noisy_page

    copy = tmp_path / "smolvlm2"
    shutil.copytree(tiny_smolvlm_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(model_type="smolvlm", architectures=["SmolVLMForConditionalGeneration"])
    config["text_config"]["model_type"] = "llama"
    config["vision_config"]["model_type"] = "smolvlm_vision"
    (copy / "config.json").write_text(json.dumps(config))
    pages, queries = [noisy_page(200, 120, (200, 30, 30), 1)], ["a red page"]
    original, relabelled = ColIntern.from_pretrained(tiny_smolvlm_dir), ColIntern.from_pretrained(str(copy))
    assert type(relabelled.backbone).__mro__[1].__name__ == "SmolVLMModel"
    for a, b in ((original.encode_images(pages), relabelled.encode_images(pages)),
                 (original.encode_queries(queries), relabelled.encode_queries(queries))):
        assert a[0].shape == b[0].shape and (a[0] - b[0]).abs().max().item() < 1e-6
