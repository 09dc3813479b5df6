"""StepX benchmarks: `make bench` (or `python -m bench.run [--quick]`) writes bench/results.json.

Ratios are measured side by side in one run (traced and untraced calls interleaved, medians), so
machine noise hits both sides alike. Targets come from the issues and are recorded beside each figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from schema.maps import level_label

HERE = Path(__file__).resolve().parent
TMP = HERE / "tmp"


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def _capture_plan(model: object, px: int, steps: int, guidance: float) -> tuple[object, object, list]:
    """The benchmark prompt's resolved config, its capture plan and the UNet's attention levels."""
    from pipeline.capture import CapturePlan, plan_grids
    from pipeline.generate import GenerationConfig, prompt_tokens

    pipe = model.pipe
    cfg = GenerationConfig(
        "a red circle on the left and a blue square on the right",
        seed=0,
        steps=steps,
        guidance=guidance,
        width=px,
        height=px,
    ).resolved(model)
    tokens, _ = prompt_tokens(pipe.tokenizer, cfg.prompt)
    latent = (cfg.height // pipe.vae_scale_factor, cfg.width // pipe.vae_scale_factor)
    self_grid, step_grid, levels = plan_grids(pipe.unet, latent)
    keep = tuple(t.token_index for t in tokens if t.has_map)
    return cfg, CapturePlan(latent, keep, self_grid, step_grid, cfg.guidance > 1, cfg.guidance), levels


def capture_overhead(
    model_name: str, layout: str | None, px: int, steps: int, pairs: int, guidance: float, threads: int = 1
) -> dict:
    """Median traced / untraced denoising time of one pipeline, calls interleaved, on `threads` threads."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)

    from pipeline.capture import AttentionRecorder, attention_capture
    from pipeline.generate import run_pipeline
    from pipeline.models import LoadedModel, load_model, module_fingerprint

    if layout == "sd15-full":
        model = LoadedModel(load_model("tiny-random").spec, _sd15_random(), "random:sd15-config", "", "cpu", "float32")
        model.fingerprint = module_fingerprint(model.pipe.unet)[:8]
    else:
        model = load_model(model_name, device="cpu")
    pipe = model.pipe
    cfg, plan, levels = _capture_plan(model, px, steps, guidance)
    self_grid, step_grid = plan.self_grid, plan.step_grid
    plain, traced = [], []
    run_pipeline(model, cfg)  # warm-up
    _reset_peak()
    run_pipeline(model, cfg)
    plain_peak = _peak_rss_mb()
    _reset_peak()
    with attention_capture(pipe, AttentionRecorder(plan)):
        run_pipeline(model, cfg)
    traced_peak = _peak_rss_mb()
    for i in range(pairs):
        order = ["plain", "traced"] if i % 2 == 0 else ["traced", "plain"]
        for kind in order:
            t0 = time.perf_counter()
            if kind == "plain":
                run_pipeline(model, cfg)
                plain.append(time.perf_counter() - t0)
            else:
                rec = AttentionRecorder(plan)
                with attention_capture(pipe, rec):
                    run_pipeline(model, cfg)
                traced.append(time.perf_counter() - t0)
    torch.set_num_threads(previous_threads)
    return {
        "model": model_name if layout != "sd15-full" else "sd15 architecture, random weights",
        "threads": threads,
        "size_px": px,
        "steps": steps,
        "guidance": guidance,
        "levels": [level_label(key) for key in levels],
        "self_grid": f"{self_grid[0]}x{self_grid[1]}",
        "step_grid": f"{step_grid[0]}x{step_grid[1]}",
        "pairs": pairs,
        "untraced_s_median": round(_median(plain), 4),
        "traced_s_median": round(_median(traced), 4),
        "overhead_ratio": round(_median(traced) / _median(plain), 4),
        "target_ratio": 1.10,
        "peak_rss_untraced_mb": round(plain_peak, 1),
        "peak_rss_traced_mb": round(traced_peak, 1),
        "capture_extra_peak_mb": round(traced_peak - plain_peak, 1),
    }


