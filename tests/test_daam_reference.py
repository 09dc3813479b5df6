"""Stored word maps against a second, deliberately plain DAAM written here (Tang et al. 2023).

`PlainDaam` shares no code with `pipeline/capture.py` or `schema/maps.py`: forward hooks on each
cross-attention module's `to_q` / `to_k` keep the projected queries and keys, and a hook on the module
turns them into softmax(Q K^T * scale) per head for the conditional prompt. Its maps are DAAM's: every
(layer, head) map of the down and up blocks upsampled with torch's bicubic interpolation to the latent
grid, clamped at 0, averaged over (layer, head); a word averages its tokens; steps are summed.
The stored maps go through the product's path: generate_trace -> write_trace -> Store.word_map.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cross_rows import stored_daam
from pipeline.generate import GenerationConfig, generate_trace
from pipeline.models import REGISTRY, LoadedModel, load_model, module_fingerprint
from pipeline.tiny import build_tiny_pipeline
from pipeline.trace_writer import write_trace
from store import Store

MIN_R = 0.999999  # Pearson r per word of the step-summed maps, stored vs reference (README's figure)
# per-step maps: max |stored - reference| / max(reference): the uint16 codes (schema.codec, <= 0.5/65535 = 7.6e-6
# of each token map's max) plus computation (8.6e-7 when maps were float32); measured <= 7.9e-6
MAX_REL_ERR = 1e-5
MIN_R_PACKAGE = 0.9997  # the `daam` package's variant (clamp after summing steps), shapes model (README)


class PlainDaam:
    """Hooks a UNet's attn2 modules and keeps every step's per-(layer, head) attention probabilities."""

    def __init__(self, unet: torch.nn.Module, cfg: bool) -> None:
        self.cfg = cfg
        self.probs: list[dict[str, torch.Tensor]] = []  # per UNet call: layer -> (heads, queries, keys)
        self._q: dict[str, torch.Tensor] = {}
        self._k: dict[str, torch.Tensor] = {}
        self._handles = [unet.register_forward_pre_hook(lambda *_: self.probs.append({}))]
        for name, module in unet.named_modules():
            if name.endswith("attn2") and not name.startswith("mid_block"):  # DAAM leaves the mid block out
                self._handles.append(module.to_q.register_forward_hook(self._keep(self._q, name)))
                self._handles.append(module.to_k.register_forward_hook(self._keep(self._k, name)))
                self._handles.append(module.register_forward_hook(self._softmax(name)))

    @staticmethod
    def _keep(store: dict, name: str):
        def hook(_module, _inputs, output):
            store[name] = output.detach().double()

        return hook

    def _softmax(self, name: str):
        def hook(module, _inputs, _output):
            q, k = self._q.pop(name), self._k.pop(name)
            row = q.shape[0] - 1 if self.cfg else 0  # batch is [unconditional, conditional] with guidance
            q = q[row].reshape(q.shape[1], module.heads, -1).transpose(0, 1)  # (heads, queries, d)
            k = k[row].reshape(k.shape[1], module.heads, -1).transpose(0, 1)  # (heads, keys, d)
            self.probs[-1][name] = torch.softmax(q @ k.transpose(1, 2) * module.scale, dim=-1)

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def _maps(self, probs: torch.Tensor, latent: tuple[int, int]) -> torch.Tensor:
        """(heads, keys, H, W): one layer's head maps upsampled to the latent grid and clamped at 0."""
        heads, queries, keys = probs.shape
        h = round(math.sqrt(queries * latent[0] / latent[1]))
        maps = probs.permute(0, 2, 1).reshape(heads, keys, h, queries // h)
        return F.interpolate(maps, size=latent, mode="bicubic", align_corners=False).clamp(min=0)

    def step_map(self, step: int, latent: tuple[int, int]) -> torch.Tensor:
        """(keys, H, W) DAAM map of one step: mean over every (layer, head) of the clamped upsampled map."""
        return torch.cat([self._maps(p, latent) for p in self.probs[step].values()]).mean(dim=0)

    def summed_map(self, latent: tuple[int, int]) -> torch.Tensor:
        """(keys, H, W): the per-step maps summed over all steps (StepX's all-steps map)."""
        return sum(self.step_map(s, latent) for s in range(len(self.probs)))

    def package_map(self, latent: tuple[int, int]) -> torch.Tensor:
        """(keys, H, W) as the `daam` package sums: each (layer, head) summed over steps, then upsampled, clamped."""
        layers = self.probs[0].keys()
        return torch.cat([self._maps(sum(p[n] for p in self.probs), latent) for n in layers]).mean(dim=0)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _compare(model: LoadedModel, prompts: list[str], root, steps: int | None = None) -> dict[str, float]:
    """Generate, store and read each prompt; return min r per word and max relative per-step error."""
    store = Store(root)
    min_r, min_r_package, max_err, words = 1.0, 1.0, 0.0, 0
    for seed, prompt in enumerate(prompts):
        cfg = GenerationConfig(prompt, seed=seed, steps=steps)
        guided = cfg.resolved(model).guidance > 1
        reference = PlainDaam(model.pipe.unet, cfg=guided)
        try:
            trace = generate_trace(model, cfg)
        finally:
            reference.close()
        run_id = write_trace(root, trace).run_id
        latent = (trace.run["latent_height"], trace.run["latent_width"])
        assert len(reference.probs) == trace.run["steps"]
        summed, package = reference.summed_map(latent).numpy(), reference.package_map(latent).numpy()
        per_step = [reference.step_map(s, latent).numpy() for s in range(len(reference.probs))]
        for word in store.words(run_id):
            words += 1
            tokens = word.token_indices
            stored = store.word_map(run_id, word.word_index)
            min_r = min(min_r, _pearson(stored, summed[tokens].mean(axis=0)))
            min_r_package = min(min_r_package, _pearson(stored, package[tokens].mean(axis=0)))
            for s, ref in enumerate(per_step):
                expected = ref[tokens].mean(axis=0)
                got = store.word_map(run_id, word.word_index, step=s)
                max_err = max(max_err, float(np.abs(got - expected).max() / expected.max()))
    result = {"words": words, "min_r": min_r, "max_rel_err": max_err, "min_r_package": min_r_package}
    print(f"DAAM reference, {model.spec.name}: {result}")
    return result


PROMPTS = [
    "a red circle on the left and a blue square",
    "a small green triangle at the top",
    "two yellow squares at the bottom right",
]


@pytest.mark.slow
def test_stored_maps_match_plain_daam_on_tiny_random_pipeline(tmp_path):
    pipe = build_tiny_pipeline("sd21")  # SD 2.1's block layout: heads differ per level, mid block separate
    pipe.set_progress_bar_config(disable=True)
    model = LoadedModel(
        REGISTRY["tiny-random"], pipe, "in-process:sd21", module_fingerprint(pipe.unet), "cpu", "float32"
    )
    result = _compare(model, PROMPTS, tmp_path, steps=4)
    assert result["words"] >= 20
    assert result["min_r"] >= MIN_R
    assert result["max_rel_err"] <= MAX_REL_ERR


@pytest.mark.slow
def test_stored_maps_match_plain_daam_on_shapes_model(tmp_path):
    model = load_model("shapes", device="cpu")
    result = _compare(model, PROMPTS, tmp_path)
    assert result["words"] >= 20
    assert result["min_r"] >= MIN_R
    assert result["max_rel_err"] <= MAX_REL_ERR
    assert result["min_r_package"] >= MIN_R_PACKAGE


def test_tiny_layout_leaves_mid_block_out(tmp_path, tiny_model):
    """The tiny layout's mid block shares the 16x16 grid with the down/up layers; DAAM still leaves it out."""
    result = _compare(tiny_model, PROMPTS[:1], tmp_path, steps=3)
    assert result["min_r"] >= MIN_R and result["max_rel_err"] <= MAX_REL_ERR


def test_word_step_stats_all_follow_the_daam_map(traced_store):
    """word_step_stats level 'all' (and word_stats) describe the default word map, per step."""
    from store import GLOBAL

    root, traces = traced_store
    store, run_id = Store(root), traces[0].run["run_id"]
    rows = store.sql(
        f"SELECT step_index, mass, peak FROM word_step_stats WHERE run_id = '{run_id}' AND level = 'all' "
        "AND word_index = -1 ORDER BY step_index"
    ).rows
    assert len(rows) == traces[0].run["steps"]
    for step, mass, peak in rows:
        heat = store.word_map(run_id, GLOBAL, step=step)
        assert mass == pytest.approx(float(heat.mean()), rel=1e-5) and peak == pytest.approx(
            float(heat.max()), rel=1e-5
        )


PRE_DAAM_DROPPED = ("head_count", "daam_map", "daam_codes", "daam_scale")  # columns schema 1.2 and 1.8 added


def _downgrade(root, run_id: str, merge_mid: bool) -> None:
    """Rewrite a run's files as schema 1.1 wrote them: no DAAM rows or head counts, mid block labelled by grid
    (merged into the down/up level of its grid when `merge_mid`, layer counts summed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / "runs" / run_id
    old_meta = {b"stepx.schema_version": b"1.1"}
    cross = pq.read_table(folder / "cross_attention.parquet").to_pylist()
    rows, merged = [], {}
    for r in cross:
        if r["level"] == "all":
            continue
        grid = r["level"].removeprefix("mid-")
        key = (r["step_index"], r["token_index"], grid)
        m, n = np.asarray(r["map"], dtype=np.float32), r["layer_count"]
        if merge_mid and key in merged:  # layer-weighted mean of the two, as 1.1's capture averaged layers
            prev = merged[key]
            total = prev["layer_count"] + n
            prev["map"] = ((np.asarray(prev["map"]) * prev["layer_count"] + m * n) / total).tolist()
            prev["layer_count"] = total
            continue
        r = {k: v for k, v in r.items() if k not in PRE_DAAM_DROPPED} | {"level": grid}
        merged[key] = r
        rows.append(r)
    fields = [f for f in pq.read_schema(folder / "cross_attention.parquet") if f.name not in PRE_DAAM_DROPPED]
    pq.write_table(pa.Table.from_pylist(rows, pa.schema(fields, metadata=old_meta)), folder / "cross_attention.parquet")
    for name in ("word_step_stats", "runs"):
        table = pq.read_table(folder / f"{name}.parquet")
        if name == "runs":
            levels = list(dict.fromkeys(lv.removeprefix("mid-") for lv in table["levels"][0].as_py()))
            table = table.set_column(table.schema.get_field_index("levels"), "levels", pa.array([levels]))
        pq.write_table(table.replace_schema_metadata(old_meta), folder / f"{name}.parquet")


def test_rebuild_upgrades_runs_written_before_daam(tmp_path):
    """`stepx index rebuild` turns a 1.1 run's stored level maps into DAAM's weights (mid block out) and stats."""
    from pipeline.index import rebuild_index
    from store import GLOBAL, StoreError

    model = load_model("shapes", device="cpu")
    run_id = write_trace(tmp_path, generate_trace(model, GenerationConfig(PROMPTS[0], seed=0, steps=6))).run_id
    exact = {w.word_index: Store(tmp_path).word_map(run_id, w.word_index) for w in Store(tmp_path).words(run_id)}
    _downgrade(tmp_path, run_id, merge_mid=False)
    with pytest.raises(StoreError, match="schema 1.2"):
        Store(tmp_path).word_map(run_id, "circle")
    report = rebuild_index(tmp_path)
    assert report.upgraded == [run_id] and not report.not_upgraded
    store = Store(tmp_path)
    assert store.run(run_id)["levels"] == ["16x16", "8x8", "mid-4x4"]
    words = store.words(run_id)
    r = min(_pearson(store.word_map(run_id, w.word_index), exact[w.word_index]) for w in words)
    print(f"rebuilt (clamp of the layers x heads mean) vs captured DAAM on the shapes model: min r {r:.5f}")
    assert r >= 0.99  # only DAAM's per-head clamp is missing from the rebuild
    rows = store.sql(
        "SELECT step_index, mass FROM word_step_stats WHERE level = 'all' AND word_index = -1 ORDER BY step_index"
    ).rows
    assert [m for _, m in rows] == pytest.approx(
        [float(store.word_map(run_id, GLOBAL, step=s).mean()) for s, _ in rows]
    )
    assert rebuild_index(tmp_path).upgraded == []  # already upgraded


def test_rebuild_refuses_runs_whose_mid_block_was_merged(tmp_path, tiny_model, monkeypatch):
    """The tiny layout's mid block shares the 16x16 grid: a 1.1 run merged it there, so DAAM can't be rebuilt."""
    from pipeline.index import rebuild_index
    from store import StoreError

    trace = generate_trace(tiny_model, GenerationConfig(PROMPTS[1], seed=1, steps=2))
    run_id = write_trace(tmp_path, trace).run_id
    _downgrade(tmp_path, run_id, merge_mid=True)
    report = rebuild_index(tmp_path)
    assert report.upgraded == [] and "mid block was stored merged into the 16x16 level" in report.not_upgraded[run_id]
    with pytest.raises(StoreError, match="schema 1.2"):
        Store(tmp_path).word_map(run_id, "triangle")
    assert Store(tmp_path).word_map(run_id, "triangle", aggregation="equal_levels").shape == (32, 32)
    # a run whose model is not on this machine: its layers and heads per level are unknown
    import pyarrow as pa
    import pyarrow.parquet as pq

    runs_file = tmp_path / "runs" / run_id / "runs.parquet"
    runs = pq.read_table(runs_file)
    for column, value in (("model_name", "sd15"), ("model_id", "stable-diffusion-v1-5/stable-diffusion-v1-5@0123")):
        runs = runs.set_column(runs.schema.get_field_index(column), column, pa.array([value]))
    pq.write_table(runs, runs_file)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    why = rebuild_index(tmp_path).not_upgraded[run_id]
    assert "its model 'sd15' (stable-diffusion-v1-5/stable-diffusion-v1-5@0123) is not on this machine" in why


def test_store_offers_the_non_daam_aggregations_by_name(traced_store):
    """Mid block included, equal levels, chosen levels: rebuilt from the stored level maps, never the default."""
    from store import StoreError

    root, traces = traced_store
    store, trace = Store(root), traces[0]
    run_id, rec = trace.run["run_id"], trace.steps[1]
    circle = [i for i, t in enumerate(t for t in trace.tokens if t.has_map) if t.word == "circle"]
    assert store.level_counts(run_id) == {"32x32": 3 * 8, "16x16": 3 * 8, "mid-16x16": 1 * 8}
    level = {k: rec.cross[k][circle].mean(axis=0).astype(np.float16).astype(np.float32) for k in rec.cross}
    up = {k: F.interpolate(torch.tensor(m)[None, None], size=(32, 32), mode="bicubic")[0, 0] for k, m in level.items()}
    with_mid = (24 * up[(32, 32)] + 24 * up[(16, 16)] + 8 * up[(16, 16, "mid")]) / 56
    got = store.word_map(run_id, "circle", step=1, aggregation="daam_with_mid")
    np.testing.assert_allclose(got, with_mid.clamp(min=0).numpy(), atol=1e-6)
    equal = (up[(32, 32)] + up[(16, 16)] + up[(16, 16, "mid")]) / 3
    got = store.word_map(run_id, "circle", step=1, aggregation="equal_levels")
    np.testing.assert_allclose(got, equal.clamp(min=0).numpy(), atol=1e-6)
    got = store.word_map(run_id, "circle", step=1, levels=["mid-16x16"])
    np.testing.assert_allclose(got, up[(16, 16, "mid")].clamp(min=0).numpy(), atol=1e-6)
    assert not np.allclose(store.word_map(run_id, "circle", step=1), with_mid.clamp(min=0).numpy(), atol=1e-6)
    with pytest.raises(StoreError, match="choose from daam"):
        store.word_map(run_id, "circle", aggregation="mean")
    with pytest.raises(StoreError, match="no maps for levels 8x8; its levels: 32x32, 16x16, mid-16x16"):
        store.word_map(run_id, "circle", levels=["8x8"])
    tokens, maps = store.token_maps(run_id)
    assert maps.shape == (trace.run["steps"], len(tokens), 32, 32)
    np.testing.assert_array_equal(maps[1], stored_daam(trace.steps[1].daam))  # the capture's map, uint16 round trip
