"""Does a teacher's mining help a student of another family? Seed 002's "better negatives from another, stronger
model" (NV-Retriever's positive-aware mining), measured on the tiny models and the synthetic pages, in the ColPali
recipe's shape: an in-batch epoch first, then an epoch with mined negatives.

    make teacher-mining          # trains the stronger teacher (and runs make demo) first, then runs this:
    PYTHONPATH=. .venv/bin/python bench/teacher_mining.py --data outputs/demo/synthetic --student qwen2_5_vl \\
        --teacher outputs/demo/train/colintern_heads_epoch2.pt \\
                  outputs/bench/teacher_mining/teacher_longer/colintern_heads_epoch4.pt \\
        --seeds 0 1 2 3 4 5 6 7 --out outputs/bench/teacher_mining

1. eval.py scores each teacher on the held-out set (is it stronger than the student?); mine.py --teacher mines the
   training queries with each, with the positive-aware filter (--fn_filter 0.95: a candidate scoring above 95 % of
   the positive is taken for an unlabelled positive and skipped), and with the first teacher also without it
   (--fn_filter 0). The synthetic set has real unlabelled positives (queries naming attributes several pages share).
2. For each seed, a student of another family (a fresh tiny model, LoRA) trains epoch 1 on in-batch negatives
   (train.py --train_hub). From that checkpoint (--resume_ckpt), epoch 2 runs once per arm on the same mined
   queries, steps, batch and learning rate: in-batch negatives only (--num_negs 0), or plus one teacher negative
   per query (--num_negs 1) from each mined file.
3. eval.py scores each epoch-2 student (and the epoch-1 one) on the held-out set. The arms share each seed's epoch
   1, so the per-seed differences to in-batch are paired: their mean, how many seeds improve, and a paired t-test
   (an arm "helps" when its mean gain is positive at p < 0.05).
Finished steps are kept: a rerun, or one with more seeds or teachers added at the end, runs only what is missing;
other settings in the same --out are refused (OUT/settings.json).
Writes OUT/teacher_mining.json and prints the table (every command is run as a user would run it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from scipy.stats import ttest_rel

from benchlib import env, print_table, write_json  # noqa: E402

from colintern.cli import run_cli, setup_logging  # noqa: E402
from colintern.errors import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(*command: str, done_if: Path | None = None) -> None:
    """Run one script as a user would (one torch thread each, offline, as make demo does); skipped when done_if
    exists (a finished step of an interrupted or extended run: more --seeds reuse the earlier ones)."""
    from colintern.scripts.demo import child_env

    if done_if is not None and done_if.exists():
        print("# done already:", done_if, flush=True)
        return
    print("$", " ".join(command), flush=True)
    done = subprocess.run([sys.executable, *command], cwd=REPO, env=child_env(1)[0])
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}")


def check_settings(out: Path, options: argparse.Namespace) -> None:
    """Finished steps are reused by path, so OUT may only be extended (more seeds, teachers added after the earlier
    ones) with the settings it was made with: anything else would mix two experiments silently."""
    settings = {key: getattr(options, key) for key in ("teacher", "data", "student", "batch_size", "lr")}
    path = out / "settings.json"
    if path.is_file():
        earlier = json.loads(path.read_text())
        changed = [key for key in settings if key != "teacher" and earlier.get(key) != settings[key]]
        if settings["teacher"][:len(earlier["teacher"])] != earlier["teacher"]:
            changed.insert(0, "teacher")
        if changed:
            flags = ", ".join(f"--{key}" for key in changed)
            raise UserError(f"{out} holds a run with other {flags} ({path}); pass another --out")
    write_json(path, settings)


def ndcg_at_5(summary: Path) -> float:
    return float(json.loads(summary.read_text())["average"]["ndcg_at_5"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, nargs="+",
                        help="one or more models ColIntern loads (mine.py --teacher); the first also mines unfiltered")
    parser.add_argument("--data", default="outputs/demo/synthetic", help="a synthetic corpus: DATA/train, DATA/eval")
    parser.add_argument("--student", default="qwen2_5_vl", help="the student's family (a fresh tiny model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="training seeds (default: 0-7)")
    parser.add_argument("--out", default="outputs/bench/teacher_mining", help="output folder")
    parser.add_argument("--batch_size", type=int, default=16, help="pairs per step (default: 16)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    options = parser.parse_args(argv)
    setup_logging()
    out, data = Path(options.out), options.data
    check_settings(out, options)
    student = out / "student"
    run("-m", "colintern.testing.tiny", str(student), "--backbone", options.student,
        done_if=student / "model.safetensors")
    mined: dict[str, Path] = {}  # arm -> the triples it trains on
    for i, teacher in enumerate(options.teacher):
        label, prefix = ("teacher", "") if i == 0 else (f"teacher {i + 1}", f"teacher{i + 1}_")
        for name, threshold in (("filtered", "0.95"), ("unfiltered", "0"))[:2 if i == 0 else 1]:
            path = mined[f"{label}, {name}"] = out / "mine" / f"{prefix}{name}.jsonl"
            run("mine.py", "--teacher", teacher, "--hub_name", f"{data}/train", "--k", "4", "--fn_filter", threshold,
                "--method", "exact", "--out_jsonl", str(path), "--device", "cpu", "--quiet",
                done_if=path.with_suffix(".meta.json"))
    common = ["--model_id", str(student), "--batch_size", str(options.batch_size), "--lr", str(options.lr), "--lora",
              "--lora_r", "16", "--epochs", "1", "--device", "cpu", "--save_every", "0", "--num_workers", "1",
              "--overwrite"]
    arms = {"in-batch": ["--train_jsonl", str(mined["teacher, filtered"]), "--num_negs", "0"],
            **{arm: ["--train_jsonl", str(path), "--num_negs", "1"] for arm, path in mined.items()}}
    slugs = {arm: arm.replace(", ", "_").replace(" ", "_") for arm in arms}  # "teacher 2, filtered" -> folder name
    scores: dict[str, list[float]] = {"epoch 1 (in-batch)": [], **{arm: [] for arm in arms}}

    def evaluate(model: str | Path, run_name: str) -> float:
        which = "--ckpt" if str(model).endswith(".pt") else "--model_id"
        run("eval.py", which, str(model), "--local_dataset", f"{data}/eval", "--out_dir", str(out / "eval"),
            "--run_name", run_name, "--device", "cpu", "--overwrite", done_if=out / "eval" / run_name / "summary.json")
        return ndcg_at_5(out / "eval" / run_name / "summary.json")

    teacher_scores = {teacher: evaluate(teacher, f"teacher{i + 1}") for i, teacher in enumerate(options.teacher)}

    for seed in options.seeds:
        first = out / "epoch1" / f"seed{seed}"
        run("train.py", *common, "--train_hub", f"{data}/train", "--seed", str(seed), "--out_dir", str(first),
            done_if=first / "colintern_heads_epoch1.pt")
        scores["epoch 1 (in-batch)"].append(evaluate(first / "colintern_heads_epoch1.pt", f"epoch1_seed{seed}"))
        for arm, data_flags in arms.items():
            slug = slugs[arm]
            second = out / slug / f"seed{seed}"
            run("train.py", *common, *data_flags, "--resume_ckpt", str(first / "colintern_heads_epoch1.pt"), "--seed",
                str(seed), "--out_dir", str(second), done_if=second / "colintern_heads_epoch2.pt")
            scores[arm].append(evaluate(second / "colintern_heads_epoch2.pt", f"{slug}_seed{seed}"))
    baseline = scores["in-batch"]
    rows = []
    for arm, values in scores.items():
        paired = [v - b for v, b in zip(values, baseline)]
        test = ttest_rel(values, baseline) if arm != "in-batch" and len(values) > 1 else None
        rows.append({"arm": arm, "mean": statistics.mean(values), "spread": (max(values) - min(values)) / 2,
                     "gain": statistics.mean(paired), "wins": sum(d > 0 for d in paired),
                     "p": float(test.pvalue) if test is not None else float("nan"),
                     "seeds": " ".join(f"{x:.4f}" for x in values)})
    print_table(rows, [("arm", "student negatives", "s"), ("mean", "nDCG@5 mean", ".4f"),
                       ("spread", "± half range", ".4f"), ("gain", "vs epoch 2 in-batch", "+.4f"),
                       ("wins", "seeds better", "d"), ("p", "paired t-test p", ".3f"), ("seeds", "per seed", "s")])
    verdicts = []
    for row in (row for row in rows if row["arm"] in mined):
        helps = row["gain"] > 0 and row["p"] < 0.05
        verdicts.append(f"{row['arm']}: {row['gain']:+.4f} nDCG@5 over in-batch (better on {row['wins']} of "
                        f"{len(options.seeds)} seeds, paired t-test p = {row['p']:.3f}) -> "
                        f"{'helps' if helps else 'no significant gain' if row['gain'] > 0 else 'no gain'}")
    for i, (teacher, score) in enumerate(teacher_scores.items()):
        print(f"teacher{'' if i == 0 else f' {i + 1}'}: {teacher}, nDCG@5 {score:.4f} on the held-out set")
    for verdict in verdicts:
        print(verdict)
    metas = {arm: json.loads(path.with_suffix(".meta.json").read_text()) for arm, path in mined.items()}
    write_json(out / "teacher_mining.json", {
        "env": env(__import__("torch").device("cpu")), "teachers": teacher_scores,
        "teacher_meta": {arm: m.get("teacher") for arm, m in metas.items()},
        "mined": {arm: {key: m["counts"][key] for key in ("fn_filtered", "negatives_per_line")}
                  for arm, m in metas.items()},
        "student": options.student, "seeds": options.seeds, "scores": scores, "rows": rows,
        "verdicts": verdicts})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
