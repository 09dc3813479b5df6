"""The decoder refinement, measured side by side on the validation split (never the test split).

    python -m bench.decoder [--before a47fdb9] [--n 96] [--guidance 1.5] [--out bench/decoder.json]

Generates the same validation prompts and noise with the committed shapes pipeline twice: once with its own
VAE, once with the VAE of the commit `--before` (read from git). The text encoder and UNet are the same, so
the latents are identical and only the decoder differs. Writes both score sets to `--out`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from shapes.sample import evaluate
from shapes.util import DEFAULT_OUT, ROOT
from shapes.vae import vae_shape_kept

KEYS = ("objects_correct", "shape_ok", "miou_daam", "miou_otsu", "blank", "prompts", "objects")


def vae_at(commit: str, folder: Path) -> AutoencoderKL:
    """The shapes model's VAE as committed at `commit`, written to `folder` and loaded."""
    (folder / "vae").mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        blob = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{commit}:data/models/shapes/vae/{name}"], capture_output=True, check=True
        ).stdout
        (folder / "vae" / name).write_bytes(blob)
    return AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval()


def main(argv: list[str] | None = None) -> int:
    """Score both decoders and write the report."""
    ap = argparse.ArgumentParser(prog="python -m bench.decoder", description=__doc__.split("\n")[0])
    ap.add_argument("--before", default="a47fdb9", help="commit whose VAE is the unrefined one")
    ap.add_argument("--n", type=int, default=96, help="validation prompts")
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "decoder.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_OUT, local_files_only=True, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        vaes = {"before": vae_at(args.before, Path(tmp)), "committed": pipe.vae}
        report: dict = {"split": "validation", "before_commit": args.before, "n": args.n, "guidance": args.guidance}
        for name, vae in vaes.items():
            res = evaluate(
                pipe.unet,
                pipe.text_encoder,
                vae,
                pipe.vae.config.scaling_factor,
                pipe.tokenizer,
                n=args.n,
                guidance=args.guidance,
            )
            report[name] = {k: res[k] for k in KEYS} | {"vae_shape_kept": vae_shape_kept(vae)}
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
