"""`stepx.record` around pipelines built in-process: images bit-identical to untraced calls, runs readable,
word maps equal to `generate_trace`'s, provenance stored, LoRA kept, one run per image, failed calls write nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
)
from PIL import Image
from streamlit.testing.v1 import AppTest

import stepx
from pipeline.generate import GenerationConfig, generate_trace
from pipeline.models import load_model
from pipeline.observe import CaptureError
from pipeline.tiny import build_tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "dashboard" / "app.py")
STEPX = str(ROOT / ".venv" / "bin" / "stepx")
PROMPT = "a red circle on the left"
CALL = {"num_inference_steps": 3, "guidance_scale": 3.0, "width": 64, "height": 64, "output_type": "np"}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _pipe(layout: str = "tiny") -> object:
    pipe = build_tiny_pipeline(layout)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(seed: int = 5) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _plain_and_recorded(
    pipe: object, store: object, previews: bool = False, **call: object
) -> tuple[np.ndarray, np.ndarray, object]:
    """The same call untraced and recorded: (untraced images, recorded images, recording)."""
    call = {**CALL, **call}
    plain = pipe(generator=_gen(), **call).images
    with stepx.record(pipe, store=store, tags=["api-test"], previews=previews) as rec:
        traced = pipe(generator=_gen(), **call).images
    return np.asarray(plain), np.asarray(traced), rec


def _processors(pipe: object) -> dict[str, type]:
    return {k: type(v) for k, v in pipe.unet.attn_processors.items()}


@pytest.mark.slow
def test_record_sd_bit_identical_and_maps_equal_generate(tmp_path):
    pipe = _pipe()
    before = _processors(pipe)
    plain, traced, rec = _plain_and_recorded(pipe, tmp_path, previews=True, prompt=PROMPT)
    assert np.array_equal(plain, traced)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe).__call__ is not None
    assert _processors(pipe) == before and not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks
    run = rec.run
    info = run.info()
    assert info["steps"] == 3 and info["source"] == "record" and info["pipeline_class"] == "StableDiffusionPipeline"
    assert info["seed"] == 5 and info["tags"] == ["api-test"] and info["model_name"] == "custom"
    assert '"timestep_spacing"' in info["scheduler_config"]
    stored = np.asarray(run.image())
    assert np.array_equal(stored, (plain[0] * 255).round().astype(np.uint8))

    model = load_model("tiny-random", device="cpu")
    trace = generate_trace(model, GenerationConfig(PROMPT, seed=5, steps=3, guidance=3.0, width=64, height=64))
    from pipeline.trace_writer import write_trace

    write_trace(tmp_path, trace)
    store = stepx.open_store(tmp_path)
    for word in ("red", "circle", "left"):
        mine, theirs = run.word_map(word), store.word_map(trace.run["run_id"], word)
        assert mine.shape == (32, 32)
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(run.word_map(word, step=1), store.word_map(trace.run["run_id"], word, step=1))
    assert store.self_attention(run.run_id).matrix.shape[0] == 32 * 32


def test_user_callback_keeps_working_and_failed_call_writes_nothing(tmp_path):
    pipe = _pipe()
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append(step)
        return kwargs

    def boom(p, step, timestep, kwargs):
        if step == 1:
            raise RuntimeError("boom")
        return kwargs

    before = _processors(pipe)
    with stepx.record(pipe, store=tmp_path) as rec:
        pipe(PROMPT, generator=_gen(), callback_on_step_end=callback, **CALL)
        with pytest.raises(RuntimeError, match="boom"):
            pipe(PROMPT, generator=_gen(), callback_on_step_end=boom, **CALL)
        assert _processors(pipe) == before  # the failed call's wrappers are gone already
        pipe("a blue square", generator=_gen(), **CALL)
    assert seen == [0, 1, 2]
    assert [r.info()["prompt"] for r in rec.runs] == [PROMPT, "a blue square"]
    assert len(stepx.open_store(tmp_path).runs()) == 2
    with pytest.raises(LookupError, match="2 runs"):
        _ = rec.run


@pytest.mark.parametrize("scheduler", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_any_scheduler(tmp_path, scheduler):
    pipe = _pipe()
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    plain, traced, rec = _plain_and_recorded(pipe, tmp_path, prompt=PROMPT)
    assert np.array_equal(plain, traced)
    info = rec.run.info()
    assert info["scheduler"] == scheduler.__name__ and info["steps"] == 3
    assert rec.run.word_map("circle").shape == (32, 32) and rec.run.word_map("circle", step=2).sum() > 0


def test_img2img_counts_steps_from_strength_and_shows_provenance(tmp_path, monkeypatch):
    pipe = StableDiffusionImg2ImgPipeline(**_pipe().components)
    pipe.set_progress_bar_config(disable=True)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    call = {"num_inference_steps": 4, "strength": 0.5, "guidance_scale": 3.0, "output_type": "np"}
    plain = pipe(PROMPT, image=init, generator=_gen(), **call).images
    with stepx.record(pipe, store=tmp_path) as rec:
        traced = pipe(PROMPT, image=init, generator=_gen(), **call).images
    assert np.array_equal(plain, traced)
    info = rec.run.info()
    assert info["steps"] == 2 and info["strength"] == pytest.approx(0.5)
    assert info["pipeline_class"] == "StableDiffusionImg2ImgPipeline" and len(info["init_image_sha256"]) == 64
    assert stepx.open_store(tmp_path).steps(rec.run.run_id) == [0, 1]

    # provenance through the CLI and on the dashboard's Inspect page
    shown = subprocess.run(
        [STEPX, "show", rec.run.run_id, "--store", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert "pipeline_class: StableDiffusionImg2ImgPipeline" in shown.stdout and "strength: 0.5" in shown.stdout
    assert f"init_image_sha256: {info['init_image_sha256']}" in shown.stdout
    monkeypatch.setenv("STEPX_STORE", str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.session_state["run_id"] = rec.run.run_id
    at.switch_page("views/inspect.py").run()
    assert not at.exception, at.exception
    texts = "\n".join(t.value for t in at.text)
    assert "Pipeline: StableDiffusionImg2ImgPipeline (recorded with stepx.record)" in texts
    assert f"img2img strength 0.5 · init image sha256 {info['init_image_sha256']}" in texts


def test_sdxl(tmp_path):
    pipe = _pipe("sdxl")
    plain, traced, rec = _plain_and_recorded(pipe, tmp_path, prompt=PROMPT, num_inference_steps=2)
    assert np.array_equal(plain, traced)
    info = rec.run.info()
    assert info["pipeline_class"] == "StableDiffusionXLPipeline" and info["latent_height"] == 8
    assert rec.run.word_map("circle").shape == (8, 8)


def test_controlnet(tmp_path):
    base = _pipe()
    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32))
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    control = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    plain, traced, rec = _plain_and_recorded(pipe, tmp_path, prompt=PROMPT, image=control)
    assert np.array_equal(plain, traced)
    info = rec.run.info()
    assert info["controlnet"] == "ControlNetModel" and info["strength"] is None
    assert rec.run.word_map("circle").shape == (32, 32)


def test_lora_output_kept_under_capture(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    donor = _pipe()
    torch.manual_seed(3)
    donor.unet.add_adapter(
        peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    type(donor).save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(donor.unet))

    pipe = _pipe()
    no_lora = np.asarray(pipe(PROMPT, generator=_gen(), **CALL).images)
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="shapes-lora")
    pipe.set_adapters(["shapes-lora"], adapter_weights=[0.8])
    plain, traced, rec = _plain_and_recorded(pipe, tmp_path / "store", prompt=PROMPT)
    assert np.array_equal(plain, traced)
    assert not np.array_equal(no_lora, traced)
    info = rec.run.info()
    assert info["lora_adapters"] == ["shapes-lora"] and info["lora_scales"] == pytest.approx([0.8])


@pytest.mark.slow
def test_one_run_per_image(tmp_path):
    pipe = _pipe()
    prompts = [PROMPT, "a green triangle at the top"]
    plain, traced, rec = _plain_and_recorded(pipe, tmp_path, prompt=prompts, num_images_per_prompt=2)
    assert np.array_equal(plain, traced) and len(traced) == 4
    assert [r.info()["prompt"] for r in rec.runs] == [prompts[0], prompts[0], prompts[1], prompts[1]]
    for run, image in zip(rec.runs, traced, strict=True):
        assert np.array_equal(np.asarray(run.image()), (image * 255).round().astype(np.uint8))
    a, b = rec.runs[0].word_map("circle"), rec.runs[1].word_map("circle")
    assert a.shape == (32, 32) and not np.array_equal(a, b)  # each image's own conditional half

    # the first image of the batch has the maps of the same prompt and noise run alone
    single = build_tiny_pipeline("tiny")
    single.set_progress_bar_config(disable=True)
    gens = [_gen(5), _gen(6)]
    with stepx.record(single, store=tmp_path / "pair", previews=False) as pair:
        single(prompt=[PROMPT, PROMPT], generator=gens, **CALL)
    with stepx.record(single, store=tmp_path / "alone", previews=False) as alone:
        single(prompt=PROMPT, generator=_gen(6), **CALL)
    np.testing.assert_allclose(pair.runs[1].word_map("circle"), alone.run.word_map("circle"), rtol=1e-4, atol=1e-6)
    assert [r.info()["seed"] for r in pair.runs] == [5, 6]


def test_fused_projections_observed(tmp_path):
    pipe = _pipe()
    with stepx.record(pipe, store=tmp_path / "a") as ref:
        pipe(PROMPT, generator=_gen(), **CALL)
    pipe.unet.fuse_qkv_projections()
    plain, traced, rec = _plain_and_recorded(pipe, tmp_path / "b", prompt=PROMPT)
    assert np.array_equal(plain, traced)
    assert (
        "Fused"
        in type(pipe.unet.attn_processors["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"]).__name__
    )
    np.testing.assert_allclose(rec.run.word_map("circle"), ref.run.word_map("circle"), rtol=1e-3, atol=1e-5)


class _Opaque:
    """A processor that computes attention from the weights directly: not observable through the projections."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = hidden_states @ attn.to_q.weight.T
        k, v = attn.to_k(context), attn.to_v(context)
        b, d = q.shape[0], q.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, attn.heads * d)
        return attn.to_out[1](attn.to_out[0](out))


