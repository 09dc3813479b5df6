"""Word heat maps from stored cross-attention, in numpy (no torch on the read side).

The default word map is DAAM's (Tang et al., "What the DAAM", 2023): every cross-attention
(layer, head) map of the UNet's down and up blocks (mid block left out), upsampled straight to the
latent grid with bicubic interpolation, clamped at 0, averaged over all (layer, head) maps (a level
weighs by its layers x heads), the word's tokens averaged, and the chosen steps summed. The capture
computes that map per step and token on the device and stores it as level 'all'; the other
aggregations below are rebuilt here from the stored per-level maps and are not DAAM.

`upsample` is the project's one bicubic resampler: PyTorch's (a = -0.75, half-pixel centres,
`align_corners=False`, borders replicated), written as separable weight matrices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

CUBIC_A = -0.75  # Keys' cubic convolution constant, as in PyTorch/OpenCV bicubic resampling.
ALL = "all"  # level label of the stored DAAM map (cross_attention) and of its statistics (word_step_stats)
MID_PREFIX = "mid-"  # level label of the UNet mid block's layers: 'mid-4x4'

# A level key as the capture produces it: (h, w) for down/up-block layers, (h, w, 'mid') for the mid block,
# (h, w, 'band', label, order) for a DiT block band (pipeline.capture_dit).
LevelKey = tuple
BAND = "band"


def halve(grid: tuple[int, int], times: int) -> tuple[int, int]:
    """The grid after `times` stride-2 downsamplings (ceil, as UNet convs with padding 1 do)."""
    h, w = grid
    for _ in range(times):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def level_label(key: LevelKey) -> str:
    """'HxW' for a down/up-block level, 'mid-HxW' for the mid block's layers, the band's name for a DiT band."""
    if len(key) > 3 and key[2] == BAND:
        return key[3]
    base = f"{key[0]}x{key[1]}"
    return MID_PREFIX + base if len(key) > 2 and key[2] == "mid" else base


def is_mid(label: str) -> bool:
    """Whether a level label names the UNet mid block (left out of DAAM)."""
    return label.startswith(MID_PREFIX)


def level_order(key: LevelKey) -> tuple:
    """Sort key: finest grid first, the mid block after a down/up level of the same size; DiT bands in block order."""
    if len(key) > 4 and key[2] == BAND:
        return (-key[0] * key[1], True, key[4])
    return (-key[0] * key[1], len(key) > 2)


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


def upsample(maps: np.ndarray, height: int, width: int, clamp: bool = True) -> np.ndarray:
    """Bicubic-resize (..., h, w) maps to (..., height, width) as torch does; clamped at 0 unless asked not to."""
    h, w = maps.shape[-2:]
    if (h, w) == (height, width):
        out = maps.astype(np.float32, copy=True)
    else:
        wy = resize_matrix(h, height).astype(np.float32)
        wx = resize_matrix(w, width).astype(np.float32)
        out = wy @ maps.astype(np.float32, copy=False) @ wx.T  # (..., height, width)
    return np.maximum(out, 0, out=out) if clamp else out


@dataclass(frozen=True)
class Aggregation:
    """A named way of combining stored maps into one word map, with the label a picker shows."""

    name: str
    label: str
    daam: bool  # True only for DAAM's own formula
    help: str


AGGREGATIONS: dict[str, Aggregation] = {
    a.name: a
    for a in [
        Aggregation(
            "daam",
            "DAAM (default)",
            True,
            "Down and up blocks; every (layer, head) map upsampled to the latent grid, clamped at 0, averaged.",
        ),
        Aggregation(
            "daam_with_mid",
            "Layers x heads, mid block included (not DAAM)",
            False,
            "All levels including the mid block, weighted by layers x heads; the mean is clamped, not each head.",
        ),
        Aggregation(
            "equal_levels",
            "Levels weigh equally (not DAAM)",
            False,
            "Each stored level (mid block included) upsampled and averaged with equal weight, then clamped.",
        ),
        Aggregation(
            "levels",
            "Chosen levels only (not DAAM)",
            False,
            "Only the levels you pick, weighted by layers x heads, clamped after averaging.",
        ),
    ]
}
DEFAULT_AGGREGATION = "daam"


def check_aggregation(name: str, levels: list[str] | None) -> Aggregation:
    """The named aggregation; ValueError with the choices for an unknown name or a bad level choice."""
    agg = AGGREGATIONS.get(name)
    if agg is None:
        raise ValueError(f"unknown aggregation {name!r}; choose from {', '.join(AGGREGATIONS)}")
    if name == "levels" and not levels:
        raise ValueError("aggregation 'levels' needs the levels to combine, e.g. levels=['16x16']")
    if name != "levels" and levels:
        raise ValueError(f"levels are chosen with aggregation='levels', not {name!r}")
    return agg


def level_weights(name: str, counts: Mapping[str, int], levels: list[str] | None = None) -> dict[str, float]:
    """Weight of each stored level under an aggregation; `counts` is layers x heads per level label."""
    if name == "equal_levels":
        return dict.fromkeys(counts, 1.0)
    if name == "daam_with_mid":
        return {k: float(n) for k, n in counts.items()}
    if name == "daam":
        return {k: float(n) for k, n in counts.items() if not is_mid(k)}
    if name == "levels":
        missing = [lv for lv in levels or [] if lv not in counts]
        if missing:
            raise ValueError(f"no level {', '.join(missing)}; this run has {', '.join(counts)}")
        return {k: float(counts[k]) for k in levels}
    raise ValueError(f"unknown aggregation {name!r}")


def combine_levels(
    level_maps: Mapping[str, np.ndarray], weights: Mapping[str, float], height: int, width: int
) -> np.ndarray:
    """Weighted mean of (..., h_l, w_l) level maps upsampled to (height, width), clamped at 0 after averaging."""
    chosen = [k for k in level_maps if weights.get(k, 0) > 0]
    if not chosen:
        raise ValueError("no resolution levels selected")
    total = sum(weights[k] for k in chosen)
    out = None
    for k in chosen:
        part = upsample(level_maps[k], height, width, clamp=False) * np.float32(weights[k] / total)
        out = part if out is None else out + part
    return np.maximum(out, 0, out=out)


def aggregate_levels(level_maps: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Equal-weight mean of (..., h_l, w_l) level maps upsampled to (height, width) (not DAAM)."""
    return combine_levels(dict(enumerate(level_maps)), dict.fromkeys(range(len(level_maps)), 1.0), height, width)


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
