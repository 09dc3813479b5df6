"""Probe tokens for the shapes model: OVAM token optimisation on training-split scenes, and the lone-word probe rate.

stepx probe-tune --scenes 64 --iterations 150 --out data/models/shapes/probe_tokens.safetensors

Annotations are generations of training scenes (`scenes.training_scene` with seeds far above the training data's)
with each drawn object's mask as the checker finds it in the generated image (`check.check_image`), on the latent
grid. No evaluation scene is read while fitting; `probe_rate` measures a split afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from pipeline.generate import GenerationConfig, generate_trace
from pipeline.models import LoadedModel
from pipeline.probe import OPTIMISED, compute_probes
from pipeline.probe_tokens import Example, ProbeTokens, optimise_tokens, record_queries
from schema.stats import map_stats
from shapes import splits
from shapes.check import check_image
from shapes.scenes import COLOURS, SHAPES, Scene, parse_caption, training_scene

WORDS = (*SHAPES, *COLOURS)  # circle, square, triangle, red, green, blue, yellow
FIRST_SEED = 50_000_000  # training-scene seeds far above the training data's (0-79,999)


def latent_mask(mask: np.ndarray, latent: tuple[int, int]) -> np.ndarray:
    """A boolean image mask as the share of each latent cell it covers (0-1)."""
    h, w = mask.shape
    fy, fx = h // latent[0], w // latent[1]
    return mask[: latent[0] * fy, : latent[1] * fx].reshape(latent[0], fy, latent[1], fx).mean(axis=(1, 3))


def scene_masks(scene: Scene, image: np.ndarray, latent: tuple[int, int]) -> dict[str, np.ndarray]:
    """Per word naming one drawn object unambiguously (a shape unique in the scene, any colour): its mask."""
    checks = check_image(image, parse_caption(scene.caption)).objects
    shapes = [c.spec.shape for c in checks]
    masks = {}
    for c in checks:
        if not (c.present and c.colour_ok) or not c.mask.any():
            continue
        masks[c.spec.colour] = latent_mask(c.mask, latent)
        if shapes.count(c.spec.shape) == 1 and c.shape_ok:
            masks[c.spec.shape] = latent_mask(c.mask, latent)
    return masks


def training_examples(
    model: LoadedModel, n: int, first_seed: int = FIRST_SEED, log: Callable[[str], None] | None = None
) -> list[Example]:
    """Annotated generations of n training scenes (seeds first_seed...; generation seed = scene seed)."""
    out = []
    for seed in range(first_seed, first_seed + n):
        scene = training_scene(seed)
        q = record_queries(model, GenerationConfig(scene.caption, seed=seed))
        masks = scene_masks(scene, q.image, q.latent)
        if masks:
            out.append(Example(q, masks, f"training_scene({seed})"))
        if log is not None:
            log(f"scene {seed}: {scene.caption!r}: masks for {', '.join(masks) or 'nothing drawn'}")
    return out


def tune(
    model: LoadedModel,
    scenes: int = 64,
    iterations: int = 150,
    words: Sequence[str] = WORDS,
    log: Callable[[str], None] | None = None,
) -> ProbeTokens:
    """Optimise the shapes model's probe tokens on `scenes` training scenes."""
    examples = training_examples(model, scenes, log=log)
    tokens = optimise_tokens(
        model, [w for w in words if any(w in e.masks for e in examples)], examples, iterations, log=log
    )
    tokens.meta["source"] = f"shapes.scenes.training_scene seeds {FIRST_SEED}-{FIRST_SEED + scenes - 1}"
    return tokens


def _on(mask: np.ndarray, x: float, y: float) -> bool:
    h, w = mask.shape
    return bool(mask[min(h - 1, int(y * h)), min(w - 1, int(x * w))])


def _centroid_on(heat: np.ndarray, mask: np.ndarray) -> bool:
    stats = map_stats(heat[None])
    return _on(mask, float(stats["centroid_x"][0]), float(stats["centroid_y"][0]))


def _peak_on(heat: np.ndarray, mask: np.ndarray) -> bool:
    py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return _on(mask, (px + 0.5) / heat.shape[1], (py + 0.5) / heat.shape[0])


def probe_rate(
    model: LoadedModel, split: str, n: int, optimised: Mapping[str, torch.Tensor] | None = None
) -> dict[str, dict[str, float]]:
    """Lone-word probes on the first noise seed of n scenes of a split, per kind of word ('shape', 'colour').

    Per drawn object (of the right colour) named by a word unique in its scene (its shape; its colour, always
    unique), how often the lone word's probe map ("square", "red") has its centroid / its peak on the object:
    plain ('on_object', 'peak_on_object') and, given `optimised`, with its tokens ('optimised_...'; a word it has
    no token for stays plain), with the share of such words that had one ('optimised_words'),
    beside the same word's map inside the prompt ('prompt_word_on_object').
    """
    keys = ["objects", "on_object", "peak_on_object", "prompt_word_on_object"]
    keys += ["optimised_on_object", "optimised_peak_on_object", "optimised_words"] if optimised else []
    counts = {kind: dict.fromkeys(keys, 0) for kind in ("shape", "colour")}
    for i, scene in enumerate(splits.suite(split, n)):
        trace = generate_trace(model, GenerationConfig(scene.caption, seed=splits.noise_seeds(split, i, 1)[0]))
        image = np.asarray(trace.final)
        checks = check_image(image, parse_caption(scene.caption)).objects
        shapes = [c.spec.shape for c in checks]
        probes = {}  # word -> (kind, object mask)
        for c in checks:
            if c.colour_ok:
                probes[c.spec.colour] = ("colour", c.mask)
                if shapes.count(c.spec.shape) == 1:
                    probes[c.spec.shape] = ("shape", c.mask)
        if not probes:
            continue
        words = list(probes)
        runs = {"": compute_probes(model, trace.run, image, words)[0]}
        if optimised:
            runs["optimised_"] = compute_probes(model, trace.run, image, words, optimised)[0]
        kept = [t for t in trace.tokens if t.has_map]
        for k, word in enumerate(words):
            kind, mask = probes[word]
            tally = counts[kind]
            tally["objects"] += 1
            if optimised:
                tally["optimised_words"] += runs["optimised_"].embeddings[k] == OPTIMISED
            for prefix, result in runs.items():
                pieces = [j for j, t in enumerate(t for t in result.tokens[k] if t.has_map) if t.kind == "word"]
                heat = result.maps[k][:, pieces].mean(axis=1).sum(axis=0)
                tally[prefix + "on_object"] += _centroid_on(heat, mask)
                tally[prefix + "peak_on_object"] += _peak_on(heat, mask)
            own = [j for j, t in enumerate(kept) if t.kind == "word" and t.word == word]
            tally["prompt_word_on_object"] += _centroid_on(sum(s.daam[own].mean(axis=0) for s in trace.steps), mask)
    return {
        kind: {k: (v if k == "objects" else round(v / max(c["objects"], 1), 3)) for k, v in c.items()}
        for kind, c in counts.items()
    }
