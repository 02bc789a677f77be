"""Encoding pages into an index: batches of rendered pages through the model, committed segment by segment so an
interrupted run resumes where it stopped."""
from __future__ import annotations

import logging
import time
from typing import Any

from PIL import Image

from colintern import hooks
from colintern.files import display
from colintern.retriever.token_pooling import pool_tokens
from colintern.index.sources import PageSource, render_page
from colintern.index.page_index import PageIndex


log = logging.getLogger("colintern.search")


def index_pages(index: PageIndex, model: Any, todo: list[PageSource], report: Any, batch_size: int,
                segment_pages: int, show_progress: bool = True) -> int:
    """Render, encode and commit the pages of `todo`, segment by segment; returns how many were indexed."""
    from colintern.cli import progress
    from colintern.data.report import BadRowError


    done = committed = 0
    start = time.perf_counter()
    with progress(len(todo), "index pages", "page", enabled=show_progress, logger=log) as bar:
        for first in range(0, len(todo), segment_pages):
            chunk, images = [], []
            for source in todo[first:first + segment_pages]:
                try:
                    images.append(render_page(source, index.meta["dpi"]))
                    chunk.append(source)
                except BadRowError as err:
                    report.add(f"{display(source.file)} page {source.page}", err.reason)
                except Exception as err:  # noqa: BLE001 - pdfium raises its own error types
                    report.add(f"{display(source.file)} page {source.page}",
                               f"cannot render: {str(err) or type(err).__name__}")
            if chunk:
                vectors = model.encode_images(images, batch_size=batch_size, show_progress=False)
                factor = index.meta.get("pool_factor", 1)
                index.commit([(s, pool_tokens(v, factor), *image_tokens_of(model, img, factor), img.size)
                              for s, v, img in zip(chunk, vectors, images)])
                committed += 1
                hooks.call("segment", committed)  # e.g. the tests' SIGKILL after the N-th segment
            done += len(chunk)
            bar.update(len(todo[first:first + segment_pages]))
            bar.set_postfix(pages_per_s=f"{done / max(time.perf_counter() - start, 1e-9):.1f}")
    return done


def image_tokens_of(model: Any, page: Image.Image, pool_factor: int = 1) -> tuple[int, int]:
    """(index of the first image-token vector among the page's kept vectors, number of image tokens): where the
    similarity map of a page reads its per-token scores. Single-vector models, and pooled pages (whose vectors no
    longer sit on image tokens), have no token map: (0, 0).
    Kept vectors start at the first image token unless keep_page_tokens is "all", which keeps the prompt before
    it too (the same tokens for every page)."""
    cfg = model.config
    if cfg.embedding == "single" or pool_factor > 1:
        return 0, 0
    start = 0
    if cfg.keep_page_tokens == "all":
        before = cfg.page_prompt.split("<image>")[0] + cfg.image_start_token
        start = len(model.tokenizer(before, add_special_tokens=False)["input_ids"])
    return start, model.processor.page_cost(page)
