"""Record any diffusers UNet pipeline a researcher already has into a StepX store.

    import stepx
    with stepx.record(pipe, store="data/store", tags=["lora-test"]) as rec:
        image = pipe("a red circle on the left", generator=torch.Generator().manual_seed(0)).images[0]
    m = rec.run.word_map("circle")        # numpy: the DAAM map the dashboard shows

Inside the block each call of `pipe` is observed, never changed: the captured attention modules' own
processors are wrapped (`pipeline.observe`), the UNet's forward is hooked for the steps, and the pipeline's
`__call__` runs as it is (the instance's class is swapped for a subclass whose `__call__` calls the original
and then writes). Each call writes one run per image (batch > 1, `num_images_per_prompt` > 1), atomically,
when the call returns; a call that raises writes nothing. Everything is restored when the block exits.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image

from pipeline.capture import AttentionRecorder, CaptureError, CapturePlan, UnetCapture, plan_grids
from pipeline.common import new_run_id
from pipeline.generate import _to_pil, decode_previews, prompt_tokens
from pipeline.models import module_fingerprint
from pipeline.nouns import tag_tokens
from pipeline.provenance import image_sha256, provenance
from pipeline.trace import TokenInfo, Trace, run_row
from pipeline.trace_writer import write_trace
from schema.layout import store_root
from schema.version import stepx_version
from store import Store


@dataclass
class RecordedRun:
    """One run written by `record`: its id, and its maps and image read back through the store."""

    run_id: str
    store: Store

    def __str__(self) -> str:
        return self.run_id

    def info(self) -> dict:
        """The run's `runs` row (config, provenance, timings)."""
        return self.store.run(self.run_id)

    def word_map(self, word: str | int, step: int | None = None, **options: object) -> np.ndarray:
        """A word's map on the latent grid (steps summed, or one step): `Store.word_map`, what the dashboard shows."""
        return self.store.word_map(self.run_id, word, step, **options)

    def image(self, step: int | None = None) -> Image.Image:
        """The stored final image (step=None) or one step's preview."""
        import io

        data, _fmt = self.store.image(self.run_id, step)
        return Image.open(io.BytesIO(data))


@dataclass
class _Call:
    """One pipeline call being recorded: its arguments and the prompt of each image."""

    args: dict
    prompts: list[str]
    seeds: list[int | None]
    guidance: float
    tokens: list[list[TokenInfo]] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)


