"""Arrow schemas of the per-run Parquet files, with one comment per column.

A run is one directory `runs/<run_id>/` holding one Parquet file per table below. Every file carries
the schema version in its key-value metadata (`stepx.schema_version`); readers refuse a newer major
version. The comments are the documentation the SQL console shows.
"""

from __future__ import annotations

import re

import pyarrow as pa

# 1.1: optional depth table; 1.2: level 'all' is DAAM's formula (mid block out, layers x heads);
# 1.3: tokens.noun_lemma / noun_plural (object nouns tagged at generation time)
# 1.4: diffusion transformers: runs.architecture / level_modules (block bands), tokens.encoder, token kinds
#      'padding' and 'text_share'
# 1.5: provenance of runs recorded around a user's pipeline (stepx.record): runs.source, pipeline_class,
#      scheduler_config, lora_adapters / lora_scales, controlnet, strength, init_image_sha256; optional
#      probe_maps table (open-vocabulary probes, `stepx probe`)
# 1.6: optional concept_maps table (ConceptAttention maps of FLUX.1 runs, `--concepts`)
# 1.7: probe_maps.probe_embedding ('encoded' or 'optimised': OVAM probe tokens; null in older probe files)
# 1.8: cross_attention level 'all' stores its DAAM map as uint16 codes with a per-map scale (daam_codes,
#      daam_scale; schema.codec, error <= 0.5/65535 of the map's max) instead of float32 daam_map, which is
#      null from 1.8 on and still read in files of 1.2-1.7
SCHEMA_VERSION = "1.8"
VERSION_KEY = b"stepx.schema_version"


class SchemaVersionError(RuntimeError):
    """A file was written by a newer, incompatible StepX trace schema."""


