"""Depth for a stored run: its final image is read through the store (which checks the run id against the
index), the estimator lives in `pipeline.depth`, and the map is written beside the run."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from pipeline.depth import DepthModel, estimate_depth, write_depth
from store import Store


def depth_for_run(root: Path, run_id: str, depth: DepthModel) -> Path:
    """Estimate and store the depth of a stored run's final image."""
    data, _ = Store(root).image(run_id)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return write_depth(root, run_id, estimate_depth(depth, image), depth.model_id, depth.spec.kind)
