"""Text-guided detection: a word's cross-attention map steers self-attention to a sharper object
map, which is thresholded into regions with polygons and boxes (scikit-image for Otsu and contours).

guided = sum_i w_i * A[i] / sum_i w_i, where w is the word map on the self-attention grid and A[i]
is where cell i looks: the cells the word's strongest cells attend to, i.e. the object they belong to.

Which map to detect on by default is measured, not assumed: `DEFAULT_METHOD` is the method that scored
the higher mask IoU against the drawn objects on the embedded model's test split (`stepx eval`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from skimage.measure import approximate_polygon, find_contours, label, regionprops

from analysis.metrics import box_iou, otsu_threshold
from schema.maps import upsample

DAAM_ALONE = "DAAM alone"
GUIDED = "DAAM + self-attention"
METHODS = (DAAM_ALONE, GUIDED)
# The method callers use unless told otherwise (stepx annotate, TITAN, the dashboard's detect page). Measured
# with `stepx eval --split test --seeds 5 --n 30` (150 images, 300 shape nouns, DAAM's word maps): top-region mask
# IoU against the drawn object 0.670 (95% interval 0.639-0.697) for DAAM alone vs 0.536 (0.488-0.585) with
# self-attention, and 1.01 regions per shape word vs 1.74.
DEFAULT_METHOD = DAAM_ALONE
GUIDED_BY_DEFAULT = DEFAULT_METHOD == GUIDED


@dataclass
class Detection:
    """One detected region, in image pixels."""

    label: str
    bbox: tuple[float, float, float, float]  # x, y, width, height
    polygon: list[tuple[float, float]]
    area: float
    score: float  # mean normalised map value inside the region
    mask: np.ndarray = field(repr=False)  # (height, width) bool at image size


def resample(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a map: block means for integer downsampling, bicubic (clamped) otherwise."""
    h, w = m.shape
    if (h, w) == shape:
        return m.astype(np.float32)
    if h % shape[0] == 0 and w % shape[1] == 0:
        fh, fw = h // shape[0], w // shape[1]
        return m.reshape(shape[0], fh, shape[1], fw).mean(axis=(1, 3)).astype(np.float32)
    return upsample(m, *shape)


def guided_map(word_map: np.ndarray, matrix: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Self-attention rows averaged with the word map's weights, on the self-attention grid."""
    weights = np.maximum(resample(word_map, grid).reshape(-1), 0)
    if weights.sum() <= 0:
        return np.zeros(grid, dtype=np.float32)
    return (weights @ matrix / weights.sum()).reshape(grid).astype(np.float32)


def threshold_value(norm: np.ndarray, threshold: str | float = "otsu") -> float:
    """Otsu's threshold of a 0-1 map, or a manual fraction of its maximum."""
    if threshold == "otsu":
        t = otsu_threshold(norm)
        return 1.0 if t is None else t
    value = float(threshold)
    if not 0 < value < 1:
        raise ValueError("a manual threshold is a fraction of the maximum between 0 and 1")
    return value


def detect(
    heat: np.ndarray,
    label_text: str,
    image_size: tuple[int, int],
    threshold: str | float = "otsu",
    min_area_frac: float = 0.005,
    merge_iou: float = 0.1,
) -> list[Detection]:
    """Regions of a map above the threshold, as polygons and boxes at image size (width, height)."""
    w, h = image_size
    big = upsample(heat.astype(np.float32), h, w)
    peak = float(big.max())
    if peak <= 0:
        return []
    norm = big / peak
    t = threshold_value(norm, threshold)
    mask = norm >= t
    regions = [r for r in regionprops(label(mask)) if r.area >= min_area_frac * w * h]
    boxes = [(r.bbox[1], r.bbox[0], r.bbox[3] - r.bbox[1], r.bbox[2] - r.bbox[0]) for r in regions]
    groups = _merge(boxes, merge_iou)
    out = []
    for members in groups:
        region_mask = np.zeros_like(mask)
        for i in members:
            region_mask[regions[i].coords[:, 0], regions[i].coords[:, 1]] = True
        ys, xs = np.nonzero(region_mask)
        bbox = (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))
        out.append(
            Detection(
                label_text,
                bbox,
                mask_polygon(region_mask),
                float(region_mask.sum()),
                float(norm[region_mask].mean()),
                region_mask,
            )
        )
    return sorted(out, key=lambda d: -d.area)


def _merge(boxes: list[tuple], merge_iou: float) -> list[list[int]]:
    """Groups of boxes that overlap by more than merge_iou (transitively)."""
    parent = list(range(len(boxes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if box_iou(boxes[i], boxes[j]) > merge_iou:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(boxes)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def mask_polygon(mask: np.ndarray, tolerance: float = 1.0) -> list[tuple[float, float]]:
    """The outline of a mask's largest contour as (x, y) image points, simplified."""
    padded = np.pad(mask.astype(np.float32), 1)
    contours = find_contours(padded, 0.5)
    if not contours:
        return []
    longest = max(contours, key=len) - 1  # undo the padding; (row, col)
    simple = approximate_polygon(longest, tolerance)
    h, w = mask.shape
    return [(float(np.clip(c, 0, w)), float(np.clip(r, 0, h))) for r, c in simple[:-1]]
