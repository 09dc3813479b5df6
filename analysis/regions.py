"""Region queries on stored self-attention (the idea of DAAM-I2I, written fresh): which image
regions attend to the pixels, box or polygon you pick, and how that spreads when followed.

A self-attention matrix A has one row per query cell and one column per key cell, both row-major on
the same grid; row i is where cell i looks. Image pixels map to grid cells by scaling. Every parser
raises RegionInputError with the valid form and range, so the page can show one clear message.
"""

from __future__ import annotations

import re

import numpy as np
from shapely.geometry import Polygon
from skimage.draw import polygon2mask

Grid = tuple[int, int]
NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)"


class RegionInputError(ValueError):
    """Input a region tool can't use; the message says the valid form and range."""


def parse_indices(text: str, grid: Grid) -> list[int]:
    """Query-grid indices from text like '100, 0-1023, 0,1,2,3' (row-major, inclusive ranges)."""
    n = grid[0] * grid[1]
    form = f"use indices or ranges like '100, 0-{n - 1}, 5,6,7' (0-{n - 1} on the {grid[0]}x{grid[1]} grid)"
    parts = [p.strip() for p in (text or "").split(",")]
    if not any(parts):
        raise RegionInputError(f"no indices given: {form}")
    out: set[int] = set()
    for part in parts:
        if not part:
            continue
        m = re.fullmatch(r"([0-9]+)\s*(?:-\s*([0-9]+))?", part)
        if m is None:
            raise RegionInputError(f"'{part}' is not an index or range: {form}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise RegionInputError(f"range '{part}' runs backwards: {form}")
        if hi >= n:
            raise RegionInputError(f"index {hi} is out of range: {form}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def _numbers(text: str) -> list[float]:
    cleaned = (text or "").strip()
    if not cleaned:
        return []
    tokens = [t for t in re.split(r"[\s,]+", cleaned) if t]
    if not all(re.fullmatch(NUMBER, t) for t in tokens):
        bad = next(t for t in tokens if not re.fullmatch(NUMBER, t))
        raise RegionInputError(f"'{bad}' is not a number")
    return [float(t) for t in tokens]


def parse_bbox(text: str, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A box 'x1,y1,x2,y2' in image pixels (x1 < x2, y1 < y2, inside the width x height image)."""
    w, h = size
    form = f"write the box as x1,y1,x2,y2 with 0 <= x1 < x2 <= {w} and 0 <= y1 < y2 <= {h} (image pixels)"
    try:
        nums = _numbers(text)
    except RegionInputError as exc:
        raise RegionInputError(f"{exc}: {form}") from None
    if len(nums) != 4:
        raise RegionInputError(f"a box needs 4 numbers, got {len(nums)}: {form}")
    x1, y1, x2, y2 = nums
    if x2 <= x1 or y2 <= y1:
        raise RegionInputError(f"the box is reversed or empty: {form}")
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        raise RegionInputError(f"the box leaves the image: {form}")
    return x1, y1, x2, y2


def parse_polygon(text: str, size: tuple[int, int]) -> list[tuple[float, float]]:
    """Polygon points 'x1,y1 x2,y2 x3,y3' or 'x1 y1 x2 y2 x3 y3' in image pixels; checked simple."""
    w, h = size
    form = f"write at least 3 points as 'x1,y1 x2,y2 x3,y3' or 'x1 y1 x2 y2 x3 y3', 0-{w} by 0-{h} image pixels"
    try:
        nums = _numbers(text)
    except RegionInputError as exc:
        raise RegionInputError(f"{exc}: {form}") from None
    if len(nums) % 2:
        raise RegionInputError(f"an odd count of numbers ({len(nums)}) can't be x,y pairs: {form}")
    points = list(zip(nums[0::2], nums[1::2], strict=True))
    return validate_polygon(points, size)


def validate_polygon(points: list[tuple[float, float]], size: tuple[int, int]) -> list[tuple[float, float]]:
    """The points if they make a usable polygon inside the image, else RegionInputError."""
    w, h = size
    if len(points) < 3:
        raise RegionInputError(f"a polygon needs at least 3 points, got {len(points)}")
    if any(not (0 <= x <= w and 0 <= y <= h) for x, y in points):
        raise RegionInputError(f"every point must lie inside the {w}x{h} image")
    pts = np.asarray(points, dtype=float)
    if np.linalg.matrix_rank(pts - pts.mean(axis=0), tol=1e-9) < 2:
        raise RegionInputError("the polygon is empty (its points lie on one line)")
    poly = Polygon(points)
    if not poly.is_valid:
        raise RegionInputError("the polygon crosses itself; order the points around its edge")
    return points


def pixel_cell(x: float, y: float, size: tuple[int, int], grid: Grid) -> int:
    """The row-major grid cell holding image pixel (x, y)."""
    w, h = size
    if not (0 <= x < w and 0 <= y < h):
        raise RegionInputError(f"pixel ({x:g}, {y:g}) is outside the {w}x{h} image")
    col = min(grid[1] - 1, int(x * grid[1] / w))
    row = min(grid[0] - 1, int(y * grid[0] / h))
    return row * grid[1] + col


def bbox_cells(box: tuple[float, float, float, float], size: tuple[int, int], grid: Grid) -> list[int]:
    """Cells whose centres fall in the box; the centre's cell when the box is smaller than a cell."""
    w, h = size
    x1, y1, x2, y2 = box
    cx = (np.arange(grid[1]) + 0.5) * w / grid[1]
    cy = (np.arange(grid[0]) + 0.5) * h / grid[0]
    cols = np.flatnonzero((cx >= x1) & (cx <= x2))
    rows = np.flatnonzero((cy >= y1) & (cy <= y2))
    if len(cols) == 0 or len(rows) == 0:
        return [pixel_cell(min((x1 + x2) / 2, w - 1e-6), min((y1 + y2) / 2, h - 1e-6), size, grid)]
    return [int(r * grid[1] + c) for r in rows for c in cols]


def polygon_cells(points: list[tuple[float, float]], size: tuple[int, int], grid: Grid) -> list[int]:
    """Cells whose centres fall inside the polygon (rasterised by scikit-image on the grid)."""
    w, h = size
    # grid coordinates in which cell (r, c) has its centre at (r, c)
    rc = np.array([[y * grid[0] / h - 0.5, x * grid[1] / w - 0.5] for x, y in points])
    mask = polygon2mask(grid, rc)
    cells = np.flatnonzero(mask.reshape(-1)).tolist()
    if not cells:
        raise RegionInputError(
            f"the polygon covers no cell of the {grid[0]}x{grid[1]} grid; draw it larger "
            f"(one cell is {w / grid[1]:.0f}x{h / grid[0]:.0f} pixels)"
        )
    return cells


def region_map(matrix: np.ndarray, cells: list[int], grid: Grid) -> np.ndarray:
    """Mean of the selected query rows: where the region looks, as a (h, w) map."""
    if not cells:
        raise RegionInputError("no grid cell selected")
    return matrix[np.asarray(cells)].mean(axis=0).reshape(grid)


def diffuse(
    matrix: np.ndarray, start: int, grid: Grid, iterations: int = 10, threshold: float = 0.2
) -> list[np.ndarray]:
    """Follow self-attention from one cell: each step takes the rows' mean weighted by the current
    map, then zeroes values below `threshold` of the map's range. Returns every map, first = start."""
    if not 1 <= iterations <= 200:
        raise RegionInputError("iterations must be between 1 and 200")
    if not 0 <= threshold < 1:
        raise RegionInputError("threshold must be between 0 and 1 (a fraction of the map's range)")
    n = grid[0] * grid[1]
    if not 0 <= start < n:
        raise RegionInputError(f"start cell {start} is out of range 0-{n - 1}")
    current = np.zeros(n, dtype=np.float64)
    current[start] = 1.0
    maps = [current.reshape(grid).astype(np.float32)]
    a = matrix.astype(np.float32, copy=False)
    for _ in range(iterations):
        live = np.flatnonzero(current)  # sparsified maps touch only their non-zero rows
        nxt = (current[live].astype(np.float32) @ a[live]).astype(np.float64) / current.sum()
        lo, hi = nxt.min(), nxt.max()
        if hi > lo:
            nxt[nxt < lo + threshold * (hi - lo)] = 0.0
        current = nxt
        maps.append(current.reshape(grid).astype(np.float32))
    return maps
