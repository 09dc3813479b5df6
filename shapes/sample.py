"""Sampling with word maps, the periodic evaluation on validation prompts, and the export.

Word maps here are StepX's own (`schema.maps`, what the store and `stepx eval` use), thresholds and
IoU are `analysis.metrics`': the trainer's numbers and `stepx eval`'s are measured the same way.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from analysis.metrics import mask_iou, otsu_mask
from schema.maps import DEFAULT_AGGREGATION, combine_levels, daam_threshold, level_label, level_weights, upsample
from shapes import splits
from shapes.card import write_card
from shapes.check import check_objects
from shapes.config import Config, TrainState
from shapes.losses import AttentionStore, install_recorder
from shapes.model import make_sample_scheduler, make_text_encoder, make_tokenizer, make_unet, make_vae
from shapes.util import Logger, to_uint8_images, torch_threads

SWEEP_GUIDANCE = (1.5, 2.0, 3.0, 4.0)  # the export picks the card's default guidance among these
SWEEP_PROMPTS = 48
TIMING_PROMPT = "a red circle on the left and a blue square on the right"


class Trained(Protocol):
    """What the export reads from a trainer (`shapes.train.Trainer` is one)."""

    cfg: Config
    state: TrainState
    work: Path
    vae: AutoencoderKL
    sf: float
    ema_text: CLIPTextModel
    ema_unet: UNet2DConditionModel


def word_token_positions(tokenizer: CLIPTokenizer, words: list[tuple[str, int]]) -> list[int]:
    """Index of the first token of each caption word (after the start token)."""
    pos, out = 1, []
    for word, _ in words:
        out.append(pos)
        pos += len(tokenizer.encode(word, add_special_tokens=False))
    return out


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
) -> tuple[np.ndarray, np.ndarray]:
    """Sample images (N, H, W, 3 uint8) and word maps (N, T, H, W float32) for the prompts.

    Each cross-attention layer's head-averaged map is averaged within its level (the mid block is a
    level of its own) and summed over steps; `schema.maps` combines the levels into one map per token
    with its default (DAAM's) weights, on the latent grid, then upsamples it to the image. (DAAM
    clamps each head's upsampled map before averaging; here the head-averaged maps are combined.)
    """
    store = AttentionStore()
    install_recorder(unet, store)
    n = len(prompts)
    length = tokenizer.model_max_length
    dev = unet.device
    ids = torch.tensor(tokenizer(prompts, padding="max_length", max_length=length, truncation=True).input_ids).to(dev)
    empty = torch.tensor(tokenizer([""] * n, padding="max_length", max_length=length).input_ids).to(dev)
    context = torch.cat([text(empty)[0], text(ids)[0]])  # (2N, T, hidden): unconditional half first
    sched = make_sample_scheduler()
    sched.set_timesteps(steps)
    grid = unet.config.sample_size
    gen = torch.Generator().manual_seed(seed)
    lat = (torch.randn(n, unet.config.in_channels, grid, grid, generator=gen) * sched.init_noise_sigma).to(dev)
    sums: dict[str, torch.Tensor] = {}  # per level label: (N, HW, T) summed over steps and layers
    counts: dict[str, int] = {}  # layer calls per level, over all steps
    for t in sched.timesteps:
        store.clear()
        store.active = True
        inp = sched.scale_model_input(torch.cat([lat, lat]), t)
        eps = unet(inp, t, encoder_hidden_states=context).sample
        store.active = False
        for m, layer in zip(store.maps, store.layers, strict=True):
            side = math.isqrt(m.shape[1])
            label = level_label((side, side, "mid") if layer.startswith("mid_block") else (side, side))
            sums[label] = sums.get(label, 0) + m[n:].float()  # the conditional half
            counts[label] = counts.get(label, 0) + 1
        eu, ec = eps.chunk(2)
        lat = sched.step(eu + guidance * (ec - eu), t, lat).prev_sample
    store.clear()
    image = to_uint8_images(vae.decode(lat / sf).sample)
    levels = {}
    for label, total in sums.items():
        side = math.isqrt(total.shape[1])
        per_level = total * (steps / counts[label])  # layers averaged, steps summed
        levels[label] = per_level.permute(0, 2, 1).reshape(n, length, side, side).cpu().numpy()  # (N, T, s, s)
    # Every layer has the same heads, so layers per level weigh levels as layers x heads do.
    weights = level_weights(DEFAULT_AGGREGATION, {k: c // steps for k, c in counts.items()})
    size = image.shape[1]
    return image, upsample(combine_levels(levels, weights, grid, grid), size, size)


def evaluate(
    unet: UNet2DConditionModel,
    text: CLIPTextModel,
    vae: AutoencoderKL,
    sf: float,
    tokenizer: CLIPTokenizer,
    n: int = 24,
    guidance: float = 2.5,
    steps: int = 20,
) -> dict[str, Any]:
    """Scores on the validation split (never the test split): object checks, shape-noun word-map IoU."""
    suite = splits.validation_suite(n, size=vae.config.sample_size)
    keys = ("present", "colour_ok", "region_ok", "objects_correct", "shape_ok")
    keys += ("miou_daam", "miou_otsu", "miou_uniform", "mass_in", "miou_daam_correct")
    flags: dict[str, list[float]] = {k: [] for k in keys}
    blank = 0
    chunk = 16
    for lo in range(0, n, chunk):
        part = suite[lo : lo + chunk]
        prompts = [s.caption for s in part]
        seed = splits.noise_seeds("validation", lo, 1)[0]  # the chunk's noise, from validation's seeds
        images, maps = generate_with_maps(unet, text, vae, sf, tokenizer, prompts, guidance, steps, seed=seed)
        for scene, image, wmap in zip(part, images, maps, strict=True):
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
                daam = mask_iou(daam_threshold(heat), ref)
                flags["miou_daam"].append(daam)
                flags["miou_otsu"].append(mask_iou(otsu_mask(heat), ref))
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
    prompt: str = TIMING_PROMPT,
    sample_path: Path | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    """Median wall time of a 20-step pipeline call on the saved model (after one warm-up), on `threads` threads:
    the two cores the README quotes, whatever thread count the training run used."""
    with torch_threads(threads):
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


def sweep_rank(res: dict[str, Any]) -> tuple[float, float, float]:
    """How the export picks the default guidance: most objects correct, then right shape, then sharper maps."""
    return res["objects_correct"], res["shape_ok"], max(res["miou_daam"], res["miou_otsu"])


def export(trainer: Trained, out: Path, log: Logger, final_eval: bool = True) -> None:
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
        for g in SWEEP_GUIDANCE:
            res = evaluate(unet, text, vae, trainer.sf, tokenizer, n=SWEEP_PROMPTS, guidance=g, steps=cfg.eval_steps)
            sweep.append(res)
            log("export eval " + json.dumps(res))
    best = max(sweep, key=sweep_rank, default=None)  # ties: the lowest guidance (the sweep's order)
    guidance = best["guidance"] if best else cfg.eval_guidance
    timing = time_generation(out, guidance, sample_path=trainer.work / "sample.png")
    log(f"export: generation timing {json.dumps(timing)}")
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    write_card(out, cfg, trainer.state, trainer.work, trainer.vae, sweep, guidance, timing, size_mb)
    log(f"export: model card written, folder {size_mb:.1f} MB, default guidance {guidance}")
