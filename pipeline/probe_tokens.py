"""Probe-token optimisation (OVAM's, Marcos-Manchon et al., CVPR 2024): a probe word's token, tuned on masks.

A lone probe word ("square") is encoded out of the context the model was trained with, so its map can miss its
object. OVAM treats the word's text-encoder output as a free vector and fits it so that its attention map on a
few annotated generations matches the objects' masks; the vector is then reused on new images with no masks.

Here: each annotated generation is run once with `pipeline.probe.ProbeCapture` keeping every down/up-block
cross-attention layer's conditional image queries per step. The loss re-derives the probe's map from those
queries against `to_k` of the probe's encoder states (the word's position(s) replaced by the free vector),
softmax over the probe text's positions, aggregated by `pipeline.daam.daam_sum`, the one DAAM aggregation the
capture uses, summed over steps; then binary cross-entropy between the max-normalised map and the mask, Adam.
Tokens are saved with their provenance (words, source scenes, iterations, losses, the model's fingerprint) as
safetensors beside the model (`probe_tokens.safetensors`); probes use them only on the weights they were fitted to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipeline.capture import AttentionRecorder, CapturePlan, plan_grids
from pipeline.daam import daam_sum
from pipeline.generate import GenerationConfig, run_pipeline
from pipeline.models import PROBE_TOKENS, LoadedModel
from pipeline.probe import ProbeCapture, probe_embeds, word_positions

TOKENS_FILE = PROBE_TOKENS  # beside the model's weights; left out of the folder's fingerprint
META_KEY = "stepx.probe_tokens"


class ProbeTokensError(ValueError):
    """A tokens file that can't be used (unreadable, another model's weights, a word of several pieces...)."""


@dataclass
class Queries:
    """One generation's conditional image queries per DAAM layer: name -> (steps, heads, queries, d)."""

    latent: tuple[int, int]
    layers: dict[str, tuple[tuple[int, int], float]]  # name -> (grid, scale)
    queries: dict[str, torch.Tensor]
    image: np.ndarray  # the final image (H, W, 3) uint8, to annotate


@dataclass
class Example:
    """One annotated generation: its queries and, per word, the object's mask on the latent grid (0-1)."""

    queries: Queries
    masks: dict[str, np.ndarray]
    source: str  # where the scene came from ('training_scene(50000001)')


@dataclass
class ProbeTokens:
    """Optimised probe tokens: word -> (pieces, dim) vectors, with their provenance."""

    vectors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)  # model_fingerprint, and per word: sources, iterations, losses

    def save(self, path: Path) -> Path:
        """Write the tokens as safetensors, provenance as JSON in the file's metadata."""
        path = Path(path)
        tensors = {w: v.detach().float().cpu().contiguous() for w, v in self.vectors.items()}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(self.meta, sort_keys=True)})
            tmp.replace(path)  # whole or not at all
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: Path) -> ProbeTokens:
        """Read a tokens file; ProbeTokensError (one line) when it isn't one."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
                vectors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise ProbeTokensError(f"{path}: not a probe tokens file ({str(exc)[:80]})") from None
        if not isinstance(meta, dict):
            raise ProbeTokensError(f"{path}: not a probe tokens file (no {META_KEY} metadata)")
        return cls(vectors, meta)

    def for_model(self, model: LoadedModel) -> dict[str, torch.Tensor]:
        """The vectors, if they were fitted to this model's weights; ProbeTokensError saying why not."""
        fitted = self.meta.get("model_fingerprint")
        if fitted != model.fingerprint:
            raise ProbeTokensError(
                f"probe tokens were optimised for other weights (fingerprint {fitted}, model {model.fingerprint}); "
                "optimise them again (`stepx probe-tune`)"
            )
        width = model.pipe.text_encoder.config.hidden_size
        for word, vec in self.vectors.items():
            if vec.ndim != 2 or vec.shape[1] != width or not vec.is_floating_point() or not torch.isfinite(vec).all():
                raise ProbeTokensError(
                    f"probe token {word[:40]!r}: expected finite floats of shape (word pieces, {width}), "
                    f"got {vec.dtype} {tuple(vec.shape)}"
                )
        return self.vectors


