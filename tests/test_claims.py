"""README promises that had no test of their own, checked where they can break.

Each test reads the README's own sentence and compares it with the thing it describes: the CLI's real parsers
(every command and flag the README shows), the Makefile, the recorded evaluation (`bench/eval.json`), the SQL
limits the engine is given, the hostile battery the security tests run, the embedded model's folder on disk,
and, at run time, the trainer never touching the test split. The audit behind them is `/work/helpers/claims.md`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FLAT = " ".join(README.split())  # sentences wrap at any space


def _section(title: str) -> str:
    """One `## title` section of the README, whitespace collapsed."""
    return " ".join(README.split(f"## {title}", 1)[1].split("\n## ", 1)[0].split())


def _help(argv: list[str]) -> str:
    """The --help text of one `stepx` command, from the parser the CLI really runs."""
    from stepx.cli import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        if argv[0] == "train-shapes":
            from shapes.train import parse_args

            parse_args(["--help"])
        else:
            build_parser().parse_args([*argv, "--help"])
    return out.getvalue()


def _readme_invocations() -> list[tuple[str, set[str]]]:
    """(command, flags) for every `stepx COMMAND ...` the README shows, in code blocks and inline code."""
    found: list[tuple[str, set[str]]] = []
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README, re.S)
    for block in blocks:
        current: tuple[str, set[str]] | None = None
        for line in block.splitlines():
            code = line.split("#", 1)[0]
            start = re.match(r"\s*stepx ([a-z][a-z-]*)", code)
            if start:
                current = (start.group(1), set())
                found.append(current)
            elif not (current and line.startswith(" ")):
                current = None
            if current:
                current[1].update(re.findall(r"(--[a-z][a-z-]*)", code))
    inline = re.sub(r"```.*?```", "", README, flags=re.S)
    indented = re.findall(r"^ {4}(stepx [^\n]+)", inline, re.M)  # a Markdown code block by indentation
    for span in re.findall(r"`(stepx [^`]+)`", inline) + indented:
        command = re.match(r"stepx ([a-z][a-z-]*)", span)
        if command:
            found.append((command.group(1), set(re.findall(r"(--[a-z][a-z-]*)", span))))
    return found


def test_every_command_and_flag_the_readme_shows_exists():
    """A command or flag the README shows that the CLI doesn't take would send a user into a usage error."""
    from stepx.cli import COMMANDS

    invocations = _readme_invocations()
    assert len(invocations) > 20, "the README's commands were not found"
    helps: dict[str, str] = {}
    for command, flags in invocations:
        assert command in COMMANDS or command == "train-shapes", f"README shows `stepx {command}`: no such command"
        text = helps.setdefault(command, _help([command]))
        for flag in flags:
            assert re.search(rf"{re.escape(flag)}(?![a-z-])", text), f"README shows `stepx {command} {flag}`"


def test_make_targets_and_module_commands_the_readme_shows_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    shown = set(re.findall(r"`make ([a-z][a-z-]*)`", README)) | set(re.findall(r"^make ([a-z][a-z-]*)", README, re.M))
    assert shown >= {"demo", "test", "bench", "lint", "model"}
    assert shown <= targets, f"README names make targets the Makefile lacks: {shown - targets}"
    for module in set(re.findall(r"python -m ([a-z_.]+)", README)):
        assert importlib.util.find_spec(module), f"README runs `python -m {module}`: no such module"


def _close(shown: str, value: float, pct: bool) -> bool:
    """Whether a figure as the README prints it (in percent when `pct`) is the value rounded."""
    number = float(shown.rstrip("%"))
    decimals = len(shown.rstrip("%").partition(".")[2])
    return abs(number - (value * 100 if pct else value)) <= 0.5 * 10**-decimals + 1e-9


