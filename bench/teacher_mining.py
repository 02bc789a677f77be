"""Does a teacher's mining help a student of another family? Seed 002's "better negatives from another, stronger
model" (NV-Retriever's positive-aware mining), measured on the tiny models and the synthetic pages.

    make demo                                         # the teacher: the demo's epoch-2 InternVL checkpoint
    PYTHONPATH=. .venv/bin/python bench/teacher_mining.py --teacher outputs/demo/train/colintern_heads_epoch2.pt \\
        --data outputs/demo/synthetic --student qwen2_5_vl --seeds 0 1 2 --out outputs/bench/teacher_mining

1. mine.py --teacher TEACHER: hard negatives for every training query, with the positive-aware filter
   (--fn_filter 0.95: a candidate scoring above 95 % of the positive is taken for an unlabelled positive and skipped).
2. For each seed, two students of another family (a fresh tiny model) train for one epoch on the same queries, the
   same steps, batch and learning rate: in-batch negatives only (train.py --train_hub), or in-batch plus one of the
   teacher's negatives per query (train.py --train_jsonl mined --num_negs 1).
3. eval.py scores both on the held-out set. The difference of the means is compared with the seed spread.
Writes OUT/teacher_mining.json and prints the table (every command is run as a user would run it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from benchlib import env, print_table, write_json  # noqa: E402

from colintern.cli import run_cli, setup_logging  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(*command: str) -> None:
    """Run one script as a user would (one torch thread each, offline, as make demo does)."""
    from colintern.scripts.demo import child_env

    print("$", " ".join(command), flush=True)
    done = subprocess.run([sys.executable, *command], cwd=REPO, env=child_env(1)[0])
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}")


def ndcg_at_5(summary: Path) -> float:
    return float(json.loads(summary.read_text())["average"]["ndcg_at_5"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="any model ColIntern loads (mine.py --teacher)")
    parser.add_argument("--data", default="outputs/demo/synthetic", help="a synthetic corpus: DATA/train, DATA/eval")
    parser.add_argument("--student", default="qwen2_5_vl", help="the student's family (a fresh tiny model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--out", default="outputs/bench/teacher_mining", help="output folder")
    parser.add_argument("--batch_size", type=int, default=16, help="pairs per step (default: 16)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    options = parser.parse_args(argv)
    setup_logging()
    out, data = Path(options.out), options.data
    student = out / "student"
    run("-m", "colintern.testing.tiny", str(student), "--backbone", options.student)
    mined = out / "mine" / "mined.jsonl"
    run("mine.py", "--teacher", options.teacher, "--hub_name", f"{data}/train", "--k", "4", "--fn_filter", "0.95",
        "--method", "exact", "--out_jsonl", str(mined), "--device", "cpu", "--quiet")
    common = ["--model_id", str(student), "--batch_size", str(options.batch_size), "--lr", str(options.lr), "--lora",
              "--lora_r", "16", "--epochs", "1", "--device", "cpu", "--save_every", "0", "--num_workers", "1"]
    scores: dict[str, list[float]] = {"in-batch": [], "teacher": []}
    for seed in options.seeds:
        for arm, data_flags in (("in-batch", ["--train_hub", f"{data}/train"]),
                                ("teacher", ["--train_jsonl", str(mined), "--num_negs", "1"])):
            train_dir = out / arm / f"seed{seed}"
            run("train.py", *common, *data_flags, "--seed", str(seed), "--out_dir", str(train_dir))
            run("eval.py", "--ckpt", str(train_dir / "colintern_heads_epoch1.pt"), "--local_dataset", f"{data}/eval",
                "--out_dir", str(out / "eval"), "--run_name", f"{arm}_seed{seed}", "--device", "cpu", "--overwrite")
            scores[arm].append(ndcg_at_5(out / "eval" / f"{arm}_seed{seed}" / "summary.json"))
    meta = json.loads(mined.with_suffix(".meta.json").read_text())
    rows = [{"arm": arm, "mean": statistics.mean(v), "spread": (max(v) - min(v)) / 2,
             "seeds": " ".join(f"{x:.4f}" for x in v)} for arm, v in scores.items()]
    print_table(rows, [("arm", "student negatives", "s"), ("mean", "nDCG@5 mean", ".4f"),
                       ("spread", "± half range", ".4f"), ("seeds", "per seed", "s")])
    gain = rows[1]["mean"] - rows[0]["mean"]
    noise = max(rows[0]["spread"], rows[1]["spread"])
    every_seed = all(t > b for t, b in zip(scores["teacher"], scores["in-batch"]))
    verdict = (f"teacher negatives {'improve' if gain > 0 else 'do not improve'} the student by {gain:+.4f} nDCG@5 "
               f"(seed half-range {noise:.4f}; better on {'every' if every_seed else 'not every'} seed)")
    print(verdict)
    write_json(out / "teacher_mining.json", {
        "env": env(__import__("torch").device("cpu")), "teacher": options.teacher, "teacher_meta": meta.get("teacher"),
        "fn_filtered": meta["counts"]["fn_filtered"], "student": options.student, "seeds": options.seeds,
        "scores": scores, "gain": gain, "noise": noise, "every_seed": every_seed, "verdict": verdict})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
