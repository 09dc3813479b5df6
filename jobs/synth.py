"""Synthetic stores: realistic-looking traces written without running a model, to test scale.

    stepx synth --runs 1000 --store /tmp/big-store

Each run gets a scene-like prompt; word maps are Gaussian blobs that sharpen over the steps plus
noise, self-attention rows are local kernels plus noise, previews are blurred blobs. Files go
through the real trace writer; the index is updated once at the end. Torch-free.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.index import update_index
from pipeline.trace import StepRecord, TokenInfo, Trace, run_row
from pipeline.trace_writer import build_tables, write_tables

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
PLACES = {"left": (0.5, 0.22), "right": (0.5, 0.78), "top": (0.22, 0.5), "bottom": (0.78, 0.5), "center": (0.5, 0.5)}

GEOMETRIES = {
    # name: image px, latent grid, cross levels, self grid, step grid, preview px
    "shapes": (64, (16, 16), [(16, 16), (8, 8)], (16, 16), (16, 16), 64),
    "sd15": (512, (64, 64), [(64, 64), (32, 32), (16, 16), (8, 8)], (32, 32), (16, 16), 256),
}


def _prompt(rng: np.random.Generator, n_words: int | None) -> tuple[list[str], list[tuple[float, float] | None]]:
    """Words of a scene prompt and, per word, the centre of the object it belongs to."""
    words: list[str] = []
    centres: list[tuple[float, float] | None] = []
    n_obj = int(rng.integers(1, 4))
    for k in range(n_obj):
        place = str(rng.choice(list(PLACES)))
        c = PLACES[place]
        phrase = ["a", str(rng.choice(COLOURS)), str(rng.choice(SHAPES)), "on", "the", place]
        if k:
            phrase = ["and"] + phrase
        words += phrase
        centres += [None if w in ("a", "on", "the", "and") else c for w in phrase]
    if n_words is not None:
        while len(words) < n_words:
            words.append("detailed")
            centres.append((0.5, 0.5))
        words, centres = words[:n_words], centres[:n_words]
    return words, centres


def _blob(grid: tuple[int, int], centre: tuple[float, float], sigma: float) -> np.ndarray:
    ys = (np.arange(grid[0]) + 0.5) / grid[0]
    xs = (np.arange(grid[1]) + 0.5) / grid[1]
    return np.exp(-((ys[:, None] - centre[0]) ** 2 + (xs[None, :] - centre[1]) ** 2) / (2 * sigma**2))


def _self_matrix(rng: np.random.Generator, grid: tuple[int, int], sigma: float) -> np.ndarray:
    ys, xs = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    d2 = (ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2
    m = np.exp(-d2 / (2 * (sigma * grid[1]) ** 2)) + 0.002 * rng.random((len(ys), len(ys)))
    return (m / m.sum(axis=1, keepdims=True)).astype(np.float32)


def synth_trace(
    rng: np.random.Generator,
    created: datetime,
    geometry: str = "shapes",
    steps: int = 20,
    n_words: int | None = None,
) -> Trace:
    """One synthetic trace of the given geometry."""
    px, latent, levels, self_grid, step_grid, preview_px = GEOMETRIES[geometry]
    words, centres = _prompt(rng, n_words)
    tokens = [TokenInfo(0, 49406, "<start>", None, None, "start", False)]
    tokens += [
        TokenInfo(i + 1, 1000 + i, w, i, w, "word", True, w if w in SHAPES else None, False if w in SHAPES else None)
        for i, w in enumerate(words)
    ]  # shape words are the scene's object nouns, known by construction (no tagger needed)
    tokens.append(TokenInfo(len(words) + 1, 49407, "<end>", None, None, "end", True))
    records = []
    for s in range(steps):
        sharp = 0.35 - 0.25 * s / max(1, steps - 1)
        cross = {}
        for grid in levels:
            maps = []
            for c in centres + [(0.5, 0.5)]:
                base = _blob(grid, c, sharp) if c is not None else np.full(grid, 0.3)
                maps.append(base + 0.3 * rng.random(grid))
            arr = np.stack(maps)
            arr = arr / (arr.sum(axis=0, keepdims=True) * rng.uniform(1.2, 2.0))  # rest goes to <start>
            cross[grid] = arr.astype(np.float32)
        self_step = _self_matrix(rng, step_grid, 0.05 + 0.1 * sharp)
        records.append(StepRecord(s, 999.0 * (1 - s / steps), cross, dict.fromkeys(levels, 2), self_step, 4))
    tint = rng.integers(0, 255, size=3)
    preview = [
        Image.fromarray(
            (
                np.clip(
                    _blob((preview_px, preview_px), (0.5, 0.5), 0.3)[..., None] * tint
                    + 20 * rng.random((preview_px, preview_px, 1)),
                    0,
                    255,
                )
            ).astype(np.uint8)
        )
        for _ in range(steps)
    ]
    final = preview[-1].resize((px, px))
    run_id = created.strftime("%Y%m%d-%H%M%S-") + f"{rng.integers(0, 16**6):06x}"
    run = run_row(
        run_id=run_id,
        created_at=created,
        prompt=" ".join(words),
        negative_prompt="",
        seed=int(rng.integers(0, 2**31)),
        steps=steps,
        guidance=3.0,
        scheduler="synthetic",
        size=(px, px),
        latent=latent,
        self_grid=self_grid,
        step_grid=step_grid,
        levels=levels,
        model_name=f"synthetic-{geometry}",
        model_id="synthetic",
        model_fingerprint="0" * 16,
        torch_version="",
        diffusers_version="",
        stepx_version="synthetic",
        device="none",
        dtype="float32",
        prompt_truncated=False,
        denoise_ms=0.0,
        preview_ms=0.0,
        total_ms=0.0,
        tags=["synthetic"],
        gallery="synthetic",
        config_json="{}",
    )
    return Trace(run, tokens, records, levels, _self_matrix(rng, self_grid, 0.08), preview, final)


def synth_store(root: Path, runs: int, steps: int = 20, geometry: str = "shapes", seed: int = 0) -> dict:
    """Write `runs` synthetic runs into a store and index them once; returns counts and timings."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    start = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=int(rng.integers(0, 300)))
    total = 0
    for i in range(runs):
        trace = synth_trace(rng, start + timedelta(seconds=i), geometry, steps)
        total += write_tables(root, trace.run["run_id"], build_tables(trace), steps, index=False).bytes
    t1 = time.perf_counter()
    update_index(root)
    return {
        "runs": runs,
        "bytes": total,
        "write_s": round(t1 - t0, 2),
        "index_s": round(time.perf_counter() - t1, 2),
    }
