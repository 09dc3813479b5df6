"""Fuzz every `stepx` subcommand: valid argument lists mutated by a seeded generator, run in-process.

Each run must end with status 0, 1 or 2 and never a traceback; a failure says one line on stderr and
never the "unexpected error" line (that one means a bug); mutations that make the input invalid by
construction (an unknown flag, an out-of-range number) must fail with status 2. A handful of the
hostile cases also run as real processes, and hostile gallery spec files are tried one by one.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from jobs.synth import synth_store
from stepx.cli import COMMANDS, main
from store import Store

ROOT = Path(__file__).resolve().parent.parent
SEED = 20261201
N_CASES = 420

# Values that no numeric option accepts (each option's bounds are in schema.limits / stepx.cli).
BAD_NUMBERS = ["-1", "nan", "inf", "-inf", "1e20", "", "abc", "9" * 30, "0x10", "🙂", "1,5", "-0.5e400", "None"]
# No real system file is ever a value: as root, a mutation that lands a path after --out would overwrite it.
HOSTILE_TEXT = [
    "",
    " ",
    "../../etc/passwd",
    "'; DROP VIEW runs; --",
    "ünïcødé 🙂",
    "x" * 300,
    "a\x1b[31mred",
    "\t",
    "%s%n",
    "$(id)",
    "NaN",
    "-",
    "--",
]
DECOY = "decoy-file"  # a plain file in the fuzz folder: "a file where a folder should be"
HOSTILE_PATHS = {  # per option; never a folder the command could write into outside the fuzz folder
    "--store": [DECOY, "/dev/full", DECOY + "/sub", "x" * 5000, "", "s" * 256],
    "--out": ["/", "/etc", "/dev/full", "/nonexistent/dir/x.json", "", ".", "x" * 5000, "../fz-out.json", DECOY],
    "--spec": [DECOY, "/", "/nonexistent/x.json", "", "x" * 5000, "/etc/hostname", "/proc/self/status"],
    "--model-path": ["/", DECOY, "/nonexistent", "", "/dev/full"],
    "--depth-path": ["/", DECOY, "/nonexistent", ""],
}
UNKNOWN_FLAGS = ["--bogus", "--steps-", "-z", "---", "--version=2", "--💥"]
NUMERIC_FLAGS = {
    "--workers",
    "--steps",
    "--seed",
    "--guidance",
    "--width",
    "--height",
    "--limit",
    "--max-rows",
    "--timeout",
    "--memory-limit-mb",
    "--n",
    "--seeds",
    "--runs",
    "--poll",
    "--threshold",
    "--scenes",
    "--iterations",
}
PROGRESS = re.compile(r"(\d+/\d+ \[|\?(step|run|it)/s|\d+%\|)")  # tqdm bar states on stderr


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A synthetic store with three runs, a tiny gallery spec, and an empty model cache."""
    base = tmp_path_factory.mktemp("fuzz")
    store = base / "store"
    synth_store(store, 3, steps=2, seed=7)
    (base / DECOY).write_text("not a folder")
    spec = base / "spec.json"
    spec.write_text(
        json.dumps(
            {"name": "fz", "model": "tiny-random", "steps": 2, "entries": [{"prompt": "a red circle", "seeds": [1]}]}
        )
    )
    prompts = base / "prompts.txt"
    prompts.write_text("a red circle\n")
    return {"base": base, "store": store, "spec": spec, "prompts": prompts, "run": Store(store).runs()[0]["run_id"]}


