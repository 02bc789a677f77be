"""GPU-only paths, simulated on the CPU (CUDA calls faked): what a first GPU user would hit. The real paths run in
bench/gpu_suite.py the first time a GPU machine is lent."""
from __future__ import annotations

import logging
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from colintern.errors import UserError


def test_the_test_suite_runs_on_the_cpu_even_on_a_gpu_machine():
    if os.environ.get("COLINTERN_TEST_CUDA") == "1":
        pytest.skip("COLINTERN_TEST_CUDA=1 keeps the GPUs visible")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU of a chosen compute capability, with flash-attn's package metadata present."""
    import transformers.utils

    state = {"capability": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["capability"])
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    return state


def test_flash_attention_only_where_it_can_run(fake_gpu, monkeypatch, caplog):
    from colintern.retriever.model import resolve_attn_implementation

    caplog.set_level(logging.WARNING)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))  # importable
    assert resolve_attn_implementation(True, "cuda:0", torch.bfloat16) == "flash_attention_2"
    assert resolve_attn_implementation(False, "cuda:0", torch.bfloat16) == "sdpa"
    assert resolve_attn_implementation(True, "cuda:0", torch.float32) == "sdpa"
    assert "for bf16/fp16 only, not float32" in caplog.text
    fake_gpu["capability"] = (7, 5)  # a T4 / V100-class GPU
    assert resolve_attn_implementation(True, "cuda:0", torch.float16) == "sdpa"
    assert "compute capability 8.0; this one has 7.5" in caplog.text
    fake_gpu["capability"] = (8, 0)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # metadata says installed, the import fails
    assert resolve_attn_implementation(True, "cuda:0", torch.bfloat16) == "sdpa"
    assert "installed but not importable (ModuleNotFoundError" in caplog.text


def test_a_faiss_gpu_index_that_refuses_attributes_is_still_used(tmp_path, monkeypatch, caplog):
    faiss = pytest.importorskip("faiss")
    sys.path.insert(0, str(os.path.join(os.path.dirname(__file__), "..", "bench")))
    from mining import write_page_store

    from colintern.index.faiss_index import build_faiss_index

    class GpuIndex:  # like faiss 1.15 SWIG objects: no new attributes
        __slots__ = ("cpu",)

        def __init__(self, cpu):
            self.cpu = cpu

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "GpuClonerOptions", lambda: SimpleNamespace(useFloat16=False), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, gpu, index, options: GpuIndex(index), raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    g = torch.Generator().manual_seed(0)
    pages = [torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1) for _ in range(6)]
    store = write_page_store(tmp_path / "store", pages)
    caplog.set_level(logging.WARNING)
    index, info = build_faiss_index(store, "Flat", 1, True, 0, None, show_progress=False)
    assert isinstance(index, GpuIndex) and info["gpu"] is True and "searching on the CPU" not in caplog.text


@pytest.fixture
def tf32_state():
    """Leave torch's global TF32 flags as they were found (the legacy API's defaults)."""
    yield
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


@pytest.mark.parametrize("start", ["default", "legacy allow_tf32", "set_float32_matmul_precision high",
                                   "fp32_precision tf32"])
def test_the_tf32_guard_works_from_every_starting_state(tf32_state, start):
    """torch refuses to read TF32 state through one API after the other set it; the guard must turn TF32 off
    inside and give the caller back exactly the state (and the API) it had."""
    from colintern.retriever.scoring import exact_fp32

    mm = torch.backends.cuda.matmul
    if start == "legacy allow_tf32":
        mm.allow_tf32 = True
    elif start == "set_float32_matmul_precision high":
        torch.set_float32_matmul_precision("high")
    elif start == "fp32_precision tf32":
        mm.fp32_precision = "tf32"

    def readable() -> tuple:
        try:
            legacy = mm.allow_tf32
        except RuntimeError:
            legacy = "unreadable"
        return legacy, mm.fp32_precision

    before = readable()
    with exact_fp32(torch.device("cuda")):  # only flags are touched: no CUDA call is made
        assert mm.fp32_precision == "ieee"
    after = readable()
    assert after[0] == before[0]  # the legacy flag reads (and means) what it did
    assert (after[1] == before[1]) or (before[1] == "none" and after[1] == "ieee")  # none and ieee: no TF32


