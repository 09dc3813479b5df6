"""Train StepX's small "shapes" text-to-image model on procedural scenes, on CPU.

    python -m shapes.train --out data/models/shapes --work data/models/.train \
        [--minutes N] [--resume] [--export-only]

Stages, each resumable from files in the work folder:

1. VAE (`vae.pt`): an `AutoencoderKL` (16, 32, 64) that maps 64 px images to a 16 x 16 x 4 latent,
   trained a few minutes on 32 px crops of rendered scenes with an object-weighted L1 + MSE loss.
2. Data (`data.pt`): training scenes (no held-out combinations) encoded once to latents, with
   caption token ids, which tokens name which object, and object masks on the latent grid.
3. Denoiser (`ckpt.pt`): a CLIP-style text encoder and a cross-attention `UNet2DConditionModel`
   trained jointly with epsilon loss (min-SNR-5, offset noise, 10% caption dropout, EMA) plus an
   attention-grounding loss in the spirit of TokenCompose (Wang et al., CVPR 2024): each
   object's size, colour, shape and position tokens must put their cross-attention inside that
   object's mask, and background pixels must not attend to object tokens.

Checkpoints go to the work folder every few minutes (atomic replace); `--resume` continues from
the latest. Progress and periodic held-out evaluations are appended to `<work>/log.txt`. At the
end, or with `--export-only`, the EMA weights are saved as a diffusers `StableDiffusionPipeline`
(safetensors) with a README model card.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from shapes import scenes

TOKENIZER_DIR = Path("data/tokenizers/clip")
MAX_OBJECTS = 3


@dataclass
class Config:
    """Every knob of the recipe; stored in checkpoints and the model card."""

    seed: int = 0
    image_size: int = 64
    max_length: int = 32
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    vae_minutes: float = 6.0
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    # data
    n_scenes: int = 80000
    # text encoder
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_ff: int = 512
    # UNet
    unet_channels: tuple[int, ...] = (32, 64, 128)
    # SD's pattern: cross-attention at every level but the coarsest down block, and in the mid
    # block. (A variant without down-path attention at 16 x 16 and a 2 x 2 bottom level learned
    # colour more slowly: colour right 0.50 at step 1,869 vs 0.73 at step 747 for this layout.)
    unet_down: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    unet_up: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    unet_mid: str = "UNetMidBlock2DCrossAttn"
    unet_heads: int = 4
    norm_groups: int = 8
    # denoiser training
    batch: int = 24
    lr: float = 5e-4
    text_lr_mult: float = 3.0
    weight_decay: float = 0.01
    warmup: int = 100
    ema_decay: float = 0.999
    min_snr: float = 5.0
    offset_noise: float = 0.1
    cond_drop: float = 0.1
    ground_weight: float = 0.1
    ground_bg_weight: float = 1.0
    ground_bg_stop: int = 2404  # step from which the background term is off (-1: never)
    ground_pixel_weight: float = 1.0
    ground_own_weight: float = 1.0
    ground_own_start: int = 1066  # step from which the ownership term is on
    # From step `ground_layout_start`, at timesteps >= `ground_layout_t` (where no object is visible
    # yet) only position words are grounded: a causal text encoder cannot put position into the
    # colour and shape words that come before them, so grounding those there asks the impossible.
    ground_layout_t: int = 700
    # The SD schedule keeps 6.8% of the scene at t = 999, so a model trained on it finds the layout
    # in that residue and never learns to take it from the text, while sampling starts from pure
    # noise (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", 2024). From
    # `layout_noise_start`, a share `layout_noise_p` of each batch is drawn at t >= `layout_noise_t`
    # from pure noise, with the matching noise target, so grounding there must come from the text.
    layout_noise_p: float = 0.25
    layout_noise_t: int = 950
    layout_noise_start: int = 8811  # -1: never
    ground_layout_start: int = 6470  # -1: never
    # Shape words: by step 17,674 the model followed colour and place but drew the shape the noise
    # suggested (same seed, "circle" or "square": the same picture), because the denoising loss
    # hardly changes between a circle and a square of 12 px. From `shape_contrast_start`,
    # `shape_contrast_n` samples per step get a counterfactual twin: the same scene redrawn with
    # other shapes. On one noisy input of the true scene (t >= `shape_contrast_t`), the change in
    # predicted noise from the true caption to the twin's must equal the change that the twin's
    # scene implies; the error is taken relative to that change, so every t counts alike.
    # (Shipped run: right shape 0.38 at step 17,674 -> 0.83 at 21,789; objects correct kept at 1.0.)
    shape_contrast_start: int = 17674  # -1: never
    shape_contrast_n: int = 8
    shape_contrast_t: int = 300
    shape_contrast_weight: float = 0.05
    curriculum: tuple[int, int] = (400, 1200)  # steps of 1-object only, then of 1-2 objects
    bf16: bool = True
    # bookkeeping
    ckpt_minutes: float = 5.0
    eval_minutes: float = 10.0
    eval_prompts: int = 24
    eval_guidance: float = 2.5
    eval_steps: int = 20


# ----------------------------------------------------------------------------- models


def make_tokenizer(cfg: Config) -> CLIPTokenizer:
    """CLIP's BPE tokenizer (CLIP's ids) cut to the model's short context."""
    return CLIPTokenizer(
        vocab=str(TOKENIZER_DIR / "vocab.json"),
        merges=str(TOKENIZER_DIR / "merges.txt"),
        model_max_length=cfg.max_length,
    )


def make_vae(cfg: Config) -> AutoencoderKL:
    """A 4x-downsampling KL autoencoder (64 px -> 16 x 16 x 4)."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=8,
        sample_size=cfg.image_size,
        mid_block_add_attention=False,
    )


def make_text_encoder(cfg: Config) -> CLIPTextModel:
    """A small causal CLIP text transformer over CLIP's 49,408-token vocabulary."""
    conf = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_ff,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=cfg.text_hidden,
    )
    return CLIPTextModel(conf)


def make_unet(cfg: Config) -> UNet2DConditionModel:
    """SD-style UNet; which levels carry cross-attention is part of the recipe (`Config.unet_down`...)."""
    latent = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=cfg.unet_down,
        up_block_types=cfg.unet_up,
        mid_block_type=cfg.unet_mid,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,
        norm_num_groups=cfg.norm_groups,
    )