def test_readme_evaluation_figures_are_the_recorded_evaluation():
    """Every number of the README's test-split table and detection sentence is bench/eval.json's, rounded."""
    ev = json.loads((ROOT / "bench" / "eval.json").read_text())
    text = _section("The embedded model")
    assert ev["split"] == "test"
    assert f"--split test --seeds {ev['seeds']} --n {ev['scenes']}" in text
    head = f"({ev['scenes']} scenes x {ev['seeds']} seeds = {ev['images']['clean']['n']} images, "
    assert head + f"{ev['objects']['correct']['n']} objects, {ev['steps']} steps" in text
    assert f"default guidance {ev['guidance']}" in text

    def interval(m: dict) -> list[float]:
        return [m["value"], m["low"], m["high"]]

    iou, det, obj = ev["word_iou"], ev["detection"], ev["objects"]
    num = r"([\d.]+%?)"
    rows = [
        (rf"right region\) \| {num} \({num}-{num}\)", interval(obj["correct"])),
        (
            rf"right shape \| {num} \({num}-{num}\); {num} / {num} / {num} in",
            [*interval(obj["shape"])] + [obj[f"shape_{k}"]["value"] for k in (1, 2, 3)],
        ),
        (rf"no unrequested object\) \| {num} \({num}-{num}\)", interval(ev["images"]["clean"])),
        (
            rf"as drawn \(0.4 of max\) \| {num} \({num}-{num}\); uniform map {num}",
            [*interval(iou["shape noun"]["drawn_daam"]), iou["shape noun"]["drawn_uniform"]["value"]],
        ),
        (rf"Otsu's threshold \| {num} \({num}-{num}\)", interval(iou["shape noun"]["drawn_otsu"])),
        (rf"intended layout \(0.4 of max\) \| {num} \({num}-{num}\)", interval(iou["shape noun"]["layout_daam"])),
        (
            rf"vs drawn \(0.4 of max\) \| {num} \({num}-{num}\) / {num} \({num}-{num}\)",
            interval(iou["colour adjective"]["drawn_daam"]) + interval(iou["position word"]["drawn_daam"]),
        ),
        (
            rf"DAAM alone {num} \({num}-{num}\) mask IoU against the drawn object and {num} regions",
            [*interval(det["DAAM alone"]["drawn_mask_iou"]), det["DAAM alone"]["regions"]["value"]],
        ),
        (
            rf"DAAM \+ self-attention {num} \({num}-{num}\) and {num} regions",
            [
                *interval(det["DAAM + self-attention"]["drawn_mask_iou"]),
                det["DAAM + self-attention"]["regions"]["value"],
            ],
        ),
    ]
    for pattern, values in rows:
        found = re.search(pattern, text)
        assert found, f"README's evaluation sentence not found: {pattern}"
        pct = any(g.endswith("%") for g in found.groups())  # "100% (100-100%)": one unit for the row
        for shown, value in zip(found.groups(), values, strict=True):
            assert _close(shown, value, pct), f"README says {shown}, bench/eval.json {value} ({pattern})"


def test_readme_sql_limits_are_the_settings_the_engine_gets():
    """The limits table's defaults, flags and the process headroom are the ones store/sql.py applies."""
    from dashboard.views.sql import MAX_ROWS
    from schema.limits import LIMITS
    from store.sql import OVERHEAD_MB

    text = _section("Security model")
    timeout, memory, rows = LIMITS["timeout_s"], LIMITS["memory_limit_mb"], LIMITS["max_rows"]
    assert f"| `timeout_s` | {timeout.default:g} s | `--timeout` |" in text
    assert f"ran longer than {timeout.default:g} s" in text
    assert f"| `memory_limit_mb` | {memory.default} | `--memory-limit-mb` |" in text
    assert f"this + {OVERHEAD_MB} MB" in text and f"needed more than {memory.default:,} MB" in text
    assert f"| `max_rows` | {rows.default} (dashboard: {MAX_ROWS}) | `--max-rows` |" in text
    sql_help = _help(["sql"])
    for flag in ("--timeout", "--memory-limit-mb", "--max-rows"):
        assert flag in sql_help


