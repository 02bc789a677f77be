"""FAISS, the one module that imports it: the inner-product index over page token vectors that mining and search
use as a first stage (built once, cached, optionally on a GPU), and the two facts the rest of ColIntern asks of
FAISS (how many GPUs it can use, which inverted list each token fell in). Everything else takes the index object."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from colintern.files import atomic_write_bytes
from colintern.mine.page_store import PageTokens
from colintern.mine.search import AUTO_EXACT_MAX_TOKENS

log = logging.getLogger("colintern.mine")


def faiss_gpus() -> int:
    """GPUs FAISS can put an index on: 0 for a CPU build (faiss-cpu) or a machine without CUDA."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def ivf_of(index: Any) -> Any:
    """The IVF part of an index (its lists, centroids, nprobe)."""
    import faiss

    return faiss.extract_index_ivf(index)


def list_token_ids(ivf: Any, lst: int) -> np.ndarray:
    """The ids (global token positions) held by inverted list `lst`."""
    import faiss

    n = ivf.invlists.list_size(lst)
    return faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), n).copy() if n else np.empty(0, dtype=np.int64)


def build_faiss_index(store: PageTokens, factory: str, nprobe: int, use_gpu: bool, gpu_id: int, cache_path: Path | None,
                      show_progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Inner-product FAISS index over every page token vector (ids = global token positions).

    factory "auto": an exact "Flat" index up to AUTO_EXACT_MAX_TOKENS tokens (where --method auto would not use
    FAISS at all), else "IVF<nlist>,PQ32" (32 bytes per token, trained on a sample), searched with nprobe lists.
    A trained index is saved to cache_path so a resumed run searches the very same index. With use_gpu the index
    is moved to GPU gpu_id (float16 storage).
    """
    import faiss

    if factory == "auto":
        if store.n_tokens <= AUTO_EXACT_MAX_TOKENS:
            factory = "Flat"
        else:
            nlist = int(2 ** round(math.log2(4 * math.sqrt(store.n_tokens))))
            factory = f"IVF{nlist},PQ32"
    info: dict[str, Any] = {"factory": factory, "n_tokens": store.n_tokens, "gpu": False}
    index = None
    if cache_path is not None and cache_path.is_file():
        index = faiss.read_index(str(cache_path))
        if index.ntotal != store.n_tokens:
            index = None
    if index is None:
        index = faiss.index_factory(store.dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            nlist = faiss.extract_index_ivf(index).nlist if "IVF" in factory else 0
            n_train = min(store.n_tokens, max(65536, 64 * nlist), 2_000_000)
            log.info("training FAISS %s on %d token vectors", factory, n_train)
            index.train(store.sample_tokens(n_train))
        with tqdm(total=store.n_tokens, desc="index tokens", unit="tok", unit_scale=True, dynamic_ncols=True,
                  disable=not show_progress) as bar:
            for chunk in store.iter_token_chunks():
                index.add(chunk)
                bar.update(len(chunk))
        if cache_path is not None and factory != "Flat":
            atomic_write_bytes(cache_path, faiss.serialize_index(index).tobytes())
    if "IVF" in factory:
        faiss.extract_index_ivf(index).nprobe = nprobe
        info["nprobe"] = nprobe
    if use_gpu:
        try:
            res = faiss.StandardGpuResources()
            options = faiss.GpuClonerOptions()
            options.useFloat16 = True
            index = faiss.index_cpu_to_gpu(res, gpu_id % max(faiss.get_num_gpus(), 1), index, options)
            GPU_RESOURCES.append(res)  # alive as long as the process: faiss index objects refuse new attributes
            info["gpu"] = True
        except Exception as err:  # noqa: BLE001 - faiss raises RuntimeError with C++ messages
            log.warning("FAISS GPU index failed (%s); searching on the CPU", str(err).splitlines()[0])
    return index, info


GPU_RESOURCES: list[Any] = []  # FAISS GPU resources of the indexes built in this process