def make_train_scheduler() -> DDPMScheduler:
    """Stable Diffusion's noise schedule (scaled_linear, 1000 steps, steps_offset=1)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )


def make_sample_scheduler() -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M) on the training schedule, for 20-step sampling."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )


class AttentionStore:
    """Collects head-averaged cross-attention probabilities while `active`."""

    def __init__(self) -> None:
        self.active = False
        self.maps: list[torch.Tensor] = []

    def clear(self) -> None:
        """Drop the maps collected so far."""
        self.maps = []


class RecordingCrossAttnProcessor:
    """Cross-attention computed explicitly so its softmax can be recorded (with gradients)."""

    def __init__(self, store: AttentionStore) -> None:
        self.store = store

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """Standard attention; stores mean-over-heads probabilities (B, HW, T) when active."""
        b, n, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        v = attn.to_v(context)
        h = attn.heads
        q, k, v = (x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2) for x in (q, k, v))
        scores = (q @ k.transpose(-1, -2)).float() * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(dim=-1)
        if self.store.active:
            self.store.maps.append(probs.mean(dim=1))
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, -1)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def install_recorder(unet: UNet2DConditionModel, store: AttentionStore) -> None:
    """Route every cross-attention (`attn2`) of the UNet through a recording processor."""
    procs = {}
    for name, proc in unet.attn_processors.items():
        procs[name] = RecordingCrossAttnProcessor(store) if "attn2" in name else proc
    unet.set_attn_processor(procs)


# ----------------------------------------------------------------------------- helpers


class Logger:
    """Appends timestamped lines to the log file and echoes them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str) -> None:
        """Write one line."""
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        print(line, flush=True)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename over the target."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def to_tensor_images(batch: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC images -> float NCHW in [-1, 1]."""
    arr = np.stack(batch).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


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
        out[i] = obj.mask.reshape(grid, f, grid, f).mean(axis=(1, 3))
    return out


# ----------------------------------------------------------------------------- stage 1: VAE


