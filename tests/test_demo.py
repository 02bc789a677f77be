"""Tests for colintern/scripts/demo.py (`make demo`) on a reduced configuration: 24 train pages x 2 queries, 8 held-out pages.

One demo run (a subprocess, as `make demo` starts it) is shared by the module. It asserts what the demo writes and
prints, not that training learns (tests/test_train.py does; the full-size bar is measured and reported in README.md).
"""
from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from colintern.scripts import demo
from colintern.cli import run_cli
from colintern.errors import UserError
from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
REDUCED = ["--train_pages", "24", "--queries_per_page", "2", "--eval_pages", "8", "--batch_size", "8"]
STEPS_PER_EPOCH = 24 * 2 // 8  # both epochs: 48 rows (epoch 2: one mined line per row) / batch 8
RUNS = ("base", "epoch1", "epoch2")
METRICS = ("ndcg_at_5", "ndcg_at_10", "recall_at_5")



@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """(out dir, completed process) of one reduced demo run. --min_gain 2 can never be met (nDCG <= 1), so the run
    also exercises the final check: everything is written, then exit status 1 with one line on stderr."""
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run([sys.executable, "-m", "colintern.scripts.demo", "--out", str(out), *REDUCED, "--min_gain", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    return out, proc


def summaries(out: Path) -> dict[str, dict]:
    return {r: json.loads((out / "eval" / r / "summary.json").read_text()) for r in RUNS}


def printed_commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("$ ") and not line.startswith("$ export ")]


def assert_png(path: Path) -> np.ndarray:
    """A valid, non-empty PNG that is not one flat colour; returns its pixels."""
    assert path.is_file() and path.stat().st_size > 1000, path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 1.0, f"{path} is blank"
    return pixels


def test_demo_writes_every_output_and_stops_on_the_unmet_bar(demo_run):
    out, proc = demo_run
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training did not clear the bar: held-out nDCG@5 went from "), last
    assert "< +2.0" in last and "Traceback" not in proc.stderr
    expected = [
        ".colintern_demo", "demo_summary.json", "tiny/config.json", "tiny/model.safetensors",
        "synthetic/synthetic_manifest.json", "synthetic/train/dataset_info.json", "synthetic/eval/corpus.jsonl",
        "synthetic/eval/queries.jsonl", "synthetic/eval/qrels.jsonl",
        "train/colintern_heads_epoch1.pt", "train/colintern_heads_epoch2.pt", "train/training_loss.txt",
        "train/metrics.jsonl", "mine/mined_triples.jsonl", "mine/mined_triples.meta.json",
        *(f"eval/{r}/summary.json" for r in RUNS),
        *(f"plots/{name}" for name in demo.PLOT_FILES), "plots/metrics.md", "plots/metrics.csv",
    ]
    missing = [name for name in expected if not (out / name).is_file()]
    assert not missing, missing
    # The two training phases continue one step numbering: epoch 1 in-batch, then epoch 2 on the mined file.
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert [r["epoch"] for r in rows] == [1] * STEPS_PER_EPOCH + [2] * STEPS_PER_EPOCH
    mined = [json.loads(line) for line in (out / "mine" / "mined_triples.jsonl").read_text().splitlines()]
    assert len(mined) == 48 and all(m["pos"].startswith(f"{out}/synthetic/train/train/doc_") for m in mined)
    for r in RUNS:
        assert (out / "eval" / r / "summary.json").stat().st_size > 0
    assert "wrote" in proc.stdout and "done in" in proc.stdout


def test_printed_table_and_demo_summary_are_the_eval_summaries_numbers(demo_run):
    out, proc = demo_run
    sums = summaries(out)
    table = {}
    for label, run in (("base", "base"), ("epoch 1", "epoch1"), ("epoch 2", "epoch2")):
        lines = [line for line in proc.stdout.splitlines() if re.fullmatch(rf"{label}\s+[\d.]+\s+[\d.]+\s+[\d.]+", line)]
        assert len(lines) == 1, (label, proc.stdout[-2000:])
        table[run] = lines[0][len(label):].split()
    header = [line for line in proc.stdout.splitlines() if line.startswith("run ")]
    assert header and header[-1].split() == ["run", "nDCG@5", "nDCG@10", "recall@5"]
    for run in RUNS:
        task = sums[run]["tasks"]["eval"]
        assert table[run] == [f"{task[m]:.4f}" for m in METRICS], run
    summary = json.loads((out / "demo_summary.json").read_text())
    for run in RUNS:
        assert {m: summary["runs"][run][m] for m in METRICS} == {m: sums[run]["tasks"]["eval"][m] for m in METRICS}
        assert Path(summary["runs"][run]["summary"]) == out / "eval" / run / "summary.json"
    gain = sums["epoch2"]["tasks"]["eval"]["ndcg_at_5"] - sums["base"]["tasks"]["eval"]["ndcg_at_5"]
    assert summary["gain_ndcg_at_5"] == gain
    assert f"epoch 2 vs the untrained base: nDCG@5 {gain:+.4f}" in proc.stdout
    # Each run is the model it claims: base has no checkpoint, epochs 1 and 2 their own files, all on the same set.
    assert sums["base"]["ckpt"] is None
    assert Path(sums["epoch1"]["ckpt"]).name == "colintern_heads_epoch1.pt"
    assert Path(sums["epoch2"]["ckpt"]).name == "colintern_heads_epoch2.pt"
    assert [c["step"] for c in summary["commands"]] == [
        "build the tiny model", "write the synthetic corpus", "train epoch 1 (in-batch negatives)",
        "mine hard negatives with the epoch-1 checkpoint", "train epoch 2 on the mined triples (from the epoch-1 weights)",
        "evaluate the untrained base model (random head) on the held-out pages", "evaluate epoch 1 on the held-out pages",
        "evaluate epoch 2 on the held-out pages", "plot the training loss (both epochs, with the learning rate)",
        "plot the held-out metrics of the three runs"]
    assert [c["command"] for c in summary["commands"]] == printed_commands(proc.stdout)
    # each time is rounded to 0.01 s on its own, so the sum of the parts may exceed the total by n x 0.005 s
    parts = sum(c["seconds"] for c in summary["commands"])
    assert summary["seconds"]["total"] >= parts - 0.005 * len(summary["commands"])
    assert "total time: " in proc.stdout
    for path in summary["plots"]:
        assert f"  {path}" in proc.stdout and Path(path).is_file()


def test_metrics_csv_matches_the_summaries(demo_run):
    out, _ = demo_run
    sums = summaries(out)
    with (out / "plots" / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["run"], r["task"], r["metric"]): float(r["value"]) for r in rows}
    want = {}
    for run in RUNS:
        for m in METRICS:
            want[(run, "eval", m)] = sums[run]["tasks"]["eval"][m]
            want[(run, "average", m)] = sums[run]["average"][m]
    assert set(got) == set(want) and len(rows) == len(want)
    assert all(got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-15) for k in want)
    table = (out / "plots" / "metrics.md").read_text()
    for run in RUNS:
        assert f"{sums[run]['tasks']['eval']['ndcg_at_5']:.4f}" in table


