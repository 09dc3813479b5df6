"""Probes for a stored run (`stepx probe`, the queue's 'probe' jobs): the run and its final image are read through
the store, the re-run and the side computation live in `pipeline.probe`, and the maps are written beside the run."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.models import load_model
from pipeline.probe import compute_probes, probe_table, write_probes
from store import Store


def probe_run(
    root: Path, run_id: str, words: list[str], device: str | None = None, model_path: str | None = None
) -> Path:
    """Re-run a stored run with probes for `words` (ProbeRefused unless it reproduces) and store their maps."""
    store = Store(root)
    run = store.run(run_id)
    data, _fmt = store.image(run_id)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    seed = run["model_id"].rsplit(":seed", 1)
    tiny_seed = int(seed[1]) if run["model_id"].startswith("in-process:") and len(seed) == 2 else 0
    model = load_model(run["model_name"], model_path, device or run["device"], tiny_seed=tiny_seed)
    result, _final = compute_probes(model, run, stored, words)
    return write_probes(root, run_id, probe_table(run_id, result))
