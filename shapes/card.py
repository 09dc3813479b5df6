"""The exported model's README.md card: `card_template.md` filled from the run's config and scores.

The committed weights' history (`card_history.md`) is told when the run's schedule is that run's;
its table also states the recipe defaults, which a test holds to `Config`.
"""

from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import asdict
from pathlib import Path
from string import Template
from typing import Any

import torch
from diffusers import AutoencoderKL

from shapes import scenes
from shapes.config import Config, TrainState
from shapes.model import unet_layout_text
from shapes.vae import vae_shape_kept

TEMPLATE = Path(__file__).with_name("card_template.md")
HISTORY = Path(__file__).with_name("card_history.md")

_ROW = re.compile(r"^\| `(\w+)` \| ([^|]+) \| ([^|]+) \|$")
# Which term a schedule field switches, and whether the step turns it on or off.
_SCHEDULE = {
    "ground_own_start": ("ownership loss", "on"),
    "ground_bg_stop": ("background loss", "off"),
    "ground_layout_start": ("position-only grounding at high noise", "on"),
    "layout_noise_start": ("layout from pure noise", "on"),
    "shape_contrast_start": ("shape twins", "on"),
}


def history_table() -> dict[str, tuple[str, str]]:
    """Rows of the history's table: field -> (committed run's value, recipe default), as written."""
    rows = {}
    for line in HISTORY.read_text(encoding="utf-8").splitlines():
        m = _ROW.match(line.strip())
        if m:
            rows[m.group(1)] = (m.group(2).strip(), m.group(3).strip())
    return rows


def is_committed_schedule(cfg: Config) -> bool:
    """Whether `cfg` switches its terms at the committed run's steps (then its card tells that history)."""
    steps = {k: int(v) for k, (v, _) in history_table().items() if k in _SCHEDULE}
    return all(getattr(cfg, k) == v for k, v in steps.items())


def schedule_text(cfg: Config) -> str:
    """One bullet per scheduled term: from which step it was on (or until which step)."""
    lines = []
    for name, (term, switch) in _SCHEDULE.items():
        step = getattr(cfg, name)
        if switch == "on":
            when = "never" if step < 0 else "from the start" if step == 0 else f"from step {step}"
        else:
            when = "never" if step == 0 else "throughout" if step < 0 else f"until step {step}"
        lines.append(f"- {term}: {when} (`{name}` = {step})")
    return "\n".join(lines)


def decoder_only(cfg: Config, state: TrainState) -> bool:
    """Whether this run is a continuation that trained no denoiser step (at most its decoder was refined)."""
    return bool(cfg.init_from) and not state.step


def refined_here(vae_blob: dict[str, Any]) -> bool:
    """Whether this run refined the VAE's decoder (rather than inheriting a refined or unrefined one)."""
    return "decoder_seconds" in vae_blob


def continuation_text(cfg: Config, state: TrainState, work: Path, vae_blob: dict[str, Any]) -> str:
    """For a run that continued exported weights (`init_from`): which weights, and what this run changed."""
    if not cfg.init_from:
        return ""
    digest = json.loads((work / "init.json").read_text(encoding="utf-8"))["sha256"]
    theirs = f"earlier weights (weight files' SHA-256 {digest}; the history below is theirs)"
    if decoder_only(cfg, state):
        if refined_here(vae_blob):
            return (
                f"These are {theirs} with only the VAE's decoder refined (Recipe, VAE): their text encoder, UNet "
                "and latents are unchanged. "
            )
        return f"These are {theirs}, exported unchanged. "
    vae = "its decoder refined (Recipe, VAE)" if refined_here(vae_blob) else "unchanged"
    return (
        f"These weights continue {theirs} for {state.step} steps of the recipe with every term on from the start, "
        f"no curriculum, shape twins weighted {cfg.shape_contrast_weight}, and the learning rate annealed by a "
        f"cosine from {cfg.lr} to {cfg.lr * cfg.lr_final:.2g} (`lr_final` = {cfg.lr_final}); the VAE is the one "
        f"they began with, {vae}. "
    )


def decoder_text(cfg: Config, vae_blob: dict[str, Any]) -> str:
    """The VAE's second stage, as the card tells it ("" when the decoder was not refined)."""
    if not vae_blob.get("decoder_steps"):
        return ""
    if not refined_here(vae_blob):
        return (
            f"then the decoder alone refined for {vae_blob['decoder_steps']} steps on whole scenes with the "
            "encoder frozen, in the weights this run continues; "
        )
    return (
        f"then the decoder alone refined on whole scenes with the encoder frozen (so no latent moved), "
        f"{vae_blob['decoder_steps']} steps of batch {cfg.decoder_batch}, lr {cfg.decoder_lr} cosine-decayed to "
        f"10% ({vae_blob['decoder_seconds'] / 60:.1f} min): objects whose shape survives a round trip "
        f"{vae_blob['shape_kept_before_decoder']:.1%} -> {vae_blob['shape_kept']:.1%}; "
    )


