"""README's "From a folder of PDFs to a trained retriever", run as written: dataset -> train -> mine -> train ->
eval -> index -> query -> serve, on the two committed real PDFs, with the tiny model.

The commands are read from the README itself, so the section cannot drift from what works. What the test changes,
and only that: the hub model becomes the tiny model, `~/manuals report.pdf` the two fixture PDFs, `cuda:0` the CPU,
and each script gets the flags of TINY_FLAGS (small pages and a small head, so that it runs in about a minute).
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest

from helpers import FIXTURES, REPO, load_script

pytestmark = pytest.mark.usefixtures("one_thread")
SECTION = "### From a folder of PDFs to a trained retriever"
HUB_MODEL = "OpenGVLab/InternVL3_5-1B-Instruct"
TINY_FLAGS = {
    "make_dataset": ["--dpi", "72"],
    "train.py": ["--max_tiles", "1", "--dim", "16", "--batch_size", "4", "--num_workers", "0", "--lr", "1e-3"],
    "mine.py": ["--device", "cpu"],
    "eval.py": ["--device", "cpu"],
    "search.py index": ["--device", "cpu", "--dpi", "72"],
    "search.py query": ["--device", "cpu", "--json"],
    "search.py serve": ["--device", "cpu", "--port", "0"],
}


def readme_commands() -> list[list[str]]:
    """The section's bash block as argument lists (continuation lines joined, comments dropped)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index(SECTION):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def tiny(argv: list[str], tiny_model_dir: str) -> tuple[str, list[str]]:
    """(the step's name, its arguments for the tiny model on the fixture PDFs)."""
    pdfs = {"~/manuals": str(FIXTURES / "real_pages.pdf"), "report.pdf": str(FIXTURES / "real_pages_mime.pdf")}
    args = [pdfs.get(a, tiny_model_dir if a == HUB_MODEL else "cpu" if a == "cuda:0" else a) for a in argv[1:]]
    if args[:2] == ["-m", "colintern.data.make_dataset"]:
        name, args = "make_dataset", args[2:]
    elif args[0] == "search.py":
        name, args = f"search.py {args[1]}", args[1:]
    else:
        name, args = args[0], args[1:]
    return name, args + TINY_FLAGS[name]


def test_the_readme_walkthrough_runs_as_written(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from colintern.cli import run_cli
    from colintern.data.make_dataset import main as make_dataset

    commands = readme_commands()
    assert [c[:2] for c in commands] == [["python", "-m"], ["python", "train.py"], ["python", "mine.py"],
                                         ["python", "train.py"], ["python", "eval.py"], ["python", "search.py"],
                                         ["python", "search.py"], ["python", "search.py"]]
    monkeypatch.chdir(tmp_path)
    mains = {"make_dataset": make_dataset, "train.py": load_script("train").main, "mine.py": load_script("mine").main,
             "eval.py": load_script("eval").main}
    search = load_script("search")
    for argv in commands[:-1]:
        name, args = tiny(argv, tiny_model_dir)
        main = mains.get(name, search.main)
        code = run_cli(main, args, out_flag=getattr(search, "OUT_FLAG", None) if main is search.main else None)
        assert code == 0, f"{name} {args}: exit {code}\n{capsys.readouterr().err[-3000:]}"
    out = capsys.readouterr().out
    # what each step left: a trained second phase, mined negatives, an evaluation, an index that answers
    assert Path("outputs/mine2/colintern_heads_epoch2.pt").is_file()
    mined = [json.loads(line) for line in Path("outputs/mine1/mined.jsonl").read_text().splitlines()]
    assert mined and any(row["negs"] for row in mined)
    scores = json.loads(Path("outputs/eval/mine2/summary.json").read_text())["tasks"]["eval"]  # the held-out PDF
    assert 0 < scores["ndcg_at_5"] <= 1 and scores["recall_at_10"] == 1.0  # 6 held-out pages: all in the top 10
    answer = json.loads(out.strip().splitlines()[-1])
    assert answer["query"] == "how do I reset the device?" and len(answer["results"]) == 5
    assert {Path(r["file"]).name for r in answer["results"]} <= {"real_pages.pdf", "real_pages_mime.pdf"}

    # the last line: the server, asked over HTTP for what the query above asked
    name, args = tiny(commands[-1], tiny_model_dir)
    proc = subprocess.Popen([sys.executable, str(REPO / "search.py"), *args], cwd=tmp_path, stderr=subprocess.PIPE,
                            text=True)
    try:
        base = None
        for line in proc.stderr:
            match = re.search(r"on (http://127\.0\.0\.1:\d+/)", line)
            if match:
                base = match.group(1)
                break
        assert base, "the server did not start"
        query = urlencode({"q": answer["query"], "k": 5})
        with urllib.request.urlopen(f"{base}search?{query}", timeout=120) as reply:
            served = json.loads(reply.read())
        assert [(r["file"], r["page"]) for r in served["results"]] == \
               [(r["file"], r["page"]) for r in answer["results"]]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
