"""eval.py + mteb_model.py: ViDoRe task classes offline, local BEIR sets, oracle, independent nDCG, checkpoints, errors.

Every evaluation here goes through mteb's own retrieval evaluation (mteb 2.x) with the network off
(HF_HUB_OFFLINE=1, set in conftest.py). The reference numbers are computed independently: nDCG from the saved run
files and the qrels with a few lines of float64 code (and pytrec_eval), scores from ColIntern embeddings + maxsim.
"""
from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from helpers import load_script

REPO = Path(__file__).resolve().parents[1]



ev = load_script("eval")
from colintern.eval import run as eval_run  # noqa: E402

# Small pages of different sizes (1 to 5 tiles of the tiny model's 112 px) so sorting by cost matters.
PAGE_SPECS = [("p0", (112, 112), (200, 30, 30)), ("p1", (224, 112), (30, 200, 30)), ("p2", (112, 336), (30, 30, 200)),
              ("p3", (150, 150), (220, 220, 40)), ("p4", (336, 224), (40, 220, 220)), ("p5", (112, 112), (90, 90, 90))]
QUERIES = {"q0": "red page", "q1": "green wide page", "q2": "tall blue page", "q3": "yellow or grey page",
           "q4": "cyan landscape page", "q5": "a query nobody judged"}
QRELS = [("q0", "p0", 1), ("q1", "p1", 1), ("q1", "p4", 2), ("q2", "p2", 1), ("q3", "p3", 2), ("q3", "p5", 1),
         ("q4", "p4", 1)]


def png_bytes(size, color) -> bytes:
    buf = io.BytesIO()
    image = Image.new("RGB", size, color)
    for x in range(0, size[0], 17):  # some structure, so pages differ beyond their colour
        image.putpixel((x, x % size[1]), (0, 0, 0))
    image.save(buf, "PNG")
    return buf.getvalue()


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_beir(root: Path) -> Path:
    """A docs/CONTRACT.md §7 BEIR-layout set: corpus.jsonl with relative image paths, queries.jsonl, qrels.jsonl."""
    (root / "images").mkdir(parents=True)
    for cid, size, color in PAGE_SPECS:
        (root / "images" / f"{cid}.png").write_bytes(png_bytes(size, color))
    write_jsonl(root / "corpus.jsonl", [{"corpus-id": cid, "image": f"images/{cid}.png"} for cid, _, _ in PAGE_SPECS])
    write_jsonl(root / "queries.jsonl", [{"query-id": q, "query": t} for q, t in QUERIES.items()])
    write_jsonl(root / "qrels.jsonl", [{"query-id": q, "corpus-id": c, "score": s} for q, c, s in QRELS])
    return root


