"""The codecs of stored attention: one encoder for the writer, one decoder for the reader, per kind of data.

Self-attention rows (uint8): each row (one query cell's distribution over key cells) is scaled by its own
maximum, so the largest probability of every row is exact and the rest are within 1/510 of the row maximum.

DAAM maps (uint16, schema 1.8): each map is scaled by its own maximum, value = code / 65535 * scale, so the
peak is exact and every value is within 0.5/65535 (~7.6e-6) of the map's maximum, plus float32 rounding.
"""

from __future__ import annotations

import numpy as np

MAP_CODE_MAX = 65535  # the largest uint16 code: value = code / MAP_CODE_MAX * scale


def encode_rows(matrix: np.ndarray) -> tuple[np.ndarray, bytes]:
    """(row maxima float32, row-major uint8 bytes) of a (q, k) matrix, negatives clamped: value = byte/255 * row max."""
    m = np.maximum(np.asarray(matrix, dtype=np.float32), 0)
    scale = m.max(axis=1)
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.rint(m / safe[:, None] * 255).astype(np.uint8)
    return scale.astype(np.float32), codes.tobytes()


def decode_rows(scale: np.ndarray, data: bytes | memoryview, shape: tuple[int, int]) -> np.ndarray:
    """Float32 (q, k) matrix from `encode_rows`' row maxima and bytes."""
    codes = np.frombuffer(data, dtype=np.uint8, count=shape[0] * shape[1]).reshape(shape).astype(np.float32)
    return codes * (np.asarray(scale, dtype=np.float32)[:, None] / 255.0)


def encode_maps(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scales float32 (n,), codes uint16 (n, pixels)) of n maps given as (n, pixels), negatives clamped to 0.

    A map's scale is its maximum (0 for an all-zero map, whose codes are all 0). A map holding NaN or inf
    gets scale NaN and codes 0, so it reads back as all NaN rather than as numbers it never held.
    """
    m = np.maximum(np.asarray(maps, dtype=np.float32), 0).astype(np.float64)
    if m.ndim != 2:
        raise ValueError(f"encode_maps takes (maps, pixels), got shape {m.shape}")
    finite = np.isfinite(m).all(axis=1)
    m[~finite] = 0
    scale = m.max(axis=1, initial=0.0)
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.rint(m / safe[:, None] * MAP_CODE_MAX).astype(np.uint16)
    return np.where(finite, scale, np.nan).astype(np.float32), codes


def decode_maps(scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Float32 (n, pixels) maps from `encode_maps`' scales and codes: (code * scale) / 65535, exact at the peak.

    Computed in float64 in that order (as the SQL view `daam_maps` does), so a code of 65535 gives the scale.
    """
    c = np.asarray(codes, dtype=np.float64)
    s = np.asarray(scales, dtype=np.float32).astype(np.float64)
    return (c * s[:, None] / MAP_CODE_MAX).astype(np.float32)
