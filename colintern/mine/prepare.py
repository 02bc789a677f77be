"""A mining run made ready before its first query: the model, the corpus and its page plan, the page store (encoded
once and shared by the shards, or reused), the query pairs, and the FAISS first stage when the method needs it.
The search (colintern/mine/miner.py) runs it."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from colintern.device import resolve_device
from colintern.errors import UserError
from colintern.files import file_sha256, fingerprint
from colintern.mine.corpus import load_corpus
from colintern.mine.output import PartialOutput, output_paths
from colintern.settings import MineConfig

log = logging.getLogger("colintern.mine")


def mining_device(spec: str) -> str:
    """--device resolved by the one device policy; under torchrun each process takes cuda:LOCAL_RANK."""
    device = resolve_device(spec)
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        device = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # kernels and allocations of this process default to its own GPU
    return device


class PreparedMining:
    """A mining run made ready before its first query: the model, the corpus and its page plan, the page store (encoded"""

    def __init__(self, config: MineConfig):
        from colintern.data.report import SkipReport
        from colintern.data.datasets import clean_query
        from colintern.mine.search import choose_method, plan_pairs
        from colintern.retriever.model import ColIntern, has_trained_head
        from colintern.mine.page_store import PageStore, plan_pages

        assert config.model_id is not None  # MineConfig.check: required unless --merge
        self.model_id: str = config.model_id
        self.config, self.t_start = config, time.time()
        self.paths = output_paths(config.out_jsonl, config.shard_id, config.num_shards)
        self.show = not config.quiet
        self.device = mining_device(config.device)
        self.use_gpu = self.device.startswith("cuda")
        if config.ckpt is None and not has_trained_head(self.model_id):
            log.warning("no --ckpt: mining with the base model %s and an UNTRAINED head; negatives will be close "
                        "to random. Pass --ckpt outputs/train/colintern_heads_epoch1.pt", config.model_id)
        self.model = ColIntern.from_pretrained(self.model_id, ckpt=config.ckpt, device=self.device, dtype=config.dtype,
                                               use_flash_attn=config.use_flash_attn,
                                               allow_other_base=config.allow_other_base)
        self.ckpt_sha = file_sha256(config.ckpt) if config.ckpt else None
        self.dtype_name = str(next(self.model.backbone.parameters()).dtype).replace("torch.", "")
        self.report = SkipReport(strict=config.strict, logger=log)
        self.corpus = load_corpus(config, self.report)
        dataset = self.corpus.dataset
        self.dataset = dataset
        self.plan = plan_pages(dataset, self.corpus.name, config.dedupe, show_progress=self.show)
        log.info("model %s%s on %s (%s); %d rows -> %d unique pages (dedupe by %s)", config.model_id,
                 f" + {config.ckpt}" if config.ckpt else "", self.device, self.dtype_name, len(dataset),
                 self.plan.n_pages, self.plan.dedupe)
        self._encode_pages()
        self.store = PageStore(self.store_dir, self.spec)
        image_bad = self.store.skipped_rows()
        self.pair_plan = plan_pairs(dataset["query"], self.plan, self.store, {r for r, _ in image_bad}, clean_query,
                                    self.corpus.where, self.corpus.page_only)
        for row, reason in sorted(image_bad + self.pair_plan.bad_rows):
            self.report.add(self.corpus.where(row), reason)
        if self.store.n_valid == 0:
            raise UserError(f"{self.corpus.label}: none of its {len(dataset)} rows has a decodable image "
                            f"({self.report.summary()})")
        if not self.pair_plan.pairs:
            raise UserError(f"{self.corpus.label}: no usable queries ({self.report.summary()})")
        if self.store.n_valid == 1:
            log.warning("the corpus has a single page: every query gets an empty negatives list")
        pairs_all = self.pair_plan.pairs
        self.lo = config.shard_id * len(pairs_all) // config.num_shards
        self.hi = (config.shard_id + 1) * len(pairs_all) // config.num_shards
        self.pairs = pairs_all[self.lo:self.hi]
        self.fn_filter = config.fn_filter if config.fn_filter > 0 else None
        self.method, self.method_why = choose_method(config.method, self.store.n_tokens, self.use_gpu)
        log.info("search method: %s (%s)", self.method, self.method_why)
        self.output = PartialOutput(self.paths, self._settings(), config.resume, len(self.pairs))
        self.index: Any = None
        self.faiss_info: dict[str, Any] | None = None  # None: exact search, no FAISS index
        self.faiss_gpu, self.token_k = False, config.token_k
        if self.method == "faiss":
            self._build_index()

    def _encode_pages(self) -> None:
        """Page embeddings on disk, shared by shards and kept across resumes."""
        from colintern.mine.page_store import StoreSpec, ensure_page_store, keys_digest

        config, plan = self.config, self.plan
        self.spec = StoreSpec(model_id=self.model_id, ckpt_sha256=self.ckpt_sha, config=self.model.config.to_dict(),
                              dtype=self.dtype_name, dataset=self.corpus.name, split=self.corpus.split,
                              limit=config.limit,
                              dedupe=plan.dedupe, keys_sha256=keys_digest(plan), n_pages=plan.n_pages,
                              pages_per_part=config.pages_per_part)
        emb_dir = Path(config.emb_dir) if config.emb_dir else self.paths["emb_dir"]
        self.store_dir = emb_dir / self.spec.id
        if emb_dir.is_dir():
            stale = [d.name for d in emb_dir.iterdir() if d.is_dir() and d.name != self.spec.id]
            if stale:
                log.warning("%s also holds page embeddings of other runs (%s); delete them to free disk space",
                            emb_dir, ", ".join(stale[:3]))

        def encode_pages(pils: list) -> list[torch.Tensor]:
            return self.model.encode_images(pils, batch_size=config.doc_batch, show_progress=False)

        t0 = time.time()
        self.encoded = ensure_page_store(self.store_dir, self.spec, plan, self.dataset, self.corpus.where, encode_pages,
                                         window=config.doc_batch * 8, strict=config.strict, shard_id=config.shard_id,
                                         num_shards=config.num_shards, show_progress=self.show)
        self.t_encode = time.time() - t0

    def _settings(self) -> dict[str, Any]:
        """What a resumed run must share with the partial output it continues."""
        config = self.config
        settings = {"store": self.spec.id, "method": self.method, "k": config.k, "skip_top": config.skip_top,
                    "fn_filter": self.fn_filter, "search_batch": config.search_batch,
                    "shard": [config.shard_id, config.num_shards], "pairs": [self.lo, self.hi],
                    "model_id": config.model_id, "ckpt_sha256": self.ckpt_sha,
                    "pairs_digest": fingerprint([(p.row, p.text, p.page) for p in self.pairs])}
        if self.method == "faiss":
            settings.update(candidates=config.candidates, token_k=config.token_k, faiss_index=config.faiss_index,
                            nprobe=config.nprobe, deepen=config.deepen)
        return settings

    def _build_index(self) -> None:
        from colintern.index.faiss_index import build_faiss_index, faiss_gpus

        config = self.config
        self.faiss_gpu = self.use_gpu and faiss_gpus() > 0
        if self.faiss_gpu and self.token_k > 2048:
            log.warning("--token_k %d is above the GPU index limit: using 2048", self.token_k)
            self.token_k = 2048
        t0 = time.time()
        gpu_id = int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.index, info = build_faiss_index(
            self.store, config.faiss_index, config.nprobe, self.faiss_gpu, gpu_id,
            self.store_dir / f"faiss-{fingerprint(config.faiss_index)}.index", self.show)
        self.faiss_info = {**info, "build_seconds": round(time.time() - t0, 3)}
        if self.use_gpu and not self.faiss_gpu:
            log.info("faiss has no GPU support in this install (faiss-cpu): the first stage runs on the CPU")