def make_vidore_lookalike(root: Path, languages: dict[str, str] | None = None) -> Path:
    """A local copy shaped like the hub repo mteb/docvqa_test_subsampled_beir (configs corpus/queries/qrels);
    with `languages` ({query: language}) like vidore/esg_reports_v2, whose queries carry a language column."""
    import datasets

    for config in ("corpus", "queries", "qrels"):
        (root / config).mkdir(parents=True)
    features = datasets.Features({"corpus-id": datasets.Value("int64"), "image": datasets.Image()})
    datasets.Dataset.from_dict(
        {"corpus-id": list(range(len(PAGE_SPECS))),
         "image": [{"bytes": png_bytes(size, color), "path": None} for _, size, color in PAGE_SPECS]},
        features=features).to_parquet(root / "corpus" / "test-00000-of-00001.parquet")
    qids = {q: i for i, q in enumerate(QUERIES)}
    cids = {c: i for i, (c, _, _) in enumerate(PAGE_SPECS)}
    queries = {"query-id": list(qids.values()), "query": list(QUERIES.values())}
    if languages:
        queries["language"] = [languages.get(q, "english") for q in QUERIES]
    datasets.Dataset.from_dict(queries).to_parquet(root / "queries" / "test-00000-of-00001.parquet")
    datasets.Dataset.from_dict({"query-id": [qids[q] for q, _, _ in QRELS], "corpus-id": [cids[c] for _, c, _ in QRELS],
                                "score": [s for _, _, s in QRELS]}).to_parquet(root / "qrels" / "test-00000-of-00001.parquet")
    configs = "".join(f"- config_name: {c}\n  data_files:\n  - split: test\n    path: {c}/test-*\n"
                      for c in ("corpus", "queries", "qrels"))
    (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    return root


def lookalike_qrels() -> dict[str, dict[str, int]]:
    """The look-alike's qrels under the ids mteb's Vidore loader gives them ("query-test-<id>", "corpus-test-<id>")."""
    qids = {q: i for i, q in enumerate(QUERIES)}
    cids = {c: i for i, (c, _, _) in enumerate(PAGE_SPECS)}
    out: dict[str, dict[str, int]] = {}
    for q, c, s in QRELS:
        out.setdefault(f"query-test-{qids[q]}", {})[f"corpus-test-{cids[c]}"] = s
    return out


def local_qrels() -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for q, c, s in QRELS:
        out.setdefault(q, {})[c] = s
    return out


def ndcg(qrels, run, k) -> float:
    """Independent nDCG@k in float64: gain = relevance, discount log2(rank + 1), ties by id descending (trec_eval);
    mean over judged queries that have a ranking."""
    values = []
    for qid, rels in qrels.items():
        if qid not in run or not any(r > 0 for r in rels.values()):
            continue
        ranked = sorted(run[qid].items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:k]
        dcg = sum(rels.get(doc, 0) / math.log2(i + 2) for i, (doc, _) in enumerate(ranked))
        ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
        values.append(dcg / sum(r / math.log2(i + 2) for i, r in enumerate(ideal)))
    return sum(values) / len(values)


def recall(qrels, run, k) -> float:
    values = []
    for qid, rels in qrels.items():
        relevant = {d for d, r in rels.items() if r > 0}
        if qid in run and relevant:
            ranked = sorted(run[qid].items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:k]
            values.append(len(relevant & {d for d, _ in ranked}) / len(relevant))
    return sum(values) / len(values)


def assert_user_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def direct_scores(model_dir, ckpt, beir_dir) -> dict[str, dict[str, float]]:
    """Scores computed without mteb or eval.py: ColIntern embeddings of the raw pages and queries + maxsim."""
    from colintern import ColIntern
    from colintern.retriever.scoring import maxsim

    model = ColIntern.from_pretrained(model_dir, ckpt=ckpt)
    pages = [Image.open(beir_dir / "images" / f"{cid}.png").convert("RGB") for cid, _, _ in PAGE_SPECS]
    docs = model.encode_images(pages, batch_size=2)
    qs = model.encode_queries(list(QUERIES.values()))
    scores = maxsim(qs, docs, device="cpu").double()
    return {q: {cid: float(scores[i, j]) for j, (cid, _, _) in enumerate(PAGE_SPECS)} for i, q in enumerate(QUERIES)}


class Oracle:
    """Knows the qrels: a page is the one-hot of its index (found by its colour), a query is one token per relevant
    page, relevance x that page's one-hot; so MaxSim(query, page) = relevance, the ideal ranking."""

    class processor:  # noqa: N801
        @staticmethod
        def page_cost(image):
            return image.size[0] * image.size[1]

    def __init__(self):
        from colintern.retriever.config import ColInternConfig

        self.dim = len(PAGE_SPECS)
        self.config = ColInternConfig(dim=self.dim)
        self.image_calls = 0

    def encode_images(self, pages, batch_size=8, show_progress=None):
        self.image_calls += 1
        index = {color: j for j, (_, _, color) in enumerate(PAGE_SPECS)}
        return [torch.eye(self.dim)[index[page.getpixel((1, 0))]][None] for page in pages]

    def encode_queries(self, texts, batch_size=32, show_progress=None):
        qrels, index = local_qrels(), {cid: j for j, (cid, _, _) in enumerate(PAGE_SPECS)}
        out = []
        for text in texts:
            rels = qrels.get(next(q for q, t in QUERIES.items() if t == text), {"p0": 0})
            out.append(torch.stack([r * torch.eye(self.dim)[index[c]] for c, r in rels.items()]))
        return out


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory) -> Path:
    return make_beir(tmp_path_factory.mktemp("sets") / "tinyset")