def _f(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


RUNS = pa.schema(
    [
        _f("run_id", pa.string(), "Run id: UTC creation time plus a random suffix, sortable.", False),
        _f("created_at", pa.timestamp("us", tz="UTC"), "When the run was generated (UTC)."),
        _f("status", pa.string(), "Always 'complete' for a visible run (partial runs are never visible)."),
        _f("prompt", pa.string(), "The prompt text as given."),
        _f("negative_prompt", pa.string(), "The negative prompt ('' when none)."),
        _f("seed", pa.int64(), "Seed of the torch generator for the initial noise."),
        _f("steps", pa.int32(), "Number of denoising steps (= UNet evaluations)."),
        _f("guidance", pa.float32(), "Classifier-free guidance scale; <= 1 means no unconditional batch."),
        _f("scheduler", pa.string(), "diffusers scheduler class name."),
        _f("width", pa.int32(), "Image width in pixels."),
        _f("height", pa.int32(), "Image height in pixels."),
        _f(
            "latent_width",
            pa.int32(),
            "Latent grid width (image width / VAE factor); for a DiT run the image-token grid (latent / patch).",
        ),
        _f("latent_height", pa.int32(), "Latent grid height."),
        _f("self_grid_width", pa.int32(), "Width of the step-aggregated self-attention grid."),
        _f("self_grid_height", pa.int32(), "Height of the step-aggregated self-attention grid."),
        _f("step_grid_width", pa.int32(), "Width of the per-step self-attention grid."),
        _f("step_grid_height", pa.int32(), "Height of the per-step self-attention grid."),
        _f(
            "levels",
            pa.list_(pa.string()),
            "Cross-attention levels captured, finest first: 'HxW' (down/up blocks) or 'mid-HxW' (mid block); "
            "for a DiT run its block bands in block order: 'joint-0-7' (SD3), 'double-0-9', 'single-19-37' (Flux).",
        ),
        _f(
            "level_modules",
            pa.list_(pa.string()),
            "Per entry of `levels`, the attention modules averaged into it (diffusers names, comma-separated); "
            "null for UNet runs, whose levels are grids.",
        ),
        _f(
            "architecture",
            pa.string(),
            "'unet' (SD 1.x/2.x/XL), 'sd3' (SD3/SD3.5 joint attention, [image, text]) or 'flux' (FLUX.1, "
            "[text, image]); null for runs before schema 1.4 (all UNet).",
        ),
        _f("model_name", pa.string(), "Registry name of the model (sd15, shapes, tiny-random, ...)."),
        _f("model_id", pa.string(), "Hub id or folder the weights came from."),
        _f("model_fingerprint", pa.string(), "Short hash identifying the exact weights."),
        _f("torch_version", pa.string(), "torch version used to generate."),
        _f("diffusers_version", pa.string(), "diffusers version used to generate."),
        _f("stepx_version", pa.string(), "StepX version used to generate."),
        _f("schema_version", pa.string(), "Trace schema version (major.minor)."),
        _f("device", pa.string(), "torch device the pipeline ran on (cpu, cuda)."),
        _f("dtype", pa.string(), "torch dtype of the pipeline weights."),
        _f("prompt_truncated", pa.bool_(), "True when the prompt was longer than the text encoder takes."),
        _f("denoise_ms", pa.float64(), "Wall time of the pipeline call (denoising loop + final decode)."),
        _f("preview_ms", pa.float64(), "Wall time to decode the per-step previews after the loop."),
        _f("total_ms", pa.float64(), "Wall time from model loaded to trace assembled."),
        _f("tags", pa.list_(pa.string()), "Free tags (gallery themes)."),
        _f("gallery", pa.string(), "Name of the curated gallery this run belongs to, if any."),
        _f("config_json", pa.string(), "Full generation config as JSON, enough to regenerate the run."),
        _f(
            "source",
            pa.string(),
            "How the run was made: 'generate' (stepx generate, the queue, galleries) or 'record' (stepx.record "
            "around a user's own pipeline); null for runs before schema 1.5.",
        ),
        _f("pipeline_class", pa.string(), "diffusers pipeline class (StableDiffusionImg2ImgPipeline, ...)."),
        _f("scheduler_config", pa.string(), "The scheduler's full config as JSON (class in `scheduler`)."),
        _f("lora_adapters", pa.list_(pa.string()), "Active LoRA adapters of the UNet, by name; empty for none."),
        _f("lora_scales", pa.list_(pa.float32()), "Per entry of `lora_adapters`, its weight (set_adapters)."),
        _f("controlnet", pa.string(), "ControlNet model class(es), comma-separated; null without ControlNet."),
        _f("strength", pa.float32(), "img2img/inpaint strength (steps run = strength x steps asked); null otherwise."),
        _f("init_image_sha256", pa.string(), "sha256 of the init image's bytes (PNG of a PIL image, else the array)."),
    ]
)

TOKENS = pa.schema(
    [
        _f("run_id", pa.string(), "Run id.", False),
        _f("token_index", pa.int32(), "Position in the text encoder's input (0 = start token).", False),
        _f("token_id", pa.int32(), "Tokenizer id."),
        _f("token_text", pa.string(), "The token's text (one BPE piece)."),
        _f("word_index", pa.int32(), "Index of the prompt word this piece belongs to; null for start/end."),
        _f("word", pa.string(), "The whole word the piece belongs to (pieces of one word share it)."),
        _f(
            "kind",
            pa.string(),
            "'start', 'word', 'end' (the first end-of-text token); DiT runs also 'padding' (one pseudo-token per "
            "encoder whose map sums every padding position) and 'text_share' (token_index -1: not a token; its "
            "map is the share of each pixel's attention that goes to any text key).",
        ),
        _f("has_map", pa.bool_(), "Whether cross-attention maps are stored for this token."),
        _f(
            "noun_lemma",
            pa.string(),
            "Lemma of the word when it names an object (TITAN's category), tagged at generation time by spaCy "
            "(or a word-list rule without it); null for other words and for runs before schema 1.3.",
        ),
        _f("noun_plural", pa.bool_(), "Whether that object noun is plural (every region is kept); null otherwise."),
        _f(
            "encoder",
            pa.string(),
            "Text encoder of the position: 'clip' or 't5' (SD3 has both: a word has a CLIP and a T5 map); "
            "null for the text share and for runs before schema 1.4.",
        ),
    ]
)

CROSS_ATTENTION = pa.schema(
    [
        _f("run_id", pa.string(), "Run id.", False),
        _f("step_index", pa.int32(), "Denoising step, 0 = first (noisiest).", False),
        _f("timestep", pa.float32(), "Scheduler timestep of that step."),
        _f("token_index", pa.int32(), "Token position (joins tokens.token_index).", False),
        _f(
            "level",
            pa.string(),
            "'HxW' (down/up-block layers of that grid), 'mid-HxW' (mid block) or 'all' (DAAM map, latent grid).",
        ),
        _f("level_height", pa.int32(), "Map height (query grid of that level)."),
        _f("level_width", pa.int32(), "Map width."),
        _f("layer_count", pa.int32(), "Attention layers averaged into this map (for 'all': down/up layers)."),
        _f("head_count", pa.int32(), "Heads per layer ('all': most of any level); a level weighs layers x heads."),
        _f(
            "map",
            pa.list_(pa.float16()),
            "Attention probability per query pixel, row-major, mean over the level's (layer, head) maps; "
            "null for level 'all'.",
        ),
        _f(
            "daam_map",
            pa.list_(pa.float32()),
            "Level 'all' in files of schema 1.2-1.7: the DAAM map as float32. Null from 1.8 on (daam_codes); "
            "the view daam_maps gives every run's DAAM maps as numbers.",
        ),
        _f(
            "daam_codes",
            pa.list_(pa.uint16()),
            "Level 'all' only: the token's DAAM map at this step on the latent grid, row-major (see README), as "
            "codes: value = code / 65535 * daam_scale (error <= 0.5/65535 of the map's max). Null before 1.8.",
        ),
        _f(
            "daam_scale",
            pa.float32(),
            "Level 'all' only: the largest value of the DAAM map (code 65535); NaN for a map holding NaN or inf.",
        ),
        _f("mass", pa.float32(), "Mean of the map: share of the image's attention that went to the token."),
        _f("peak", pa.float32(), "Largest value of the map."),
        _f("entropy", pa.float32(), "Shannon entropy of the map as a distribution, / log(pixels): 0-1."),
        _f("centroid_x", pa.float32(), "Map-weighted mean x, 0 = left edge, 1 = right edge."),
        _f("centroid_y", pa.float32(), "Map-weighted mean y, 0 = top edge, 1 = bottom edge."),
        _f("spread", pa.float32(), "Map-weighted RMS distance from the centroid, in image widths."),
    ]
)

WORD_STEP_STATS = pa.schema(
    [
        _f("run_id", pa.string(), "Run id.", False),
        _f("step_index", pa.int32(), "Denoising step, 0 = first.", False),
        _f("word_index", pa.int32(), "Prompt word index; -1 is Global (all prompt words).", False),
        _f("word", pa.string(), "The word ('<global>' for Global)."),
        _f("level", pa.string(), "Level as in cross_attention; 'all' is the DAAM word map on the latent grid."),
        _f("mass", pa.float32(), "Mean of the word's map (word map = mean of its tokens' maps)."),
        _f("peak", pa.float32(), "Largest value of the word's map."),
        _f("entropy", pa.float32(), "Normalised entropy 0-1 of the map as a distribution."),
        _f("centroid_x", pa.float32(), "Weighted mean x in 0-1 image widths."),
        _f("centroid_y", pa.float32(), "Weighted mean y in 0-1 image heights."),
        _f("spread", pa.float32(), "Weighted RMS distance from the centroid, in image widths."),
    ]
)

SELF_ATTENTION = pa.schema(
    [
        _f("run_id", pa.string(), "Run id.", False),
        _f("kind", pa.string(), "'aggregate' (summed over steps, self grid) or 'step' (one step, step grid)."),
        _f("step_index", pa.int32(), "Denoising step for kind 'step'; -1 for the aggregate."),
        _f("grid_height", pa.int32(), "Query/key grid height."),
        _f("grid_width", pa.int32(), "Query/key grid width."),
        _f("layer_count", pa.int32(), "Self-attention layers averaged (per step)."),
        _f("row_scale", pa.list_(pa.float32()), "Per query row: the row's maximum probability."),
        _f("values", pa.large_binary(), "Row-major (queries x keys) uint8: probability = value/255 * row_scale."),
    ]
)

IMAGES = pa.schema(
    [
        _f("run_id", pa.string(), "Run id.", False),
        _f("kind", pa.string(), "'final' (full size, PNG) or 'preview' (decoded predicted x0 of a step)."),
        _f("step_index", pa.int32(), "Step of a preview; -1 for the final image."),
        _f("width", pa.int32(), "Stored image width."),
        _f("height", pa.int32(), "Stored image height."),
        _f("format", pa.string(), "'png' or 'webp'."),
        _f("data", pa.large_binary(), "Encoded image bytes."),
    ]
)

DEPTH = pa.schema(
    [
        _f("run_id", pa.string(), "Run id.", False),
        _f("model_id", pa.string(), "Depth estimator the map came from (hub id or folder)."),
        _f(
            "kind",
            pa.string(),
            "'metric' (ZoeDepth: larger = farther) or 'relative' (DPT, Depth Anything: larger = nearer).",
        ),
        _f("height", pa.int32(), "Map height (the image's)."),
        _f("width", pa.int32(), "Map width."),
        _f("map", pa.list_(pa.float16()), "Depth estimate per image pixel, row-major. Not an attention map."),
        _f("min_value", pa.float32(), "Smallest value of the map."),
        _f("max_value", pa.float32(), "Largest value of the map."),
    ]
)

PROBE_MAPS = pa.schema(
    [
        _f("run_id", pa.string(), "Run id.", False),
        _f("probe", pa.string(), "The probe text, encoded on its own by the run's text encoder ('dog')."),
        _f("token_index", pa.int32(), "Position in the probe text's encoding (not the prompt's)."),
        _f("token_text", pa.string(), "The token's text (one BPE piece)."),
        _f("word_index", pa.int32(), "Index of the probe text's word; null for start/end."),
        _f("word", pa.string(), "The probe word the piece belongs to."),
        _f("kind", pa.string(), "Always 'probe': not a prompt token (the tokens table holds those)."),
        _f("token_kind", pa.string(), "'start', 'word' or 'end' within the probe text."),
        _f(
            "probe_embedding",
            pa.string(),
            "'encoded': the probe text as the text encoder encodes it; 'optimised': the word's token optimised "
            "against object masks of training-split images (OVAM), from the model's probe_tokens.safetensors. "
            "Null in probe files older than schema 1.7 (encoded).",
        ),
        _f("step_index", pa.int32(), "Denoising step, 0 = first.", False),
        _f("timestep", pa.float32(), "Scheduler timestep of that step."),
        _f("map_height", pa.int32(), "Map height (the latent grid)."),
        _f("map_width", pa.int32(), "Map width."),
        _f(
            "daam_map",
            pa.list_(pa.float32()),
            "The probe token's DAAM map at this step, row-major: image queries against the probe's keys (softmax "
            "over the probe text's positions), aggregated as the prompt's level 'all'.",
        ),
        _f("mass", pa.float32(), "Mean of the map."),
        _f("peak", pa.float32(), "Largest value of the map."),
        _f("entropy", pa.float32(), "Normalised entropy 0-1 of the map as a distribution."),
        _f("centroid_x", pa.float32(), "Map-weighted mean x, 0 = left edge, 1 = right edge."),
        _f("centroid_y", pa.float32(), "Map-weighted mean y, 0 = top edge, 1 = bottom edge."),
        _f("spread", pa.float32(), "Map-weighted RMS distance from the centroid, in image widths."),
    ]
)

CONCEPT_MAPS = pa.schema(
    [
        _f("run_id", pa.string(), "Run id.", False),
        _f("concept_index", pa.int32(), "Position of the concept in the run's --concepts list.", False),
        _f("concept", pa.string(), "The concept text ('cat'), encoded on its own by the run's T5."),
        _f("step_index", pa.int32(), "Denoising step, 0 = first.", False),
        _f("timestep", pa.float32(), "Scheduler timestep of that step."),
        _f("block_count", pa.int32(), "Double-stream blocks averaged (FLUX.1: 15-18 of 0-18, scaled to the model)."),
        _f("map_height", pa.int32(), "Map height (the image-token grid)."),
        _f("map_width", pa.int32(), "Map width."),
        _f(
            "map",
            pa.list_(pa.float32()),
            "ConceptAttention (not cross-attention): per pixel, softmax over the concepts of the dot product of the "
            "pixel's and the concept's attention outputs, row-major; a pixel's maps sum to 1 over the concepts.",
        ),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "runs": RUNS,
    "tokens": TOKENS,
    "cross_attention": CROSS_ATTENTION,
    "word_step_stats": WORD_STEP_STATS,
    "self_attention": SELF_ATTENTION,
    "images": IMAGES,
    "depth": DEPTH,  # optional: written later, beside the other files, by `stepx depth`
    "probe_maps": PROBE_MAPS,  # optional: written later, beside the other files, by `stepx probe`
    "concept_maps": CONCEPT_MAPS,  # optional: FLUX.1 runs generated with concepts
}
RUN_FILES: dict[str, str] = {name: f"{name}.parquet" for name in TABLES}
# Tables a complete run may lack: written later beside it (depth, probes) or only for some runs (concepts).
OPTIONAL_FILES: tuple[str, ...] = ("depth", "probe_maps", "concept_maps")
# Small tables the store's index copies into its own segments, so listing and SQL stay fast at scale.
INDEX_TABLES: tuple[str, ...] = ("runs", "tokens", "word_step_stats")


def file_metadata() -> dict[bytes, bytes]:
    """Key-value metadata stamped on every trace file."""
    return {VERSION_KEY: SCHEMA_VERSION.encode()}


VERSION_RE = re.compile(r"\d{1,6}(\.\d{1,6}){0,3}")  # a schema version as written: '1.6'


def check_version(metadata: dict[bytes, bytes] | None, where: str = "file") -> str:
    """Return the file's schema version; raise SchemaVersionError for a newer major version."""
    raw = (metadata or {}).get(VERSION_KEY)
    if raw is None:
        raise SchemaVersionError(f"{where} has no StepX schema version: not a StepX trace file")
    version = raw.decode(errors="replace")
    if VERSION_RE.fullmatch(version) is None:
        raise SchemaVersionError(f"{where} has a malformed StepX schema version {version[:20]!r}: not a StepX file")
    major = int(version.split(".")[0])
    if major > int(SCHEMA_VERSION.split(".")[0]):
        raise SchemaVersionError(
            f"{where} was written with trace schema {version}; this StepX reads up to "
            f"{SCHEMA_VERSION}. Upgrade StepX to read it."
        )
    return version


def conform(table: str, data: pa.Table) -> pa.Table:
    """A table read from a file of this major version with this version's columns, in order: columns a later
    minor version added (always nullable) come back as nulls, so old runs stay readable."""
    arrays = []
    for f in TABLES[table]:
        if f.name in data.column_names:
            arrays.append(data.column(f.name).cast(f.type))
        elif f.nullable:
            arrays.append(pa.nulls(data.num_rows, f.type))
        else:
            raise SchemaVersionError(f"a {table} file has no {f.name!r} column: not a StepX trace file")
    return pa.Table.from_arrays(arrays, schema=TABLES[table])


def column_docs(table: str) -> list[tuple[str, str, str]]:
    """(column, type, comment) for each column of a table, for the SQL console's docs."""
    return [(f.name, str(f.type), (f.metadata or {}).get(b"doc", b"").decode()) for f in TABLES[table]]
