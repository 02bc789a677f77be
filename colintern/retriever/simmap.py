"""Similarity maps: where on a page a query matched (search.py query --explain).

Each image token of a page covers a box of the page (`PageProcessor.image_token_boxes`: InternVL's tiles and
thumbnail mapped back onto the page, Qwen3-VL's merged-patch grid). A query token's map is its similarity to
every image token, painted into those boxes; where boxes overlap (a tile and the thumbnail) the pixel keeps the
larger value. The whole-query map is, per image token, the best similarity over the query's tokens: the page
regions MaxSim drew on.
"""
from __future__ import annotations

from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image


def paint(values: np.ndarray, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(n,) values in (n, 4) normalised boxes -> (height, width) float map, the max where boxes overlap, NaN where
    none falls."""
    canvas = np.full((height, width), -np.inf)
    for value, (x0, y0, x1, y1) in zip(values, boxes):
        c0, c1 = int(round(x0 * width)), max(int(round(x1 * width)), int(round(x0 * width)) + 1)
        r0, r1 = int(round(y0 * height)), max(int(round(y1 * height)), int(round(y0 * height)) + 1)
        np.maximum(canvas[r0:r1, c0:c1], value, out=canvas[r0:r1, c0:c1])
    canvas[np.isinf(canvas)] = np.nan
    return canvas


def token_maps(query: torch.Tensor, image_vectors: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """((Lq, n) similarity of each query token to each image token, (n,) the best over query tokens)."""
    sims = (query.double() @ image_vectors.double().T).numpy()  # (Lq, n)
    return sims, sims.max(axis=0)


def save_map(page: Image.Image, heat: np.ndarray, title: str, path: Path | IO[bytes], max_side: int = 1024
             ) -> Path | IO[bytes]:
    """The page with the map drawn over it (PNG), into a file path or a binary file object."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = min(1.0, max_side / max(page.size))
    shown = page.resize((max(1, int(page.width * scale)), max(1, int(page.height * scale))))
    fig, ax = plt.subplots(figsize=(6, 6 * shown.height / shown.width))
    ax.imshow(shown)
    layer = ax.imshow(heat, cmap="inferno", alpha=0.55, extent=(0, shown.width, shown.height, 0))
    fig.colorbar(layer, ax=ax, fraction=0.046, pad=0.02, label="similarity")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path