def schedule_section(cfg: Config, state: TrainState) -> str:
    """When each term was on in this run, or why this run has no schedule of its own."""
    if decoder_only(cfg, state):
        return (
            "This run trained no denoiser steps; the history below tells when each term was on in the run it continues."
        )
    return "When each term was on in this run:\n\n" + schedule_text(cfg)


def trained_text(cfg: Config, state: TrainState) -> str:
    """The denoiser's steps and time in this run."""
    if decoder_only(cfg, state):
        return "No denoiser steps in this run; the decoder refinement ran"
    return f"{state.step} steps, {state.train_seconds / 3600:.2f} h of training"


def cpu_name() -> str:
    """The CPU's model name, as the OS reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _score(row: dict[str, Any], key: str) -> str:
    """A score cell, or a dash where an older evaluation did not measure it."""
    return f"{row[key]:.3f}" if key in row else "-"


def write_card(
    out: Path,
    cfg: Config,
    state: TrainState,
    work: Path,
    vae: AutoencoderKL,
    sweep: list[dict[str, Any]],
    guidance: float,
    timing: dict[str, Any],
    size_mb: float,
) -> None:
    """Write `out/README.md`: data, recipe, training time, hardware, scores."""
    from shapes.evaluate import CARD_END, CARD_START  # `stepx eval --card` fills between them (imports the store)

    vae_blob = torch.load(work / "vae.pt", weights_only=False, map_location="cpu")
    sweep_rows = "\n".join(
        f"| {r['guidance']} | {r['objects_correct']:.3f} | {r['present']:.3f} | "
        f"{r['colour_ok']:.3f} | {r['region_ok']:.3f} | {_score(r, 'shape_ok')} | {r['blank']:.3f} | "
        f"{r['miou_daam']:.3f} | {r['miou_otsu']:.3f} | {r['miou_uniform']:.3f} |"
        for r in sweep
    )
    eval_rows = (
        "\n".join(
            f"| {e['step']} | {e['objects_correct']:.3f} | {_score(e, 'shape_ok')} | {e['miou_daam']:.3f} "
            f"| {e['miou_otsu']:.3f} |"
            for e in state.evals
        )
        or "| none in this run | | | | |"
    )
    device = f"{cpu_name()} CPU ({os.cpu_count()} cores)"
    if torch.cuda.is_available():
        device += f" and {torch.cuda.get_device_name(0)}"
    values: dict[str, Any] = {
        **asdict(cfg),
        "guidance": guidance,
        "size_mb": f"{size_mb:.1f}",
        "shapes": ", ".join(scenes.SHAPES),
        "n_colours": len(scenes.COLOURS),
        "colours": ", ".join(scenes.COLOURS),
        "positions": ", ".join(scenes.POSITIONS),
        "heldout": "\n".join(f"- {c} {s} at {p}" for c, s, p in scenes.HELDOUT),
        "latent_size": cfg.latent_size,
        "vae_steps": vae_blob["steps"],
        "vae_time": "kept from the weights this run continues"
        if cfg.init_from
        else f"{vae_blob['seconds'] / 60:.1f} min",
        "vae_l1": f"{vae_blob['l1']:.4f}",
        "vae_recon": f"{vae_blob.get('recon_correct', float('nan')):.3f}",
        "sf": f"{float(vae_blob['scaling_factor']):.4f}",
        "unet_layout": unet_layout_text(cfg),
        "cond_drop_pct": f"{cfg.cond_drop:.0%}",
        "layout_noise_pct": f"{cfg.layout_noise_p:.0%}",
        "bf16": "on" if cfg.bf16 else "off",
        "curriculum_1": cfg.curriculum[0],
        "curriculum_2": cfg.curriculum[1],
        "schedule": schedule_section(cfg, state),
        "steps_text": f"{cfg.steps} steps"
        if cfg.steps
        else "no steps in this run (the history tells the run it continues)",
        "trained": trained_text(cfg, state),
        "threads_text": "1 torch thread" if cfg.threads == 1 else f"{cfg.threads} torch threads",
        "decoder": decoder_text(cfg, vae_blob),
        "vae_decoder_steps": int(vae_blob.get("decoder_steps", 0)),
        "device": device,
        "torch_version": torch.__version__,
        "continuation": continuation_text(cfg, state, work, vae_blob),
        "history": HISTORY.read_text(encoding="utf-8").strip() if is_committed_schedule(cfg) or cfg.init_from else "",
        "sweep_prompts": sweep[0]["prompts"] if sweep else 0,
        "sweep_rows": sweep_rows,
        "timing_prompt": timing["prompt"],
        "timing_steps": timing["steps"],
        "timing_threads": timing["threads"],
        "timing_seconds": f"{timing['seconds']:.2f}",
        "timing_runs": timing["runs"],
        "eval_rows": eval_rows,
        "card_start": CARD_START,
        "card_end": CARD_END,
        "card_path": out / "README.md",
        "vae_shape_kept": f"{vae_blob['shape_kept'] if 'shape_kept' in vae_blob else vae_shape_kept(vae):.1%}",
    }
    text = Template(TEMPLATE.read_text(encoding="utf-8")).substitute(values)
    text = re.sub(r"\n{3,}", "\n\n", text)  # an empty history leaves no gap
    (out / "README.md").write_text(text, encoding="utf-8")