def test_a_resume_with_fewer_gpus_restores_the_training_device(monkeypatch, caplog):
    from colintern.train import state as training

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(int(state[0])))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    base = training.rng_state()
    training.set_rng_state({**base, "cuda": [torch.tensor([7], dtype=torch.uint8),
                                              torch.tensor([8], dtype=torch.uint8)]})  # saved with 2 GPUs
    assert restored == [7]
    training.set_rng_state({**base, "cuda": torch.tensor([9], dtype=torch.uint8)})  # today's format
    assert restored == [7, 9]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    caplog.set_level(logging.WARNING)
    training.set_rng_state({**base, "cuda": [torch.tensor([7], dtype=torch.uint8)]})
    assert restored == [7, 9] and "none for cuda:3" in caplog.text


def test_an_oom_reported_as_a_plain_runtime_error_is_out_of_memory(monkeypatch):
    from colintern.train.step import probe_batch_size

    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=16 * gib))
    for name in ("empty_cache", "reset_peak_memory_stats", "synchronize", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: gib)

    def step(b: int) -> None:
        if b >= 4:
            raise RuntimeError("CUDA error: out of memory (a kernel's own wording)")

    assert probe_batch_size(step, [], max_batch=8, target_frac=0.8, device=torch.device("cuda", 0))[0] == 3

    def broken(b: int) -> None:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        probe_batch_size(broken, [], max_batch=8, target_frac=0.8, device=torch.device("cuda", 0))


def test_auto_batch_failure_on_one_rank_stops_every_rank(monkeypatch):
    """A rank whose probe fails must not leave the others waiting in the gather: all raise the same line."""
    from colintern.train import setup as trainer
    from colintern.settings import TrainConfig

    monkeypatch.setattr(trainer, "probe_batch_size", lambda *a, **k: (8, ["batch 8: fits"]))
    monkeypatch.setattr(trainer, "all_gather_object",
                        lambda value: [value, (0, "auto_batch: even a batch of 1 does not fit (rank 1)")])
    model = SimpleNamespace(processor=SimpleNamespace(worst_case_page=lambda: None))
    config = TrainConfig(model_id="m", train_hub="h", batch_size=4, optimizer="adamw", auto_max_batch=32,
                         auto_target_frac=0.8, loss="ce", tau=0.02)
    with pytest.raises(UserError, match=r"even a batch of 1 does not fit \(rank 1\)"):
        trainer.auto_batch(config, model, None, [], 0, False, torch.device("cuda", 0))


def test_bf16_only_on_gpus_that_have_it(monkeypatch):
    from colintern.retriever.model import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype(None, "cuda:0") == torch.float32 and resolve_dtype("bf16", "cuda:0") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16 and resolve_dtype(None, "cpu") == torch.float32


def _store(tmp_path, n_pages: int = 7):
    sys.path.insert(0, str(os.path.join(os.path.dirname(__file__), "..", "bench")))
    from mining import write_page_store

    g = torch.Generator().manual_seed(1)
    pages = [torch.nn.functional.normalize(torch.randn(3 + i % 4, 8, generator=g), dim=-1) for i in range(n_pages)]
    return write_page_store(tmp_path / "store", pages, pages_per_part=3), pages


def test_a_resident_page_store_is_read_once_and_scans_the_same_vectors(tmp_path, caplog):
    """GPU exact mining keeps the store on the device: later scans must not touch the memory maps again, and
    must yield the same float32 vectors (fp16 -> fp32 is exact)."""
    store, pages = _store(tmp_path)
    streamed = [(ids.tolist(), [d.clone() for d in docs]) for ids, docs in store.iter_parts("cpu")]
    caplog.set_level(logging.INFO)
    assert not store.make_resident("cpu", budget_bytes=store.n_tokens * store.dim * 2 - 1)
    assert not store.make_resident("cpu", budget_bytes=store.n_tokens * store.dim * 2 - 1)
    assert caplog.text.count("does not fit") == 1  # decided and said once, not before every search batch
    store._not_resident.clear()
    assert store.make_resident("cpu", budget_bytes=store.n_tokens * store.dim * 2)
    store.maps = [None] * len(store.maps)  # a scan that read the maps again would fail now
    for _ in range(2):
        resident = [(ids.tolist(), docs) for ids, docs in store.iter_parts("cpu")]
        assert [ids for ids, _ in resident] == [ids for ids, _ in streamed]
        for (_, a), (_, b) in zip(resident, streamed):
            assert all(torch.equal(x, y) and x.dtype == torch.float32 for x, y in zip(a, b))
    assert torch.equal(resident[0][1][0], pages[0].half().float())


