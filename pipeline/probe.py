"""Open-vocabulary probes (the idea of OVAM, Marcos-Manchon et al., CVPR 2024): maps for words not in the prompt.

A probe re-runs a stored run's generation, untouched, and on the side takes each cross-attention layer's
image queries against the keys of a probe text ("dog") encoded by the same text encoder the same way the
prompt was (`pipe.encode_prompt`), through the layer's own `to_k` (LoRA included). Probabilities are the
softmax over the probe text's positions, aggregated exactly as the prompt's DAAM maps are (`pipeline.capture`),
so a probe whose text is the prompt reproduces the prompt's stored maps. The re-run must give the stored final
image bit for bit, or the probe is refused with the reason.

A one-word probe with an optimised token (OVAM's token optimisation, `pipeline.probe_tokens`) takes that token's
vector in place of the text encoder's output at the word's position(s); its rows say 'optimised'.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.capture import AttentionRecorder, CapturePlan, Level, UnetCapture, plan_grids
from pipeline.generate import GenerationConfig, GenerationError, prompt_tokens, run_pipeline
from pipeline.index import is_indexed
from pipeline.models import LoadedModel
from pipeline.trace import TokenInfo
from schema import RUN_FILES, TABLES, file_metadata
from schema.layout import run_dir
from schema.stats import map_stats
from schema.tables import conform

ENCODED, OPTIMISED = "encoded", "optimised"  # probe_maps.probe_embedding


class ProbeRefused(GenerationError):
    """The stored run can't be reproduced here, so no probe is computed (the message says why)."""


@dataclass
class ProbeResult:
    """Per probe text: its tokens, the (steps, tokens, H, W) DAAM maps of its stored tokens, and its embedding
    ('encoded' by the text encoder, or 'optimised' from a tokens file)."""

    texts: list[str]
    tokens: list[list[TokenInfo]]
    maps: list[np.ndarray]
    timesteps: list[float]
    embeddings: list[str] | None = None  # None: all 'encoded'


