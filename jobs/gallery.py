"""Build a curated gallery from a spec in data/gallery/ (prompts, seeds, tags) into a store.

    stepx gallery build [--spec data/gallery/curated.json] [--model NAME]

Runs already in the store (same gallery, prompt, seed, model) are skipped, so building twice is cheap.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.models import DATA_DIR, default_model_name, get_spec, load_model, locate
from store import Store

DEFAULT_SPEC = DATA_DIR / "gallery" / "curated.json"


@dataclass
class GalleryItem:
    prompt: str
    seed: int
    tags: list[str]


def load_spec(path: Path = DEFAULT_SPEC) -> tuple[dict, list[GalleryItem]]:
    """The spec's settings and its (prompt, seed, tags) items."""
    spec = json.loads(Path(path).read_text())
    items = [
        GalleryItem(e["prompt"], int(seed), list(e.get("tags", [])))
        for e in spec["entries"]
        for seed in e.get("seeds", [0])
    ]
    return spec, items


def build_gallery(
    root: Path,
    spec_path: Path = DEFAULT_SPEC,
    model_name: str | None = None,
    on_run: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Generate the spec's missing runs into the store; returns counts."""
    from pipeline.generate import GenerationConfig, generate_trace
    from pipeline.trace_writer import write_trace

    spec, items = load_spec(spec_path)
    name = model_name or spec.get("model") or default_model_name()
    if model_name is None and locate(get_spec(name)) is None and get_spec(name).builtin in (None, "embedded"):
        name = default_model_name()
    done = {(r["prompt"], r["seed"]) for r in Store(root).runs(gallery=spec["name"], model=name)}
    todo = [it for it in items if (it.prompt, it.seed) not in done]
    if todo:
        model = load_model(name)
        for i, item in enumerate(todo, 1):
            config = GenerationConfig(
                item.prompt, seed=item.seed, steps=spec.get("steps"), tags=item.tags, gallery=spec["name"]
            )
            run_id = write_trace(root, generate_trace(model, config)).run_id
            if on_run:
                on_run(i, len(todo), run_id)
    return {"gallery": spec["name"], "model": name, "runs": len(items), "generated": len(todo)}
