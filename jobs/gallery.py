"""Build a curated gallery from a spec in data/gallery/ (prompts, seeds, tags) into a store.

    stepx gallery build [--spec data/gallery/curated.json] [--model NAME]

Runs already in the store (same gallery, prompt, seed, model) are skipped, so building twice is cheap.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.models import DATA_DIR, default_model_name, get_spec, load_model, locate
from schema.layout import gallery_progress_path
from schema.limits import LimitError, check_generation, check_prompt, check_value
from store import Store

DEFAULT_SPEC = DATA_DIR / "gallery" / "curated.json"


@dataclass
class GalleryItem:
    prompt: str
    seed: int
    tags: list[str]


class SpecError(ValueError):
    """A gallery spec file that can't be used, with a one-line reason naming the file."""


def load_spec(path: Path = DEFAULT_SPEC) -> tuple[dict, list[GalleryItem]]:
    """The spec's settings and its (prompt, seed, tags) items; SpecError for anything malformed."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"cannot read the gallery spec {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SpecError(f"the gallery spec {path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"the gallery spec {path} is not JSON: {exc.msg} (line {exc.lineno})") from None
    except RecursionError:
        raise SpecError(f"the gallery spec {path} is nested too deeply to be a spec") from None

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise SpecError(f"the gallery spec {path}: {what}")

    need(isinstance(spec, dict), "expected a JSON object with 'name' and 'entries'")
    need(isinstance(spec.get("name"), str) and spec["name"].strip() != "", "'name' must be non-empty text")
    need(spec.get("model") is None or isinstance(spec["model"], str), "'model' must be a registry name")
    need(isinstance(spec.get("entries"), list) and spec["entries"] != [], "'entries' must be a non-empty list")
    items = []
    for n, e in enumerate(spec["entries"], 1):
        need(isinstance(e, dict), f"entry {n} is not an object")
        need(isinstance(e.get("prompt"), str), f"entry {n} has no text 'prompt'")
        seeds, tags = e.get("seeds", [0]), e.get("tags", [])
        need(isinstance(seeds, list) and seeds != [], f"entry {n}: 'seeds' must be a non-empty list")
        need(isinstance(tags, list) and all(isinstance(t, str) for t in tags), f"entry {n}: 'tags' must be text")
        try:
            check_prompt(e["prompt"])
            check_generation(spec.get("model"), steps=spec.get("steps"))
            for seed in seeds:
                check_value("seed", seed)
        except LimitError as exc:
            raise SpecError(f"the gallery spec {path}, entry {n}: {exc}") from None
        items += [GalleryItem(e["prompt"], int(seed), list(tags)) for seed in seeds]
    return spec, items


class Progress:
    """The build's progress as a small JSON file in the store, rewritten atomically after each run, so the
    dashboard's Gallery page (started first by `make demo`) can show how far the build is."""

    def __init__(self, root: Path, gallery: str, model: str, total: int, already: int) -> None:
        self.path = gallery_progress_path(root)
        self.state = {
            "gallery": gallery,
            "model": model,
            "total": total,
            "done": already,
            "generated": 0,
            "current": None,
            "started_at": time.time(),
            "updated_at": time.time(),
            "finished_at": None,
            "error": None,
            "pid": os.getpid(),
        }

    def write(self, **changes: object) -> None:
        self.state.update(changes, updated_at=time.time())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.path)


def build_gallery(
    root: Path,
    spec_path: Path = DEFAULT_SPEC,
    model_name: str | None = None,
    on_run: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Generate the spec's missing runs into the store (progress in `gallery_progress_path`); returns counts."""
    from pipeline.generate import GenerationConfig, generate_trace
    from pipeline.trace_writer import write_trace

    spec, items = load_spec(spec_path)
    name = model_name or spec.get("model") or default_model_name()
    if model_name is None and locate(get_spec(name)) is None and get_spec(name).builtin in (None, "embedded"):
        name = default_model_name()
    done = {(r["prompt"], r["seed"]) for r in Store(root).runs(gallery=spec["name"], model=name)}
    todo = [it for it in items if (it.prompt, it.seed) not in done]
    progress = Progress(root, spec["name"], name, len(items), len(items) - len(todo))
    progress.write(current=todo[0].prompt if todo else None)
    try:
        if todo:
            model = load_model(name)
            for i, item in enumerate(todo, 1):
                config = GenerationConfig(
                    item.prompt, seed=item.seed, steps=spec.get("steps"), tags=item.tags, gallery=spec["name"]
                )
                run_id = write_trace(root, generate_trace(model, config)).run_id
                nxt = todo[i].prompt if i < len(todo) else None
                progress.write(done=len(items) - len(todo) + i, generated=i, current=nxt)
                if on_run:
                    on_run(i, len(todo), run_id)
    except BaseException as exc:
        progress.write(error=f"{type(exc).__name__}: {exc}"[:500], finished_at=time.time(), current=None)
        raise
    progress.write(finished_at=time.time(), current=None)
    return {"gallery": spec["name"], "model": name, "runs": len(items), "generated": len(todo)}
