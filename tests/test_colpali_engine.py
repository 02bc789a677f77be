"""colpali-engine checkpoints (ColQwen2.5, ColQwen3, ColSmol / ColIdefics3) load as ColIntern models and give what
colpali-engine computes: tiny checkpoints are saved in its layout (the model class with its head, saved by
transformers; LoRA adapters on the language model and the head, saved by peft) and compared with a restatement of its
forward and processor (tests/colpali_reference.py)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import colpali_reference as ref
from colintern import ColIntern, UserError
from helpers import noisy_page

pytestmark = pytest.mark.usefixtures("one_thread")

PAGES = [noisy_page(224, 300, (255, 0, 0), 1), noisy_page(100, 100, (0, 0, 255), 2),
         noisy_page(400, 150, (0, 255, 0), 3)]
QUERIES = ["red page", "a blue square with the word delta", "x"]
TARGETS = {  # the target_modules colpali-engine's training configs give peft
    "custom_text_proj": r"(.*(model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$|.*(custom_text_proj).*$)",
    "linear": r"(.*(text_model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$|.*(linear).*$)",
}
TINY = {"qwen2_5_vl": "tiny_qwen25_dir", "qwen3_vl": "tiny_qwen_dir", "smolvlm": "tiny_smolvlm_dir"}


def copy_processor_files(source: str, folder, family: str) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(os.path.join(source, name), folder / name)
    if family == "smolvlm":
        (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Idefics3Processor",
                                                                  "image_seq_len": 16}))


def colpali_layout(family: str, tiny_dir: str, out):
    """(the reference model, its embeddings without adapters, the base folder, the adapter folder)."""
    from peft import LoraConfig, get_peft_model

    backbone = ColIntern.from_pretrained(tiny_dir).backbone
    torch.manual_seed(1)
    model = ref.reference_model(family, backbone.config)
    target = model.model if family == "smolvlm" else model
    missing, unexpected = target.load_state_dict(backbone.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("custom_text_proj") for k in missing)
    model.eval()
    base = out / "base"
    model.save_pretrained(base)
    copy_processor_files(tiny_dir, base, family)
    processor = ref.reference_processor(family, str(base))
    plain = (ref.embed(model, ref.process_queries(family, processor, QUERIES)),
             ref.embed(model, ref.process_images(family, processor, PAGES)))
    head = ref.SPECS[family][3]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=TARGETS[head]))
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    adapter = out / "adapter"
    peft_model.save_pretrained(adapter)
    copy_processor_files(tiny_dir, adapter, family)
    return model, plain, base, adapter


def close(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "smolvlm"])
def test_colpali_checkpoints_give_colpali_engines_embeddings(family, request, tmp_path):
    tiny_dir = request.getfixturevalue(TINY[family])
    model, plain, base, adapter = colpali_layout(family, tiny_dir, tmp_path)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base) and adapter_config["r"] == 4
    processor = ref.reference_processor(family, str(adapter))
    with_adapters = (ref.embed(model, ref.process_queries(family, processor, QUERIES)),
                     ref.embed(model, ref.process_images(family, processor, PAGES)))

    loaded = ColIntern.from_pretrained(str(adapter))  # the adapter folder, as a user passes a hub id
    assert loaded.config.dim == ref.SPECS[family][2] and loaded.config.backbone == family
    assert (loaded.config.query_prefix, loaded.config.keep_page_tokens, loaded.config.padding_side) == \
        ("", "all", "left")
    assert close(loaded.encode_queries(QUERIES), with_adapters[0]) < 1e-5
    assert close(loaded.encode_images(PAGES), with_adapters[1]) < 1e-5
    assert close(loaded.encode_queries(QUERIES), plain[0]) > 1e-3  # the adapters matter

    full = ColIntern.from_pretrained(str(base))  # a full folder with its head, no adapters
    assert close(full.encode_queries(QUERIES), plain[0]) < 1e-5
    assert close(full.encode_images(PAGES), plain[1]) < 1e-5


def test_a_colpali_teacher_mines_for_a_student_of_another_family(tiny_smolvlm_dir, tiny_model_dir, tmp_path):
    """mine.py --teacher (a ColSmol-layout checkpoint): the mined scores are colpali-engine's MaxSim, the
    positive-aware filter holds, the meta names the teacher; a tiny InternVL student trains on the triples."""
    from colintern.data.datasets import load_page_dataset
    from colintern.data.images import decode_image
    from colintern.retriever.checkpoint import load_checkpoint
    from colintern.retriever.scoring import maxsim
    from colintern.testing.synthetic import generate
    from helpers import load_script

    model, _, _, adapter = colpali_layout("smolvlm", tiny_smolvlm_dir, tmp_path)
    corpus = tmp_path / "corpus"
    generate(str(corpus), n_train_pages=6, n_eval_pages=2, queries_per_page=2, page_size=96)
    mined = tmp_path / "mined.jsonl"
    mine = load_script("mine")
    with pytest.raises(UserError, match="pass --teacher, or --model_id with --ckpt, not both"):
        mine.main(["--teacher", str(adapter), "--model_id", tiny_model_dir, "--hub_name", str(corpus / "train")])
    assert mine.main(["--teacher", str(adapter), "--hub_name", str(corpus / "train"), "--method", "exact", "--k", "2",
                      "--fn_filter", "0.95", "--out_jsonl", str(mined), "--device", "cpu", "--quiet"]) == 0
    meta = json.loads(mined.with_suffix(".meta.json").read_text())
    assert meta["teacher"] == {"given": str(adapter), "family": "smolvlm", "dim": 128,
                               "kind": "colpali-engine ColIdefics3 (ColSmol)"}
    rows = [json.loads(line) for line in mined.read_text().splitlines()]
    data = load_page_dataset(str(corpus / "train"))
    processor = ref.reference_processor("smolvlm", str(adapter))
    queries = ref.embed(model, ref.process_queries("smolvlm", processor, [data[0]["query"]]))
    page = ref.embed(model, ref.process_images("smolvlm", processor, [decode_image(data[0]["image"], "row 0")]))
    assert rows[0]["scores"]["pos"] == pytest.approx(float(maxsim(queries, page)[0, 0]), abs=2e-3)  # fp16 pages
    for row in rows:
        assert all(s <= 0.95 * row["scores"]["pos"] + 1e-6 for s in row["scores"]["negs"])
    train = load_script("train")
    assert train.main(["--model_id", tiny_model_dir, "--train_jsonl", str(mined), "--num_negs", "1", "--batch_size",
                       "4", "--max_steps", "2", "--lr", "1e-3", "--max_tiles", "1", "--device", "cpu", "--save_every",
                       "2", "--out_dir", str(tmp_path / "student")]) == 0
    student = load_checkpoint(str(tmp_path / "student" / "colintern_heads_step2.pt"))
    assert student["config"]["backbone"] == "internvl" and student["training"]["step"] == 2


def test_a_published_retriever_is_a_baseline_in_eval_search_and_the_plots(tiny_qwen25_dir, tmp_path, capsys):
    """eval.py and search.py take a colpali-engine checkpoint as --model_id: eval's run scores and search's scores
    are colpali-engine's MaxSim, and plot_vidore_metrics.py puts its run beside another in one table."""
    from colintern.retriever.scoring import maxsim
    from colintern.testing.synthetic import generate
    from helpers import load_script, search_page
    from helpers import search_run as run

    model, _, _, adapter = colpali_layout("qwen2_5_vl", tiny_qwen25_dir, tmp_path)
    processor = ref.reference_processor("qwen2_5_vl", str(adapter))
    corpus = tmp_path / "corpus"
    generate(str(corpus), n_train_pages=2, n_eval_pages=3, queries_per_page=1, page_size=96)
    evaluate = load_script("eval")
    for name, flags in (("colqwen", ["--model_id", str(adapter)]), ("base", ["--model_id", tiny_qwen25_dir])):
        assert evaluate.main([*flags, "--local_dataset", str(corpus / "eval"), "--out_dir", str(tmp_path / "eval"),
                              "--run_name", name, "--save_run", "--device", "cpu"]) == 0
    run_scores = json.loads((tmp_path / "eval" / "colqwen" / "runs" / "eval.json").read_text())
    queries = {json.loads(line)["query-id"]: json.loads(line)["query"] for line in open(corpus / "eval" / "queries.jsonl")}
    rows = [json.loads(line) for line in open(corpus / "eval" / "corpus.jsonl")]
    from PIL import Image

    pages = [Image.open(corpus / "eval" / row["image"]) for row in rows]
    query_id = next(iter(run_scores))
    direct = maxsim(ref.embed(model, ref.process_queries("qwen2_5_vl", processor, [queries[query_id]])),
                    ref.embed(model, ref.process_images("qwen2_5_vl", processor, pages)))
    for j, row in enumerate(rows):
        assert run_scores[query_id][row["corpus-id"]] == pytest.approx(float(direct[0, j]), abs=2e-5)

    plots = load_script("plot_vidore_metrics")
    assert plots.main(["--inputs", str(tmp_path / "eval" / "colqwen"), str(tmp_path / "eval" / "base"), "--outdir",
                       str(tmp_path / "plots")]) == 0
    table = (tmp_path / "plots" / "metrics.csv").read_text().splitlines()
    summaries = {name: json.loads((tmp_path / "eval" / name / "summary.json").read_text()) for name in ("colqwen", "base")}
    for name, summary in summaries.items():
        value = summary["tasks"]["eval"]["ndcg_at_5"]
        assert any(line.startswith(f"{name},eval,ndcg_at_5,") and float(line.split(",")[3]) == pytest.approx(value)
                   for line in table)

    docs = tmp_path / "docs"
    docs.mkdir()
    search_page(1).save(docs / "a.png")
    code, _, err = run(capsys, "index", "--model_id", adapter, "--inputs", docs, "--index", tmp_path / "index")
    assert code == 0 and "UNTRAINED" not in err, err
    code, out, err = run(capsys, "query", "--index", tmp_path / "index", "--json", "a green page")
    assert code == 0, err
    expected = maxsim(ref.embed(model, ref.process_queries("qwen2_5_vl", processor, ["a green page"])),
                      ref.embed(model, ref.process_images("qwen2_5_vl", processor, [search_page(1)])))
    assert json.loads(out)["results"][0]["score"] == pytest.approx(float(expected[0, 0]), abs=2e-3)