def test_a_compiler_failure_at_a_later_recompilation_falls_back_to_eager(caplog):
    from colintern.train.setup import CompiledOrEager

    calls = []

    def eager(hidden, keep):
        return hidden * 2, keep

    def compiled(hidden, keep):
        calls.append(hidden.shape)
        if len(calls) > 1:  # the warm-up shape compiled; a new shape recompiles and the compiler breaks
            raise RuntimeError("InductorError: C++ compile error")
        return eager(hidden, keep)

    embed = CompiledOrEager(compiled, eager)
    x = torch.ones(2, 3, 4)
    caplog.set_level(logging.WARNING)
    assert torch.equal(embed(x, None)[0], x * 2)
    y = torch.ones(1, 5, 4)
    assert torch.equal(embed(y, None)[0], y * 2) and torch.equal(embed(y, None)[0], y * 2)
    assert len(calls) == 2 and caplog.text.count("torch.compile failed (RuntimeError: InductorError") == 1

    def out_of_memory(hidden, keep):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(RuntimeError, match="out of memory"):  # auto_batch's probe must still see an OOM
        CompiledOrEager(out_of_memory, eager)(x, None)


def test_a_same_phase_resume_of_a_paged_optimizer_pages_again():
    """bitsandbytes' load_state_dict leaves ordinary tensors; repage_optimizer_states copies the big ones back into
    buffers from the optimizer's own allocator (paged on CUDA), values unchanged, small ones untouched."""
    from colintern.train.optim import repage_optimizer_states

    big, small = torch.nn.Parameter(torch.zeros(100_000)), torch.nn.Parameter(torch.zeros(10))

    class PagedOptimizer(torch.optim.Optimizer):
        is_paged = True

        def __init__(self, params):
            super().__init__(params, {})

        def get_state_buffer(self, p, dtype=torch.float32):
            buffer = torch.zeros_like(p, dtype=dtype)
            buffer.is_paged = p.numel() >= 100_000  # what bitsandbytes' F.get_paged marks on CUDA
            return buffer

    opt = PagedOptimizer([big, small])
    s1, s2 = torch.arange(100_000, dtype=torch.uint8), torch.rand(100_000)
    opt.state[big] = {"state1": s1.clone(), "state2": s2.clone(), "step": 3}
    opt.state[small] = {"state1": torch.ones(10)}
    assert repage_optimizer_states(opt) == 2
    assert all(getattr(opt.state[big][k], "is_paged", False) for k in ("state1", "state2"))
    assert torch.equal(opt.state[big]["state1"], s1) and opt.state[big]["state1"].dtype == torch.uint8
    assert torch.equal(opt.state[big]["state2"], s2) and opt.state[big]["step"] == 3
    assert not getattr(opt.state[small]["state1"], "is_paged", False)
    assert repage_optimizer_states(opt) == 0  # already paged
    PagedOptimizer.is_paged = False
    assert repage_optimizer_states(opt) == 0


def test_head_and_pooler_are_seeded_on_the_cpu_under_another_default_device(tiny_model_dir, monkeypatch):
    """Under torch.set_default_device("cuda") a layer built without a device lands on the GPU, where the seeded CPU
    generator cannot fill it. Simulated with the meta device around ColIntern's constructor (the backbone is loaded
    first, as from_pretrained refuses a meta default): the head and latent pooler must be the usual CPU weights."""
    from colintern.retriever.model import ColIntern

    plain = ColIntern.from_pretrained(tiny_model_dir, device="cpu", embedding="single", pooling="latent")
    init = ColIntern.__init__

    def init_under_meta(self, *args, **kwargs):
        torch.set_default_device("meta")
        try:
            init(self, *args, **kwargs)
        finally:
            torch.set_default_device("cpu")

    monkeypatch.setattr(ColIntern, "__init__", init_under_meta)
    other = ColIntern.from_pretrained(tiny_model_dir, device="cpu", embedding="single", pooling="latent")
    assert other.head.weight.device.type == "cpu" and torch.equal(other.head.weight, plain.head.weight)
    for (name, a), (_, b) in zip(plain.pooler.state_dict().items(), other.pooler.state_dict().items()):
        assert b.device.type == "cpu" and torch.equal(a, b), name


def test_mine_under_torchrun_pins_each_process_to_its_own_gpu(monkeypatch):
    """mine.py sharded with torchrun: process LOCAL_RANK=1 must allocate on cuda:1, not on cuda:0 of rank 0."""
    from colintern.mine import prepare as miner

    pinned = []
    monkeypatch.setattr(miner, "resolve_device", lambda spec: "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", pinned.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert miner.mining_device("auto") == "cuda:1" and pinned == ["cuda:1"]
    monkeypatch.setattr(miner, "resolve_device", lambda spec: "cpu")
    assert miner.mining_device("cpu") == "cpu" and pinned == ["cuda:1"]
