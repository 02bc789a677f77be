"""Faults of the output location, in every job: a full disk (a real, tiny tmpfs), a file where a folder should be,
an earlier run in the way. Each is one `error:` line (no traceback), leaves no temp file, keeps the last good
state, and a rerun continues once the fault is gone."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from colintern.cli import output_error_message, run_cli
from helpers import load_script

train, mine, evaluate = load_script("train"), load_script("mine"), load_script("eval")

pytestmark = pytest.mark.usefixtures("one_thread")


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` at path (needs root, as on this project's machines); skips the test where mounting is not
    allowed. remount(size) grows it, as freeing space would."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")

    def remount(new_size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_size}", str(path)], check=True)

    try:
        yield remount
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def leftovers(folder: Path) -> list[str]:
    """Temp files and folders anywhere under folder (names with .tmp)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


def test_output_error_messages():
    full = OSError(errno.ENOSPC, "No space left on device")
    full.filename = "/data/run/metrics.jsonl"
    assert output_error_message(full, "--out_dir") == ("no space left on device while writing /data/run/metrics.jsonl;"
                                                       " free space or choose another --out_dir")
    denied = PermissionError(errno.EACCES, "Permission denied", "/root/x")
    assert output_error_message(denied, "--out_jsonl") == "cannot write /root/x: permission denied; choose another " \
                                                          "--out_jsonl"

    def fails(_argv):
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError):  # not the user's to fix: it keeps its traceback
        run_cli(fails, [])


def test_train_on_a_full_disk_stops_in_one_line_and_resumes(tiny_model_dir, synthetic_small_dir, tmp_path, capsys):
    out = tmp_path / "disk" / "run"
    argv = ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"), "--dim", "32",
            "--max_tiles", "2", "--batch_size", "4", "--max_steps", "8", "--save_every", "1", "--num_workers", "0",
            "--device", "cpu", "--out_dir", str(out)]
    with small_disk(tmp_path / "disk", "240k") as remount:
        assert run_cli(train.main, argv, out_flag=train.OUT_FLAG) == 2
        (line,) = error_lines(capsys)
        assert "no space left on device while writing " + str(out) in line and "choose another --out_dir" in line
        assert leftovers(out) == []
        saved = sorted(out.glob("colintern_heads_step*.pt"))
        assert saved, "some checkpoints fit before the disk filled"
        from colintern.retriever.checkpoint import load_checkpoint

        last = max(load_checkpoint(str(p))["training"]["step"] for p in saved)  # every one is whole
        remount("8m")  # space is freed
        assert run_cli(train.main, argv + ["--resume_ckpt", "latest"], out_flag=train.OUT_FLAG) == 0
        assert "global step 8" in capsys.readouterr().out
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 9)) and last < 8


def test_mine_on_a_full_disk_leaves_no_part_behind_and_resumes(tiny_model_dir, synthetic_small_dir, tmp_path,
                                                               capsys):
    out = tmp_path / "disk" / "mined.jsonl"
    argv = ["--model_id", tiny_model_dir, "--hub_name", os.path.join(synthetic_small_dir, "train"), "--out_jsonl",
            str(out), "--method", "exact", "--k", "3", "--pages_per_part", "8", "--quiet", "--device", "cpu"]
    with small_disk(tmp_path / "disk", "200k") as remount:
        assert run_cli(mine.main, argv, out_flag=mine.OUT_FLAG) == 2
        (line,) = error_lines(capsys)
        assert line.startswith(f"error: no space left on device while writing {tmp_path / 'disk'}")
        assert line.endswith("; free space or choose another --out_jsonl")
        assert leftovers(tmp_path / "disk") == []  # the half-written part is gone, so the disk is not left full
        remount("8m")
        assert run_cli(mine.main, argv + ["--resume"], out_flag=mine.OUT_FLAG) == 0
        lines = out.read_text().splitlines()
        assert len(lines) == 120 and all(len(json.loads(x)["negs"]) <= 3 for x in lines)
        assert leftovers(tmp_path / "disk") == []


