"""Model registry: offline loading from a folder and from a Hugging Face cache layout."""

from __future__ import annotations

import pytest

from pipeline.models import REGISTRY, ModelNotFoundError, default_model_name, load_model, locate
from pipeline.tiny import build_tiny_pipeline


def test_registry_names():
    assert {"sd15", "sd21-base", "sdxl", "shapes", "tiny-random"} <= set(REGISTRY)
    assert REGISTRY["sdxl"].kind == "sdxl"


def test_missing_weights_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as err:
        load_model("sd15")
    msg = str(err.value)
    assert str(tmp_path) in msg and "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg and "--model-path" in msg


def test_load_from_folder_and_hf_cache(tmp_path, monkeypatch):
    pipe = build_tiny_pipeline("sd15", seed=3)
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    loaded = load_model(model_path=folder, device="cpu")
    assert loaded.model_id == str(folder) and len(loaded.fingerprint) == 16
    import torch

    def run(p):
        g = torch.Generator().manual_seed(0)
        return p("a cat", num_inference_steps=2, height=64, width=64, generator=g, output_type="latent").images

    pipe.set_progress_bar_config(disable=True)
    assert torch.equal(run(loaded.pipe), run(pipe))  # same weights, loaded offline
    snap = tmp_path / "hub" / "models--runwayml--stable-diffusion-v1-5" / "snapshots" / "0123456789abcdef"
    snap.parent.mkdir(parents=True)
    folder.rename(snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert locate(REGISTRY["sd15"]) == snap
    assert default_model_name() == "sd15"
    cached = load_model("sd15", device="cpu")
    assert cached.model_id == "runwayml/stable-diffusion-v1-5@0123456789ab"
    assert cached.fingerprint == loaded.fingerprint
