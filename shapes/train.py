"""Train StepX's small "shapes" text-to-image model on procedural scenes (CPU, or a GPU when lent).

    stepx train-shapes [--resume] [--minutes N] [--device cuda] [--workers 8] [--set key=value ...]

(`make model` runs `stepx train-shapes --resume`; the same as `python -m shapes.train`.) Stages, each
resumable from files in the work folder (default `data/models/.train` in the repository):

1. VAE (`vae.pt`, `shapes/vae.py`): an `AutoencoderKL` that maps 64 px images to a 16 x 16 x 4 latent.
2. Data (`data.pt`, `shapes/data.py`): training scenes (no held-out combinations) encoded once to
   latents, with caption token ids, which tokens name which object, and object masks on the latent grid.
3. Denoiser (`ckpt.pt`, this file): a CLIP-style text encoder and a cross-attention
   `UNet2DConditionModel` trained jointly with epsilon loss (min-SNR-5, offset noise, 10% caption
   dropout, EMA) plus attention grounding and shape twins (`shapes/losses.py`).

The recipe is `shapes.config.Config`; a new work folder stores it as `config.json` (`--set` changes
fields then). Checkpoints and periodic evaluations come every so many steps; `--resume` continues
from the latest, and the same steps follow whatever the sessions' lengths. Progress goes to
`<work>/log.txt`. When the recipe's steps are done (or with `--export-only`), the EMA weights are saved
as a diffusers `StableDiffusionPipeline` (safetensors) with a README model card (`shapes/card.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shapes import scenes
from shapes.config import Config, ConfigError, TrainState, apply_overrides, ema_decay, load_config, lr_factor
from shapes.data import build_data, caption_tokens, count_pools, sample_batch, scene_seed, shape_twin
from shapes.losses import AttentionStore, grounding_loss, install_recorder
from shapes.model import (
    export_problem,
    make_text_encoder,
    make_tokenizer,
    make_train_scheduler,
    make_unet,
    start_from_export,
)
from shapes.sample import evaluate, export
from shapes.util import DEFAULT_OUT, DEFAULT_WORK, Logger, atomic_save, to_tensor_images
from shapes.vae import train_vae


class Trainer:
    """Joint text-encoder + UNet training with EMA, checkpoints and periodic evaluation."""

    def __init__(self, cfg: Config, work: Path, log: Logger, device: str = "cpu", workers: int = 1) -> None:
        self.cfg = cfg
        self.work = work
        self.log = log
        self.device = torch.device(device)
        torch.set_num_threads(cfg.threads)  # fixed for the run: part of what makes it repeatable
        self.tokenizer = make_tokenizer(cfg)
        self.vae, self.sf = train_vae(cfg, work, log)
        self.vae.to(self.device)
        # A continuation of 0 steps (a refined decoder only) needs no training data.
        self.data = build_data(cfg, work, self.vae, self.sf, self.tokenizer, log, workers) if cfg.steps else {}
        torch.manual_seed(cfg.seed)
        self.text = make_text_encoder(cfg).to(self.device)
        self.unet = make_unet(cfg).to(self.device)
        if cfg.init_from and not (work / "ckpt.pt").exists():  # a resumed run's weights are its checkpoint's
            log(f"init: {start_from_export(Path(cfg.init_from), self.text, self.unet, work / 'init.json')}")
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
        self.pools = count_pools(self.data) if self.data else {}
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
        idx = sample_batch(cfg, st.step, self.pools)
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
        lr_scale = lr_factor(cfg, st.step)
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
        decay = ema_decay(cfg, st.step)
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

    def run(self, minutes: float, max_steps: int | None = None) -> bool:
        """Train until `Config.steps` (or `max_steps`) or the session's time budget, checkpointing and
        evaluating every so many steps on the way.

        Returns True when the step target is reached; False when the budget ran out or SIGTERM/SIGINT
        stopped the session (the caller then skips the export; `--resume` continues).
        """
        cfg, st = self.cfg, self.state
        target = cfg.steps if max_steps is None else min(max_steps, cfg.steps)
        stop = {"now": False}

        def on_signal(signum: int, _frame: Any) -> None:
            self.log(f"signal {signum}: checkpointing and stopping")
            stop["now"] = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        start = time.time()
        window: list[dict[str, float]] = []
        window_start = time.time()
        n_params = (sum(p.numel() for p in self.unet.parameters()), sum(p.numel() for p in self.text.parameters()))
        self.log(
            f"train: unet {n_params[0] / 1e6:.2f}M, text {n_params[1] / 1e6:.2f}M params, from step {st.step} "
            f"to {target}, budget {minutes:.1f} min, {cfg.threads} threads, config {json.dumps(asdict(cfg))}"
        )
        while not stop["now"] and st.step < target and time.time() - start < minutes * 60:
            t0 = time.time()
            window.append(self.step())
            st.train_seconds += time.time() - t0
            if st.step % 25 == 0:
                avg = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                rate = len(window) / (time.time() - window_start)
                self.log(
                    f"step {st.step} " + " ".join(f"{k} {v:.4f}" for k, v in avg.items()) + f" | {rate:.3f} steps/s"
                )
                window, window_start = [], time.time()
            if st.step % cfg.eval_every == 0:
                self.evaluate_and_log()
                window, window_start = [], time.time()
            if st.step % cfg.ckpt_every == 0:
                self.save()
                self.log(f"checkpoint at step {st.step}")
        self.save()
        done = st.step >= target
        why = "done" if done else "stopped" if stop["now"] else "time budget spent; --resume continues"
        self.log(f"checkpoint at step {st.step} of {target} ({why})")
        return done

    def evaluate_and_log(self, n: int | None = None, guidance: float | None = None) -> dict[str, Any]:
        """Evaluation of the EMA weights on the evaluation prompts, logged and kept in the checkpoint."""
        cfg = self.cfg
        t0 = time.time()
        ema = (self.ema_unet, self.ema_text, self.vae, self.sf, self.tokenizer)
        res = evaluate(*ema, n=n or cfg.eval_prompts, guidance=guidance or cfg.eval_guidance, steps=cfg.eval_steps)
        res.update(step=self.state.step, eval_seconds=round(time.time() - t0, 1))
        self.state.evals.append(res)
        self.log("eval " + json.dumps(res))
        return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (`stepx train-shapes --help`)."""
    ap = argparse.ArgumentParser(prog="stepx train-shapes", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the pipeline is exported")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="VAE, data, checkpoints, log")
    ap.add_argument("--minutes", type=float, default=150.0, help="wall-clock budget of this session")
    ap.add_argument("--max-steps", type=int, default=None, help="stop this session at this step")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ap.add_argument("--export-only", action="store_true", help="export the latest checkpoint")
    ap.add_argument("--no-export", action="store_true", help="skip the export at the end")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the latest checkpoint")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    ap.add_argument("--workers", type=int, default=1, help="processes that render the training scenes")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Config fields of a new run (JSON)")
    return ap.parse_args(argv)


