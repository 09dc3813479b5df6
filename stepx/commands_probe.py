"""`stepx probe RUN --words "dog, sky"`: open-vocabulary maps for words not in a stored run's prompt;
`stepx probe-tune`: the shapes model's optimised probe tokens (OVAM), fitted on training scenes."""

from __future__ import annotations

import argparse
import sys

from schema.layout import store_root
from schema.stats import map_stats
from stepx.commands_base import CliError, check_out_path, open_store, os_error_line


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
    if args.tokens is not None and args.plain:
        raise CliError("stepx probe: --plain uses no optimised token; leave out --tokens", 2)
    if args.tokens is not None and not args.tokens.is_file():
        raise CliError(f"stepx probe: --tokens {args.tokens}: no such file", 2)
    open_store(args).run(args.run_id)  # an unknown run is one line before any model loads
    from jobs.probe import probe_run
    from pipeline.generate import check_device
    from pipeline.models import ModelNotFoundError
    from pipeline.probe import OPTIMISED, ProbeRefused
    from pipeline.probe_tokens import ProbeTokensError

    check_device(args.device)
    try:
        outcome = probe_run(
            store_root(args.store), args.run_id, words, args.device, args.model_path, args.plain, args.tokens
        )
    except ModelNotFoundError as exc:
        raise CliError(f"stepx probe: {exc}") from None
    except ProbeRefused as exc:
        raise CliError(f"stepx probe: refused: {exc}") from None
    except ProbeTokensError as exc:
        raise CliError(f"stepx probe: {exc}", 2) from None
    for note in outcome.notes:
        print(f"note: {note}", file=sys.stderr)
    store = open_store(args)
    for w in words:
        stats = map_stats(store.probe_map(args.run_id, w)[None])
        cx, cy, peak = (float(stats[k][0]) for k in ("centroid_x", "centroid_y", "peak"))
        how = " (optimised token)" if outcome.embeddings.get(w) == OPTIMISED else ""
        print(f"{w}{how}: centroid x {cx:.2f} y {cy:.2f} (0-1), peak {peak:.4g}")
    return 0


def cmd_probe_tune(args: argparse.Namespace) -> int:
    """Fit the shapes model's probe tokens on generated training scenes and write the tokens file."""
    if args.out.suffix != ".safetensors":
        raise CliError(f"stepx probe-tune: --out {str(args.out)[:80]!r}: give a *.safetensors file", 2)
    out = check_out_path(args.out)
    import torch

    from pipeline.models import ModelNotFoundError, load_model
    from shapes.probe_tune import tune

    torch.set_num_threads(1)  # small ops: threads cost more than they give
    try:
        model = load_model("shapes", device="cpu")
    except ModelNotFoundError as exc:
        raise CliError(f"stepx probe-tune: {exc}") from None
    tokens = tune(model, args.scenes, args.iterations, log=lambda line: print(line, flush=True))
    try:
        tokens.save(out)
    except OSError as exc:
        raise CliError(f"stepx probe-tune: --out: {os_error_line(exc)}") from None
    for word, rec in tokens.meta["words"].items():
        held = ""
        if "check_plain" in rec:
            held = f"; held out: centroid on object {rec['check_optimised']:.0%} vs plain {rec['check_plain']:.0%}"
        elif not rec["kept"]:
            held = f"; {rec.get('why', 'not kept')}"
        if rec["kept"]:
            print(f"{word}: {rec['examples']} images, loss {rec['loss_before']:.4f} -> {rec['loss_after']:.4f}{held}")
        else:
            print(f"{word}: no token kept (stays plain){held}")
    print(out)
    return 0
