"""`make model`'s trainer on a miniature recipe: VAE, data, joint training, checkpoint resume, export to a
StableDiffusionPipeline that StepX traces like any other model, and two runs giving the same weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import torch

from shapes.config import Config, ConfigError, apply_overrides, config_from_dict

ROOT = Path(__file__).resolve().parent.parent

MINI = Config(
    threads=1,
    vae_channels=(8, 8, 16),
    vae_steps=3,
    vae_batch=4,
    decoder_steps=2,
    decoder_batch=2,
    n_scenes=24,
    text_hidden=32,
    text_layers=1,
    text_heads=2,
    text_ff=64,
    unet_channels=(8, 16, 16),
    unet_heads=2,
    steps=3,
    batch=4,
    curriculum=(1, 2),
    layout_noise_p=0.5,
    shape_contrast_n=2,
    ckpt_every=2,
    eval_every=3,
    eval_prompts=2,
    eval_steps=2,
)


@pytest.mark.slow
def test_train_resume_and_export_a_traceable_pipeline(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from pipeline.generate import GenerationConfig, generate_trace
    from pipeline.models import LoadedModel, load_model, module_fingerprint
    from shapes import sample
    from shapes.train import Trainer
    from shapes.util import Logger

    work = tmp_path / "work"
    work.mkdir()
    log = Logger(work / "log.txt")
    trainer = Trainer(MINI, work, log)
    assert torch.get_num_threads() == MINI.threads
    assert trainer.data["latents"].shape == (24, 4, 16, 16)
    assert trainer.run(minutes=5)  # the recipe's 3 steps: done
    assert trainer.state.step == 3 and (work / "ckpt.pt").is_file() and (work / "ckpt-prev.pt").is_file()
    (evaluation,) = trainer.state.evals  # the periodic evaluation at step 3, on the validation split
    assert evaluation["step"] == 3 and evaluation["prompts"] == 2 and 0 <= evaluation["miou_otsu"] <= 1
    assert torch.load(work / "vae.pt", weights_only=False)["steps"] == MINI.vae_steps
    losses = trainer.step()
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()) and 0 < losses["mass_in"] <= 1
    assert losses["shape"] > 0  # the shape-twin term ran (an untrained model explains no shape change)
    trainer.save()

    resumed = Trainer(MINI, work, log)  # the VAE and data come back from the work folder
    assert resumed.load() and resumed.state.step == 4
    for a, b in zip(resumed.unet.parameters(), trainer.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(resumed.data["ids"], trainer.data["ids"])

    timing = {"seconds": 0.0, "runs": 0, "steps": 20, "threads": 1, "prompt": "p"}
    monkeypatch.setattr(sample, "time_generation", lambda *a, **k: timing)
    out = tmp_path / "model"
    sample.export(resumed, out, log, final_eval=False)
    card = (out / "README.md").read_text()
    assert "- shape twins: from the start (`shape_contrast_start` = 0)" in card and "$" not in card
    assert "History of the committed weights" not in card  # this run followed the recipe, not that history
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for a, b in zip(pipe.unet.parameters(), resumed.ema_unet.parameters(), strict=True):
        assert torch.equal(a, b)
    model = LoadedModel(load_model("tiny-random").spec, pipe, "mini", module_fingerprint(pipe.unet), "cpu", "float32")
    config = GenerationConfig("a red circle on the left", steps=2, guidance=3.0, width=64, height=64)
    trace = generate_trace(model, config, check_sums=True)
    assert trace.max_sum_error < 1e-4
    assert [t.word for t in trace.tokens if t.kind == "word"][:4] == ["a", "red", "circle", "on"]

    # A continuation (`--set init_from=...`) starts from the exported weights, VAE included: this export's
    # decoder was refined (its card says how long), so it is not refined again.
    assert "vae_decoder_steps: 2" in card and "then the decoder alone refined on whole scenes" in card
    more = tmp_path / "more"
    more.mkdir()
    cont = Trainer(replace(MINI, init_from=str(out)), more, Logger(more / "log.txt"))
    for a, b in (
        (cont.unet, pipe.unet),
        (cont.ema_unet, pipe.unet),
        (cont.text, pipe.text_encoder),
        (cont.vae, pipe.vae),
    ):
        _assert_same_weights(a, b)
    assert cont.sf == pipe.vae.config.scaling_factor and cont.run(minutes=5)
    sample.export(cont, more / "model", log, final_eval=False)
    card = (more / "model" / "README.md").read_text()
    assert f"SHA-256 {json.loads((more / 'init.json').read_text())['sha256']}" in card
    assert "History of the committed weights" in card and "kept from the weights this run continues" in card
    assert "in the weights this run continues;" in card and "they began with, unchanged" in card

    # From an export made before the decoder stage existed (its card records no refinement), a continuation of
    # 0 denoiser steps refines the decoder only: encoder (so every latent) and denoiser as they were, no data.
    old = tmp_path / "old-export"
    shutil.copytree(out, old)
    (old / "README.md").write_text(card.replace("vae_decoder_steps: 2", "vae_decoder_steps: 0"))
    only = tmp_path / "decoder-only"
    only.mkdir()
    dec = Trainer(replace(MINI, init_from=str(old), steps=0), only, Logger(only / "log.txt"))
    assert dec.run(minutes=5) and dec.state.step == 0 and not (only / "data.pt").exists()
    sample.export(dec, only / "model", log, final_eval=False)
    refined = StableDiffusionPipeline.from_pretrained(only / "model", local_files_only=True, dtype=torch.float32)
    for a, b in ((refined.unet, pipe.unet), (refined.vae.encoder, pipe.vae.encoder)):
        _assert_same_weights(a, b)
    decoders = zip(refined.vae.decoder.parameters(), pipe.vae.decoder.parameters(), strict=True)
    assert not all(torch.equal(x, y) for x, y in decoders)  # refined for MINI.decoder_steps
    card = (only / "model" / "README.md").read_text()
    assert "with only the VAE's decoder refined" in card and "No denoiser steps in this run" in card
    assert "vae_decoder_steps: 2" in card and "| none in this run |" in card and "$" not in card

    # Continuing that refined export once more refines nothing: the decoder is refined once.
    again = tmp_path / "again"
    again.mkdir()
    twice = Trainer(replace(MINI, init_from=str(only / "model"), steps=0), again, Logger(again / "log.txt"))
    _assert_same_weights(twice.vae, refined.vae)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y.to(x.dtype))


def test_a_config_from_before_the_decoder_stage_refines_nothing():
    values = json.loads(Config().to_json())
    del values["decoder_steps"]
    assert config_from_dict(values).decoder_steps == 0 and Config().decoder_steps > 0


def test_learning_rate_is_constant_by_default_and_anneals_to_lr_final():
    from shapes.config import lr_factor

    cfg = replace(MINI, warmup=10, steps=110)
    assert [lr_factor(cfg, s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert all(lr_factor(cfg, s) == 1.0 for s in range(10, 200))  # the committed run's schedule
    cos = replace(cfg, lr_final=0.02)
    values = [lr_factor(cos, s) for s in range(10, 111)]
    assert values[0] == 1.0 and values[-1] == pytest.approx(0.02) and values[50] == pytest.approx(0.51)
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_ema_warms_up_from_scratch_but_not_in_a_continuation(tmp_path):
    from shapes.config import ema_decay

    assert ema_decay(MINI, 0) == 0.1 and ema_decay(MINI, 10_000) == MINI.ema_decay
    assert ema_decay(replace(MINI, init_from=str(tmp_path)), 0) == MINI.ema_decay


@pytest.mark.slow
def test_scene_data_is_the_same_rendered_in_worker_processes(tmp_path):
    from shapes.data import build_data
    from shapes.model import make_tokenizer, make_vae
    from shapes.util import Logger

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


def _mini_overrides() -> list[str]:
    """MINI as `--set` arguments (the fields where it differs from the recipe)."""
    default = asdict(Config())
    return [f"{k}={json.dumps(v)}" for k, v in asdict(MINI).items() if v != default[k]]


@pytest.mark.slow
def test_two_runs_of_the_miniature_recipe_give_bit_identical_weights(tmp_path):
    """`stepx train-shapes` twice, each in a fresh work folder, run from an unrelated directory; the second
    run stops after 2 steps and resumes, as sessions of `make model` do."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    def train(work: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "stepx.cli", "train-shapes", "--work", str(work), "--out", str(tmp_path / "out")]
        cmd += ["--no-export", *extra, "--set", *_mini_overrides()]
        res = subprocess.run(cmd, cwd=elsewhere, capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]

    train(tmp_path / "a")
    train(tmp_path / "b", "--max-steps", "2")
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["state"]["step"] == 2
    train(tmp_path / "b", "--resume")
    assert not (tmp_path / "out").exists()  # --no-export
    a, b = (
        {f: torch.load(tmp_path / n / f, weights_only=False) for f in ("vae.pt", "data.pt", "ckpt.pt")} for n in "ab"
    )
    assert a["ckpt.pt"]["state"]["step"] == b["ckpt.pt"]["state"]["step"] == MINI.steps
    assert a["vae.pt"]["decoder_steps"] == MINI.decoder_steps  # the decoder refinement is in the compared VAE
    scores = [
        [{k: v for k, v in e.items() if k != "eval_seconds"} for e in x["ckpt.pt"]["state"]["evals"]] for x in (a, b)
    ]
    assert scores[0] == scores[1] and scores[0][0]["step"] == 3  # same weights, same validation scores
    pairs = [(a["vae.pt"]["state"], b["vae.pt"]["state"]), (a["data.pt"], b["data.pt"])]
    pairs += [(a["ckpt.pt"][k], b["ckpt.pt"][k]) for k in ("text", "unet", "ema_text", "ema_unet")]
    compared = 0
    for x, y in pairs:
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key
            compared += 1
    assert compared > 100
    assert config_from_dict(a["ckpt.pt"]["config"]) == MINI


