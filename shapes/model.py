"""The shapes model's parts, built from a `Config`: tokenizer, VAE, text encoder, UNet and schedulers.

The architecture is Stable Diffusion's (diffusers and transformers classes), only smaller, so the
exported pipeline loads and traces like any SD 1.x model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from pipeline.tiny import BOS, EOS, clip_tokenizer
from shapes.config import Config
from shapes.util import decoder_refinement

CLIP_VOCAB_SIZE = 49408  # CLIP's BPE vocabulary: the model reads real CLIP token ids

# Stable Diffusion's noise schedule: the sampler StepX uses must see the schedule the model learned.
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def make_tokenizer(cfg: Config) -> CLIPTokenizer:
    """CLIP's BPE tokenizer (CLIP's ids, padded with the end token) cut to the model's short context."""
    return clip_tokenizer(max_length=cfg.max_length)


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
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_ff,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        projection_dim=cfg.text_hidden,
    )
    return CLIPTextModel(conf)


def make_unet(cfg: Config) -> UNet2DConditionModel:
    """SD-style UNet; which levels carry cross-attention is part of the recipe (`Config.unet_down`...)."""
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
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
    return DDPMScheduler(**SD_BETAS, clip_sample=False, steps_offset=1)


def make_sample_scheduler() -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M) on the training schedule, for 20-step sampling."""
    return DPMSolverMultistepScheduler(**SD_BETAS, steps_offset=1)


def unet_layout_text(cfg: Config) -> str:
    """Which latent levels of the UNet carry cross-attention, in words (for the model card)."""
    sides = [cfg.latent_size // 2**i for i in range(len(cfg.unet_down))]
    down = [f"{s} x {s}" for s, b in zip(sides, cfg.unet_down, strict=True) if "CrossAttn" in b]
    up = [f"{s} x {s}" for s, b in zip(reversed(sides), cfg.unet_up, strict=True) if "CrossAttn" in b]
    mid = "CrossAttn" in cfg.unet_mid
    return (
        "levels " + ", ".join(f"{s} x {s}" for s in sides) + "; cross-attention in the down path at "
        f"{', '.join(down) or 'no level'}, in the up path at {', '.join(up) or 'no level'}"
        + (f", and in the mid block at {sides[-1]} x {sides[-1]}" if mid else ", none in the mid block")
    )


def start_from_export(folder: Path, text: CLIPTextModel, unet: UNet2DConditionModel, record: Path) -> str:
    """Load an exported pipeline's text encoder and UNet (float32) into `text` and `unet`, to continue from.

    The weights' digest is written to `record` at first use (the run's export may later overwrite the
    folder) and returned with the folder, as JSON.
    """
    text.load_state_dict(CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).state_dict())
    unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).state_dict())
    if not record.exists():
        record.write_text(json.dumps({"from": str(folder), "sha256": weights_digest(folder)}), "utf-8")
    return record.read_text("utf-8")


def export_problem(cfg: Config) -> str | None:
    """Why `cfg.init_from` can't be continued by this recipe (one line), or None: each component must load into
    the module this recipe builds, checked before a work folder is written. None for a run from scratch."""
    if not cfg.init_from:
        return None
    folder = Path(cfg.init_from)
    try:
        decoder_refinement(folder)
    except ValueError as err:
        return f"init_from={folder}: {err}"
    transformers_logging.disable_progress_bar()  # the refusal is one line on stderr
    parts = {
        "vae": (AutoencoderKL, make_vae),
        "text_encoder": (CLIPTextModel, make_text_encoder),
        "unet": (UNet2DConditionModel, make_unet),
    }
    for name, (cls, make) in parts.items():
        try:
            make(cfg).load_state_dict(cls.from_pretrained(folder / name, torch_dtype=torch.float32).state_dict())
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            detail = " ".join(str(err).split())[:120] or type(err).__name__
            return f"init_from={folder}: its {name} is not this recipe's ({detail})"
    return None


def weights_digest(folder: Path) -> str:
    """SHA-256 over an exported pipeline's weight files (sorted by path): which weights a run began from."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*/*.safetensors")):  # the components, not extras such as probe tokens
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