@pytest.fixture(scope="module")
def lookalike_dir(tmp_path_factory) -> Path:
    return make_vidore_lookalike(tmp_path_factory.mktemp("hubcopy") / "docvqa_test_subsampled_beir")


@pytest.fixture(scope="module")
def base_run(tiny_model_dir, beir_dir, lookalike_dir, tmp_path_factory) -> Path:
    """One base-model evaluation: a real ViDoRe(v1) task class on its look-alike + the local set, with runs."""
    out = tmp_path_factory.mktemp("eval_out")
    rc = ev.main(["--model_id", tiny_model_dir, "--benchmark", "ViDoRe(v1)", "--tasks", "VidoreDocVQARetrieval",
                  "--task_data", f"VidoreDocVQARetrieval={lookalike_dir}", "--local_dataset", str(beir_dir),
                  "--out_dir", str(out), "--save_run", "--batch_size", "2", "--device", "cpu"])
    assert rc == 0
    return out / "base"


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    """A checkpoint with LoRA, a perturbed head and LoRA weights, and its own formatting (prefix, augmentation,
    max_tiles), so evaluating it differs from the base model in every part that the checkpoint carries."""
    from colintern import ColIntern
    from colintern.retriever.checkpoint import save_checkpoint

    model = ColIntern.from_pretrained(tiny_model_dir, query_prefix="Question: ", n_augmentation=3, max_tiles=2)
    model.add_lora(4, 8, 0.0)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in list(model.backbone.named_parameters()) + list(model.head.named_parameters()):
            if "lora_B" in name or name in ("weight", "bias"):
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    path = tmp_path_factory.mktemp("ckpt") / "colintern_heads_epoch1.pt"
    save_checkpoint(str(path), **model.checkpoint_parts(), training=None, metrics={})
    return path


# ------------------------------------------------------------------------------------------------ tests


def test_list_benchmarks_shows_vidore(capsys):
    assert ev.main(["--list_benchmarks"]) == 0
    names = capsys.readouterr().out.splitlines()
    for name in ("ViDoRe(v1)", "ViDoRe(v2)", "ViDoRe(v3)"):
        assert name in names


def test_vidore_task_class_runs_on_local_lookalike(base_run, lookalike_dir):
    """mteb's own VidoreDocVQARetrieval (its load_data, id mapping, retrieval evaluation) ran offline."""
    summary = json.loads((base_run / "summary.json").read_text())
    assert list(summary["tasks"]) == ["VidoreDocVQARetrieval", "tinyset"]
    assert summary["benchmark"] == "ViDoRe(v1), local"
    assert summary["main_metric"] == "ndcg_at_5" and summary["ckpt"] is None
    assert summary["dtype"] == "float32" and summary["batch_size"] == 2
    run = json.loads((base_run / "runs" / "VidoreDocVQARetrieval.json").read_text())
    qrels = lookalike_qrels()
    assert set(run) == set(qrels)  # the unjudged query is dropped, as mteb does
    assert all(len(docs) == len(PAGE_SPECS) for docs in run.values())
    scores = summary["tasks"]["VidoreDocVQARetrieval"]
    for k in (5, 10):
        assert scores[f"ndcg_at_{k}"] == pytest.approx(ndcg(qrels, run, k), abs=1e-6)
    assert scores["recall_at_5"] == pytest.approx(recall(qrels, run, 5), abs=1e-6)
    # mteb's own result file, beside summary.json, rounds to 5 decimals
    files = list((base_run / "results").glob("colintern__*/*/VidoreDocVQARetrieval.json"))
    assert len(files) == 1
    mteb_scores = json.loads(files[0].read_text())["scores"]["test"][0]
    assert mteb_scores["ndcg_at_5"] == pytest.approx(scores["ndcg_at_5"], abs=6e-6)
    assert json.loads(files[0].read_text())["dataset_revision"] == "e78cd130055fcb8d69bb0ff4115c4712a157f3d3"
    model_meta = json.loads((files[0].parent / "model_meta.json").read_text())
    assert model_meta["model_type"] == ["late-interaction"] and model_meta["similarity_fn_name"] == "MaxSim"
    assert sorted(model_meta["modalities"]) == ["image", "text"] and model_meta["embed_dim"] == 128


