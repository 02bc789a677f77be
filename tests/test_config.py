"""Typed settings (colintern/cli.py, colintern/settings.py): flags generated from dataclasses, --config files,
the resolved config every run writes, and the whole workflow driven from Python without an argument list."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from colintern.retriever.checkpoint import load_checkpoint
from colintern.cli import build_parser, parse_command, parse_config, read_config_file, run_cli
from colintern.errors import UserError
from colintern.settings import (SEARCH_COMMANDS, EvalConfig, IndexConfig, ItrTrainConfig, MineConfig, QueryConfig,
                                TrainConfig)
from helpers import load_script, search_page

train = load_script("train")


# ------------------------------------------------------------------------------------------------ parsing


def test_flags_file_and_defaults_in_that_order(tmp_path):
    run = tmp_path / "run.yaml"
    # YAML reads 5e-5 as a string: the field's type makes it a float
    run.write_text("model_id: m\ntrain_hub: h\nlr: 5e-5\nbatch_size: 2\nreport_to: tensorboard\nlora: true\n")
    config = parse_config(TrainConfig, ["--config", str(run), "--batch_size", "3"])
    assert (config.model_id, config.train_hub, config.lr, config.batch_size) == ("m", "h", 5e-5, 3)
    assert config.report_to == ["tensorboard"] and config.lora is True and config.epochs == 1  # a default
    assert parse_config(TrainConfig, ["--config", str(run), "--model_id", "other"]).model_id == "other"
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"model_id": "m", "train_jsonl": "t.jsonl", "num_negs": 3}))
    config = parse_config(TrainConfig, ["--config", str(as_json)])
    assert (config.train_jsonl, config.num_negs, config.train_hub) == ("t.jsonl", 3, None)


def test_the_same_rules_from_python_flags_and_files(tmp_path):
    with pytest.raises(UserError, match="^--batch_size must be at least 1, got 0$"):
        TrainConfig(model_id="m", train_hub="h", batch_size=0)
    with pytest.raises(UserError, match="^--optimizer must be one of adamw, adamw_8bit, paged_adamw_8bit, got 'sgd'$"):
        TrainConfig(model_id="m", train_hub="h", optimizer="sgd")
    with pytest.raises(UserError, match="pass only one of --train_hub and --train_jsonl"):
        parse_config(TrainConfig, ["--model_id", "m", "--train_hub", "h", "--train_jsonl", "t"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_id: m\ntrain_hub: h\nbatch_size: 0\n")
    with pytest.raises(UserError, match="--batch_size must be at least 1, got 0"):
        parse_config(TrainConfig, ["--config", str(bad)])
    preset = TrainConfig(model_id="m", train_hub="h", lora_preset="nv-embed")
    assert (preset.lora, preset.lora_r, preset.lora_alpha, preset.lora_dropout) == (True, 16, 32, 0.1)


@pytest.mark.parametrize("text, message", [
    ("model_id: m\nlearning_rate: 1e-4\n", r"run.yaml: unknown setting 'learning_rate'; see --help for the names"),
    ("model_id: m\nbatchsize: 4\n", r"run.yaml: unknown setting 'batchsize' \(did you mean batch_size\?\)"),
    ("model_id: m\nepochs: two\n", r"run.yaml: epochs: expected int, got 'two'"),
    ("model_id: m\nepochs: 1.5\n", r"run.yaml: epochs: expected a whole number, got 1.5"),
    ("model_id: m\nlora: yes please\n", r"run.yaml: lora: expected true or false, got 'yes please'"),
    ("model_id: m\ntrain_hub: [unclosed\n", r"run.yaml:3: not valid YAML"),
    ("- just\n- a list\n", r"run.yaml: expected a mapping of settings \(name: value\), got list"),
])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        read_config_file(path, TrainConfig)


def test_a_bad_config_file_through_the_command_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model_id: m\ntrain_hub: h\nbatchsize: 4\n")
    assert run_cli(train.main, ["--config", str(path)]) == 2
    assert capsys.readouterr().err == (f"error: {path}: unknown setting 'batchsize' (did you mean batch_size?); see "
                                       "--help for the names\n")
    assert run_cli(train.main, ["--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err == f"error: --config {tmp_path / 'missing.yaml'}: no such file\n"
    path.write_text("train_hub: h\n")  # model_id is still required: by the flag or the file
    assert run_cli(train.main, ["--config", str(path)]) == 2
    assert "the following arguments are required: --model_id" in capsys.readouterr().err


def test_help_lists_every_field_once_with_its_default():
    text = build_parser(TrainConfig, "train").format_help()
    for name in ("model_id", "lr", "lora_r", "out_dir", "report_to", "gradient_checkpointing", "device"):
        assert text.count(f"--{name} ") + text.count(f"--{name}\n") >= 1, name
    assert "--device_map" in text and "-v, --verbose" in text
    assert "peak learning rate (default: 5e-05)" in " ".join(text.split())
    itr = " ".join(build_parser(ItrTrainConfig, "itr").format_help().split())
    assert "--lr LR peak learning rate (default: 0.0001)" in itr  # the same field, --task itr's own default
    assert "--epochs EPOCHS epochs of this phase (default: 6)" in itr


def test_search_commands_parse_into_their_own_classes(tmp_path):
    command, config = parse_command(SEARCH_COMMANDS, ["query", "--index", "idx", "one", "two", "--where", "a=1",
                                                      "--where", "b=2", "--k", "3"], None, "search.py")
    assert command == "query" and isinstance(config, QueryConfig)
    assert (config.queries, config.where, config.k, config.candidates) == (["one", "two"], ["a=1", "b=2"], 3, 128)
    command, config = parse_command(SEARCH_COMMANDS, ["index", "--index", "idx", "--inputs", "a.pdf", "b/",
                                                      "--meta", "lang=en"], None, "search.py")
    assert isinstance(config, IndexConfig) and config.inputs == ["a.pdf", "b/"] and config.meta == ["lang=en"]
    with pytest.raises(UserError, match="--where 'oops': expected KEY=VALUE"):
        QueryConfig(index="idx", where=["oops"])
    with pytest.raises(UserError, match="--dpi 5000 is over 1200"):
        IndexConfig(index="idx", inputs=["a.pdf"], dpi=5000)
    # mine.py's own defaults of the shared fields
    mine = MineConfig(model_id="m", hub_name="h")
    assert (mine.k, mine.candidates, mine.token_k, mine.fn_filter) == (20, 100, 256, 0.95)


# ------------------------------------------------------------------------------------------------ runs


def head_and_lora(path) -> dict[str, torch.Tensor]:
    payload = load_checkpoint(str(path))
    return {**{f"head.{k}": v for k, v in payload["head"].items()},
            **{f"lora.{k}": v for k, v in (payload.get("lora") or {}).get("state", {}).items()}}


def test_train_from_a_yaml_file_equals_the_same_flags(tiny_model_dir, synthetic_small_dir, tmp_path):
    hub = os.path.join(synthetic_small_dir, "train")
    flags = ["--model_id", tiny_model_dir, "--train_hub", hub, "--dim", "32", "--max_tiles", "2", "--batch_size", "4",
             "--max_steps", "2", "--lr", "1e-3", "--lora", "--lora_r", "4", "--num_workers", "0", "--device", "cpu"]
    assert train.main(flags + ["--out_dir", str(tmp_path / "flags")]) == 0
    run = tmp_path / "run.yaml"
    run.write_text(f"model_id: {tiny_model_dir}\ntrain_hub: {hub}\ndim: 32\nmax_tiles: 2\nbatch_size: 4\n"
                   "max_steps: 2\nlr: 1e-3\nlora: true\nlora_r: 4\nnum_workers: 0\ndevice: cpu\n")
    assert train.main(["--config", str(run), "--out_dir", str(tmp_path / "file")]) == 0
    a = head_and_lora(tmp_path / "flags" / "colintern_heads_step2.pt")
    b = head_and_lora(tmp_path / "file" / "colintern_heads_step2.pt")
    assert sorted(a) == sorted(b) and any(k.startswith("lora.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # two runs on this machine: bit for bit
    # the resolved settings re-run the first run exactly
    resolved = tmp_path / "flags" / "train_config.yaml"
    assert resolved.read_text().startswith("# resolved settings of this run; re-run it exactly with: train.py "
                                           "--config THIS_FILE\n")
    values = yaml.safe_load(resolved.read_text())
    assert values["lr"] == 1e-3 and values["lora_r"] == 4 and values["out_dir"] == str(tmp_path / "flags")
    assert train.main(["--config", str(resolved), "--out_dir", str(tmp_path / "again")]) == 0
    c = head_and_lora(tmp_path / "again" / "colintern_heads_step2.pt")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_train_mine_evaluate_and_search_from_python(tiny_model_dir, synthetic_small_dir, search_docs, tmp_path):
    """The workflow through the Python API alone: config objects and functions, no argument list."""
    from colintern import Index
    from colintern.eval.run import evaluate
    from colintern.mine.miner import mine
    from colintern.train.trainer import train as run_training

    hub = os.path.join(synthetic_small_dir, "train")
    config = TrainConfig(model_id=tiny_model_dir, train_hub=hub, dim=32, max_tiles=2, batch_size=8, max_steps=3,
                         lr=1e-3, num_workers=0, device="cpu", out_dir=str(tmp_path / "train"), save_every=0)
    summary = run_training(config)
    ckpt = tmp_path / "train" / "colintern_heads_step3.pt"
    assert summary.startswith("done: phase 1, 3 steps in this run") and ckpt.is_file()
    assert load_checkpoint(str(ckpt))["training"]["step"] == 3

    out = tmp_path / "mine" / "mined.jsonl"
    lines = list(mine(MineConfig(model_id=tiny_model_dir, ckpt=str(ckpt), hub_name=hub, out_jsonl=str(out), k=3,
                                 method="exact", fn_filter=0, device="cpu", quiet=True)))
    triples = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines and len(triples) == 120 and all(len(t["negs"]) == 3 for t in triples)
    assert all(t["pos"] not in t["negs"] for t in triples)
    assert yaml.safe_load((tmp_path / "mine" / "mined.config.yaml").read_text())["k"] == 3

    second = config.replace(train_hub=None, train_jsonl=str(out), resume_ckpt=str(ckpt), num_negs=1,
                            out_dir=str(tmp_path / "train2"), max_steps=2)
    assert run_training(second).startswith("done: phase 2, 2 steps in this run")

    eval_dir = os.path.join(synthetic_small_dir, "eval")
    result = evaluate(EvalConfig(ckpt=str(ckpt), local_dataset=[eval_dir], out_dir=str(tmp_path / "eval"),
                                 device="cpu"))
    scores = result["tasks"]["eval"]
    assert 0 <= scores["ndcg_at_5"] <= 1 and result["ckpt"] == str(ckpt)
    assert json.loads((tmp_path / "eval" / ckpt.stem / "summary.json").read_text())["tasks"]["eval"] == scores

    index = Index.create(tmp_path / "index", [search_docs], ckpt=str(ckpt), device="cpu")
    assert index.info()["pages"] == 6
    hits = index.search("alpha", k=6)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5, 6]
    assert sorted((Path(h["file"]).name, h["page"]) for h in hits) == [("a.pdf", 1), ("a.pdf", 2), ("a.pdf", 3),
                                                                        ("b.pdf", 1), ("b.pdf", 2), ("c.png", 1)]
    assert all(hits[i]["score"] >= hits[i + 1]["score"] for i in range(5))
    search_page(0).save(tmp_path / "d.png")
    added = index.add([tmp_path / "d.png", search_docs])  # only the new file is encoded
    assert (added.pages, added.total, index.info()["pages"]) == (1, 7, 7)
    assert ("d.png", 1) in {(Path(h["file"]).name, h["page"]) for h in index.search("alpha", k=7)}


def test_settings_objects_become_the_command_lines_that_parse_back_to_them(tmp_path):
    """to_argv(config) is what the ablation grid runs: it parses back into the same object, flags and positionals."""
    from colintern.cli import to_argv
    from colintern.settings import AblateConfig, TinyConfig

    cases = [
        TrainConfig(model_id="m", train_hub="h", lr=1e-3, lora_preset="nv-embed", report_to=["tensorboard", "wandb"],
                    grad_cache=True, embedding="single", pooling="latent", latent_size=16, out_dir=str(tmp_path)),
        TrainConfig(model_id="m", train_jsonl="t.jsonl", num_negs=3, fn_filter=0.9, device="cpu"),
        MineConfig(model_id="m", hub_name="h", k=3, fn_filter=0.0, method="exact", num_shards=2, shard_id=1),
        QueryConfig(index="idx", queries=["a b", "c"], where=["lang=en", "kind=manual"], k=3, json=True),
        IndexConfig(index="idx", inputs=["a.pdf", "docs/"], meta=["lang=en"], dpi=72),
        TinyConfig(out=str(tmp_path / "tiny"), backbone="qwen3_vl", seed=2),
        AblateConfig(poolings=["mean"], seeds=[3], batch_size=4),
    ]
    for config in cases:
        argv = to_argv(config)
        assert parse_config(type(config), argv) == config, (type(config).__name__, argv)
    assert to_argv(cases[3])[:2] == ["a b", "c"] and to_argv(cases[3]).count("--where") == 2
    assert to_argv(TrainConfig(model_id="m", train_hub="h")) == ["--model_id", "m", "--train_hub", "h"]  # what differs
