"""Batch generation: prompts x seeds into a store (local folder or S3), locally or on a Ray cluster.

    stepx batch prompts.txt --seeds 0-9 [--store s3://lab/stepx] [--ray [ADDRESS]]

Each item's run id is derived from what makes the run (prompt, seed, settings, gallery, tags and the
model's fingerprint), so a retried item writes the same keys and commits nothing twice: a local store
finds the run folder already there, an S3 store finds the run already committed (pipeline.remote_index).
Items that fail are tried once more, then reported with their error; the others go on.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from schema.layout import run_dir, store_root
from schema.limits import LimitError, check_prompt, check_value
from schema.location import parse_location

RETRIES = 1  # a failed item is tried once more before it is reported
# Called with the run id after a run's files are uploaded and before its index commit (a test seam: the
# killed-worker test dies there). None in normal use.
BEFORE_COMMIT: Callable[[str], None] | None = None


class BatchError(ValueError):
    """A prompts file or seed list that can't be used, with a one-line reason."""


@dataclass(frozen=True)
class BatchItem:
    """One run to make: what GenerationConfig needs, minus the model's defaults."""

    prompt: str
    seed: int
    steps: int | None = None
    gallery: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)


def parse_seeds(text: str) -> list[int]:
    """`0-9`, `3`, `0,2,5` or `0-3,10` as a list of seeds; BatchError for anything else."""
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d{1,10})\s*(?:-\s*(\d{1,10})\s*)?", part)
        if m is None:
            raise BatchError(f"--seeds {text!r}: expected seeds like 0-9 or 0,2,5")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo or hi - lo >= 100_000:
            raise BatchError(f"--seeds {text!r}: {part.strip()} is not an ascending range of at most 100,000")
        seeds += range(lo, hi + 1)
    try:
        for s in seeds:
            check_value("seed", s)
    except LimitError as exc:
        raise BatchError(f"--seeds {text!r}: {exc}") from None
    return list(dict.fromkeys(seeds))


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one per non-empty line) or a Parquet file (its `prompt` column)."""
    path = Path(path)
    if not path.is_file():
        raise BatchError(f"no prompts file {path}")
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise BatchError(f"{path} is not a readable Parquet file: {str(exc)[:80]}") from None
        if "prompt" not in table.column_names or not pa.types.is_string(table.schema.field("prompt").type):
            raise BatchError(f"{path} has no text column 'prompt'")
        prompts = [p for p in table.column("prompt").to_pylist() if p]
    else:
        try:
            prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError:
            raise BatchError(f"{path} is not UTF-8 text") from None
    if not prompts:
        raise BatchError(f"{path} holds no prompt")
    for n, p in enumerate(prompts, 1):
        try:
            check_prompt(p)
        except LimitError as exc:
            raise BatchError(f"{path}, prompt {n}: {exc}") from None
    return prompts


def batch_run_id(item: BatchItem, model_fingerprint: str) -> str:
    """The run id of an item on a model: `b-` and 24 hex digits of the hash of everything that makes the run."""
    spec = json.dumps({**asdict(item), "tags": list(item.tags), "model": model_fingerprint}, sort_keys=True)
    return "b-" + hashlib.sha256(spec.encode()).hexdigest()[:24]


class Target:
    """Where runs go: a local store folder (written and indexed in place) or an S3 store (built in a scratch
    folder, uploaded, committed)."""

    def __init__(self, store: str | Path | None) -> None:
        self.store = None if store is None else str(store)
        self.loc = parse_location(self.store)
        self.root = None if self.loc else store_root(self.store)

    def has(self, run_id: str) -> bool:
        """Whether the run is already visible in the store (a retried item skips generation)."""
        if self.loc is not None:
            from pipeline.remote_index import committed

            return run_id in committed(self.loc, [run_id])
        from pipeline.index import is_indexed

        return is_indexed(self.root, run_id)

    def write(self, trace: object) -> None:
        """Write a finished trace (its run id already set) to the store."""
        from pipeline.trace_writer import build_tables, write_tables

        run_id = trace.run["run_id"]
        tables = build_tables(trace)
        if self.loc is None:
            write_tables(self.root, run_id, tables, len(trace.steps), exist_ok=True)
            return
        from pipeline.remote_index import commit_runs, upload_run

        scratch = Path(tempfile.mkdtemp(prefix="stepx-batch-"))
        try:
            write_tables(scratch, run_id, tables, len(trace.steps), index=False)
            upload_run(self.loc, run_dir(scratch, run_id), run_id)
            if BEFORE_COMMIT is not None:
                BEFORE_COMMIT(run_id)
            commit_runs(self.loc, {run_id: run_dir(scratch, run_id)})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def run_item(model: object, item: BatchItem, target: Target) -> dict:
    """Generate one item into the target unless it is there already; its result row."""
    from pipeline.generate import GenerationConfig, generate_trace

    run_id = batch_run_id(item, model.fingerprint)
    t0 = time.perf_counter()
    if target.has(run_id):
        return {"prompt": item.prompt, "seed": item.seed, "run_id": run_id, "status": "present", "error": None}
    config = GenerationConfig(item.prompt, seed=item.seed, steps=item.steps, tags=list(item.tags), gallery=item.gallery)
    trace = generate_trace(model, config)
    trace.run["run_id"] = run_id
    target.write(trace)
    ms = round((time.perf_counter() - t0) * 1000)
    return {"prompt": item.prompt, "seed": item.seed, "run_id": run_id, "status": "generated", "error": None, "ms": ms}


def run_local(
    items: list[BatchItem],
    store: str | Path | None,
    model_name: str,
    on_result: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run every item in this process with one loaded model; each item tried up to 1 + RETRIES times."""
    from pipeline.models import load_model

    model = load_model(model_name)
    target = Target(store)
    results = []
    for item in items:
        for attempt in range(RETRIES + 1):
            try:
                result = {**run_item(model, item, target), "attempts": attempt + 1}
                break
            except Exception as exc:  # noqa: BLE001 - reported per item; the batch goes on
                result = {
                    "prompt": item.prompt,
                    "seed": item.seed,
                    "run_id": None,
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                    "attempts": attempt + 1,
                }
        results.append(result)
        if on_result:
            on_result(result)
    return results


def summary(results: list[dict], elapsed_s: float) -> dict:
    """Counts of a finished batch, with the failed items listed."""
    by = {s: sum(r["status"] == s for r in results) for s in ("generated", "present", "failed")}
    failed = [{k: r[k] for k in ("prompt", "seed", "error")} for r in results if r["status"] == "failed"]
    return {
        "items": len(results),
        **by,
        "retried": sum(r.get("attempts", 1) > 1 for r in results),
        "elapsed_s": round(elapsed_s, 2),
        "failures": failed,
    }