def test_base_model_ndcg_matches_independent_computation(base_run, beir_dir, tiny_model_dir):
    """summary nDCG@5/10 == a float64 recomputation from eval.py's own saved run (and pytrec_eval), to 1e-6;
    the run's scores == ColIntern embeddings + maxsim computed here without mteb."""
    import pytrec_eval

    summary = json.loads((base_run / "summary.json").read_text())
    run = json.loads((base_run / "runs" / "tinyset.json").read_text())
    qrels = local_qrels()
    scores = summary["tasks"]["tinyset"]
    trec = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.5,10"}).evaluate(run)
    for k in (5, 10):
        assert scores[f"ndcg_at_{k}"] == pytest.approx(ndcg(qrels, run, k), abs=1e-6)
        assert scores[f"ndcg_at_{k}"] == pytest.approx(
            sum(v[f"ndcg_cut_{k}"] for v in trec.values()) / len(trec), abs=1e-6)
    assert 0.0 < scores["ndcg_at_5"] < 1.0  # a random tiny model: not trivially perfect or zero
    assert summary["average"]["ndcg_at_5"] == pytest.approx(
        (scores["ndcg_at_5"] + summary["tasks"]["VidoreDocVQARetrieval"]["ndcg_at_5"]) / 2, abs=1e-12)
    # the run is ranked best first and its scores are the model's exact MaxSim scores
    direct = direct_scores(tiny_model_dir, None, beir_dir)
    for qid, docs in run.items():
        values = list(docs.values())
        assert values == sorted(values, reverse=True)
        for cid, score in docs.items():
            assert score == pytest.approx(direct[qid][cid], abs=2e-5)
    # the same pages and queries under the ViDoRe task's ids got the same scores
    vidore_run = json.loads((base_run / "runs" / "VidoreDocVQARetrieval.json").read_text())
    assert vidore_run["query-test-1"]["corpus-test-4"] == pytest.approx(run["q1"]["p4"], abs=2e-5)


def test_printed_table_and_existing_run(base_run, beir_dir, tiny_model_dir, capsys):
    summary = json.loads((base_run / "summary.json").read_text())
    table = eval_run.format_table(summary)
    lines = table.splitlines()
    assert lines[0].split() == ["task", "main", "metric", "nDCG@5", "nDCG@10", "recall@5"]
    assert lines[-1].split()[0] == "average"
    assert f"{summary['tasks']['tinyset']['ndcg_at_10']:.4f}" in table
    # a finished run is not overwritten by accident
    rc = ev.run_cli(ev.main, ["--model_id", tiny_model_dir, "--local_dataset", str(beir_dir),
                              "--out_dir", str(base_run.parent)])
    assert_user_error(rc, capsys.readouterr().err, "summary.json exists", "--overwrite")