def capture_profile(model_name: str, px: int, steps: int, guidance: float, runs: int = 6) -> dict:
    """Where a traced call's extra time goes, per denoising step: each batched softmax group
    (kind x grid, with how many probabilities it computes), the rest of capture, and the memory
    bandwidth of this machine (the softmax groups stream their probabilities through memory)."""
    from collections import defaultdict

    import torch

    from pipeline import capture
    from pipeline.capture import AttentionRecorder, attention_capture
    from pipeline.generate import run_pipeline
    from pipeline.models import load_model

    model = load_model(model_name, device="cpu")
    pipe = model.pipe
    cfg, plan, _ = _capture_plan(model, px, steps, guidance)
    latent = plan.latent
    spent: dict[str, float] = defaultdict(float)
    probabilities: dict[str, int] = {}
    original = capture.AttentionRecorder._drain

    def timed_drain(rec: AttentionRecorder) -> None:
        pending = rec._pending
        for key, queue in list(pending.items()):
            kind, q_shape, k_shape = key[0], key[2], key[3]  # (kind, level, q shape, k shape, ...)
            label = f"{kind}-attention softmax, {capture.grid_of(q_shape[1], latent)[0]}x" + (
                f"{capture.grid_of(q_shape[1], latent)[1]} ({len(queue)} layers x {q_shape[0]} heads)"
            )
            probabilities[label] = len(queue) * q_shape[0] * q_shape[1] * k_shape[1]
            rec._pending = {key: queue}
            t0 = time.perf_counter()
            original(rec)
            spent[label] += time.perf_counter() - t0
        rec._pending = {}
        rec._pending_bytes = 0

    run_pipeline(model, cfg)
    plain, traced = [], []
    capture.AttentionRecorder._drain = timed_drain
    try:
        with attention_capture(pipe, AttentionRecorder(plan)):
            run_pipeline(model, cfg)
        spent.clear()
        for _ in range(runs):
            t0 = time.perf_counter()
            run_pipeline(model, cfg)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with attention_capture(pipe, AttentionRecorder(plan)):
                run_pipeline(model, cfg)
            traced.append(time.perf_counter() - t0)
    finally:
        capture.AttentionRecorder._drain = original
    per_step = {k: round(v / runs / steps * 1000, 3) for k, v in spent.items()}
    extra = (sum(traced) - sum(plain)) / runs / steps * 1000
    src = torch.randn(786_432)
    dst = torch.empty_like(src)
    copies = []
    for _ in range(50):
        t0 = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - t0)
    return {
        "model": model_name,
        "untraced_ms_per_step": round(sum(plain) / runs / steps * 1000, 3),
        "extra_ms_per_step": round(extra, 3),
        "softmax_groups_ms_per_step": per_step,
        "other_capture_ms_per_step": round(extra - sum(per_step.values()), 3),
        "probabilities_per_step": probabilities,
        "copy_gb_s": round(2 * src.numel() * 4 / _median(copies) / 1e9, 1),
    }


def _reset_peak() -> None:
    """Reset the process's peak resident memory (Linux: VmHWM)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _sd15_random():
    """Stable Diffusion 1.5's real architecture (UNet, VAE, CLIP ViT-L text encoder), random weights."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.tiny import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        scaling_factor=0.18215,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            vocab_size=49408,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    sched = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trace_bytes(model_name: str) -> dict:
    """Bytes on disk of one traced run at the model's defaults."""
    from pipeline.generate import GenerationConfig, generate_trace
    from pipeline.models import load_model
    from pipeline.trace_writer import write_trace

    store = TMP / f"trace-{model_name}"
    shutil.rmtree(store, ignore_errors=True)
    model = load_model(model_name, device="cpu")
    trace = generate_trace(model, GenerationConfig("a red circle on the left and a blue square on the right"))
    written = write_trace(store, trace)
    files = {p.name: p.stat().st_size for p in written.path.glob("*.parquet")}
    return {
        "model": model_name,
        "run_id": written.run_id,
        "steps": trace.run["steps"],
        "size_px": trace.run["width"],
        "bytes": written.bytes,
        "files": files,
    }


