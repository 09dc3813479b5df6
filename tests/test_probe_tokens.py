"""Probe-token optimisation (OVAM): the loss's map is the stored probe map (one DAAM aggregation), optimisation
lowers the loss, tokens files round-trip and refuse other weights, and a probe with an optimised token says so in
its stored table, in SQL and on the command line (a plain probe stays available)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.generate import GenerationConfig, generate_trace
from pipeline.models import folder_fingerprint, load_model
from pipeline.probe import ENCODED, OPTIMISED, compute_probes, probe_embeds, word_positions
from pipeline.probe_tokens import (
    TOKENS_FILE,
    Example,
    ProbeTokens,
    ProbeTokensError,
    optimise_tokens,
    probe_heat,
    record_queries,
)
from pipeline.trace_writer import write_trace
from schema.layout import run_dir
from store import Store

ROOT = Path(__file__).resolve().parent.parent
STEPX = str(ROOT / ".venv" / "bin" / "stepx")
PROMPT = "a red circle on the left"
CFG = GenerationConfig(PROMPT, seed=3, steps=3, guidance=3.0)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny-random run in a fresh store, its recorded queries, and a 'dog' token fitted to the left half."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("store")
    model = load_model("tiny-random", device="cpu")
    trace = generate_trace(model, CFG)
    write_trace(root, trace)
    queries = record_queries(model, CFG)
    mask = np.zeros(queries.latent, dtype=np.float32)
    mask[:, : queries.latent[1] // 2] = 1  # "the dog is on the left"
    example = Example(queries, {"dog": mask}, "left half")
    assert not optimise_tokens(model, ["dog"], [example], iterations=2, lr=0.1).vectors  # too few to check: plain
    tokens = optimise_tokens(model, ["dog"], [example], iterations=25, lr=0.1, check_every=1)
    path = tokens.save(tmp_path_factory.mktemp("tokens") / TOKENS_FILE)
    return root, model, trace, queries, tokens, path


def test_recorded_queries_are_the_untouched_generation(tuned):
    _root, _model, trace, queries, _tokens, _path = tuned
    assert np.array_equal(queries.image, np.asarray(trace.final))
    steps = {q.shape[0] for q in queries.queries.values()}
    assert steps == {3} and not any("mid_block" in name for name in queries.layers)  # DAAM leaves the mid block out


def test_loss_map_is_the_stored_probe_map(tuned):
    """The map the optimisation fits is, to float rounding, the map `compute_probes` stores (plain and optimised)."""
    _root, model, trace, queries, tokens, _path = tuned
    image = np.asarray(trace.final)
    for optimised, kind in ((None, ENCODED), (tokens.vectors, OPTIMISED)):
        result, _ = compute_probes(model, trace.run, image, ["dog"], optimised)
        assert result.embeddings == [kind]
        toks, embeds, kinds = probe_embeds(model.pipe, "cpu", ["dog"], optimised)
        assert kinds == [kind]
        keep = word_positions(toks[0])
        with torch.no_grad():
            heat = probe_heat(model.pipe.unet, queries, embeds[0][0], keep).numpy()
        stored = [t for t in result.tokens[0] if t.has_map]
        word = [j for j, t in enumerate(stored) if t.kind == "word"]
        np.testing.assert_allclose(heat, result.maps[0][:, word].mean(axis=1).sum(axis=0), rtol=1e-4, atol=1e-6)


def test_optimisation_lowers_the_loss_and_tokens_round_trip(tuned, tmp_path):
    _root, model, _trace, _queries, tokens, path = tuned
    record = tokens.meta["words"]["dog"]
    assert record["loss_after"] < 0.9 * record["loss_before"], record
    assert record["iterations"] == 25 and record["sources"] == ["left half"]
    loaded = ProbeTokens.load(path)
    assert loaded.meta == json.loads(json.dumps(tokens.meta))
    assert torch.equal(loaded.vectors["dog"], tokens.vectors["dog"].float())
    assert loaded.vectors["dog"].shape == (1, model.pipe.text_encoder.config.hidden_size)
    assert loaded.for_model(model)["dog"] is loaded.vectors["dog"]
    other = load_model("tiny-random", device="cpu", tiny_seed=1)
    with pytest.raises(ProbeTokensError, match="other weights"):
        loaded.for_model(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tokens file")
    with pytest.raises(ProbeTokensError, match="not a probe tokens file"):
        ProbeTokens.load(junk)


def test_tokens_file_is_left_out_of_the_model_fingerprint(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "model.safetensors").write_bytes(b"weights")
    before = folder_fingerprint(tmp_path)
    (tmp_path / TOKENS_FILE).write_bytes(b"tokens")
    assert folder_fingerprint(tmp_path) == before
    (tmp_path / "unet" / "model.safetensors").write_bytes(b"other weights")
    assert folder_fingerprint(tmp_path) != before


def _sql(root: Path, query: str) -> list[dict]:
    out = subprocess.run(
        [STEPX, "sql", query, "--store", str(root), "--format", "json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_cli_probe_with_an_optimised_token_is_marked_in_table_sql_and_output(tuned, tmp_path):
    root, _model, trace, _queries, _tokens, path = tuned
    run_id = trace.run["run_id"]
    cmd = [STEPX, "probe", run_id, "--words", "dog, sky", "--store", str(root)]
    out = subprocess.run([*cmd, "--tokens", str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("dog (optimised token): centroid") and lines[1].startswith("sky: centroid"), lines
    table = pq.read_table(run_dir(root, run_id) / "probe_maps.parquet")
    kinds = {(p, e) for p, e in zip(table["probe"].to_pylist(), table["probe_embedding"].to_pylist(), strict=True)}
    assert kinds == {("dog", OPTIMISED), ("sky", ENCODED)}
    rows = _sql(root, "SELECT DISTINCT probe, probe_embedding FROM probe_maps ORDER BY probe")
    assert rows == [{"probe": "dog", "probe_embedding": "optimised"}, {"probe": "sky", "probe_embedding": "encoded"}]
    optimised_map = Store(root).probe_map(run_id, "dog")
    assert Store(root).probe_embeddings(run_id) == {"dog": OPTIMISED, "sky": ENCODED}
    inspect_shows_optimised(root, run_id)

    plain = subprocess.run([*cmd, "--plain"], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines()[0].startswith("dog: centroid"), plain.stdout
    rows = _sql(root, "SELECT DISTINCT probe, probe_embedding FROM probe_maps ORDER BY probe")
    assert rows == [{"probe": "dog", "probe_embedding": "encoded"}, {"probe": "sky", "probe_embedding": "encoded"}]
    assert not np.allclose(Store(root).probe_map(run_id, "dog"), optimised_map)

    both = subprocess.run([*cmd, "--plain", "--tokens", str(path)], capture_output=True, text=True)
    missing = subprocess.run([*cmd, "--tokens", str(tmp_path / "none.safetensors")], capture_output=True, text=True)
    other = ProbeTokens.load(path)
    other.meta["model_fingerprint"] = "0" * 16
    stale = subprocess.run(
        [*cmd, "--tokens", str(other.save(tmp_path / "other.safetensors"))], capture_output=True, text=True
    )
    for bad, says in ((both, "--plain"), (missing, "no such file"), (stale, "other weights")):
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and says in bad.stderr, bad.stderr


def inspect_shows_optimised(root: Path, run_id: str) -> None:
    """Inspect's probe picker says which probe is a fitted token (the map's caption uses the same label)."""
    from streamlit.testing.v1 import AppTest

    os.environ["STEPX_STORE"] = str(root)
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py"), default_timeout=120)
    at.run()
    at.session_state["run_id"] = run_id
    at.switch_page("views/inspect.py").run()
    picker = at.selectbox(key="inspect_probe")
    assert not at.exception and "dog (optimised token)" in picker.options and "sky" in picker.options
    picker.select("dog").run()
    assert not at.exception and picker.value == "dog"


def test_probe_file_without_the_embedding_column_still_reads(tuned, tmp_path):
    """A probe file written before schema 1.7 has no probe_embedding column: it reads, as null."""
    import shutil

    from jobs.probe import probe_run
    from schema.tables import conform

    root, _model, trace, _queries, _tokens, _path = tuned
    run_id = trace.run["run_id"]
    outcome = probe_run(root, run_id, ["cat"])  # the Inspect queue's path; tiny-random has no tokens file
    assert outcome.embeddings == {"cat": ENCODED} and outcome.notes == []
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    file = run_dir(copy, run_id) / "probe_maps.parquet"
    old = pq.read_table(file)
    old = old.drop_columns(["probe_embedding"]).replace_schema_metadata({b"stepx.schema_version": b"1.6"})
    pq.write_table(old, file)
    assert "cat" in Store(copy).probes(run_id)
    assert Store(copy).probe_map(run_id, "cat").shape == tuple(trace.run[k] for k in ("latent_height", "latent_width"))
    assert set(conform("probe_maps", pq.read_table(file))["probe_embedding"].to_pylist()) == {None}
    again = probe_run(copy, run_id, ["sky"])  # probing again merges with the older file instead of failing
    assert again.embeddings == {"sky": ENCODED} and {"cat", "sky"} <= set(Store(copy).probes(run_id))
    assert conform("probe_maps", pq.read_table(file))["probe_embedding"].to_pylist().count(None) > 0


@pytest.mark.parametrize(
    "vector",
    [torch.tensor(1.0), torch.zeros(1, 7), torch.full((1, 32), float("nan")), torch.ones(1, 32, dtype=torch.int32)],
    ids=["0-d", "wrong-width", "nan", "integer"],
)
def test_hostile_token_vectors_are_refused_in_one_line(tuned, vector):
    """A tokens file with the model's fingerprint but a vector that isn't (word pieces, hidden) finite floats."""
    _root, model, _trace, _queries, tokens, _path = tuned
    forged = ProbeTokens({"dog": vector}, dict(tokens.meta))
    with pytest.raises(ProbeTokensError, match="expected finite floats"):
        forged.for_model(model)


def test_tokens_from_stored_runs_and_masks(tuned):
    """The general path: any stored UNet run plus a mask per word (any size) is an example to fit a token on."""
    from jobs.probe import annotated_runs

    root, model, trace, queries, _tokens, _path = tuned
    height, width = trace.run["height"], trace.run["width"]
    mask = np.zeros((height, width), dtype=bool)
    mask[:, : width // 2] = True
    (example,) = annotated_runs(root, {trace.run["run_id"]: {"dog": mask}})
    assert example.source == f"run {trace.run['run_id']}" and example.queries.latent == queries.latent
    assert all(torch.equal(example.queries.queries[n], q) for n, q in queries.queries.items())
    expected = np.zeros(queries.latent, dtype=np.float32)
    expected[:, : queries.latent[1] // 2] = 1
    np.testing.assert_allclose(example.masks["dog"], expected, atol=1e-6)
    fitted = optimise_tokens(model, ["dog"], [example], iterations=10, lr=0.1, check_every=1)
    assert fitted.meta["words"]["dog"]["loss_after"] < fitted.meta["words"]["dog"]["loss_before"]


def test_probe_run_uses_the_model_folders_tokens_and_skips_stale_ones(tuned, tmp_path, monkeypatch):
    """Probes (the CLI's and Inspect's queued ones) take the model folder's tokens file unless asked for plain;
    a file fitted to other weights is skipped with a note."""
    import jobs.probe
    from jobs.probe import probe_run

    root, _model, trace, _queries, tokens, _path = tuned
    run_id = trace.run["run_id"]
    monkeypatch.setattr(jobs.probe, "locate", lambda _spec, _path=None: tmp_path)  # tiny-random has no folder
    tokens.save(tmp_path / TOKENS_FILE)
    assert probe_run(root, run_id, ["dog", "sky"]).embeddings == {"dog": OPTIMISED, "sky": ENCODED}
    assert probe_run(root, run_id, ["dog"], plain=True).embeddings == {"dog": ENCODED}
    stale = ProbeTokens(tokens.vectors, dict(tokens.meta, model_fingerprint="0" * 16))
    stale.save(tmp_path / TOKENS_FILE)
    outcome = probe_run(root, run_id, ["dog"])
    assert outcome.embeddings == {"dog": ENCODED}
    assert len(outcome.notes) == 1 and "not used" in outcome.notes[0] and "other weights" in outcome.notes[0]


def test_a_token_is_kept_only_if_it_beats_the_plain_word_on_held_out_examples(tuned):
    """Every 4th example of a word is held out: a token fitted on the others must put the map's centroid on the
    held-out masks more often than the plain word does, or the word stays plain."""
    from pipeline.probe_tokens import centroid_on

    _root, model, _trace, queries, _tokens, _path = tuned
    half = np.zeros(queries.latent, dtype=np.float32)
    half[:, : queries.latent[1] // 2] = 1
    away = {}  # per word, the half its plain map's centroid is not on
    for word in ("dog", "sky"):
        toks, embeds, _ = probe_embeds(model.pipe, "cpu", [word])
        with torch.no_grad():
            plain = probe_heat(model.pipe.unet, queries, embeds[0][0], word_positions(toks[0]))
        away[word] = half if not centroid_on(plain, half) else 1 - half
    fit = [Example(queries, dict(away), f"fit {i}") for i in range(3)]
    held = Example(queries, {"dog": away["dog"], "sky": 1 - away["sky"]}, "held out")  # sky: the plain map's half
    tokens = optimise_tokens(model, ["dog", "sky"], [*fit, held], iterations=25, lr=0.1)
    dog, sky = tokens.meta["words"]["dog"], tokens.meta["words"]["sky"]
    assert dog["kept"] and dog["check_examples"] == 1 and (dog["check_plain"], dog["check_optimised"]) == (0, 1)
    assert dog["examples"] == 4 and "dog" in tokens.vectors  # kept: fitted again on all four
    assert not sky["kept"] and sky["check_plain"] == 1 and "sky" not in tokens.vectors
