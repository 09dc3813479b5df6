"""Probe tokens for the shapes model: OVAM token optimisation on training-split scenes, and the lone-word probe rate.

stepx probe-tune --scenes 64 --iterations 150   # writes data/models/shapes/probe_tokens.safetensors

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


def probe_rate(
    model: LoadedModel, split: str, n: int, optimised: Mapping[str, torch.Tensor] | None = None
) -> dict[str, float]:
    """Over the first noise seed of n scenes of a split: per drawn object whose shape is unique in its scene, how
    often the lone shape word's probe map ("square") has its centroid / its peak on the object, plain and (given
    `optimised`) with optimised tokens, beside the prompt's own word's map."""
    counts = dict.fromkeys(["objects", "on_object", "peak_on_object", "prompt_word_on_object"], 0)
    if optimised:
        counts |= {"optimised_on_object": 0, "optimised_peak_on_object": 0}
    for i, scene in enumerate(splits.suite(split, n)):
        trace = generate_trace(model, GenerationConfig(scene.caption, seed=splits.noise_seeds(split, i, 1)[0]))
        image = np.asarray(trace.final)
        checks = check_image(image, parse_caption(scene.caption)).objects
        names = [o.spec.shape for o in scene.objects]
        probes = [s for s in dict.fromkeys(names) if names.count(s) == 1 and checks[names.index(s)].colour_ok]
        if not probes:
            continue
        kept = [t for t in trace.tokens if t.has_map]
        runs = {"": compute_probes(model, trace.run, image, probes)[0]}
        if optimised:
            result = compute_probes(model, trace.run, image, probes, optimised)[0]
            assert result.embeddings == [OPTIMISED] * len(probes), result.embeddings
            runs["optimised_"] = result
        for k, shape in enumerate(probes):
            mask = checks[names.index(shape)].mask
            counts["objects"] += 1
            for prefix, result in runs.items():
                word = [j for j, t in enumerate(t for t in result.tokens[k] if t.has_map) if t.kind == "word"]
                heat = result.maps[k][:, word].mean(axis=1).sum(axis=0)
                stats = map_stats(heat[None])
                counts[prefix + "on_object"] += _on(mask, float(stats["centroid_x"][0]), float(stats["centroid_y"][0]))
                py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
                counts[prefix + "peak_on_object"] += _on(mask, (px + 0.5) / heat.shape[1], (py + 0.5) / heat.shape[0])
            own = [j for j, t in enumerate(kept) if t.kind == "word" and t.word == shape]
            heat = sum(s.daam[own].mean(axis=0) for s in trace.steps)
            stats = map_stats(heat[None])
            counts["prompt_word_on_object"] += _on(mask, float(stats["centroid_x"][0]), float(stats["centroid_y"][0]))
    total = max(counts["objects"], 1)
    return {k: (v if k == "objects" else round(v / total, 3)) for k, v in counts.items()}