def test_readme_hostile_battery_size_is_the_battery_the_tests_run():
    from tests.test_sql import BATTERY, CLASSES

    found = re.search(r"A battery of ([\d,]+) hostile statements in (\d+) classes", _section("Security model"))
    assert found, "the Security model section no longer says how large the battery is"
    assert int(found.group(1).replace(",", "")) == len(BATTERY)
    assert int(found.group(2)) == len(CLASSES)


def test_readme_embedded_model_size_is_the_folder_on_disk():
    found = re.search(r"`data/models/shapes` \((\d+) MB\)", FLAT)
    assert found
    folder = ROOT / "data" / "models" / "shapes"
    size_mb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
    assert abs(int(found.group(1)) - size_mb) < 1, f"README says {found.group(1)} MB, the folder holds {size_mb:.1f}"


@pytest.mark.slow
def test_training_never_reads_the_test_split(tmp_path, monkeypatch):
    """Training (its periodic evaluation and the export's guidance sweep) draws no test-split scene or seed.

    Every scene of a split comes from `_suite_scene` with the split's stream and every noise seed from
    `noise_seeds`, so recording both while a miniature recipe trains and exports catches any read of the test
    split however it is reached; the control at the end shows the recorder sees one.
    """
    import torch

    from shapes import sample, splits
    from shapes.train import Trainer
    from shapes.util import Logger
    from tests.test_train_shapes import MINI

    streams: list[int] = []
    seed_splits: list[str] = []
    scene, seeds = splits._suite_scene, splits.noise_seeds

    def recorded_scene(stream: int, *args: object) -> object:
        streams.append(stream)
        return scene(stream, *args)

    def recorded_seeds(split: str, *args: object) -> list[int]:
        seed_splits.append(split)
        return seeds(split, *args)

    monkeypatch.setattr(splits, "_suite_scene", recorded_scene)
    monkeypatch.setattr(splits, "noise_seeds", recorded_seeds)
    monkeypatch.setattr(splits, "_validation_keys", splits._validation_keys.__wrapped__)
    monkeypatch.setattr(sample, "SWEEP_GUIDANCE", (1.5, 3.0))
    monkeypatch.setattr(sample, "SWEEP_PROMPTS", 2)
    timing = {"seconds": 0.0, "runs": 0, "steps": 20, "threads": 1, "prompt": "p"}
    monkeypatch.setattr(sample, "time_generation", lambda *a, **k: timing)
    torch.manual_seed(0)

    work = tmp_path / "work"
    work.mkdir()
    trainer = Trainer(MINI, work, Logger(work / "log.txt"))
    assert trainer.run(minutes=5)
    sample.export(trainer, tmp_path / "model", Logger(work / "log.txt"), final_eval=True)

    assert streams and seed_splits, "training evaluated nothing: the check would be empty"
    assert set(streams) == {splits._VALIDATION_STREAM}
    assert set(seed_splits) == {"validation"}
    assert len(trainer.state.evals) == 1

    splits.suite("test", 1)  # the control: a read of the test split is seen
    assert splits._TEST_STREAM in streams


OFFLINE_PROBE = """
import socket, sys
tried = []
def refuse(*args, **kwargs):
    tried.append(args)
    sys.stderr.write("NETWORK " + repr(args[:2]) + "\\n")
    raise OSError("network blocked by the test")
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from stepx.cli import main
status = main(sys.argv[1:])
sys.exit(100 if tried else status)
"""


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_a_missing_model_is_never_downloaded(tmp_path, model):
    """StepX never downloads: with the hub's offline switch off and an empty cache, asking for a real model
    opens no connection (any attempt is caught at the socket) and says in one line where to put the weights."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "DIFFUSERS_"))}
    env |= {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    argv = ["generate", "a cat", "--model", model, "--steps", "2", "--store", str(tmp_path / "store")]
    res = subprocess.run(
        [sys.executable, "-c", OFFLINE_PROBE, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert "NETWORK" not in res.stderr, res.stderr[-2000:]
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])  # missing weights, not a bad argument
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("[transformers]")]
    assert len(lines) == 1 and "--model-path" in lines[0], res.stderr
    assert not (tmp_path / "store" / "runs").exists() or not any((tmp_path / "store" / "runs").iterdir())


def test_make_demo_starts_the_dashboard_before_the_gallery_build():
    """README: `make demo` starts the dashboard first, builds the gallery behind it, and runs a worker beside it.
    The order lives in the Makefile's recipe (what `make demo` runs), so that is where it is read."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*?\n((?:\t.*\n?)+)", makefile, re.M)
    assert recipe, "no demo target"
    body = recipe.group(1)
    dashboard, gallery, worker = (body.find(s) for s in ("streamlit run", "stepx gallery build", "stepx worker"))
    assert -1 < dashboard < gallery and worker > -1, body
    assert re.search(r"stepx gallery build[^\n]*&", body), "the gallery build must not block the dashboard"
    assert "--server.port $(PORT)" in body and re.search(r"^PORT \?= 8501", makefile, re.M)
    assert "http://localhost:8501" in _section("The dashboard")


