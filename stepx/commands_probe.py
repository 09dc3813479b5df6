"""`stepx probe RUN --words "dog, sky"`: open-vocabulary maps for words not in a stored run's prompt."""

from __future__ import annotations

import argparse

from schema.layout import store_root
from schema.stats import map_stats
from stepx.commands_base import CliError, open_store


def cmd_probe(args: argparse.Namespace) -> int:
    """Re-run a stored run, refuse unless it reproduces bit for bit, store the probes' maps beside it."""
    from jobs.queue import probe_words
    from schema.limits import LimitError, check_prompt

    words = probe_words(args.words)
    if not words:
        raise CliError('stepx probe: --words has no words; give them comma-separated, e.g. --words "dog, sky"', 2)
    for w in words:
        try:
            check_prompt(w, "")
        except LimitError as exc:
            raise CliError(f"stepx probe: probe {w[:40]!r}: {exc}", 2) from None
    open_store(args).run(args.run_id)  # an unknown run is one line before any model loads
    from jobs.probe import probe_run
    from pipeline.generate import check_device
    from pipeline.models import ModelNotFoundError
    from pipeline.probe import ProbeRefused

    check_device(args.device)
    try:
        probe_run(store_root(args.store), args.run_id, words, args.device, args.model_path)
    except ModelNotFoundError as exc:
        raise CliError(f"stepx probe: {exc}") from None
    except ProbeRefused as exc:
        raise CliError(f"stepx probe: refused: {exc}") from None
    store = open_store(args)
    for w in words:
        stats = map_stats(store.probe_map(args.run_id, w)[None])
        cx, cy, peak = (float(stats[k][0]) for k in ("centroid_x", "centroid_y", "peak"))
        print(f"{w}: centroid x {cx:.2f} y {cy:.2f} (0-1), peak {peak:.4g}")
    return 0