def projected_sd15_bytes() -> dict:
    """A synthetic trace with SD 1.5 geometry (512 px, 50 steps, 12 prompt tokens) through the real writer."""
    from jobs.synth import synth_trace
    from pipeline.trace_writer import build_tables, write_tables

    store = TMP / "sd15-projection"
    shutil.rmtree(store, ignore_errors=True)
    trace = synth_trace(np.random.default_rng(0), datetime(2026, 1, 1, tzinfo=UTC), "sd15", steps=50, n_words=12)
    written = write_tables(store, trace.run["run_id"], build_tables(trace), 50)
    files = {p.name: p.stat().st_size for p in written.path.glob("*.parquet")}
    return {
        "geometry": "sd15 512px, 50 steps, 12 prompt tokens (+ end token), synthetic maps",
        "bytes": written.bytes,
        "mb": round(written.bytes / 1e6, 2),
        "files": files,
        "target_mb": 10,
    }


def lookup_latency(n_runs: int, lookups: int = 300) -> dict:
    """Word-map lookups (random run, word, step; cold per-run cache) on a synthetic store."""
    from jobs.synth import synth_store
    from store import GLOBAL, Store

    store_dir = TMP / f"synth-{n_runs}"
    marker = store_dir / ".complete"
    build = {}
    if not marker.exists():
        shutil.rmtree(store_dir, ignore_errors=True)
        build = synth_store(store_dir, n_runs, steps=20, seed=1)
        marker.touch()
    store = Store(store_dir, cache_runs=8)
    runs = [r["run_id"] for r in store.runs()]
    rng = random.Random(0)
    times = []
    for _ in range(lookups):
        rid = rng.choice(runs)
        t0 = time.perf_counter()
        words = store.words(rid)
        word = rng.choice([GLOBAL] + [w.word for w in words])
        store.word_map(rid, word, step=rng.randrange(20))
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "runs": n_runs,
        "lookups": lookups,
        "p50_ms": round(_pct(times, 50), 2),
        "p95_ms": round(_pct(times, 95), 2),
        "target_p50_ms": 10,
        "store_build": build,
    }


def dashboard_timings(store_dir: Path, run_id: str, moves: int = 60, pace_s: float = 0.6) -> dict:
    """Server-side rerun time of the Inspect page over `moves` consecutive step-slider moves (AppTest), paced
    `pace_s` apart so the run spans more than a 30 s cache period (a periodic stall would show in the max),
    with the model-list subprocess calls counted; and Export All of the run.

        .venv/bin/python -c "from bench.run import *; print(dashboard_timings(Path('STORE'), 'RUN_ID'))"
    """
    import os
    import subprocess

    from streamlit.testing.v1 import AppTest

    from dashboard.export import export_all
    from store import Store

    os.environ["STEPX_STORE"] = str(store_dir)
    real_run, model_calls = subprocess.run, []

    def counting(cmd, *a, **kw):  # the model-availability subprocess used to stall a rerun every 30 s
        if "models" in cmd:
            model_calls.append(time.perf_counter())
        return real_run(cmd, *a, **kw)

    subprocess.run = counting
    try:
        at = AppTest.from_file(str(HERE.parent / "dashboard" / "views" / "inspect.py"), default_timeout=120)
        at.query_params["run"] = run_id
        at.run()
        steps = Store(store_dir).run(run_id)["steps"]
        times = []
        for i in range(moves):
            time.sleep(pace_s)
            t0 = time.perf_counter()
            at.slider(key="inspect_step").set_value(1 + (i * 7) % steps).run()
            times.append((time.perf_counter() - t0) * 1000)
            assert not at.exception, at.exception
    finally:
        subprocess.run = real_run
    t0 = time.perf_counter()
    data = export_all(Store(store_dir), run_id)
    export_s = time.perf_counter() - t0
    return {
        "run_steps": steps,
        "slider_moves": moves,
        "slider_pace_s": pace_s,
        "slider_rerun_p50_ms": round(_pct(times, 50), 1),
        "slider_rerun_p95_ms": round(_pct(times, 95), 1),
        "slider_rerun_max_ms": round(max(times), 1),
        "slider_model_list_calls": len(model_calls),
        "target_slider_ms": 150,
        "export_all_s": round(export_s, 2),
        "export_all_bytes": len(data),
    }