def record_queries(model: LoadedModel, cfg: GenerationConfig) -> Queries:
    """Generate `cfg` (untouched) and keep each DAAM layer's conditional image queries at every step."""
    cfg = cfg.resolved(model)
    pipe = model.pipe
    with torch.no_grad():
        dummy = pipe.encode_prompt("", model.device, 1, False)[0]  # a probe the capture needs; its maps are unused

    def start(sample: torch.Tensor) -> list[AttentionRecorder]:
        latent = (int(sample.shape[-2]), int(sample.shape[-1]))
        self_grid, step_grid, _ = plan_grids(pipe.unet, latent)
        plan = CapturePlan(latent, (0,), self_grid, step_grid, sample.shape[0] == 2, cfg.guidance)
        return [AttentionRecorder(plan)]

    capture = ProbeCapture(pipe, [dummy], start, keep_queries=True)
    image, recorders = capture.around(lambda: run_pipeline(model, cfg))
    per_layer: dict[str, list[torch.Tensor]] = {}
    layers: dict[str, tuple[tuple[int, int], float]] = {}
    for _step, name, level, query, scale in capture.queries:
        per_layer.setdefault(name, []).append(query)
        layers[name] = ((level[0], level[1]), scale)
    queries = {name: torch.stack(qs) for name, qs in per_layer.items()}  # (steps, heads, queries, d)
    return Queries(recorders[0].plan.latent, layers, queries, np.asarray(image))


def probe_heat(unet: torch.nn.Module, q: Queries, states: torch.Tensor, keep: Sequence[int]) -> torch.Tensor:
    """The probe's DAAM map (steps summed, kept tokens averaged) from recorded queries: (H, W), differentiable.

    `states` are the probe's (positions, dim) encoder states; the map is the one `compute_probes` stores.
    """
    total, maps = None, 0
    keep_t = torch.tensor(list(keep), device=states.device)
    for name, (grid, scale) in q.layers.items():
        attn = unet.get_submodule(name)
        s = attn.norm_encoder_hidden_states(states[None])[0] if attn.norm_cross else states
        key = attn.to_k(s)  # (positions, heads*d)
        key = key.view(key.shape[0], attn.heads, -1).transpose(0, 1)  # (heads, positions, d)
        query = q.queries[name].to(states.device)  # (steps, heads, queries, d)
        probs = ((query * scale) @ key.transpose(-1, -2)[None]).softmax(dim=-1)  # (steps, heads, queries, positions)
        kept = probs.index_select(-1, keep_t).flatten(0, 1)  # (steps*heads, queries, tokens)
        part = daam_sum(kept, grid, q.latent)  # (tokens, H, W), steps summed
        total = part if total is None else total + part
        maps += attn.heads
    return (total / maps).mean(dim=0)  # per-step DAAM divides by a step's (layer, head) maps; tokens averaged


