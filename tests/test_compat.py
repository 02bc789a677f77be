"""Checkpoints written by an earlier ColIntern keep their meaning: tests/fixtures/v1_checkpoint/ holds a heads-only
run of the tiny model (seed 0) on the small synthetic corpus, written before the training loop moved into the
package (train.py --max_steps 2 --save_every 1 --batch_size 4 --dim 32 --max_tiles 2 --num_workers 0), and the
embeddings that code computed from its step-2 checkpoint."""
from __future__ import annotations

import os

import pytest
import torch

from colintern import ColIntern
from colintern.retriever.checkpoint import load_checkpoint
from colintern.train.state import TrainingState
from helpers import FIXTURES, load_script, noisy_page

V1 = FIXTURES / "v1_checkpoint"
PAGES = [noisy_page(224, 300, (255, 0, 0), 1), noisy_page(120, 900, (200, 200, 0), 6)]
QUERIES = ["red page", "which page shows a green triangle?"]
STEP_TOLERANCE = 1e-7  # head weights of today's resume against the fixture's step 2 (another machine's)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_v1_checkpoint_gives_the_embeddings_it_gave_then(tiny_model_dir):
    want = torch.load(V1 / "embeddings.pt", weights_only=True)
    model = ColIntern.from_pretrained(tiny_model_dir, ckpt=str(V1 / "colintern_heads_step2.pt"))
    assert (model.config.dim, model.config.max_tiles) == (32, 2)
    for got, ref in zip(model.encode_images(PAGES) + model.encode_queries(QUERIES), want["docs"] + want["queries"]):
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() < 1e-6


def test_a_v1_training_state_reads_as_the_typed_state():
    saved = load_checkpoint(str(V1 / "colintern_heads_step1.pt"))["training"]
    state = TrainingState.from_dict(saved)
    assert (state.step, state.phase_step, state.epoch, state.epoch_position, state.phase_done) == (1, 1, 1, 1, False)
    assert (state.phase.index, state.phase.kind, state.phase.steps, state.phase.batch_size) == (1, "hub", 2, 4)
    again = state.to_dict()
    assert set(again) == set(saved) - {"fault"} | {"datasets"} and again["phase"] == saved["phase"]
    assert again["datasets"] is None  # v1 did not record its training data: unknown, not "none"


def test_a_v1_checkpoint_resumes_exactly(tiny_model_dir, synthetic_small_dir, tmp_path, capsys):
    """Resuming the v1 step-1 checkpoint with today's train.py continues the same phase and reaches the very head
    the v1 code wrote at step 2."""
    train = load_script("train")
    argv = ["--model_id", tiny_model_dir, "--train_hub", os.path.join(synthetic_small_dir, "train"),
            "--max_steps", "2", "--save_every", "1", "--batch_size", "4", "--num_workers", "0",
            "--device", "cpu", "--out_dir", str(tmp_path), "--resume_ckpt", str(V1 / "colintern_heads_step1.pt")]
    assert train.main(argv) == 0
    assert "done: phase 1, 1 steps in this run (global step 2, epoch 1)" in capsys.readouterr().out
    new = load_checkpoint(str(tmp_path / "colintern_heads_step2.pt"))
    old = load_checkpoint(str(V1 / "colintern_heads_step2.pt"))
    step1 = load_checkpoint(str(V1 / "colintern_heads_step1.pt"))
    for name in old["head"]:
        # Within STEP_TOLERANCE, not bit for bit: the fixture was written on another CPU family (AMD EPYC), whose
        # matmul kernels round differently (measured on an Intel Xeon: 7.5e-9, one float32 ulp at these values).
        # One optimizer step moves the head far more, so reaching another step would fail this by orders.
        assert (new["head"][name] - old["head"][name]).abs().max().item() < STEP_TOLERANCE, name
        assert (step1["head"][name] - old["head"][name]).abs().max().item() > 100 * STEP_TOLERANCE, name
    assert new["training"]["phase"]["fingerprint"] == old["training"]["phase"]["fingerprint"]
