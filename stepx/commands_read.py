"""Read-side commands: runs, show, sql, index, models. No torch here except `models`' registry probe."""

from __future__ import annotations

import argparse
import json
import sys

from schema.layout import store_root
from stepx.commands_base import open_store, print_rows, terminal_text


def cmd_runs(args: argparse.Namespace) -> int:
    runs = open_store(args).runs(text=args.search, tag=args.tag, model=args.model, limit=args.limit)
    cols = ["run_id", "model_name", "seed", "steps", "prompt"]
    print_rows(cols, [tuple(r[c] for c in cols) for r in runs], "table")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = open_store(args)
    run = store.run(args.run_id)
    for k, v in run.items():
        if k != "config_json":
            print(f"{k:>18}: {terminal_text(v)}")
    print("\nwords:", terminal_text(" | ".join(f"{w.word_index}:{w.word}" for w in store.words(args.run_id))))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    res = open_store(args).sql(
        args.query, max_rows=args.max_rows, timeout_s=args.timeout_s, memory_limit_mb=args.memory_limit_mb
    )
    print_rows(res.columns, res.rows, args.format)
    if res.truncated:
        print(f"(truncated at {args.max_rows} rows; raise --max-rows)", file=sys.stderr)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from pipeline.index import rebuild_index

    report = rebuild_index(store_root(args.store))
    print(
        f"indexed {report.runs} runs in {report.seconds:.2f} s; removed {report.removed_tmp} partial runs of "
        f"stopped writers and {report.removed_index_files} unlisted index files"
    )
    if report.upgraded:
        print(f"upgraded {len(report.upgraded)} runs to DAAM word maps, recomputed from their stored level maps")
    for run_id, why in report.not_upgraded.items():
        print(f"run {run_id}: {why}", file=sys.stderr)
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
        entry = {"name": name, "title": f"depth: {spec.repo_id}", "present": ok, "where": where}
        entries.append({**entry, "default": name == "zoedepth", "role": "depth"})
    if args.format == "json":
        print(json.dumps(entries))
        return 0
    for e in entries:
        mark = " (default)" if e["default"] else ""
        print(f"{e['name']}{mark}: {e['title']} - {'present' if e['present'] else 'absent'}\n    {e['where']}")
    return 0
