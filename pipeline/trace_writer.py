"""Write a trace as one folder of Parquet files, atomically, then add it to the store's index.

The folder is written under `<store>/tmp/<run_id>.<pid>.<hex>` (locked by its writer) and renamed to
`<store>/runs/<run_id>` when every file is complete and synced; readers see it once the index lists
it. A crash leaves an invisible temporary folder (removed by the next writer or `stepx index rebuild`)
or an unlisted complete folder (listed by the next index update). Torch-free: it takes numpy arrays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cross_rows import (
    add_cross_rows,
    add_word_stats,
    parquet_options,
    rebuild_daam,
    step_levels,
    stored_daam,
    word_groups,
)
from pipeline.index import update_index, work_folder, write_step
from pipeline.trace import Trace, encode_image
from schema import RUN_FILES, TABLES, file_metadata
from schema.codec import encode_rows
from schema.layout import run_dir, runs_dir


@dataclass
class WrittenRun:
    """Where a run landed and how big it is."""

    run_id: str
    path: Path
    bytes: int


def _table(name: str, columns: dict[str, object]) -> pa.Table:
    schema = TABLES[name]
    return pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)


def build_tables(trace: Trace) -> dict[str, pa.Table]:
    """Arrow tables of a trace (its `run` dict, tokens, step records, self-attention, images)."""
    run = trace.run
    run_id = run["run_id"]
    latent = (run["latent_height"], run["latent_width"])

    tokens = {
        "run_id": [run_id] * len(trace.tokens),
        "token_index": [t.token_index for t in trace.tokens],
        "token_id": [t.token_id for t in trace.tokens],
        "token_text": [t.token_text for t in trace.tokens],
        "word_index": [t.word_index for t in trace.tokens],
        "word": [t.word for t in trace.tokens],
        "kind": [t.kind for t in trace.tokens],
        "has_map": [t.has_map for t in trace.tokens],
        "noun_lemma": [t.noun_lemma for t in trace.tokens],
        "noun_plural": [t.noun_plural for t in trace.tokens],
        "encoder": [t.encoder for t in trace.tokens],
    }

    cross: dict[str, list] = {f.name: [] for f in TABLES["cross_attention"]}
    words: dict[str, list] = {f.name: [] for f in TABLES["word_step_stats"]}
    groups = word_groups(tokens_rows := [vars(t) for t in trace.tokens])
    token_indices = [t["token_index"] for t in tokens_rows if t["has_map"]]
    for rec in trace.steps:
        levels = step_levels(rec.cross, rec.cross_layers, rec.cross_heads)
        daam = stored_daam(rec.daam if rec.daam is not None else rebuild_daam(levels, latent))  # else synthetic
        add_cross_rows(cross, run_id, rec.step_index, rec.timestep, token_indices, levels, daam)
        add_word_stats(words, run_id, rec.step_index, groups, levels, daam)

    selfs: dict[str, list] = {f.name: [] for f in TABLES["self_attention"]}

    def add_self(kind: str, step: int, grid: tuple[int, int], layers: int, matrix: np.ndarray) -> None:
        scale, data = encode_rows(matrix)
        for name, value in zip(
            ("run_id", "kind", "step_index", "grid_height", "grid_width", "layer_count", "row_scale", "values"),
            (run_id, kind, step, grid[0], grid[1], layers, scale, data),
            strict=True,
        ):
            selfs[name].append(value)

    if trace.self_aggregate is not None:
        grid = (run["self_grid_height"], run["self_grid_width"])
        add_self("aggregate", -1, grid, len(trace.steps), trace.self_aggregate)
    step_grid = (run["step_grid_height"], run["step_grid_width"])
    for rec in trace.steps:
        if rec.self_step is not None:
            add_self("step", rec.step_index, step_grid, rec.self_layers, rec.self_step)

    images: dict[str, list] = {f.name: [] for f in TABLES["images"]}
    for kind, step, img, fmt in [("final", -1, trace.final, "png")] + [
        ("preview", i, p, "webp") for i, p in enumerate(trace.previews)
    ]:
        images["run_id"].append(run_id)
        images["kind"].append(kind)
        images["step_index"].append(step)
        images["width"].append(img.width)
        images["height"].append(img.height)
        images["format"].append(fmt)
        images["data"].append(encode_image(img, fmt))

    runs = {f.name: [run.get(f.name)] for f in TABLES["runs"]}
    tables = {
        "runs": _table("runs", runs),
        "tokens": _table("tokens", tokens),
        "cross_attention": _table("cross_attention", cross),
        "word_step_stats": _table("word_step_stats", words),
        "self_attention": _table("self_attention", selfs),
        "images": _table("images", images),
    }
    if trace.concepts and trace.concept_maps:
        tables["concept_maps"] = _concept_table(trace)
    return tables


def _concept_table(trace: Trace) -> pa.Table:
    """The optional concept_maps table: one row per concept and step (ConceptAttention, pipeline.concepts)."""
    cols: dict[str, list] = {f.name: [] for f in TABLES["concept_maps"]}
    for rec, maps in zip(trace.steps, trace.concept_maps, strict=True):
        for i, name in enumerate(trace.concepts):
            for col, value in (
                ("run_id", trace.run["run_id"]),
                ("concept_index", i),
                ("concept", name),
                ("step_index", rec.step_index),
                ("timestep", rec.timestep),
                ("block_count", trace.concept_blocks),
                ("map_height", maps.shape[1]),
                ("map_width", maps.shape[2]),
                ("map", maps[i].reshape(-1).astype(np.float32)),
            ):
                cols[col].append(value)
    return _table("concept_maps", cols)


def _row_group_size(name: str, table: pa.Table, steps: int) -> int:
    """Row groups sized for point lookups: one step's maps, one matrix, one image."""
    if name in ("cross_attention", "word_step_stats") and steps:
        return max(1, table.num_rows // steps)
    if name in ("self_attention", "images"):
        return 1
    return max(1, table.num_rows)


def write_tables(
    root: Path, run_id: str, tables: dict[str, pa.Table], steps: int, index: bool = True, exist_ok: bool = False
) -> WrittenRun:
    """Write a run folder atomically and (unless index=False, for bulk loads) index it.

    The folder is written in tmp/, renamed into runs/ when complete, then listed by the index: readers
    see the run only from that last step on. With exist_ok a run already on disk under this id (a job
    retried after its writer died past the rename) is indexed and returned instead of written twice.
    """
    final = run_dir(root, run_id)
    if final.is_dir():
        if not exist_ok:
            raise FileExistsError(f"run {run_id} already exists in {root}")
        return _existing(root, final, index)
    runs_dir(root).mkdir(parents=True, exist_ok=True)
    with work_folder(root, run_id) as work:
        total = 0
        for name, table in tables.items():
            path = work / RUN_FILES[name]
            table = table.replace_schema_metadata(file_metadata())
            rows = _row_group_size(name, table, steps)
            pq.write_table(table, path, compression="zstd", row_group_size=rows, **parquet_options(name))
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            total += path.stat().st_size
            write_step(f"wrote {path.name}")
        dir_fd = os.open(work, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        try:
            os.rename(work, final)
        except OSError:
            if not (exist_ok and final.is_dir()):
                raise
            return _existing(root, final, index)  # another writer of the same id got there first
        write_step("renamed into runs/")
    if index:
        update_index(root)
    return WrittenRun(run_id, final, total)


def _existing(root: Path, final: Path, index: bool) -> WrittenRun:
    if index:
        update_index(root)
    return WrittenRun(final.name, final, sum(p.stat().st_size for p in final.iterdir() if p.is_file()))


def write_trace(root: Path, trace: Trace, index: bool = True, exist_ok: bool = False) -> WrittenRun:
    """Write a `pipeline.generate.Trace` into a store."""
    tables = build_tables(trace)
    return write_tables(root, trace.run["run_id"], tables, len(trace.steps), index, exist_ok)
