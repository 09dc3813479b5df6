"""One traced generation: config in, a `Trace` (plain numpy + metadata) out.

The pipeline's own `__call__` runs untouched; capture observes it through swapped-in attention
processors and UNet hooks. Previews (the predicted x0 of every step) are decoded in one batch after
the loop, outside the timed denoising.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from pipeline.capture import (
    AttentionRecorder,
    CapturePlan,
    attention_capture,
    plan_grids,
)
from pipeline.common import PREVIEW_MAX_PX, generated_run_row, prompt_tokens
from pipeline.common import to_pil as _to_pil
from pipeline.models import LoadedModel
from pipeline.nouns import tag_tokens
from pipeline.provenance import provenance
from pipeline.trace import Trace
from schema.limits import LimitError, check_generation, check_prompt


class GenerationError(ValueError):
    """A generation request that can't run, with a message for the user."""


@dataclass
class GenerationConfig:
    """Everything needed to regenerate a run; None means the model's default."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    tags: list[str] = field(default_factory=list)
    gallery: str | None = None
    true_cfg: float = 1.0  # FLUX.1 only: true classifier-free guidance with the negative prompt when > 1
    concepts: list[str] = field(default_factory=list)  # FLUX.1 only: ConceptAttention maps ("cat", "sky")

    def resolved(self, model: LoadedModel) -> GenerationConfig:
        """A copy with the model's defaults filled in, validated."""
        spec = model.spec
        cfg = GenerationConfig(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt or "",
            seed=int(self.seed),
            steps=spec.steps if self.steps is None else int(self.steps),
            guidance=spec.guidance if self.guidance is None else float(self.guidance),
            width=spec.size if self.width is None else int(self.width),
            height=spec.size if self.height is None else int(self.height),
            tags=list(self.tags),
            gallery=self.gallery,
            true_cfg=float(self.true_cfg),
            concepts=list(self.concepts),
        )
        if cfg.concepts and spec.kind != "flux":
            raise GenerationError(f"concepts (ConceptAttention) need a FLUX.1 model; {spec.name} is not one")
        patch = 2 if getattr(model.pipe, "transformer", None) is not None else 1  # DiTs: 2x2 latent patches
        validate(cfg, model.pipe.vae_scale_factor * patch, spec.name, model.pipe.scheduler)
        return cfg


def validate_prompt(cfg: GenerationConfig) -> None:
    """Raise GenerationError for prompt text that can't run (before any model is loaded)."""
    try:
        check_prompt(cfg.prompt, cfg.negative_prompt or "")
    except LimitError as exc:
        raise GenerationError(str(exc)) from None


def validate(cfg: GenerationConfig, vae_factor: int = 8, model: str | None = None, scheduler: object = None) -> None:
    """Raise GenerationError with one clear line for a request that can't run (schema.limits' table)."""
    validate_prompt(cfg)
    try:
        check_generation(model, cfg.steps, cfg.height, cfg.width, cfg.seed, cfg.guidance)
    except LimitError as exc:
        raise GenerationError(str(exc)) from None
    for name, v in (("width", cfg.width), ("height", cfg.height)):
        if v % vae_factor:
            raise GenerationError(f"{name} must be a multiple of this model's VAE factor {vae_factor}, got {v}")
    if scheduler is not None:
        check_scheduler_steps(scheduler, cfg.steps)


def check_scheduler_steps(scheduler: object, steps: int) -> None:
    """Raise GenerationError when `steps` runs past the scheduler's table of training timesteps."""
    if "FlowMatch" in type(scheduler).__name__:
        return  # flow matching (SD3, Flux) samples continuous sigmas: any step count fits
    table = int(scheduler.config.num_train_timesteps)
    fresh = type(scheduler).from_config(scheduler.config)  # set_timesteps mutates: probe a copy
    try:
        fresh.set_timesteps(steps)
        ok = int(fresh.timesteps.max()) < table
    except (ValueError, IndexError):
        ok = False
    if not ok:
        most = table - int(scheduler.config.get("steps_offset", 0) or 0)
        raise GenerationError(
            f"steps must be at most {most} for this model's {type(scheduler).__name__} "
            f"({table} training timesteps), got {steps}"
        )