def test_oracle_encoder_scores_perfect_ndcg(beir_dir, tmp_path, monkeypatch):
    """An encoder that knows the qrels (query tokens = relevance x one-hot of its relevant pages, page = its one-hot)
    gets nDCG@5 = nDCG@10 = recall@5 = 1 through mteb on the local set."""
    from mteb_model import ColInternMTEB

    monkeypatch.setattr(eval_run, "load_encoder", lambda args: ColInternMTEB("oracle/model", model=Oracle(), device="cpu"))
    assert ev.main(["--local_dataset", str(beir_dir), "--out_dir", str(tmp_path), "--run_name", "oracle"]) == 0
    summary = json.loads((tmp_path / "oracle" / "summary.json").read_text())
    assert summary["model"] == "oracle/model" and summary["benchmark"] == "local"
    scores = summary["tasks"]["tinyset"]
    assert scores["ndcg_at_5"] == 1.0 and scores["ndcg_at_10"] == 1.0 and scores["recall_at_5"] == 1.0
    assert summary["average"]["ndcg_at_5"] == 1.0
    assert not (tmp_path / "oracle" / "runs").exists()  # no --save_run


def test_checkpoint_evaluation(checkpoint, tiny_model_dir, beir_dir, base_run, tmp_path):
    """--ckpt alone: the base model comes from the checkpoint, and so do the head, LoRA and formatting."""
    rc = ev.main(["--ckpt", str(checkpoint), "--local_dataset", str(beir_dir), "--out_dir", str(tmp_path),
                  "--save_run", "--batch_size", "3", "--device", "cpu"])
    assert rc == 0
    run_dir = tmp_path / "colintern_heads_epoch1"  # default run name: the checkpoint's stem
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"] == tiny_model_dir and summary["ckpt"] == str(checkpoint)
    assert summary["config"]["query_prefix"] == "Question: " and summary["config"]["max_tiles"] == 2
    run = json.loads((run_dir / "runs" / "tinyset.json").read_text())
    direct = direct_scores(tiny_model_dir, str(checkpoint), beir_dir)
    for qid, docs in run.items():
        for cid, score in docs.items():
            assert score == pytest.approx(direct[qid][cid], abs=2e-5)
    qrels = local_qrels()
    for k in (5, 10):
        assert summary["tasks"]["tinyset"][f"ndcg_at_{k}"] == pytest.approx(ndcg(qrels, run, k), abs=1e-6)
        assert summary["tasks"]["tinyset"][f"ndcg_at_{k}"] == pytest.approx(ndcg(qrels, direct, k), abs=1e-6)
    base = json.loads((base_run / "runs" / "tinyset.json").read_text())
    assert abs(base["q0"]["p0"] - run["q0"]["p0"]) > 1e-3  # the checkpoint changed the scores
    base_meta = next((base_run / "results").glob("colintern__*/*/model_meta.json"))
    ckpt_meta = next((run_dir / "results").glob("colintern__*/*/model_meta.json"))
    assert base_meta.parent.name != ckpt_meta.parent.name  # different fingerprints, different mteb folders


def test_queries_formatted_once(tiny_model_dir):
    """encode() hands raw query text to the processor, which adds prefix and augmentation exactly once."""
    import mteb
    from mteb._create_dataloaders import create_dataloader
    from mteb.types import PromptType
    import datasets

    from mteb_model import ColInternMTEB

    encoder = ColInternMTEB(tiny_model_dir, device="cpu")
    seen = []
    format_query = encoder.model.processor.format_query
    encoder.model.processor.format_query = lambda text: seen.append(text) or format_query(text)
    task = mteb.get_task("VidoreDocVQARetrieval")
    texts = ["what is the total?", "Query: already prefixed?"]
    loader = create_dataloader(datasets.Dataset.from_dict({"id": ["a", "b"], "text": texts}),
                               task_metadata=task.metadata, prompt_type=PromptType.query, batch_size=1)
    embs = encoder.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default",
                          prompt_type=PromptType.query)
    assert sorted(seen) == sorted(texts)  # raw text, each once (encode_queries sorts by length)
    formatted = format_query(texts[0])
    assert formatted.count(encoder.config["query_prefix"]) == 1
    assert formatted.endswith(encoder.config["augmentation_token"] * encoder.config["n_augmentation"])
    ref = encoder.model.encode_queries(texts)
    for a, b in zip(embs, ref):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
    sim = encoder.similarity(embs, ref)
    assert sim.shape == (2, 2) and sim.dtype == torch.float32