class Recording:
    """The context `stepx.record` returns: `runs` lists what was written, `run` is the one run of a single image."""

    def __init__(self, pipe: object, store: str | Path | None, tags: Sequence[str], previews: bool) -> None:
        if getattr(pipe, "unet", None) is None:
            raise TypeError(f"stepx.record needs a diffusers UNet pipeline; {type(pipe).__name__} has no unet")
        self.pipe = pipe
        self.root = store_root(store)
        self.tags = list(tags)
        self.previews = previews
        self.runs: list[RecordedRun] = []
        self._store: Store | None = None
        self._base: type | None = None
        self._capture: UnetCapture | None = None
        self._call: _Call | None = None
        self._fingerprint: str | None = None

    @property
    def store(self) -> Store:
        """The store the runs are written to (read API)."""
        if self._store is None:
            self._store = Store(self.root)
        return self._store

    @property
    def run(self) -> RecordedRun:
        """The run written by the block's one pipeline call of one image."""
        if len(self.runs) != 1:
            raise LookupError(f"this recording wrote {len(self.runs)} runs; use .runs")
        return self.runs[0]

    def __enter__(self) -> Recording:
        base = type(self.pipe)
        recording = self

        def __call__(pipe: object, *args: object, **kwargs: object) -> object:
            return recording._record_call(base, pipe, args, kwargs)

        __call__.__signature__ = inspect.signature(base.__call__)
        __call__.__doc__ = base.__call__.__doc__
        self._base = base
        self._capture = UnetCapture(self.pipe, start=self._start)
        self._capture.attach()
        self.pipe.__class__ = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__})
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._capture.detach()
        finally:
            self.pipe.__class__ = self._base

    # -- one pipeline call --------------------------------------------------------------------
    def _record_call(self, base: type, pipe: object, args: tuple, kwargs: dict) -> object:
        if self._call is not None:  # a pipeline calling itself: record the outer call only
            return base.__call__(pipe, *args, **kwargs)
        bound = inspect.signature(base.__call__).bind(pipe, *args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}) or {})
        self._call = self._prepare(call)
        t0 = time.perf_counter()
        try:
            output = base.__call__(pipe, *args, **kwargs)
        except BaseException:
            self._capture.end(finish=False)
            raise
        finally:
            current, self._call = self._call, None
        denoise_ms = (time.perf_counter() - t0) * 1000
        recorders = self._capture.end()
        if recorders:
            self._write(current, recorders, output, denoise_ms)
        return output

    def _prepare(self, call: dict) -> _Call:
        prompt = call.get("prompt")
        if prompt is None:
            raise ValueError("stepx.record needs the prompt text to label its tokens (prompt_embeds alone can't be)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per = int(call.get("num_images_per_prompt") or 1)
        images = [p for p in prompts for _ in range(per)]  # diffusers' order: each prompt's images together
        gen = call.get("generator")
        gens = gen if isinstance(gen, list) else [gen] * len(images)
        seeds = [_seed(g) for g in gens]
        rec = _Call(call, images, seeds, float(call.get("guidance_scale") or 1.0))
        for p in images:
            tokens, truncated = prompt_tokens(self.pipe.tokenizer, p)
            tag_tokens(tokens, p)
            rec.tokens.append(tokens)
            rec.truncated.append(truncated)
        return rec

    def _start(self, sample: torch.Tensor) -> list[AttentionRecorder]:
        """Recorders for the call's images, made at its first UNet forward (latent grid and batch known)."""
        call = self._call
        if call is None:
            return []
        latent = (int(sample.shape[-2]), int(sample.shape[-1]))
        n = len(call.prompts)
        if sample.shape[0] not in (n, 2 * n):
            raise CaptureError(f"the UNet got a batch of {sample.shape[0]} for {n} images: can't tell them apart")
        cfg = sample.shape[0] == 2 * n
        guidance = float(getattr(self.pipe, "guidance_scale", call.guidance))
        self_grid, step_grid, levels = plan_grids(self.pipe.unet, latent)
        call.args["_levels"] = levels
        return [
            AttentionRecorder(
                CapturePlan(
                    latent=latent,
                    keep_tokens=tuple(t.token_index for t in tokens if t.has_map),
                    self_grid=self_grid,
                    step_grid=step_grid,
                    cfg=cfg,
                    guidance=guidance,
                    image_index=i,
                )
            )
            for i, tokens in enumerate(call.tokens)
        ]

    def _write(self, call: _Call, recorders: list[AttentionRecorder], output: object, denoise_ms: float) -> None:
        pipe = self.pipe
        if self._fingerprint is None:
            self._fingerprint = module_fingerprint(pipe.unet, pipe.text_encoder, pipe.vae)
        finals = _final_images(pipe, output, len(recorders))
        plan0 = recorders[0].plan
        levels = call.args.pop("_levels")
        prov = provenance(pipe, call.args, source="record")
        prov["pipeline_class"] = self._base.__name__
        model_id = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path") or ""
        traces = []
        for i, rec in enumerate(recorders):
            t1 = time.perf_counter()
            previews = decode_previews(pipe, rec.x0) if self.previews else []
            preview_ms = (time.perf_counter() - t1) * 1000
            created = datetime.now(UTC)
            run = run_row(
                run_id=new_run_id(created),
                created_at=created,
                prompt=call.prompts[i],
                negative_prompt=_nth(call.args.get("negative_prompt"), i, len(recorders)) or "",
                seed=call.seeds[i],
                steps=len(rec.steps),
                guidance=plan0.guidance,
                scheduler=type(pipe.scheduler).__name__,
                size=(finals[i].height, finals[i].width),
                latent=plan0.latent,
                self_grid=plan0.self_grid,
                step_grid=plan0.step_grid,
                levels=levels,
                model_name="custom",
                model_id=str(model_id) or f"in-process:{self._base.__name__}",
                model_fingerprint=self._fingerprint,
                torch_version=torch.__version__,
                diffusers_version=diffusers.__version__,
                stepx_version=stepx_version(),
                device=pipe.unet.device.type,
                dtype=str(pipe.unet.dtype).removeprefix("torch."),
                prompt_truncated=call.truncated[i],
                denoise_ms=denoise_ms,
                preview_ms=preview_ms,
                total_ms=denoise_ms + preview_ms,
                tags=self.tags,
                gallery=None,
                config_json=json.dumps(_config(call, i, len(recorders))),
                **prov,
            )
            traces.append(Trace(run, call.tokens[i], rec.steps, levels, rec.self_aggregate(), previews, finals[i]))
        for trace in traces:
            write_trace(self.root, trace)
            self.runs.append(RecordedRun(trace.run["run_id"], self.store))


def record(pipe: object, store: str | Path | None = None, tags: Sequence[str] = (), previews: bool = True) -> Recording:
    """Record every call of `pipe` inside the `with` block into `store` (one run per image); see the module doc."""
    return Recording(pipe, store, tags, previews)


def _seed(generator: object) -> int | None:
    """The seed a generator was made with, when its state is still that seed's (the run is regenerable)."""
    if not isinstance(generator, torch.Generator):
        return None
    seed = generator.initial_seed()
    fresh = torch.Generator(device=generator.device).manual_seed(seed)
    return seed if torch.equal(fresh.get_state(), generator.get_state()) else None


def _nth(value: object, i: int, n: int) -> object:
    """Image i's entry of a per-prompt list argument (or the single value)."""
    if isinstance(value, list):
        return value[i * len(value) // n]
    return value


def _config(call: _Call, i: int, n: int) -> dict:
    """The call's plain arguments for image i (tensors and images by hash), enough to explain the run."""
    out: dict = {"prompt": call.prompts[i], "seed": call.seeds[i]}
    for name, value in call.args.items():
        if name in ("self", "prompt", "generator", "callback_on_step_end", "callback", "prompt_embeds"):
            continue
        if _plain(value):
            out[name] = value
        elif name in ("image", "control_image", "mask_image"):
            out[f"{name}_sha256"] = image_sha256(value)
    return out


def _plain(value: object) -> bool:
    """Whether a call argument is plain JSON: a scalar, or a flat list / dict of scalars."""
    scalar = (str, int, float, bool, type(None))
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))


def _final_images(pipe: object, output: object, n: int) -> list[Image.Image]:
    """The call's n output images as PIL, whatever `output_type` / `return_dict` asked for."""
    images = output.images if hasattr(output, "images") else output[0]
    if isinstance(images, list) and images and isinstance(images[0], Image.Image):
        return list(images)
    if isinstance(images, np.ndarray):
        return [Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)) for a in images]
    if isinstance(images, torch.Tensor) and images.shape[1] == pipe.unet.config.out_channels:  # latents
        with torch.no_grad():
            decoded = pipe.vae.decode(images.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
        return _to_pil(decoded)
    if isinstance(images, torch.Tensor):
        return _to_pil(images * 2 - 1)
    raise TypeError(f"stepx.record can't read this pipeline's output images ({type(images).__name__})")
