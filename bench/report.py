"""bench/README.md from bench/results.json: one table, each figure beside its target."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _row(what: str, value: str, target: str = "", met: bool | None = None) -> str:
    mark = "" if met is None else ("met" if met else "**missed**")
    return f"| {what} | {value} | {target} | {mark} |"


def write_readme(r: dict, path: Path) -> None:
    """Render the results as a Markdown table with machine, versions and date."""
    lines = [
        "# StepX benchmarks",
        "",
        f"Measured {r['date']} by `make bench` on {r['machine']['platform']} ({r['machine']['cpus']} CPUs, "
        f"torch threads {r['machine']['torch_threads']} unless a row says otherwise); "
        f"torch {r['versions']['torch']}, diffusers "
        f"{r['versions']['diffusers']}, Python {r['versions']['python']}. Ratios are traced / untraced calls "
        "interleaved in one run (medians). Raw figures: `results.json`.",
        "",
    ]
    if "remeasured" in r:  # some rows measured again alone, after a change that moves only them
        m = r["remeasured"]
        lines += [f"Re-measured {m['at']} after {m['why']}: {', '.join(m['what'])} (the same functions).", ""]
    lines += [
        "| what | measured | target | |",
        "|---|---|---|---|",
    ]
    for c in r["capture_overhead"]:
        lines.append(
            _row(
                f"capture overhead, {c['model']} {c['size_px']} px, {c['steps']} steps, "
                f"{c.get('threads', 1)} thread(s) (levels {', '.join(c['levels'])})",
                f"{c['overhead_ratio']:.3f}x ({c['untraced_s_median']:.2f} s -> {c['traced_s_median']:.2f} s)",
                f"<= {c['target_ratio']:.2f}x",
                c["overhead_ratio"] <= c["target_ratio"],
            )
        )
        if "capture_extra_peak_mb" in c:
            lines.append(_row(f"peak extra memory of capture, {c['model']}", f"{c['capture_extra_peak_mb']:.1f} MB"))
    t = r["trace_bytes"]
    lines.append(
        _row(f"trace bytes per run, {t['model']} ({t['steps']} steps, {t['size_px']} px)", f"{t['bytes'] / 1e6:.2f} MB")
    )
    p = r["projected_sd15_trace"]
    lines.append(
        _row(
            "trace size, SD 1.5 geometry (512 px, 50 steps, 12 tokens)",
            f"{p['mb']:.2f} MB",
            f"<= {p['target_mb']} MB",
            p["mb"] <= p["target_mb"],
        )
    )
    dit = r.get("dit", {})
    for c in dit.get("capture_overhead", []):
        lines.append(
            _row(
                f"DiT capture overhead, {c['model']} {c['size_px']} px, {c['steps']} steps, "
                f"true CFG {c['true_cfg']:g}, 1 thread (bands {', '.join(c['bands'])})",
                f"{c['overhead_ratio']:.3f}x ({c['untraced_s_median']:.2f} s -> {c['traced_s_median']:.2f} s)",
                f"<= {c['target_ratio']:.2f}x",
                c["overhead_ratio"] <= c["target_ratio"],
            )
        )
    for key, what in (
        ("projected_sd3_1024_28_steps", "trace size, SD3 geometry (1024 px, 28 steps)"),
        ("projected_flux_schnell_1024_4_steps", "trace size, FLUX.1-schnell geometry (1024 px, 4 steps)"),
    ):
        if key in dit:
            p = dit[key]
            lines.append(_row(what, f"{p['mb']:.2f} MB", f"<= {p['target_mb']} MB", p["mb"] <= p["target_mb"]))
    for lk in r["word_map_lookup"]:
        lines.append(
            _row(
                f"word-map lookup, {lk['runs']:,} runs (p50 / p95)",
                f"{lk['p50_ms']} / {lk['p95_ms']} ms",
                f"p50 <= {lk['target_p50_ms']} ms",
                lk["p50_ms"] <= lk["target_p50_ms"],
            )
        )
    for q in r["sql_aggregate"]:
        what = f"SQL aggregate over word_step_stats, {q['runs']:,} runs ({q['word_step_stats_rows']:,} rows)"
        lines.append(
            _row(
                what,
                f"{q['warm_p50_ms']} ms (first query {q['cold_ms']} ms)",
                f"<= {q['target_ms']} ms",
                q["warm_p50_ms"] <= q["target_ms"],
            )
        )
    if "index_rebuild" in r:
        ir = r["index_rebuild"]
        lines.append(_row(f"index rebuild, {ir['runs']:,} runs", f"{ir['rebuild_s']} s"))
        lines.append(_row(f"store size, {ir['runs']:,} synthetic runs", f"{ir['store_gb']} GB"))
    d = r["dashboard"]
    lines.append(
        _row(
            "step slider rerun (server side, p50 / p95)",
            f"{d['slider_rerun_p50_ms']} / {d['slider_rerun_p95_ms']} ms",
            f"<= {d['target_slider_ms']} ms",
            d["slider_rerun_p50_ms"] <= d["target_slider_ms"],
        )
    )
    if "region_rerun_p50_ms" in d:
        lines.append(
            _row(
                "region tool rerun (server side, p50 / p95)",
                f"{d['region_rerun_p50_ms']} / {d['region_rerun_p95_ms']} ms",
            )
        )
    lines.append(
        _row(f"Export All, {d['run_steps']}-step run", f"{d['export_all_s']} s ({d['export_all_bytes'] / 1e6:.1f} MB)")
    )
    g = r["regions"]
    cold, diffuse = g["region_query_cold_p50_ms"], g["diffuse_20_iter_1024_p50_ms"]
    lines.append(
        _row(
            "region query (read + rows mean, cold)",
            f"{cold} ms",
            f"<= {g['target_region_ms']} ms",
            cold <= g["target_region_ms"],
        )
    )
    lines.append(
        _row(
            "diffused heatmap, 20 iterations, 1024x1024",
            f"{diffuse} ms",
            f"<= {g['target_diffuse_ms']} ms",
            diffuse <= g["target_diffuse_ms"],
        )
    )
    if "queue" in r:
        lines.append(
            _row("queue: submit to first step (worker waiting)", f"{r['queue']['submit_to_first_step_p50_s']} s")
        )
    if "capture_profile" in r:
        cp = r["capture_profile"]
        base = cp["untraced_ms_per_step"]
        lines += [
            "",
            f"## Where capture's time goes ({cp['model']}, per denoising step)",
            "",
            f"An untraced step takes {base:.2f} ms; capture adds {cp['extra_ms_per_step']:.2f} ms "
            f"({cp['extra_ms_per_step'] / base:.1%}). Each line is one batched softmax over the layers of a "
            f"level; memory copy bandwidth on this machine: {cp['copy_gb_s']} GB/s.",
            "",
            "| part | ms per step | share of an untraced step | probabilities computed |",
            "|---|---|---|---|",
        ]
        for label, ms in cp["softmax_groups_ms_per_step"].items():
            lines.append(f"| {label} | {ms:.3f} | {ms / base:.1%} | {cp['probabilities_per_step'][label]:,} |")
        other = cp["other_capture_ms_per_step"]
        lines.append(f"| processors, hooks, host copy, previews' x0 | {other:.3f} | {other / base:.1%} | |")
    notes = r.get("notes", [])
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    Path(path).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    write_readme(json.loads((here / "results.json").read_text()), here / "README.md")
    sys.exit(0)