def region_timings(store_dir: Path, run_id: str, repeats: int = 50) -> dict:
    """Region query latency on a stored run (read + dequantise + rows mean, cold and warm), and the
    diffused heatmap with 20 iterations on a 1024x1024 self-attention matrix."""
    from analysis.regions import bbox_cells, diffuse, region_map
    from store import Store

    cold, warm = [], []
    for _ in range(repeats):
        store = Store(store_dir)  # fresh: nothing cached
        t0 = time.perf_counter()
        sa = store.self_attention(run_id)
        cells = bbox_cells((8, 8, 40, 40), (64, 64), sa.grid)
        region_map(sa.matrix, cells, sa.grid)
        cold.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        region_map(sa.matrix, cells, sa.grid)
        warm.append((time.perf_counter() - t0) * 1000)
    rng = np.random.default_rng(0)
    big = rng.random((1024, 1024)).astype(np.float32) ** 8
    big /= big.sum(axis=1, keepdims=True)
    diffuse(big, 100, (32, 32), 20, 0.2)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        diffuse(big, 100, (32, 32), 20, 0.2)
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "self_grid": f"{sa.grid[0]}x{sa.grid[1]}",
        "region_query_cold_p50_ms": round(_pct(cold, 50), 2),
        "region_query_warm_p50_ms": round(_pct(warm, 50), 3),
        "target_region_ms": 50,
        "diffuse_20_iter_1024_p50_ms": round(_pct(times, 50), 2),
        "target_diffuse_ms": 200,
    }


SQL_AGGREGATE = """
SELECT word, level, avg(mass) AS mass, avg(entropy) AS entropy, avg(spread) AS spread, count(*) AS n
FROM word_step_stats GROUP BY word, level ORDER BY mass DESC"""


def sql_aggregate(n_runs: int, repeats: int = 5) -> dict:
    """An aggregate over word_step_stats on a synthetic store (cold first query, then warm)."""
    from store import Store

    store_dir = TMP / f"synth-{n_runs}"
    t0 = time.perf_counter()
    store = Store(store_dir)
    first = store.sql(SQL_AGGREGATE)
    cold = (time.perf_counter() - t0) * 1000
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        store.sql(SQL_AGGREGATE)
        warm.append((time.perf_counter() - t0) * 1000)
    rows = store.sql("SELECT count(*) FROM word_step_stats").rows[0][0]
    return {
        "runs": n_runs,
        "word_step_stats_rows": rows,
        "groups": len(first.rows),
        "cold_ms": round(cold, 1),
        "warm_p50_ms": round(_pct(warm, 50), 1),
        "target_ms": 500,
    }


def queue_latency(jobs_n: int = 3) -> dict:
    """Seconds from submitting a job to its first denoising step, with a worker already waiting."""
    import os
    import subprocess
    import sys

    from jobs import queue

    store = TMP / "queue"
    shutil.rmtree(store, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "stepx.cli", "worker", "--store", str(store), "--poll", "0.2"],
        cwd=HERE.parent,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        request = {
            "prompt": "a red circle",
            "model": "tiny-random",
            "seed": 0,
            "steps": 3,
            "guidance": 3.0,
            "width": 64,
            "height": 64,
        }
        warm = queue.submit(store, request)  # loads the model
        while (j := queue.get(store, warm)).status not in ("done", "failed"):
            time.sleep(0.05)
        latencies = []
        for _ in range(jobs_n):
            t0 = time.time()
            job_id = queue.submit(store, request)
            while (j := queue.get(store, job_id)).step < 1 and j.status not in ("done", "failed"):
                time.sleep(0.01)
            latencies.append(time.time() - t0)
            while queue.get(store, job_id).status not in ("done", "failed"):
                time.sleep(0.05)
    finally:
        worker.terminate()
        worker.wait(30)
    return {"jobs": jobs_n, "submit_to_first_step_p50_s": round(_pct(latencies, 50), 3), "poll_s": 0.2}