@pytest.mark.parametrize("case", ["missing_qrels", "unknown_page", "unreadable_image", "missing_image"])
def test_malformed_local_dataset(case, tmp_path, capsys):
    root = make_beir(tmp_path / "bad")
    if case == "missing_qrels":
        (root / "qrels.jsonl").unlink()
        needles = ["qrels.jsonl or qrels.parquet"]
    elif case == "unknown_page":
        write_jsonl(root / "qrels.jsonl", [{"query-id": "q0", "corpus-id": "p0", "score": 1},
                                           {"query-id": "q1", "corpus-id": "p99", "score": 1}])
        needles = ["qrels.jsonl line 2", "unknown corpus-id 'p99'"]
    elif case == "unreadable_image":
        (root / "images" / "p3.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
        needles = ["corpus.jsonl line 4", "'p3'", "corrupt image"]
    else:
        (root / "images" / "p2.png").unlink()
        needles = ["corpus.jsonl line 3", "missing image"]
    rc = ev.run_cli(ev.main, ["--model_id", "never/loaded", "--local_dataset", str(root),
                              "--out_dir", str(tmp_path / "out")])
    assert_user_error(rc, capsys.readouterr().err, str(root), *needles)
    assert not (tmp_path / "out" / "base").exists()


def test_hub_benchmark_offline_fails_fast(tmp_path, capsys):
    start = time.perf_counter()
    rc = ev.run_cli(ev.main, ["--model_id", "never/loaded", "--tasks", "VidoreDocVQARetrieval",
                              "--out_dir", str(tmp_path)])
    assert_user_error(rc, capsys.readouterr().err, "VidoreDocVQARetrieval", "mteb/docvqa_test_subsampled_beir",
                             "HF_HUB_OFFLINE=1", "--task_data", "--local_dataset")
    assert time.perf_counter() - start < 20
    assert not (tmp_path / "base").exists()


def test_unreachable_hub_fails_fast_without_retries(monkeypatch):
    """Online mode but no network: one quick probe, one line (not 30 s of download retries)."""
    import mteb
    from huggingface_hub import constants

    from colintern.eval import evaluation
    from colintern.errors import UserError

    monkeypatch.setattr(evaluation, "hub_offline", lambda: False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    task = mteb.get_task("VidoreDocVQARetrieval")
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"cannot reach the Hugging Face Hub \(http://127.0.0.1:9") as err:
        evaluation.load_task_data(task)
    assert time.perf_counter() - start < 10
    assert "\n" not in str(err.value) and "--task_data VidoreDocVQARetrieval=DIR" in str(err.value)


def test_bad_benchmark_and_task_names(tmp_path, capsys):
    rc = ev.run_cli(ev.main, ["--model_id", "x/y", "--benchmark", "ViDoRe(v9)", "--out_dir", str(tmp_path)])
    assert_user_error(rc, capsys.readouterr().err, "ViDoRe(v9)", "ViDoRe(v1)", "--list_benchmarks")
    rc = ev.run_cli(ev.main, ["--model_id", "x/y", "--tasks", "VidoreDocVQARetrievl", "--out_dir", str(tmp_path)])
    assert_user_error(rc, capsys.readouterr().err, "VidoreDocVQARetrievl", "VidoreDocVQARetrieval")


def test_multilingual_vidore2_task_subsets(tmp_path, monkeypatch):
    """A ViDoRe(v2) task class (language subsets sharing one corpus): pages are encoded once for all subsets,
    the task score is the mean over subsets, and each subset gets its own run file."""
    from mteb_model import ColInternMTEB

    languages = {"q0": "english", "q1": "english", "q2": "french", "q3": "spanish", "q4": "german"}
    copy = make_vidore_lookalike(tmp_path / "esg_reports_v2", languages)
    oracle = Oracle()
    monkeypatch.setattr(eval_run, "load_encoder", lambda args: ColInternMTEB("oracle/model", model=oracle, device="cpu"))
    assert ev.main(["--benchmark", "ViDoRe(v2)", "--tasks", "Vidore2ESGReportsRetrieval", "--task_data",
                    f"Vidore2ESGReportsRetrieval={copy}", "--out_dir", str(tmp_path / "out"), "--save_run"]) == 0
    assert oracle.image_calls == 1
    run_dir = tmp_path / "out" / "base"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tasks"]["Vidore2ESGReportsRetrieval"]["ndcg_at_5"] == 1.0
    assert sorted(summary["subsets"]["Vidore2ESGReportsRetrieval"]) == ["english", "french", "german", "spanish"]
    qids = {q: f"query-test-{i}" for i, q in enumerate(QUERIES)}
    for language in ("english", "french", "german", "spanish"):
        run = json.loads((run_dir / "runs" / f"Vidore2ESGReportsRetrieval.{language}.json").read_text())
        assert set(run) == {qids[q] for q, lang in languages.items() if lang == language}


def test_bad_task_data(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = ev.run_cli(ev.main, ["--model_id", "x/y", "--tasks", "VidoreDocVQARetrieval", "--task_data",
                              f"VidoreDocVQARetrieval={tmp_path / 'empty'}", "--out_dir", str(tmp_path)])
    assert_user_error(rc, capsys.readouterr().err, "VidoreDocVQARetrieval", "cannot load the local copy",
                      str(tmp_path / "empty"))
    rc = ev.run_cli(ev.main, ["--model_id", "x/y", "--tasks", "VidoreDocVQARetrieval", "--task_data",
                              f"VidoreInfoVQARetrieval={tmp_path}", "--out_dir", str(tmp_path)])
    assert_user_error(rc, capsys.readouterr().err, "VidoreInfoVQARetrieval is not among the selected tasks")


def test_a_two_language_local_set_reports_each_language_and_the_english_average(tiny_model_dir, tmp_path, capsys):
    """ViDoRe V3 reporting offline: a local folder of per-language BEIR sets is one multilingual task; the summary
    gives each language, the English-only average and the all-language average (the official number)."""
    root = tmp_path / "two_languages"
    make_beir(root / "english")
    french = make_beir(root / "french")
    write_jsonl(french / "queries.jsonl", [{"query-id": q, "query": f"la page {t}"} for q, t in QUERIES.items()])
    assert ev.main(["--model_id", tiny_model_dir, "--local_dataset", str(root), "--out_dir", str(tmp_path / "out"),
                    "--device", "cpu", "--batch_size", "2"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "base" / "summary.json").read_text())
    subsets = summary["subsets"]["two_languages"]
    assert sorted(subsets) == ["english", "french"] and sorted(summary["languages"]) == ["eng-Latn", "fra-Latn"]
    for metric in ("ndcg_at_5", "recall_at_5"):
        assert summary["languages"]["eng-Latn"][metric] == subsets["english"][metric]
        assert summary["average_english"][metric] == subsets["english"][metric]
        assert summary["average"][metric] == pytest.approx((subsets["english"][metric] + subsets["french"][metric]) / 2)
    assert "language fra-Latn" in printed and "average, English only" in printed and "average (all languages)" in printed


def test_vidore_v3_benchmark_names_resolve():
    for name in ("ViDoRe(v3)", "ViDoRe(v3.1)"):
        tasks = [t.metadata.name for t in eval_run.get_benchmark(name).tasks]
        assert tasks and all(t.startswith("Vidore3") for t in tasks), (name, tasks)
        langs = eval_run.get_benchmark(name).tasks[0].metadata.eval_langs
        assert isinstance(langs, dict) and langs["english"] == ["eng-Latn"]  # per-language subsets
