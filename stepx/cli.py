"""The `stepx` command line.

    stepx generate "a red circle on the left" --steps 20 --seed 1
    stepx runs | stepx show RUN | stepx sql "SELECT ..." | stepx index rebuild | stepx models
    stepx probe RUN --words "dog, sky"        stepx probe-tune

Torch is imported only by the commands that run a model. Every failure is one line on stderr: status 2
for bad input, 1 when the store or machine cannot serve a valid request; unexpected errors also
leave their traceback in <store>/logs/stepx.log and name that file.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from schema.limits import LIMITS
from schema.version import stepx_version
from stepx import commands_jobs as jobs_cmd
from stepx import commands_probe as probe
from stepx import commands_read as read
from stepx import commands_run as run
from stepx import commands_scale as scale
from stepx.commands_base import (
    CliError,
    checked_store,
    count,
    limited,
    log_exception,
    os_error_line,
    terminal_text,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise CliError(f"{self.prog}: {message} (see {self.prog} --help)", 2)


def _seconds(most: float) -> Callable[[str], float]:
    """A finite number of seconds greater than 0, up to `most`."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
        if not (math.isfinite(v) and 0 < v <= most):
            raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 and up to {most:g}, got {text}")
        return v

    return parse


def _threshold(text: str) -> str | float:
    """'otsu' or a fraction of the map's maximum strictly between 0 and 1."""
    if text == "otsu":
        return text
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"is 'otsu' or a number between 0 and 1, got {text!r}")
    return v