def valid_lists(env: dict) -> list[list[str]]:
    """One or more valid argument lists per subcommand (the fuzzer's seeds)."""
    run, out, spec = env["run"], str(env["base"] / "out.json"), str(env["spec"])
    return [
        ["runs"],
        ["runs", "--limit", "5", "--search", "red", "--tag", "synthetic"],
        ["runs", "--model", "x"],
        ["show", run],
        ["sql", "SELECT count(*) AS n FROM runs", "--format", "json", "--max-rows", "10", "--timeout", "20"],
        ["sql", "SELECT word FROM tokens LIMIT 3", "--format", "csv", "--memory-limit-mb", "512"],
        ["index", "rebuild"],
        ["models", "--format", "json"],
        ["gallery", "build", "--spec", spec, "--model", "tiny-random"],
        ["annotate", "--run", run, "--out", out, "--threshold", "0.4"],
        ["annotate", "--gallery", "synthetic", "--out", out, "--daam-only"],
        [
            "generate",
            "a red circle",
            "--model",
            "tiny-random",
            "--steps",
            "2",
            "--seed",
            "3",
            "--width",
            "64",
            "--height",
            "64",
            "--guidance",
            "2",
            "--tag",
            "fz",
            "--device",
            "cpu",
        ],
        ["depth", run, "--depth-model", "dpt"],
        ["eval", "--n", "1", "--seeds", "1", "--steps", "2", "--out", out],
        ["jobs"],
        ["jobs", "list", "--limit", "3"],
        ["worker", "--once", "--poll", "0.1", "--device", "cpu"],
        ["synth", "--runs", "1", "--steps", "2", "--geometry", "shapes", "--seed", "1"],
        ["batch", str(env["prompts"]), "--seeds", "0-1", "--model", "tiny-random", "--steps", "2", "--gallery", "fb"],
        ["probe", run, "--words", "dog, sky", "--device", "cpu"],
        ["probe-tune", "--scenes", "1", "--iterations", "2", "--out", str(env["base"] / "tokens.safetensors")],
        ["train-shapes", "--set", "nosuchfield=1", "--work", str(env["base"] / "tw"), "--max-steps", "0"],
    ]


def mutate(rng: random.Random, argv: list[str]) -> tuple[list[str], bool]:
    """A mutated copy of an argument list, and whether the mutation makes it invalid by construction."""
    a = list(argv)
    kind = rng.choice(["number", "text", "path", "drop", "flag", "dup", "truncate", "swap", "runid", "nul"])
    flags = [i for i, t in enumerate(a) if t.startswith("--") and i + 1 < len(a) and not a[i + 1].startswith("--")]
    if kind == "number":
        numeric = [i for i in flags if a[i] in NUMERIC_FLAGS]
        if numeric:
            i = rng.choice(numeric)
            a[i + 1] = rng.choice(BAD_NUMBERS)
            return a, "--" not in a[:i]  # after a bare '--' the flag is only a stray positional
        kind = "flag"
    if kind == "path":
        i = rng.choice([i for i in flags if a[i] in HOSTILE_PATHS] or [None])
        if i is None:
            a += ["--store", rng.choice(HOSTILE_PATHS["--store"])]
        else:
            a[i + 1] = rng.choice(HOSTILE_PATHS[a[i]])
        return a, False
    if kind == "text" and len(a) > 1:
        a[rng.randrange(1, len(a))] = rng.choice(HOSTILE_TEXT)
        return a, False
    if kind == "drop" and len(a) > 1:
        del a[rng.randrange(len(a))]
        return a, False
    if kind == "dup" and flags:
        i = rng.choice(flags)
        return a + [a[i], rng.choice(BAD_NUMBERS if a[i] in NUMERIC_FLAGS else HOSTILE_TEXT)], a[i] in NUMERIC_FLAGS
    if kind == "truncate" and len(a) > 1:
        return a[: rng.randrange(1, len(a))], False
    if kind == "swap" and len(a) > 2:
        i, j = rng.sample(range(1, len(a)), 2)
        a[i], a[j] = a[j], a[i]
        return a, False
    if kind == "runid" and a[0] in ("show", "depth"):
        a[1] = rng.choice(["nope", "../../x", "20260101-000000-zzzzzz", "", "-", "a/b", "🙂", "..", "x" * 200])
        return a, a[1] != ""
    if kind == "nul":
        i = rng.randrange(len(a))
        a[i] = a[i] + "\x00x"
        return a, True
    at = rng.randrange(1, len(a) + 1)
    a.insert(at, rng.choice(UNKNOWN_FLAGS))
    return a, "--" not in a[:at]


def bounded(argv: list[str], env: dict) -> list[str]:
    """The argument list with cheap settings put first, so a mutation that drops one can't start long work.

    Later values win in argparse, so a mutated value given after these still counts; `worker` always
    gets --once (it would serve forever), `eval` one scene, `gallery` the tiny spec, `generate` 2 steps,
    and `train-shapes` the fuzz folder and a --set its Config refuses, so it never trains (nor writes data/).
    """
    first = {
        "worker": ["--once"],
        "eval": ["--n", "1", "--seeds", "1", "--steps", "2"],
        "gallery": ["--spec", str(env["spec"])],
        "generate": ["--model", "tiny-random", "--steps", "2"],
        "batch": ["--model", "tiny-random", "--steps", "2"],
        "probe-tune": ["--scenes", "1", "--iterations", "2"],
    }.get(argv[0] if argv else "", [])
    if argv[:1] == ["train-shapes"]:  # last wins: the fuzz folder, and a field no Config has, so nothing trains
        return argv + ["--work", str(env["base"] / "tw"), "--set", "nosuchfield=1"]
    return argv[:1] + first + argv[1:]