class ProbeCapture(UnetCapture):
    """UnetCapture whose cross-attention sinks take the image queries against each probe's keys.

    With `keep_queries`, each down/up-block cross-attention layer's conditional image queries are also kept,
    (step, layer name, level, (heads, queries, d) query, scale) per call, for probe-token optimisation.
    """

    def __init__(self, pipe: object, embeds: list[torch.Tensor], start: Callable, keep_queries: bool = False) -> None:
        super().__init__(pipe, start=start)
        self.embeds = embeds  # per probe recorder: (1, positions, dim) encoder states
        self.queries: list[tuple[int, str, Level, torch.Tensor, float]] | None = [] if keep_queries else None
        self.step = -1

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.step += 1
        super()._pre_hook(module, args, kwargs)

    def _sink(self, kind: str, level: Level, name: str) -> Callable:
        if kind != "cross":
            return lambda *_: None
        attn = self.unet.get_submodule(name)

        def sink(query: torch.Tensor, _key: torch.Tensor, _mask: torch.Tensor | None, scale: float) -> None:
            if self.queries is not None and len(level) == 2:  # DAAM's layers: the mid block is left out
                plan = self.recorders[0].plan
                cond = (query.shape[0] // 2 if plan.cfg else 0) + plan.image_index
                self.queries.append((self.step, name, level, query[cond].detach().float().clone(), scale))
            for rec, emb in zip(self.recorders, self.embeds, strict=True):
                states = emb.to(device=query.device, dtype=query.dtype)
                if attn.norm_cross:
                    states = attn.norm_encoder_hidden_states(states)
                key = attn.to_k(states)  # (1, positions, heads*d)
                key = key.view(1, -1, attn.heads, key.shape[-1] // attn.heads).transpose(1, 2)  # (1, heads, P, d)
                rec.observe(kind, level, query, key.expand(query.shape[0], -1, -1, -1), None, scale)

        return sink


def stored_config(run: dict) -> GenerationConfig:
    """The run's generation config from its `config_json`."""
    cfg = json.loads(run["config_json"])
    names = GenerationConfig.__dataclass_fields__
    return GenerationConfig(**{k: v for k, v in cfg.items() if k in names})


def word_positions(tokens: list[TokenInfo]) -> list[int]:
    """Positions of a probe text's word pieces in its encoding."""
    return [t.token_index for t in tokens if t.kind == "word"]


def probe_embeds(
    pipe: object, device: str, texts: Sequence[str], optimised: Mapping[str, torch.Tensor] | None = None
) -> tuple[list[list[TokenInfo]], list[torch.Tensor], list[str]]:
    """Per probe text: its tokens, its (1, positions, dim) encoder states and 'encoded' or 'optimised'.

    A text encoded as the prompt is (`pipe.encode_prompt`); a text that has an optimised token (one vector per
    word piece) takes those vectors at its word positions, the other positions staying the encoder's.
    """
    tokens = [prompt_tokens(pipe.tokenizer, t)[0] for t in texts]
    embeds, kinds = [], []
    with torch.no_grad():
        for text, toks in zip(texts, tokens, strict=True):
            emb = pipe.encode_prompt(text, device, 1, False)[0]  # the prompt's own encoding
            vec = (optimised or {}).get(text.strip())
            pos = word_positions(toks)
            if vec is not None and len(pos) == vec.shape[0]:
                emb = emb.clone()
                emb[0, pos] = vec.to(device=emb.device, dtype=emb.dtype)
                kinds.append(OPTIMISED)
            else:
                kinds.append(ENCODED)
            embeds.append(emb)
    return tokens, embeds, kinds


def check_reproducible(model: LoadedModel, run: dict) -> None:
    """Raise ProbeRefused unless this model can re-run `run` (a UNet `stepx generate` run made with these weights)."""
    if run.get("architecture") not in (None, "unet"):
        raise ProbeRefused(f"probes need a UNet run; run {run['run_id']} is {run['architecture']}")
    if run.get("source") == "record":
        raise ProbeRefused("this run was recorded from your own pipeline: the CLI can't rebuild that pipeline")
    if model.fingerprint != run["model_fingerprint"]:
        raise ProbeRefused(
            f"the model's weights differ from the run's (fingerprint {model.fingerprint}, "
            f"run {run['model_fingerprint']})"
        )


def compute_probes(
    model: LoadedModel,
    run: dict,
    stored_final: np.ndarray,
    texts: Sequence[str],
    optimised: Mapping[str, torch.Tensor] | None = None,
) -> tuple[ProbeResult, np.ndarray]:
    """Re-run `run` with probes for `texts`; raise ProbeRefused unless the final image reproduces bit for bit.

    `optimised` maps a one-word probe text to its optimised token vectors (`pipeline.probe_tokens`)."""
    if not texts:
        raise ValueError("no probe texts given")
    check_reproducible(model, run)
    cfg = stored_config(run).resolved(model)
    pipe = model.pipe
    tokens, embeds, kinds = probe_embeds(pipe, model.device, texts, optimised)

    def start(sample: torch.Tensor) -> list[AttentionRecorder]:
        latent = (int(sample.shape[-2]), int(sample.shape[-1]))
        self_grid, step_grid, _ = plan_grids(pipe.unet, latent)
        cfg_batch = sample.shape[0] == 2
        return [
            AttentionRecorder(
                CapturePlan(
                    latent,
                    tuple(t.token_index for t in toks if t.has_map),
                    self_grid,
                    step_grid,
                    cfg_batch,
                    cfg.guidance,
                )
            )
            for toks in tokens
        ]

    capture = ProbeCapture(pipe, embeds, start)
    final, recorders = capture.around(lambda: run_pipeline(model, cfg))
    final = np.asarray(final)
    if final.shape != stored_final.shape or not np.array_equal(final, stored_final):
        diff = int((final != stored_final).any(axis=-1).sum()) if final.shape == stored_final.shape else -1
        raise ProbeRefused(
            f"the re-run doesn't reproduce run {run['run_id']}'s final image ({diff} pixels differ): "
            "a different device, library version or model state; no probe maps were stored"
        )
    maps = [np.stack([s.daam for s in rec.steps]) for rec in recorders]  # (steps, tokens, H, W)
    return ProbeResult(list(texts), tokens, maps, [s.timestep for s in recorders[0].steps], kinds), final


def probe_table(run_id: str, result: ProbeResult) -> pa.Table:
    """The `probe_maps` rows of a probe result: one row per probe token and step (kind 'probe')."""
    schema = TABLES["probe_maps"]
    cols: dict[str, list] = {f.name: [] for f in schema}
    kinds = result.embeddings or [ENCODED] * len(result.texts)
    for text, toks, maps, emb in zip(result.texts, result.tokens, result.maps, kinds, strict=True):
        stored = [t for t in toks if t.has_map]
        for step, step_maps in enumerate(maps):
            stats = map_stats(step_maps)
            for j, tok in enumerate(stored):
                row = {
                    "run_id": run_id,
                    "probe": text,
                    "token_index": tok.token_index,
                    "token_text": tok.token_text,
                    "word_index": tok.word_index,
                    "word": tok.word,
                    "kind": "probe",
                    "token_kind": tok.kind,
                    "probe_embedding": emb,
                    "step_index": step,
                    "timestep": result.timesteps[step],
                    "map_height": step_maps.shape[1],
                    "map_width": step_maps.shape[2],
                    "daam_map": step_maps[j].reshape(-1).astype(np.float32),
                    **{name: float(v[j]) for name, v in stats.items()},
                }
                for k, v in row.items():
                    cols[k].append(v)
    return pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in schema}, schema=schema)


def write_probes(root: Path, run_id: str, table: pa.Table) -> Path:
    """Store probe maps as probe_maps.parquet in the run's folder, atomically, merged with earlier probes
    (a probe text probed again replaces its rows)."""
    if not is_indexed(root, run_id):  # the id is checked before any path is built from it
        raise FileNotFoundError(f"no run {run_id!r} in the store {root}")
    final = run_dir(root, run_id) / RUN_FILES["probe_maps"]
    if final.is_file():
        old = conform("probe_maps", pq.read_table(final))  # files of an older minor version lack newer columns
        keep = pc.invert(
            pc.is_in(old.column("probe"), value_set=pa.array(sorted(set(table.column("probe").to_pylist()))))
        )
        table = pa.concat_tables([old.filter(keep), table])
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(3)}")
    pq.write_table(table.replace_schema_metadata(file_metadata()), tmp, compression="zstd")
    os.replace(tmp, final)
    return final