def test_set_rejects_unknown_fields_and_bad_values_in_one_line(tmp_path, capsys):
    from stepx.cli import main

    work = tmp_path / "work"
    for bad in (
        "nosuchfield=1",
        "batch=abc",
        "batch=1.5",
        "bf16=1",
        "curriculum=3",
        "steps=0",
        "lr",
        "lr_final=-3",
        "decoder_steps=-1",
    ):
        assert main(["train-shapes", "--work", str(work), "--set", bad]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err.startswith("stepx train-shapes: --set") or err.startswith("stepx train-shapes: Config."), err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    for bad in (["--export-only"], ["--eval-only"], ["--device", "tpu"], ["--workers", "0"]):
        assert main(["train-shapes", "--work", str(work), *bad]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err.startswith("stepx train-shapes: ") and len(err.splitlines()) == 1, err
    # A continuation from something that isn't this recipe's exported pipeline: one line, nothing written.
    (tmp_path / "empty" / "unet").mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    (tmp_path / "card").mkdir()  # a card whose decoder refinement isn't a count: refining again or not is a guess
    (tmp_path / "card" / "README.md").write_text("---\nvae_decoder_steps: lots\n---\n")
    folders = ("missing", "file", "empty", "card")
    for folder in (*(tmp_path / f for f in folders), ROOT / "data" / "models" / "shapes"):
        cmd = ["train-shapes", "--work", str(work), "--set", f"init_from={folder}"]
        assert main([*cmd, *(["text_hidden=64"] if folder.name == "shapes" else [])]) == 2, folder
        err = capsys.readouterr().err.strip()
        assert err.startswith("stepx train-shapes: init_from=") and len(err.splitlines()) == 1, err
    assert not work.exists()  # nothing written for a refused run


def test_overrides_parse_json_values():
    cfg = apply_overrides(Config(), ["batch=32", "curriculum=[10, 20]", "bf16=false", "lr=1e-3", "unet_mid=UNetMid"])
    assert (cfg.batch, cfg.curriculum, cfg.bf16, cfg.lr, cfg.unet_mid) == (32, (10, 20), False, 1e-3, "UNetMid")
    with pytest.raises(ConfigError):
        apply_overrides(Config(), ["threads=0"])


def test_config_defaults_are_the_recipe_the_card_documents():
    from shapes.card import history_table, is_committed_schedule, schedule_text

    table = history_table()
    names = {f.name for f in fields(Config)}
    assert {"ground_own_start", "shape_contrast_start", "steps", "vae_steps", "threads"} <= set(table) <= names
    for name, (_, default) in table.items():
        assert default == str(getattr(Config(), name)), name
    assert not is_committed_schedule(Config())
    committed = {k: int(v) for k, (v, _) in table.items() if k.endswith(("_start", "_stop"))}
    assert is_committed_schedule(replace(Config(), **committed))
    text = schedule_text(replace(Config(), ground_bg_stop=2404, layout_noise_start=-1))
    assert "background loss: until step 2404" in text and "layout from pure noise: never" in text
