"""In-memory trace types: what one generation produced, before the writer turns it into Parquet.

Torch-free, so the synthetic-store generator and the writer share them with the capture code.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from schema import SCHEMA_VERSION, TABLES
from schema.maps import level_label

Grid = tuple[int, int]


@dataclass
class TokenInfo:
    """One token of the prompt as the text encoder saw it."""

    token_index: int
    token_id: int
    token_text: str
    word_index: int | None
    word: str | None
    kind: str  # 'start', 'word' or 'end'
    has_map: bool
    noun_lemma: str | None = None  # lemma when the word names an object (pipeline.nouns), else None
    noun_plural: bool | None = None  # whether that object noun is plural; None when not an object noun
    encoder: str | None = "clip"  # text encoder of the position: 'clip' or 't5'; None for the text-share pseudo-token


@dataclass
class StepRecord:
    """One denoising step as copied to the host."""

    step_index: int
    timestep: float
    cross: dict[tuple, np.ndarray]  # level key (h, w) or (h, w, 'mid') -> (tokens, h, w), (layer, head) mean
    cross_layers: dict[tuple, int]
    self_step: np.ndarray | None  # (q, k) on the step grid, layers averaged
    self_layers: int
    cross_heads: dict[tuple, int] | None = None  # heads per layer of each level; None: unknown (synthetic)
    daam: np.ndarray | None = None  # (tokens, H, W) float32 DAAM map on the latent grid (schema.maps)


@dataclass
class Trace:
    """A finished generation held in memory, ready for the trace writer."""

    run: dict
    tokens: list[TokenInfo]
    steps: list[StepRecord]
    levels: list[tuple[int, int]]
    self_aggregate: np.ndarray | None  # (q, k) float32 on the self grid
    previews: list[Image.Image]
    final: Image.Image
    max_sum_error: float = 0.0
    concepts: list[str] | None = None  # ConceptAttention concepts of a Flux run (pipeline.concepts)
    concept_maps: list[np.ndarray] | None = None  # per step: (concepts, h, w)
    concept_blocks: int = 0  # double-stream blocks averaged into each map


def run_row(
    *, size: Grid, latent: Grid, self_grid: Grid, step_grid: Grid, levels: Sequence[tuple], **columns: object
) -> dict:
    """One `runs` row for a complete run, in the table's column order: the one place a run row is built.

    Grids are (height, width) and are split into the table's `*_height`/`*_width` columns; level keys become
    their labels (`schema.maps.level_label`); `status` and `schema_version` are filled in; every other column
    of `schema.TABLES["runs"]` must be given by name.
    """
    row = {
        "architecture": "unet",  # DiT runs (pipeline.generate_dit) name 'sd3' or 'flux' and their bands' modules
        "level_modules": None,
        "source": "generate",  # stepx.record passes 'record' and the provenance of the user's pipeline
        "pipeline_class": None,
        "scheduler_config": None,
        "lora_adapters": [],
        "lora_scales": [],
        "controlnet": None,
        "strength": None,
        "init_image_sha256": None,
        **columns,
        "status": "complete",
        "schema_version": SCHEMA_VERSION,
        "height": size[0],
        "width": size[1],
        "latent_height": latent[0],
        "latent_width": latent[1],
        "self_grid_height": self_grid[0],
        "self_grid_width": self_grid[1],
        "step_grid_height": step_grid[0],
        "step_grid_width": step_grid[1],
        "levels": [level_label(key) for key in levels],
    }
    names = TABLES["runs"].names
    missing, extra = set(names) - row.keys(), row.keys() - set(names)
    if missing or extra:
        raise TypeError(f"run row: missing columns {sorted(missing)}, unknown columns {sorted(extra)}")
    return {name: row[name] for name in names}


def encode_image(img: Image.Image, fmt: str) -> bytes:
    """PNG (lossless) or WebP (quality 85) bytes of an image."""
    buf = io.BytesIO()
    if fmt == "webp":
        img.save(buf, format="WEBP", quality=85, method=4)
    else:
        img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
