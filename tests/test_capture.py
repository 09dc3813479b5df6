"""Capture contract on real diffusers pipelines with tiny weights: outputs untouched, probabilities
are distributions, processors restored, every expected level captured."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

from pipeline.capture import AttentionRecorder, CapturePlan, attention_capture, plan_grids, pool_attention
from pipeline.generate import GenerationConfig, generate_trace, run_pipeline
from pipeline.models import LoadedModel, load_model, module_fingerprint
from pipeline.tiny import build_tiny_pipeline


def _latents(pipe, prompt="a red circle", seed=3, steps=3, guidance=3.0, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return pipe(
        prompt, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="latent", **kw
    ).images


def _plan(pipe, latent, cfg=True, guidance=3.0):
    self_grid, step_grid, _ = plan_grids(pipe.unet, latent)
    return CapturePlan(latent, (1, 2, 3), self_grid, step_grid, cfg, guidance, check_sums=True)


@pytest.mark.parametrize(
    "guidance, negative, size",
    [(3.0, None, (64, 64)), (1.0, None, (64, 64)), (5.0, "blurry", (64, 96))],
    ids=["cfg", "no-cfg", "negative-nonsquare"],
)
def test_traced_latents_bit_identical(tiny_model, guidance, negative, size):
    pipe = tiny_model.pipe
    kw = {"negative_prompt": negative, "height": size[0], "width": size[1]}
    plain = _latents(pipe, guidance=guidance, **kw)
    rec = AttentionRecorder(_plan(pipe, (size[0] // 2, size[1] // 2), guidance > 1, guidance))
    with attention_capture(pipe, rec):
        traced = _latents(pipe, guidance=guidance, **kw)
    assert torch.equal(plain, traced)
    assert len(rec.steps) == 3
    assert rec.max_sum_error < 1e-4  # each query's 77 key probabilities sum to 1 before slicing
    h, w = size[0] // 2, size[1] // 2
    assert all(set(s.cross) == {(h, w), (h // 2, w // 2), (h // 2, w // 2, "mid")} for s in rec.steps)  # mid: own level
    assert all(s.daam.shape == (3, h, w) for s in rec.steps)


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_other_schedulers_bit_identical(scheduler_cls):
    pipe = build_tiny_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    plain = _latents(pipe)
    rec = AttentionRecorder(_plan(pipe, (32, 32)))
    with attention_capture(pipe, rec):
        traced = _latents(pipe)
    assert torch.equal(plain, traced)
    assert len(rec.x0) == 3 and all(torch.isfinite(x).all() for x in rec.x0)


def test_traced_final_image_equals_untraced(tiny_model):
    cfg = GenerationConfig("a blue square at the top", seed=5, steps=3, guidance=2.5)
    trace = generate_trace(tiny_model, cfg, check_sums=True)
    plain = run_pipeline(tiny_model, cfg.resolved(tiny_model))
    assert np.array_equal(np.asarray(plain), np.asarray(trace.final))
    assert trace.max_sum_error < 1e-4


def test_processors_restored_even_on_error(tiny_model):
    pipe = tiny_model.pipe
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    rec = AttentionRecorder(_plan(pipe, (32, 32)))
    with pytest.raises(RuntimeError, match="boom"), attention_capture(pipe, rec):
        raise RuntimeError("boom")
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before
    assert not pipe.unet._forward_pre_hooks and not pipe.unet._forward_hooks


def test_only_captured_modules_swapped(tiny_model):
    pipe = tiny_model.pipe
    rec = AttentionRecorder(CapturePlan((32, 32), (1,), (32, 32), (16, 16), True))
    with attention_capture(pipe, rec):
        kinds = {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()}
    swapped = {k for k, v in kinds.items() if v == "CaptureAttnProcessor"}
    assert {k for k in kinds if k.endswith("attn2.processor")} <= swapped
    # self-attention swapped only at the stored grids (32x32 and 16x16 here: all of them)
    assert all(k.endswith(("attn1.processor", "attn2.processor")) for k in swapped)
    rec = AttentionRecorder(CapturePlan((32, 32), (1,), (16, 16), (16, 16), True))
    with attention_capture(pipe, rec):
        kinds = {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()}
    assert kinds["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"] == "AttnProcessor2_0"
    assert kinds["down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"] == "CaptureAttnProcessor"


@pytest.mark.parametrize(
    "layout, px, levels, self_grid, step_grid",
    [
        ("sd15", 256, [(32, 32), (16, 16), (8, 8), (4, 4, "mid")], (32, 32), (16, 16)),
        ("sd21", 256, [(32, 32), (16, 16), (8, 8), (4, 4, "mid")], (32, 32), (16, 16)),
    ],
)
def test_real_block_layout_captures_every_level(layout, px, levels, self_grid, step_grid):
    pipe = build_tiny_pipeline(layout)
    model = LoadedModel(
        load_model("tiny-random").spec, pipe, f"in-process:{layout}", module_fingerprint(pipe.unet), "cpu", "float32"
    )
    pipe.set_progress_bar_config(disable=True)
    trace = generate_trace(
        model, GenerationConfig("a cat on a mat", steps=2, guidance=7.5, width=px, height=px), check_sums=True
    )
    assert trace.levels == levels
    for rec in trace.steps:
        assert sorted(rec.cross, key=lambda g: -g[0]) == levels
        # SD 1.5 layout: 2 down + 3 up transformer layers per level, 1 in the mid block
        assert rec.cross_layers[(8, 8)] == 2 + 3 and rec.cross_layers[(4, 4, "mid")] == 1
        heads = {g: pipe.unet.get_submodule(n).heads for n in _attn2(pipe) for g in [_level(n, px // 8, pipe)]}
        assert rec.cross_heads == heads  # SD 2.1's heads differ per level
        assert rec.daam.shape == (len(rec.cross[(8, 8)]), px // 8, px // 8)
        assert rec.self_step.shape == (step_grid[0] * step_grid[1],) * 2
    assert trace.self_aggregate.shape == (self_grid[0] * self_grid[1],) * 2
    assert np.allclose(trace.self_aggregate.sum(axis=1), 1, atol=1e-4)
    assert trace.max_sum_error < 1e-4
    assert trace.run["self_grid_height"] == self_grid[0] and trace.run["step_grid_width"] == step_grid[1]


def test_pool_attention_keeps_rows_distributions():
    rng = np.random.default_rng(0)
    m = torch.tensor(rng.random((64, 64)), dtype=torch.float32)
    m = m / m.sum(dim=1, keepdim=True)
    pooled = pool_attention(m, (8, 8), (4, 4))
    assert pooled.shape == (16, 16)
    assert torch.allclose(pooled.sum(dim=1), torch.ones(16), atol=1e-5)
    # query cell (0,0) of the 4x4 grid = mean of rows of 8x8 cells (0,0),(0,1),(1,0),(1,1); keys summed
    rows = m[[0, 1, 8, 9]].mean(dim=0).reshape(8, 8)
    expected = rows.reshape(4, 2, 4, 2).sum(dim=(1, 3)).reshape(-1)
    assert torch.allclose(pooled[0], expected, atol=1e-6)


def test_same_seed_same_trace(tiny_model):
    cfg = GenerationConfig("two yellow stars", seed=11, steps=3, guidance=3.0)
    a, b = generate_trace(tiny_model, cfg), generate_trace(tiny_model, cfg)
    assert [t.__dict__ for t in a.tokens] == [t.__dict__ for t in b.tokens]
    for ra, rb in zip(a.steps, b.steps, strict=True):
        assert ra.timestep == rb.timestep
        for g in ra.cross:
            assert np.array_equal(ra.cross[g], rb.cross[g])
        assert np.array_equal(ra.self_step, rb.self_step)
    assert np.array_equal(a.self_aggregate, b.self_aggregate)
    assert np.array_equal(np.asarray(a.final), np.asarray(b.final))
    assert all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(a.previews, b.previews, strict=True))


def test_previews_one_per_step_small(tiny_model):
    trace = generate_trace(tiny_model, GenerationConfig("a green square", seed=2, steps=4, guidance=3.0))
    assert len(trace.previews) == 4
    assert all(max(p.size) <= 256 for p in trace.previews)
    # the last step's predicted x0 is close to the final image
    last = np.asarray(trace.previews[-1], dtype=float)
    final = np.asarray(trace.final.resize(trace.previews[-1].size), dtype=float)
    assert np.abs(last - final).mean() < 20


def test_sdxl_layout_two_text_encoders_bit_identical():
    from pipeline.models import REGISTRY

    pipe = build_tiny_pipeline("sdxl")
    pipe.set_progress_bar_config(disable=True)
    model = LoadedModel(REGISTRY["sdxl"], pipe, "in-process:sdxl", "", "cpu", "float32")
    cfg = GenerationConfig("a cat on a mat", steps=2, guidance=5.0, width=256, height=256)
    trace = generate_trace(model, cfg, check_sums=True)
    assert np.array_equal(np.asarray(run_pipeline(model, cfg.resolved(model))), np.asarray(trace.final))
    # SDXL places attention only in its 2nd and 3rd blocks: 1/2 and 1/4 of the latent grid
    assert trace.levels == [(16, 16), (8, 8), (8, 8, "mid")]
    assert trace.max_sum_error < 1e-4
    assert [t.word for t in trace.tokens if t.kind == "word"] == ["a", "cat", "on", "a", "mat"]


def _attn2(pipe) -> list[str]:
    return [k.removesuffix(".processor") for k in pipe.unet.attn_processors if k.endswith("attn2.processor")]


def _level(name: str, side: int, pipe) -> tuple:
    from pipeline import capture

    return capture.level_of(name, (side, side), len(pipe.unet.config.down_block_types))


class _ReferenceProcessor:
    """diffusers' classic attention path; records each layer's conditional-half probabilities."""

    def __init__(self, name: str, sink: dict) -> None:
        from diffusers.models.attention_processor import AttnProcessor

        self.inner, self.name, self.sink = AttnProcessor(), name, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(source))
        probs = attn.get_attention_scores(q, k, None)  # (batch*heads, queries, keys)
        cond = probs.reshape(-1, attn.heads, *probs.shape[1:])[-1].mean(dim=0)
        self.sink.setdefault(self.name, []).append(cond.detach().clone())
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@pytest.mark.parametrize("budget", [None, 1], ids=["one-drain-per-step", "drain-every-layer"])
def test_captured_maps_equal_reference_attention(tiny_model, monkeypatch, budget):
    """Per step and level: mean over layers of the head-mean probabilities, as diffusers computes them."""
    from pipeline import capture

    if budget is not None:
        monkeypatch.setattr(capture, "PENDING_BYTES", budget)
    pipe = tiny_model.pipe
    latent = (32, 32)
    plan = _plan(pipe, latent)
    rec = AttentionRecorder(plan)
    with attention_capture(pipe, rec):
        _latents(pipe, steps=2)
    sink: dict = {}
    originals = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor({key: _ReferenceProcessor(key, sink) for key in originals})
    try:
        _latents(pipe, steps=2)
    finally:
        pipe.unet.set_attn_processor(originals)
    n_down = len(pipe.unet.config.down_block_types)
    for step, record in enumerate(rec.steps):
        cross: dict = {}
        selfs = []
        for key, maps in sink.items():
            name = key.removesuffix(".processor")
            grid = capture.halve(latent, capture.block_depth(name, n_down))
            if name.endswith("attn2"):
                level = capture.level_of(name, latent, n_down)
                cross.setdefault(level, []).append(maps[step][:, list(plan.keep_tokens)].T)
            elif grid in (plan.self_grid, plan.step_grid):
                selfs.append(pool_attention(maps[step], grid, plan.step_grid))
        assert set(cross) == set(record.cross)
        for grid, layers in cross.items():
            expected = torch.stack(layers).mean(dim=0).reshape(-1, *grid[:2]).numpy()
            assert record.cross_layers[grid] == len(layers)
            np.testing.assert_allclose(record.cross[grid], expected, atol=1e-5)
        np.testing.assert_allclose(record.self_step, torch.stack(selfs).mean(dim=0).numpy(), atol=1e-5)
    at_self_grid = [
        torch.stack(maps).mean(dim=0)
        for key, maps in sink.items()
        if key.endswith("attn1.processor")
        and capture.halve(latent, capture.block_depth(key.removesuffix(".processor"), n_down)) == plan.self_grid
    ]
    np.testing.assert_allclose(rec.self_aggregate(), torch.stack(at_self_grid).mean(dim=0).numpy(), atol=1e-5)


def test_recorder_applies_attention_masks_like_diffusers():
    """A masked layer's probabilities: softmax(QK^T * scale + mask), conditional half, heads averaged."""
    torch.manual_seed(0)
    latent = (4, 4)
    plan = CapturePlan(latent, (0, 1, 2), (4, 4), (4, 4), cfg=True, guidance=2.0, check_sums=True)
    rec = AttentionRecorder(plan)
    rec.begin_step(999.0)
    q, k = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 5, 8)  # (batch, heads, queries/keys, d)
    mask = torch.zeros(2, 2, 1, 5)
    mask[..., 3:] = -10_000.0  # keys 3 and 4 masked out
    rec.observe("cross", (4, 4), q, k, mask, 0.5)
    rec.finish()
    expected = ((q[1] @ k[1].transpose(-1, -2)) * 0.5 + mask[1]).softmax(-1).mean(0)  # (queries, keys)
    got = rec.steps[0].cross[(4, 4)]  # (tokens, 4, 4)
    np.testing.assert_allclose(got.reshape(3, 16), expected[:, :3].T.numpy(), atol=1e-6)
    assert rec.max_sum_error < 1e-5
