"""Depth companion: a separate estimate of near/far structure for a run's final image (not
attention), from transformers' ZoeDepth (default), DPT or Depth Anything, loaded offline.

    stepx depth RUN_ID [--depth-model zoedepth|dpt|depth-anything] [--depth-path DIR]
    stepx generate PROMPT --depth

Each estimator's own image processor prepares the input (ZoeDepth's reflect padding, aspect-keeping
resize to multiples of 32, its normalisation), loaded from the same folder as the weights. The map is
stored beside the run's other files as `depth.parquet` (written under a temporary name, then renamed).
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

from pipeline.index import is_indexed
from pipeline.models import ModelNotFoundError, hf_cache_dir
from schema import TABLES, file_metadata
from schema.layout import run_dir

WEIGHTS_FILE, PROCESSOR_FILE = "config.json", "preprocessor_config.json"


@dataclass(frozen=True)
class DepthSpec:
    name: str
    repo_id: str
    kind: str  # 'metric' (larger = farther) or 'relative' (larger = nearer)


DEPTH_MODELS: dict[str, DepthSpec] = {
    "zoedepth": DepthSpec("zoedepth", "Intel/zoedepth-nyu-kitti", "metric"),
    "dpt": DepthSpec("dpt", "Intel/dpt-hybrid-midas", "relative"),
    "depth-anything": DepthSpec("depth-anything", "LiheYoung/depth-anything-small-hf", "relative"),
}


@dataclass
class DepthModel:
    spec: DepthSpec
    model: torch.nn.Module
    processor: object  # the estimator's transformers image processor
    model_id: str

    def save_pretrained(self, folder: str | Path) -> None:
        """Write weights and image processor to one folder, as a hub snapshot holds them."""
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)


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


def _complete(folder: Path) -> bool:
    return (folder / WEIGHTS_FILE).is_file() and (folder / PROCESSOR_FILE).is_file()


def _depth_snapshot(repo_id: str) -> Path | None:
    """The newest cached snapshot of a depth repo holding both its config and its image processor."""
    snapshots = hf_cache_dir() / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    found = [p for p in snapshots.iterdir() if _complete(p)] if snapshots.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _model_class(name: str) -> type:
    from transformers import DepthAnythingForDepthEstimation, DPTForDepthEstimation, ZoeDepthForDepthEstimation

    classes = {
        "zoedepth": ZoeDepthForDepthEstimation,
        "dpt": DPTForDepthEstimation,
        "depth-anything": DepthAnythingForDepthEstimation,
    }
    return classes[name]


def load_depth_model(name: str = "zoedepth", path: str | Path | None = None, device: str = "cpu") -> DepthModel:
    """A depth estimator and its image processor from a folder or the local cache; ModelNotFoundError when absent."""
    from transformers import AutoImageProcessor

    if name not in DEPTH_MODELS:
        raise ModelNotFoundError(f"unknown depth model {name!r}; choose one of: {', '.join(DEPTH_MODELS)}")
    spec = DEPTH_MODELS[name]
    folder = Path(path) if path is not None else _depth_snapshot(spec.repo_id)
    if folder is None:
        raise ModelNotFoundError(depth_availability(name)[1])
    missing = [name for name in (WEIGHTS_FILE, PROCESSOR_FILE) if not (folder / name).is_file()]
    if missing:
        raise ModelNotFoundError(f"no depth model in {folder}: {' and '.join(missing)} missing (save both there)")
    model = _model_class(name).from_pretrained(folder, local_files_only=True).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    return DepthModel(spec, model, processor, spec.repo_id if path is None else str(folder))


def _zoedepth_processor(**config: object) -> object:
    """ZoeDepth's image processor built in-process, on the backend that needs no torchvision.

    transformers >= 5.4 names that backend `ZoeDepthImageProcessorPil`; 5.0-5.3 call their numpy/PIL
    implementation `ZoeDepthImageProcessor` (and the torchvision one `...Fast`).
    """
    import transformers

    cls = getattr(transformers, "ZoeDepthImageProcessorPil", None) or transformers.ZoeDepthImageProcessor
    return cls(**config)


def tiny_zoedepth(seed: int = 0) -> DepthModel:
    """A random ZoeDepth with a tiny BEiT backbone and ZoeDepth's image processor, built in-process (tests)."""
    from transformers import BeitConfig, ZoeDepthConfig, ZoeDepthForDepthEstimation

    torch.manual_seed(seed)
    backbone = BeitConfig(
        image_size=64,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
    )
    config = ZoeDepthConfig(
        backbone_config=backbone,
        backbone_hidden_size=32,
        fusion_hidden_size=16,
        neck_hidden_sizes=[16] * 4,
        bottleneck_features=16,
        num_relative_features=8,
        num_attractors=[4, 4, 2, 2],
        bin_embedding_dim=16,
        bin_configurations=[{"n_bins": 8, "min_depth": 0.001, "max_depth": 10.0, "name": "nyu"}],
        reassemble_factors=[4, 2, 1, 0.5],
        patch_size=16,
        hidden_size=32,
    )
    # The released ZoeDepth checkpoints' processor settings, at a quarter of their 384 x 512 input.
    processor = _zoedepth_processor(
        do_pad=True,
        do_resize=True,
        size={"height": 96, "width": 128},
        keep_aspect_ratio=True,
        ensure_multiple_of=32,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    model = ZoeDepthForDepthEstimation(config).eval()
    return DepthModel(DEPTH_MODELS["zoedepth"], model, processor, f"in-process:tiny-zoedepth:{seed}")


def depth_inputs(depth: DepthModel, image: Image.Image) -> torch.Tensor:
    """The estimator's input for an RGB image, as its own image processor prepares it: (1, 3, h', w')."""
    return depth.processor(images=image.convert("RGB"), return_tensors="pt").pixel_values


@torch.no_grad()
def estimate_depth(depth: DepthModel, image: Image.Image) -> np.ndarray:
    """(height, width) float32 depth of an RGB image, at the image's own size."""
    w, h = image.size
    device = next(depth.model.parameters()).device
    outputs = depth.model(pixel_values=depth_inputs(depth, image).to(device))
    if depth.spec.name == "zoedepth":
        out = _zoedepth_unpad(outputs.predicted_depth.float().cpu(), (h, w), bool(depth.processor.do_pad))
    else:
        out = depth.processor.post_process_depth_estimation(outputs, target_sizes=[(h, w)])[0]["predicted_depth"]
    return out.float().cpu().numpy().astype(np.float32)


def _zoedepth_unpad(pred: torch.Tensor, size: tuple[int, int], padded: bool) -> torch.Tensor:
    """ZoeDepth's post-processing with torch: resize to the padded source size, then cut the padding off.

    Done here rather than with `post_process_depth_estimation`, which resizes with torchvision and raises
    `NameError: tvF` where torchvision is not installed (it is not, beside torch 2.13). Same maths: bicubic,
    no antialiasing, padding int(sqrt(side / 2) * 3) per edge as the processor added.
    """
    h, w = size
    pad_h, pad_w = (int(np.sqrt(h / 2) * 3), int(np.sqrt(w / 2) * 3)) if padded else (0, 0)
    full = F.interpolate(pred[:, None], size=(h + 2 * pad_h, w + 2 * pad_w), mode="bicubic", align_corners=False)
    return full[0, 0, pad_h : pad_h + h, pad_w : pad_w + w]  # (h, w)


def write_depth(root: Path, run_id: str, depth_map: np.ndarray, model_id: str, kind: str) -> Path:
    """Store a run's depth map as depth.parquet in its folder, atomically (replacing an older one)."""
    if not is_indexed(root, run_id):  # the id is checked before any path is built from it
        raise FileNotFoundError(f"no run {run_id!r} in the store {root}")
    folder = run_dir(root, run_id)
    h, w = depth_map.shape
    columns = {
        "run_id": [run_id],
        "model_id": [model_id],
        "kind": [kind],
        "height": [h],
        "width": [w],
        "map": [depth_map.reshape(-1).astype(np.float16)],
        "min_value": [float(depth_map.min())],
        "max_value": [float(depth_map.max())],
    }
    table = pa.table(columns, schema=TABLES["depth"]).replace_schema_metadata(file_metadata())
    final = folder / "depth.parquet"
    tmp = folder / f".depth.parquet.{os.getpid()}.{secrets.token_hex(3)}"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, final)
    return final
