"""The SQL views users query: names and meanings stay stable across schema versions.

`runs`, `tokens` and `word_step_stats` read the store's index segments; `cross_attention`,
`self_attention` and `images` read the own Parquet files of exactly the runs the index lists
(complete but slower at scale), so every view shows the same runs; `word_stats` summarises
`word_step_stats` over steps; `daam_maps` gives the DAAM maps of `cross_attention` as numbers.
"""

from __future__ import annotations

from schema.codec import MAP_CODE_MAX

USER_VIEWS: dict[str, str] = {
    "runs": "One row per run: prompt, seed, steps, model, sizes, versions, timings, tags.",
    "tokens": "One row per stored token of each run, with the word it belongs to.",
    "word_step_stats": "Per run, step, word and level: mass, peak, entropy, centroid, spread.",
    "word_stats": "Per run, word and level: word_step_stats averaged over all steps.",
    "cross_attention": "Raw per-step, per-token, per-level cross-attention maps with statistics.",
    "self_attention": "Raw downsampled self-attention matrices (aggregate and per step).",
    "images": "Final images and per-step previews as encoded bytes.",
    "probe_maps": "Open-vocabulary probe maps (`stepx probe`): per probe token and step, beside the run.",
    "concept_maps": "ConceptAttention maps of FLUX.1 runs generated with `--concepts`: per concept and step.",
    "daam_maps": "The DAAM map (level 'all') per run, step and token as float numbers, decoded from "
    "cross_attention's uint16 codes (schema 1.8 on) or read as stored (float32 before).",
}

WORD_STATS_SQL = """
SELECT run_id, word_index, word, level,
       count(*)::INTEGER AS steps,
       avg(mass)::FLOAT AS mass,
       avg(peak)::FLOAT AS peak,
       avg(entropy)::FLOAT AS entropy,
       avg(centroid_x)::FLOAT AS centroid_x,
       avg(centroid_y)::FLOAT AS centroid_y,
       avg(spread)::FLOAT AS spread
FROM word_step_stats
GROUP BY run_id, word_index, word, level
"""


# The console's SQL view of the DAAM maps: schema.codec.decode_maps' formula, (code * scale) / 65535 in double
# precision then float32, so it gives the same numbers as Store.cross_maps; older files' float32 maps as stored.
DAAM_MAPS_SQL = f"""
SELECT run_id, step_index, timestep, token_index, level_height, level_width, layer_count, head_count,
       coalesce(daam_map, [(c * daam_scale::DOUBLE / {MAP_CODE_MAX})::FLOAT FOR c IN daam_codes]) AS daam_map,
       mass, peak, entropy, centroid_x, centroid_y, spread
FROM cross_attention
WHERE level = 'all'
"""


def sql_literal(text: str) -> str:
    """Quote a string as a SQL literal."""
    return "'" + text.replace("'", "''") + "'"


def parquet_source(paths: list[str] | str, columns: list[str] | None = None, by_name: bool = True) -> str:
    """A read_parquet(...) expression over a file list or glob.

    by_name unifies columns across files (newer minor versions may add some) but reads every
    file's footer when a query binds: right for a few index segments, too slow for a glob over
    thousands of run files, whose columns are the first file's.
    """
    if isinstance(paths, str):
        arg = sql_literal(paths)
    else:
        arg = "[" + ", ".join(sql_literal(p) for p in paths) + "]"
    cols = ", ".join(columns) if columns else "*"
    return f"SELECT {cols} FROM read_parquet({arg}{', union_by_name = true' if by_name else ''})"


def view_sql(name: str, source: str) -> str:
    """CREATE VIEW statement for a user view over a SELECT source."""
    return f"CREATE OR REPLACE VIEW {name} AS {source}"


def duckdb_type(t: object) -> str:
    """The DuckDB type a pyarrow column type reads back as (float16 reads as FLOAT)."""
    import pyarrow as pa

    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return duckdb_type(t.value_type) + "[]"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    simple = {
        pa.string(): "VARCHAR",
        pa.uint16(): "USMALLINT",
        pa.int32(): "INTEGER",
        pa.int64(): "BIGINT",
        pa.float16(): "FLOAT",
        pa.float32(): "FLOAT",
        pa.float64(): "DOUBLE",
        pa.bool_(): "BOOLEAN",
        pa.large_binary(): "BLOB",
        pa.binary(): "BLOB",
    }
    return simple[t]


def empty_source(schema: object) -> str:
    """A SELECT with a table's columns and no rows, for a view over a store with no files yet."""
    cols = ", ".join(f"CAST(NULL AS {duckdb_type(f.type)}) AS {f.name}" for f in schema)
    return f"SELECT {cols} WHERE false"