def index_rebuild(n_runs: int) -> dict:
    """Time to rebuild the index of a synthetic store from its run folders, and the store's size."""
    import subprocess

    from pipeline.index import rebuild_index

    store_dir = TMP / f"synth-{n_runs}"
    report = rebuild_index(store_dir)
    size = subprocess.run(["du", "-sb", str(store_dir)], capture_output=True, text=True).stdout.split()[0]
    return {
        "runs": report.runs,
        "rebuild_s": round(report.seconds, 2),
        "store_bytes": int(size),
        "store_gb": round(int(size) / 1e9, 2),
    }


def region_page_timings(store_dir: Path, run_id: str, moves: int = 10) -> dict:
    """Server-side rerun time of the Regions page for typed pixel and box queries (AppTest)."""
    import os

    from streamlit.testing.v1 import AppTest

    os.environ["STEPX_STORE"] = str(store_dir)
    at = AppTest.from_file(str(HERE.parent / "dashboard" / "views" / "regions.py"), default_timeout=120)
    at.query_params["run"] = run_id
    at.run()
    at.radio(key="regions_mode").set_value("Type").run()
    times = []
    for i in range(moves):
        t0 = time.perf_counter()
        at.text_input(key="regions_px").input(str(i * 13)).run()
        times.append((time.perf_counter() - t0) * 1000)
    at.radio(key="regions_tool").set_value("BBox heatmap").run()
    for i in range(moves):
        t0 = time.perf_counter()
        at.text_input(key="regions_box_text").input(f"{i},{i},{20 + i},{30 + i}").run()
        times.append((time.perf_counter() - t0) * 1000)
    assert not at.exception, at.exception
    return {"region_rerun_p50_ms": round(_pct(times, 50), 1), "region_rerun_p95_ms": round(_pct(times, 95), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="skip the SD 1.5-architecture timing")
    ap.add_argument("--out", default=str(HERE / "results.json"))
    args = ap.parse_args()
    import diffusers
    import torch

    torch.set_num_threads(1)
    TMP.mkdir(exist_ok=True)
    results: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpus": __import__("os").cpu_count(),
            "torch_threads": 1,
        },
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
    }
    from pipeline.models import locate, REGISTRY  # noqa: I001

    default = "shapes" if locate(REGISTRY["shapes"]) else "tiny-random"
    results["capture_overhead"] = [capture_overhead(default, None, REGISTRY[default].size, 20, 9, 3.0)]
    results["capture_overhead"].append(capture_overhead(default, None, REGISTRY[default].size, 20, 9, 3.0, threads=2))
    results["capture_profile"] = capture_profile(default, REGISTRY[default].size, 20, 3.0)
    if not args.quick:
        results["capture_overhead"].append(capture_overhead("sd15", "sd15-full", 256, 2, 3, 7.5))
    results["trace_bytes"] = trace_bytes(default)
    results["dashboard"] = dashboard_timings(TMP / f"trace-{default}", results["trace_bytes"]["run_id"])
    results["regions"] = region_timings(TMP / f"trace-{default}", results["trace_bytes"]["run_id"])
    results["projected_sd15_trace"] = projected_sd15_bytes()
    results["word_map_lookup"] = [lookup_latency(1000)]
    results["sql_aggregate"] = [sql_aggregate(1000)]
    if (TMP / "synth-10000" / ".complete").exists():
        results["word_map_lookup"].append(lookup_latency(10000))
        results["sql_aggregate"].append(sql_aggregate(10000))
        results["index_rebuild"] = index_rebuild(10000)
    results["dashboard"].update(region_page_timings(TMP / f"trace-{default}", results["trace_bytes"]["run_id"]))
    results["queue"] = queue_latency()
    from bench.dit import dit_results

    results["dit"] = dit_results()  # issue 18: tiny SD3 / Flux capture overhead, projected 1024 px trace sizes
    from bench.scale import scale_results

    results["scale"] = scale_results()  # issue 19: serial vs Ray, 1,000 runs local vs S3, 100k projected
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    from bench.report import write_readme

    write_readme(results, HERE / "README.md")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
