"""Small Stable Diffusion pipelines built in-process from config, with a fixed seed.

`tiny` is the fast test model; `sd15`, `sd21` and `sdxl` layouts keep the real block layout of
those models (block types, layers per block, attention placement, VAE depth) with tiny widths, so
capture sees exactly the levels the real models have. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

CLIP_VOCAB_DIR = Path(__file__).resolve().parent.parent / "data" / "tokenizers" / "clip"
BOS, EOS = 49406, 49407

LAYOUTS = ("tiny", "sd15", "sd21", "sdxl")


def clip_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """CLIP's real BPE tokenizer from the committed vocab (SD 1.5 pads with the end token).

    The one CLIP tokenizer setup (tiny pipelines, the embedded model, bench). transformers 5 takes the files as
    `vocab=`/`merges=`; its `vocab_file=`/`merges_file=` are silently ignored (a 3-token vocab), hence the floor.
    """
    return CLIPTokenizer(
        vocab=str(CLIP_VOCAB_DIR / "vocab.json"),
        merges=str(CLIP_VOCAB_DIR / "merges.txt"),
        model_max_length=max_length,
        pad_token=pad_token,
    )


def _text_encoder(hidden: int, projection: bool = False) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(blocks: tuple[int, ...]) -> AutoencoderKL:
    n = len(blocks)
    return AutoencoderKL(
        block_out_channels=blocks,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_pipeline(layout: str = "tiny", seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight pipeline of the given layout, identical for the same seed."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown tiny layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    torch.manual_seed(seed)
    if layout == "sdxl":
        return _build_sdxl()
    if layout == "tiny":
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = _vae((32, 64))  # 2x: 64 px images, 32x32 latents
    else:
        sd21 = layout == "sd21"
        unet = UNet2DConditionModel(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32,
            attention_head_dim=(2, 4, 4, 4) if sd21 else 8,
            use_linear_projection=sd21,
            norm_num_groups=8,
        )
        vae = _vae((16, 16, 32, 32))  # 8x, as SD's VAE
    text_encoder = _text_encoder(32)
    pad = "!" if layout == "sd21" else "<|endoftext|>"
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(pad_token=pad),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl() -> StableDiffusionXLPipeline:
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    return StableDiffusionXLPipeline(
        vae=_vae((16, 16, 32, 32)),
        text_encoder=_text_encoder(32),
        text_encoder_2=_text_encoder(32, projection=True),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=_scheduler(),
    )
