"""Shared session fixtures: the tiny model and the synthetic corpus are built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite is the CPU suite (CI has no GPU): on a GPU machine it must still train on the CPU, in fp32, with the
# deterministic algorithms its exactness tests rely on. GPU paths are measured by bench/gpu_suite.py.
# COLINTERN_TEST_CUDA=1 keeps the GPUs visible.
if os.environ.get("COLINTERN_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors (tests/test_maxsim_kernel.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: tiny tensors gain nothing from more, and on a busy 2-core machine the
    thread wake-ups dominate (measured several times slower). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """The tiny InternVL3.5-architecture model in the transformers-native layout."""
    from colintern.backbones.internvl import build_tiny_internvl

    return build_tiny_internvl(str(tmp_path_factory.mktemp("tiny_native")), layout="native", seed=0)


@pytest.fixture(scope="session")
def tiny_remote_dir(tmp_path_factory) -> str:
    """The same tiny model written as an original internvl_chat checkpoint."""
    from colintern.backbones.internvl import build_tiny_internvl

    return build_tiny_internvl(str(tmp_path_factory.mktemp("tiny_remote")), layout="remote", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> str:
    """A tiny Qwen3-VL, built through the CLI entry point (`python -m colintern.testing.tiny OUT --backbone qwen3_vl`)."""
    from colintern.testing.tiny import main

    out = str(tmp_path_factory.mktemp("tiny_qwen3vl"))
    assert main([out, "--backbone", "qwen3_vl", "--seed", "0"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_qwen25_dir(tmp_path_factory) -> str:
    """A tiny Qwen2.5-VL (ColQwen2.5's architecture)."""
    from colintern.backbones.registry import get_family

    return get_family("qwen2_5_vl").build_tiny(str(tmp_path_factory.mktemp("tiny_qwen25vl")), seed=0)


@pytest.fixture(scope="session")
def tiny_smolvlm_dir(tmp_path_factory) -> str:
    """A tiny Idefics3 (SmolVLM / ColSmol's architecture)."""
    from colintern.backbones.registry import get_family

    return get_family("smolvlm").build_tiny(str(tmp_path_factory.mktemp("tiny_smolvlm")), seed=0)


@pytest.fixture(scope="session", params=["internvl", "qwen3_vl", "qwen2_5_vl", "smolvlm"])
def tiny_backbone(request) -> tuple[str, str]:
    """(family name, tiny model folder) for each backbone family: the contract tests run once per family."""
    folder = {"internvl": "tiny_model_dir", "qwen3_vl": "tiny_qwen_dir", "qwen2_5_vl": "tiny_qwen25_dir",
              "smolvlm": "tiny_smolvlm_dir"}[request.param]
    return request.param, request.getfixturevalue(folder)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> str:
    """The synthetic page corpus (colintern.testing.synthetic defaults: 240 train pages x 3 queries, 60 eval pages)."""
    from colintern.testing.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    generate(str(out))
    return str(out)


@pytest.fixture(scope="session")
def synthetic_small_dir(tmp_path_factory) -> str:
    """A small synthetic corpus (40 train pages x 3 queries = 120 rows, 12 eval pages) for fast trainer tests."""
    from colintern.testing.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic_small")
    generate(str(out), n_train_pages=40, n_eval_pages=12)
    return str(out)


@pytest.fixture(scope="session")
def synthetic_tiny_dir(tmp_path_factory) -> str:
    """8 train pages x 3 queries and 4 held-out pages, 96 px wide: the script runs on every family's tiny model."""
    from colintern.testing.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic_tiny")
    generate(str(out), n_train_pages=8, n_eval_pages=4, queries_per_page=3, page_size=96)
    return str(out)


@pytest.fixture(scope="session")
def search_docs(tmp_path_factory):
    """a.pdf (3 pages), b.pdf (2 pages), c.png: the search tests' documents (read only; copy them to change one)."""
    from helpers import search_page

    folder = tmp_path_factory.mktemp("docs")
    pages = [search_page(i) for i in range(6)]
    pages[0].save(folder / "a.pdf", save_all=True, append_images=pages[1:3])
    pages[3].save(folder / "b.pdf", save_all=True, append_images=pages[4:5])
    pages[5].save(folder / "c.png")
    return folder


@pytest.fixture(scope="session")
def search_ckpt(tiny_model_dir, tmp_path_factory) -> str:
    """A checkpoint of the tiny model (untrained head, dim 32, 2 tiles) to index and query with."""
    from colintern import ColIntern
    from colintern.retriever.checkpoint import save_checkpoint

    model = ColIntern.from_pretrained(tiny_model_dir, max_tiles=2, dim=32)
    path = tmp_path_factory.mktemp("ckpt") / "colintern_heads_step1.pt"
    save_checkpoint(str(path), **model.checkpoint_parts())
    return str(path)