def _column_bytes(path: Path) -> dict[str, int]:
    """Compressed bytes per column of one Parquet file, summed over its row groups."""
    import pyarrow.parquet as pq

    meta, out = pq.ParquetFile(path).metadata, {}
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(rg).column(c)
            name = col.path_in_schema.split(".")[0]
            out[name] = out.get(name, 0) + col.total_compressed_size
    return out


@pytest.mark.slow
def test_readme_trace_sizes_are_a_shapes_run_on_disk(tmp_path):
    """README's sizes of a shapes-model run, measured on the files the writer produces for that very run."""
    from pipeline.generate import GenerationConfig, generate_trace
    from pipeline.models import load_model
    from pipeline.trace_writer import write_trace

    found = re.search(
        r'a 20-step run of "([^"]+)" takes ([\d.]+) MB on disk: DAAM maps (\d+) KB, level maps (\d+) KB, '
        r"self-attention ([\d.]+) MB",
        FLAT,
    )
    assert found, "README's trace size sentence not found"
    prompt = found.group(1)
    total_mb, daam_kb, level_kb, self_mb = (float(g) for g in found.groups()[1:])
    written = write_trace(tmp_path, generate_trace(load_model("shapes"), GenerationConfig(prompt, seed=0, steps=20)))
    folder = next(p for p in tmp_path.rglob(written.run_id) if p.is_dir())
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    cross = _column_bytes(folder / "cross_attention.parquet")
    measured = {
        "run": (total / 1e6, total_mb),
        "DAAM maps": (sum(cross.get(c, 0) for c in ("daam_map", "daam_codes", "daam_scale")) / 1e3, daam_kb),
        "level maps": (cross["map"] / 1e3, level_kb),
        "self-attention": ((folder / "self_attention.parquet").stat().st_size / 1e6, self_mb),
    }
    for what, (got, said) in measured.items():
        assert abs(got - said) <= 0.1 * said, f"{what}: README says {said}, the run holds {got:.3g}"


def test_readme_model_table_is_the_registry():
    """Each registered model is a row of README's table, looked up under exactly the hub ids the loader tries."""
    from pipeline.models import REGISTRY

    rows = re.findall(r"^\| (`[^|]+`) \| [^|]+ \| ([^|]+) \|$", _section_raw("Real models"), re.M)
    table = {}
    for names, lookup in rows:
        for name in re.findall(r"`([^`]+)`", names):
            table[name] = re.findall(r"`([^`]+)`", lookup)
    assert set(table) == set(REGISTRY), f"README's model table vs the registry: {set(table) ^ set(REGISTRY)}"
    for name, spec in REGISTRY.items():
        if spec.repo_ids:
            assert table[name] == list(spec.repo_ids), name
        elif spec.builtin == "embedded":
            assert table[name] == ["data/models/shapes"], name
        else:
            assert table[name] == [], name  # built in-process


def _section_raw(title: str) -> str:
    """One `## title` section of the README as written (lines kept)."""
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