def run_inprocess(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) with stdout and stderr captured; SystemExit (e.g. --help) becomes its status."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def check_outcome(argv: list[str], code: int, err: str, must_fail: bool) -> None:
    """The fuzz contract for one run."""
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err and "unexpected error" not in err, (argv, err)
    if must_fail:
        assert code == 2, (argv, code, err)
    if code:
        lines = [ln for ln in err.splitlines() if ln.strip() and not PROGRESS.search(ln)]
        assert len(lines) == 1, (argv, err)
        assert lines[0].startswith("stepx"), (argv, lines)


@pytest.fixture()
def quiet_env(fuzz_env: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("STEPX_STORE", str(fuzz_env["store"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(fuzz_env["base"] / "no-hub-cache"))
    monkeypatch.chdir(fuzz_env["base"])
    return fuzz_env


def test_every_subcommand_is_fuzzed(fuzz_env):
    assert {v[0] for v in valid_lists(fuzz_env)} == set(COMMANDS) | {"train-shapes"}


@pytest.mark.slow
def test_valid_lists_succeed(quiet_env):
    for argv in valid_lists(quiet_env):
        code, _, err = run_inprocess(argv)
        # no depth weights here; a synthetic run has no model to re-run for probes; --set names no Config field
        want = {"depth": 1, "probe": 1, "train-shapes": 2}.get(argv[0], 0)
        assert code == want, (argv, err)
        check_outcome(argv, code, err, False)


def fuzz(env: dict, cases: int, commands: set[str] | None = None) -> dict:
    """Run `cases` mutated argument lists (seeded) and check each; returns counts."""
    rng = random.Random(SEED)
    seeds = [v for v in valid_lists(env) if commands is None or v[0] in commands]
    counts = {"cases": 0, "status_0": 0, "status_1": 0, "status_2": 0, "invalid_by_construction": 0}
    for _ in range(cases):
        argv, must_fail = mutate(rng, rng.choice(seeds))
        if rng.random() < 0.25:  # a second mutation on a quarter of the cases
            first = argv
            argv, more = mutate(rng, argv)
            must_fail = more or (must_fail and argv[: len(first)] == first)  # the first survives only if kept
        argv = bounded(argv, env)
        code, _, err = run_inprocess(argv)
        check_outcome(argv, code, err, must_fail)
        counts["cases"] += 1
        counts[f"status_{code}"] += 1
        counts["invalid_by_construction"] += must_fail
    return counts


def test_fuzz_read_side_commands(quiet_env):
    """A quick pass over the commands that load no model (the full pass below is slow)."""
    counts = fuzz(quiet_env, 100, {"runs", "show", "sql", "index", "annotate", "jobs", "synth", "models"})
    assert counts["status_2"] >= counts["invalid_by_construction"] > 30 and counts["status_0"] > 0, counts


@pytest.mark.slow
def test_fuzz_all_subcommands(quiet_env):
    counts = fuzz(quiet_env, N_CASES)
    print("fuzz counts:", counts)
    assert counts["status_2"] >= counts["invalid_by_construction"] > N_CASES // 3 and counts["status_0"] > 10, counts


HOSTILE_SPECS = {
    "empty": "",
    "not_json": "{name: 'x'",
    "deep": "[" * 50_000 + "]" * 50_000,
    "deep_object": '{"a":' * 30_000 + "1" + "}" * 30_000,
    "list": "[1, 2, 3]",
    "string": '"a spec"',
    "null": "null",
    "no_name": json.dumps({"entries": [{"prompt": "a"}]}),
    "name_number": json.dumps({"name": 5, "entries": [{"prompt": "a"}]}),
    "no_entries": json.dumps({"name": "g"}),
    "entries_dict": json.dumps({"name": "g", "entries": {"prompt": "a"}}),
    "entries_empty": json.dumps({"name": "g", "entries": []}),
    "entry_string": json.dumps({"name": "g", "entries": ["a red circle"]}),
    "no_prompt": json.dumps({"name": "g", "entries": [{"seeds": [1]}]}),
    "prompt_number": json.dumps({"name": "g", "entries": [{"prompt": 7}]}),
    "empty_prompt": json.dumps({"name": "g", "entries": [{"prompt": "  "}]}),
    "control_prompt": json.dumps({"name": "g", "entries": [{"prompt": "a\u0007b"}]}),
    "seeds_string": json.dumps({"name": "g", "entries": [{"prompt": "a", "seeds": "12"}]}),
    "seed_negative": json.dumps({"name": "g", "entries": [{"prompt": "a", "seeds": [-1]}]}),
    "seed_huge": json.dumps({"name": "g", "entries": [{"prompt": "a", "seeds": [10**30]}]}),
    "seed_float": json.dumps({"name": "g", "entries": [{"prompt": "a", "seeds": [1.5]}]}),
    "seed_bool": json.dumps({"name": "g", "entries": [{"prompt": "a", "seeds": [True]}]}),
    "tags_number": json.dumps({"name": "g", "entries": [{"prompt": "a", "tags": [1]}]}),
    "steps_string": json.dumps({"name": "g", "steps": "20", "entries": [{"prompt": "a"}]}),
    "steps_huge": json.dumps({"name": "g", "steps": 10**6, "entries": [{"prompt": "a"}]}),
    "model_list": json.dumps({"name": "g", "model": ["x"], "entries": [{"prompt": "a"}]}),
}


def test_hostile_gallery_specs_get_one_line(quiet_env, tmp_path):
    for name, text in HOSTILE_SPECS.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        code, _, err = run_inprocess(["gallery", "build", "--spec", str(path), "--model", "tiny-random"])
        check_outcome([name], code, err, True)
        assert str(path) in err, (name, err)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00\x00garbage")
    code, _, err = run_inprocess(["gallery", "build", "--spec", str(binary)])
    check_outcome(["binary"], code, err, True)
    assert Store(quiet_env["store"]).runs(gallery="g") == []  # nothing was generated from a bad spec


def test_unexpected_error_is_logged_with_its_traceback(quiet_env, monkeypatch):
    def boom(args: object) -> int:
        raise RuntimeError("a bug deep inside")

    monkeypatch.setitem(COMMANDS, "runs", boom)
    code, _, err = run_inprocess(["runs"])
    log = quiet_env["store"] / "logs" / "stepx.log"
    assert code == 1 and err.strip() == f"stepx runs: unexpected error (RuntimeError); the traceback is in {log}"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "a bug deep inside" in text and "'runs'" in text


def test_disk_full_while_writing_a_run_leaves_nothing_visible(quiet_env, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "cross_attention.parquet")

    monkeypatch.setattr(pq, "write_table", full)
    store = tmp_path / "full-store"
    code, _, err = run_inprocess(
        ["generate", "a red circle", "--model", "tiny-random", "--steps", "2", "--store", str(store)]
    )
    check_outcome(["disk full"], code, err, False)
    assert code == 1 and "disk full" in err.splitlines()[-1]
    assert Store(store).runs() == []


def test_out_to_a_device_or_a_folder_is_refused_before_work(quiet_env):
    """An atomic write would rename over /dev/full itself (as root): devices and folders are refused up front."""
    run = quiet_env["run"]
    for out, needle in (("/dev/full", "is not a regular file"), (str(quiet_env["base"]), "is a folder")):
        for argv in (["annotate", "--run", run, "--out", out], ["eval", "--n", "1", "--seeds", "1", "--out", out]):
            code, _, err = run_inprocess(argv)
            assert code == 2 and needle in err and err.count("\n") == 1, (argv, err)
    assert Path("/dev/full").is_char_device()


# Real processes for the cheap cases (the model-loading ones run as processes in test_cli.py).
SUBPROCESS_CASES = [
    (["runs", "--store", "/etc/passwd"], "is a file, not a store folder"),
    (["show", "../../etc/passwd"], "not a run id"),
    (["sql", "SELECT 1", "--max-rows", "1e20"], "whole number"),
    (["annotate", "--run", "x", "--out", "/"], "is a folder"),
    (["gallery", "build", "--spec", "/etc/hostname"], "is not JSON"),
    (["synth", "--runs", "1e3"], "whole number"),
]


@pytest.mark.parametrize("argv, needle", SUBPROCESS_CASES)
def test_real_process_one_line_status_2(argv, needle, tmp_path):
    env = {**os.environ, "STEPX_STORE": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    res = subprocess.run(
        [sys.executable, "-m", "stepx.cli", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr
