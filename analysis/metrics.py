"""The overlap and threshold measures every score in StepX uses: one definition each, so the trainer's
periodic evaluation, `stepx eval`, detection and the dashboard report the same numbers."""

from __future__ import annotations

import numpy as np
from skimage.filters import threshold_otsu


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (x, y, width, height) boxes (0 when they don't overlap)."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return float(inter / (aw * ah + bw * bh - inter)) if inter > 0 else 0.0


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The (x, y, width, height) bounding box of a boolean mask; None when it is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def otsu_threshold(values: np.ndarray) -> float | None:
    """scikit-image's Otsu threshold of a map; None when the map is flat (no threshold separates anything)."""
    values = np.asarray(values, dtype=np.float64)
    if float(values.max()) == float(values.min()):
        return None
    return float(threshold_otsu(values))


def otsu_mask(heat: np.ndarray) -> np.ndarray:
    """Pixels at or above Otsu's threshold; a flat map selects everything (it carries no location)."""
    t = otsu_threshold(heat)
    return np.ones(heat.shape, dtype=bool) if t is None else heat >= t
