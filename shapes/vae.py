"""Stage 1: the VAE that maps 64 px scenes to a 16 x 16 x 4 latent, trained for a fixed number of steps.

Trained on random 32 px crops (aligned to the 4 px latent cells) with bf16 autocast and an
object-weighted L1 + MSE loss, so the flat background does not drown out colour errors. Then the
decoder alone is refined on whole scenes with the encoder frozen, so the latents (what the denoiser
learns) stay as they were while small shapes' corners come back sharper. Crops, scenes, the posterior
sample and the learning rates are keyed to (seed, step): two runs give the same VAE.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL

from shapes import scenes
from shapes.check import check_objects
from shapes.config import Config
from shapes.model import make_vae
from shapes.util import Logger, atomic_save, decoder_refinement, to_tensor_images, to_uint8_images

VAE_SCENE_SEED = 10_000_000  # training crops come from scenes 10M + step * batch + i
VAE_HELDOUT_SEED = 20_000_000  # 256 scenes to measure the finished VAE on
VAE_SHAPE_SEED = 100_000  # 200 scenes for the card's "the VAE alone keeps the shape of ..."
DECODER_SCENE_SEED = 15_000_000  # decoder refinement's scenes: 15M + step * batch + i


def vae_loss_weights(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel weights (B, 1, H, W): 10 on object pixels, 1 on the plain background."""
    bg = torch.tensor(scenes.BACKGROUND, dtype=x.dtype).view(1, 3, 1, 1) / 127.5 - 1.0
    fg = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.05).to(x.dtype)
    return 1.0 + 9.0 * fg


def cosine_lr(peak: float, step: int, steps: int) -> float:
    """Cosine decay from `peak` to 10% of it over `steps` (both VAE stages)."""
    frac = step / max(steps, 1)
    return peak * (0.5 * (1 + math.cos(math.pi * frac)) * 0.9 + 0.1)


