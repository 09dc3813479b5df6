"""The registry of models StepX can trace, and how each is found and loaded offline.

Real models load with `local_files_only=True` from `--model-path DIR` or the Hugging Face cache;
nothing is ever downloaded. `shapes` is the embedded model committed under `data/models/shapes`;
`tiny-random` is built in-process for tests and as the last fallback.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
EMBEDDED_DIR = DATA_DIR / "models" / "shapes"
PROBE_TOKENS = "probe_tokens.safetensors"  # optimised probe tokens beside a model's weights (pipeline.probe_tokens)


class ModelNotFoundError(RuntimeError):
    """The weights of a registered model are not on this machine."""


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: where its weights may be and how it generates by default."""

    name: str
    title: str
    repo_ids: tuple[str, ...] = ()  # Hugging Face ids looked up in the local cache, in order
    kind: str = "sd"  # 'sd' (one text encoder), 'sdxl' (two + size conditioning), 'sd3' or 'flux' (transformers)
    size: int = 512  # default square image size
    steps: int = 30
    guidance: float = 7.5
    builtin: str | None = None  # 'embedded' or a tiny layout name for in-process models
    note: str = ""
    text_length: int = 256  # DiTs: T5 positions (max_sequence_length); SD3 and FLUX.1-schnell take 256, dev 512


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "sd15",
            "Stable Diffusion 1.5",
            ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
            size=512,
            steps=30,
            guidance=7.5,
        ),
        ModelSpec(
            "sd21-base",
            "Stable Diffusion 2.1 base",
            ("stabilityai/stable-diffusion-2-1-base",),
            size=512,
            steps=30,
            guidance=7.5,
        ),
        ModelSpec(
            "sdxl",
            "Stable Diffusion XL base 1.0",
            ("stabilityai/stable-diffusion-xl-base-1.0",),
            kind="sdxl",
            size=1024,
            steps=30,
            guidance=5.0,
        ),
        ModelSpec(
            "sd3",
            "Stable Diffusion 3 medium / 3.5 (diffusion transformer)",
            (
                "stabilityai/stable-diffusion-3.5-medium",
                "stabilityai/stable-diffusion-3-medium-diffusers",
                "stabilityai/stable-diffusion-3.5-large",
            ),
            kind="sd3",
            size=1024,
            steps=28,
            guidance=7.0,  # the model cards' defaults
        ),
        ModelSpec(
            "flux",
            "FLUX.1 schnell / dev (diffusion transformer)",
            ("black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-dev"),
            kind="flux",
            size=1024,
            steps=4,  # schnell's card; dev wants ~28 steps at guidance 3.5
            guidance=0.0,  # schnell is guidance-distilled without a guidance input
        ),
        ModelSpec(
            "shapes",
            "StepX shapes (embedded, trained on drawn scenes)",
            size=64,
            steps=20,
            guidance=1.5,  # the model card's guidance_scale, picked by the export's sweep
            builtin="embedded",
            note="ships with StepX under data/models/shapes",
        ),
        ModelSpec(
            "tiny-random",
            "Tiny random SD (tests; shows noise)",
            size=64,
            steps=20,
            guidance=3.0,
            builtin="tiny",
            note="random weights built in-process",
        ),
        *(
            ModelSpec(
                f"tiny-{layout}",
                f"Tiny random {title} (tests; shows noise)",
                kind="flux" if layout == "flux" else "sd3",
                size=32,
                steps=4,
                guidance=1.0 if layout == "flux" else 3.0,
                builtin=f"dit-{layout}",
                note="random weights built in-process",
                text_length=32,
            )
            for layout, title in (("sd3", "SD3"), ("sd35", "SD3.5-layout DiT"), ("flux", "FLUX.1"))
        ),
    ]
}


