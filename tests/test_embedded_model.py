"""The committed embedded model: loads offline, is a real SD pipeline, and reproduces its
committed reference image; 20 traced steps stay fast enough to explore on a CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.models import EMBEDDED_DIR, REGISTRY, locate

pytestmark = pytest.mark.skipif(
    not (EMBEDDED_DIR / "reference.png").is_file(), reason="the embedded model has not been exported yet"
)


def test_weights_load_offline_as_sd_pipeline():
    from diffusers import StableDiffusionPipeline

    assert locate(REGISTRY["shapes"]) == EMBEDDED_DIR
    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_DIR, local_files_only=True)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and type(pipe.text_encoder).__name__ == "CLIPTextModel"
    ids = pipe.tokenizer("a red circle").input_ids
    assert ids[:4] == [49406, 320, 736, 7117]  # CLIP's own token ids
    size = sum(p.stat().st_size for p in EMBEDDED_DIR.rglob("*") if p.is_file())
    assert size < 50 * 1024 * 1024


def test_registry_defaults_are_the_model_cards():
    card = (EMBEDDED_DIR / "README.md").read_text()
    front = dict(line.split(": ", 1) for line in card.split("---")[1].strip().splitlines())
    spec = REGISTRY["shapes"]
    assert float(front["guidance_scale"]) == spec.guidance and int(front["num_inference_steps"]) == spec.steps
    assert int(front["resolution"]) == spec.size


def test_reference_image_reproduces():
    from shapes.check import check_objects
    from shapes.reference import REFERENCE, render_reference
    from shapes.scenes import parse_caption

    assert json.loads((EMBEDDED_DIR / "reference.json").read_text()) == REFERENCE
    expected = np.asarray(Image.open(EMBEDDED_DIR / "reference.png").convert("RGB"), dtype=np.float32)
    got = np.asarray(render_reference(), dtype=np.float32)
    assert got.shape == expected.shape
    assert np.abs(got - expected).mean() < 3.0  # of 255: CPU kernels may differ slightly between machines
    checks = check_objects(got.astype(np.uint8), parse_caption(REFERENCE["prompt"]))
    assert [(c.spec.shape, c.correct, c.shape_ok) for c in checks] == [("circle", True, True), ("square", True, True)]
