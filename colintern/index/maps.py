"""A result's similarity map: the page rendered again with where the query matched drawn over it (search.py query
--explain writes them as files, search.py serve as images of its web page; docs/DESIGN.md "Similarity maps")."""
from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import torch

from colintern.files import file_sha256


def similarity_map(index: Any, model: Any, i: int, query_vectors: torch.Tensor, title: str, out: Path | IO[bytes],
                   max_side: int = 1024) -> str | None:
    """Draw page i of the index (a PageIndex or a view of one) with the query's best similarity per image token, as
    PNG into `out` (a path or a binary file); None when written, else why not (the file is gone or changed since it
    was indexed, or the page has no token map)."""
    from colintern.index.sources import render_page
    from colintern.retriever.simmap import paint, save_map, token_maps

    page = index.pages[i]
    if not Path(page["file"]).is_file():
        return "the file is gone; no similarity map"
    if file_sha256(page["file"]) != page["sha256"]:
        return "the file changed since it was indexed; no similarity map (search.py index updates it)"
    if not page["image_tokens"]:
        return "no token map (a single-vector checkpoint, or a pooled index)"
    image = render_page(index.source(i), index.meta["dpi"])
    vectors = index.vectors(i)[page["image_start"]:page["image_start"] + page["image_tokens"]]  # (n_image, dim)
    boxes = model.processor.image_token_boxes(image)  # (n_image, 4) normalised page boxes
    _, best = token_maps(query_vectors, vectors)
    width = min(image.width, max_side)
    heat = paint(best, boxes, width, int(width * image.height / image.width))
    save_map(image, heat, title[:120], out, max_side=max_side)
    return None
