"""Write a trace as one folder of Parquet files, atomically, then add it to the store's index.

The folder is written under `<store>/tmp/<run_id>.<pid>` and renamed to `<store>/runs/<run_id>`
when every file is complete and synced: readers never see half a run, and a crash leaves only an
invisible temporary folder (removed by `stepx index rebuild`). Torch-free: it takes numpy arrays.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.index import update_index
from pipeline.trace import TokenInfo, Trace, encode_image
from schema import RUN_FILES, TABLES, file_metadata
from schema.layout import run_dir, runs_dir, tmp_dir
from schema.maps import aggregate_levels
from schema.stats import STAT_NAMES, map_stats

GLOBAL_WORD_INDEX = -1
GLOBAL_WORD = "<global>"


@dataclass
class WrittenRun:
    """Where a run landed and how big it is."""

    run_id: str
    path: Path
    bytes: int


def quantize_rows(matrix: np.ndarray) -> tuple[np.ndarray, bytes]:
    """(row maxima, uint8 bytes) of a non-negative (q, k) matrix: value = byte/255 * row max."""
    m = np.maximum(matrix.astype(np.float32), 0)
    scale = m.max(axis=1)
    safe = np.where(scale > 0, scale, 1.0)
    q = np.rint(m / safe[:, None] * 255).astype(np.uint8)
    return scale.astype(np.float32), q.tobytes()


def dequantize_rows(scale: np.ndarray, data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of quantize_rows, float32 (q, k)."""
    q = np.frombuffer(data, dtype=np.uint8).reshape(shape).astype(np.float32)
    return q * (np.asarray(scale, dtype=np.float32)[:, None] / 255.0)


def _table(name: str, columns: dict[str, object]) -> pa.Table:
    schema = TABLES[name]
    return pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)


def _word_groups(tokens: list[TokenInfo]) -> dict[int, tuple[str, list[int]]]:
    """word_index -> (word, positions in the stored-token axis); Global collects all word tokens."""
    stored = [t for t in tokens if t.has_map]
    groups: dict[int, tuple[str, list[int]]] = {}
    for pos, t in enumerate(stored):
        if t.kind == "word":
            word, idx = groups.get(t.word_index, (t.word, []))
            groups[t.word_index] = (word, idx + [pos])
    all_words = [pos for pos, t in enumerate(stored) if t.kind == "word"]
    if all_words:
        groups[GLOBAL_WORD_INDEX] = (GLOBAL_WORD, all_words)
    return groups


def build_tables(trace: Trace) -> dict[str, pa.Table]:
    """Arrow tables of a trace (its `run` dict, tokens, step records, self-attention, images)."""
    run = trace.run
    run_id = run["run_id"]
    stored = [t for t in trace.tokens if t.has_map]
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
    }

    cross: dict[str, list] = {f.name: [] for f in TABLES["cross_attention"]}
    words: dict[str, list] = {f.name: [] for f in TABLES["word_step_stats"]}
    groups = _word_groups(trace.tokens)
    for rec in trace.steps:
        for grid in sorted(rec.cross, key=lambda g: -g[0] * g[1]):
            maps = rec.cross[grid]  # (tokens, h, w)
            stats = map_stats(maps)
            level = f"{grid[0]}x{grid[1]}"
            n = len(stored)
            cross["run_id"] += [run_id] * n
            cross["step_index"] += [rec.step_index] * n
            cross["timestep"] += [rec.timestep] * n
            cross["token_index"] += [t.token_index for t in stored]
            cross["level"] += [level] * n
            cross["level_height"] += [grid[0]] * n
            cross["level_width"] += [grid[1]] * n
            cross["layer_count"] += [rec.cross_layers[grid]] * n
            cross["map"] += list(maps.reshape(n, -1).astype(np.float16))
            for s in STAT_NAMES:
                cross[s] += stats[s].tolist()
        level_maps = {f"{g[0]}x{g[1]}": m for g, m in rec.cross.items()}
        level_maps["all"] = aggregate_levels(list(rec.cross.values()), *latent)
        for level, maps in level_maps.items():
            keys = list(groups)
            word_maps = np.stack([maps[groups[k][1]].mean(axis=0) for k in keys])  # (words, h, w)
            stats = map_stats(word_maps)
            words["run_id"] += [run_id] * len(keys)
            words["step_index"] += [rec.step_index] * len(keys)
            words["word_index"] += keys
            words["word"] += [groups[k][0] for k in keys]
            words["level"] += [level] * len(keys)
            for s in STAT_NAMES:
                words[s] += stats[s].tolist()

    selfs: dict[str, list] = {f.name: [] for f in TABLES["self_attention"]}

    def add_self(kind: str, step: int, grid: tuple[int, int], layers: int, matrix: np.ndarray) -> None:
        scale, data = quantize_rows(matrix)
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
    return {
        "runs": _table("runs", runs),
        "tokens": _table("tokens", tokens),
        "cross_attention": _table("cross_attention", cross),
        "word_step_stats": _table("word_step_stats", words),
        "self_attention": _table("self_attention", selfs),
        "images": _table("images", images),
    }


def _row_group_size(name: str, table: pa.Table, steps: int) -> int:
    """Row groups sized for point lookups: one step's maps, one matrix, one image."""
    if name in ("cross_attention", "word_step_stats") and steps:
        return max(1, table.num_rows // steps)
    if name in ("self_attention", "images"):
        return 1
    return max(1, table.num_rows)


def write_tables(root: Path, run_id: str, tables: dict[str, pa.Table], steps: int, index: bool = True) -> WrittenRun:
    """Write a run folder atomically and (unless index=False, for bulk loads) index it."""
    final = run_dir(root, run_id)
    if final.exists():
        raise FileExistsError(f"run {run_id} already exists in {root}")
    runs_dir(root).mkdir(parents=True, exist_ok=True)
    tmp_dir(root).mkdir(parents=True, exist_ok=True)
    work = tmp_dir(root) / f"{run_id}.{os.getpid()}"
    work.mkdir()
    try:
        total = 0
        for name, table in tables.items():
            path = work / RUN_FILES[name]
            table = table.replace_schema_metadata(file_metadata())
            pq.write_table(table, path, compression="zstd", row_group_size=_row_group_size(name, table, steps))
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            total += path.stat().st_size
        dir_fd = os.open(work, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if index:
        update_index(root)
    return WrittenRun(run_id, final, total)


def write_trace(root: Path, trace: Trace, index: bool = True) -> WrittenRun:
    """Write a `pipeline.generate.Trace` into a store."""
    tables = build_tables(trace)
    return write_tables(root, trace.run["run_id"], tables, len(trace.steps), index)