def test_unobservable_processor_is_refused_by_name(tmp_path):
    pipe = _pipe()
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    pipe.unet.get_submodule(name).set_processor(_Opaque())
    with (
        stepx.record(pipe, store=tmp_path),
        pytest.raises(CaptureError, match=rf"{name}: its processor _Opaque"),
    ):
        pipe(PROMPT, generator=_gen(), **CALL)
    assert stepx.open_store(tmp_path).runs() == []
    assert type(pipe.unet.get_submodule(name).processor) is _Opaque


def test_prompt_embeds_alone_refused(tmp_path):
    pipe = _pipe()
    embeds, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
    with stepx.record(pipe, store=tmp_path), pytest.raises(ValueError, match="prompt text"):
        pipe(prompt_embeds=embeds, generator=_gen(), **{**CALL, "guidance_scale": 1.0})


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use StepX from Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"pipe": _pipe()})  # noqa: S102 - the README's own example
    first, second = capsys.readouterr().out.splitlines()
    run_id = first.split()[0]
    assert first == f"{run_id} (32, 32) StableDiffusionPipeline DDIMScheduler"
    assert second.startswith("1 (32, 32) (1024, 1024) (0, ")
    store = stepx.open_store(tmp_path / "data" / "store")
    assert [r["run_id"] for r in store.runs()] == [run_id] and store.run(run_id)["tags"] == ["lora-test"]


def test_ip_adapter_processor_wrapped_output_identical():
    """IP-Adapter's processor under capture: the same output, and the text branch's queries/keys observed."""
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    from pipeline.observe import wrap_processor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8)
    ip = IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=16, num_tokens=(4,), scale=0.7)
    torch.nn.init.normal_(ip.to_k_ip[0].weight)
    torch.nn.init.normal_(ip.to_v_ip[0].weight)
    attn.set_processor(ip)
    hidden, text, image = torch.randn(2, 64, 32), torch.randn(2, 7, 16), torch.randn(2, 4, 16)
    plain = attn(hidden, encoder_hidden_states=(text, [image]))
    seen = []
    attn.set_processor(wrap_processor(attn, "ip.attn2", lambda q, k, m, s: seen.append((q, k, s))))
    traced = attn(hidden, encoder_hidden_states=(text, [image]))
    assert torch.equal(plain, traced)
    ((q, k, scale),) = seen
    assert q.shape == (2, 4, 64, 8) and k.shape == (2, 4, 7, 8) and scale == attn.scale
    assert torch.equal(k, attn.to_k(text).view(2, 7, 4, 8).transpose(1, 2))