def mask_loss(heat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy between the max-normalised map and the mask (OVAM's objective)."""
    norm = (heat / heat.max().clamp(min=1e-12)).clamp(1e-6, 1 - 1e-6)
    return torch.nn.functional.binary_cross_entropy(norm, mask)


def optimise_token(
    model: LoadedModel,
    word: str,
    examples: Sequence[Example],
    iterations: int = 150,
    lr: float = 0.1,
    log: Callable[[str], None] | None = None,
    check: Sequence[Example] = (),
) -> tuple[torch.Tensor, dict]:
    """Fit one probe word's token on the examples that have a mask for it; returns (pieces, dim) and its record.

    With `check` (examples not fitted on), the record also says how often the map's centroid falls on the mask
    there, plain ('check_plain') and fitted ('check_optimised')."""
    used = [e for e in examples if word in e.masks]
    if not used:
        raise ProbeTokensError(f"no annotated example has a mask for {word!r}")
    pipe = model.pipe
    tokens, embeds, _ = probe_embeds(pipe, model.device, [word])
    pos = word_positions(tokens[0])
    keep = [t.token_index for t in tokens[0] if t.has_map and t.kind == "word"]
    if not pos:
        raise ProbeTokensError(f"{word!r} has no word token to optimise")
    base = embeds[0][0].detach().float()  # (positions, dim)
    vec = base[pos].clone().requires_grad_(True)
    masks = [torch.tensor(e.masks[word], dtype=torch.float32, device=base.device) for e in used]
    unet = pipe.unet
    for p in unet.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([vec], lr=lr)

    def loss_of(v: torch.Tensor) -> torch.Tensor:
        states = base.index_put((torch.tensor(pos, device=base.device),), v)
        losses = [mask_loss(probe_heat(unet, e.queries, states, keep), m) for e, m in zip(used, masks, strict=True)]
        return torch.stack(losses).mean()

    with torch.no_grad():
        first = float(loss_of(vec))
    for it in range(iterations):
        opt.zero_grad()
        loss = loss_of(vec)
        loss.backward()
        opt.step()
        if log is not None and (it % 50 == 0 or it == iterations - 1):
            log(f"{word}: iteration {it} loss {loss.item():.4f}")
    with torch.no_grad():
        last = float(loss_of(vec))
    record = {
        "examples": len(used),
        "sources": [e.source for e in used],
        "iterations": iterations,
        "lr": lr,
        "loss_before": first,
        "loss_after": last,
    }
    checked = [e for e in check if word in e.masks]
    if checked:
        with torch.no_grad():
            for name, v in (("check_plain", base[pos]), ("check_optimised", vec)):
                states = base.index_put((torch.tensor(pos, device=base.device),), v)
                hits = [centroid_on(probe_heat(unet, e.queries, states, keep), e.masks[word]) for e in checked]
                record[name] = sum(hits) / len(hits)
        record["check_examples"] = len(checked)
    return vec.detach(), record


def centroid_on(heat: torch.Tensor, mask: np.ndarray) -> bool:
    """Whether a (H, W) map's centroid falls in a cell at least half covered by the (H, W) mask."""
    h, w = heat.shape
    total = heat.sum().clamp(min=1e-12)
    cy = float((heat.sum(dim=1) * (torch.arange(h, device=heat.device) + 0.5)).sum() / total)
    cx = float((heat.sum(dim=0) * (torch.arange(w, device=heat.device) + 0.5)).sum() / total)
    return bool(mask[min(h - 1, int(cy)), min(w - 1, int(cx))] >= 0.5)


def optimise_tokens(
    model: LoadedModel,
    words: Sequence[str],
    examples: Sequence[Example],
    iterations: int = 150,
    lr: float = 0.1,
    log: Callable[[str], None] | None = None,
    check_every: int = 4,
) -> ProbeTokens:
    """Fit each word's token (`optimise_token`) and bundle them with the model's fingerprint.

    A token is kept only if it earns its place: fitted without every `check_every`-th of the word's examples,
    its centroid must land on the mask of those held-out examples more often than the plain word's does. A kept
    token is then fitted on all the word's examples; a dropped word stays plain, its record saying why. A word with
    fewer than `check_every` examples can't be checked and is dropped; `check_every=1` keeps every token unchecked.
    """
    vectors, per_word = {}, {}
    for word in words:
        mine = [e for e in examples if word in e.masks]
        held = mine[check_every - 1 :: check_every] if check_every > 1 else []
        gate: dict = {}
        if check_every > 1 and not held:
            why = f"{len(mine)} example(s): too few for a held-out check (needs {check_every})"
            per_word[word] = {"kept": False, "examples": len(mine), "why": why}
            if log is not None:
                log(f"{word}: dropped ({why})")
            continue
        if held:
            fit = [e for i, e in enumerate(mine) if (i + 1) % check_every]
            _, rec = optimise_token(model, word, fit, iterations, lr, None, check=held)
            gate = {k: rec[k] for k in ("check_examples", "check_plain", "check_optimised")}
            if gate["check_optimised"] <= gate["check_plain"]:
                per_word[word] = {"kept": False, "examples": len(mine), **gate}
                if log is not None:
                    log(
                        f"{word}: dropped (held out: optimised {gate['check_optimised']:.2f} <= plain "
                        f"{gate['check_plain']:.2f})"
                    )
                continue
        vectors[word], per_word[word] = optimise_token(model, word, examples, iterations, lr, log)
        per_word[word] |= {"kept": True, **gate}
    meta = {"model_fingerprint": model.fingerprint, "model_id": model.model_id, "words": per_word}
    return ProbeTokens(vectors, meta)
