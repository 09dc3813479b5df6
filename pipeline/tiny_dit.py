"""Tiny SD3, SD3.5-layout and FLUX.1 pipelines built in-process from config, offline, with a fixed seed.

The configs are diffusers' own test components (`get_dummy_components` of tests/pipelines/stable_diffusion_3
and tests/pipelines/flux) with a few more blocks, so block bands have something to split, and the project's
committed tokenizers: CLIP's real BPE (data/tokenizers/clip) and a small T5 unigram vocabulary
(data/tokenizers/t5, rebuilt by `write_t5_tokenizer`). Every module is put in eval mode: T5Config has
dropout 0.1 and a model built from config starts in train mode, which would make runs nondeterministic.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from pipeline.tiny import BOS, CLIP_VOCAB_DIR, EOS, clip_tokenizer

T5_DIR = CLIP_VOCAB_DIR.parent / "t5"
T5_PIECES = 1500  # word and sub-word pieces taken from CLIP's merge order: common prompt words are one piece
DIT_LAYOUTS = ("sd3", "sd35", "flux")
TEXT_LENGTH = 32  # T5 positions of the tiny pipelines (max_sequence_length); the real models use 256/512


def t5_vocab() -> list[tuple[str, float]]:
    """A SentencePiece-style unigram vocabulary ('▁' starts a word) derived from CLIP's committed BPE vocabulary.

    Pieces come in CLIP's merge order (frequency order), so the score falls with the rank, Zipf-like; every
    printable ASCII character is a piece too, so any ASCII prompt tokenizes without <unk>.
    """
    vocab = json.loads((CLIP_VOCAB_DIR / "vocab.json").read_text())
    ordered = sorted(vocab, key=vocab.__getitem__)
    pieces: dict[str, float] = {}
    for ch in [chr(c) for c in range(33, 127)]:
        pieces.setdefault(ch, -12.0)
        pieces.setdefault("▁" + ch, -11.0)
    pieces["▁"] = -10.0
    rank = 0
    for entry in ordered[512:]:  # the 512 byte entries first, then merges in the order BPE learnt them
        word_end = entry.endswith("</w>")
        text = entry.removesuffix("</w>")
        if not text.isascii() or not text.isprintable() or len(text) < 2:
            continue
        piece = "▁" + text if word_end else text
        if piece in pieces and pieces[piece] > -10:
            continue
        pieces[piece] = -math.log(rank + 2)
        rank += 1
        if rank >= T5_PIECES:
            break
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + sorted(pieces.items(), key=lambda kv: -kv[1])


def write_t5_tokenizer(folder: Path = T5_DIR) -> Path:
    """Write the tiny T5 tokenizer (tokenizer.json + config) to `folder`; the committed copy came from this."""
    tok = T5Tokenizer(vocab=t5_vocab(), extra_ids=100)
    tok.save_pretrained(str(folder))
    return folder


def t5_tokenizer(max_length: int = TEXT_LENGTH) -> PreTrainedTokenizerFast:
    """The committed tiny T5 tokenizer, loaded offline."""
    tok = PreTrainedTokenizerFast.from_pretrained(str(T5_DIR), local_files_only=True)
    tok.model_max_length = max_length
    return tok


def _clip(hidden: int = 32, projection: bool = True) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(vocab_size: int) -> T5EncoderModel:
    """hf-internal-testing/tiny-random-t5's shape (d_model 32, 5 layers), with this tokenizer's vocabulary."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=5,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.1,
        feed_forward_proj="relu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def _vae(latent_channels: int, real_geometry: bool = False) -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 4, 4, 4) if real_geometry else (4,),  # 8x like the real VAEs, or 1x
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def build_tiny_dit(
    layout: str = "sd3", seed: int = 0, real_geometry: bool = False
) -> StableDiffusion3Pipeline | FluxPipeline:
    """A random-weight SD3 ('sd3'), SD3.5-layout ('sd35': dual attention + RMS q/k norm) or Flux pipeline.

    real_geometry: an 8x VAE and SD3's 2x2 patches, so an image has the real models' token grid (1024 px: 64x64).
    """
    if layout not in DIT_LAYOUTS:
        raise ValueError(f"unknown tiny DiT layout {layout!r}; choose from {', '.join(DIT_LAYOUTS)}")
    torch.manual_seed(seed)
    t5_tok = t5_tokenizer()
    if layout == "flux":
        transformer = FluxTransformer2DModel(
            patch_size=1,  # Flux packs 2x2 latents into a token in the pipeline, not the transformer
            in_channels=4,
            num_layers=2,  # the test config has 1 and 1: two of each give two bands per stream
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
        )
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_vae(1, real_geometry),
            text_encoder=_clip(projection=False),
            tokenizer=clip_tokenizer(),
            text_encoder_2=_t5(len(t5_tok)),
            tokenizer_2=t5_tok,
            transformer=transformer,
        )
    else:
        sd35 = layout == "sd35"
        transformer = SD3Transformer2DModel(
            sample_size=128 if real_geometry else 32,
            patch_size=2 if real_geometry else 1,
            in_channels=4,
            num_layers=3,  # thirds: one block per band
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
            qk_norm="rms_norm" if sd35 else None,
            dual_attention_layers=(0, 1) if sd35 else (),
        )
        pipe = StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_vae(4, real_geometry),
            text_encoder=_clip(),
            tokenizer=clip_tokenizer(),
            text_encoder_2=_clip(),
            tokenizer_2=clip_tokenizer(pad_token="!"),
            text_encoder_3=_t5(len(t5_tok)),
            tokenizer_3=t5_tok,
            transformer=transformer,
        )
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