def test_eval_on_a_full_disk_is_one_line(tiny_model_dir, synthetic_small_dir, tmp_path, capsys):
    out = tmp_path / "disk"
    argv = ["--model_id", tiny_model_dir, "--local_dataset", os.path.join(synthetic_small_dir, "eval"), "--out_dir",
            str(out), "--device", "cpu", "--max_tiles", "2", "--save_run"]
    with small_disk(out, "8k") as remount:
        assert run_cli(evaluate.main, argv, out_flag=evaluate.OUT_FLAG) == 2
        (line,) = error_lines(capsys)
        assert line.startswith(f"error: no space left on device while writing {out}")
        assert line.endswith("; free space or choose another --out_dir")
        assert leftovers(out) == []
        for path in out.rglob("*.json"):  # nothing torn is left for the rerun to trip over
            json.loads(path.read_text())
        remount("8m")
        assert run_cli(evaluate.main, argv, out_flag=evaluate.OUT_FLAG) == 0
        summary = json.loads((out / "base" / "summary.json").read_text())
        assert 0 <= summary["tasks"]["eval"]["ndcg_at_5"] <= 1


def test_an_output_path_that_is_a_file_is_one_line(tiny_model_dir, synthetic_small_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    data = os.path.join(synthetic_small_dir, "train")
    assert run_cli(train.main, ["--model_id", tiny_model_dir, "--train_hub", data, "--out_dir", str(afile)]) == 2
    assert error_lines(capsys) == [f"error: --out_dir {afile} is a file, not a folder; choose another --out_dir"]
    assert run_cli(train.main, ["--model_id", tiny_model_dir, "--train_hub", data, "--out_dir",
                                str(afile / "run")]) == 2
    assert error_lines(capsys) == [f"error: --out_dir {afile / 'run'}: part of the path is a file, not a folder; "
                                   "choose another --out_dir"]
    assert run_cli(mine.main, ["--model_id", tiny_model_dir, "--hub_name", data, "--out_jsonl",
                               str(afile / "mined.jsonl")]) == 2
    assert error_lines(capsys) == [f"error: --out_jsonl {afile} is a file, not a folder; choose another --out_jsonl"]
    assert run_cli(mine.main, ["--model_id", tiny_model_dir, "--hub_name", data, "--out_jsonl", str(tmp_path)]) == 2
    assert error_lines(capsys) == [f"error: --out_jsonl {tmp_path} is a folder; name a .jsonl file"]
    assert run_cli(evaluate.main, ["--model_id", tiny_model_dir, "--local_dataset",
                                   os.path.join(synthetic_small_dir, "eval"), "--out_dir", str(afile)]) == 2
    assert error_lines(capsys) == [f"error: --out_dir {afile} is a file, not a folder; choose another --out_dir"]
    assert afile.read_text() == "not a folder"


def test_a_second_training_run_never_overwrites_the_first(tiny_model_dir, synthetic_small_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"), "--dim", "32",
            "--max_tiles", "2", "--batch_size", "4", "--max_steps", "2", "--num_workers", "0", "--out_dir", str(out)]
    assert run_cli(train.main, argv) == 0
    first = (out / "colintern_heads_step2.pt").read_bytes()
    assert run_cli(train.main, argv + ["--seed", "5"]) == 2
    assert error_lines(capsys) == [
        f"error: --out_dir {out} already holds a training run (colintern_heads_step2.pt, training_loss.txt, "
        "metrics.jsonl); pass --resume_ckpt (a file, or latest) to continue it, --overwrite to replace it, or choose "
        "another --out_dir"]
    assert (out / "colintern_heads_step2.pt").read_bytes() == first
    assert run_cli(train.main, argv + ["--seed", "5", "--max_steps", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["colintern_heads_step1.pt", "metrics.jsonl",
                                                     "train_config.yaml",
                                                     "training_loss.txt"]
    capsys.readouterr()
    assert run_cli(train.main, argv + ["--resume_ckpt", "latest", "--seed", "5", "--max_steps", "1"]) == 0
    assert f"--resume_ckpt latest: {out / 'colintern_heads_step1.pt'}" in capsys.readouterr().err
