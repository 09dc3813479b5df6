"""The `stepx` command line.

    stepx generate "a red circle on the left" --steps 20 --seed 1
    stepx runs | stepx show RUN | stepx sql "SELECT ..." | stepx index rebuild | stepx models

Torch is imported only by the commands that run a model. Bad arguments exit with status 2 and one
line on stderr; store and model problems exit with status 1 and one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from stepx import commands_read as read
from stepx import commands_run as run
from stepx.commands_base import CliError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise CliError(f"{self.prog}: {message} (see {self.prog} --help)", 2)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {v}")
    return v


def _size(text: str) -> int:
    v = _positive_int(text)
    if v % 8 or v > 4096:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 up to 4096, got {v}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2^63-1, got {v}")
    return v


def _guidance(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= v <= 50:
        raise argparse.ArgumentTypeError(f"must be between 0 and 50, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", help="store folder (default: $STEPX_STORE or data/store)")
    p = _Parser(prog="stepx", description="StepX: trace and explore attention in diffusion models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", parents=[common], help="generate one traced image")
    g.add_argument("prompt")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--model", help="registry name (see `stepx models`)")
    g.add_argument("--model-path", help="folder holding a diffusers pipeline")
    g.add_argument("--seed", type=_seed, default=0)
    g.add_argument("--steps", type=_positive_int)
    g.add_argument("--guidance", type=_guidance)
    g.add_argument("--width", type=_size)
    g.add_argument("--height", type=_size)
    g.add_argument("--tag", action="append", default=[], help="tag the run (repeatable)")
    g.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    g.add_argument("--depth", action="store_true", help="also estimate depth of the final image")
    g.add_argument("--depth-model", default="zoedepth", choices=["zoedepth", "dpt", "depth-anything"])
    g.add_argument("--depth-path", help="folder holding the depth estimator")

    d = sub.add_parser("depth", parents=[common], help="estimate depth for an existing run (a companion map)")
    d.add_argument("run_id")
    d.add_argument("--depth-model", default="zoedepth", choices=["zoedepth", "dpt", "depth-anything"])
    d.add_argument("--depth-path", help="folder holding the depth estimator")

    r = sub.add_parser("runs", parents=[common], help="list runs")
    r.add_argument("--search", help="text in the prompt")
    r.add_argument("--tag")
    r.add_argument("--model")
    r.add_argument("--limit", type=_positive_int, default=50)

    s = sub.add_parser("show", parents=[common], help="one run's metadata and tokens")
    s.add_argument("run_id")

    q = sub.add_parser("sql", parents=[common], help="read-only SQL over the store")
    q.add_argument("query")
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")
    q.add_argument("--max-rows", type=_positive_int, default=1000)
    q.add_argument("--timeout", type=float, default=10.0, help="seconds before the query is stopped")

    i = sub.add_parser("index", parents=[common], help="maintain the store's index")
    i.add_argument("action", choices=["rebuild"])

    mo = sub.add_parser("models", parents=[common], help="list registered models and where their weights are")
    mo.add_argument("--format", choices=["table", "json"], default="table")

    ga = sub.add_parser("gallery", parents=[common], help="build a curated gallery from a spec")
    ga.add_argument("action", choices=["build"])
    ga.add_argument("--spec", help="gallery spec JSON (default data/gallery/curated.json)")
    ga.add_argument("--model", help="override the spec's model")

    an = sub.add_parser("annotate", parents=[common], help="TITAN object annotations as COCO JSON")
    target = an.add_mutually_exclusive_group(required=True)
    target.add_argument("--gallery", help="annotate every run of a gallery")
    target.add_argument("--run", help="annotate one run")
    an.add_argument("--out", required=True, help="COCO JSON file to write")
    an.add_argument("--threshold", default="otsu", help="'otsu' or a fraction of the maximum, e.g. 0.4")
    an.add_argument("--daam-only", action="store_true", help="word maps alone, without self-attention guidance")

    ev = sub.add_parser("eval", parents=[common], help="score the embedded model on its held-out scenes")
    ev.add_argument("--model", default="shapes")
    ev.add_argument("--n", type=_positive_int, default=30, help="held-out scenes")
    ev.add_argument("--steps", type=_positive_int, default=20)
    ev.add_argument("--guidance", type=_guidance, help="default: the model's")
    ev.add_argument("--out", help="also write the report as JSON")
    ev.add_argument("--card", help="also put the table into this model card (its stepx eval section)")

    wk = sub.add_parser("worker", parents=[common], help="run queued generation jobs (the dashboard's Generate)")
    wk.add_argument("--once", action="store_true", help="exit when the queue is empty")
    wk.add_argument("--poll", type=float, default=0.5, help="seconds between queue checks")
    wk.add_argument("--device", choices=["cpu", "cuda"])

    y = sub.add_parser("synth", parents=[common], help="write synthetic runs (for scale tests)")
    y.add_argument("--runs", type=_positive_int, required=True)
    y.add_argument("--steps", type=_positive_int, default=20)
    y.add_argument("--geometry", choices=["shapes", "sd15"], default="shapes")
    y.add_argument("--seed", type=_seed, default=0)
    return p


COMMANDS = {
    "generate": run.cmd_generate,
    "runs": read.cmd_runs,
    "show": read.cmd_show,
    "sql": read.cmd_sql,
    "index": read.cmd_index,
    "models": read.cmd_models,
    "gallery": run.cmd_gallery,
    "annotate": run.cmd_annotate,
    "eval": run.cmd_eval,
    "worker": run.cmd_worker,
    "depth": run.cmd_depth,
    "synth": run.cmd_synth,
}


def train_shapes(argv: list[str]) -> int:
    """`stepx train-shapes ...`: the embedded model's training script, with its own options."""
    from shapes.train import main as train_main

    train_main(argv)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `stepx` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-shapes"]:
        return train_shapes(argv[1:])
    from schema import SchemaVersionError
    from store import StoreError

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except CliError as exc:
        print(str(exc), file=sys.stderr)
        return exc.status
    except (StoreError, SchemaVersionError) as exc:
        print(f"stepx: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except KeyboardInterrupt:
        print("stepx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
