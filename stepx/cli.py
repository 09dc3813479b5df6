"""The `stepx` command line.

    stepx generate "a red circle on the left" --steps 20 --seed 1
    stepx runs | stepx show RUN | stepx sql "SELECT ..." | stepx index rebuild | stepx models

Torch is imported only by the commands that run a model. Bad arguments exit with status 2 and one
line on stderr; store and model problems exit with status 1 and one line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from schema.layout import store_root


class CliError(Exception):
    """A failure to report as one line, with an exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


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


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise CliError("stepx generate: the prompt is empty; give a text prompt such as 'a red circle'", 2)
    if args.model is not None and not args.model.strip():
        raise CliError("stepx generate: --model is empty; see `stepx models` for the names", 2)
    from pipeline.generate import (
        GenerationConfig,
        GenerationError,
        generate_trace,
        validate_prompt,
    )
    from pipeline.models import ModelNotFoundError, load_model
    from pipeline.trace_writer import write_trace

    config = GenerationConfig(
        prompt=args.prompt,
        negative_prompt=args.negative,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        tags=args.tag,
    )
    try:
        validate_prompt(config)
        depth = None
        if args.depth:
            from pipeline.depth import load_depth_model

            depth = load_depth_model(args.depth_model, args.depth_path)
        model = load_model(args.model, args.model_path, args.device)
        tty = sys.stderr.isatty()

        def progress(step: int, total: int) -> None:
            bar = "#" * (20 * step // total)
            end = "\r" if tty and step < total else "\n"
            sys.stderr.write(f"step {step:>3}/{total} [{bar:<20}]{end}")
            sys.stderr.flush()

        trace = generate_trace(model, config, on_step=progress)
    except (GenerationError, ModelNotFoundError) as exc:
        raise CliError(f"stepx generate: {exc}", 2 if isinstance(exc, GenerationError) else 1) from None
    written = write_trace(store_root(args.store), trace)
    if trace.run["prompt_truncated"]:
        kept = sum(t.kind == "word" for t in trace.tokens)
        print(f"stepx generate: note: the prompt was cut to its first {kept} tokens", file=sys.stderr)
    if depth is not None:
        from jobs.depth import depth_for_run

        depth_for_run(store_root(args.store), written.run_id, depth)
    print(written.run_id)
    return 0


def cmd_depth(args: argparse.Namespace) -> int:
    from jobs.depth import depth_for_run
    from pipeline.depth import load_depth_model
    from pipeline.models import ModelNotFoundError

    _store(args).run(args.run_id)
    try:
        depth = load_depth_model(args.depth_model, args.depth_path)
    except ModelNotFoundError as exc:
        raise CliError(f"stepx depth: {exc}") from None
    print(depth_for_run(store_root(args.store), args.run_id, depth))
    return 0


def _print_rows(columns: list[str], rows: list[tuple], fmt: str) -> None:
    if fmt == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(columns)
        w.writerows(rows)
    elif fmt == "json":
        print(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str, indent=1))
    else:
        cells = [[str(c) for c in columns]] + [["" if v is None else str(v) for v in r] for r in rows]
        widths = [min(60, max(len(row[i]) for row in cells)) for i in range(len(columns))]
        for n, row in enumerate(cells):
            print("  ".join(v[:60].ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
            if n == 0:
                print("  ".join("-" * w for w in widths))


def _store(args: argparse.Namespace) -> object:
    from store import Store

    return Store(store_root(args.store))


def cmd_runs(args: argparse.Namespace) -> int:
    runs = _store(args).runs(text=args.search, tag=args.tag, model=args.model, limit=args.limit)
    cols = ["run_id", "model_name", "seed", "steps", "prompt"]
    _print_rows(cols, [tuple(r[c] for c in cols) for r in runs], "table")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = _store(args)
    run = store.run(args.run_id)
    for k, v in run.items():
        if k != "config_json":
            print(f"{k:>18}: {v}")
    print("\nwords:", " | ".join(f"{w.word_index}:{w.word}" for w in store.words(args.run_id)))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    res = _store(args).sql(args.query, max_rows=args.max_rows, timeout_s=args.timeout)
    _print_rows(res.columns, res.rows, args.format)
    if res.truncated:
        print(f"(truncated at {args.max_rows} rows; raise --max-rows)", file=sys.stderr)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from pipeline.index import rebuild_index

    report = rebuild_index(store_root(args.store))
    print(f"indexed {report.runs} runs in {report.seconds:.2f} s; removed {report.removed_tmp} stale partial runs")
    for run_id, why in report.bad_runs.items():
        print(f"bad run {run_id}: {why}", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pipeline.models import REGISTRY, availability, default_model_name

    default = default_model_name()
    entries = []
    for spec in REGISTRY.values():
        ok, where = availability(spec)
        entries.append(
            {
                "name": spec.name,
                "title": spec.title,
                "present": ok,
                "where": where,
                "default": spec.name == default,
                "size": spec.size,
                "steps": spec.steps,
                "guidance": spec.guidance,
                "role": "generate",
            }
        )
    from pipeline.depth import DEPTH_MODELS, depth_availability

    for name, spec in DEPTH_MODELS.items():
        ok, where = depth_availability(name)
        entries.append({"name": name, "title": f"depth: {spec.repo_id}", "present": ok, "where": where,
                        "default": name == "zoedepth", "role": "depth"})  # fmt: skip
    if args.format == "json":
        print(json.dumps(entries))
        return 0
    for e in entries:
        mark = " (default)" if e["default"] else ""
        print(f"{e['name']}{mark}: {e['title']} - {'present' if e['present'] else 'absent'}\n    {e['where']}")
    return 0


def cmd_gallery(args: argparse.Namespace) -> int:
    from jobs.gallery import DEFAULT_SPEC, build_gallery
    from pipeline.models import ModelNotFoundError

    def progress(i: int, n: int, run_id: str) -> None:
        print(f"run {i}/{n}: {run_id}", file=sys.stderr, flush=True)

    spec = Path(args.spec) if args.spec else DEFAULT_SPEC
    if not spec.is_file():
        raise CliError(f"stepx gallery: no spec file {spec}", 2)
    try:
        report = build_gallery(store_root(args.store), spec, args.model, progress)
    except ModelNotFoundError as exc:
        raise CliError(f"stepx gallery: {exc}") from None
    print(json.dumps(report))
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    from analysis.titan import coco_for_runs, dumps

    threshold: str | float = args.threshold
    if threshold != "otsu":
        try:
            threshold = float(threshold)
        except ValueError:
            raise CliError("stepx annotate: --threshold is 'otsu' or a number between 0 and 1", 2) from None
        if not 0 < threshold < 1:
            raise CliError("stepx annotate: --threshold is 'otsu' or a number between 0 and 1", 2)
    store = _store(args)
    if args.run:
        store.run(args.run)
        run_ids = [args.run]
    else:
        run_ids = [r["run_id"] for r in store.runs(gallery=args.gallery)][::-1]
        if not run_ids:
            raise CliError(f"stepx annotate: no runs in gallery {args.gallery!r}")
    doc = coco_for_runs(store, run_ids, threshold, guided=not args.daam_only)
    Path(args.out).write_text(dumps(doc))
    print(f"{len(doc['annotations'])} annotations on {len(doc['images'])} images -> {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.models import ModelNotFoundError
    from shapes.evaluate import evaluate, update_card, write_report

    try:
        report = evaluate(store_root(args.store), args.model, args.n, guidance=args.guidance, steps=args.steps)
    except ModelNotFoundError as exc:
        raise CliError(f"stepx eval: {exc}") from None
    print(report.table())
    if args.out:
        write_report(report, Path(args.out))
    if args.card:
        command = f"stepx eval --n {args.n} --steps {args.steps}" + (
            f" --guidance {args.guidance:g}" if args.guidance is not None else ""
        )
        try:
            update_card(Path(args.card), report, command)
        except OSError as exc:
            raise CliError(f"stepx eval: cannot update the model card: {exc}") from None
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from jobs.worker import serve

    return serve(store_root(args.store), args.once, args.poll, args.device)


def cmd_synth(args: argparse.Namespace) -> int:
    from jobs.synth import synth_store

    report = synth_store(store_root(args.store), args.runs, args.steps, args.geometry, args.seed)
    print(json.dumps(report))
    return 0


COMMANDS = {
    "generate": cmd_generate,
    "runs": cmd_runs,
    "show": cmd_show,
    "sql": cmd_sql,
    "index": cmd_index,
    "models": cmd_models,
    "gallery": cmd_gallery,
    "annotate": cmd_annotate,
    "eval": cmd_eval,
    "worker": cmd_worker,
    "depth": cmd_depth,
    "synth": cmd_synth,
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
