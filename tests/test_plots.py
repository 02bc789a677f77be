"""Tests for plot_training_loss.py and plot_vidore_metrics.py (fast, CPU only, no model)."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from helpers import load_script

REPO = Path(__file__).resolve().parents[1]



ptl = load_script("plot_training_loss")
pvm = load_script("plot_vidore_metrics")


def assert_png(path):
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] > 0 and im.size[1] > 0
        im.verify()


def assert_user_error(rc, stderr, *needles):
    """Exit status 2, exactly one line on stderr, no traceback, and the line names what it should."""
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def run_script(name, *args):
    return subprocess.run([sys.executable, str(REPO / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------------------------------ training loss

TEXT_LINE = "step {s} | epoch {e} | loss {loss:.6f} | lr {lr:.3e} | grad_norm 1.2345 | pairs/s 12.3"


def write_text_log(path, steps, epoch=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# ColIntern training log", ""]
    lines += [TEXT_LINE.format(s=s, e=epoch, loss=1.0 / s, lr=5e-5) for s in steps]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl_log(path, steps, epoch=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"step": s, "epoch": epoch, "loss": 0.5 / s, "lr": 3e-5, "grad_norm": 1.0, "pairs_per_s": 10.0,
             "seconds": 0.1 * s} for s in steps]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_moving_average_matches_hand_computed_values():
    # Trailing window of 3: [1, (1+2)/2, (1+2+3)/3, (2+3+4)/3, (3+4+5)/3, (4+5+6)/3]
    got = ptl.moving_average([1, 2, 3, 4, 5, 6], 3)
    assert got.tolist() == pytest.approx([1.0, 1.5, 2.0, 3.0, 4.0, 5.0])
    # Window 2 over [2, 10, 4]: [2, 6, 7]
    assert ptl.moving_average([2.0, 10.0, 4.0], 2).tolist() == pytest.approx([2.0, 6.0, 7.0])
    # NaN is skipped inside a window; a window with no finite value stays NaN.
    got = ptl.moving_average([1.0, math.nan, 3.0, math.nan, math.nan], 2)
    assert got[:3].tolist() == pytest.approx([1.0, 1.0, 3.0])
    assert got[3] == pytest.approx(3.0) and math.isnan(got[4])
    # n = 1 is the identity; n larger than the series is the running mean.
    assert ptl.moving_average([3.0, 1.0], 1).tolist() == [3.0, 1.0]
    assert ptl.moving_average([3.0, 1.0, 2.0], 10).tolist() == pytest.approx([3.0, 2.0, 2.0])


def test_text_line_format():
    line = "step 12 | epoch 1 | loss 0.123456 | lr 5.000e-05 | grad_norm 1.2345 | pairs/s 12.3"
    rec = ptl.parse_text_line(line, "f:1")
    assert rec == {"step": 12, "epoch": 1.0, "loss": 0.123456, "lr": 5e-05, "grad_norm": 1.2345,
                   "pairs_per_s": 12.3}
    # Extra "| key value" fields are tolerated and ignored.
    rec = ptl.parse_text_line(line + " | mem_gb 3.2 | note warmup done", "f:1")
    assert rec["step"] == 12 and rec["loss"] == 0.123456 and "mem_gb" not in rec


def test_loss_plot_text_and_jsonl_runs(tmp_path, capsys):
    e1 = write_text_log(tmp_path / "e1" / "training_loss.txt", range(1, 41))
    e2 = write_jsonl_log(tmp_path / "e2" / "metrics.jsonl", range(41, 81))
    out = tmp_path / "plots" / "deep" / "loss.png"
    rc = ptl.main(["--input", str(e1), str(e2), "--output", str(out), "--smooth", "5", "--lr", "--logy"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err == ""
    assert captured.out.strip() == str(out)
    assert_png(out)
    # Both formats read back the numbers that were written.
    run1, run2 = ptl.read_log(e1), ptl.read_log(e2)
    assert run1["step"].tolist() == list(range(1, 41)) and run1["loss"][3] == pytest.approx(0.25)
    assert run2["step"].tolist() == list(range(41, 81)) and run2["lr"][0] == 3e-5


def test_loss_plot_default_labels_and_clamped_smoothing(tmp_path, capsys):
    log = write_text_log(tmp_path / "phase1" / "training_loss.txt", range(1, 6))
    out = tmp_path / "loss.png"
    assert ptl.default_labels([log]) == ["phase1"]
    rc = ptl.main(["--input", str(tmp_path / "phase1"), "--output", str(out), "--smooth", "1000"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "larger than its 5 points" in err
    assert_png(out)


def test_loss_repeated_steps_keep_last_value(tmp_path, capsys):
    log = tmp_path / "r" / "training_loss.txt"
    log.parent.mkdir()
    log.write_text("step 1 | loss 1.0\nstep 2 | loss 0.9\nstep 2 | loss 0.5\nstep 3 | loss 0.4\n")
    ptl.main(["-v", "--input", str(log), "--output", str(tmp_path / "x.png")])
    run = ptl.read_log(log)
    assert run["step"].tolist() == [1, 2, 3] and run["loss"].tolist() == [1.0, 0.5, 0.4]
    assert "repeated step" in capsys.readouterr().err


def test_loss_malformed_line_subprocess(tmp_path):
    log = tmp_path / "training_loss.txt"
    log.write_text("step 1 | epoch 1 | loss 0.5\n\nstep 2 | epoch 1 | loss oops\n")
    proc = run_script("plot_training_loss", "--input", log, "--output", tmp_path / "x.png")
    assert_user_error(proc.returncode, proc.stderr, f"{log}:3:", "loss")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name, content, needle", [
    ("training_loss.txt", "# header\nstep 1 | loss 0.5\nhello world\n", ":3:"),        # no step/loss fields
    ("training_loss.txt", "step 1.5 | loss 0.5\n", ":1:"),                            # non-integer step
    ("training_loss.txt", "step 1 | loss\n", ":1:"),                                  # field without value
    ("metrics.jsonl", '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4\n', ":2:"),  # invalid JSON
    ("metrics.jsonl", '{"step": 1, "loss": 0.5}\n{"step": 2}\n', ":2:"),               # missing loss
    ("metrics.jsonl", '{"step": 1, "loss": "x"}\n', ":1:"),                           # non-numeric loss
    ("training_loss.txt", "\n# only comments\n\n", "empty log"),                       # empty log
])
def test_loss_bad_inputs(tmp_path, capsys, name, content, needle):
    log = tmp_path / name
    log.write_text(content)
    rc = ptl.main(["--input", str(log), "--output", str(tmp_path / "x.png")])
    assert_user_error(rc, capsys.readouterr().err, str(log), needle)


def test_loss_missing_file_and_label_count(tmp_path, capsys):
    missing = tmp_path / "nope" / "training_loss.txt"
    assert_user_error(ptl.main(["--input", str(missing)]), capsys.readouterr().err, str(missing), "no such file")
    log = write_text_log(tmp_path / "a" / "training_loss.txt", [1, 2])
    rc = ptl.main(["--input", str(log), "--labels", "x", "y", "--output", str(tmp_path / "x.png")])
    assert_user_error(rc, capsys.readouterr().err, "--labels")


# ------------------------------------------------------------------------------------------------ ViDoRe metrics

TASKS = ["VidoreDocVQARetrieval", "VidoreArxivQARetrieval", "VidoreTabfquadRetrieval"]


def make_summary(seed, average="dict"):
    tasks = {}
    for i, task in enumerate(TASKS):
        base = 0.1 * seed + 0.01 * i
        tasks[task] = {"ndcg_at_5": round(base + 0.123456789, 9), "ndcg_at_10": base + 0.2 + 1e-12,
                       "recall_at_5": base + 0.3, "map_at_5": base}
    summary = {"model": "tiny-internvl", "ckpt": None if seed == 0 else f"colintern_heads_epoch{seed}.pt",
               "benchmark": "ViDoRe(v1)", "main_metric": "ndcg_at_5", "tasks": tasks,
               "mteb_version": "2.26.24", "dtype": "float32", "batch_size": 8}
    if average == "dict":  # deliberately not the exact mean, to check the file's own value is used
        summary["average"] = {"ndcg_at_5": 0.1 * seed + 0.1336, "ndcg_at_10": 0.1 * seed + 0.2101}
    elif average == "number":
        summary["average"] = 0.1 * seed + 0.13346
    return summary


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path


def test_vidore_outputs_match_summaries(tmp_path, capsys):
    s0, s1, s2 = make_summary(0, "number"), make_summary(1, "dict"), make_summary(2, None)
    write_json(tmp_path / "eval" / "base" / "summary.json", s0)
    write_json(tmp_path / "eval" / "epoch1" / "summary.json", s1)
    other = write_json(tmp_path / "eval_v2.json", s2)  # seed-style file name: label is its stem
    outdir = tmp_path / "plots"
    rc = pvm.main(["--inputs", str(tmp_path / "eval" / "base"), str(tmp_path / "eval" / "epoch1" / "summary.json"),
                   str(other), "--outdir", str(outdir)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    metrics = ["ndcg_at_5", "ndcg_at_10", "recall_at_5"]
    expected_files = [outdir / f"metrics_{m}.png" for m in metrics] + [
        outdir / "main_metric_across_runs.png", outdir / "metrics.md", outdir / "metrics.csv"]
    assert captured.out.split() == [str(p) for p in expected_files]
    for png in expected_files[:4]:
        assert_png(png)

    runs = {"base": s0, "epoch1": s1, "eval_v2": s2}
    expected = {}
    for label, s in runs.items():
        for task in TASKS:
            for m in metrics:
                expected[(label, task, m)] = s["tasks"][task][m]
        for m in metrics:
            mean = math.fsum(s["tasks"][t][m] for t in TASKS) / len(TASKS)
            avg = s.get("average")
            if isinstance(avg, dict) and m in avg:
                expected[(label, "average", m)] = avg[m]          # the file's own average, as is
            elif isinstance(avg, float) and m == "ndcg_at_5":
                expected[(label, "average", m)] = avg             # plain number = main metric's average
            else:
                expected[(label, "average", m)] = mean            # computed over the run's tasks

    with open(outdir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == ["run", "task", "metric", "value"]
    got = {(r["run"], r["task"], r["metric"]): float(r["value"]) for r in rows}
    assert len(rows) == len(got) == len(runs) * (len(TASKS) + 1) * len(metrics)
    assert got == expected  # exact equality: no rounding on the way

    md = (outdir / "metrics.md").read_text()
    for (label, task, m), value in expected.items():
        assert f"{value:.4f}" in md
    for label in runs:
        assert f"| {label} |" in md
    assert "| **average** |" in md and "## Main metric: nDCG@5 (`ndcg_at_5`, average over tasks)" in md
    assert md.startswith("# ViDoRe(v1) metrics\n") and "## Recall@5 (`recall_at_5`)" in md


def test_vidore_directory_of_runs_and_labels(tmp_path, capsys):
    write_json(tmp_path / "eval" / "b_epoch1" / "summary.json", make_summary(1))
    write_json(tmp_path / "eval" / "a_base" / "summary.json", make_summary(0))
    outdir = tmp_path / "out"
    rc = pvm.main(["--inputs", str(tmp_path / "eval"), "--labels", "Base", "E1 (in-batch)",
                   "--metrics", "map_at_5", "--outdir", str(outdir)])
    assert rc == 0, capsys.readouterr().err
    with open(outdir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["run"] for r in rows} == {"Base", "E1 (in-batch)"}
    # Sub-directories are taken in name order: a_base (seed 0) is "Base".
    base = {r["task"]: float(r["value"]) for r in rows if r["run"] == "Base"}
    assert base[TASKS[1]] == make_summary(0)["tasks"][TASKS[1]]["map_at_5"]
    assert_png(outdir / "metrics_map_at_5.png")


def test_vidore_missing_metric_is_a_warning_naming_task_metric_and_line(tmp_path, capsys):
    s = make_summary(1)
    del s["tasks"]["VidoreArxivQARetrieval"]["recall_at_5"]
    path = write_json(tmp_path / "run" / "summary.json", s)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if '"VidoreArxivQARetrieval"' in text)
    rc = pvm.main(["--inputs", str(path), "--outdir", str(tmp_path / "o")])
    err = capsys.readouterr().err  # a task without a metric is drawn without that bar, and said so with its line
    assert rc == 0 and f'{path}:{line}: task "VidoreArxivQARetrieval" has no metric "recall_at_5"' in err


def test_vidore_invalid_json_subprocess(tmp_path):
    path = tmp_path / "run" / "summary.json"
    path.parent.mkdir()
    path.write_text('{\n  "tasks": {\n    "a": {"ndcg_at_5": 0.5,}\n  }\n}\n')
    proc = run_script("plot_vidore_metrics", "--inputs", path, "--outdir", tmp_path / "o")
    assert_user_error(proc.returncode, proc.stderr, f"{path}:3:", "invalid JSON")


@pytest.mark.parametrize("content, needles", [
    ({"model": "x"}, ['missing "tasks"']),
    ({"tasks": {}}, ['"tasks" must be a non-empty object']),
    ({"tasks": {"a": {"ndcg_at_5": "high", "ndcg_at_10": 1, "recall_at_5": 1}}}, ['"ndcg_at_5"', "number"]),
    ({"tasks": {"a": {"ndcg_at_5": 1, "ndcg_at_10": 1, "recall_at_5": 1}}, "average": "n/a"}, ['"average"']),
])
def test_vidore_bad_summaries(tmp_path, capsys, content, needles):
    path = write_json(tmp_path / "r" / "summary.json", content)
    rc = pvm.main(["--inputs", str(path), "--outdir", str(tmp_path / "o")])
    assert_user_error(rc, capsys.readouterr().err, str(path), *needles)


def test_vidore_missing_input_and_label_mismatch(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert_user_error(pvm.main(["--inputs", str(missing)]), capsys.readouterr().err, str(missing), "no such file")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert_user_error(pvm.main(["--inputs", str(empty)]), capsys.readouterr().err, str(empty), "summary.json")
    path = write_json(tmp_path / "r" / "summary.json", make_summary(0))
    rc = pvm.main(["--inputs", str(path), "--labels", "a", "b", "--outdir", str(tmp_path / "o")])
    assert_user_error(rc, capsys.readouterr().err, "--labels")


@pytest.mark.parametrize("module", [ptl, pvm])
def test_help_documents_every_flag(module, capsys):
    assert module.main(["--help"]) == 0
    text = capsys.readouterr().out
    flags = [a.option_strings[-1] for a in module.build_parser()._actions if a.option_strings]
    for flag in flags:
        assert flag in text
    assert "default" in text


def test_loss_plot_skips_a_torn_last_line_with_a_warning(tmp_path, capsys):
    """A run still writing metrics.jsonl: its unfinished last line (no newline yet) is left out with a warning;
    the same broken line anywhere else is still an error."""
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert ptl.main(["--input", str(log), "--output", str(tmp_path / "a.png")]) == 0
    err = capsys.readouterr().err
    assert f"{log}:3: incomplete last line (is the run still writing?); left out" in err
    assert (tmp_path / "a.png").stat().st_size > 0
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 3, "lo\n{"step": 2, "loss": 0.4}\n')
    assert ptl.main(["--input", str(log), "--output", str(tmp_path / "b.png")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {log}:2: invalid JSON") and not (tmp_path / "b.png").exists()


def test_phase_boundaries_restart_the_moving_average():
    phase = np.array([1, 1, 1, 2, 2, 2])
    assert ptl.phase_starts(phase) == [3]
    loss = np.array([4.0, 2.0, 0.0, 10.0, 6.0, 2.0])
    np.testing.assert_allclose(ptl.smooth_by_phase(loss, phase, 2), [4.0, 3.0, 1.0, 10.0, 8.0, 4.0])
    np.testing.assert_allclose(ptl.moving_average(loss, 2)[3], 5.0)  # without the restart: 0 and 10 mixed


def test_phase_notes_mark_phases_in_both_logs(tmp_path):
    """train.py's "# phase N from ... at step S" note in training_loss.txt marks where phase N starts, for the text
    log itself and for the metrics.jsonl beside it."""
    log = tmp_path / "training_loss.txt"
    log.write_text("step 1 | loss 3.0\nstep 2 | loss 2.0\n# phase 2 from out/colintern_heads_epoch1.pt at step 2, "
                   "epoch 2: mined.jsonl\nstep 3 | loss 5.0\n")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    for name in ("training_loss.txt", "metrics.jsonl"):
        run = ptl.read_log(tmp_path / name)
        assert np.isnan(run["phase"][:2]).all() and run["phase"][2] == 2.0 and ptl.phase_starts(run["phase"]) == [2]



def test_one_task_has_no_average_group_and_long_labels_wrap(tmp_path, capsys):
    summary = {"benchmark": None, "main_metric": "ndcg_at_5",
               "tasks": {"synthetic_eval": {"ndcg_at_5": 0.5, "ndcg_at_10": 0.6, "recall_at_5": 0.7}}}
    write_json(tmp_path / "a" / "summary.json", summary)
    write_json(tmp_path / "b" / "summary.json", summary)
    label = "epoch 2 on mined hard negatives, LoRA r16"
    assert pvm.main(["--inputs", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "base", label,
                     "--outdir", str(tmp_path / "plots")]) == 0
    md = (tmp_path / "plots" / "metrics.md").read_text()
    assert md.startswith("# synthetic_eval metrics\n") and "**average**" not in md
    assert pvm.readable("ndcg_at_10") == "nDCG@10" and pvm.readable("hit_rate_at_1") == "Hit rate@1"
    assert pvm.readable("main_score") == "main_score"
    assert pvm.wrapped(label) == "epoch 2 on mined\nhard negatives,\nLoRA r16"


def test_tasks_with_different_metrics_plot_each_where_it_exists(tmp_path, capsys):
    """Seed-004 summaries mix retrieval tasks (recall) and a grounding task (rel_acc): each metric is drawn for the
    tasks that have it; a metric no task has is one clear error."""
    summary = {"main_metric": "recall_at_1", "benchmark": "itr:eval",
               "tasks": {"eval_t2i": {"recall_at_1": 0.25, "twin_acc": 0.5}, "eval_i2t": {"recall_at_1": 0.75},
                         "eval_grounding": {"rel_acc": 0.5}},
               "average": {"recall_at_1": 0.5, "twin_acc": 0.5, "rel_acc": 0.5}}
    (tmp_path / "s.json").write_text(json.dumps(summary))
    from colintern.cli import run_cli

    code = run_cli(pvm.main, ["--inputs", str(tmp_path / "s.json"), "--outdir", str(tmp_path / "out"), "--metrics",
                              "recall_at_1", "rel_acc"])
    assert code == 0
    table = (tmp_path / "out" / "metrics.md").read_text()
    assert "| eval_t2i | 0.2500 |" in table and "| eval_grounding | 0.5000 |" in table
    code = run_cli(pvm.main, ["--inputs", str(tmp_path / "s.json"), "--outdir", str(tmp_path / "out2"), "--metrics",
                              "ndcg_at_5"])
    assert code == 2 and 'no task has the metric "ndcg_at_5"' in capsys.readouterr().err