def run_config(work: Path, overrides: list[str], log: Logger) -> Config:
    """The run's Config: the work folder's config.json, else the recipe with `overrides`, stored there."""
    path = work / "config.json"
    if path.exists():
        if overrides:
            log("note: --set ignored, the work folder already has config.json")
        return load_config(path)
    cfg = apply_overrides(Config(), overrides)
    path.write_text(cfg.to_json(), encoding="utf-8")
    return cfg


def refusal(args: argparse.Namespace, work: Path) -> str | None:
    """Why this command line cannot run (one line), checked before anything is written; None if it can."""
    has_ckpt = any((work / name).exists() for name in ("ckpt.pt", "ckpt-prev.pt"))
    if (args.export_only or args.eval_only) and not has_ckpt:
        return f"no checkpoint in {work} to export or evaluate"
    if not (args.resume or args.export_only or args.eval_only) and has_ckpt:
        return f"{work} has a checkpoint: pass --resume, or use an empty --work"
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        return f"--device {args.device}: expected cpu, cuda, cuda:N or auto"
    if args.workers < 1 or (args.max_steps is not None and args.max_steps < 0) or not args.minutes > 0:
        return "--workers must be at least 1, --max-steps at least 0, --minutes above 0"
    if not (work / "config.json").exists():
        try:
            cfg = apply_overrides(Config(), args.set)
        except ConfigError as err:
            return str(err)
        return export_problem(cfg)
    return None


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2: bad input, said in one line, nothing written)."""
    args = parse_args(argv)
    work = args.work.resolve()
    problem = refusal(args, work)
    if problem:
        print(f"stepx train-shapes: {problem}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("stepx train-shapes: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 1
    try:
        work.mkdir(parents=True, exist_ok=True)
        log = Logger(work / "log.txt")
        cfg = run_config(work, args.set, log)
    except (ConfigError, OSError) as err:
        print(f"stepx train-shapes: {err}", file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    trainer = Trainer(cfg, work, log, device=device, workers=args.workers)
    resumed = trainer.load() if (args.resume or args.export_only or args.eval_only) else False
    if (args.export_only or args.eval_only) and not resumed:
        print(f"stepx train-shapes: no readable checkpoint in {work} to export or evaluate", file=sys.stderr)
        return 2
    if args.eval_only:
        trainer.evaluate_and_log()
        return 0
    finished = args.export_only or trainer.run(args.minutes, args.max_steps)
    if finished and not args.no_export:
        export(trainer, args.out.resolve(), log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
