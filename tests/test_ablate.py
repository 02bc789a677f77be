"""python -m colintern.scripts.ablate: the single-vector grid end to end on tiny data; its table equals the per-cell
summaries it wrote, and it says whether the differences exceed the seed noise."""
from __future__ import annotations

import json
import os

import pytest

from colintern.scripts import ablate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_grid_runs_end_to_end_and_its_table_equals_the_cell_summaries(tiny_model_dir, synthetic_small_dir,
                                                                           tmp_path, capsys):
    out = tmp_path / "grid"
    assert ablate.main(["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"),
                        "--eval_dir", os.path.join(synthetic_small_dir, "eval"), "--out", str(out),
                        "--poolings", "mean", "latent", "--attentions", "bidirectional", "--seeds", "0", "1",
                        "--epochs", "1", "--batch_size", "8"]) == 0
    grid = json.loads((out / "grid.json").read_text())
    assert [c["name"] for c in grid["cells"]] == ["mean-bidirectional-global", "latent-bidirectional-global"]
    for cell in grid["cells"]:
        for run in cell["runs"]:
            seed_dir = out / "cells" / cell["name"] / f"seed{run['seed']}"
            for kind in ("base", "trained"):
                summary = json.loads((seed_dir / kind / "summary.json").read_text())
                assert summary["tasks"]["eval"]["ndcg_at_5"] == run[kind]
        trained = [r["trained"] for r in cell["runs"]]
        assert cell["trained_mean"] == pytest.approx(sum(trained) / 2)
        assert cell["trained_spread"] == pytest.approx(abs(trained[0] - trained[1]) / 2)
    md = (out / "grid.md").read_text()
    assert md.startswith("# Single-vector ablation: ndcg_at_5 on eval")
    for cell in grid["cells"]:
        assert f"| {cell['pooling']} | bidirectional | global | {cell['base_mean']:.4f} | " \
               f"{cell['trained_mean']:.4f} ± {cell['trained_spread']:.4f} |" in md
    assert grid["verdict"] in md and ("within the seed noise" in grid["verdict"] or "beats the worst" in
                                      grid["verdict"])
    assert (out / "grid.png").stat().st_size > 5000
    assert "grid: " in capsys.readouterr().out


def test_verdict_names_noise_and_single_seeds():
    cells = [{"name": "a", "trained_mean": 0.50, "trained_spread": 0.02},
             {"name": "b", "trained_mean": 0.53, "trained_spread": 0.03}]
    assert "within the seed noise" in ablate.verdict(cells, 2)
    cells[1]["trained_mean"] = 0.70
    assert "beats the worst, a (0.5000), by 0.2000" in ablate.verdict(cells, 2)
    assert "one seed per cell" in ablate.verdict(cells, 1)
