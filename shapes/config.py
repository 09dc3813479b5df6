"""The shapes model's recipe (`Config`) and a run's counters (`TrainState`), stored in the work folder,
every checkpoint and the model card.

The defaults are what `make model` runs from scratch. The committed weights were trained before the
recipe settled (terms switched on at given steps); that history is told in `card_history.md`, not here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad `--set key=value` or config file: one line for the user."""


@dataclass
class Config:
    """Every knob of the recipe; stored in checkpoints and the model card."""

    seed: int = 0  # scenes, batches and noise are drawn from (seed, step): the whole run is a function of this
    # An exported shapes pipeline to continue from ("": from scratch): its VAE, text encoder and UNet
    # become step 0's weights (live and EMA), with a fresh optimizer. The run is then a function of
    # (this config, those weights); their SHA-256 goes into the card.
    init_from: str = ""
    # Torch CPU threads, fixed for the whole run: float reductions split differently across threads, so
    # two runs are bit-identical only at the same count. 2 = the cores of the machines this was built on.
    threads: int = 2
    image_size: int = 64  # small enough to train on a CPU, large enough for 3 objects of 12-18 px
    max_length: int = 32  # the longest caption is 25 tokens; few padding tokens compete for attention
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 levels: 4x down, 64 px -> 16 x 16 latent
    latent_channels: int = 4  # SD's latent depth
    vae_steps: int = 821  # the committed VAE's first stage (held-out L1 0.028 then; 0.007 after the decoder stage)
    vae_batch: int = 32
    vae_lr: float = 2e-3  # cosine-decayed to 10% over `vae_steps`
    vae_kl_weight: float = 1e-6  # nearly a plain autoencoder, as SD's VAE; the scaling factor sets latent std 1
    # Then the decoder alone, encoder frozen (the latents do not move), on whole scenes: shapes kept by a
    # round trip of the committed VAE went from 94.9% to 99.5% (`shapes.vae.refine_decoder`). 0: no refinement.
    # The first values tried; in a trial run shapes kept stopped rising after 1,500 steps.
    decoder_steps: int = 2500
    decoder_batch: int = 16
    decoder_lr: float = 5e-4  # cosine-decayed to 10% over `decoder_steps`
    # data
    n_scenes: int = 80000  # encoded once (~0.5 GB of latents, masks and ids in data.pt)
    # text encoder
    text_hidden: int = 128  # most of the 7M parameters are CLIP's 49,408-token table, not the layers
    text_layers: int = 4
    text_heads: int = 4
    text_ff: int = 512
    # UNet
    unet_channels: tuple[int, ...] = (32, 64, 128)  # 3.2M params, ~1.4 s/step at batch 24 on 2 cores
    # SD's pattern: cross-attention at every level but the coarsest down block, and in the mid
    # block. (A variant without down-path attention at 16 x 16 and a 2 x 2 bottom level learned
    # colour more slowly: colour right 0.50 at step 1,869 vs 0.73 at step 747 for this layout.)
    unet_down: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    unet_up: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    unet_mid: str = "UNetMidBlock2DCrossAttn"
    unet_heads: int = 4
    norm_groups: int = 8
    # denoiser training
    steps: int = 22000  # the run ends here and exports (the committed weights: 22,016 steps)
    batch: int = 24  # ~1.3 steps/s on 2 CPU cores (the committed run: 22,016 steps in 4.66 h)
    lr: float = 5e-4
    text_lr_mult: float = 3.0  # the text encoder starts from random weights, beside a UNet that needs its words
    weight_decay: float = 0.01
    warmup: int = 100  # linear warm-up steps, then constant (or cosine-decayed, below)
    # After warm-up the rate follows a cosine from `lr` to `lr * lr_final` at `steps` (1.0: constant,
    # as the committed run trained; a continuation anneals).
    lr_final: float = 1.0
    ema_decay: float = 0.999  # the exported weights are the EMA
    min_snr: float = 5.0  # min-SNR-5 weighting (Hang et al., 2023): low-noise steps don't dominate
    offset_noise: float = 0.1  # lets the model change an image's mean (flat backgrounds)
    cond_drop: float = 0.1  # captions dropped for classifier-free guidance
    # Attention grounding (TokenCompose-style): each object word's cross-attention inside its mask.
    ground_weight: float = 0.1  # against the denoising loss
    ground_bg_weight: float = 1.0
    # Background term (attention that pixels outside every object give to object words) off from this
    # step (-1: never off). 0: never used: at high noise no pixel can tell whether it lies inside an
    # object, so the term taught the model to ignore object words there and layout stopped following text.
    ground_bg_stop: int = 0
    ground_pixel_weight: float = 1.0
    ground_own_weight: float = 1.0
    # Ownership term from this step: without it every object word learned to attend to every object alike.
    ground_own_start: int = 0
    # From step `ground_layout_start` (-1: never), at timesteps >= `ground_layout_t` (where no object is
    # visible yet) only position words are grounded: a causal text encoder cannot put position into the
    # colour and shape words that come before them, so grounding those there asks the impossible.
    ground_layout_t: int = 700
    ground_layout_start: int = 0
    # The SD schedule keeps 6.8% of the scene at t = 999, so a model trained on it finds the layout
    # in that residue and never learns to take it from the text, while sampling starts from pure
    # noise (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", 2024). From
    # `layout_noise_start` (-1: never), a share `layout_noise_p` of each batch is drawn at
    # t >= `layout_noise_t` from pure noise, with the matching noise target, so layout must come from text.
    layout_noise_p: float = 0.25
    layout_noise_t: int = 950
    layout_noise_start: int = 0
    # Shape words: without this the model followed colour and place but drew the shape the noise
    # suggested, because the denoising loss hardly changes between a circle and a square of 12 px.
    # From `shape_contrast_start` (-1: never), `shape_contrast_n` samples per step get a counterfactual
    # twin: the same scene redrawn with other shapes. On one noisy input of the true scene
    # (t >= `shape_contrast_t`), the change in predicted noise from the true caption to the twin's must
    # equal the change that the twin's scene implies; the error is relative to that change, so every t
    # counts alike. (Committed weights: right shape 0.38 -> 0.83 in 4,100 steps once it was switched on.)
    shape_contrast_start: int = 0
    shape_contrast_n: int = 8  # of the batch's 24 (each twin costs a VAE encode and two UNet passes)
    shape_contrast_t: int = 300  # at low t the noisy input itself shows the shape
    shape_contrast_weight: float = 0.05
    curriculum: tuple[int, int] = (400, 1200)  # steps of 1-object only, then of 1-2 objects, then 1-3
    bf16: bool = True  # bf16 autocast (CPU or GPU), as the committed weights were trained
    # bookkeeping (keyed to steps, so a run's log and checkpoints don't depend on the machine's speed)
    ckpt_every: int = 250  # steps between checkpoints (~4 min on 2 cores)
    eval_every: int = 500  # steps between periodic evaluations on the validation prompts
    eval_prompts: int = 24
    eval_guidance: float = 2.5
    eval_steps: int = 20  # sampling steps (DPM-Solver++), as StepX generates

    def __post_init__(self) -> None:
        if not 0.0 <= self.lr_final <= 1.0:
            raise ConfigError(f"Config.lr_final must be between 0 and 1 (a share of lr), not {self.lr_final}")
        if self.init_from:  # absolute: the work folder's config.json outlives the directory it was made from
            self.init_from = str(Path(self.init_from).resolve())
        if self.steps < (0 if self.init_from else 1):  # a continuation of 0 steps refines the decoder only
            raise ConfigError(f"Config.steps must be at least 1 from scratch (0 in a continuation), not {self.steps}")
        if self.decoder_steps < 0:
            raise ConfigError(f"Config.decoder_steps must be at least 0, not {self.decoder_steps}")
        for name in ("threads", "n_scenes", "batch", "vae_batch", "decoder_batch", "ckpt_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"Config.{name} must be at least 1, not {getattr(self, name)}")

    @property
    def latent_size(self) -> int:
        """Side of the latent grid: the image downsampled once per VAE level after the first."""
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    def to_json(self) -> str:
        """The config as JSON (tuples as lists)."""
        return json.dumps(asdict(self), indent=1)


@dataclass
class TrainState:
    """Counters that travel with the checkpoint."""

    step: int = 0
    train_seconds: float = 0.0
    evals: list[dict[str, Any]] = field(default_factory=list)  # periodic evaluations, in step order


def config_from_dict(values: dict[str, Any]) -> Config:
    """A Config from stored values (lists back to tuples); unknown keys are an error."""
    names = {f.name for f in fields(Config)}
    values = {"decoder_steps": 0, **values}  # a config written before the decoder stage existed: none
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown Config field(s) {', '.join(unknown)}")
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def load_config(path: Path) -> Config:
    """Read a work folder's config.json."""
    try:
        return config_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as err:
        raise ConfigError(f"{path}: not a Config ({err})") from err


def apply_overrides(cfg: Config, items: list[str]) -> Config:
    """Apply `key=value` overrides (values in JSON: `batch=32`, `curriculum=[10,20]`, `bf16=false`)."""
    names = {f.name for f in fields(Config)}
    values = asdict(cfg)
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        if key not in names:
            raise ConfigError(f"--set {key}: no such Config field (fields: {', '.join(sorted(names))})")
        current = values[key]
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            parsed = raw  # a bare string such as unet_mid=UNetMidBlock2D
        try:
            if isinstance(current, tuple):
                if not isinstance(parsed, list):
                    raise TypeError("expected a JSON list")
                values[key] = tuple(parsed)
            elif isinstance(current, bool):
                if not isinstance(parsed, bool):
                    raise TypeError("expected true or false")
                values[key] = parsed
            elif isinstance(current, int):
                if isinstance(parsed, bool) or not isinstance(parsed, int):
                    raise TypeError("expected an integer")
                values[key] = parsed
            elif isinstance(current, float):
                if isinstance(parsed, bool) or not isinstance(parsed, int | float):
                    raise TypeError("expected a number")
                values[key] = float(parsed)
            else:
                values[key] = str(parsed)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"--set {key}={raw}: {err}") from err
    return Config(**values)


def lr_factor(cfg: Config, step: int) -> float:
    """The learning rate's multiplier at `step`: linear warm-up, then constant or cosine to `lr_final`."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1))
    return cfg.lr_final + (1.0 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * frac))


def ema_decay(cfg: Config, step: int) -> float:
    """The EMA's decay at `step`: warmed up from scratch (an average of few steps is mostly the live weights),
    full from the first step of a continuation, whose EMA starts as the averaged weights it continues."""
    return cfg.ema_decay if cfg.init_from else min(cfg.ema_decay, (1 + step) / (10 + step))