@dataclass
class LoadedModel:
    """A ready pipeline with where it came from."""

    spec: ModelSpec
    pipe: object
    model_id: str
    fingerprint: str
    device: str
    dtype: str


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache this process would use."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def _cached_snapshot(repo_id: str) -> Path | None:
    """The newest cached snapshot folder of a repo that holds a diffusers pipeline, if any."""
    snapshots = hf_cache_dir() / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    if not snapshots.is_dir():
        return None
    found = [p for p in snapshots.iterdir() if (p / "model_index.json").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def locate(spec: ModelSpec, model_path: str | Path | None = None) -> Path | None:
    """The local folder holding this model's weights, or None (for in-process models too)."""
    if model_path is not None:
        path = Path(model_path)
        return path if (path / "model_index.json").is_file() else None
    if spec.builtin == "embedded":
        return EMBEDDED_DIR if (EMBEDDED_DIR / "model_index.json").is_file() else None
    for repo_id in spec.repo_ids:
        snap = _cached_snapshot(repo_id)
        if snap is not None:
            return snap
    return None


def availability(spec: ModelSpec) -> tuple[bool, str]:
    """Whether a model can load here, and where its weights are (or how to get them)."""
    if spec.builtin not in (None, "embedded"):
        return True, "built in-process"
    path = locate(spec)
    if path is not None:
        return True, str(path)
    return False, missing_message(spec)


def missing_message(spec: ModelSpec, model_path: str | Path | None = None) -> str:
    """One clear sentence: where we looked and how to get the weights."""
    if model_path is not None:
        return f"no diffusers pipeline (model_index.json) in {model_path}"
    if spec.builtin == "embedded":
        return f"embedded model missing at {EMBEDDED_DIR}; rebuild it with `make model`"
    return (
        f"{spec.title} weights not found in the Hugging Face cache {hf_cache_dir()} "
        f"(looked for {', '.join(spec.repo_ids)}). On a machine with access run "
        f"`huggingface-cli download {spec.repo_ids[0]}` and copy the cache here, or pass "
        f"--model-path DIR pointing to a saved pipeline folder."
    )


def default_model_name() -> str:
    """SD 1.5 when its weights are present, else the embedded model, else tiny-random."""
    for name in ("sd15", "shapes"):
        if locate(REGISTRY[name]) is not None:
            return name
    return "tiny-random"


def get_spec(name: str) -> ModelSpec:
    """The registry entry for a name, with a clear error listing the valid names."""
    if name not in REGISTRY:
        raise ModelNotFoundError(f"unknown model {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def folder_fingerprint(path: Path) -> str:
    """Hash of a pipeline folder's configs and weight-file headers and sizes (fast, content-specific).

    Optimised probe tokens beside the weights (probe_tokens.safetensors) are left out: fitted to the weights,
    they don't change what a generation computes."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if not f.is_file() or f.suffix not in {".json", ".safetensors", ".bin", ".txt"} or f.name == PROBE_TOKENS:
            continue
        h.update(str(f.relative_to(path)).encode())
        h.update(str(f.stat().st_size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]


def module_fingerprint(*modules: torch.nn.Module) -> str:
    """Hash of the exact parameter values of in-process modules."""
    h = hashlib.sha256()
    for m in modules:
        for name, t in sorted(m.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def best_device() -> str:
    """CUDA when present, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    name: str | None = None,
    model_path: str | Path | None = None,
    device: str | None = None,
    tiny_seed: int = 0,
) -> LoadedModel:
    """Load a registered model (or a folder) offline; raise ModelNotFoundError when absent."""
    import transformers
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from pipeline.tiny import build_tiny_pipeline
    from pipeline.tiny_dit import build_tiny_dit

    diffusers_logging.disable_progress_bar()  # loading bars would break one-line CLI output
    transformers.utils.logging.disable_progress_bar()

    spec = get_spec(name or ("sd15" if model_path else default_model_name()))
    device = device or best_device()
    half = torch.bfloat16 if spec.kind == "flux" else torch.float16  # FLUX.1 overflows in fp16
    dtype = half if device == "cuda" and spec.builtin is None else torch.float32
    if spec.builtin not in (None, "embedded") and model_path is None:
        if spec.builtin.startswith("dit-"):
            pipe = build_tiny_dit(spec.builtin.removeprefix("dit-"), seed=tiny_seed)
            denoiser = pipe.transformer
        else:
            pipe = build_tiny_pipeline(spec.builtin, seed=tiny_seed)
            denoiser = pipe.unet
        model_id = f"in-process:{spec.builtin}:seed{tiny_seed}"
        fingerprint = module_fingerprint(denoiser, pipe.text_encoder, pipe.vae)
    else:
        path = locate(spec, model_path)
        if path is None:
            raise ModelNotFoundError(missing_message(spec, model_path))
        extra = {"safety_checker": None, "requires_safety_checker": False} if spec.kind == "sd" else {}
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
        model_id = _model_id(spec, path)
        fingerprint = folder_fingerprint(path)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return LoadedModel(spec, pipe, model_id, fingerprint, device, str(dtype).removeprefix("torch."))


def _model_id(spec: ModelSpec, path: Path) -> str:
    """A hub id for cached snapshots, else the folder path."""
    parts = path.parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/") + "@" + parts[i + 2][:12]
    if spec.builtin == "embedded":
        try:
            return json.loads((path / "model_index.json").read_text()).get("_stepx_id", "stepx/shapes")
        except (OSError, ValueError):
            return "stepx/shapes"
    return str(path)