def test_plots_are_valid_and_drawn_from_the_runs_own_files(demo_run, tmp_path):
    """Every PNG is a real, non-blank image; re-running the printed plot commands on the same logs and summaries
    (output redirected) redraws them pixel for pixel, so they show exactly those numbers."""
    out, proc = demo_run
    pixels = {name: assert_png(out / "plots" / name) for name in demo.PLOT_FILES}
    commands = {shlex.split(c)[1]: shlex.split(c) for c in printed_commands(proc.stdout)}
    loss_cmd = commands["plot_training_loss.py"]
    assert loss_cmd[loss_cmd.index("--input") + 1] == str(out / "train" / "metrics.jsonl")
    loss_cmd[loss_cmd.index("--output") + 1] = str(tmp_path / "again" / "training_loss.png")
    metrics_cmd = commands["plot_vidore_metrics.py"]
    assert metrics_cmd[metrics_cmd.index("--inputs") + 1:metrics_cmd.index("--outdir")] == [
        str(out / "eval" / r) for r in RUNS]
    metrics_cmd[metrics_cmd.index("--outdir") + 1] = str(tmp_path / "again")
    for cmd in (loss_cmd, metrics_cmd):
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    for name in demo.PLOT_FILES:
        assert np.array_equal(assert_png(tmp_path / "again" / name), pixels[name]), name
    assert (tmp_path / "again" / "metrics.csv").read_text() == (out / "plots" / "metrics.csv").read_text()
    # The loss log behind the curve: training_loss.txt has the same per-step losses as metrics.jsonl.
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    text = [line for line in (out / "train" / "training_loss.txt").read_text().splitlines()
            if line.startswith("step ")]
    assert [float(re.search(r"\| loss ([\d.]+)", line).group(1)) for line in text] == pytest.approx(
        [r["loss"] for r in rows], abs=1e-6)