def _text(text: str) -> str:
    """Free text (tags, search words, names): printable and at most 200 characters."""
    if len(text) > 200 or not text.isprintable():
        raise argparse.ArgumentTypeError("expected printable text of at most 200 characters")
    return text


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", help="store folder or s3://bucket/prefix (default: $STEPX_STORE or data/store)")
    p = _Parser(prog="stepx", description="StepX: trace and explore attention in diffusion models.")
    p.add_argument("--version", action="version", version=f"stepx {stepx_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", parents=[common], help="generate one traced image")
    g.add_argument("prompt")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--model", help="registry name (see `stepx models`)")
    g.add_argument("--model-path", help="folder holding a diffusers pipeline")
    g.add_argument("--seed", type=limited("seed"), default=0)
    g.add_argument("--steps", type=limited("steps"))
    g.add_argument("--guidance", type=limited("guidance"))
    g.add_argument("--width", type=limited("width"))
    g.add_argument("--height", type=limited("height"))
    g.add_argument("--tag", type=_text, action="append", default=[], help="tag the run (repeatable)")
    g.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    g.add_argument("--concepts", type=_text, default="", help='FLUX.1: ConceptAttention maps, e.g. "cat, sky, tree"')
    true_cfg = "FLUX.1: true classifier-free guidance scale with --negative (two transformer calls a step)"
    g.add_argument("--true-cfg", type=limited("guidance"), default=1.0, help=true_cfg)
    g.add_argument("--depth", action="store_true", help="also estimate depth of the final image")
    g.add_argument("--depth-model", default="zoedepth", choices=["zoedepth", "dpt", "depth-anything"])
    g.add_argument("--depth-path", help="folder holding the depth estimator")

    d = sub.add_parser("depth", parents=[common], help="estimate depth for an existing run (a companion map)")
    d.add_argument("run_id")
    d.add_argument("--depth-model", default="zoedepth", choices=["zoedepth", "dpt", "depth-anything"])
    d.add_argument("--depth-path", help="folder holding the depth estimator")

    pr = sub.add_parser("probe", parents=[common], help="maps for words not in a run's prompt (re-runs it exactly)")
    pr.add_argument("run_id")
    pr.add_argument("--words", required=True, help='comma-separated probe words, e.g. "dog, sky"')
    pr.add_argument("--model-path", help="folder holding the run's diffusers pipeline")
    pr.add_argument("--device", choices=["cpu", "cuda"], help="default: the run's own device")
    pr.add_argument("--plain", action="store_true", help="encode every probe word; use no optimised token")
    pr.add_argument("--tokens", type=Path, help="optimised tokens file (default: the model's probe_tokens.safetensors)")

    pt = sub.add_parser("probe-tune", parents=[common], help="optimise the shapes model's probe tokens (OVAM)")
    pt.add_argument("--scenes", type=count(1000), default=64, help="training scenes to generate and annotate")
    pt.add_argument("--iterations", type=count(10_000), default=150, help="Adam iterations per word")
    pt.add_argument(
        "--out",
        type=Path,
        required=True,
        help="tokens file to write (*.safetensors; the model's own: data/models/shapes/probe_tokens.safetensors)",
    )

    r = sub.add_parser("runs", parents=[common], help="list runs")
    r.add_argument("--search", type=_text, help="text in the prompt")
    r.add_argument("--tag", type=_text)
    r.add_argument("--model", type=_text)
    r.add_argument("--limit", type=count(1_000_000), default=50)

    s = sub.add_parser("show", parents=[common], help="one run's metadata and tokens")
    s.add_argument("run_id")

    q = sub.add_parser("sql", parents=[common], help="read-only SQL over the store")
    q.add_argument("query")
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql_flags = {"max_rows": "--max-rows", "timeout_s": "--timeout", "memory_limit_mb": "--memory-limit-mb"}
    for name, flag in sql_flags.items():  # the SQL console's limits (README "Security model")
        q.add_argument(flag, dest=name, type=limited(name), default=LIMITS[name].default, help=LIMITS[name].help)

    i = sub.add_parser("index", parents=[common], help="maintain the store's index")
    i.add_argument("action", choices=["rebuild"])

    mo = sub.add_parser("models", parents=[common], help="list registered models and where their weights are")
    mo.add_argument("--format", choices=["table", "json"], default="table")

    ga = sub.add_parser("gallery", parents=[common], help="build a curated gallery from a spec")
    ga.add_argument("action", choices=["build"])
    ga.add_argument("--spec", help="gallery spec JSON (default data/gallery/curated.json)")
    ga.add_argument("--model", type=_text, help="override the spec's model")
    scale.add_ray_options(ga)

    an = sub.add_parser("annotate", parents=[common], help="TITAN object annotations as COCO JSON")
    target = an.add_mutually_exclusive_group(required=True)
    target.add_argument("--gallery", type=_text, help="annotate every run of a gallery")
    target.add_argument("--run", help="annotate one run")
    an.add_argument("--out", required=True, help="COCO JSON file to write")
    an.add_argument(
        "--threshold", type=_threshold, default="otsu", help="'otsu' or a fraction of the maximum, e.g. 0.4"
    )
    how = an.add_mutually_exclusive_group()  # neither: analysis.detection.DEFAULT_METHOD (measured by stepx eval)
    how.add_argument("--guided", dest="guided", action="store_true", help="steer word maps through self-attention")
    how.add_argument("--daam-only", dest="guided", action="store_false", help="word maps alone")
    an.set_defaults(guided=None)

    ev = sub.add_parser("eval", parents=[common], help="score the embedded model on its test (or validation) split")
    ev.add_argument("--model", default="shapes")
    ev.add_argument("--split", choices=["test", "validation"], default="test", help="which evaluation split")
    ev.add_argument("--n", type=count(10_000), default=30, help="scenes of the split (1 to 256)")
    ev.add_argument("--seeds", type=count(10_000), default=5, help="noise seeds per scene (1 to 100)")
    ev.add_argument("--steps", type=limited("steps"), default=20)
    ev.add_argument("--guidance", type=limited("guidance"), help="default: the model's")
    ev.add_argument("--out", help="also write the report as JSON")
    ev.add_argument("--card", help="also put the test table into this model card (its stepx eval section)")

    jb = sub.add_parser("jobs", parents=[common], help="the generation queue: list jobs, or cancel one")
    jb.add_argument("action", nargs="?", choices=["list", "cancel"], default="list")
    jb.add_argument("job_id", nargs="?", type=count(2**62), help="the job to cancel")
    jb.add_argument("--limit", type=count(100_000), default=20, help="newest jobs to list")

    wk = sub.add_parser("worker", parents=[common], help="run queued generation jobs (the dashboard's Generate)")
    wk.add_argument("--once", action="store_true", help="exit when the queue is empty")
    wk.add_argument("--poll", type=_seconds(60), default=0.5, help="seconds between queue checks")
    wk.add_argument("--device", choices=["cpu", "cuda"])

    y = sub.add_parser("synth", parents=[common], help="write synthetic runs (for scale tests)")
    y.add_argument("--runs", type=count(1_000_000), required=True)
    y.add_argument("--steps", type=limited("steps"), default=20)
    y.add_argument("--geometry", choices=["shapes", "sd15"], default="shapes")
    y.add_argument("--seed", type=limited("seed"), default=0)
    scale.add_batch_parser(sub, common)
    return p


