"""Judge a generated shapes image against the objects its prompt asks for (numpy only).

Pixels are classified to the nearest palette hue when saturated and bright enough; pixels of one
colour are split into 4-connected components; a component's region is the named position whose
anchor lies nearest its centroid. Per requested object the check reports

- present: some coloured component (any colour) sits in the named region (anywhere if unnamed),
- colour_ok: a component of the requested colour exists,
- region_ok: a component of the requested colour sits in the named region,
- correct: all three,

- shape_ok: that component's shape, told by how much of its bounding box it fills (square ~1,
  circle ~0.79, triangle ~0.5), is the requested one,

plus the predicted mask (the requested colour's components in the named region, else its
largest component, else the largest component of any colour in the region) for IoU.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from shapes.scenes import ANCHORS, IMAGE_SIZE, PALETTE, ObjectSpec

MIN_SATURATION = 0.35
MIN_VALUE = 0.25
MAX_HUE_DISTANCE = 40.0  # degrees
MIN_AREA_FRACTION = 20 / (64 * 64)


@dataclass
class Component:
    """A connected run of pixels of one palette colour."""

    colour: str
    mask: np.ndarray = field(repr=False)
    area: int
    centroid: tuple[float, float]  # (x, y) in pixels
    region: str

    @property
    def shape(self) -> str:
        """circle, square or triangle, from the fraction of its bounding box it fills."""
        ys, xs = np.nonzero(self.mask)
        fill = self.area / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
        return "triangle" if fill < 0.66 else ("circle" if fill < 0.88 else "square")


@dataclass
class ObjectCheck:
    """The verdict for one requested object."""

    spec: ObjectSpec
    present: bool
    colour_ok: bool
    region_ok: bool
    mask: np.ndarray = field(repr=False)
    shape_ok: bool = False

    @property
    def correct_shape(self) -> bool:
        """Correct and of the requested shape."""
        return self.correct and self.shape_ok

    @property
    def correct(self) -> bool:
        """Present, of the right colour, in the right region."""
        return self.present and self.colour_ok and self.region_ok


def _hue_saturation_value(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb = image[..., :3].astype(np.float64) / 255.0
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    saturation = np.where(value > 0, chroma / np.maximum(value, 1e-9), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(chroma, 1e-9)
    hue = np.where(
        value == r,
        ((g - b) / safe) % 6.0,
        np.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    return hue * 60.0, saturation, value


_PALETTE_NAMES = list(PALETTE)
_PALETTE_HUES = _hue_saturation_value(np.array([list(PALETTE.values())], dtype=np.uint8))[0][0]


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Palette index per pixel (order of `PALETTE`), -1 for background or unclear pixels."""
    hue, saturation, value = _hue_saturation_value(image)
    diff = np.abs(hue[..., None] - _PALETTE_HUES[None, None, :])
    diff = np.minimum(diff, 360.0 - diff)
    nearest = diff.argmin(axis=-1)
    ok = (saturation >= MIN_SATURATION) & (value >= MIN_VALUE) & (diff.min(axis=-1) <= MAX_HUE_DISTANCE)
    return np.where(ok, nearest, -1)


def region_of(x: float, y: float, size: int) -> str:
    """The named position whose anchor is nearest to (x, y) on a size x size image."""
    scale = size / IMAGE_SIZE
    return min(ANCHORS, key=lambda p: (ANCHORS[p][0] * scale - x) ** 2 + (ANCHORS[p][1] * scale - y) ** 2)


def _label(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as boolean masks."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for sy, sx in zip(*np.nonzero(mask), strict=True):
        if seen[sy, sx]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        queue = deque([(sy, sx)])
        seen[sy, sx] = True
        while queue:
            y, x = queue.popleft()
            comp[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(comp)
    return out


def find_components(image: np.ndarray, min_area: int | None = None) -> list[Component]:
    """Coloured components of at least min_area pixels (default scales 20 px at 64 x 64)."""
    h, w = image.shape[:2]
    if min_area is None:
        min_area = max(1, round(MIN_AREA_FRACTION * h * w))
    labels = classify_pixels(image)
    comps = []
    for idx, name in enumerate(_PALETTE_NAMES):
        for comp in _label(labels == idx):
            area = int(comp.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(comp)
            cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
            comps.append(Component(name, comp, area, (cx, cy), region_of(cx, cy, max(h, w))))
    return comps


def check_objects(image: np.ndarray, objects: list[ObjectSpec], min_area: int | None = None) -> list[ObjectCheck]:
    """Per requested object: present, right colour, right region, and a predicted mask."""
    comps = find_components(image, min_area)
    empty = np.zeros(image.shape[:2], dtype=bool)
    checks = []
    for spec in objects:

        def in_region(c: Component, spec: ObjectSpec = spec) -> bool:
            return spec.position is None or c.region == spec.position

        same = [c for c in comps if c.colour == spec.colour]
        placed = [c for c in same if in_region(c)]
        anywhere = [c for c in comps if in_region(c)]
        if placed:
            mask = np.logical_or.reduce([c.mask for c in placed])
        elif same:
            mask = max(same, key=lambda c: c.area).mask
        elif anywhere:
            mask = max(anywhere, key=lambda c: c.area).mask
        else:
            mask = empty
        shape_ok = any(c.shape == spec.shape for c in placed)
        checks.append(ObjectCheck(spec, bool(anywhere), bool(same), bool(placed), mask.copy(), shape_ok))
    return checks


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


__all__ = ["Component", "ObjectCheck", "check_objects", "classify_pixels", "find_components", "iou", "region_of"]
