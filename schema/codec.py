"""The uint8 row codec of stored self-attention matrices: one encoder for the writer, one decoder for the reader.

Each row (one query cell's distribution over key cells) is scaled by its own maximum, so the largest
probability of every row is exact and the rest are within 1/510 of the row maximum.
"""

from __future__ import annotations

import numpy as np


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
