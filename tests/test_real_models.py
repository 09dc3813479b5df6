"""Real-model readiness without downloads: SD 1.5, SD 2.1 base and SDXL block layouts (tiny widths)
saved into a Hugging Face cache layout, loaded offline by name, traced, stored and read back; and
the depth companion with a tiny random ZoeDepth."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from streamlit.testing.v1 import AppTest

from dashboard.export import export_all
from jobs.depth import depth_for_run
from pipeline.depth import depth_inputs, estimate_depth, load_depth_model, tiny_zoedepth
from pipeline.generate import GenerationConfig, generate_trace, run_pipeline
from pipeline.models import REGISTRY, ModelNotFoundError, load_model
from pipeline.tiny import build_tiny_pipeline
from pipeline.trace_writer import write_trace
from schema import TABLES
from schema.tables import OPTIONAL_FILES
from store import Store

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "name, layout, px, levels",
    [
        ("sd15", "sd15", 256, ["32x32", "16x16", "8x8", "mid-4x4"]),
        ("sd21-base", "sd21", 256, ["32x32", "16x16", "8x8", "mid-4x4"]),
        ("sdxl", "sdxl", 256, ["16x16", "8x8", "mid-8x8"]),
    ],
)
def test_cached_layout_loads_traces_and_stores(name, layout, px, levels, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / ("models--" + REGISTRY[name].repo_ids[0].replace("/", "--")) / "snapshots" / "abc123"
    build_tiny_pipeline(layout, seed=1).save_pretrained(snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    model = load_model(name, device="cpu")
    assert model.model_id.startswith(REGISTRY[name].repo_ids[0])
    cfg = GenerationConfig("a red circle on the left", steps=2, guidance=5.0, width=px, height=px)
    trace = generate_trace(model, cfg, check_sums=True)
    assert np.array_equal(np.asarray(run_pipeline(model, cfg.resolved(model))), np.asarray(trace.final))
    assert trace.max_sum_error < 1e-4
    store_dir = tmp_path / "store"
    written = write_trace(store_dir, trace)
    store = Store(store_dir)
    run = store.run(written.run_id)
    assert run["levels"] == levels and run["model_name"] == name
    for table, schema in TABLES.items():
        path = written.path / f"{table}.parquet"
        if table in OPTIONAL_FILES:
            assert not path.exists()
            continue
        assert pq.ParquetFile(path).schema_arrow.names == schema.names
    assert store.word_map(written.run_id, "circle", step=1).shape == (px // 8, px // 8)
    assert store.self_attention(written.run_id).matrix.shape[0] == int(levels[0].split("x")[0]) ** 2


def test_depth_companion_stored_exported_and_shown(traced_store, tmp_path, monkeypatch):
    root = tmp_path / "store"
    shutil.copytree(traced_store[0], root)
    run_id = traced_store[1][0].run["run_id"]
    store = Store(root)
    assert store.depth(run_id) is None
    folder = tmp_path / "zoe"
    tiny_zoedepth().save_pretrained(folder)  # weights + image processor, as a hub snapshot holds them
    depth = load_depth_model("zoedepth", folder)  # the real loading path, offline
    depth_for_run(root, run_id, depth)
    dmap, info = store.depth(run_id)
    assert dmap.shape == (64, 64) and np.isfinite(dmap).all() and info["kind"] == "metric"
    names = zipfile.ZipFile(io.BytesIO(export_all(store, run_id))).namelist()
    assert {"depth/depth.png", "depth/depth.npy", "depth/info.json"} <= set(names)
    monkeypatch.setenv("STEPX_STORE", str(root))
    at = AppTest.from_file(str(ROOT / "dashboard" / "views" / "inspect.py"), default_timeout=120)
    at.query_params["run"] = run_id
    at.session_state["depth_panel"] = True  # the depth panel, opened
    at.run()
    assert not at.exception
    assert any("metric depth" in i.proto.imgs[0].caption for i in at.get("image"))
    other = traced_store[1][1].run["run_id"]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    at = AppTest.from_file(str(ROOT / "dashboard" / "views" / "inspect.py"), default_timeout=120)
    at.query_params["run"] = other
    at.session_state["depth_panel"] = True
    at.run()
    assert not at.exception
    assert any("depth model's weights are not on this machine" in i.value for i in at.info)
    res = subprocess.run(
        [sys.executable, "-m", "stepx.cli", "depth", other, "--store", str(root)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**__import__("os").environ},
    )
    assert res.returncode == 1 and "Intel/zoedepth-nyu-kitti not found" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "stepx.cli", "depth", other, "--store", str(root), "--depth-path", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert Store(root).depth(other)[0].shape == (64, 64)


def test_depth_input_is_the_processors_padded_aspect_kept_image(tmp_path):
    depth = tiny_zoedepth()
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((48, 80, 3)) * 255).astype(np.uint8))  # (h, w) = (48, 80): not square
    x = depth_inputs(depth, image)
    assert torch.equal(x, depth.processor(images=image, return_tensors="pt").pixel_values)
    # ZoeDepth's rule: reflect-pad int(sqrt(side / 2) * 3) per edge, scale both sides by the factor nearer 1
    # towards the processor's 96 x 128, then round each side to a multiple of 32.
    pad_h, pad_w = int(np.sqrt(48 / 2) * 3), int(np.sqrt(80 / 2) * 3)
    scale = min((96 / (48 + 2 * pad_h), 128 / (80 + 2 * pad_w)), key=lambda f: abs(1 - f))
    expect = tuple(int(round(side * scale / 32) * 32) for side in (48 + 2 * pad_h, 80 + 2 * pad_w))
    assert tuple(x.shape) == (1, 3, *expect)
    # the padding is a mirror: the input's top rows repeat the rows just below them, flipped
    padded = np.pad(np.asarray(image, dtype=np.float32), ((pad_h, pad_h), (pad_w, pad_w), (0, 0)), mode="reflect")
    resized = F.interpolate(
        torch.from_numpy(padded).permute(2, 0, 1)[None] / 255, size=expect, mode="bilinear", align_corners=True
    )
    assert torch.allclose(x, (resized - 0.5) / 0.5, atol=1e-5)
    dmap = estimate_depth(depth, image)
    assert dmap.shape == (48, 80) and dmap.dtype == np.float32 and np.isfinite(dmap).all()
    folder = tmp_path / "weights-only"
    depth.model.save_pretrained(folder)
    with pytest.raises(ModelNotFoundError, match="preprocessor_config.json"):
        load_depth_model("zoedepth", folder)
    depth.save_pretrained(folder)
    assert np.array_equal(estimate_depth(load_depth_model("zoedepth", folder), image), dmap)


def test_relative_depth_goes_through_the_processors_pre_and_post_processing(tmp_path):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessorPil

    from pipeline.depth import DEPTH_MODELS, DepthModel

    torch.manual_seed(0)
    stages = ["stage1", "stage2", "stage3", "stage4"]
    backbone = Dinov2Config(
        image_size=28,
        patch_size=14,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        out_features=stages,
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        patch_size=14,
        neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=16,
    )
    # Depth Anything's processor settings (aspect kept, multiples of the 14 px patch) at a small size
    processor = DPTImageProcessorPil(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14)
    depth = DepthModel(DEPTH_MODELS["depth-anything"], DepthAnythingForDepthEstimation(config).eval(), processor, "t")
    image = Image.fromarray((np.random.default_rng(1).random((48, 80, 3)) * 255).astype(np.uint8))
    x = depth_inputs(depth, image)
    # the side whose scale is nearer 1 (height: 56 / 48) sets the scale; 80 * 56 / 48 = 93.3 -> 98 (7 patches)
    assert tuple(x.shape) == (1, 3, 56, 98)
    dmap = estimate_depth(depth, image)
    with torch.no_grad():
        outputs = depth.model(pixel_values=x)
    direct = processor.post_process_depth_estimation(outputs, target_sizes=[(48, 80)])[0]["predicted_depth"]
    assert dmap.shape == (48, 80) and np.allclose(dmap, direct.numpy(), atol=1e-6)
    depth.save_pretrained(tmp_path / "da")
    loaded = load_depth_model("depth-anything", tmp_path / "da")
    assert np.array_equal(estimate_depth(loaded, image), dmap)
