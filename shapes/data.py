"""Training data: scenes encoded once to latents, with caption token ids, which object each token
names, and object masks on the latent grid; plus shape twins and the batch sampler.

Everything here is a pure function of the `Config` (scene `i` has seed `seed * 1_000_003 + i`), so
rendering in several processes, resuming, or building twice gives the same tensors.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTokenizer

from shapes import scenes
from shapes.config import Config
from shapes.util import Logger, atomic_save, to_tensor_images

MAX_OBJECTS = 3  # scenes hold 1-3 objects
CHUNK = 500  # scenes rendered per worker task and encoded per VAE call


def caption_tokens(
    tokenizer: CLIPTokenizer, words: list[tuple[str, int]], max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids (BOS, words, EOS, padding) and the object index of each token (-1 for none)."""
    ids = [tokenizer.bos_token_id]
    owner = [-1]
    for word, obj in words:
        piece = tokenizer.encode(word, add_special_tokens=False)
        ids += piece
        owner += [obj] * len(piece)
    ids.append(tokenizer.eos_token_id)
    owner.append(-1)
    if len(ids) > max_length:
        raise ValueError(f"caption needs {len(ids)} tokens > {max_length}")
    pad = max_length - len(ids)
    return ids + [tokenizer.pad_token_id] * pad, owner + [-1] * pad


def scene_masks(scene: scenes.Scene, grid: int) -> np.ndarray:
    """Object masks as area fractions on a grid x grid latent raster, shape (MAX_OBJECTS, g, g)."""
    out = np.zeros((MAX_OBJECTS, grid, grid), dtype=np.float32)
    for i, obj in enumerate(scene.objects):
        f = obj.mask.shape[0] // grid
        out[i] = obj.mask.reshape(grid, f, grid, f).mean(axis=(1, 3))  # (g, f, g, f) -> cell means
    return out


def scene_seed(cfg: Config, index: int) -> tuple[int, int]:
    """(seed, object count) of training scene `index`: the data is a pure function of the config."""
    return cfg.seed * 1_000_003 + index, 1 + index % 3


def shape_twin(scene: scenes.Scene, rng: np.random.Generator) -> scenes.Scene:
    """The scene with every object redrawn as another shape, never a held-out combination."""
    shapes = []
    for obj in scene.objects:
        options = [
            s for s in scenes.SHAPES if s != obj.spec.shape and not scenes.is_heldout(obj.spec.colour, s, obj.position)
        ]
        shapes.append(str(rng.choice(options)))
    return scenes.redraw(scene, shapes)


def _render_chunk(seeds: list[tuple[int, int]], size: int) -> list[scenes.Scene]:
    """Training scenes for (seed, object count) pairs (a worker process's share of the data)."""
    return [scenes.training_scene(seed, n_objects=k, size=size) for seed, k in seeds]


def build_data(
    cfg: Config,
    work: Path,
    vae: AutoencoderKL,
    sf: float,
    tokenizer: CLIPTokenizer,
    log: Logger,
    workers: int = 1,
) -> dict[str, torch.Tensor]:
    """Encode the training scenes once (latents, token ids, token owners, latent-grid masks).

    Scenes depend only on their seed, so rendering in `workers` processes gives the same data.
    Cached as `data.pt` in the work folder.
    """
    path = work / "data.pt"
    if path.exists():
        return torch.load(path, weights_only=False, map_location="cpu")
    start = time.time()
    grid = cfg.latent_size
    n = cfg.n_scenes
    latents = torch.zeros(n, cfg.latent_channels, grid, grid)
    ids = torch.zeros(n, cfg.max_length, dtype=torch.long)
    owner = torch.zeros(n, cfg.max_length, dtype=torch.int8)
    masks = torch.zeros(n, MAX_OBJECTS, grid, grid, dtype=torch.float16)
    count = torch.zeros(n, dtype=torch.int8)
    device = next(vae.parameters()).device
    seeds = [[scene_seed(cfg, i) for i in range(lo, min(n, lo + CHUNK))] for lo in range(0, n, CHUNK)]
    sizes = [cfg.image_size] * len(seeds)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    rendered = pool.map(_render_chunk, seeds, sizes) if pool else map(_render_chunk, seeds, sizes)
    for lo, batch in zip(range(0, n, CHUNK), rendered, strict=True):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            lat = vae.encode(to_tensor_images([s.image for s in batch]).to(device)).latent_dist.mean.float()
        latents[lo : lo + len(batch)] = lat.cpu() * sf
        for j, s in enumerate(batch):
            tok, own = caption_tokens(tokenizer, s.words, cfg.max_length)
            ids[lo + j] = torch.tensor(tok)
            owner[lo + j] = torch.tensor(own, dtype=torch.int8)
            masks[lo + j] = torch.from_numpy(scene_masks(s, grid))
            count[lo + j] = len(s.objects)
        if lo % 10000 == 0:
            log(f"data: {lo + len(batch)}/{n} scenes encoded ({time.time() - start:.0f} s)")
    if pool:
        pool.shutdown()
    data = {"latents": latents, "ids": ids, "owner": owner, "masks": masks, "count": count}
    atomic_save(data, path)
    log(f"data: {n} scenes in {time.time() - start:.0f} s, latent std {latents.std():.3f}")
    return data


def count_pools(data: dict[str, torch.Tensor]) -> dict[int, np.ndarray]:
    """Indices of the scenes with 1, 2 and 3 objects (what the curriculum draws from)."""
    count = data["count"].numpy()
    return {c: np.nonzero(count == c)[0] for c in range(1, MAX_OBJECTS + 1)}


def sample_batch(cfg: Config, step: int, pools: dict[int, np.ndarray]) -> torch.Tensor:
    """Indices for one batch under the object-count curriculum; deterministic in (seed, step)."""
    rng = np.random.default_rng([cfg.seed, step, 31])
    if step < cfg.curriculum[0]:
        probs = [1.0, 0.0, 0.0]
    elif step < cfg.curriculum[1]:
        probs = [0.5, 0.5, 0.0]
    else:
        probs = [0.25, 0.4, 0.35]
    counts = rng.choice(3, size=cfg.batch, p=probs) + 1
    idx = [int(pools[int(c)][rng.integers(len(pools[int(c)]))]) for c in counts]
    return torch.tensor(idx)