REBUILD_PROMPTS = [
    "a red circle on the left and a blue square",
    "a small green triangle at the top",
    "two yellow squares at the bottom right",
    "a blue circle on the right",
    "a red square in the middle and a green circle at the bottom",
]


@pytest.mark.slow
def test_rebuild_of_pre_daam_runs_is_as_close_as_the_readme_says(tmp_path):
    """README: upgrading pre-1.2 runs by `stepx index rebuild` gives r >= the stated figure per word against the
    exact (captured) DAAM map, per-step maps at most the stated share of the maximum apart, on 5 shapes prompts."""
    import numpy as np

    from pipeline.generate import GenerationConfig, generate_trace
    from pipeline.index import rebuild_index
    from pipeline.models import load_model
    from pipeline.trace_writer import write_trace
    from store import Store
    from tests.test_daam_reference import _downgrade, _pearson

    found = re.search(
        r"\((\d) prompts, (\d+) steps\) it gave r >= ([\d.]+) per word against the exact map \(per-step maps up to "
        r"(\d+)% of the maximum apart[;)]",
        FLAT,
    )
    assert found, "README's rebuild sentence not found"
    n_prompts, steps, min_r, max_apart = int(found[1]), int(found[2]), float(found[3]), float(found[4]) / 100
    assert n_prompts == len(REBUILD_PROMPTS)
    model = load_model("shapes", device="cpu")
    exact = {}
    for seed, prompt in enumerate(REBUILD_PROMPTS):
        run_id = write_trace(tmp_path, generate_trace(model, GenerationConfig(prompt, seed=seed, steps=steps))).run_id
        store = Store(tmp_path)
        exact[run_id] = {
            w.word_index: [store.word_map(run_id, w.word_index, step=s) for s in range(steps)]
            for w in store.words(run_id)
        }
        _downgrade(tmp_path, run_id, merge_mid=False)
    report = rebuild_index(tmp_path)
    assert sorted(report.upgraded) == sorted(exact)
    store, rs, apart = Store(tmp_path), [], []
    for run_id, words in exact.items():
        for word_index, per_step in words.items():
            rs.append(_pearson(store.word_map(run_id, word_index), np.sum(per_step, axis=0)))
            for s, want in enumerate(per_step):
                got = store.word_map(run_id, word_index, step=s)
                apart.append(float(np.abs(got - want).max() / want.max()))
    print(f"rebuild vs exact DAAM: min r {min(rs):.5f}, per-step max apart {max(apart):.3f}")
    assert min(rs) >= min_r
    assert max(apart) <= max_apart


