"""One traced SD3 / SD3.5 / FLUX.1 generation: the DiT side of `pipeline.generate.generate_trace`.

Text positions of the joint sequence and the tokens stored for them:
  - SD3: 77 CLIP positions (CLIP-L and CLIP-G share them), then the T5 positions (`max_sequence_length`);
  - Flux: the T5 positions only (its CLIP gives the pooled vector, which is not attended to).
Per encoder: the start token (CLIP), each piece (words grouped by CLIP's '</w>' and SentencePiece's '▁'), the
end token, and one 'padding' pseudo-token summing every padding position (its mass shown, not hidden). A last
'text_share' pseudo-token (token_index -1) holds the share of each pixel's attention that goes to text at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from pipeline.capture_dit import DitPlan, DitRecorder, dit_bands, dit_capture, is_flux
from pipeline.common import PREVIEW_MAX_PX, generated_run_row, prompt_tokens, to_pil
from pipeline.concepts import concept_streams, parse_concepts
from pipeline.models import LoadedModel
from pipeline.nouns import tag_tokens
from pipeline.provenance import scheduler_config_json
from pipeline.trace import TokenInfo, Trace

CLIP_POSITIONS = 77  # SD3's CLIP part of the text sequence, whatever the prompt
SHARE_TOKEN = -1  # token_index of the text-share pseudo-token


class ResolvedConfig(Protocol):
    """What a DiT run reads of `pipeline.generate.GenerationConfig` (resolved; a dataclass, stored as JSON)."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    tags: list[str]
    gallery: str | None
    true_cfg: float
    concepts: list[str]


def is_dit(pipe: object) -> bool:
    """Whether a pipeline denoises with a transformer (SD3, Flux) rather than a UNet."""
    return hasattr(pipe, "transformer") and not hasattr(pipe, "unet")


def _clip_tokens(tokenizer: object, prompt: str, offset: int, first_word: int) -> tuple[list[TokenInfo], int, bool]:
    """CLIP positions as stored tokens (every one with a map), its word count and whether the prompt was cut."""
    tokens, truncated = prompt_tokens(tokenizer, prompt)
    for t in tokens:
        t.token_index += offset
        t.encoder = "clip"
        t.has_map = True  # the start token too: in joint attention it can draw mass, shown rather than hidden
        if t.word_index is not None:
            t.word_index += first_word
    words = len({t.word_index for t in tokens if t.word_index is not None})
    return tokens, words, truncated


def _t5_tokens(
    tokenizer: object, prompt: str, length: int, offset: int, first_word: int
) -> tuple[list[TokenInfo], int, bool]:
    """T5 positions as stored tokens: pieces grouped into words at '▁', then '</s>' (kind 'end')."""
    full = tokenizer(prompt, truncation=False).input_ids
    ids = tokenizer(prompt, truncation=True, max_length=length).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    tokens: list[TokenInfo] = []
    word = first_word - 1
    for pos, (tid, piece) in enumerate(zip(ids, pieces, strict=True)):
        if tid == tokenizer.eos_token_id:
            tokens.append(TokenInfo(offset + pos, tid, "</s>", None, None, "end", True, encoder="t5"))
            continue
        if piece.startswith("▁") or word < first_word:
            word += 1
        text = piece.replace("▁", " ").strip() or piece
        tokens.append(TokenInfo(offset + pos, tid, text, word, None, "word", True, encoder="t5"))
    for w in {t.word_index for t in tokens if t.word_index is not None}:
        group = [t for t in tokens if t.word_index == w]
        text = "".join(tokenizer.convert_ids_to_tokens([t.token_id for t in group])).replace("▁", " ").strip()
        for t in group:
            t.word = text
    return tokens, word + 1 - first_word, len(full) > len(ids)


def dit_tokens(pipe: object, prompt: str, text_length: int) -> tuple[list[TokenInfo], np.ndarray, bool]:
    """(stored tokens in map order, fold (text positions, stored tokens without the share), truncated)."""
    flux = is_flux(pipe.transformer)
    parts: list[tuple[list[TokenInfo], int, int]] = []  # (tokens, first position, positions)
    truncated = False
    words = 0
    if not flux:
        clip, words, cut = _clip_tokens(pipe.tokenizer, prompt, 0, 0)
        parts.append((clip, 0, CLIP_POSITIONS))
        truncated |= cut
    t5_tok = pipe.tokenizer_2 if flux else pipe.tokenizer_3
    start = 0 if flux else CLIP_POSITIONS
    t5, _, cut = _t5_tokens(t5_tok, prompt, text_length, start, words)
    parts.append((t5, start, text_length))
    truncated |= cut
    stored: list[TokenInfo] = []
    columns: list[list[int]] = []
    for tokens, first, count in parts:
        for t in tokens:
            stored.append(t)
            columns.append([t.token_index])
        pad = list(range(tokens[-1].token_index + 1, first + count))
        if pad:
            encoder = tokens[0].encoder
            stored.append(TokenInfo(pad[0], -1, f"<padding x{len(pad)}>", None, None, "padding", True, encoder=encoder))
            columns.append(pad)
        tag_tokens(tokens, prompt)  # each encoder's words on their own
    total = (0 if flux else CLIP_POSITIONS) + text_length
    fold = np.zeros((total, len(stored)), dtype=np.float32)
    for col, positions in enumerate(columns):
        fold[positions, col] = 1.0
    stored.append(TokenInfo(SHARE_TOKEN, -1, "<text share>", None, None, "text_share", True, encoder=None))
    return stored, fold, truncated


