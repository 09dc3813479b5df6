"""Commands that run a model or write runs: generate, depth, gallery, annotate, eval, worker, synth."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from schema.layout import store_root
from stepx.commands_base import CliError, open_store


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

    open_store(args).run(args.run_id)
    try:
        depth = load_depth_model(args.depth_model, args.depth_path)
    except ModelNotFoundError as exc:
        raise CliError(f"stepx depth: {exc}") from None
    print(depth_for_run(store_root(args.store), args.run_id, depth))
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
    store = open_store(args)
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
