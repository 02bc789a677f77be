"""Tests for train.py (tiny model, synthetic corpus, CPU): learning, exact resume after SIGKILL, GradCache = one big
batch, 2 processes = 1 process, phases, hard negatives, bad rows, faults and every flag."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colintern.retriever.checkpoint import load_checkpoint
from colintern.testing.faults import injected
from colintern.cli import run_cli
from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
LINE_RE = re.compile(r"^step (\d+) \| epoch (\d+) \| loss (\d+\.\d{6}) \| lr (\d\.\d{3}e[+-]\d{2}) \| "
                     r"grad_norm (\d+\.\d{4}) \| pairs/s (\d+\.\d)$")



train = load_script("train")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


pytestmark = pytest.mark.usefixtures("one_thread")


def run(*argv) -> int:
    return train.main([str(a) for a in argv])


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(path) -> dict[str, torch.Tensor]:
    """Head and LoRA tensors of a checkpoint."""
    payload = load_checkpoint(str(path))
    out = {f"head.{k}": v for k, v in payload["head"].items()}
    if payload["lora"]:
        out.update({f"lora.{k}": v for k, v in payload["lora"]["state"].items()})
    return out


def first_moments(path) -> list[torch.Tensor]:
    """AdamW's exp_avg per parameter; after one step it is (1 - beta1) x the gradient."""
    state = load_checkpoint(str(path))["training"]["optimizer"]["state"]
    return [state[i]["exp_avg"] for i in sorted(state)]