def vae_loss_weights(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel weights (B, 1, H, W): 10 on object pixels, 1 on the plain background."""
    bg = torch.tensor(scenes.BACKGROUND, dtype=x.dtype).view(1, 3, 1, 1) / 127.5 - 1.0
    fg = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.05).to(x.dtype)
    return 1.0 + 9.0 * fg


def train_vae(cfg: Config, work: Path, log: Logger) -> tuple[AutoencoderKL, float]:
    """Train (or load) the VAE; returns it with the latent scaling factor.

    Trained on random 32 px crops (aligned to the 4 px latent cells) with bf16 autocast and an
    object-weighted L1 + MSE loss, so the flat background does not drown out colour errors.
    """
    path = work / "vae.pt"
    vae = make_vae(cfg)
    if path.exists():
        blob = torch.load(path, weights_only=False, map_location="cpu")
        vae.load_state_dict(blob["state"])
        return vae.eval(), float(blob["scaling_factor"])
    torch.manual_seed(cfg.seed)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    n_params = sum(p.numel() for p in vae.parameters())
    log(f"vae: training {n_params / 1e6:.2f}M params for {cfg.vae_minutes} min")
    start = time.time()
    step = 0
    limit = cfg.vae_minutes * 60
    crop = cfg.image_size // 2
    while time.time() - start < limit:
        frac = (time.time() - start) / limit
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * (0.5 * (1 + math.cos(math.pi * frac)) * 0.9 + 0.1)
        rng = np.random.default_rng([cfg.seed, step, 17])
        seeds = [10_000_000 + step * cfg.vae_batch + i for i in range(cfg.vae_batch)]
        crops = []
        for s in seeds:
            image = scenes.training_scene(s, size=cfg.image_size).image
            y, x = (rng.integers(0, (cfg.image_size - crop) // 4 + 1, size=2) * 4).tolist()
            crops.append(image[y : y + crop, x : x + crop])
        x = to_tensor_images(crops)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        w = vae_loss_weights(x)
        err = rec.float() - x
        l1 = (err.abs() * w).mean() / w.mean()
        mse = (err.pow(2) * w).mean() / w.mean()
        kl = post.kl().float().mean()
        loss = l1 + mse + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(
                f"vae step {step} weighted l1 {l1.item():.4f} mse {mse.item():.4f} "
                f"kl {kl.item():.1f} {(step + 1) / (time.time() - start):.2f} it/s"
            )
        step += 1
    vae.eval()
    from shapes.check import check_objects

    with torch.no_grad():
        held = [scenes.training_scene(20_000_000 + i, size=cfg.image_size) for i in range(256)]
        x = to_tensor_images([s.image for s in held])
        lat = vae.encode(x).latent_dist.mean
        rec = vae.decode(lat).sample
        l1 = (rec - x).abs().mean().item()
    images = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    judged = [
        c.correct for s, im in zip(held, images, strict=True) for c in check_objects(im, [o.spec for o in s.objects])
    ]
    sf = float(1.0 / lat.std())
    log(
        f"vae done: {step} steps, held-out L1 {l1:.4f}, reconstructions judged correct "
        f"{np.mean(judged):.3f}, scaling_factor {sf:.4f}"
    )
    atomic_save(
        {
            "state": vae.state_dict(),
            "scaling_factor": sf,
            "l1": l1,
            "steps": step,
            "recon_correct": float(np.mean(judged)),
            "seconds": time.time() - start,
        },
        path,
    )
    return vae, sf


# ----------------------------------------------------------------------------- stage 2: data


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
    """
    path = work / "data.pt"
    if path.exists():
        return torch.load(path, weights_only=False, map_location="cpu")
    start = time.time()
    grid = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    n = cfg.n_scenes
    latents = torch.zeros(n, cfg.latent_channels, grid, grid)
    ids = torch.zeros(n, cfg.max_length, dtype=torch.long)
    owner = torch.zeros(n, cfg.max_length, dtype=torch.int8)
    masks = torch.zeros(n, MAX_OBJECTS, grid, grid, dtype=torch.float16)
    count = torch.zeros(n, dtype=torch.int8)
    chunk = 500
    device = next(vae.parameters()).device
    seeds = [[scene_seed(cfg, i) for i in range(lo, min(n, lo + chunk))] for lo in range(0, n, chunk)]
    sizes = [cfg.image_size] * len(seeds)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    rendered = pool.map(_render_chunk, seeds, sizes) if pool else map(_render_chunk, seeds, sizes)
    for lo, batch in zip(range(0, n, chunk), rendered, strict=True):
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


# ----------------------------------------------------------------------------- stage 3: denoiser


def grounding_loss(
    maps: list[torch.Tensor],
    owner: torch.Tensor,
    masks16: torch.Tensor,
    keep: torch.Tensor,
    cfg: Config,
    step: int,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """TokenCompose-style token + pixel losses plus background and ownership terms, layer mean.

    The ownership term is a per-pixel cross-entropy: of the attention a pixel inside object k
    gives to object words, the share going to object k's own words should be 1. It breaks the
    symmetric solution in which every object word attends to every object alike.

    The background term (attention that pixels outside every object give to object words) is
    switched off at `ground_bg_stop`: at high noise no pixel can tell whether it lies inside an
    object, so it taught the model to ignore object words there, and the layout could not follow
    the text. The shipped recipe keeps the schedule the committed model was trained with.

    maps: per cross-attention layer (B, HW, T) head-averaged probabilities; owner (B, T) object
    index per token (-1 none); masks16 (B, K, 16, 16) area fractions; keep (B,) bool, samples
    whose caption was not dropped; step: the training step (for the term schedules); allowed
    (B, T) bool, tokens that may be grounded (None: all).
    """
    bg_weight = cfg.ground_bg_weight if cfg.ground_bg_stop < 0 or step < cfg.ground_bg_stop else 0.0
    own_weight = cfg.ground_own_weight if step >= cfg.ground_own_start else 0.0
    k = masks16.shape[1]
    sel = (owner.unsqueeze(1) == torch.arange(k, device=owner.device).view(1, k, 1)).float() * keep.view(-1, 1, 1)
    if allowed is not None:
        sel = sel * allowed.unsqueeze(1).float()
    tok_any = sel.sum(1)  # (B, T) 1 where the token names an object
    has_words = (sel.sum(-1) > 0).float()  # (B, K) objects with a grounded word (kept captions only)
    n_tok = tok_any.sum().clamp(min=1.0)
    total_tok = total_pix = total_bg = total_own = torch.zeros((), device=owner.device)
    mass = 0.0
    for probs in maps:
        hw = probs.shape[1]
        side = math.isqrt(hw)
        m = masks16 if side == masks16.shape[-1] else F.adaptive_avg_pool2d(masks16, side)
        m = m.flatten(2)  # (B, K, HW)
        target = torch.einsum("bkt,bkp->bpt", sel, m)  # per token: its object's mask
        inside = (probs * target).sum(1)  # (B, T)
        total = probs.sum(1) + 1e-6
        frac = inside / total
        total_tok = total_tok + ((1 - frac) * tok_any).sum() / n_tok
        norm = probs / probs.amax(dim=1, keepdim=True).clamp(min=1e-6)
        bce = F.binary_cross_entropy(norm.clamp(1e-4, 1 - 1e-4), target.clamp(0, 1), reduction="none")
        total_pix = total_pix + (bce.mean(1) * tok_any).sum() / n_tok
        bg = (1 - m.sum(1)).clamp(min=0) * keep.view(-1, 1)  # (B, HW)
        on_objects = (probs * tok_any.unsqueeze(1)).sum(-1)  # (B, HW)
        total_bg = total_bg + (on_objects * bg).sum() / bg.sum().clamp(min=1.0)
        own = torch.einsum("bpt,bkt->bkp", probs, sel)  # attention to object k's words
        share = own / (on_objects.unsqueeze(1) + 1e-6)
        inside_w = m * has_words.unsqueeze(-1)
        total_own = total_own - (inside_w * torch.log(share + 1e-4)).sum() / inside_w.sum().clamp(min=1.0)
        mass += float((frac.detach() * tok_any).sum() / n_tok)
    n = len(maps)
    loss = (total_tok + cfg.ground_pixel_weight * total_pix + bg_weight * total_bg + own_weight * total_own) / n
    stats = {
        "g_tok": float(total_tok.detach()) / n,
        "g_pix": float(total_pix.detach()) / n,
        "g_bg": float(total_bg.detach()) / n,
        "g_own": float(total_own.detach()) / n,
        "mass_in": mass / n,
    }
    return loss, stats


class ThreadTuner:
    """Picks 1 or `max_threads` torch threads by timing, since the machine is shared.

    With another busy process on a 2-core machine, a niced 2-thread run waits at every
    parallel barrier for its starved thread, and one thread is several times faster. Every
    `every` steps, or `every_s` seconds, the other thread count is tried for a few steps and
    kept if it is faster.
    """

    def __init__(self, max_threads: int, every: int = 50, every_s: float = 120.0, trial: int = 4) -> None:
        self.max_threads = max_threads
        self.current = max_threads
        self.every = every
        self.every_s = every_s
        self.last_trial = time.time()
        self.trial = trial
        self.recent: list[float] = []
        self.trial_times: list[float] = []
        self.testing: int | None = None
        torch.set_num_threads(max_threads)

    def record(self, step: int, seconds: float) -> str | None:
        """Note one step's time; returns a message when the thread count changes."""
        if self.max_threads <= 1:
            return None
        if self.testing is None:
            self.recent = [*self.recent[-(self.trial - 1) :], seconds]
            due = step % self.every == 0 or time.time() - self.last_trial > self.every_s
            if due and len(self.recent) >= self.trial:
                self.last_trial = time.time()
                self.testing = 1 if self.current != 1 else self.max_threads
                self.trial_times = []
                torch.set_num_threads(self.testing)
            return None
        self.trial_times.append(seconds)
        if len(self.trial_times) <= self.trial:
            return None
        trial_time = float(np.median(self.trial_times[1:]))
        base_time = float(np.median(self.recent))
        tested, self.testing = self.testing, None
        self.recent = []
        if trial_time < base_time:
            old, self.current = self.current, tested
            torch.set_num_threads(tested)
            return f"threads {old} -> {tested} ({base_time:.2f} -> {trial_time:.2f} s/step)"
        torch.set_num_threads(self.current)
        return None


@dataclass
class TrainState:
    """Counters that travel with the checkpoint."""

    step: int = 0
    train_seconds: float = 0.0
    evals: list[dict[str, Any]] = field(default_factory=list)


def sample_batch(data: dict[str, torch.Tensor], cfg: Config, step: int, pools: dict[int, np.ndarray]) -> torch.Tensor:
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


class Trainer:
    """Joint text-encoder + UNet training with EMA, checkpoints and periodic evaluation."""

    def __init__(self, cfg: Config, work: Path, log: Logger, device: str = "cpu", workers: int = 1) -> None:
        self.cfg = cfg
        self.work = work
        self.log = log
        self.device = torch.device(device)
        self.tokenizer = make_tokenizer(cfg)
        self.vae, self.sf = train_vae(cfg, work, log)
        self.vae.to(self.device)
        self.data = build_data(cfg, work, self.vae, self.sf, self.tokenizer, log, workers)
        torch.manual_seed(cfg.seed)
        self.text = make_text_encoder(cfg).to(self.device)
        self.unet = make_unet(cfg).to(self.device)
        self.ema_text = make_text_encoder(cfg).to(self.device)
        self.ema_unet = make_unet(cfg).to(self.device)
        self.ema_text.load_state_dict(self.text.state_dict())
        self.ema_unet.load_state_dict(self.unet.state_dict())
        for p in [*self.ema_text.parameters(), *self.ema_unet.parameters()]:
            p.requires_grad_(False)
        self.store = AttentionStore()
        install_recorder(self.unet, self.store)
        self.sched = make_train_scheduler()
        self.opt = torch.optim.AdamW(
            [
                {"params": list(self.unet.parameters()), "lr": cfg.lr},
                {"params": list(self.text.parameters()), "lr": cfg.lr * cfg.text_lr_mult},
            ],
            weight_decay=cfg.weight_decay,
        )
        self.state = TrainState()
        self.tuner = ThreadTuner(torch.get_num_threads())
        count = self.data["count"].numpy()
        self.pools = {c: np.nonzero(count == c)[0] for c in (1, 2, 3)}
        self.empty_ids = torch.tensor(self.tokenizer("", padding="max_length", max_length=cfg.max_length).input_ids)
        self.empty_ids = self.empty_ids.to(self.device)
        words = [self.tokenizer.encode(w, add_special_tokens=False) for w in scenes.POSITIONS]
        self._position_ids = torch.tensor([p[0] for p in words if len(p) == 1], device=self.device)

    # -- checkpoints

    def save(self) -> None:
        """Write the checkpoint (models, EMA, optimizer, counters), keeping the previous one."""
        path = self.work / "ckpt.pt"
        if path.exists():
            os.replace(path, self.work / "ckpt-prev.pt")
        atomic_save(
            {
                "config": asdict(self.cfg),
                "text": self.text.state_dict(),
                "unet": self.unet.state_dict(),
                "ema_text": self.ema_text.state_dict(),
                "ema_unet": self.ema_unet.state_dict(),
                "opt": self.opt.state_dict(),
                "state": asdict(self.state),
            },
            path,
        )

    def load(self) -> bool:
        """Resume from the latest readable checkpoint; False if there is none."""
        for name in ("ckpt.pt", "ckpt-prev.pt"):
            path = self.work / name
            if not path.exists():
                continue
            try:
                blob = torch.load(path, weights_only=False, map_location="cpu")
            except (RuntimeError, EOFError, OSError) as err:
                self.log(f"resume: {name} unreadable ({err}); trying an older one")
                continue
            self.text.load_state_dict(blob["text"])
            self.unet.load_state_dict(blob["unet"])
            self.ema_text.load_state_dict(blob["ema_text"])
            self.ema_unet.load_state_dict(blob["ema_unet"])
            self.opt.load_state_dict(blob["opt"])
            self.state = TrainState(**blob["state"])
            self.log(f"resume: {name} at step {self.state.step} ({self.state.train_seconds / 60:.1f} min trained)")
            return True
        return False

    # -- one step

    def _layout_tokens(self, ids: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
        """(B, T) bool: which tokens may be grounded, or None for all (see `Config.ground_layout_t`)."""
        cfg = self.cfg
        if cfg.ground_layout_start < 0 or self.state.step < cfg.ground_layout_start:
            return None
        high = (t.to(ids.device) >= cfg.ground_layout_t).unsqueeze(1)  # (B, 1)
        return ~high | torch.isin(ids, self._position_ids)

    def _shape_contrast(self, idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
        """Relative error of the predicted change from a caption to its shape twin's (see Config).

        1.0 when the shape words change nothing, 0.0 when the change is exactly the twin's; None
        before `shape_contrast_start`.
        """
        cfg, st = self.cfg, self.state
        if cfg.shape_contrast_start < 0 or st.step < cfg.shape_contrast_start or cfg.shape_contrast_n <= 0:
            return None
        chosen = [i for i, k in zip(idx.tolist(), keep.tolist(), strict=True) if k][: cfg.shape_contrast_n]
        if not chosen:
            return torch.zeros((), device=self.device)
        rng = np.random.default_rng([cfg.seed, st.step, 47])
        true = [scenes.training_scene(*scene_seed(cfg, i), size=cfg.image_size) for i in chosen]
        both = true + [shape_twin(s, rng) for s in true]
        dev = self.device
        # The true scene is encoded again beside its twin (not read from the data) so that pixels
        # the twin leaves alone encode identically and the target holds only the shape change.
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            lat = self.vae.encode(to_tensor_images([s.image for s in both]).to(dev)).latent_dist.mean.float()
        lat_true, lat_twin = (lat * self.sf).chunk(2)
        ids = torch.tensor([caption_tokens(self.tokenizer, s.words, cfg.max_length)[0] for s in both], device=dev)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + st.step + 47)
        t = torch.randint(cfg.shape_contrast_t, 1000, (len(chosen),), generator=gen).to(dev)
        noise = torch.randn(lat_true.shape, generator=gen).to(dev)
        noisy = self.sched.add_noise(lat_true, noise, t)
        a = self.sched.alphas_cumprod.to(dev)[t].view(-1, 1, 1, 1)
        # Same input, other scene: the noise that explains it changes by -sqrt(a / (1 - a)) dx0.
        target = -(a / (1 - a)).sqrt() * (lat_true - lat_twin)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            context = self.text(ids)[0]
            pred = self.unet(torch.cat([noisy, noisy]), torch.cat([t, t]), encoder_hidden_states=context).sample
        p_true, p_twin = pred.float().chunk(2)
        err = ((p_true - p_twin - target) ** 2).sum(dim=(1, 2, 3))
        return (err / ((target**2).sum(dim=(1, 2, 3)) + 1e-3)).mean()

    def step(self) -> dict[str, float]:
        """One optimisation step; returns its losses."""
        cfg, st = self.cfg, self.state
        idx = sample_batch(self.data, cfg, st.step, self.pools)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + st.step)
        dev = self.device
        lat = self.data["latents"][idx].to(dev)
        ids = self.data["ids"][idx].to(dev)
        owner = self.data["owner"][idx].long().to(dev)
        masks = self.data["masks"][idx].float().to(dev)
        b = lat.shape[0]
        keep = (torch.rand(b, generator=gen) >= cfg.cond_drop).to(dev)
        ids[~keep] = self.empty_ids
        noise = torch.randn(lat.shape, generator=gen)
        noise = (noise + cfg.offset_noise * torch.randn(b, lat.shape[1], 1, 1, generator=gen)).to(dev)
        t = torch.randint(0, 1000, (b,), generator=gen)
        pure = None
        if 0 <= cfg.layout_noise_start <= st.step:
            pure = torch.rand(b, generator=gen) < cfg.layout_noise_p
            t = torch.where(pure, torch.randint(cfg.layout_noise_t, 1000, (b,), generator=gen), t)
        noisy = self.sched.add_noise(lat, noise, t.to(dev))
        ac = self.sched.alphas_cumprod.cpu()[t].to(dev)
        if pure is not None and pure.any():
            # What sampling starts from: pure noise, no trace of the scene. The target is the noise
            # that makes this input a draw of the scene at t, so x0 must come from the caption.
            start = torch.randn(lat.shape, generator=gen).to(dev)
            a = ac.view(-1, 1, 1, 1)
            sel = pure.to(dev).view(-1, 1, 1, 1)
            noisy = torch.where(sel, start, noisy)
            noise = torch.where(sel, (start - a.sqrt() * lat) / (1 - a).sqrt(), noise)
        snr = ac / (1 - ac)
        weight = snr.clamp(max=cfg.min_snr) / snr
        lr_scale = min(1.0, (st.step + 1) / cfg.warmup)
        for group, base in zip(self.opt.param_groups, (cfg.lr, cfg.lr * cfg.text_lr_mult), strict=True):
            group["lr"] = base * lr_scale
        self.store.clear()
        self.store.active = True
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            context = self.text(ids)[0]
            pred = self.unet(noisy, t.to(dev), encoder_hidden_states=context).sample
        self.store.active = False
        mse = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
        denoise = (mse * weight).mean()
        ground, stats = grounding_loss(
            [m.float() for m in self.store.maps], owner, masks, keep, cfg, st.step, self._layout_tokens(ids, t)
        )
        self.store.clear()
        loss = denoise + cfg.ground_weight * ground
        contrast = self._shape_contrast(idx, keep)
        if contrast is not None:
            loss = loss + cfg.shape_contrast_weight * contrast
            stats["shape"] = float(contrast.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_([*self.unet.parameters(), *self.text.parameters()], 1.0)
        self.opt.step()
        decay = min(cfg.ema_decay, (1 + st.step) / (10 + st.step))
        with torch.no_grad():
            for ema, live in ((self.ema_unet, self.unet), (self.ema_text, self.text)):
                for pe, pl in zip(ema.parameters(), live.parameters(), strict=True):
                    pe.lerp_(pl, 1 - decay)
        st.step += 1
        return {
            "loss": float(loss.detach()),
            "mse": float(mse.detach().mean()),
            "denoise": float(denoise.detach()),
            "ground": float(ground.detach()),
            "gnorm": float(gnorm),
            **stats,
        }

    # -- loop

    def run(self, minutes: float, max_steps: int | None) -> bool:
        """Train until the time budget or step limit, checkpointing and evaluating on the way.

        Returns False when stopped by SIGTERM/SIGINT (the caller then skips the export).
        """
        cfg, st = self.cfg, self.state
        stop = {"now": False}

        def on_signal(signum: int, _frame: Any) -> None:
            self.log(f"signal {signum}: checkpointing and stopping")
            stop["now"] = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        if st.step > 0 and (not st.evals or st.evals[-1].get("step") != st.step):
            self.evaluate_and_log()  # where a resumed session starts, for before/after comparisons
        start = time.time()
        last_ckpt = last_eval = time.time()
        window: list[dict[str, float]] = []
        window_start = time.time()
        n_params = (sum(p.numel() for p in self.unet.parameters()), sum(p.numel() for p in self.text.parameters()))
        self.log(
            f"train: unet {n_params[0] / 1e6:.2f}M, text {n_params[1] / 1e6:.2f}M params, "
            f"from step {st.step}, budget {minutes:.1f} min, config {json.dumps(asdict(cfg))}"
        )
        while not stop["now"]:
            if time.time() - start > minutes * 60 or (max_steps is not None and st.step >= max_steps):
                break
            t0 = time.time()
            window.append(self.step())
            st.train_seconds += time.time() - t0
            note = self.tuner.record(st.step, time.time() - t0) if self.device.type == "cpu" else None
            if note:
                self.log(note)
            if st.step % 25 == 0:
                avg = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                rate = len(window) / (time.time() - window_start)
                self.log(
                    f"step {st.step} " + " ".join(f"{k} {v:.4f}" for k, v in avg.items()) + f" | {rate:.3f} steps/s"
                )
                window, window_start = [], time.time()
            if time.time() - last_ckpt > cfg.ckpt_minutes * 60:
                self.save()
                self.log(f"checkpoint at step {st.step}")
                last_ckpt = time.time()
            if time.time() - last_eval > cfg.eval_minutes * 60:
                self.evaluate_and_log()
                last_eval = time.time()
                window_start = time.time()
                window = []
        self.save()
        self.log(f"checkpoint at step {st.step} (end of session)")
        return not stop["now"]

    def evaluate_and_log(self, n: int | None = None, guidance: float | None = None) -> dict[str, Any]:
        """Held-out evaluation of the EMA weights, logged and remembered in the checkpoint."""
        cfg = self.cfg
        t0 = time.time()
        res = evaluate(
            self.ema_unet,
            self.ema_text,
            self.vae,
            self.sf,
            self.tokenizer,
            n=n or cfg.eval_prompts,
            guidance=guidance or cfg.eval_guidance,
            steps=cfg.eval_steps,
        )
        res.update(step=self.state.step, eval_seconds=round(time.time() - t0, 1))
        self.state.evals.append(res)
        self.log("eval " + json.dumps(res))
        return res


# ----------------------------------------------------------------------------- evaluation


def word_token_positions(tokenizer: CLIPTokenizer, words: list[tuple[str, int]]) -> list[int]:
    """Index of the first token of each caption word (after the start token)."""
    pos, out = 1, []
    for word, _ in words:
        out.append(pos)
        pos += len(tokenizer.encode(word, add_special_tokens=False))
    return out


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of a set of values (maximises between-class variance)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[1:][int(np.argmax(between))])


@torch.no_grad()
def generate_with_maps(
    unet: UNet2DConditionModel,
    text: CLIPTextModel,
    vae: AutoencoderKL,
    sf: float,
    tokenizer: CLIPTokenizer,
    prompts: list[str],
    guidance: float,
    steps: int,
    seed: int = 0,
) -> tuple[np.ndarray, torch.Tensor]:
    """Sample images (N, H, W, 3 uint8) and word maps (N, T, H, W) for the prompts.

    A word map is the token's cross-attention, heads averaged, per UNet level averaged over that
    level's layers and summed over steps, bicubic-upsampled to the latent grid, clamped at 0,
    averaged over levels, then bicubic-upsampled to the image and clamped again.
    """
    store = AttentionStore()
    install_recorder(unet, store)
    n = len(prompts)
    length = tokenizer.model_max_length
    dev = unet.device
    ids = torch.tensor(tokenizer(prompts, padding="max_length", max_length=length, truncation=True).input_ids).to(dev)
    empty = torch.tensor(tokenizer([""] * n, padding="max_length", max_length=length).input_ids).to(dev)
    context = torch.cat([text(empty)[0], text(ids)[0]])
    sched = make_sample_scheduler()
    sched.set_timesteps(steps)
    grid = unet.config.sample_size
    gen = torch.Generator().manual_seed(seed)
    lat = (torch.randn(n, unet.config.in_channels, grid, grid, generator=gen) * sched.init_noise_sigma).to(dev)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for t in sched.timesteps:
        store.clear()
        store.active = True
        inp = sched.scale_model_input(torch.cat([lat, lat]), t)
        eps = unet(inp, t, encoder_hidden_states=context).sample
        store.active = False
        for m in store.maps:
            res = math.isqrt(m.shape[1])
            sums[res] = sums.get(res, 0) + m[n:]
            counts[res] = counts.get(res, 0) + 1
        eu, ec = eps.chunk(2)
        lat = sched.step(eu + guidance * (ec - eu), t, lat).prev_sample
    store.clear()
    image = vae.decode(lat / sf).sample
    image = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    levels = []
    for res, total in sums.items():
        per_step = total * (steps / counts[res])  # layers averaged, steps summed
        m = per_step.permute(0, 2, 1).reshape(n * length, 1, res, res)
        m = F.interpolate(m, size=(grid, grid), mode="bicubic", align_corners=False)
        levels.append(m.clamp(min=0))
    maps = torch.stack(levels).mean(0)
    size = image.shape[1]
    maps = F.interpolate(maps, size=(size, size), mode="bicubic", align_corners=False).clamp(min=0)
    return image, maps.reshape(n, length, size, size).cpu()


def evaluate(
    unet: UNet2DConditionModel,
    text: CLIPTextModel,
    vae: AutoencoderKL,
    sf: float,
    tokenizer: CLIPTokenizer,
    n: int = 24,
    guidance: float = 2.5,
    steps: int = 20,
    seed: int = 0,
    suite_seed: int = 1234,
) -> dict[str, Any]:
    """Held-out suite scores: object checks and shape-noun word-map IoU vs a uniform map."""
    from shapes.check import check_objects, iou

    suite = scenes.heldout_suite(n, seed=suite_seed, size=vae.config.sample_size)
    flags: dict[str, list[float]] = {
        k: []
        for k in (
            "present",
            "colour_ok",
            "region_ok",
            "objects_correct",
            "shape_ok",
            "miou_daam",
            "miou_otsu",
            "miou_uniform",
            "mass_in",
            "miou_daam_correct",
        )
    }
    blank = 0
    chunk = 16
    for lo in range(0, n, chunk):
        part = suite[lo : lo + chunk]
        images, maps = generate_with_maps(
            unet, text, vae, sf, tokenizer, [s.caption for s in part], guidance, steps, seed=seed + lo
        )
        for scene, image, wmap in zip(part, images, maps.numpy(), strict=True):
            checks = check_objects(image, [o.spec for o in scene.objects])
            blank += not any(c.present or c.colour_ok for c in checks)
            starts = word_token_positions(tokenizer, scene.words)
            for k, (obj, chk) in enumerate(zip(scene.objects, checks, strict=True)):
                flags["present"].append(chk.present)
                flags["colour_ok"].append(chk.colour_ok)
                flags["region_ok"].append(chk.region_ok)
                flags["objects_correct"].append(chk.correct)
                flags["shape_ok"].append(chk.correct_shape)
                tok = next(p for p, (w, o) in zip(starts, scene.words, strict=True) if o == k and w == obj.spec.shape)
                heat = wmap[tok]
                ref = chk.mask if chk.correct and chk.mask.any() else obj.mask
                daam = iou(heat >= 0.4 * heat.max(), ref) if heat.max() > 0 else 0.0
                otsu = iou(heat > otsu_threshold(heat.ravel()), ref)
                flags["miou_daam"].append(daam)
                flags["miou_otsu"].append(otsu)
                flags["miou_uniform"].append(float(ref.sum() / ref.size))
                flags["mass_in"].append(float(heat[ref].sum() / max(heat.sum(), 1e-9)))
                if chk.correct:
                    flags["miou_daam_correct"].append(daam)
    res: dict[str, Any] = {k: round(float(np.mean(v)), 4) if v else 0.0 for k, v in flags.items()}
    res.update(prompts=n, objects=len(flags["present"]), blank=round(blank / n, 4), guidance=guidance)
    return res


def time_generation(
    model_dir: Path,
    guidance: float,
    runs: int = 3,
    prompt: str = "a red circle on the left and a blue square on the right",
    sample_path: Path | None = None,
) -> dict[str, Any]:
    """Median wall time of a 20-step pipeline call on the saved model (after one warm-up)."""
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    times = []
    image = None
    for i in range(runs + 1):
        gen = torch.Generator().manual_seed(i)
        t0 = time.perf_counter()
        image = pipe(prompt, num_inference_steps=20, guidance_scale=guidance, generator=gen).images[0]
        if i:
            times.append(time.perf_counter() - t0)
    if sample_path is not None and image is not None:
        image.resize((256, 256)).save(sample_path)
    return {
        "seconds": float(np.median(times)),
        "runs": runs,
        "steps": 20,
        "threads": torch.get_num_threads(),
        "prompt": prompt,
    }


# ----------------------------------------------------------------------------- export


def export(trainer: Trainer, out: Path, log: Logger, final_eval: bool = True) -> None:
    """Save EMA weights as a StableDiffusionPipeline plus a README model card."""
    cfg = trainer.cfg
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(cfg)
    vae = make_vae(cfg)
    vae.load_state_dict(trainer.vae.state_dict())
    vae.register_to_config(scaling_factor=trainer.sf)
    text = make_text_encoder(cfg)
    text.load_state_dict(trainer.ema_text.state_dict())
    # CLIP's 49,408-row token table is most of the text encoder: stored in float16 it keeps the
    # model under 50 MB; loaders upcast it (StepX loads CPU models in float32).
    text.to(torch.float16)
    unet = make_unet(cfg)
    unet.load_state_dict(trainer.ema_unet.state_dict())
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    text.to(torch.float32)  # the float16-rounded weights, as loaders will see them
    log(f"export: pipeline saved to {out}")
    sweep: list[dict[str, Any]] = []
    if final_eval:
        for g in (1.5, 2.0, 3.0, 4.0):
            res = evaluate(unet, text, vae, trainer.sf, tokenizer, n=48, guidance=g, steps=cfg.eval_steps)
            res["guidance"] = g
            sweep.append(res)
            log("export eval " + json.dumps(res))
    # most objects correct; ties go to the sharper word maps
    best = (
        max(sweep, key=lambda r: (r["objects_correct"], r.get("shape_ok", 0.0), max(r["miou_daam"], r["miou_otsu"])))
        if sweep
        else None
    )
    guidance = best["guidance"] if best else cfg.eval_guidance
    timing = time_generation(out, guidance, sample_path=trainer.work / "sample.png")
    log(f"export: generation timing {json.dumps(timing)}")
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    write_card(out, cfg, trainer, sweep, guidance, timing, size_mb)
    log(f"export: model card written, folder {size_mb:.1f} MB, default guidance {guidance}")


def cpu_name() -> str:
    """The CPU's model name, as the OS reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _unet_layout_text(cfg: Config) -> str:
    """Which latent levels of the UNet carry cross-attention, in words."""
    latent = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    sides = [latent // 2**i for i in range(len(cfg.unet_down))]
    down = [f"{s} x {s}" for s, b in zip(sides, cfg.unet_down, strict=True) if "CrossAttn" in b]
    up = [f"{s} x {s}" for s, b in zip(reversed(sides), cfg.unet_up, strict=True) if "CrossAttn" in b]
    mid = "CrossAttn" in cfg.unet_mid
    return (
        "levels " + ", ".join(f"{s} x {s}" for s in sides) + "; cross-attention in the down path at "
        f"{', '.join(down) or 'no level'}, in the up path at {', '.join(up) or 'no level'}"
        + (f", and in the mid block at {sides[-1]} x {sides[-1]}" if mid else ", none in the mid block")
    )


@torch.no_grad()
def vae_shape_kept(vae: AutoencoderKL, n: int = 200) -> float:
    """Share of objects whose shape the scene check still reads after a VAE round trip."""
    from shapes.check import check_objects

    kept = total = 0
    dev = next(vae.parameters()).device
    for lo in range(0, n, 50):
        batch = [scenes.training_scene(100_000 + i, size=vae.config.sample_size) for i in range(lo, min(n, lo + 50))]
        x = vae.decode(vae.encode(to_tensor_images([s.image for s in batch]).to(dev)).latent_dist.mean).sample
        images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for scene, image in zip(batch, images, strict=True):
            checks = check_objects(image, [o.spec for o in scene.objects])
            kept += sum(c.shape_ok for c in checks)
            total += len(checks)
    return kept / max(total, 1)


def _score(row: dict[str, Any], key: str) -> str:
    """A score cell, or a dash where an older evaluation did not measure it."""
    return f"{row[key]:.3f}" if key in row else "-"


def _before_after(evals: list[dict[str, Any]], step: int, key: str = "objects_correct") -> str:
    """A sentence comparing the last periodic evaluation before `step` with the latest one."""
    label = {"objects_correct": "objects correct", "shape_ok": "objects correct and of the right shape"}[key]
    before = [e for e in evals if e.get("step", 0) <= step and key in e]  # at `step`: not trained yet
    if not before or evals[-1].get("step", 0) <= step or key not in evals[-1]:
        return ""
    a, b = before[-1], evals[-1]
    return (
        f"  In the periodic evaluation, {label} went from {a[key]:.2f} (step {a['step']})"
        f" to {b[key]:.2f} (step {b['step']}).\n"
    )


def write_card(
    out: Path,
    cfg: Config,
    trainer: Trainer,
    sweep: list[dict[str, Any]],
    guidance: float,
    timing: dict[str, Any],
    size_mb: float,
) -> None:
    """The README.md model card: data, recipe, training time, hardware, scores."""
    from shapes.evaluate import CARD_END, CARD_START

    st = trainer.state
    vae_blob = torch.load(trainer.work / "vae.pt", weights_only=False, map_location="cpu")
    rows = "\n".join(
        f"| {r['guidance']} | {r['objects_correct']:.3f} | {r['present']:.3f} | "
        f"{r['colour_ok']:.3f} | {r['region_ok']:.3f} | {_score(r, 'shape_ok')} | {r['blank']:.3f} | "
        f"{r['miou_daam']:.3f} | {r['miou_otsu']:.3f} | {r['miou_uniform']:.3f} |"
        for r in sweep
    )
    held = "\n".join(f"- {c} {s} at {p}" for c, s, p in scenes.HELDOUT)
    history = "\n".join(
        f"| {e['step']} | {e['objects_correct']:.3f} | {_score(e, 'shape_ok')} | {e['miou_daam']:.3f} "
        f"| {e['miou_otsu']:.3f} |"
        for e in st.evals
    )
    own_text = (
        "an ownership loss (per pixel inside object k, cross-entropy of the share of its object-word"
        " attention that goes to object k's words) "
        + (
            f"from step {cfg.ground_own_start}, added once the other terms alone had settled on every"
            " object word attending to every object alike"
            if cfg.ground_own_start > 0
            else "from the start, so object words do not all attend to every object alike"
        )
    )
    if cfg.ground_bg_weight > 0 and cfg.ground_bg_stop != 0:
        until = f"until step {cfg.ground_bg_stop}" if cfg.ground_bg_stop > 0 else "throughout"
        bg_text = f"a background loss (attention that pixels outside all objects give to object words) {until}" + (
            "; it was then dropped because at high noise no pixel can tell whether it is inside an"
            " object, so it taught the model to ignore object words there (1% of attention at"
            " t=999) and the layout could not follow the position words"
            if cfg.ground_bg_stop > 0
            else ""
        )
    else:
        bg_text = (
            "no background term: at high noise no pixel can tell whether it is inside an object, so"
            " such a term teaches the model to ignore object words there and layout stops following"
            " the text"
        )
    layout_text = (
        f"; from step {cfg.ground_layout_start}, at timesteps >= {cfg.ground_layout_t} only position words"
        " are grounded: there no object is visible yet, and a causal text encoder cannot put position into"
        " the colour and shape words that precede the position phrase, so grounding them asked the"
        " impossible (the network's 4 x 4 features encode position linearly, R^2 = 1.00 at t = 999, yet"
        " position words' maps were barely shifted toward their regions)"
        if cfg.ground_layout_start >= 0
        else ""
    )
    noise_text = (
        f"""- Layout from pure noise (from step {cfg.layout_noise_start}): {cfg.layout_noise_p:.0%} of each batch is
  drawn at t >= {cfg.layout_noise_t} from pure noise, with the noise target that makes that input a draw of
  the scene at t. SD's schedule keeps sqrt(alpha_bar) = 0.068 of the scene at t = 999, and these flat,
  high-contrast objects can be read in that residue: until then the model placed objects where the
  residue showed them and ignored position words, which fails at sampling time, where the start is
  pure noise (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", WACV 2024).
{_before_after(st.evals, cfg.layout_noise_start)}"""
        if cfg.layout_noise_start >= 0
        else ""
    )
    shape_text = (
        f"""- Shape words (from step {cfg.shape_contrast_start}): until then the model drew the shape the noise
  suggested (for one seed, "a red circle" and "a red square" gave the same picture): a circle and a
  square of 12 px differ in a few corner pixels, which the denoising loss barely sees. Each step,
  {cfg.shape_contrast_n} samples get a counterfactual twin, the same scene redrawn with other shapes
  (`scenes.redraw`); on one noisy input of the true scene at t >= {cfg.shape_contrast_t}, the change in
  predicted noise from the true caption to the twin's must equal the change the twin's scene implies,
  -sqrt(a / (1 - a)) (x0 - x0_twin). The error is relative to that change (1: the shape words change
  nothing), weighted {cfg.shape_contrast_weight}.
{_before_after(st.evals, cfg.shape_contrast_start, "shape_ok")}"""
        if cfg.shape_contrast_start >= 0
        else ""
    )
    text = f"""---
library_name: diffusers
pipeline_tag: text-to-image
guidance_scale: {guidance}
num_inference_steps: 20
resolution: {cfg.image_size}
---

# shapes: StepX's small text-to-image model

A Stable-Diffusion-architecture model (diffusers `AutoencoderKL`, `UNet2DConditionModel` with
cross-attention, `CLIPTextModel`, `CLIPTokenizer`, DPM-Solver++ scheduler) trained from scratch
in this repository by `python -m shapes.train` on procedurally drawn scenes whose object
masks are known. It exists so StepX can show cross-attention word maps without downloading
pretrained weights. {cfg.image_size} x {cfg.image_size} px, {size_mb:.1f} MB.

**Default guidance scale: {guidance}** (best objects-correct rate in the sweep below, ties broken by the
right-shape rate, then by word-map mIoU), 20 steps.

## Data

`shapes/scenes.py`: 1-3 flat shapes ({", ".join(scenes.SHAPES)}) in {len(scenes.COLOURS)}
colours ({", ".join(scenes.COLOURS)}) on a light grey background, at named positions
({", ".join(scenes.POSITIONS)}), small or large, with distinct colours and positions per scene.
Captions read "a red circle on the left and a small blue square at the top" (size word in half
of the objects, position phrase in 90%). {cfg.n_scenes} training scenes (seeded, equal numbers of
1, 2 and 3 objects). These colour x shape x position combinations never occur in training:

{held}

The evaluation suite (`scenes.heldout_suite`) holds prompts that each contain at least one of
them, with ground-truth masks from the renderer.

## Recipe

- Tokenizer: CLIP's BPE vocabulary (49,408 ids), `model_max_length` {cfg.max_length} (the longest
  caption is 25 tokens), so few padding tokens compete for attention; the text encoder's
  position embeddings are cut to {cfg.max_length}.
- VAE: `AutoencoderKL` {cfg.vae_channels} (no mid-block attention), 4x down to
  {cfg.latent_channels} x 16 x 16, trained on 32 px crops with L1 + MSE weighted 10x on object
  pixels + {cfg.vae_kl_weight} KL, {vae_blob["steps"]} steps ({vae_blob["seconds"] / 60:.1f} min);
  held-out L1 {vae_blob["l1"]:.4f}, reconstructions judged correct by the scene check
  {vae_blob.get("recon_correct", float("nan")):.3f}; scaling factor {trainer.sf:.4f}. Latents
  encoded once.
- Text encoder: CLIP text transformer, hidden {cfg.text_hidden}, {cfg.text_layers} layers,
  {cfg.text_heads} heads, trained jointly with the UNet at {cfg.text_lr_mult}x the UNet's rate.
- UNet: `UNet2DConditionModel` {cfg.unet_channels}, 1 layer per block, {cfg.unet_heads} heads,
  {_unet_layout_text(cfg)}.
- Denoising: epsilon prediction, scaled-linear betas (SD's), min-SNR-{cfg.min_snr} weighting,
  offset noise {cfg.offset_noise}, {cfg.cond_drop:.0%} caption dropout (for classifier-free
  guidance), AdamW lr {cfg.lr}, batch {cfg.batch}, EMA {cfg.ema_decay}, bf16 autocast on CPU.
  Curriculum: one-object scenes for {cfg.curriculum[0]} steps, up to two until step
  {cfg.curriculum[1]}, then up to three.
- Attention grounding (after TokenCompose, Wang et al., CVPR 2024, which supervises each object
  token's cross-attention with its segmentation mask), weighted {cfg.ground_weight} against the
  denoising loss: every cross-attention layer's head-averaged map of each object word (size,
  colour, shape, position) gets a token loss (1 - attention mass inside the object's mask) and a
  pixel loss (BCE of the max-normalised map against the mask); {own_text}; {bg_text}{layout_text}.
  Plain denoising alone did not learn layout or localised word maps within an affordable CPU
  budget (probe: word maps at the uniform baseline after ~5k steps), because a causal text
  encoder cannot put position into colour and shape tokens and most attention went to padding.
{noise_text}{shape_text}
## Training

{st.step} steps, {st.train_seconds / 3600:.2f} h of training on {cpu_name()}
CPU ({os.cpu_count()} cores shared with other work, 1 or 2 torch threads picked by timing, no
GPU), torch {torch.__version__}. Reproducible from seed {cfg.seed}: batches and noise are drawn
from (seed, step), so resumed runs follow the same sequence.

## Scores (held-out suite, 48 prompts, EMA weights, 20 DPM-Solver++ steps)

Objects correct = present + right colour + right region, judged by colour segmentation
(`shapes/check.py`); "+ shape": correct and of the right shape, by how much of its bounding
box the object fills. Word maps: shape-noun token, heads averaged, each UNet level
bicubic-upsampled to the latent grid, clamped at 0, averaged over levels, summed over steps,
upsampled to the image; thresholded at 0.4 of max (DAAM) or by Otsu; IoU against the object's
segmented mask in the output (the rendered ground truth where the object is missing). The
uniform baseline is a constant map.

| guidance | objects correct | present | colour | region | + shape | blank | mIoU 0.4max | mIoU Otsu | mIoU uniform |
|---|---|---|---|---|---|---|---|---|---|
{rows}

Generation of "a red circle on the left and a blue square on the right" ({timing["steps"]} steps,
guidance {guidance}, {cfg.image_size} px, CPU, {timing["threads"]} threads): {timing["seconds"]:.2f} s
(median of {timing["runs"]} runs, including text encoding and VAE decode).

### Evaluation during training (24 prompts, guidance {cfg.eval_guidance})

| step | objects correct | and right shape | mIoU 0.4max | mIoU Otsu |
|---|---|---|---|---|
{history}

## stepx eval (held-out suite, through StepX's capture and store)

{CARD_START}
Not run yet for these weights: `stepx eval --n 30 --card {out / "README.md"}` puts its table here.
{CARD_END}

## Limits

Only the vocabulary above is understood; other words are ignored or confuse the model.
Images are 64 x 64 px. Shapes are judged by how much of their bounding box they fill; at 64 px
with a 4x VAE a small object is 3 latent cells wide, and the VAE alone keeps the shape of
{vae_shape_kept(trainer.vae):.0%} of objects (200 training scenes encoded and decoded).
"""
    (out / "README.md").write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/models/shapes"))
    ap.add_argument("--work", type=Path, default=Path("data/models/.train"))
    ap.add_argument("--minutes", type=float, default=150.0, help="wall-clock budget of this run")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ap.add_argument("--export-only", action="store_true", help="export the latest checkpoint")
    ap.add_argument("--no-export", action="store_true", help="skip the export at the end")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the latest checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    ap.add_argument("--workers", type=int, default=1, help="processes that render the training scenes")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override Config fields for a new run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log = Logger(args.work / "log.txt")
    cfg_path = args.work / "config.json"
    if cfg_path.exists():
        cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(cfg_path.read_text()).items()})
        if args.set:
            log("note: --set ignored, the work folder already has config.json")
    else:
        cfg = Config()
        for item in args.set:
            key, value = item.split("=", 1)
            current = getattr(cfg, key)
            parsed = json.loads(value)
            setattr(cfg, key, tuple(parsed) if isinstance(current, tuple) else type(current)(parsed))
        cfg_path.write_text(json.dumps(asdict(cfg), indent=1))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    trainer = Trainer(cfg, args.work, log, device=device, workers=args.workers)
    resumed = trainer.load() if (args.resume or args.export_only or args.eval_only) else False
    if (args.export_only or args.eval_only) and not resumed:
        raise SystemExit("no checkpoint to export or evaluate")
    if not resumed and (args.work / "ckpt.pt").exists():
        raise SystemExit("a checkpoint exists: pass --resume, or use an empty --work folder")
    if args.eval_only:
        trainer.evaluate_and_log()
        return
    finished = True
    if not args.export_only:
        finished = trainer.run(args.minutes, args.max_steps)
    if args.export_only or (finished and not args.no_export):
        export(trainer, args.out, log)


if __name__ == "__main__":
    main()
