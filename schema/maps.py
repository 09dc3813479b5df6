"""DAAM-style word heat maps from stored cross-attention, in numpy (no torch on the read side).

The idea (Tang et al., "What the DAAM", 2023): a word's map is its tokens' cross-attention, each
UNet resolution level upsampled to one grid and averaged, summed over denoising steps. Written here
fresh: bicubic upsampling as separable weight matrices, clamped at 0 because cubic kernels overshoot.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

CUBIC_A = -0.75  # Keys' cubic convolution constant, as in PyTorch/OpenCV bicubic resampling.


def _cubic(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    a = CUBIC_A
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


@lru_cache(maxsize=256)
def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bicubic resampling weights, half-pixel centres, borders replicated."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src).astype(int)
    frac = src - base
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    for offset in (-1, 0, 1, 2):
        idx = np.clip(base + offset, 0, n_in - 1)
        np.add.at(weights, (rows, idx), _cubic(frac - offset))
    weights.flags.writeable = False
    return weights


def upsample(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic-resize (..., h, w) maps to (..., height, width), clamped at 0."""
    h, w = maps.shape[-2:]
    if (h, w) == (height, width):
        return np.maximum(maps.astype(np.float32, copy=False), 0)
    wy = resize_matrix(h, height).astype(np.float32)
    wx = resize_matrix(w, width).astype(np.float32)
    out = wy @ maps.astype(np.float32, copy=False) @ wx.T  # (..., height, width)
    return np.maximum(out, 0, out=out)


def aggregate_levels(level_maps: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Mean over resolution levels of (..., h_l, w_l) maps, each upsampled to (height, width)."""
    if not level_maps:
        raise ValueError("no resolution levels selected")
    total = np.zeros(level_maps[0].shape[:-2] + (height, width), dtype=np.float32)
    for m in level_maps:
        total += upsample(m, height, width)
    return total / len(level_maps)


def normalize_for_display(heat: np.ndarray, mode: str = "max") -> np.ndarray:
    """Scale a map to 0-1 for display only ('max': divide by max; 'minmax': stretch the range)."""
    heat = heat.astype(np.float32)
    lo = float(heat.min()) if mode == "minmax" else 0.0
    span = float(heat.max()) - lo
    if span <= 0:
        return np.zeros_like(heat)
    return np.clip((heat - lo) / span, 0, 1)


def daam_threshold(heat: np.ndarray, fraction: float = 0.4) -> np.ndarray:
    """DAAM's binary mask: pixels at or above `fraction` of the map's maximum."""
    peak = float(heat.max())
    if peak <= 0:
        return np.zeros(heat.shape, dtype=bool)
    return heat >= fraction * peak
