"""Shared fixtures: tiny in-process pipelines and small stores built from code with fixed seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    """Small ops are far slower with 2 OpenMP threads on a busy 2-core machine."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model():
    from pipeline.models import load_model

    return load_model("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def traced_store(tmp_path_factory: pytest.TempPathFactory, tiny_model):
    """A store with two traced tiny-random runs; returns (root, [trace, trace])."""
    from pipeline.generate import GenerationConfig, generate_trace
    from pipeline.trace_writer import write_trace

    root = tmp_path_factory.mktemp("store")
    traces = []
    for seed, prompt in [(1, "a red circle on the left and a blue square"), (2, "a photorealistic green triangle")]:
        trace = generate_trace(tiny_model, GenerationConfig(prompt, seed=seed, steps=4, guidance=3.0, tags=["t"]))
        write_trace(root, trace)
        traces.append(trace)
    return root, traces