def test_printed_commands_are_real_and_copyable(demo_run):
    """The export line + each printed command is what ran: the scripts' own argparse accepts it, and it names the
    demo's files."""
    out, proc = demo_run
    export = [line for line in proc.stdout.splitlines() if line.startswith("$ export ")]
    assert export == ["$ export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "
                      "TOKENIZERS_PARALLELISM=false"]  # run from the repository root: no PYTHONPATH needed
    commands = [shlex.split(c) for c in printed_commands(proc.stdout)]
    assert len(commands) == 10
    python = Path(commands[0][0])
    assert all(Path(c[0]) == python for c in commands)
    assert (REPO / python).resolve() == Path(sys.executable).resolve() or python.resolve() == Path(
        sys.executable).resolve()
    assert commands[0][1:3] == ["-m", "colintern.testing.tiny"] and commands[1][1:3] == ["-m", "colintern.testing.synthetic"]
    train, mine, evaluate = load_script("train"), load_script("mine"), load_script("eval")
    scripts = [c[1] for c in commands[2:]]
    assert scripts == ["train.py", "mine.py", "train.py", "eval.py", "eval.py", "eval.py", "plot_training_loss.py",
                       "plot_vidore_metrics.py"]
    e1 = train.parse_args(commands[2][2:])
    assert e1.train_hub == str(out / "synthetic" / "train") and e1.lora and e1.epochs == 1 and e1.max_tiles == 2
    assert e1.out_dir == str(out / "train") and e1.batch_size == 8 and e1.device == "cpu"
    m = mine.parse_args(commands[3][2:])
    assert m.ckpt == str(out / "train" / "colintern_heads_epoch1.pt") and m.method == "exact" and m.k == 20
    assert m.hub_name == e1.train_hub and m.out_jsonl == str(out / "mine" / "mined_triples.jsonl")
    e2 = train.parse_args(commands[4][2:])
    assert e2.train_jsonl == m.out_jsonl and e2.resume_ckpt == m.ckpt and e2.lora and e2.num_negs == 1
    assert (e2.lr, e2.tau, e2.lora_r, e2.lora_alpha) == (e1.lr, e1.tau, e1.lora_r, e1.lora_alpha)
    evals = [evaluate.parse_args(c[2:]) for c in commands[5:8]]
    assert [e.run_name for e in evals] == list(RUNS)
    assert [e.ckpt for e in evals] == [None, m.ckpt, str(out / "train" / "colintern_heads_epoch2.pt")]
    assert all(e.local_dataset == [str(out / "synthetic" / "eval")] for e in evals)
    assert evals[0].max_tiles == 2 and evals[1].max_tiles is None  # base: the trained runs' tiling
    load_script("plot_training_loss").build_parser().parse_args(commands[8][2:])
    load_script("plot_vidore_metrics").build_parser().parse_args(commands[9][2:])


# ------------------------------------------------------------------------------------------------ fast unit tests


def test_a_failing_step_stops_the_demo_with_one_line(capsys):
    runner = demo.Runner(3, {**__import__("os").environ})
    runner("first", [sys.executable, "-c", "pass"])
    with pytest.raises(UserError, match=r"^demo stopped at step 2/3 \(second\): the command above exited with "
                                        r"status 3 after \d+ s; its own message is just above$"):
        runner("second", [sys.executable, "-c", "import sys; sys.exit(3)"])
    printed = capsys.readouterr().out
    assert f"[2/3] second\n$ {shlex.join([demo.shown_path(sys.executable), '-c', 'import sys; sys.exit(3)'])}" \
        in printed
    assert [c["step"] for c in runner.commands] == ["first"]


def test_out_dir_rules_and_bad_flags(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert run_cli(demo.main, ["--out", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {foreign} is not empty and was not written by the demo; choose another directory"]
    assert (foreign / "keep.txt").read_text() == "mine"
    earlier = tmp_path / "earlier"
    demo.prepare_out(earlier)
    (earlier / "train").mkdir()
    (earlier / "train" / "stale.pt").write_text("x")
    demo.prepare_out(earlier)  # an earlier demo run is replaced
    assert sorted(p.name for p in earlier.iterdir()) == [demo.MARKER]
    assert run_cli(demo.main, ["--out", str(tmp_path / "x"), "--train_pages", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --train_pages must be at least 1, got 0"
    assert not (tmp_path / "x").exists()


def test_commands_find_the_package_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    env, fixed = demo.child_env(3)
    assert fixed == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false"} and env["OMP_NUM_THREADS"] == "3"
    assert demo.script("train.py") == "train.py"
    monkeypatch.chdir(tmp_path)  # elsewhere: PYTHONPATH gets the repository (once) and scripts are absolute
    monkeypatch.setenv("PYTHONPATH", "/opt/lib")
    assert demo.child_env(1)[1]["PYTHONPATH"] == f"{REPO}:/opt/lib"
    monkeypatch.setenv("PYTHONPATH", f"/opt/lib:{REPO}")
    assert demo.child_env(1)[1]["PYTHONPATH"] == f"/opt/lib:{REPO}"
    assert demo.script("train.py") == str(REPO / "train.py")
    done = subprocess.run([sys.executable, "-m", "colintern.testing.tiny", "--help"], env=demo.child_env(1)[0],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "tiny InternVL3.5" in done.stdout