def test_the_store_is_data_store_unless_store_or_stepx_store_says_otherwise(tmp_path, monkeypatch):
    """README: the store is the checkout's `data/store` unless --store or STEPX_STORE names one, and --store wins
    over the variable. Where real `stepx synth` processes write their runs shows the precedence; the default is
    read from the one function every command resolves its store with (running it would write the real store)."""
    import os
    import subprocess
    import sys

    from schema.layout import store_root

    def synth(*extra: str, env_store: Path) -> None:
        env = os.environ | {"STEPX_STORE": str(env_store), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "stepx.cli", "synth", "--runs", "1", "--steps", "2", *extra]
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr

    def runs(root: Path) -> int:
        return len([p for p in (root / "runs").iterdir() if p.is_dir()]) if (root / "runs").is_dir() else 0

    synth(env_store=tmp_path / "from-env")
    assert runs(tmp_path / "from-env") == 1
    synth("--store", str(tmp_path / "from-flag"), env_store=tmp_path / "from-env")
    assert runs(tmp_path / "from-flag") == 1 and runs(tmp_path / "from-env") == 1
    monkeypatch.delenv("STEPX_STORE", raising=False)
    assert store_root(None) == ROOT / "data" / "store"
    ignored = subprocess.run(["git", "check-ignore", "-q", "data/store/runs/x"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, "README: the store is ignored by git"


def test_synth_into_a_store_holding_its_runs_is_one_line_and_writes_nothing(tmp_path):
    """README: bad arguments exit with status 2 and one line. Synthetic run ids follow from --seed, so a second
    `stepx synth` with the same seed into the same store used to end on a bare 'FileExistsError:'."""
    import os
    import subprocess
    import sys

    from jobs.synth import synth_store

    synth_store(tmp_path, runs=2, steps=2)
    before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    cmd = [sys.executable, "-m", "stepx.cli", "synth", "--runs", "3", "--steps", "2", "--store", str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--seed 0" in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == before
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == [".lock"]  # no half-written run folder


def test_readme_lists_the_tables_the_sql_console_serves(tmp_path):
    """Security model: the tables SQL can read are exactly the ones the README names (what a user may query, and
    what the boundary exposes); read from the sources `Store.sql` hands its query process."""
    from jobs.synth import synth_store
    from store import Store

    found = re.search(r"The store's tables \(([^:]+):", _section("Security model"))
    assert found
    named = set(re.findall(r"`([a-z_]+)`", found.group(1)))
    synth_store(tmp_path, runs=1, steps=2)
    sources, views = Store(tmp_path).sql_sources()
    assert named == set(sources) | set(views)


def test_bench_readme_is_the_recorded_results(tmp_path):
    """Benchmarks: bench/README.md is the table of bench/results.json (each figure beside its target), not a
    hand-edited copy that could drift from what was measured."""
    from bench.report import write_readme

    write_readme(json.loads((ROOT / "bench" / "results.json").read_text()), tmp_path / "README.md")
    assert (tmp_path / "README.md").read_text() == (ROOT / "bench" / "README.md").read_text()


def test_readme_generation_time_is_the_model_cards_measurement():
    """README: 20 steps take about N s. The export measured it into the model card (a timing on a shared machine is
    not repeatable in a test; that it was measured, and stated as the card states it, is)."""
    said = re.search(r"20 steps take about ([\d.]+) s on two CPU cores", FLAT)
    card = " ".join((ROOT / "data" / "models" / "shapes" / "README.md").read_text().split())
    measured = re.search(r"\(20 steps, guidance [\d.]+, 64 px, CPU, 2 threads\): ([\d.]+) s", card)
    assert said and measured
    assert abs(float(said.group(1)) - float(measured.group(1))) <= 0.05 + 1e-9


def test_readme_dependency_floors_are_pyprojects():
    """Dependencies: each floor the README names (and torch's declared one) is the one pyproject.toml declares,
    which is what tests/test_dependency_floors.py installs."""
    import tomllib

    declared = {}
    for req in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        found = re.match(r"([A-Za-z0-9_.-]+)>=([\d.]+)", req)
        if found:
            declared[found.group(1).lower()] = found.group(2)
    text = _section("Dependencies")
    named = dict(re.findall(r"(diffusers|transformers|DuckDB|Streamlit|Pillow) ([\d.]+) \(", text))
    assert len(named) == 5, named
    for name, version in named.items():
        assert declared[name.lower()].removesuffix(".0") == version.removesuffix(".0"), (name, version)
    torch_floor = re.search(r"its floor of ([\d.]+) is declared", text)
    assert torch_floor and declared["torch"] == torch_floor.group(1)


def test_stored_grids_are_the_readmes_for_real_layouts():
    """What is captured: on SD 1.5's block layout at 512 px the levels are 64x64, 32x32, 16x16 and mid-8x8, the
    self grid 32x32 (<= 1,536 cells; 32x48 at 512x768) and the step grid 16x16 (<= 384 cells); SDXL at 1024 px
    has levels 64x64 and 32x32 and stores self-attention at 32x32, 16x16 per step. Read from the capture's own
    plan on UNets with the real block layouts (tiny channels: the grids depend only on the blocks)."""
    from pipeline.capture import plan_grids
    from pipeline.tiny import build_tiny_pipeline

    sd15 = build_tiny_pipeline("sd15").unet
    self_grid, step_grid, levels = plan_grids(sd15, (64, 64))
    assert levels == [(64, 64), (32, 32), (16, 16), (8, 8, "mid")]
    assert (self_grid, step_grid) == ((32, 32), (16, 16))
    tall_self, tall_step, _ = plan_grids(sd15, (96, 64))  # 512 wide, 768 high
    assert sorted(tall_self) == [32, 48] and tall_self[0] * tall_self[1] <= 1536
    assert tall_step[0] * tall_step[1] <= 384
    self_grid, step_grid, levels = plan_grids(build_tiny_pipeline("sdxl").unet, (128, 128))
    assert {lv[:2] for lv in levels} == {(64, 64), (32, 32)}
    assert (self_grid, step_grid) == ((32, 32), (16, 16))


@pytest.mark.slow
def test_record_stores_the_seed_only_when_the_generator_was_fresh(tmp_path):
    """Use StepX from Python: "The seed is stored when the generator was fresh (`manual_seed` just before the
    call), else null": a generator already drawn from, or none at all, would make a stored seed a lie."""
    import torch

    import stepx
    from tests.test_api import CALL, PROMPT, _pipe

    pipe = _pipe()
    used = torch.Generator().manual_seed(7)
    torch.randn(3, generator=used)  # drawn from before the call: its state is no longer seed 7's
    with stepx.record(pipe, store=tmp_path) as rec:
        pipe(PROMPT, generator=torch.Generator().manual_seed(7), **CALL)
        pipe(PROMPT, generator=used, **CALL)
        pipe(PROMPT, **CALL)
    assert [r.info()["seed"] for r in rec.runs] == [7, None, None]
    stored = stepx.open_store(tmp_path).sql("SELECT seed FROM runs ORDER BY run_id").rows
    assert sorted(stored, key=lambda r: r[0] is None) == [(7,), (None,), (None,)]


def test_make_test_runs_every_test_and_is_what_ci_runs():
    """Two commands: `make test` runs every test (slow and browser ones too: no marker filter) and is what CI
    runs through .ci/run, which makes browser tests run rather than skip."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*?\n((?:\t.*\n?)+)", makefile, re.M)
    assert recipe and re.search(r"pytest -m \"\"\s*$", recipe.group(1), re.M), "make test must not filter markers"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M) and "STEPX_REQUIRE_BROWSER=1" in ci


def test_a_query_process_starts_in_a_fraction_of_a_second(tmp_path):
    """Security model: "Starting a query process costs about 0.2 s" (forked, not a fresh interpreter, which
    costs seconds). Bound at 1 s for the median of five, so a loaded 2-core machine doesn't fail it."""
    import statistics
    import time

    from jobs.synth import synth_store
    from store import Store

    said = re.search(r"Starting a query process costs about ([\d.]+) s", _section("Security model"))
    assert said
    synth_store(tmp_path, runs=1, steps=2)
    store = Store(tmp_path)
    store.sql("SELECT 1")  # the dashboard's first query also starts its server; the CLI's forks at once
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        assert store.sql("SELECT count(*) FROM runs").rows == [(1,)]
        times.append(time.perf_counter() - t0)
    assert statistics.median(times) < 5 * float(said.group(1)), times


def test_record_refuses_a_diffusion_transformer_in_one_line(tmp_path):
    """Use StepX from Python: "UNet pipelines only (diffusion transformers: `stepx generate`)": recording an SD3
    pipeline is refused before any call, with the pipeline's class named, and nothing is written."""
    import stepx
    from pipeline.models import load_model

    pipe = load_model("tiny-sd3").pipe
    with pytest.raises(TypeError, match="StableDiffusion3Pipeline has no unet"), stepx.record(pipe, store=tmp_path):
        pipe("a cat", num_inference_steps=2)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_in_place_writers_refuse_an_s3_store_in_one_line(capsys):
    """Scale out: "Commands that write in place (...) refuse an S3 store with one line": each command the README
    names there, run for real, exits 2 with one line before touching anything (no S3 endpoint exists here)."""
    from stepx.cli import main

    found = re.search(r"Commands that write in place \(([^)]+)\) refuse an S3 store", _section("Scale out"))
    assert found
    named = re.findall(r"`([a-z-]+)`", found.group(1))
    argv = {
        "generate": ["x"],
        "worker": ["--once"],
        "index": ["rebuild"],
        "synth": ["--runs", "1"],
        "depth": ["r1"],
        "probe": ["r1", "--words", "dog"],
        "jobs": [],
    }
    assert named and set(named) <= set(argv), named
    for command in named:
        assert main([command, *argv[command], "--store", "s3://bucket/x"]) == 2, command
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and "S3 store is written by stepx batch" in err[0], (command, err)


def test_readme_scale_figures_are_the_recorded_bench():
    """Scale out: the measured table is bench/results.json's `scale` entry, rounded as printed."""
    sc = json.loads((ROOT / "bench" / "results.json").read_text())["scale"]
    tp, lv, proj = sc["throughput"], sc["local_vs_s3"], sc["projection_100k"]
    text = _section("Scale out")
    expected = [
        f"serial {tp['serial_runs_per_min']} · Ray with 2 workers {tp['ray_2_workers_runs_per_min']} "
        f"(`ray.init` {tp['ray_init_s']} s more)",
        f"local {lv['local']['point_read_p50_ms']} ms · S3 direct {lv['s3_direct']['point_read_p50_ms']} ms · "
        f"S3 replica {lv['s3_replica']['point_read_p50_ms']} ms",
        f"local {lv['local']['aggregate_p50_ms']} ms · S3 direct (Delta -> Arrow -> DuckDB) "
        f"{lv['s3_direct']['aggregate_p50_ms']} ms · S3 replica {lv['s3_replica']['aggregate_p50_ms']} ms",
        f"upload {lv['publish']['upload_s']:.0f} s ({lv['sizes']['run_objects']:,} objects, "
        f"{lv['sizes']['run_bytes'] / 1e6:.0f} MB) · {lv['publish']['commits']} commits",
        f"cold {lv['replica_cold_sync_s']} s · nothing new {lv['replica_warm_sync_ms'] / 1000:.1f} s",
        f"{lv['sizes']['index_objects']} objects, {lv['sizes']['index_bytes'] / 1e6:.1f} MB",
        f"{proj['run_objects']:,} run objects, {proj['run_gb']:.1f} GB; "
        f"index {proj['index_mb_after_compaction'] / 1000:.1f} GB in {proj['index_objects_after_compaction']} objects",
    ]
    for figure in expected:
        assert figure in text, f"README's scale table lacks the recorded {figure!r}"


def test_readme_decoder_figures_are_the_recorded_side_by_side_run():
    """README: the decoder refinement's validation figures are bench/decoder.json's (both decoders, one run)."""
    rec = json.loads((ROOT / "bench" / "decoder.json").read_text())
    assert rec["split"] == "validation"
    num = r"([\d.]+%?)"
    found = re.search(
        rf"right shape {num} -> {num}, shape-noun mIoU {num} -> {num} \((\d+) prompts, guidance ([\d.]+)\)", FLAT
    )
    assert found, "README's decoder sentence not found"
    before, after = rec["before"], rec["committed"]
    figures = [before["shape_ok"], after["shape_ok"], before["miou_daam"], after["miou_daam"]]
    for shown, value in zip(found.groups()[:4], figures, strict=True):
        assert _close(shown, value, shown.endswith("%")), (shown, value)
    assert int(found.group(5)) == rec["n"] == before["prompts"] and float(found.group(6)) == rec["guidance"]
    assert after["shape_ok"] > before["shape_ok"]
    kept = re.search(rf"lost the shape of \d+% of objects \({num} kept\).*?keeps {num} \(held-out", FLAT)
    assert kept, "README's round-trip sentence not found"
    for shown, value in zip(kept.groups(), (before["vae_shape_kept"], after["vae_shape_kept"]), strict=True):
        assert _close(shown, value, True), (shown, value)