@torch.no_grad()
def decode_dit_previews(pipe: object, recorder: DitRecorder, height: int, width: int) -> list[torch.Tensor]:
    """Each step's predicted x0 = x_t - sigma * v (flow matching), decoded with the pipeline's VAE to [-1, 1]."""
    vae = pipe.vae
    images = []
    for sigma, x, v in recorder.velocities:
        x0 = x - sigma * v
        if recorder.plan.flux:
            x0 = pipe._unpack_latents(x0, height, width, pipe.vae_scale_factor)  # (1, C, H, W) from packed tokens
        lat = x0.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images.append(vae.decode(lat).sample)
    return images


def run_dit_pipeline(model: LoadedModel, cfg: ResolvedConfig) -> object:
    """Call an SD3 or Flux pipeline for a resolved config; returns the final PIL image."""
    generator = torch.Generator(device=model.device).manual_seed(cfg.seed)
    kwargs = {
        "prompt": cfg.prompt,
        "negative_prompt": cfg.negative_prompt or None,
        "num_inference_steps": cfg.steps,
        "guidance_scale": cfg.guidance,
        "width": cfg.width,
        "height": cfg.height,
        "generator": generator,
        "max_sequence_length": model.spec.text_length,
        "output_type": "pil",
    }
    if is_flux(model.pipe.transformer):
        kwargs["true_cfg_scale"] = cfg.true_cfg
    return model.pipe(**kwargs).images[0]


def token_grid(pipe: object, height: int, width: int) -> tuple[int, int]:
    """The image-token grid: latent grid / patch size (Flux packs 2x2 latent patches into one token)."""
    patch = int(getattr(pipe.transformer.config, "patch_size", 1) or 1)
    if is_flux(pipe.transformer):
        f = pipe.vae_scale_factor * 2
        return (height // f), (width // f)
    f = pipe.vae_scale_factor * patch
    return height // f, width // f


def generate_dit_trace(
    model: LoadedModel,
    cfg: ResolvedConfig,
    on_step: Callable[[int, int], None] | None = None,
    check_sums: bool = False,
    t_start: float | None = None,
) -> Trace:
    """Run one traced DiT generation (resolved config) and assemble its trace in memory."""
    t_start = t_start or time.perf_counter()
    pipe = model.pipe
    flux = is_flux(pipe.transformer)
    tokens, fold, truncated = dit_tokens(pipe, cfg.prompt, model.spec.text_length)
    grid = token_grid(pipe, cfg.height, cfg.width)
    bands = tuple(dit_bands(pipe.transformer))
    plan = DitPlan(
        grid=grid,
        text_len=fold.shape[0],
        fold=fold,
        bands=bands,
        flux=flux,
        cfg_batched=not flux and cfg.guidance > 1,
        guidance=cfg.true_cfg if flux else cfg.guidance,
        check_sums=check_sums,
    )
    streams = concept_streams(pipe, parse_concepts(cfg.concepts)) if flux and parse_concepts(cfg.concepts) else None
    recorder = DitRecorder(plan, on_step=(lambda s: on_step(s + 1, cfg.steps)) if on_step else None, concepts=streams)
    t0 = time.perf_counter()
    with dit_capture(pipe, recorder):
        final = run_dit_pipeline(model, cfg)
    denoise_ms = (time.perf_counter() - t0) * 1000
    t1 = time.perf_counter()
    previews = [to_pil(img, PREVIEW_MAX_PX)[0] for img in decode_dit_previews(pipe, recorder, cfg.height, cfg.width)]
    preview_ms = (time.perf_counter() - t1) * 1000
    band_keys = [(grid[0], grid[1], "band", b.label, i) for i, b in enumerate(bands)]
    run = generated_run_row(
        model,
        cfg,
        pipe,
        len(recorder.steps),
        latent=grid,
        self_grid=recorder.self_grid,
        step_grid=recorder.step_grid,
        levels=band_keys,
        level_modules=[",".join(b.modules) for b in bands],
        architecture="flux" if flux else "sd3",
        prompt_truncated=truncated,
        denoise_ms=denoise_ms,
        preview_ms=preview_ms,
        total_ms=(time.perf_counter() - t_start) * 1000,
        pipeline_class=type(pipe).__name__,
        scheduler_config=scheduler_config_json(pipe.scheduler),
    )
    return Trace(
        run=run,
        tokens=tokens,
        steps=recorder.steps,
        levels=band_keys,
        self_aggregate=recorder.self_aggregate(),
        previews=previews,
        final=final,
        max_sum_error=recorder.max_sum_error,
        concepts=streams.names if streams else None,
        concept_maps=streams.steps if streams else None,
        concept_blocks=len(streams.blocks) - streams.first if streams else 0,
    )
