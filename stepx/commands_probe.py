"""`stepx probe RUN --words "dog, sky"`: open-vocabulary maps for words not in a stored run's prompt."""

from __future__ import annotations

import argparse
import io

from schema.layout import store_root
from schema.stats import map_stats
from stepx.commands_base import CliError, open_store


def probe_words(text: str) -> list[str]:
    """The comma-separated probe texts of --words, stripped, empty ones dropped, duplicates once."""
    return list(dict.fromkeys(w.strip() for w in text.split(",") if w.strip()))


def cmd_probe(args: argparse.Namespace) -> int:
    """Re-run a stored run, refuse unless it reproduces bit for bit, store the probes' maps beside it."""
    from schema.limits import LimitError, check_prompt

    words = probe_words(args.words)
    if not words:
        raise CliError('stepx probe: --words has no words; give them comma-separated, e.g. --words "dog, sky"', 2)
    for w in words:
        try:
            check_prompt(w, "")
        except LimitError as exc:
            raise CliError(f"stepx probe: probe {w[:40]!r}: {exc}", 2) from None
    store = open_store(args)
    run = store.run(args.run_id)
    import numpy as np
    from PIL import Image

    from pipeline.generate import check_device
    from pipeline.models import ModelNotFoundError, load_model
    from pipeline.probe import ProbeRefused, compute_probes, probe_table, write_probes

    device = args.device or run["device"]
    check_device(device)
    data, _fmt = store.image(args.run_id)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    seed = run["model_id"].rsplit(":seed", 1)
    tiny_seed = int(seed[1]) if run["model_id"].startswith("in-process:") and len(seed) == 2 else 0
    try:
        model = load_model(run["model_name"], args.model_path, device, tiny_seed=tiny_seed)
    except ModelNotFoundError as exc:
        raise CliError(f"stepx probe: {exc}") from None
    try:
        result, _final = compute_probes(model, run, stored, words)
    except ProbeRefused as exc:
        raise CliError(f"stepx probe: refused: {exc}") from None
    write_probes(store_root(args.store), args.run_id, probe_table(args.run_id, result))
    fresh = open_store(args)
    for w in words:
        m = fresh.probe_map(args.run_id, w)
        stats = map_stats(m[None])
        cx, cy = float(stats["centroid_x"][0]), float(stats["centroid_y"][0])
        print(f"{w}: centroid x {cx:.2f} y {cy:.2f} (0-1), peak {m.max():.4g}")
    return 0
