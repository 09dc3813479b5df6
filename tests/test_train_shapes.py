"""`make model`'s trainer on a miniature recipe: VAE, data, joint training, checkpoint resume and
export to a StableDiffusionPipeline that StepX traces like any other model."""

from __future__ import annotations

import pytest
import torch

from shapes import train as train_shapes
from shapes.train import Config, Logger, Trainer, export

pytestmark = pytest.mark.slow

MINI = Config(
    vae_channels=(8, 8, 16),
    vae_minutes=0.02,
    vae_batch=4,
    n_scenes=24,
    text_hidden=32,
    text_layers=1,
    text_heads=2,
    text_ff=64,
    unet_channels=(8, 16, 16),
    unet_heads=2,
    batch=4,
    curriculum=(1, 2),
    ground_layout_start=0,
    layout_noise_start=0,
    layout_noise_p=0.5,
    shape_contrast_start=0,
    shape_contrast_n=2,
    eval_prompts=2,
    eval_steps=2,
)


def test_train_resume_and_export_a_traceable_pipeline(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from pipeline.generate import GenerationConfig, generate_trace
    from pipeline.models import LoadedModel, load_model, module_fingerprint

    torch.set_num_threads(1)
    work = tmp_path / "work"
    work.mkdir()
    log = Logger(work / "log.txt")
    trainer = Trainer(MINI, work, log)
    assert trainer.data["latents"].shape == (24, 4, 16, 16)
    assert trainer.run(minutes=5, max_steps=3)
    assert trainer.state.step == 3 and (work / "ckpt.pt").is_file()
    losses = trainer.step()
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()) and 0 < losses["mass_in"] <= 1
    assert losses["shape"] > 0  # the shape-twin term ran (an untrained model explains no shape change)
    trainer.save()

    resumed = Trainer(MINI, work, log)  # the VAE and data come back from the work folder
    assert resumed.load() and resumed.state.step == 4
    for a, b in zip(resumed.unet.parameters(), trainer.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(resumed.data["ids"], trainer.data["ids"])

    monkeypatch.setattr(train_shapes, "time_generation", lambda *a, **k: {"seconds": 0.0, "runs": 0, "steps": 20,
                                                                          "threads": 1, "prompt": ""})  # fmt: skip
    out = tmp_path / "model"
    export(resumed, out, log, final_eval=False)
    assert (out / "README.md").is_file() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for a, b in zip(pipe.unet.parameters(), resumed.ema_unet.parameters(), strict=True):
        assert torch.equal(a, b)
    model = LoadedModel(load_model("tiny-random").spec, pipe, "mini", module_fingerprint(pipe.unet), "cpu", "float32")
    trace = generate_trace(model, GenerationConfig("a red circle on the left", steps=2, guidance=3.0, width=64,
                                                   height=64), check_sums=True)  # fmt: skip
    assert trace.max_sum_error < 1e-4
    assert [t.word for t in trace.tokens if t.kind == "word"][:4] == ["a", "red", "circle", "on"]


def test_scene_data_is_the_same_rendered_in_worker_processes(tmp_path):
    from dataclasses import replace

    from shapes.train import build_data, make_tokenizer, make_vae

    cfg = replace(MINI, n_scenes=1001)  # three chunks of up to 500 scenes
    torch.manual_seed(0)
    vae = make_vae(cfg).eval()
    built = []
    for workers in (1, 2):
        work = tmp_path / f"w{workers}"
        work.mkdir()
        built.append(build_data(cfg, work, vae, 0.5, make_tokenizer(cfg), Logger(work / "log.txt"), workers))
    for key in ("latents", "ids", "owner", "masks", "count"):
        assert torch.equal(built[0][key], built[1][key]), key
    assert built[0]["count"].tolist()[:4] == [1, 2, 3, 1]
