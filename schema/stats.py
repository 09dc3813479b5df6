"""Summary statistics of attention maps, shared by the trace writer and the read side.

Each map is treated as a spatial distribution over its grid; coordinates are normalised so maps of
different resolution levels are comparable (x, y in 0-1, distances in image widths).
"""

from __future__ import annotations

import numpy as np

STAT_NAMES = ("mass", "peak", "entropy", "centroid_x", "centroid_y", "spread")


def map_stats(maps: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics of (K, h, w) non-negative maps; each value is a (K,) float32 array."""
    maps = np.maximum(np.asarray(maps, dtype=np.float64), 0)
    k, h, w = maps.shape
    flat = maps.reshape(k, h * w)
    total = flat.sum(axis=1)
    safe = np.where(total > 0, total, 1.0)
    p = flat / safe[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    entropy = -plogp.sum(axis=1) / np.log(h * w) if h * w > 1 else np.zeros(k)
    ys = (np.arange(h) + 0.5) / h
    xs = (np.arange(w) + 0.5) / w
    p3 = p.reshape(k, h, w)
    px = p3.sum(axis=1)  # (K, w) marginal over rows
    py = p3.sum(axis=2)  # (K, h)
    cx = px @ xs
    cy = py @ ys
    aspect = h / w  # one image-height unit in image widths
    var = px @ (xs**2) - cx**2 + (py @ (ys**2) - cy**2) * aspect**2
    empty = total <= 0
    out = {
        "mass": flat.mean(axis=1),
        "peak": flat.max(axis=1),
        "entropy": np.where(empty, 0.0, entropy),
        "centroid_x": np.where(empty, np.nan, cx),
        "centroid_y": np.where(empty, np.nan, cy),
        "spread": np.where(empty, np.nan, np.sqrt(np.maximum(var, 0))),
    }
    return {name: v.astype(np.float32) for name, v in out.items()}