def check_device(device: str | None) -> None:
    """Raise GenerationError when CUDA is asked for on a torch build or machine without it."""
    if device == "cuda" and not torch.cuda.is_available():
        build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise GenerationError(f"--device cuda: {build} (torch {torch.__version__}); use --device cpu")


@torch.no_grad()
def decode_previews(pipe: object, x0: list[torch.Tensor], batch: int = 8) -> list[Image.Image]:
    """Decode each step's predicted x0 with the pipeline's VAE, in batches, to small images."""
    vae = pipe.vae
    images: list[Image.Image] = []
    for i in range(0, len(x0), batch):
        lat = torch.cat(x0[i : i + batch]).to(vae.dtype) / vae.config.scaling_factor
        images += _to_pil(vae.decode(lat).sample, PREVIEW_MAX_PX)
    return images


def run_pipeline(model: LoadedModel, cfg: GenerationConfig, callback: object = None) -> Image.Image:
    """Call the model's pipeline for a resolved config; returns the final image."""
    generator = torch.Generator(device=model.device).manual_seed(cfg.seed)
    kwargs = {
        "prompt": cfg.prompt,
        "negative_prompt": cfg.negative_prompt or None,
        "num_inference_steps": cfg.steps,
        "guidance_scale": cfg.guidance,
        "width": cfg.width,
        "height": cfg.height,
        "generator": generator,
        "output_type": "pil",
    }
    if callback is not None:
        kwargs["callback_on_step_end"] = callback
    return model.pipe(**kwargs).images[0]


def generate_trace(
    model: LoadedModel,
    config: GenerationConfig,
    on_step: Callable[[int, int], None] | None = None,
    check_sums: bool = False,
) -> Trace:
    """Run one traced generation and assemble its trace in memory."""
    t_start = time.perf_counter()
    cfg = config.resolved(model)
    pipe = model.pipe
    if getattr(pipe, "transformer", None) is not None:  # SD3 / Flux: joint attention, block bands
        from pipeline.generate_dit import generate_dit_trace

        return generate_dit_trace(model, cfg, on_step, check_sums, t_start)
    tokens, truncated = prompt_tokens(pipe.tokenizer, cfg.prompt)
    tag_tokens(tokens, cfg.prompt)  # TITAN's object nouns, stored so the read side never loads a tagger
    vae_factor = pipe.vae_scale_factor
    latent = (cfg.height // vae_factor, cfg.width // vae_factor)
    self_grid, step_grid, levels = plan_grids(pipe.unet, latent)
    plan = CapturePlan(
        latent=latent,
        keep_tokens=tuple(t.token_index for t in tokens if t.has_map),
        self_grid=self_grid,
        step_grid=step_grid,
        cfg=cfg.guidance > 1 and pipe.unet.config.time_cond_proj_dim is None,
        guidance=cfg.guidance,
        check_sums=check_sums,
    )
    recorder = AttentionRecorder(plan, on_step=(lambda s: on_step(s + 1, cfg.steps)) if on_step else None)
    t0 = time.perf_counter()
    with attention_capture(pipe, recorder):
        final = run_pipeline(model, cfg)
    denoise_ms = (time.perf_counter() - t0) * 1000
    t1 = time.perf_counter()
    previews = decode_previews(pipe, recorder.x0)
    preview_ms = (time.perf_counter() - t1) * 1000
    run = generated_run_row(
        model,
        cfg,
        pipe,
        len(recorder.steps),
        latent=latent,
        self_grid=self_grid,
        step_grid=step_grid,
        levels=levels,
        prompt_truncated=truncated,
        denoise_ms=denoise_ms,
        preview_ms=preview_ms,
        total_ms=(time.perf_counter() - t_start) * 1000,
        **provenance(pipe),
    )
    return Trace(
        run=run,
        tokens=tokens,
        steps=recorder.steps,
        levels=levels,
        self_aggregate=recorder.self_aggregate(),
        previews=previews,
        final=final,
        max_sum_error=recorder.max_sum_error,
    )
