"""Probes for a stored run (`stepx probe`, the queue's 'probe' jobs): the run and its final image are read through
the store, the re-run and the side computation live in `pipeline.probe`, and the maps are written beside the run.

A probe word with an optimised token in the model's `probe_tokens.safetensors` (`pipeline.probe_tokens`) uses
it unless `plain`; tokens fitted to other weights are left unused, with a note saying so."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.models import get_spec, load_model, locate
from pipeline.probe import ProbeRefused, check_reproducible, compute_probes, probe_table, stored_config, write_probes
from pipeline.probe_tokens import TOKENS_FILE, Example, ProbeTokens, ProbeTokensError, record_queries
from store import Store


def _tiny_seed(run: dict) -> int:
    """The seed an in-process model of the run was built with (0 for others)."""
    seed = run["model_id"].rsplit(":seed", 1)
    return int(seed[1]) if run["model_id"].startswith("in-process:") and len(seed) == 2 else 0


@dataclass
class ProbeOutcome:
    """Where the maps went, how each probe text was embedded ('encoded' / 'optimised'), and any note."""

    path: Path
    embeddings: dict[str, str]
    notes: list[str] = field(default_factory=list)


def probe_run(
    root: Path,
    run_id: str,
    words: list[str],
    device: str | None = None,
    model_path: str | None = None,
    plain: bool = False,
    tokens_path: Path | None = None,
) -> ProbeOutcome:
    """Re-run a stored run with probes for `words` (ProbeRefused unless it reproduces) and store their maps.

    Optimised tokens come from `tokens_path` (ProbeTokensError when unusable) or else the model folder's tokens
    file (skipped with a note when fitted to other weights); `plain` uses none."""
    store = Store(root)
    run = store.run(run_id)
    data, _fmt = store.image(run_id)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    model = load_model(run["model_name"], model_path, device or run["device"], tiny_seed=_tiny_seed(run))
    notes: list[str] = []
    optimised = None
    if not plain:
        if tokens_path is not None:
            optimised = ProbeTokens.load(tokens_path).for_model(model)
        else:
            folder = locate(get_spec(run["model_name"]), model_path)
            path = None if folder is None else folder / TOKENS_FILE
            if path is not None and path.is_file():
                try:
                    optimised = ProbeTokens.load(path).for_model(model)
                except ProbeTokensError as exc:
                    notes.append(f"{path.name} not used: {exc}")
    result, _final = compute_probes(model, run, stored, words, optimised)
    path = write_probes(root, run_id, probe_table(run_id, result))
    return ProbeOutcome(path, dict(zip(result.texts, result.embeddings or [], strict=True)), notes)


def annotated_runs(root: Path, masks: dict[str, dict[str, np.ndarray]], device: str | None = None) -> list[Example]:
    """Examples for `pipeline.probe_tokens.optimise_tokens` from stored runs: run id -> {word: boolean mask}.

    Each run is re-generated from its stored config with its queries kept (ProbeRefused unless the final image is
    the stored one bit for bit); a mask of any size is resized to the run's latent grid (share of each cell covered).
    """
    store = Store(root)
    examples, models = [], {}
    for run_id, by_word in masks.items():
        run = store.run(run_id)
        data, _fmt = store.image(run_id)
        stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        key = (run["model_name"], device or run["device"], _tiny_seed(run))
        if key not in models:
            models[key] = load_model(key[0], None, key[1], tiny_seed=key[2])
        model = models[key]
        check_reproducible(model, run)
        queries = record_queries(model, stored_config(run))
        if not np.array_equal(queries.image, stored):
            raise ProbeRefused(f"the re-run doesn't reproduce run {run_id}'s final image: no example from it")
        grid = queries.latent
        resized = {}
        for word, mask in by_word.items():
            img = Image.fromarray(np.asarray(mask, dtype=np.float32), mode="F").resize(grid[::-1], Image.BOX)
            resized[word] = np.clip(np.asarray(img, dtype=np.float32), 0, 1)
        examples.append(Example(queries, resized, f"run {run_id}"))
    return examples
