"""Hierarchical token pooling (--pool_factor K): about K times fewer vectors per page, for a smaller index.

A page's token vectors are clustered bottom-up (Ward linkage, as PyLate's pooling and the ColPali authors'
"token pooling" study do) into ceil(L / K) clusters, and each cluster is replaced by the mean of its vectors. MaxSim
then takes, for each query token, the best cluster mean instead of the best token. K = 1 leaves a page unchanged.
How much retrieval quality survives is measured, not assumed (docs/BENCHMARKS.md, bench/token_pooling.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch


def pool_tokens(vectors: torch.Tensor, factor: int) -> torch.Tensor:
    """(L, dim) token vectors -> (ceil(L / factor), dim) cluster means (float32; the input unchanged if factor 1)."""
    if factor < 1:
        raise ValueError(f"pool factor must be at least 1, got {factor}")
    n_tokens = vectors.shape[0]
    n_clusters = math.ceil(n_tokens / factor)
    if factor == 1 or n_tokens <= 1 or n_clusters >= n_tokens:
        return vectors.float()
    from scipy.cluster.hierarchy import fcluster, linkage

    points = vectors.double().numpy()
    labels = fcluster(linkage(points, method="ward"), t=n_clusters, criterion="maxclust") - 1  # (L,) in 0..C-1
    sums = np.zeros((labels.max() + 1, points.shape[1]))
    np.add.at(sums, labels, points)
    counts = np.bincount(labels).astype(np.float64)[:, None]
    return torch.from_numpy(sums / counts).float()  # (C, dim), C <= ceil(L / factor)
