"""Diffusion transformers (issue 18): tiny SD3, SD3.5-layout and FLUX.1 pipelines built in-process, traced
bit-identically, with exact joint-attention probabilities, per-encoder tokens, and runs the store and
dashboard read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.capture_dit import DitPlan, DitRecorder, dit_bands, dit_capture, joint_text_probs
from pipeline.generate import GenerationConfig, generate_trace
from pipeline.generate_dit import CLIP_POSITIONS, dit_tokens, is_dit, token_grid
from pipeline.models import load_model

PROMPT = "a hippopotamus on a red sofa"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models() -> dict:
    return {name: load_model(f"tiny-{name}", device="cpu") for name in ("sd3", "sd35", "flux")}


def _call(model: object, true_cfg: float = 1.0, steps: int = 2) -> torch.Tensor:
    pipe = model.pipe
    kwargs = {
        "prompt": PROMPT,
        "num_inference_steps": steps,
        "height": 32,
        "width": 32,
        "generator": torch.Generator().manual_seed(3),
        "max_sequence_length": model.spec.text_length,
        "output_type": "pt",
    }
    if model.spec.kind == "flux":
        kwargs.update(guidance_scale=1.0, true_cfg_scale=true_cfg, negative_prompt="blurry" if true_cfg > 1 else None)
    else:
        kwargs.update(guidance_scale=4.0, negative_prompt="blurry")
    return pipe(**kwargs).images


def _recorder(model: object, true_cfg: float = 1.0, keep_raw: int = 0) -> DitRecorder:
    pipe = model.pipe
    flux = model.spec.kind == "flux"
    _tokens, fold, _ = dit_tokens(pipe, PROMPT, model.spec.text_length)
    plan = DitPlan(
        grid=token_grid(pipe, 32, 32),
        text_len=fold.shape[0],
        fold=fold,
        bands=tuple(dit_bands(pipe.transformer)),
        flux=flux,
        cfg_batched=not flux,
        guidance=true_cfg if flux else 4.0,
        check_sums=True,
        keep_raw=keep_raw,
    )
    return DitRecorder(plan)


@pytest.mark.parametrize(("name", "true_cfg"), [("sd3", 1.0), ("sd35", 1.0), ("flux", 1.0), ("flux", 2.5)])
def test_traced_images_equal_untraced(models: dict, name: str, true_cfg: float) -> None:
    model = models[name]
    before = {k: type(v) for k, v in model.pipe.transformer.attn_processors.items()}
    plain = _call(model, true_cfg)
    recorder = _recorder(model, true_cfg)
    with dit_capture(model.pipe, recorder):
        traced = _call(model, true_cfg)
    assert torch.equal(plain, traced)
    assert {k: type(v) for k, v in model.pipe.transformer.attn_processors.items()} == before
    assert "cache_context" not in vars(model.pipe.transformer)
    assert len(recorder.steps) == 2  # true CFG: two transformer calls per step, one step captured
    assert len(recorder.velocities) == 2
    assert recorder.max_sum_error < 1e-5
    if name == "sd35":
        assert any(m.endswith("attn2") for b in recorder.plan.bands for m in b.modules)


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux"])
def test_probabilities_equal_full_softmax(models: dict, name: str) -> None:
    model = models[name]
    recorder = _recorder(model, keep_raw=3)
    with dit_capture(model.pipe, recorder):
        _call(model)
    assert len(recorder.raw) == 3
    text_len = recorder.plan.text_len
    for _name, q, k, scale, p_text in recorder.raw:
        full = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1)  # (heads, image, keys)
        assert torch.allclose(full.sum(-1), torch.ones_like(full[..., 0]), atol=1e-12)
        ref = full[..., :text_len] if name == "flux" else full[..., -text_len:]  # Flux [text, image], SD3 [image, text]
        assert k.shape[1] == q.shape[1] + text_len
        assert torch.allclose(p_text.double(), ref, atol=1e-5, rtol=0)
    assert recorder.max_sum_error < 1e-5
    step = recorder.steps[0]
    for maps in step.cross.values():  # stored: renormalised over text keys (sum 1 per pixel) + the text share
        assert np.allclose(maps[:-1].sum(axis=0), 1.0, atol=1e-5)
        assert 0 < maps[-1].mean() < 1


def test_chunked_probabilities_equal_unchunked() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 50, 8, generator=g), torch.randn(3, 61, 8, generator=g)
    text, image = slice(50, 61), slice(0, 50)
    (_hs, _r, p_text, p_img), *more = joint_text_probs(q, k, text, image, 0.35)  # every head in one block
    assert not more and p_text.shape == (3, 50, 11) and p_img.shape == (3, 50, 50)
    parts: dict[int, list] = {}
    for hs, _rows, pt, pi in joint_text_probs(q, k, text, image, 0.35, chunk_bytes=4 * 61 * 7):
        assert hs.stop - hs.start == 1 and pt.shape[1] <= 7  # one head, 7 rows a block
        parts.setdefault(hs.start, []).append((pt[0].clone(), pi[0].clone()))
    for h in range(3):
        pt, pi = p_text[h], p_img[h]
        assert len(parts[h]) == 8
        # a different row count may change the GEMM's blocking: equal to float32 rounding
        assert torch.allclose(torch.cat([p for p, _ in parts[h]]), pt, atol=1e-7, rtol=0)
        assert torch.allclose(torch.cat([p for _, p in parts[h]]), pi, atol=1e-7, rtol=0)


def test_tokens_words_and_padding(models: dict) -> None:
    sd3 = models["sd3"]
    tokens, fold, _ = dit_tokens(sd3.pipe, PROMPT, sd3.spec.text_length)
    assert fold.shape == (CLIP_POSITIONS + sd3.spec.text_length, len(tokens) - 1)
    assert np.array_equal(fold.sum(axis=1), np.ones(fold.shape[0]))  # every position folded exactly once
    clip = [t for t in tokens if t.encoder == "clip"]
    t5 = [t for t in tokens if t.encoder == "t5"]
    for group in (clip, t5):  # an SD3 word has a CLIP map and a T5 map
        assert [t.word for t in group if t.kind == "word"][:2] == ["a", "hippopotamus"]
        assert [t.kind for t in group][-1] == "padding"
    hippo = [t for t in t5 if t.word == "hippopotamus"]
    assert len(hippo) > 1 and len({t.word_index for t in hippo}) == 1  # SentencePiece pieces grouped at '▁'
    assert {t.word_index for t in hippo}.isdisjoint({t.word_index for t in clip if t.word_index is not None})
    pad = next(t for t in t5 if t.kind == "padding")
    assert fold[:, tokens.index(pad)].sum() == CLIP_POSITIONS + sd3.spec.text_length - pad.token_index
    assert tokens[-1].kind == "text_share" and tokens[-1].token_index == -1
    flux_tokens, flux_fold, _ = dit_tokens(models["flux"].pipe, PROMPT, 32)
    assert {t.encoder for t in flux_tokens[:-1]} == {"t5"} and flux_fold.shape[0] == 32
    assert next(t for t in flux_tokens if t.word == "hippopotamus").noun_lemma == "hippopotamus"


def test_bands_scale_real_layouts(models: dict) -> None:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    with torch.device("meta"):
        sd3 = SD3Transformer2DModel(num_layers=24, attention_head_dim=8, num_attention_heads=2)
        flux = FluxTransformer2DModel(num_layers=19, num_single_layers=38, attention_head_dim=16, num_attention_heads=2)
    assert [b.label for b in dit_bands(sd3)] == ["joint-0-7", "joint-8-15", "joint-16-23"]
    assert [b.label for b in dit_bands(flux)] == ["double-0-9", "double-10-18", "single-0-18", "single-19-37"]
    tiny = dit_bands(models["flux"].pipe.transformer)
    assert [b.label for b in tiny] == ["double-0-0", "double-1-1", "single-0-0", "single-1-1"]
    assert is_dit(models["sd3"].pipe)


def test_generate_trace_dispatches_to_dit(models: dict) -> None:
    trace = generate_trace(models["flux"], GenerationConfig(prompt=PROMPT, steps=2), check_sums=True)
    assert trace.run["architecture"] == "flux"
    assert trace.run["levels"] == ["double-0-0", "double-1-1", "single-0-0", "single-1-1"]
    assert trace.run["level_modules"][0] == "transformer_blocks.0.attn"
    assert (trace.run["latent_height"], trace.run["latent_width"]) == (16, 16)
    assert len(trace.previews) == 2 and trace.max_sum_error < 1e-5
    assert trace.steps[0].daam.shape == (len(trace.tokens), 16, 16)


# -- a DiT run written, indexed, read back, queried and shown ------------------------------------------


@pytest.fixture(scope="module")
def dit_store(tmp_path_factory: pytest.TempPathFactory, models: dict) -> tuple:
    from pipeline.trace_writer import write_trace

    root = tmp_path_factory.mktemp("dit_store")
    traces = {}
    flux = {"negative_prompt": "blurry", "true_cfg": 2.0, "concepts": ["hippopotamus", "sky"]}
    for name, kwargs in (("sd3", {}), ("flux", flux)):
        trace = generate_trace(models[name], GenerationConfig(prompt=PROMPT, seed=4, steps=3, **kwargs))
        write_trace(root, trace)
        traces[name] = trace
    return root, traces


def test_store_reads_dit_runs(dit_store: tuple) -> None:
    from store import Store
    from store.errors import StoreError

    root, traces = dit_store
    store = Store(root)
    sd3 = traces["sd3"].run["run_id"]
    run = store.run(sd3)
    assert run["architecture"] == "sd3" and run["levels"] == ["joint-0-0", "joint-1-1", "joint-2-2"]
    assert store.encoders(sd3) == ["clip", "t5"]
    clip = store.word_map(sd3, "hippopotamus", encoder="clip")
    t5 = store.word_map(sd3, "hippopotamus", encoder="t5")
    both = store.word_map(sd3, "hippopotamus")
    assert clip.shape == t5.shape == (32, 32) and not np.allclose(clip, t5)
    words = [w for w in store.words(sd3) if w.word == "hippopotamus"]
    assert {w.encoder for w in words} == {"clip", "t5"}
    n_clip, n_t5 = (len(w.token_indices) for w in sorted(words, key=lambda w: w.encoder))
    assert np.allclose(both, (clip * n_clip + t5 * n_t5) / (n_clip + n_t5), atol=1e-5)  # mean over its tokens
    # the stored map is the capture's: step 0's DAAM-comparable map of the word's T5 tokens
    rec = traces["sd3"].steps[0]
    cols = [i for i, t in enumerate(traces["sd3"].tokens) if t.word == "hippopotamus" and t.encoder == "t5"]
    assert np.allclose(store.word_map(sd3, "hippopotamus", step=0, encoder="t5"), rec.daam[cols].mean(0), atol=1e-6)
    band = store.word_map(sd3, "hippopotamus", step=0, levels=["joint-1-1"], encoder="t5")
    assert np.allclose(band, rec.cross[(32, 32, "band", "joint-1-1", 1)][cols].mean(0), atol=1e-3)  # float16
    share = store.text_share(sd3)
    assert share.shape == (32, 32) and share.min() > 0 and share.max() < 1
    _, maps = store.token_maps(sd3)
    pad = [t["token_index"] for t in store.tokens(sd3) if t["has_map"]]
    assert maps.shape[1] == len(pad)
    text = maps[:, [i for i, t in enumerate(store.tokens(sd3)) if t["kind"] != "text_share"]]
    assert np.allclose(text.sum(axis=1), store.run(sd3)["steps"] * 0 + 1, atol=1e-4)  # sums to 1 over text tokens
    with pytest.raises(StoreError, match="no 'clip' text encoder"):
        store.word_map(traces["flux"].run["run_id"], "sofa", encoder="clip")
    assert store.self_attention(sd3).grid == (32, 32)
    assert store.self_attention(traces["flux"].run["run_id"], step=1).grid == (16, 16)


def test_sql_over_dit_runs(dit_store: tuple) -> None:
    from store import Store

    root, traces = dit_store
    res = Store(root).sql(
        "SELECT r.architecture, t.encoder, t.kind, count(*) AS n FROM tokens t JOIN runs r USING (run_id) "
        "GROUP BY ALL ORDER BY ALL"
    )
    rows = {(a, e, k): n for a, e, k, n in res.rows}
    assert rows[("sd3", "clip", "padding")] == 1 and rows[("sd3", "t5", "padding")] == 1
    assert rows[("flux", None, "text_share")] == 1 and ("flux", "clip", "word") not in rows
    bands = Store(root).sql(
        "SELECT DISTINCT level FROM cross_attention WHERE run_id = ? ORDER BY level".replace(
            "?", "'" + traces["flux"].run["run_id"] + "'"
        )
    )
    assert [r[0] for r in bands.rows] == ["all", "double-0-0", "double-1-1", "single-0-0", "single-1-1"]


@pytest.mark.slow
def test_dashboard_pages_on_dit_runs(dit_store: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from analysis.regions import region_map
    from store import Store

    root, traces = dit_store
    views = Path(__file__).resolve().parent.parent / "dashboard" / "views"
    monkeypatch.setenv("STEPX_STORE", str(root))
    sd3 = traces["sd3"].run["run_id"]
    store = Store(root)

    def page(name: str, run_id: str) -> AppTest:
        at = AppTest.from_file(str(views / f"{name}.py"), default_timeout=180)
        at.query_params["run"] = run_id
        at.run()
        assert not at.exception, (name, at.exception)
        return at

    at = page("inspect", sd3)
    assert at.multiselect(key="inspect_levels").label == "Block bands"
    assert at.multiselect(key="inspect_levels").options == ["joint-0-0", "joint-1-1", "joint-2-2"]
    at.radio(key="inspect_encoder").set_value("t5").run()
    assert "hippopotamus" in at.radio(key="inspect_word").options and not at.exception
    hippo = next(w for w in store.words(sd3) if w.encoder == "t5" and w.word == "hippopotamus")
    at.radio(key="inspect_word").set_value(hippo.word_index).run()
    assert not at.exception
    shown = at.get("image")[0].proto.imgs[0].caption
    assert shown.startswith(r"hippopotamus \(T5\)")  # markdown-escaped by dashboard.widgets.plain
    at.toggle(key="inspect_text_share").set_value(True).run()
    assert not at.exception
    assert any("Text share" in (i.proto.imgs[0].caption or "") for i in at.get("image"))
    regions = page("regions", sd3)
    regions.radio(key="regions_mode").set_value("Type").run()
    regions.text_input(key="regions_px").input("0-5").run()
    assert not regions.exception
    sa = store.self_attention(sd3)
    expected = region_map(sa.matrix, list(range(6)), sa.grid)
    assert [i.proto.imgs[0].caption for i in regions.get("image")] == [
        f"Pixel heatmap · 6 cells · max {expected.max():.4g}"
    ]
    flux = page("inspect", traces["flux"].run["run_id"])
    assert flux.multiselect(key="inspect_levels").options == ["double-0-0", "double-1-1", "single-0-0", "single-1-1"]
    assert "inspect_encoder" not in [r.key for r in flux.radio]  # Flux attends to T5 positions only
    assert "sofa" in flux.radio(key="inspect_word").options
    flux.multiselect(key="inspect_levels").set_value(["single-1-1"]).run()
    assert not flux.exception
    flux.radio(key="inspect_family").set_value("ConceptAttention").run()
    flux.radio(key="inspect_concept").set_value(1).run()
    assert not flux.exception
    assert flux.get("image")[0].proto.imgs[0].caption.startswith("sky \\(ConceptAttention\\)")
    for name in ("regions", "detect", "compare", "gallery", "sql", "guide"):
        page(name, traces["flux"].run["run_id"])


def test_runs_without_the_dit_columns_still_read(tmp_path) -> None:
    """A run whose files predate schema 1.4 (no tokens.encoder, runs.architecture / level_modules) reads as UNet."""
    from datetime import UTC, datetime

    from jobs.synth import synth_trace
    from pipeline.trace_writer import build_tables, write_tables
    from store import Store

    trace = synth_trace(np.random.default_rng(0), datetime(2026, 1, 1, tzinfo=UTC), "shapes", steps=2)
    tables = build_tables(trace)
    tables["tokens"] = tables["tokens"].drop_columns(["encoder"])
    tables["runs"] = tables["runs"].drop_columns(["architecture", "level_modules"])
    rid = trace.run["run_id"]
    write_tables(tmp_path, rid, tables, 2)
    store = Store(tmp_path)
    assert store.run(rid)["architecture"] is None and store.encoders(rid) == []
    words = store.words(rid)
    assert words and all(w.encoder is None for w in words)
    assert store.word_map(rid, words[1].word).shape == (16, 16)
    res = store.sql("SELECT count(*) FROM tokens WHERE encoder IS NULL")
    assert res.rows[0][0] == len(trace.tokens)


def test_concept_attention_maps(models: dict, tmp_path) -> None:
    """ConceptAttention (Flux): the image is unchanged, a pixel's maps sum to 1 over the concepts, and the maps go
    through the writer to their own table and back; other models refuse concepts in one line."""
    from pipeline.concepts import concept_streams, parse_concepts
    from pipeline.generate import GenerationError
    from pipeline.trace_writer import write_trace
    from store import Store

    model = models["flux"]
    assert parse_concepts(" cat, sky,,cat , tree") == ["cat", "sky", "tree"]
    plain = _call(model, true_cfg=2.5)
    recorder = _recorder(model, true_cfg=2.5)
    recorder.concepts = concept_streams(model.pipe, ["hippopotamus", "sofa", "sky"])
    with dit_capture(model.pipe, recorder):
        traced = _call(model, true_cfg=2.5)
    assert torch.equal(plain, traced)
    maps = recorder.concepts.steps
    assert len(maps) == 2 and maps[0].shape == (3, 16, 16)
    assert np.allclose(maps[0].sum(axis=0), 1.0, atol=1e-5) and not np.allclose(maps[0][0], maps[0][1])
    trace = generate_trace(model, GenerationConfig(prompt=PROMPT, steps=2, concepts=["hippopotamus", "sky"]))
    assert trace.concepts == ["hippopotamus", "sky"] and trace.concept_blocks == 1
    write_trace(tmp_path, trace)
    names, stored = Store(tmp_path).concept_maps(trace.run["run_id"])
    assert names == ["hippopotamus", "sky"]
    assert np.allclose(stored, np.mean(trace.concept_maps, axis=0), atol=1e-6)
    _, step1 = Store(tmp_path).concept_maps(trace.run["run_id"], step=1)
    assert np.allclose(step1, trace.concept_maps[1])
    with pytest.raises(GenerationError, match="need a FLUX.1 model"):
        generate_trace(models["sd3"], GenerationConfig(prompt=PROMPT, steps=1, concepts=["cat"]))


@pytest.mark.slow
def test_cli_generates_flux_with_concepts_and_true_cfg(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    from store import Store

    stepx = [sys.executable, "-m", "stepx.cli"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    root = str(tmp_path / "store")
    args = [
        "generate",
        "--store",
        root,
        "--model",
        "tiny-flux",
        "--steps",
        "2",
        "--negative",
        "blurry",
        "--true-cfg",
        "2",
        "--concepts",
        "cat, sky",
        "a cat under the sky",
    ]
    done = subprocess.run(stepx + args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip().splitlines()[-1]
    names, maps = Store(root).concept_maps(run_id)
    assert names == ["cat", "sky"] and np.allclose(maps.sum(axis=0), 1, atol=1e-5)
    assert '"true_cfg": 2.0' in Store(root).run(run_id)["config_json"]
    refused = subprocess.run(
        stepx + ["generate", "--store", root, "--model", "tiny-sd3", "--concepts", "cat", "a cat"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert "needs a FLUX.1 model" in refused.stderr
    assert not Path(root, "runs").exists() or len(list(Path(root, "runs").iterdir())) == 1


def test_real_geometry_tiny_builds_have_the_real_token_grid() -> None:
    """bench/dit_gpu.py's pipelines: 1024 px is 64x64 image tokens, as in SD3 and FLUX.1 (8x VAE, 2x2 patches)."""
    from pipeline.tiny_dit import build_tiny_dit

    for layout in ("sd3", "flux"):
        pipe = build_tiny_dit(layout, real_geometry=True)
        assert pipe.vae_scale_factor == 8 and token_grid(pipe, 1024, 1024) == (64, 64)


def test_committed_t5_tokenizer_is_the_one_the_builder_writes(tmp_path) -> None:
    from pipeline.tiny_dit import T5_DIR, t5_tokenizer, write_t5_tokenizer

    write_t5_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (T5_DIR / "tokenizer.json").read_bytes()
    tok = t5_tokenizer()
    pieces = tok.convert_ids_to_tokens(tok("a photo of a hippopotamus").input_ids)
    assert pieces[:3] == ["▁a", "▁photo", "▁of"] and pieces[-1] == "</s>" and "<unk>" not in pieces