def weighted_error(rec: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, MSE) of a reconstruction, weighted 10x on object pixels (`vae_loss_weights`)."""
    w = vae_loss_weights(x)
    err = rec.float() - x
    return (err.abs() * w).mean() / w.mean(), (err.pow(2) * w).mean() / w.mean()


def _crops(cfg: Config, step: int) -> torch.Tensor:
    """The batch of step `step`: 32 px crops of fresh training scenes, at latent-cell offsets."""
    rng = np.random.default_rng([cfg.seed, step, 17])
    crop = cfg.image_size // 2
    out = []
    for i in range(cfg.vae_batch):
        image = scenes.training_scene(VAE_SCENE_SEED + step * cfg.vae_batch + i, size=cfg.image_size).image
        y, x = (rng.integers(0, (cfg.image_size - crop) // 4 + 1, size=2) * 4).tolist()
        out.append(image[y : y + crop, x : x + crop])
    return to_tensor_images(out)


def train_vae(cfg: Config, work: Path, log: Logger) -> tuple[AutoencoderKL, float]:
    """Train (or load `vae.pt` from the work folder) the VAE; returns it with the latent scaling factor."""
    path = work / "vae.pt"
    torch.manual_seed(cfg.seed)  # the initial weights: the same in every run
    vae = make_vae(cfg)
    if not path.exists() and cfg.init_from:
        # A continuation keeps the VAE it began from: the denoiser learned its latents. Its decoder is refined
        # below only if it never was (the export's card records how many refinement steps it had).
        done = AutoencoderKL.from_pretrained(Path(cfg.init_from) / "vae", torch_dtype=torch.float32).eval()
        l1, recon, _ = measure_vae(cfg, done)
        sf = float(done.config.scaling_factor)  # the latents the denoiser learned, not a re-measured one
        refined = decoder_refinement(Path(cfg.init_from))  # checked by `export_problem` before anything ran
        blob = {"state": done.state_dict(), "scaling_factor": sf, "l1": l1, "recon_correct": recon, "seconds": 0.0}
        atomic_save({**blob, "steps": cfg.vae_steps, "from": cfg.init_from, "decoder_steps": refined or 0}, path)
        told = "its card gives no vae_decoder_steps: treated as never refined" if refined is None else refined
        log(f"vae: from {cfg.init_from} (scaling_factor {sf:.4f}; decoder refinement steps: {told})")
    if path.exists():
        blob = torch.load(path, weights_only=False, map_location="cpu")
        vae.load_state_dict(blob["state"])
        if cfg.decoder_steps and not blob.get("decoder_steps"):  # the first stage is done, the second is not
            refine_decoder(cfg, vae, blob, path, log)
        return vae.eval(), float(blob["scaling_factor"])
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    n_params = sum(p.numel() for p in vae.parameters())
    log(f"vae: training {n_params / 1e6:.2f}M params for {cfg.vae_steps} steps")
    start = time.time()
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.vae_lr, step, cfg.vae_steps)
        x = _crops(cfg, step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=gen)).sample
        l1, mse = weighted_error(rec, x)
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
    vae.eval()
    l1, recon, sf = measure_vae(cfg, vae)
    log(
        f"vae done: {cfg.vae_steps} steps, held-out L1 {l1:.4f}, reconstructions judged correct "
        f"{recon:.3f}, scaling_factor {sf:.4f}"
    )
    blob = {
        "state": vae.state_dict(),
        "scaling_factor": sf,
        "l1": l1,
        "steps": cfg.vae_steps,
        "recon_correct": recon,
        "seconds": time.time() - start,
    }
    atomic_save(blob, path)
    if cfg.decoder_steps:
        refine_decoder(cfg, vae, blob, path, log)
    return vae.eval(), sf


def refine_decoder(cfg: Config, vae: AutoencoderKL, blob: dict[str, Any], path: Path, log: Logger) -> None:
    """Train the decoder alone for `decoder_steps` on whole scenes, encoder frozen; update `vae.pt`.

    The crop-trained VAE rounded small shapes' corners: after a round trip the scene check read about
    one object in twenty as another shape (94.9% kept), and generated images inherit that. Decoding whole
    scenes from the posterior mean (what sampling hands the decoder) fixes most of it without moving a
    latent. About 11 min on one CPU thread, run as one piece (not stopped by `--minutes`); stopped
    midway, it starts again from the first stage's VAE and repeats the same steps.
    """
    encoder = [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in encoder:
        p.requires_grad_(False)
    kept_before = vae_shape_kept(vae.eval())
    vae.train()
    opt = torch.optim.Adam(decoder, lr=cfg.decoder_lr)
    log(f"vae decoder: refining for {cfg.decoder_steps} steps, encoder frozen")
    start = time.time()
    for step in range(cfg.decoder_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.decoder_lr, step, cfg.decoder_steps)
        first = DECODER_SCENE_SEED + step * cfg.decoder_batch
        seeds = range(first, first + cfg.decoder_batch)
        x = to_tensor_images([scenes.training_scene(i, size=cfg.image_size).image for i in seeds])
        with torch.no_grad():
            lat = vae.encode(x).latent_dist.mean
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            rec = vae.decode(lat).sample
        l1, mse = weighted_error(rec, x)
        opt.zero_grad(set_to_none=True)
        (l1 + mse).backward()
        opt.step()
        if step % 250 == 0:
            log(f"vae decoder step {step} weighted l1 {l1.item():.4f} mse {mse.item():.4f}")
    for p in encoder:
        p.requires_grad_(True)
    vae.eval()
    l1, recon, _ = measure_vae(cfg, vae)
    kept = vae_shape_kept(vae)
    log(f"vae decoder done: held-out L1 {l1:.4f}, shapes kept by a round trip {kept_before:.3f} -> {kept:.3f}")
    blob.update(
        state=vae.state_dict(),
        l1=l1,
        recon_correct=recon,
        shape_kept=kept,
        decoder_steps=cfg.decoder_steps,
        decoder_seconds=time.time() - start,
        shape_kept_before_decoder=kept_before,
    )
    atomic_save(blob, path)


@torch.no_grad()
def measure_vae(cfg: Config, vae: AutoencoderKL) -> tuple[float, float, float]:
    """(held-out L1, share of objects the scene check judges correct after a round trip, latent scaling factor)."""
    held = [scenes.training_scene(VAE_HELDOUT_SEED + i, size=cfg.image_size) for i in range(256)]
    x = to_tensor_images([s.image for s in held])
    lat = vae.encode(x).latent_dist.mean
    rec = vae.decode(lat).sample
    l1 = (rec - x).abs().mean().item()
    images = to_uint8_images(rec)
    judged = [
        c.correct for s, im in zip(held, images, strict=True) for c in check_objects(im, [o.spec for o in s.objects])
    ]
    return l1, float(np.mean(judged)), float(1.0 / lat.std())  # latents scaled to unit std, as SD's VAE


@torch.no_grad()
def vae_shape_kept(vae: AutoencoderKL, n: int = 200) -> float:
    """Share of objects whose shape the scene check still reads after a VAE round trip."""
    kept = total = 0
    dev = next(vae.parameters()).device
    size = vae.config.sample_size
    for lo in range(0, n, 50):
        batch = [scenes.training_scene(VAE_SHAPE_SEED + i, size=size) for i in range(lo, min(n, lo + 50))]
        x = vae.decode(vae.encode(to_tensor_images([s.image for s in batch]).to(dev)).latent_dist.mean).sample
        for scene, image in zip(batch, to_uint8_images(x), strict=True):
            checks = check_objects(image, [o.spec for o in scene.objects])
            kept += sum(c.shape_ok for c in checks)
            total += len(checks)
    return kept / max(total, 1)