COMMANDS = {
    "generate": run.cmd_generate,
    "runs": read.cmd_runs,
    "show": read.cmd_show,
    "sql": read.cmd_sql,
    "index": read.cmd_index,
    "models": read.cmd_models,
    "gallery": scale.cmd_gallery,
    "batch": scale.cmd_batch,
    "annotate": run.cmd_annotate,
    "eval": run.cmd_eval,
    "worker": run.cmd_worker,
    "jobs": jobs_cmd.cmd_jobs,
    "depth": run.cmd_depth,
    "probe": probe.cmd_probe,
    "probe-tune": probe.cmd_probe_tune,
    "synth": run.cmd_synth,
}


def train_shapes(argv: list[str]) -> int:
    """`stepx train-shapes ...`: the embedded model's training script, with its own options."""
    from shapes.train import main as train_main
    from shapes.train import parse_args

    said = io.StringIO()
    try:  # its argparse prints a usage block on bad options: parse first, keep only the error's line
        with contextlib.redirect_stderr(said):
            parse_args(argv)
    except SystemExit as exc:
        if exc.code:
            lines = [ln for ln in said.getvalue().splitlines() if ln.strip()]
            reason = lines[-1].split(": error: ", 1)[-1] if lines else "bad arguments"
            raise CliError(f"stepx train-shapes: {reason} (see stepx train-shapes --help)", 2) from None
        return 0
    try:
        return int(train_main(argv) or 0)
    except SystemExit as exc:  # the trainer's own refusals
        if isinstance(exc.code, str):
            raise CliError(f"stepx train-shapes: {exc.code}", 2) from None
        return int(exc.code or 0)


# Failures with a message meant for the user, as "module:Class". Only modules already imported are looked
# at (an exception can only come from a loaded module), so a read command never imports torch for this.
BAD_INPUT = (  # exit 2: the request is wrong (an argument, a run id, a setting, a file)
    "schema.limits:LimitError",
    "schema.layout:InvalidRunId",
    "pipeline.generate:GenerationError",
    "store.errors:RunNotFound",
    "store.errors:IndexDamaged",
    "jobs.queue:JobError",
    "store.errors:WordNotFound",
    "store.errors:QueryError",
    "jobs.gallery:SpecError",
    "jobs.batch:BatchError",
    "schema.location:StoreLocationError",
)
CANNOT_SERVE = (  # exit 1: a valid request the store or the machine can't serve
    "store.errors:StoreError",
    "schema.tables:SchemaVersionError",
    "schema.layout:ManifestError",
    "jobs.queue:QueueDamaged",
    "pipeline.models:ModelNotFoundError",
    "analysis.titan:NounsUnavailable",
)


def _loaded(names: tuple[str, ...]) -> tuple[type, ...]:
    found = (getattr(sys.modules.get(n.split(":")[0]), n.split(":")[1], None) for n in names)
    return tuple(c for c in found if isinstance(c, type))


def _status(exc: BaseException) -> int | None:
    """Exit status of a failure with a message meant for the user, or None for an unexpected error."""
    if isinstance(exc, CliError):
        return exc.status
    if isinstance(exc, _loaded(BAD_INPUT)):
        return 2
    if isinstance(exc, _loaded(CANNOT_SERVE)):
        return 1
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `stepx` console script: one line on stderr for every failure, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    root: Path | None = None
    prefix = "stepx"
    try:
        if any("\x00" in a for a in argv):
            raise CliError("stepx: an argument holds a NUL character; remove it", 2)
        if argv[:1] == ["train-shapes"]:
            return train_shapes(argv[1:])
        args = build_parser().parse_args(argv)
        prefix = f"stepx {args.command}"
        if hasattr(args, "store"):
            root = checked_store(args)
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except KeyboardInterrupt:
        print("stepx: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"{prefix}: {terminal_text(os_error_line(exc))}", file=sys.stderr)
        return 2 if exc.errno in (errno.EISDIR, errno.ENOTDIR) else 1
    except Exception as exc:  # noqa: BLE001 - every failure ends as one line; unexpected ones are logged
        status = _status(exc)
        if status is not None:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            message = terminal_text(message)  # errors quote stored text and arguments
            print(message if message.startswith("stepx") else f"{prefix}: {message}", file=sys.stderr)
            return status
        log = log_exception(root, argv)
        print(f"{prefix}: unexpected error ({type(exc).__name__}); the traceback is in {log}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
