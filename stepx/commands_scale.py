"""`stepx batch` and `stepx gallery build --ray`: many runs, locally or on a Ray cluster, into any store."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from stepx.commands_base import CliError, count, limited


def add_batch_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """The `stepx batch` sub-command's options."""
    b = sub.add_parser("batch", parents=[common], help="generate prompts x seeds (locally or on a Ray cluster)")
    b.add_argument("prompts", help="a .txt file (one prompt a line) or a .parquet file with a 'prompt' column")
    b.add_argument("--seeds", default="0", help="seeds, e.g. 0-9 or 0,2,5 (default 0)")
    b.add_argument("--model", help="registry name (see `stepx models`; default: the embedded model)")
    b.add_argument("--steps", type=limited("steps"), help="denoising steps (default: the model's)")
    b.add_argument("--gallery", help="name the runs' gallery")
    add_ray_options(b)


def add_ray_options(p: argparse.ArgumentParser) -> None:
    """--ray [ADDRESS] and --workers, shared by `batch` and `gallery build`."""
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster (ADDRESS such as ray://head:10001 or auto; none: a local cluster)",
    )
    p.add_argument("--workers", type=count(1024), help="model-holding actors (default: one per GPU, else per CPU)")


def _run(items: list, args: argparse.Namespace, model: str) -> dict:
    """Run items locally or on Ray with one progress bar for the whole job; the summary."""
    from jobs.batch import run_local, summary

    t0 = time.perf_counter()
    with tqdm(total=len(items), desc=f"stepx {args.command}", unit="run", file=sys.stderr) as bar:

        def on_result(r: dict) -> None:
            bar.update(1)
            if r["status"] == "failed":
                bar.write(f"failed: {r['prompt']!r} seed {r['seed']}: {r['error']}", file=sys.stderr)

        if args.ray is None:
            results = run_local(items, args.store, model, on_result)
        else:
            from jobs.ray_batch import run_ray

            results = run_ray(items, args.store, model, args.ray or None, args.workers, on_result)
    report = summary(results, time.perf_counter() - t0)
    from schema.location import parse_location

    loc = parse_location(args.store)
    if loc is not None:  # small index files stay bounded: every batch ends by compacting when there are many
        from pipeline.remote_index import maybe_compact

        compacted = maybe_compact(loc)
        if compacted:
            report["compacted"] = {t: f"{a} -> {b} files" for t, (a, b) in compacted.items()}
    return report


def _model(name: str | None) -> str:
    from pipeline.models import default_model_name, get_spec

    name = name or default_model_name()
    get_spec(name)  # an unknown name fails here with one line
    return name


def cmd_batch(args: argparse.Namespace) -> int:
    """Generate every prompt of a file with every seed into the store; exit 1 when any item failed."""
    from jobs.batch import BatchError, BatchItem, parse_seeds, read_prompts

    try:
        prompts, seeds = read_prompts(Path(args.prompts)), parse_seeds(args.seeds)
    except BatchError as exc:
        raise CliError(f"stepx batch: {exc}", 2) from None
    if args.workers is not None and args.workers < 1:
        raise CliError("stepx batch: --workers must be at least 1", 2)
    items = [BatchItem(p, s, args.steps, args.gallery) for p in prompts for s in seeds]
    report = _run(items, args, _model(args.model))
    print(json.dumps(report))
    return 1 if report["failed"] else 0


def cmd_gallery_scaled(args: argparse.Namespace) -> int:
    """`stepx gallery build` with --ray or into an S3 store: the spec's items as a batch (same gallery and tags)."""
    from jobs.batch import BatchItem
    from jobs.gallery import DEFAULT_SPEC, load_spec

    spec_path = Path(args.spec) if args.spec else DEFAULT_SPEC
    if not spec_path.is_file():
        raise CliError(f"stepx gallery: no spec file {spec_path}", 2)
    spec, entries = load_spec(spec_path)
    items = [BatchItem(e.prompt, e.seed, spec.get("steps"), spec["name"], tuple(e.tags)) for e in entries]
    report = _run(items, args, _model(args.model or spec.get("model")))
    print(json.dumps({"gallery": spec["name"], **report}))
    return 1 if report["failed"] else 0


def cmd_gallery(args: argparse.Namespace) -> int:
    """`stepx gallery build`: on Ray or into an S3 store as a batch, else the local build as before."""
    from schema.location import is_remote
    from stepx import commands_run

    if args.ray is not None or is_remote(args.store):
        return cmd_gallery_scaled(args)
    return commands_run.cmd_gallery(args)