def error_lines(capsys) -> list[str]:
    """The "error: ..." lines a run_cli call printed (progress bars share stderr); never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in re.split(r"[\r\n]", err) if line.startswith("error:")]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def evaluate(model_id: str, ckpt: str | None, eval_dir: str) -> tuple[float, float]:
    """(MRR, nDCG@10) of exact MaxSim ranking on a BEIR-layout evaluation set."""
    from colintern import ColIntern
    from colintern.data.images import decode_image
    from colintern.data.beir import load_beir_dir
    from colintern.retriever.scoring import maxsim

    model = ColIntern.from_pretrained(model_id, ckpt=ckpt)
    corpus, queries, qrels = load_beir_dir(eval_dir)
    cids = list(corpus)
    qids = [q for q in queries if q in qrels]
    docs = model.encode_images([decode_image(corpus[c], c) for c in cids], show_progress=False)
    qs = model.encode_queries([queries[q] for q in qids], show_progress=False)
    scores = maxsim(qs, docs)
    mrr = ndcg = 0.0
    for i, qid in enumerate(qids):
        order = scores[i].argsort(descending=True).tolist()
        ranks = [r for r, j in enumerate(order) if cids[j] in qrels[qid]]
        mrr += 1 / (ranks[0] + 1)
        ideal = sum(1 / math.log2(r + 2) for r in range(min(10, len(qrels[qid]))))
        ndcg += sum(1 / math.log2(r + 2) for r in ranks if r < 10) / ideal
    return mrr / len(qids), ndcg / len(qids)


# ----------------------------------------------------------------------------------------------------------
# Learning


@pytest.fixture(scope="module")
def untrained_eval(tiny_model_dir, synthetic_dir) -> tuple[float, float]:
    """(MRR, nDCG@10) of the untrained model (random head) on the held-out synthetic set."""
    return evaluate(tiny_model_dir, None, os.path.join(synthetic_dir, "eval"))


def test_heads_only_training_learns_and_the_cache_speeds_up_later_epochs(tiny_model_dir, synthetic_dir, tmp_path,
                                                                          untrained_eval):
    out = tmp_path / "run"
    mrr0, ndcg0 = untrained_eval
    assert run("--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_dir, "hub", "colintern-synthetic"),
               "--batch_size", 16, "--epochs", 4, "--lr", 2e-3, "--num_workers", 0, "--save_every", 0,
               "--log_every", 5, "--out_dir", out) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 181))  # 720 rows / 16 = 45 steps x 4 epochs
    assert set(rows[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "pairs_per_s", "seconds"}
    per_epoch = [sum(r["loss"] for r in rows if r["epoch"] == e) / 45 for e in (1, 2, 3, 4)]
    assert per_epoch[3] < per_epoch[0] - 0.4, per_epoch
    mrr1, ndcg1 = evaluate(tiny_model_dir, str(out / "colintern_heads_epoch4.pt"), os.path.join(synthetic_dir, "eval"))
    print(f"heads only: loss by epoch {per_epoch}; held-out MRR {mrr0:.3f} -> {mrr1:.3f}, "
          f"nDCG@10 {ndcg0:.3f} -> {ndcg1:.3f}")
    assert mrr1 > mrr0 + 0.05 and ndcg1 > ndcg0 + 0.05
    text = (out / "training_loss.txt").read_text().splitlines()
    steps = [LINE_RE.match(line) for line in text if not line.startswith("# ")]
    assert all(steps) and [int(m.group(1)) for m in steps] == list(range(5, 181, 5))  # --log_every 5
    mean_1_5 = sum(r["loss"] for r in rows[:5]) / 5  # a line's loss is the mean over its 5 steps
    assert float(steps[0].group(3)) == pytest.approx(mean_1_5, abs=1e-6)
    speed = [line for line in text if line.startswith("# epoch 2:")]
    assert speed and "faster with the hidden-state cache" in speed[0]
    epoch2, epoch1 = (float(x) for x in re.findall(r"([\d.]+) s", speed[0])[:2])
    assert epoch2 < epoch1 / 2, speed[0]  # epoch 2 runs only the head: at least twice as fast
    for name in ("colintern_heads_epoch1.pt", "colintern_heads_epoch2.pt", "colintern_heads_epoch3.pt"):
        assert (out / name).is_file()
    assert not list(out.glob(".hidden_cache*"))


def test_lora_training_learns_in_one_epoch(tiny_model_dir, synthetic_dir, tmp_path, untrained_eval):
    out = tmp_path / "run"
    mrr0, ndcg0 = untrained_eval
    assert run("--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_dir, "hub", "colintern-synthetic"),
               "--batch_size", 16, "--epochs", 1, "--lr", 5e-4, "--lora", "--num_workers", 0, "--out_dir", out) == 0
    losses = [r["loss"] for r in metrics(out)]
    first, last = sum(losses[:9]) / 9, sum(losses[-9:]) / 9
    mrr1, ndcg1 = evaluate(tiny_model_dir, str(out / "colintern_heads_epoch1.pt"), os.path.join(synthetic_dir, "eval"))
    print(f"LoRA: loss {first:.3f} (first 9 steps) -> {last:.3f} (last 9); held-out MRR {mrr0:.3f} -> {mrr1:.3f}, "
          f"nDCG@10 {ndcg0:.3f} -> {ndcg1:.3f}")
    assert last < first - 1.0
    assert mrr1 > mrr0 + 0.05 and ndcg1 > ndcg0 + 0.05


# ----------------------------------------------------------------------------------------------------------
# The seed README's workflow, steps 1 and 3 verbatim (model, data and device replaced)


def write_mined_triples(path: Path, dataset: str, n_negs: int = 3) -> int:
    """mine.py-style triples: pseudo-paths to the first row of each page, hardest negatives = other pages."""
    from colintern.data.datasets import load_page_dataset, page_keys, pseudo_path

    keys = page_keys(load_page_dataset(dataset))
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    pages = list(first.values())
    queries = load_page_dataset(dataset)["query"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, key in enumerate(keys):
            p = pages.index(first[key])
            negs = [pseudo_path(dataset, "train", pages[(p + k) % len(pages)]) for k in range(1, n_negs + 1)]
            f.write(json.dumps({"query": queries[i], "pos": pseudo_path(dataset, "train", first[key]), "negs": negs,
                                "scores": {"pos": 1.0, "negs": [0.5] * n_negs}}) + "\n")
    return len(keys)


def test_seed_readme_steps_1_and_3_run_verbatim(tiny_model_dir, synthetic_small_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLINTERN_COMPILE_BACKEND", "aot_eager")  # the CPU test has no time for inductor's C++
    hub = os.path.join(synthetic_small_dir, "hub", "colintern-synthetic")
    caplog.set_level(logging.INFO)
    step1 = f"""--model_id {tiny_model_dir} --train_hub {hub} --batch_size 4 --grad_accum 4 --epochs 1 --lr 5e-5
        --auto_batch --auto_target_frac 0.8 --auto_max_batch 32 --device_map cpu --lora --lora_r 32 --lora_alpha 32
        --lora_dropout 0.1 --optimizer paged_adamw_8bit --use_flash_attn --save_every 50"""
    assert train.main(step1.split()) == 0
    epoch1 = tmp_path / "outputs" / "train" / "colintern_heads_epoch1.pt"
    payload = load_checkpoint(str(epoch1))
    assert payload["training"]["step"] == 7 and payload["training"]["epoch"] == 1  # 120 rows / (4 x 4)
    assert payload["training"]["phase_done"] and payload["lora"]["config"]["r"] == 32
    assert all(k.startswith("language_model.") for k in payload["lora"]["state"])  # never the vision tower
    opt_state = payload["training"]["optimizer"]["state"]
    assert any("__bnb_optimizer_quant_state__" in s for s in opt_state.values())  # bitsandbytes 8-bit states
    assert "auto_batch probes GPU memory and needs CUDA; on cpu it keeps --batch_size 4" in caplog.text
    assert "flash-attention 2 was asked for" in caplog.text

    n = write_mined_triples(tmp_path / "outputs" / "mine" / "mined_triples.jsonl", hub)
    before = sha256(epoch1)
    step3 = f"""--model_id {tiny_model_dir} --train_jsonl outputs/mine/mined_triples.jsonl --out_dir outputs/train
        --resume_ckpt outputs/train/colintern_heads_epoch1.pt --batch_size 8 --grad_accum 4 --num_workers 8
        --prefetch_factor 6 --save_every 2500 --compile_heads --device_map cpu"""
    assert train.main(step3.split()) == 0
    assert sha256(epoch1) == before  # the checkpoint resumed from is never overwritten
    epoch2 = tmp_path / "outputs" / "train" / "colintern_heads_epoch2.pt"
    p2 = load_checkpoint(str(epoch2))
    steps2 = n // 32
    assert p2["training"]["phase"]["index"] == 2 and p2["training"]["phase"]["kind"] == "jsonl"
    assert p2["training"]["epoch"] == 2 and p2["training"]["step"] == 7 + steps2
    w1, w2 = weights(epoch1), weights(epoch2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1 if k.startswith("lora."))  # no --lora: LoRA stays frozen
    assert not torch.equal(w1["head.weight"], w2["head.weight"])
    assert "compiled the projection head (torch.compile backend aot_eager)" in caplog.text
    rows = metrics(tmp_path / "outputs" / "train")
    assert [r["step"] for r in rows] == list(range(1, 8 + steps2))
    assert [r["epoch"] for r in rows] == [1] * 7 + [2] * steps2
    assert any(line.startswith("# phase 2 from outputs/train/colintern_heads_epoch1.pt at step 7")
               for line in (tmp_path / "outputs" / "train" / "training_loss.txt").read_text().splitlines())


# ----------------------------------------------------------------------------------------------------------
# Exact resume


def test_sigkill_at_an_arbitrary_step_then_resume_is_bitwise_identical(tiny_model_dir, synthetic_small_dir, tmp_path):
    common = ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"),
              "--batch_size", 4, "--grad_accum", 2, "--max_steps", 7, "--save_every", 3, "--log_every", 2, "--lora",
              "--lora_r", 4, "--lora_dropout", 0.1, "--lr", 1e-3, "--seed", 3, "--num_workers", 2,
              "--prefetch_factor", 2]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert run(*common, "--out_dir", ref) == 0
    cmd = [sys.executable, str(REPO / "train.py")] + [str(a) for a in common] + ["--out_dir", str(killed)]
    log = tmp_path / "log.txt"
    with log.open("w") as f:  # a file, not a pipe: orphaned loader workers must not hold the test up
        faulty = [sys.executable, "-m", "colintern.testing.faults", "kill@5", "train", *cmd[2:]]  # SIGKILL: step 5
        rc = subprocess.run(faulty, env=ENV, stdout=f, stderr=f).returncode
    assert rc == -9, log.read_text()[-2000:]
    assert [r["step"] for r in metrics(killed)] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in killed.glob("*.pt")) == ["colintern_heads_step3.pt"]
    with log.open("w") as f:
        rc = subprocess.run(cmd + ["--resume_ckpt", str(killed / "colintern_heads_step3.pt")], env=ENV, stdout=f,
                            stderr=f).returncode
    assert rc == 0, log.read_text()[-2000:]
    a, b = weights(ref / "colintern_heads_step7.pt"), weights(killed / "colintern_heads_step7.pt")
    assert a.keys() == b.keys() and any(k.startswith("lora.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(killed)] == list(range(1, 8))  # steps 4, 5 logged once, not twice
    assert [r["loss"] for r in metrics(killed)] == [r["loss"] for r in metrics(ref)]

    def loss_lines(out):  # training_loss.txt without notes and timings; the step-4 line averages steps 3 and 4
        return [line.rsplit(" | pairs/s", 1)[0] for line in (out / "training_loss.txt").read_text().splitlines()
                if not line.startswith("# ")]
    assert loss_lines(killed) == loss_lines(ref) and len(loss_lines(ref)) == 3


def test_heads_only_resume_rebuilds_the_cache_and_is_exact(tiny_model_dir, synthetic_small_dir, tmp_path,
                                                            monkeypatch, caplog):
    common = ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"),
              "--batch_size", 8, "--epochs", 2, "--save_every", 5, "--lr", 1e-3, "--num_workers", 0]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run(*common, "--out_dir", ref) == 0  # 120 rows / 8 = 15 steps per epoch
    with injected("raise@22"), pytest.raises(RuntimeError, match="injected failure after step 22"):
        run(*common, "--out_dir", cut)
    caplog.set_level(logging.INFO)
    # resumed with the cache on disk instead of in memory: the cached values, hence the results, are the same
    assert run(*common, "--out_dir", cut, "--resume_ckpt", cut / "colintern_heads_step20.pt",
               "--cache_mem_gb", 0, "--cache_disk_gb", 1) == 0
    assert "rebuilding the hidden-state cache up to the resume point (1 epoch(s) + 5 steps" in caplog.text
    a, b = weights(ref / "colintern_heads_epoch2.pt"), weights(cut / "colintern_heads_epoch2.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(cut)] == list(range(1, 31))
    assert [r["loss"] for r in metrics(cut)] == [r["loss"] for r in metrics(ref)]
    assert not list(cut.glob(".hidden_cache*"))


def test_a_full_hidden_state_cache_recomputes_the_rest(tiny_model_dir, synthetic_small_dir, tmp_path, caplog):
    """Memory budget ~2 pages, disk ~3 more: everything else is recomputed, and training is the same."""
    common = ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"),
              "--batch_size", 8, "--epochs", 2, "--lr", 1e-3, "--num_workers", 0, "--save_every", 0]
    assert run(*common, "--out_dir", tmp_path / "all") == 0
    caplog.set_level(logging.INFO)
    assert run(*common, "--cache_mem_gb", 1e-4, "--cache_disk_gb", 2e-4, "--out_dir", tmp_path / "small") == 0
    assert "hidden-state cache full (0.00 GB memory, 0.00 GB disk)" in caplog.text
    note = [line for line in (tmp_path / "small" / "training_loss.txt").read_text().splitlines()
            if line.startswith("# epoch 2:")][0]
    assert int(re.search(r"; (\d+) items still went through the backbone", note).group(1)) > 100
    for a, b in zip(metrics(tmp_path / "all"), metrics(tmp_path / "small")):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def test_resume_with_other_arguments_fails_clearly_and_new_phase_continues_numbering(
        tiny_model_dir, synthetic_small_dir, tmp_path, monkeypatch, capsys):
    common = ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"),
              "--batch_size", 8, "--save_every", 5, "--num_workers", 0, "--out_dir", tmp_path]
    with injected("raise@7"), pytest.raises(RuntimeError):
        run(*common, "--lr", 1e-3)
    ckpt = tmp_path / "colintern_heads_step5.pt"
    assert run_cli(train.main, [str(a) for a in common + ["--lr", 2e-3, "--resume_ckpt", ckpt]]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "--lr 0.001 -> 0.002" in err[0] and "--new_phase" in err[0]
    assert run(*common, "--lr", 2e-3, "--resume_ckpt", ckpt, "--new_phase", "--max_steps", 3) == 0
    p = load_checkpoint(str(tmp_path / "colintern_heads_step8.pt"))["training"]
    assert p["phase"]["index"] == 2 and p["epoch"] == 2 and p["step"] == 8 and p["phase_done"]
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 9))  # steps 6, 7 of the failed run dropped


# ----------------------------------------------------------------------------------------------------------
# GradCache and data parallelism


def test_grad_cache_gives_the_gradients_of_one_big_batch(tiny_model_dir, synthetic_small_dir, tmp_path):
    common = ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"), "--lora",
              "--lora_r", 4, "--lora_dropout", 0, "--max_steps", 1, "--save_every", 1, "--max_grad_norm", 0,
              "--warmup_ratio", 0, "--num_workers", 0]
    assert run(*common, "--batch_size", 8, "--out_dir", tmp_path / "big") == 0
    assert run(*common, "--batch_size", 2, "--grad_accum", 4, "--grad_cache", "--out_dir", tmp_path / "gc") == 0
    assert run(*common, "--batch_size", 2, "--grad_accum", 4, "--out_dir", tmp_path / "acc") == 0
    big, gc, acc = (metrics(tmp_path / n)[0]["loss"] for n in ("big", "gc", "acc"))
    assert gc == pytest.approx(big, abs=1e-5)
    assert abs(acc - big) > 1e-2  # plain accumulation is 4 small softmaxes: a different loss
    g_big = first_moments(tmp_path / "big" / "colintern_heads_step1.pt")
    g_gc = first_moments(tmp_path / "gc" / "colintern_heads_step1.pt")
    assert len(g_big) == len(g_gc) > 2
    for x, y in zip(g_big, g_gc):  # exp_avg = 0.1 x gradient after one step
        assert torch.allclose(x / 0.1, y / 0.1, rtol=0, atol=1e-5 * max(1.0, float((x / 0.1).abs().max())))


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate launch + grad_cache"])
def test_two_processes_match_one_process_on_the_combined_batch(tiny_model_dir, synthetic_small_dir, tmp_path,
                                                                launcher):
    common = ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"), "--lora",
              "--lora_r", 4, "--lora_dropout", 0, "--max_steps", 2, "--save_every", 1, "--max_grad_norm", 0,
              "--warmup_ratio", 0, "--lr", 1e-3, "--num_workers", 0]
    assert run(*common, "--batch_size", 8, "--out_dir", tmp_path / "one") == 0
    if launcher == "torchrun":  # 2 x 4 pairs, one softmax over the 8 gathered pages per query
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        extra = ["--batch_size", "4"]
    else:  # 2 processes x 2 micro-batches x 2 pairs, GradCache: the same 8-pair softmax
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port())]
        extra = ["--batch_size", "2", "--grad_accum", "2", "--grad_cache"]
    cmd += [str(REPO / "train.py")] + [str(a) for a in common] + extra + ["--out_dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2]
    two_ckpt = load_checkpoint(str(tmp_path / "two" / "colintern_heads_step1.pt"))
    assert two_ckpt["training"]["phase"]["world_size"] == 2
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    for step in (1, 2):  # exp_avg: 0.1 x gradient of step 1, then 0.09 g1 + 0.1 g2
        for x, y in zip(first_moments(tmp_path / "one" / f"colintern_heads_step{step}.pt"),
                        first_moments(tmp_path / "two" / f"colintern_heads_step{step}.pt")):
            assert torch.allclose(x / 0.1, y / 0.1, rtol=0, atol=1e-5 * max(1.0, float((x / 0.1).abs().max())))
    # (after step 2 Adam's first update of lora_A, lr x g / |g| with g ~ 0, magnifies rounding: compare step 1)
    a = weights(tmp_path / "one" / "colintern_heads_step1.pt")
    b = weights(tmp_path / "two" / "colintern_heads_step1.pt")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a)


# ----------------------------------------------------------------------------------------------------------
# Hard negatives, duplicates, bad rows


def test_step_loss_excludes_duplicate_pages_and_drops_queries_without_a_page():
    """step_loss against a float64 reference of docs/CONTRACT.md §5 written out by hand."""
    from colintern.train.losses import late_interaction_loss
    from colintern.train.step import step_loss

    g = torch.Generator().manual_seed(0)

    def unit(*shape):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        return x / x.norm(dim=-1, keepdim=True)

    q, q_mask = unit(4, 3, 8), torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    table = unit(5, 4, 8)  # 4 distinct pages + the empty row
    table[4] = 0
    t_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    batch = {"pos_row": torch.tensor([0, 1, 0, 2]), "neg_row": torch.tensor([[3], [4], [1], [3]]), "bad": {}}
    keys = ["a", "b", "a", "c"]  # queries 0 and 2 share page "a"
    tau = 0.05

    def s(qi, page):  # mean over real query tokens of the max over real page tokens
        sim = q[qi][q_mask[qi]] @ table[page][t_mask[page]].T
        return sim.max(dim=1).values.mean()

    def reference(queries, cols):
        total = 0.0
        for b in queries:
            pos = s(b, batch["pos_row"][b])
            pages = [int(batch["pos_row"][c]) for c in cols if keys[c] != keys[b]] + batch["neg_row"][b].tolist()
            cands = [s(b, p) for p in pages if t_mask[p].any()]  # an empty page is never a candidate
            total += torch.logsumexp(torch.stack([pos] + cands) / tau, 0) - pos / tau
        return total / len(queries)

    got = step_loss([(q, q_mask), (table, t_mask)], [batch], num_negs=1, rank=0, all_keys=keys,
                    gather=lambda d, m: (d, m), loss_fn=late_interaction_loss, loss_kwargs={"temperature": tau})
    assert float(got) == pytest.approx(float(reference([0, 1, 2, 3], [0, 1, 2, 3])), abs=1e-9)
    batch["bad"] = {1: ("x row 1", "corrupt image: test")}  # page "b" could not be decoded: query 1 has no positive
    table[1], t_mask[1] = 0, False
    got = step_loss([(q, q_mask), (table, t_mask)], [batch], num_negs=1, rank=0, all_keys=keys,
                    gather=lambda d, m: (d, m), loss_fn=late_interaction_loss, loss_kwargs={"temperature": tau})
    assert float(got) == pytest.approx(float(reference([0, 2, 3], [0, 2, 3])), abs=1e-9)


def test_micro_batches_load_each_shared_page_once(tiny_model_dir, synthetic_small_dir):
    from colintern import ColIntern
    from colintern.data.report import SkipReport
    from colintern.train.batches import MicroBatches
    from colintern.train.examples import epoch_order, load_hub_examples, make_plan

    data = load_hub_examples(os.path.join(synthetic_small_dir, "train"), "train", SkipReport())
    model = ColIntern.from_pretrained(tiny_model_dir)
    batch = MicroBatches(data.examples, [[0, 1, 2, 3]], model.processor, 0, data.datasets)[0]
    assert batch["keys"] == [data.examples[0].pos.key, data.examples[3].pos.key]  # rows 0-2 share a page
    assert batch["pos_row"].tolist() == [0, 0, 0, 1] and batch["loaded"] == [0, 1]
    assert batch["pages"]["input_ids"].shape[0] == 2
    assert epoch_order(10, 7, 1) == epoch_order(10, 7, 1) != epoch_order(10, 7, 2)
    plan = make_plan(120, 7, 1, batch_size=4, world_size=2, grad_accum=3)
    assert plan.steps == 5 and plan.rank_rows(0, 1) == epoch_order(120, 7, 1)[4:8]


def test_train_jsonl_with_local_images_hard_negatives_and_bad_lines(tiny_model_dir, synthetic_small_dir, tmp_path,
                                                                      capsys):
    from colintern.data.images import decode_image
    from colintern.data.datasets import load_page_dataset, pseudo_path

    dataset = os.path.join(synthetic_small_dir, "train")
    rows = load_page_dataset(dataset)
    root = tmp_path / "root"
    (root / "pages").mkdir(parents=True)
    for i in range(0, 30, 3):  # ten pages as local PNG files
        decode_image(rows[i]["image"], "x").save(root / "pages" / f"p{i // 3}.png")
    (root / "pages" / "corrupt.png").write_bytes(b"this is not a png")
    lines = []
    for k in range(10):
        negs = [f"pages/p{(k + 1) % 10}.png", pseudo_path(dataset, "train", 3 * ((k + 5) % 10) + 30)]
        lines.append(json.dumps({"query": rows[3 * k]["query"], "pos": f"pages/p{k}.png", "negs": negs}))
    for k in range(10, 16):  # pseudo-paths into the dataset, one negative that does not exist
        lines.append(json.dumps({"query": rows[3 * k]["query"], "pos": pseudo_path(dataset, "train", 3 * k),
                                 "negs": [pseudo_path(dataset, "train", 3 * k + 3), "pages/missing.png"]}))
    lines[2] = '{"query": "broken json", "pos": '
    lines[4] = json.dumps({"query": "  ", "pos": "pages/p4.png"})
    lines[6] = json.dumps({"query": "a page that is not there", "pos": "pages/nope.png"})
    lines[8] = json.dumps({"query": "a corrupt page", "pos": "pages/corrupt.png"})
    (tmp_path / "triples.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["--model_id", tiny_model_dir, "--train_jsonl", tmp_path / "triples.jsonl", "--root", root,
            "--batch_size", 4, "--epochs", 2, "--num_negs", 2, "--fn_filter", 0.95, "--loss", "pairwise", "--tau",
            0.05, "--num_workers", 0, "--out_dir", tmp_path / "out", "--seed", 1]
    assert run(*argv) == 0
    summary = capsys.readouterr().out
    # 3 lines skipped when read (JSON, empty query, missing pos), 6 missing negatives, the corrupt pos at batch time
    assert "skipped 10 items: missing image x7, malformed JSON x1, empty query x1, corrupt image x1" in summary \
        or "skipped 9 items: missing image x7, malformed JSON x1, empty query x1" in summary, summary
    rows_m = metrics(tmp_path / "out")
    assert len(rows_m) == 6 and all(math.isfinite(r["loss"]) for r in rows_m)  # 13 usable lines / 4 = 3 x 2 epochs
    assert run_cli(train.main, [str(a) for a in argv + ["--strict", "--overwrite"]]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"{tmp_path / 'triples.jsonl'} line 3: malformed JSON" in err[0]


def test_corrupt_dataset_images_are_reported_and_skipped_or_fatal_with_strict(tiny_model_dir, synthetic_small_dir,
                                                                              tmp_path, capsys):
    import datasets

    from colintern.data.datasets import load_page_dataset

    src = load_page_dataset(os.path.join(synthetic_small_dir, "train")).select(range(15))
    rows = {name: list(src[name]) for name in ("query", "image_filename", "image")}
    rows["image"][4] = {"bytes": b"\x00garbage" * 20, "path": None}
    rows["image_filename"][4] = "synthetic/corrupt.png"
    features = datasets.Features({"query": datasets.Value("string"), "image_filename": datasets.Value("string"),
                                  "image": datasets.Image()})
    path = tmp_path / "bad"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    argv = ["--model_id", tiny_model_dir, "--train_hub", path, "--batch_size", 5, "--num_workers", 0, "--out_dir",
            tmp_path / "out", "--seed", 2]
    assert run(*argv) == 0
    summary = capsys.readouterr().out
    assert "skipped 1 item: corrupt image x1" in summary
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "out")) and len(metrics(tmp_path / "out")) == 3
    assert run_cli(train.main, [str(a) for a in argv + ["--strict", "--overwrite"]]) == 2
    assert error_lines(capsys) == [f"error: {path} row 4: corrupt image: not a recognised image format (160 bytes)"]


def test_dataset_formats_give_the_same_training(tiny_model_dir, synthetic_small_dir, tmp_path):
    losses = []
    for name, path in (("save_to_disk", "train"), ("hub folder", "hub/colintern-synthetic"),
                       ("parquet", "train_parquet/train-00000-of-00001.parquet")):
        out = tmp_path / name.replace(" ", "_")
        assert run("--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, path),
                   "--split", "train", "--batch_size", 8, "--max_steps", 2, "--warmup_ratio", 0, "--lr", 1e-3,
                   "--num_workers", 0, "--out_dir", out) == 0
        losses.append([r["loss"] for r in metrics(out)])
    assert losses[0] == losses[1] == losses[2]


# ----------------------------------------------------------------------------------------------------------
# Faults


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(tiny_model_dir, synthetic_small_dir, tmp_path,
                                                             monkeypatch, capsys):
    argv = ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"),
            "--batch_size", 8, "--save_every", 2, "--num_workers", 0, "--out_dir", tmp_path]
    with injected("nan@5"):
        assert run_cli(train.main, [str(a) for a in argv]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "training diverged: loss nan" in err[0] and "at step 5" in err[0]
    assert str(tmp_path / "colintern_heads_step4.pt") in err[0]
    assert load_checkpoint(str(tmp_path / "colintern_heads_step4.pt"))["training"]["step"] == 4
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["colintern_heads_step2.pt", "colintern_heads_step4.pt"]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]

    out = tmp_path / "save"
    with injected("save_error@4"):
        assert run_cli(train.main, [str(a) for a in argv[:-1] + [out]]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"could not write checkpoint {out / 'colintern_heads_step4.pt'}" in err[0]
    assert f"the previous checkpoint {out / 'colintern_heads_step2.pt'} is intact" in err[0]
    assert load_checkpoint(str(out / "colintern_heads_step2.pt"))["training"]["step"] == 2
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pt") == ["colintern_heads_step2.pt"]


# ----------------------------------------------------------------------------------------------------------
# Flags


def test_device_optimizer_fallback_max_tiles_and_dim(tiny_model_dir, synthetic_small_dir, tmp_path, monkeypatch,
                                                     capsys, caplog):
    base = ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train")]
    if not torch.cuda.is_available():
        assert run_cli(train.main, base + ["--device_map", "cuda:0"]) == 2
        assert error_lines(capsys) == ["error: --device_map cuda:0: CUDA is not available on this machine; "
                                       "use --device_map cpu (or auto)"]
    assert run_cli(train.main, base + ["--threads", "0"]) == 2
    assert error_lines(capsys) == ["error: --threads must be at least 1, got 0"]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine where bitsandbytes cannot load
    caplog.set_level(logging.INFO)
    threads_before = torch.get_num_threads()
    assert run(*base, "--optimizer", "adamw_8bit", "--max_tiles", 2, "--max_visual_tokens", 256, "--dim", 64,
               "--batch_size", 8, "--max_steps", 1, "--num_workers", 0, "--threads", 3, "--out_dir", tmp_path) == 0
    assert "device cpu, backbone float32, 3 torch thread(s)" in caplog.text
    assert torch.get_num_threads() == threads_before  # restored for the in-process caller
    assert "--optimizer adamw_8bit needs a working bitsandbytes" in caplog.text
    assert "falling back to torch AdamW" in caplog.text
    payload = load_checkpoint(str(tmp_path / "colintern_heads_step1.pt"))
    assert payload["config"]["max_tiles"] == 2 and payload["config"]["dim"] == 64
    assert payload["config"]["max_visual_tokens"] == 256
    assert tuple(payload["head"]["weight"].shape) == (64, 128)


def test_gradient_checkpointing_and_compiled_head_change_nothing(tiny_model_dir, synthetic_small_dir, tmp_path):
    common = ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"), "--lora",
              "--lora_r", 4, "--lora_alpha", 8, "--lora_dropout", 0, "--batch_size", 4, "--max_steps", 2,
              "--warmup_ratio", 0, "--lr", 1e-3, "--num_workers", 0]
    assert run(*common, "--out_dir", tmp_path / "plain") == 0
    assert run(*common, "--gradient_checkpointing", "--compile_heads", "--compile_backend", "aot_eager",
               "--dtype", "fp32", "--out_dir", tmp_path / "ckpt") == 0
    for a, b in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "ckpt")):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert run(*common, "--lora_vision", "--max_steps", 1, "--out_dir", tmp_path / "vision") == 0
    lora = load_checkpoint(str(tmp_path / "vision" / "colintern_heads_step1.pt"))["lora"]
    assert lora["config"]["include_vision"] and any(k.startswith("vision_tower.") for k in lora["state"])


def test_schedule_clipping_weight_decay_and_log_every(tiny_model_dir, synthetic_small_dir, tmp_path):
    from colintern import ColIntern

    common = ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"),
              "--batch_size", 8, "--num_workers", 0, "--lr", 1e-2]
    # warm-up ceil(0.3 x 4) = 2 steps, then linear decay to 0 at step 4; gradients clipped to norm 0.01
    assert run(*common, "--max_steps", 4, "--warmup_ratio", 0.3, "--max_grad_norm", 0.01, "--log_every", 2,
               "--save_every", 1, "--out_dir", tmp_path / "sched") == 0
    rows = metrics(tmp_path / "sched")
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 5e-3, 1e-2, 5e-3])
    m1 = first_moments(tmp_path / "sched" / "colintern_heads_step1.pt")
    clipped = math.sqrt(sum(float((m / 0.1).pow(2).sum()) for m in m1))
    assert rows[0]["grad_norm"] > 0.01 and clipped == pytest.approx(0.01, rel=1e-4)
    lines = (tmp_path / "sched" / "training_loss.txt").read_text().splitlines()
    logged = [LINE_RE.match(line) for line in lines if not line.startswith("# ")]
    assert [int(m.group(1)) for m in logged] == [2, 4]
    assert float(logged[1].group(3)) == pytest.approx((rows[2]["loss"] + rows[3]["loss"]) / 2, abs=1e-6)
    # decoupled weight decay: w1 = w0 (1 - lr wd) - lr adam(g), so runs with wd 0.5 and 0 differ by lr x wd x w0
    for wd in (0, 0.5):
        assert run(*common, "--max_steps", 1, "--warmup_ratio", 0, "--weight_decay", wd, "--save_every", 1,
                   "--out_dir", tmp_path / f"wd{wd}") == 0
    w0 = ColIntern.from_pretrained(tiny_model_dir).head.weight.detach()
    with_wd = weights(tmp_path / "wd0.5" / "colintern_heads_step1.pt")["head.weight"]
    without = weights(tmp_path / "wd0" / "colintern_heads_step1.pt")["head.weight"]
    assert torch.allclose(with_wd - without, -1e-2 * 0.5 * w0, atol=1e-7)


def test_auto_batch_search_picks_the_largest_fitting_batch_and_survives_oom(monkeypatch):
    """probe_batch_size against a simulated GPU (16 GiB; 1 GiB of weights + 1 GiB per pair; OOM from 12 pairs)."""
    from types import SimpleNamespace

    from colintern.train.step import probe_batch_size

    gib = 2 ** 30
    peak, calls = {"bytes": 0}, []

    def step(b: int) -> None:
        calls.append(b)
        if b >= 12:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        peak["bytes"] = (1 + b) * gib

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=16 * gib))
    for name in ("empty_cache", "reset_peak_memory_stats", "synchronize", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak["bytes"])
    device = torch.device("cuda", 0)
    # budget 0.8 x 16 = 12.8 GiB: 11 pairs (12 GiB) fit, 12 run out of memory
    assert probe_batch_size(step, [], max_batch=32, target_frac=0.8, device=device)[0] == 11
    assert calls == [1, 2, 4, 8, 16, 12, 10, 11]
    calls.clear()  # capped by max_batch
    assert probe_batch_size(step, [], max_batch=6, target_frac=0.8, device=device)[0] == 6 and calls == [1, 2, 4, 6]
    calls.clear()  # 3 GiB of optimizer state still to come: 8 pairs (9 + 3 GiB) fit, 9 do not
    b, notes = probe_batch_size(step, [], max_batch=32, target_frac=0.8, device=device, extra_bytes=3 * gib)
    assert b == 8 and "batch 16: out of memory" in notes


def test_train_says_how_many_examples_lack_hard_negatives(tiny_model_dir, synthetic_small_dir, tmp_path, caplog):
    """mine.py's false-negative filter can leave lines with fewer negatives than --num_negs: train.py says how many
    (and how many have none) instead of a silent 'N per query'."""
    from colintern.data.datasets import pseudo_path

    dataset = os.path.join(synthetic_small_dir, "train")
    lines = [json.dumps({"query": f"page {k}", "pos": pseudo_path(dataset, "train", 3 * k),
                         "negs": [pseudo_path(dataset, "train", 3 * ((k + j) % 12)) for j in range(1, 1 + k % 3)]})
             for k in range(12)]  # 0, 1, 2, 0, 1, 2, ... negatives
    (tmp_path / "triples.jsonl").write_text("\n".join(lines) + "\n")
    caplog.set_level(logging.INFO)
    assert run("--model_id", tiny_model_dir, "--train_jsonl", tmp_path / "triples.jsonl", "--num_negs", 2,
               "--batch_size", 4, "--max_steps", 1, "--num_workers", 0, "--out_dir", tmp_path / "out") == 0
    assert "8 of 12 examples have fewer than --num_negs 2 hard negatives (4 have none)" in caplog.text


def test_bad_pages_are_found_before_training_even_outside_every_step(tiny_model_dir, synthetic_small_dir, tmp_path,
                                                                     capsys):
    """Every page is decoded before the first step: a corrupt page no batch of the run reaches (one step of 2 out
    of 15 examples) is still reported, and --strict stops before step 1 (no log, no checkpoint written)."""
    import datasets

    from colintern.data.datasets import load_page_dataset

    src = load_page_dataset(os.path.join(synthetic_small_dir, "train")).select(range(15))
    rows = {name: list(src[name]) for name in ("query", "image_filename", "image")}
    for bad in (6, 13):
        rows["image"][bad] = {"bytes": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "path": None}
        rows["image_filename"][bad] = f"synthetic/corrupt{bad}.png"
    features = datasets.Features({"query": datasets.Value("string"), "image_filename": datasets.Value("string"),
                                  "image": datasets.Image()})
    path = tmp_path / "bad"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    argv = ["--model_id", tiny_model_dir, "--train_hub", path, "--batch_size", 2, "--max_steps", 1,
            "--num_workers", 0, "--out_dir", tmp_path / "out"]
    assert run(*argv) == 0
    assert "skipped 2 items: corrupt image x2" in capsys.readouterr().out
    assert run_cli(train.main, [str(a) for a in argv + ["--strict", "--out_dir", tmp_path / "strict"]]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: {path} row 6: corrupt image")
    assert list((tmp_path / "strict").iterdir()) == []


def test_save_total_limit_keeps_the_newest_step_checkpoints_and_every_epoch(tiny_model_dir, synthetic_small_dir,
                                                                             tmp_path):
    out = tmp_path / "out"
    assert run("--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"),
               "--batch_size", 40, "--epochs", 2, "--save_every", 1, "--save_total_limit", 2, "--num_workers", 0,
               "--dim", 32, "--max_tiles", 2, "--out_dir", out) == 0  # 120 examples / 40 = 3 steps per epoch
    assert sorted(p.name for p in out.glob("*.pt")) == ["colintern_heads_epoch1.pt", "colintern_heads_epoch2.pt",
                                                        "colintern_heads_step5.pt", "colintern_heads_step6.pt"]


def test_eval_during_training_writes_the_checkpoints_own_scores(tiny_model_dir, synthetic_small_dir, tmp_path):
    """--eval_local DIR --eval_every N: eval_* fields in that step's metrics.jsonl row (and at the phase end),
    equal to what the saved checkpoint scores on the same set; plot_training_loss.py draws them."""
    from colintern import ColIntern
    from colintern.eval.evaluation import LocalEvaluator

    out = tmp_path / "out"
    eval_dir = os.path.join(synthetic_small_dir, "eval")
    assert run("--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"),
               "--batch_size", 20, "--max_steps", 5, "--save_every", 2, "--eval_local", eval_dir, "--eval_every", 2,
               "--num_workers", 0, "--dim", 32, "--max_tiles", 2, "--out_dir", out) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows if "eval_ndcg_at_5" in r] == [2, 4, 5]
    evaluator = LocalEvaluator(eval_dir)
    for step in (4, 5):
        model = ColIntern.from_pretrained(tiny_model_dir, ckpt=str(out / f"colintern_heads_step{step}.pt"))
        want = evaluator(model)
        row = next(r for r in rows if r["step"] == step)
        assert all(abs(row[f"eval_{k}"] - v) < 1e-6 for k, v in want.items()), (row, want)
    plot = load_script("plot_training_loss")
    assert plot.main(["--input", str(out / "metrics.jsonl"), "--output", str(tmp_path / "loss.png")]) == 0
    assert (tmp_path / "loss.png").stat().st_size > 10_000


def test_report_to_tensorboard_and_offline_wandb_carry_the_logged_numbers(tiny_model_dir, synthetic_small_dir,
                                                                           tmp_path, monkeypatch, capsys):
    """--report_to: TensorBoard scalars equal metrics.jsonl; W&B runs offline into --out_dir/wandb; a missing
    package is one line."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    argv = ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"), "--batch_size",
            20, "--max_steps", 3, "--num_workers", 0, "--dim", 32, "--max_tiles", 2, "--out_dir", out,
            "--report_to", "tensorboard", "wandb"]
    assert run(*argv) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in metrics(out)]
    assert "train/lr" in events.Tags()["scalars"]
    (offline_run,) = (out / "wandb").glob("offline-run-*")
    (history,) = offline_run.glob("*.wandb")
    assert b"train/loss" in history.read_bytes()
    monkeypatch.setitem(sys.modules, "wandb", None)  # as on a machine without wandb
    assert run_cli(train.main, [str(a) for a in argv + ["--overwrite"]]) == 2
    assert error_lines(capsys) == ["error: --report_to wandb needs the wandb package: pip install wandb "
                                   "(WANDB_MODE=offline works without network)"]


def test_gather_local_contrasts_each_process_with_its_own_pages(tiny_model_dir, synthetic_small_dir, tmp_path):
    """--gather local on 2 processes x 4 pairs = one process with 2 accumulated micro-batches of 4 (each its own
    softmax): the same losses and weights; the default (global) is the one softmax over 8 pages tested above."""
    common = ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"), "--lora",
              "--lora_r", 4, "--lora_dropout", 0, "--max_steps", 2, "--save_every", 1, "--max_grad_norm", 0,
              "--warmup_ratio", 0, "--lr", 1e-3, "--num_workers", 0, "--batch_size", 4]
    assert run(*common, "--grad_accum", 2, "--out_dir", tmp_path / "one") == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py")] + [str(a) for a in common] + ["--gather", "local", "--out_dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    a = weights(tmp_path / "one" / "colintern_heads_step1.pt")
    b = weights(tmp_path / "two" / "colintern_heads_step1.pt")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a)
    two_ckpt = load_checkpoint(str(tmp_path / "two" / "colintern_heads_step1.pt"))
    assert two_ckpt["training"]["phase"]["args"]["gather"] == "local"
