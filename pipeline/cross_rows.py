"""The cross_attention and word_step_stats rows of one step, and the upgrade of runs written before 1.2.

Schema 1.2 made level 'all' DAAM's word map (schema.maps). A run written earlier stored each level's
maps with its layer count, the mid block merged into its grid, no head counts and an equal-weight
'all'; `upgrade_run` rewrites its cross_attention and word_step_stats files from those stored maps
(no regeneration): heads and the mid block's layers come from the model's UNet config, and 'all' is
rebuilt by `rebuild_daam` (exact but for DAAM's per-head clamp). Torch-free unless a run's UNet
config has to come from the model registry.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schema import RUN_FILES, TABLES, file_metadata
from schema.codec import decode_maps, encode_maps
from schema.layout import run_dir
from schema.maps import ALL, combine_levels, halve, is_mid, level_label, level_order, level_weights
from schema.stats import STAT_NAMES, map_stats

GLOBAL_WORD_INDEX = -1
GLOBAL_WORD = "<global>"
DAAM_VERSION = (1, 2)  # first schema version whose level 'all' is DAAM's formula
UPGRADED_KEY = b"stepx.daam_all"  # cross_attention metadata: 'capture' (exact) or 'rebuilt' (from level means)


DAAM_COLUMNS = ("daam_map", "daam_codes", "daam_scale")  # level 'all': float32 before 1.8, codes + scale from 1.8


def parquet_options(table: str) -> dict:
    """Extra Parquet writer options per table: the DAAM maps are never dictionary-encoded.

    Their values hardly repeat, so a dictionary only grows the file (shapes model, float32 maps:
    cross_attention 549 KB with it, 399 KB without; the level maps without DAAM rows take 238 KB).
    """
    if table != "cross_attention":
        return {}
    return {"use_dictionary": [f.name for f in TABLES[table] if f.name not in DAAM_COLUMNS]}


def stored_daam(daam: np.ndarray) -> np.ndarray:
    """(tokens, h, w) DAAM maps as the store keeps them (schema.codec's uint16 round trip), so the statistics
    written beside them describe exactly the maps a reader gets back; encoding them again gives the same codes."""
    n = daam.shape[0]
    return decode_maps(*encode_maps(daam.reshape(n, -1))).reshape(daam.shape)


@dataclass
class LevelMaps:
    """One level's maps at one step: (tokens, h, w), mean over its layers x heads maps."""

    maps: np.ndarray
    layers: int
    heads: int


def word_groups(tokens: Iterable[Mapping]) -> dict[int, tuple[str, list[int]]]:
    """word_index -> (word, positions on the stored-token axis); Global (-1) collects every word token."""
    stored = [t for t in tokens if t["has_map"]]
    groups: dict[int, tuple[str, list[int]]] = {}
    for pos, t in enumerate(stored):
        if t["kind"] == "word":
            word, idx = groups.get(t["word_index"], (t["word"], []))
            groups[t["word_index"]] = (word, idx + [pos])
    all_words = [pos for pos, t in enumerate(stored) if t["kind"] == "word"]
    if all_words:
        groups[GLOBAL_WORD_INDEX] = (GLOBAL_WORD, all_words)
    return groups


def rebuild_daam(levels: Mapping[str, LevelMaps], latent: tuple[int, int]) -> np.ndarray:
    """DAAM's map rebuilt from per-level means (layers x heads weights, mid block out), clamped after averaging.

    Exact up to DAAM's per-head clamp, which needs each head's map: the capture stores the exact map;
    this serves traces without one (synthetic stores, runs written before schema 1.2).
    """
    counts = {k: v.layers * v.heads for k, v in levels.items()}
    return combine_levels({k: v.maps for k, v in levels.items()}, level_weights("daam", counts), *latent)


def add_cross_rows(
    cross: dict[str, list],
    run_id: str,
    step: int,
    timestep: float,
    token_indices: list[int],
    levels: Mapping[str, LevelMaps],
    daam: np.ndarray,
) -> None:
    """Append one step's cross_attention rows: one per token and level, then the DAAM map as level 'all'
    (uint16 codes and a per-map scale; pass it through `stored_daam` first for statistics of the stored map)."""
    n = len(token_indices)
    down_up = [v for k, v in levels.items() if not is_mid(k)]
    rows = [(k, v.maps, v.layers, v.heads) for k, v in levels.items()]
    rows.append((ALL, daam, sum(v.layers for v in down_up), max((v.heads for v in down_up), default=0)))
    for level, maps, layers, heads in rows:
        stats = map_stats(maps)
        flat = maps.reshape(n, -1)
        cross["run_id"] += [run_id] * n
        cross["step_index"] += [step] * n
        cross["timestep"] += [timestep] * n
        cross["token_index"] += token_indices
        cross["level"] += [level] * n
        cross["level_height"] += [maps.shape[1]] * n
        cross["level_width"] += [maps.shape[2]] * n
        cross["layer_count"] += [layers] * n
        cross["head_count"] += [heads] * n
        cross["map"] += [None] * n if level == ALL else list(flat.astype(np.float16))
        cross["daam_map"] += [None] * n  # float32 maps are read in files before 1.8, never written
        if level == ALL:
            scales, codes = encode_maps(flat)
            cross["daam_codes"] += list(codes)
            cross["daam_scale"] += scales.tolist()
        else:
            cross["daam_codes"] += [None] * n
            cross["daam_scale"] += [None] * n
        for s in STAT_NAMES:
            cross[s] += stats[s].tolist()


def add_word_stats(
    words: dict[str, list],
    run_id: str,
    step: int,
    groups: Mapping[int, tuple[str, list[int]]],
    levels: Mapping[str, LevelMaps],
    daam: np.ndarray,
) -> None:
    """Append one step's word_step_stats rows: each word's map per level, and its DAAM map as level 'all'."""
    keys = list(groups)
    for level, maps in [*((k, v.maps) for k, v in levels.items()), (ALL, daam)]:
        word_maps = np.stack([maps[groups[k][1]].mean(axis=0) for k in keys])  # (words, h, w)
        stats = map_stats(word_maps)
        words["run_id"] += [run_id] * len(keys)
        words["step_index"] += [step] * len(keys)
        words["word_index"] += keys
        words["word"] += [groups[k][0] for k in keys]
        words["level"] += [level] * len(keys)
        for s in STAT_NAMES:
            words[s] += stats[s].tolist()


def step_levels(
    cross: Mapping[tuple, np.ndarray], layers: Mapping[tuple, int], heads: Mapping[tuple, int] | None
) -> dict[str, LevelMaps]:
    """Level label -> LevelMaps of one step, finest first; unknown heads (synthetic traces) count 1."""
    heads = heads or dict.fromkeys(cross, 1)
    return {level_label(k): LevelMaps(cross[k], layers[k], heads[k]) for k in sorted(cross, key=level_order)}


# -- runs written before 1.2 -------------------------------------------------------------


class UpgradeRefused(RuntimeError):
    """A run written before schema 1.2 that can't be turned into DAAM's maps from what it stores."""


def _per_block(value: object, n: int) -> list:
    return list(value) if isinstance(value, list | tuple) else [value] * n


def unet_levels(config: Mapping, latent: tuple[int, int]) -> dict[tuple, tuple[int, int]]:
    """Cross-attention layers and heads per level key of a diffusers UNet2DConditionModel config."""
    n = len(config["down_block_types"])
    heads = _per_block(config.get("num_attention_heads") or config["attention_head_dim"], n)
    per_block = _per_block(config["layers_per_block"], n)
    depth = _per_block(config.get("transformer_layers_per_block", 1), n)
    up_depth = config.get("reverse_transformer_layers_per_block") or list(reversed(depth))
    found: dict[tuple, list[int]] = {}

    def add(key: tuple, layers: int, head_count: int) -> None:
        acc = found.setdefault(key, [0, 0])
        acc[0] += layers
        acc[1] += layers * head_count

    for i, kind in enumerate(config["down_block_types"]):
        if "CrossAttn" in kind:
            add(halve(latent, i), per_block[i] * _first(depth[i]), heads[i])
    for j, kind in enumerate(config["up_block_types"]):
        if "CrossAttn" in kind:
            i = n - 1 - j
            add(halve(latent, i), (per_block[i] + 1) * _first(up_depth[j]), heads[i])
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        add((*halve(latent, n - 1), "mid"), _first(depth[-1]), heads[-1])
    return {k: (layers, maps // layers) for k, (layers, maps) in found.items()}


def _first(value: object) -> int:
    return int(value[0]) if isinstance(value, list | tuple) else int(value)


def model_unet_config(run: Mapping) -> dict:
    """The UNet config of the model a run was generated with, from the local weights or the tiny builders."""
    name, model_id = run.get("model_name"), run.get("model_id") or ""
    if model_id.startswith("in-process:"):
        from pipeline.tiny import LAYOUTS, build_tiny_pipeline

        layout = model_id.split(":")[1]
        layout = "tiny" if layout not in LAYOUTS else layout
        return dict(build_tiny_pipeline(layout).unet.config)
    from pipeline.models import REGISTRY, locate

    spec = REGISTRY.get(name)
    folder = locate(spec) if spec is not None else None
    if folder is None and Path(model_id).is_dir():
        folder = Path(model_id)
    if folder is None or not (folder / "unet" / "config.json").is_file():
        raise UpgradeRefused(
            f"its model {name!r} ({model_id}) is not on this machine, and the run does not record which layers "
            "and heads each level holds: regenerate it, or run the rebuild where the model is"
        )
    return json.loads((folder / "unet" / "config.json").read_text())


def needs_upgrade(root: Path, run_id: str) -> bool:
    """Whether a run's cross_attention file predates DAAM's level 'all' (schema < 1.2)."""
    meta = pq.read_schema(run_dir(root, run_id) / RUN_FILES["cross_attention"]).metadata or {}
    version = (meta.get(b"stepx.schema_version") or b"0.0").decode()
    major, minor = (int(x) for x in version.split(".")[:2])
    return (major, minor) < DAAM_VERSION


def upgrade_run(root: Path, run_id: str, write: Callable[..., None]) -> None:
    """Rewrite a pre-1.2 run's cross_attention and word_step_stats (and runs.levels) with DAAM's level 'all'.

    `write(table, path, **kwargs)` must replace a Parquet file atomically. Raises UpgradeRefused, with the
    reason, when the stored maps can't give DAAM's weights (unknown model, mid block merged into a level).
    """
    folder = run_dir(root, run_id)
    run = pq.read_table(folder / RUN_FILES["runs"]).to_pylist()[0]
    latent = (run["latent_height"], run["latent_width"])
    layout = unet_levels(model_unet_config(run), latent)
    old = pq.read_table(folder / RUN_FILES["cross_attention"]).to_pydict()
    labels: dict[str, tuple[str, int, int]] = {}  # stored label -> (new label, layers, heads)
    for key, (layers, heads) in layout.items():
        grid = f"{key[0]}x{key[1]}"
        if grid in labels:  # a mid block stored inside a down/up level of the same grid
            raise UpgradeRefused(
                f"its mid block was stored merged into the {grid} level, so DAAM (which leaves it out) can't be "
                "rebuilt from the stored maps: regenerate it"
            )
        labels[grid] = (level_label(key), layers, heads)
    stored_layers = dict(zip(old["level"], old["layer_count"], strict=True))
    for grid, layers in stored_layers.items():
        if grid not in labels or labels[grid][1] != layers:
            raise UpgradeRefused(f"its {grid} level holds {layers} layers, which its model's UNet config doesn't match")
    tokens = pq.read_table(folder / RUN_FILES["tokens"]).to_pylist()
    token_indices = [t["token_index"] for t in tokens if t["has_map"]]
    pos = {t: i for i, t in enumerate(token_indices)}
    steps: dict[int, dict] = {}
    for i, step in enumerate(old["step_index"]):
        entry = steps.setdefault(step, {"timestep": old["timestep"][i], "levels": {}})
        label, layers, heads = labels[old["level"][i]]
        h, w = old["level_height"][i], old["level_width"][i]
        level = entry["levels"].setdefault(
            label, LevelMaps(np.zeros((len(token_indices), h, w), np.float32), layers, heads)
        )
        level.maps[pos[old["token_index"][i]]] = np.asarray(old["map"][i], dtype=np.float32).reshape(h, w)
    cross: dict[str, list] = {f.name: [] for f in TABLES["cross_attention"]}
    words: dict[str, list] = {f.name: [] for f in TABLES["word_step_stats"]}
    groups = word_groups(tokens)
    for step in sorted(steps):
        levels = dict(sorted(steps[step]["levels"].items(), key=lambda kv: level_order(_key(kv[0]))))
        daam = stored_daam(rebuild_daam(levels, latent))
        add_cross_rows(cross, run_id, step, steps[step]["timestep"], token_indices, levels, daam)
        add_word_stats(words, run_id, step, groups, levels, daam)
    rows = max(1, len(cross["run_id"]) // max(1, len(steps)))
    meta = {**file_metadata(), UPGRADED_KEY: b"rebuilt"}
    cross_table = _table("cross_attention", cross, meta)
    write(cross_table, folder / RUN_FILES["cross_attention"], row_group_size=rows, **parquet_options("cross_attention"))
    write(
        _table("word_step_stats", words, file_metadata()),
        folder / RUN_FILES["word_step_stats"],
        row_group_size=max(1, len(words["run_id"]) // max(1, len(steps))),
    )
    runs = pq.read_table(folder / RUN_FILES["runs"])
    relabelled = [labels.get(lv, (lv,))[0] for lv in run["levels"]]
    runs = runs.set_column(runs.schema.get_field_index("levels"), "levels", pa.array([relabelled], runs["levels"].type))
    write(runs.replace_schema_metadata(runs.schema.metadata), folder / RUN_FILES["runs"])


def _key(label: str) -> tuple:
    mid = is_mid(label)
    h, w = (int(x) for x in label.removeprefix("mid-").split("x"))
    return (h, w, "mid") if mid else (h, w)


def _table(name: str, columns: dict[str, list], metadata: dict[bytes, bytes]) -> pa.Table:
    schema = TABLES[name]
    table = pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)
    return table.replace_schema_metadata(metadata)
