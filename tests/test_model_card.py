"""search.py export_model writes a model card (README.md) whose every field comes from the checkpoint and the
eval.py summaries given: Hub metadata, how it was trained, the scores table, usage and the upload command."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from colintern.retriever.checkpoint import load_checkpoint
from helpers import search_run as run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_model_card_is_the_checkpoints_own(tiny_model_dir, synthetic_small_dir, tmp_path, capsys):
    from colintern.settings import TrainConfig
    from colintern.train.trainer import train

    data = os.path.join(synthetic_small_dir, "train")
    train(TrainConfig(model_id=tiny_model_dir, train_hub=data, dim=16, max_tiles=1, batch_size=4, max_steps=2,
                      lr=1e-3, lora=True, lora_r=4, lora_alpha=8, num_workers=0, device="cpu",
                      out_dir=str(tmp_path / "train"), save_every=0))
    ckpt = tmp_path / "train" / "colintern_heads_step2.pt"
    payload = load_checkpoint(str(ckpt))
    summary = {"benchmark": "local", "main_metric": "ndcg_at_5", "main_metrics": {"eval": "ndcg_at_5"},
               "tasks": {"eval": {"ndcg_at_5": 0.6123, "ndcg_at_10": 0.7001, "recall_at_5": 0.8}},
               "average": {"ndcg_at_5": 0.6123, "ndcg_at_10": 0.7001, "recall_at_5": 0.8}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "exported"
    code, printed, err = run(capsys, "export_model", "--ckpt", ckpt, "--model_id", tiny_model_dir, "--out", out,
                             "--repo_id", "me/tiny-retriever", "--license", "apache-2.0", "--eval_summary",
                             tmp_path / "run", "--device", "cpu")
    assert code == 0, err
    assert printed.strip().endswith(f"publish it with: hf upload me/tiny-retriever {out} .")
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "colintern" and front["pipeline_tag"] == "visual-document-retrieval"
    assert front["license"] == "apache-2.0" and "late-interaction" in front["tags"] and "internvl" in front["tags"]
    assert "datasets" not in front and "base_model" not in front  # local data and a local base model: not claimed
    training = payload["training"]
    rows = dict(line.strip("|").split("|", 1) for line in card.splitlines() if line.startswith("| ") and
                not line.startswith("| ---"))
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["dimension"] == str(payload["config"]["dim"]) == "16"
    assert rows["base model"] == tiny_model_dir
    assert rows["optimizer steps"] == f"{training['step']} in all, {training['phase']['steps']} in the last phase"
    assert rows["optimizer steps"] == "2 in all, 2 in the last phase"
    assert rows["LoRA"].startswith("r 4, alpha 8, dropout 0.1 on q_proj")
    assert rows["training data"] == "local data, not published"
    assert rows["batch"] == "4 pairs x 1 accumulation x 1 processes"
    assert rows["loss"] == f"ce, temperature {training['phase']['args']['tau']}, lr 0.001, adamw"
    from colintern.eval.run import format_table

    assert format_table(summary) in card and "0.6123" in card
    assert "hf upload me/tiny-retriever" in card
    # a bad summary is one line, before anything loads
    (tmp_path / "bad.json").write_text("{}")
    code, _, err = run(capsys, "export_model", "--ckpt", ckpt, "--out", tmp_path / "x", "--eval_summary",
                       tmp_path / "bad.json")
    assert code == 2 and err.strip() == (f"error: --eval_summary {tmp_path / 'bad.json'}: not an eval.py summary.json "
                                         "(no tasks, main_metric, average)")


def test_hub_data_and_a_hub_base_model_are_declared():
    from colintern.retriever.model_card import model_card

    payload = {"config": {"dim": 128, "backbone": "qwen3_vl", "embedding": "multi", "query_prefix": "Query: "},
               "lora": None, "training": {"step": 10, "datasets": ["vidore/colpali_train_set", "/data/x.jsonl"],
                                          "phase": {"index": 1, "kind": "hub", "steps": 10, "batch_size": 32,
                                                    "args": {"loss": "ce"}}}}
    card = model_card(payload, "Qwen/Qwen3-VL-2B-Instruct", "out", "me/m", "mit", [])
    front = yaml.safe_load(card.split("---")[1])
    assert front["datasets"] == ["vidore/colpali_train_set"] and front["base_model"] == "Qwen/Qwen3-VL-2B-Instruct"
    assert "[vidore/colpali_train_set](https://huggingface.co/datasets/vidore/colpali_train_set), local data, not " \
           "published" in card


def test_the_mteb_reference_file_loads_the_export_and_scores_what_eval_py_scores(tiny_model_dir, synthetic_small_dir,
                                                                                  tmp_path, capsys):
    """OUT/mteb_model_meta.py is eval.py's ModelMeta under the Hub name; loaded by its loader and evaluated by
    mteb.evaluate on a local BEIR set, the exported model scores what eval.py --model_id OUT does."""
    import importlib.util

    import mteb

    from colintern.eval.evaluation import local_task
    from colintern.eval.mteb_model import ColInternMTEB
    from colintern.eval.run import evaluate
    from colintern.retriever.checkpoint import save_checkpoint
    from colintern.settings import EvalConfig
    from colintern import ColIntern

    model = ColIntern.from_pretrained(tiny_model_dir, max_tiles=1, dim=16)
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(str(ckpt), **model.checkpoint_parts(), training={"datasets": ["vidore/colpali_train_set"]})
    out = tmp_path / "exported"
    code, _, err = run(capsys, "export_model", "--ckpt", ckpt, "--model_id", tiny_model_dir, "--out", out,
                       "--repo_id", "me/tiny-retriever", "--license", "mit", "--device", "cpu")
    assert code == 0, err
    spec = importlib.util.spec_from_file_location("reference", out / "mteb_model_meta.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    meta = reference.me_tiny_retriever
    assert meta.name == "me/tiny-retriever" and meta.license == "mit"
    assert meta.reference == "https://huggingface.co/me/tiny-retriever"
    assert meta.model_type == ["late-interaction"] and meta.embed_dim == 16 and meta.modalities == ["image", "text"]
    assert meta.training_datasets == {"VidoreDocVQARetrieval", "VidoreInfoVQARetrieval", "VidoreTatdqaRetrieval",
                                      "VidoreArxivQARetrieval"}  # colpali_train_set, declared as such
    declared = ColInternMTEB(str(out), device="cpu").mteb_model_meta  # what eval.py's encoder declares
    assert meta.adapted_from is None  # the base model is a local folder here, not a Hub id
    same = ("n_parameters", "embed_dim", "similarity_fn_name", "training_datasets", "modalities", "model_type",
            "framework", "use_instructions", "open_weights")
    assert {k: getattr(meta, k) for k in same} == {k: getattr(declared, k) for k in same}

    task = local_task(os.path.join(synthetic_small_dir, "eval"))
    # ModelMeta.load_model() first demands torchvision (mteb's "image" extra) of every image model, which ColIntern never
    # needs and this project never installs; past that check it calls the loader like this
    encoder = meta.loader(meta.name, revision=meta.revision, **{"model_id": str(out), "device": "cpu"})
    result = mteb.evaluate(encoder, [task], cache=None, co2_tracker=False, show_progress_bar=False)
    scores = result.task_results[0].scores["test"][0]
    summary = evaluate(EvalConfig(model_id=str(out), local_dataset=[os.path.join(synthetic_small_dir, "eval")],
                                  out_dir=str(tmp_path / "eval"), run_name="exported", device="cpu"))
    by_eval = next(iter(summary["tasks"].values()))
    for metric in ("ndcg_at_5", "ndcg_at_10", "recall_at_5"):
        assert scores[metric] == pytest.approx(by_eval[metric], abs=5e-6), metric  # mteb keeps 5 decimals
