"""Commands that run a model or write runs: generate, depth, gallery, annotate, eval, worker, synth."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from schema.layout import store_root
from stepx.commands_base import CliError, check_out_path, open_store, write_output


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate one traced image into the store; prints the run id."""
    from schema.limits import check_generation, check_prompt

    check_prompt(args.prompt, args.negative)
    if args.model is not None and not args.model.strip():
        raise CliError("stepx generate: --model is empty; see `stepx models` for the names", 2)
    from pipeline.generate import GenerationConfig, check_device, generate_trace
    from pipeline.models import ModelNotFoundError, default_model_name, get_spec, load_model
    from pipeline.trace_writer import write_trace

    name = args.model or ("sd15" if args.model_path else default_model_name())
    try:
        get_spec(name)  # an unknown name is bad input, before any weights load
    except ModelNotFoundError as exc:
        raise CliError(f"stepx generate: {exc}", 2) from None
    check_generation(name, args.steps, args.height, args.width, args.seed, args.guidance)
    from pipeline.concepts import parse_concepts

    concepts = parse_concepts(args.concepts)
    if concepts and get_spec(name).kind != "flux":
        raise CliError(f"stepx generate: --concepts (ConceptAttention) needs a FLUX.1 model; {name} is not one", 2)
    check_device(args.device)
    config = GenerationConfig(
        prompt=args.prompt,
        negative_prompt=args.negative,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        tags=args.tag,
        true_cfg=args.true_cfg,
        concepts=concepts,
    )
    depth = None
    if args.depth:
        from pipeline.depth import load_depth_model

        depth = load_depth_model(args.depth_model, args.depth_path)
    model = load_model(args.model, args.model_path, args.device)
    steps = config.resolved(model).steps  # the model's own checks (VAE factor, scheduler table) first
    with tqdm(total=steps, desc="stepx generate", unit="step", file=sys.stderr) as bar:

        def progress(step: int, total: int) -> None:
            bar.update(step - bar.n)

        trace = generate_trace(model, config, on_step=progress)
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
    """Estimate depth for a stored run (a companion map beside its files)."""
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
    """Build a curated gallery from a spec file, skipping runs already stored."""
    from jobs.gallery import DEFAULT_SPEC, build_gallery, load_spec
    from pipeline.models import ModelNotFoundError

    spec = Path(args.spec) if args.spec else DEFAULT_SPEC
    if not spec.is_file():
        raise CliError(f"stepx gallery: no spec file {spec}", 2)
    load_spec(spec)  # a malformed spec fails here with one line, before any model loads
    with tqdm(desc="stepx gallery", unit="run", file=sys.stderr) as bar:

        def progress(i: int, n: int, run_id: str) -> None:
            bar.total = n
            bar.set_postfix_str(run_id)
            bar.update(i - bar.n)

        try:
            report = build_gallery(store_root(args.store), spec, args.model, progress)
        except ModelNotFoundError as exc:
            raise CliError(f"stepx gallery: {exc}") from None
    print(json.dumps(report))
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    """Write TITAN object annotations of runs as a COCO JSON file."""
    from analysis.detection import GUIDED_BY_DEFAULT
    from analysis.titan import coco_for_runs, dumps

    check_out_path(args.out, "stepx annotate: --out")
    store = open_store(args)
    if args.run:
        store.run(args.run)
        run_ids = [args.run]
    else:
        run_ids = [r["run_id"] for r in store.runs(gallery=args.gallery)][::-1]
        if not run_ids:
            raise CliError(f"stepx annotate: no runs in gallery {args.gallery!r}")
    guided = GUIDED_BY_DEFAULT if args.guided is None else args.guided
    doc = coco_for_runs(store, run_ids, args.threshold, guided=guided)
    write_output(args.out, dumps(doc), "stepx annotate: --out")
    print(f"{len(doc['annotations'])} annotations on {len(doc['images'])} images -> {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.models import ModelNotFoundError
    from shapes.evaluate import evaluate, update_card, write_report
    from shapes.splits import check_suite

    if args.out:
        check_out_path(args.out, "stepx eval: --out")  # before minutes of evaluation, not after
    if args.card and not Path(args.card).is_file():
        raise CliError(f"stepx eval: --card {args.card} is not a model card file", 2)
    if args.card and args.split != "test":
        raise CliError("stepx eval: --card takes test-split numbers only (drop --split validation)", 2)
    try:
        check_suite(args.split, args.n, args.seeds)
    except ValueError as exc:
        raise CliError(f"stepx eval: {exc}", 2) from None
    try:
        report = evaluate(
            store_root(args.store), args.model, args.n, args.split, args.seeds, guidance=args.guidance, steps=args.steps
        )
    except ModelNotFoundError as exc:
        raise CliError(f"stepx eval: {exc}") from None
    print(report.table())
    if args.out:
        write_report(report, Path(args.out))
    if args.card:
        command = f"stepx eval --split {args.split} --seeds {args.seeds} --n {args.n} --steps {args.steps}" + (
            f" --guidance {args.guidance:g}" if args.guidance is not None else ""
        )
        try:
            update_card(Path(args.card), report, command)
        except OSError as exc:
            raise CliError(f"stepx eval: cannot update the model card: {exc}") from None
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Serve the dashboard's job queue."""
    from jobs.worker import serve
    from pipeline.generate import check_device

    check_device(args.device)
    return serve(store_root(args.store), args.once, args.poll, args.device)


def cmd_synth(args: argparse.Namespace) -> int:
    """Write synthetic runs (scale tests)."""
    from jobs.synth import synth_store

    root = store_root(args.store)
    try:
        report = synth_store(root, args.runs, args.steps, args.geometry, args.seed)
    except FileExistsError:  # run ids follow from --seed: the same seed into the same store repeats them
        raise CliError(
            f"stepx synth: {root} already holds the synthetic runs of --seed {args.seed}; pass another --seed "
            "or an empty --store",
            2,
        ) from None
    print(json.dumps(report))
    return 0
