"""Depth companion: a separate estimate of near/far structure for a run's final image (not
attention), from transformers' ZoeDepth (default), DPT or Depth Anything, loaded offline.

    stepx depth RUN_ID [--depth-model zoedepth|dpt|depth-anything] [--depth-path DIR]
    stepx generate PROMPT --depth

The map is stored beside the run's other files as `depth.parquet` (written under a temporary name,
then renamed). Post-processing resizes with torch: transformers' own needs torchvision.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.models import ModelNotFoundError, _cached_snapshot, hf_cache_dir
from schema import TABLES, file_metadata
from schema.layout import run_dir

INPUT_PX = 384  # long side fed to the estimator (a multiple of the backbones' patch sizes)


@dataclass(frozen=True)
class DepthSpec:
    name: str
    repo_id: str
    kind: str  # 'metric' (larger = farther) or 'relative' (larger = nearer)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DEPTH_MODELS: dict[str, DepthSpec] = {
    "zoedepth": DepthSpec("zoedepth", "Intel/zoedepth-nyu-kitti", "metric", (0.5,) * 3, (0.5,) * 3),
    "dpt": DepthSpec("dpt", "Intel/dpt-hybrid-midas", "relative", (0.5,) * 3, (0.5,) * 3),
    "depth-anything": DepthSpec("depth-anything", "LiheYoung/depth-anything-small-hf", "relative", *IMAGENET),
}


@dataclass
class DepthModel:
    spec: DepthSpec
    model: torch.nn.Module
    model_id: str


def depth_availability(name: str) -> tuple[bool, str]:
    """Whether a depth estimator's weights are in the local cache, and where (or how to get them)."""
    spec = DEPTH_MODELS[name]
    snap = _depth_snapshot(spec.repo_id)
    if snap is not None:
        return True, str(snap)
    return False, (
        f"{spec.repo_id} not found in the Hugging Face cache {hf_cache_dir()}; on a machine with access run "
        f"`huggingface-cli download {spec.repo_id}` and copy the cache here, or pass --depth-path DIR"
    )


def _depth_snapshot(repo_id: str) -> Path | None:
    snapshots = hf_cache_dir() / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    if not snapshots.is_dir():
        return _cached_snapshot(repo_id)
    found = [p for p in snapshots.iterdir() if (p / "config.json").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _model_class(name: str) -> type:
    from transformers import DepthAnythingForDepthEstimation, DPTForDepthEstimation, ZoeDepthForDepthEstimation

    return {"zoedepth": ZoeDepthForDepthEstimation, "dpt": DPTForDepthEstimation,
            "depth-anything": DepthAnythingForDepthEstimation}[name]  # fmt: skip


def load_depth_model(name: str = "zoedepth", path: str | Path | None = None, device: str = "cpu") -> DepthModel:
    """A depth estimator from a folder or the local cache; ModelNotFoundError when absent."""
    if name not in DEPTH_MODELS:
        raise ModelNotFoundError(f"unknown depth model {name!r}; choose one of: {', '.join(DEPTH_MODELS)}")
    spec = DEPTH_MODELS[name]
    folder = Path(path) if path is not None else _depth_snapshot(spec.repo_id)
    if folder is None or not (folder / "config.json").is_file():
        raise ModelNotFoundError(depth_availability(name)[1] if path is None else f"no depth model config in {path}")
    model = _model_class(name).from_pretrained(folder, local_files_only=True).to(device).eval()
    return DepthModel(spec, model, spec.repo_id if path is None else str(folder))


def tiny_zoedepth(seed: int = 0) -> DepthModel:
    """A random ZoeDepth with a tiny BEiT backbone, built in-process (tests)."""
    from transformers import BeitConfig, ZoeDepthConfig, ZoeDepthForDepthEstimation

    torch.manual_seed(seed)
    backbone = BeitConfig(
        image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=37, out_features=["stage1", "stage2", "stage3", "stage4"], out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
    )  # fmt: skip
    config = ZoeDepthConfig(
        backbone_config=backbone, backbone_hidden_size=32, fusion_hidden_size=16, neck_hidden_sizes=[16] * 4,
        bottleneck_features=16, num_relative_features=8, num_attractors=[4, 4, 2, 2], bin_embedding_dim=16,
        bin_configurations=[{"n_bins": 8, "min_depth": 0.001, "max_depth": 10.0, "name": "nyu"}],
        reassemble_factors=[4, 2, 1, 0.5], patch_size=16, hidden_size=32,
    )  # fmt: skip
    return DepthModel(
        DEPTH_MODELS["zoedepth"], ZoeDepthForDepthEstimation(config).eval(), f"in-process:tiny-zoedepth:{seed}"
    )


@torch.no_grad()
def estimate_depth(depth: DepthModel, image: Image.Image) -> np.ndarray:
    """(height, width) float32 depth of an RGB image, at the image's own size."""
    w, h = image.size
    scale = INPUT_PX / max(w, h)
    size = (max(32, round(h * scale / 32) * 32), max(32, round(w * scale / 32) * 32))
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(depth.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(depth.spec.std).view(1, 3, 1, 1)
    device = next(depth.model.parameters()).device
    pred = depth.model(pixel_values=((x - mean) / std).to(device)).predicted_depth  # (1, h', w')
    out = F.interpolate(pred[:, None].float().cpu(), size=(h, w), mode="bicubic", align_corners=False)[0, 0]
    return out.numpy().astype(np.float32)


def write_depth(root: Path, run_id: str, depth_map: np.ndarray, model_id: str, kind: str) -> Path:
    """Store a run's depth map as depth.parquet in its folder, atomically (replacing an older one)."""
    folder = run_dir(root, run_id)
    if not folder.is_dir():
        raise FileNotFoundError(f"no run {run_id} in {root}")
    h, w = depth_map.shape
    table = pa.table(
        {
            "run_id": [run_id], "model_id": [model_id], "kind": [kind], "height": [h], "width": [w],
            "map": [depth_map.reshape(-1).astype(np.float16)],
            "min_value": [float(depth_map.min())], "max_value": [float(depth_map.max())],
        },
        schema=TABLES["depth"],
    ).replace_schema_metadata(file_metadata())  # fmt: skip
    final = folder / "depth.parquet"
    tmp = folder / f".depth.parquet.{os.getpid()}.{secrets.token_hex(3)}"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, final)
    return final
