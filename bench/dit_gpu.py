"""Issue 18's GPU check, for a session that has one: tiny SD3 and FLUX.1 at the real models' geometry on CUDA.

    .venv/bin/python -m bench.dit_gpu --out bench/dit_gpu.json            # 1024 px, 4 steps, 3 pairs
    .venv/bin/python -m bench.dit_gpu --device cpu --px 128 --steps 1     # a smoke run without a GPU

The tiny pipelines get an 8x VAE and SD3's 2x2 patches (`build_tiny_dit(real_geometry=True)`), so 1024 px is 64x64
image tokens and 77 + 256 text positions (SD3) or 256 (Flux), as in the real models; widths stay tiny, so the
ratio is an upper bound for the real models (their linear layers dilute the attention's share). Records per model:
traced == untraced (`torch.equal`), the overhead ratio (interleaved pairs, medians) and peak CUDA memory of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

TEXT_LENGTH = 256  # SD3's and FLUX.1-schnell's max_sequence_length


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")


def check(layout: str, device: str, px: int, steps: int, pairs: int, true_cfg: float = 1.0) -> dict:
    """One layout: equality, overhead ratio and peak memory, traced vs untraced."""
    from pipeline.capture_dit import DitPlan, DitRecorder, dit_bands, dit_capture, is_flux
    from pipeline.generate_dit import dit_tokens, token_grid
    from pipeline.tiny_dit import build_tiny_dit

    pipe = build_tiny_dit(layout, real_geometry=True).to(device)
    flux = is_flux(pipe.transformer)
    prompt = "a red circle on the left and a blue square on the right"
    kwargs = {
        "prompt": prompt,
        "num_inference_steps": steps,
        "height": px,
        "width": px,
        "output_type": "pt",
        "max_sequence_length": TEXT_LENGTH,
        "negative_prompt": "blurry",
    }
    kwargs.update({"guidance_scale": 1.0, "true_cfg_scale": true_cfg} if flux else {"guidance_scale": 4.0})
    _tokens, fold, _ = dit_tokens(pipe, prompt, TEXT_LENGTH)
    plan = DitPlan(
        token_grid(pipe, px, px),
        fold.shape[0],
        fold,
        tuple(dit_bands(pipe.transformer)),
        flux,
        cfg_batched=not flux,
        guidance=true_cfg if flux else 4.0,
        check_sums=True,
    )

    def run(traced: bool) -> tuple[torch.Tensor, float, float]:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        gen = torch.Generator(device=device).manual_seed(0)
        if traced:
            rec = DitRecorder(plan)
            with dit_capture(pipe, rec):
                out = pipe(generator=gen, **kwargs).images
            assert rec.max_sum_error < 1e-3, rec.max_sum_error
        else:
            out = pipe(generator=gen, **kwargs).images
        _sync(device)
        return out, time.perf_counter() - t0, _peak(device)

    plain_img, _, plain_peak = run(False)  # warm-up and the memory figures
    traced_img, _, traced_peak = run(True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(pairs):
        for traced in (False, True) if i % 2 == 0 else (True, False):
            times[traced].append(run(traced)[1])
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    return {
        "layout": layout,
        "device": device,
        "px": px,
        "image_tokens": plan.grid[0] * plan.grid[1],
        "text_positions": plan.text_len,
        "steps": steps,
        "true_cfg": true_cfg,
        "pairs": pairs,
        "images_equal": bool(torch.equal(plain_img, traced_img)),
        "untraced_s_median": round(statistics.median(times[False]), 4),
        "traced_s_median": round(statistics.median(times[True]), 4),
        "overhead_ratio": round(ratio, 3),
        "peak_untraced_mb": round(plain_peak, 1),
        "peak_traced_mb": round(traced_peak, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--px", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    results = [
        check(layout, args.device, args.px, args.steps, args.pairs, true_cfg)
        for layout, true_cfg in (("sd3", 1.0), ("sd35", 1.0), ("flux", 1.0), ("flux", 2.5))
    ]
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
