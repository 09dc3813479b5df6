"""The `stepx` console script, run as a user would: real processes, real store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parent.parent


def stepx(*args: str, store: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if store is not None:
        env["STEPX_STORE"] = str(store)
    return subprocess.run(
        [sys.executable, "-m", "stepx.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["generate", ""], "prompt is empty"),
        (["generate", "   "], "prompt is empty"),
        (["generate", "a cat", "--model", "nope"], "unknown model 'nope'"),
        (["generate", "a cat", "--width", "100"], "multiple of 8"),
        (["generate", "a cat", "--height", "-8"], "between 8 and 4096"),
        (["generate", "a cat", "--steps", "0"], "between 1 and 1000"),
        (["generate", "a cat", "--steps", "-3"], "between 1 and 1000"),
        (["generate", "a cat", "--model", "shapes", "--width", "2048"], "between 32 and 128 px for the shapes model"),
        (["generate", "a cat", "--model", "tiny-random", "--steps", "1000"], "at most 999 for this model's DDIM"),
        (["generate", "a cat", "--model", "tiny-random", "--device", "cuda"], "--device cuda"),
        (["sql", "SELECT 1", "--max-rows", "1e20"], "whole number"),
        (["sql", "SELECT 1", "--timeout", "nan"], "finite number between"),
        (["runs", "--store", "/etc/passwd"], "is a file, not a store folder"),
        (["annotate", "--run", "x", "--out", "/"], "is a folder"),
        (["gallery", "build", "--spec", "/etc/passwd"], "is not JSON"),
        (["generate", "a cat", "--steps", "many"], "whole number"),
        (["generate", "a cat", "--guidance", "nan"], "between 0 and 50"),
        (["generate", "a cat", "--seed", "-1"], "between 0 and 4294967295"),
        (["generate", "a\x07cat", "--model", "tiny-random"], "control characters"),
        (["generate", "a cat", "--model", "sd15"], "not found in the Hugging Face cache"),
        (["generate", "a cat", "--model-path", "/nonexistent"], "no diffusers pipeline"),
        (["show", "no-such-run"], "no run 'no-such-run'"),
        (["sql", "DROP VIEW runs"], "only SELECT"),
        (["sql", "SELECT * FROM read_text('/etc/hostname')"], "refused"),
        (["index"], "required: action"),
        (["index", "drop"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_one_clear_line(tmp_path, args, needle):
    res = stepx(*args, store=tmp_path)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert needle in lines[0]


def test_generate_then_read_back(tmp_path):
    res = stepx(
        "generate",
        "a red circle on the left",
        "--model",
        "tiny-random",
        "--steps",
        "3",
        "--seed",
        "4",
        "--store",
        str(tmp_path),
    )
    assert res.returncode == 0, res.stderr
    run_id = res.stdout.strip()
    assert (tmp_path / "runs" / run_id / "cross_attention.parquet").is_file()
    assert "3/3" in res.stderr  # the tqdm bar's last state
    listing = stepx("runs", store=tmp_path)
    assert run_id in listing.stdout and "a red circle on the left" in listing.stdout
    show = stepx("show", run_id, store=tmp_path)
    assert "tiny-random" in show.stdout and "2:circle" in show.stdout
    q = stepx(
        "sql",
        "SELECT word, count(*) AS n FROM word_step_stats WHERE level='all' GROUP BY word ORDER BY word",
        "--format",
        "json",
        store=tmp_path,
    )
    rows = json.loads(q.stdout)
    assert {"word": "circle", "n": 3} in rows
    csv_out = stepx("sql", "SELECT seed FROM runs", "--format", "csv", store=tmp_path)
    assert csv_out.stdout.split() == ["seed", "4"]
    rebuilt = stepx("index", "rebuild", store=tmp_path)
    assert rebuilt.returncode == 0 and "indexed 1 runs" in rebuilt.stdout


def test_models_lists_registry():
    res = stepx("models")
    assert res.returncode == 0
    for name in ("sd15", "sd21-base", "sdxl", "shapes", "tiny-random"):
        assert name in res.stdout


def test_limits_table_is_consistent_with_the_registry():
    """Each limit is well-formed, each model's bounds sit inside the global ones, and every registered
    model's own defaults pass the table (so a plain `stepx generate --model NAME` is never refused)."""
    from pipeline.models import REGISTRY
    from schema.limits import LIMITS, MODEL_LIMITS, LimitError, check_generation, limit_for

    for lim in LIMITS.values():
        assert lim.help and lim.min <= lim.max
        assert lim.default is None or lim.min <= lim.default <= lim.max
    assert set(MODEL_LIMITS) <= set(REGISTRY)
    for model, bounds in MODEL_LIMITS.items():
        for name, (lo, hi) in bounds.items():
            assert LIMITS[name].min <= lo <= hi <= LIMITS[name].max, (model, name)
    for spec in REGISTRY.values():
        check_generation(spec.name, spec.steps, spec.size, spec.size, 0, spec.guidance)
        too_big = limit_for("width", spec.name).max + 8
        with pytest.raises(LimitError, match=f"width must be between .* got {too_big}"):
            check_generation(spec.name, width=too_big)


def test_run_from_before_stored_nouns_reads_and_says_not_available(tmp_path):
    """A run written with schema 1.1 (no noun columns) is rebuilt into the index with nulls, and TITAN says
    in one line that its nouns are not available instead of loading a tagger."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from jobs.synth import synth_store
    from store import Store

    synth_store(tmp_path, 1, steps=2, seed=3)
    run_id = Store(tmp_path).runs()[0]["run_id"]
    old = {b"stepx.schema_version": b"1.1"}
    folder = tmp_path / "runs" / run_id
    tokens = pq.read_table(folder / "tokens.parquet").drop_columns(["noun_lemma", "noun_plural"])
    pq.write_table(tokens.replace_schema_metadata(old), folder / "tokens.parquet")
    runs = pq.read_table(folder / "runs.parquet")
    runs = runs.set_column(
        runs.schema.get_field_index("schema_version"),
        "schema_version",
        pc.cast(pa.array(["1.1"]), runs.schema.field("schema_version").type),
    )
    pq.write_table(runs.replace_schema_metadata(old), folder / "runs.parquet")
    assert stepx("index", "rebuild", store=tmp_path).returncode == 0
    nouns = stepx(
        "sql", "SELECT count(*) AS n, count(noun_lemma) AS tagged FROM tokens", "--format", "json", store=tmp_path
    )
    assert json.loads(nouns.stdout) == [{"n": len(tokens), "tagged": 0}], nouns.stderr
    res = stepx("annotate", "--run", run_id, "--out", str(tmp_path / "c.json"), store=tmp_path)
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert "written before StepX stored object nouns" in res.stderr and not (tmp_path / "c.json").exists()
