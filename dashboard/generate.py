"""The Generate panel: runs `stepx generate` as a separate process (torch stays out of the
dashboard) and follows its progress lines."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import streamlit as st

from dashboard.state import ROOT, models, select_run, store_path

STEP_LINE = re.compile(r"step\s+(\d+)/(\d+)")


@dataclass
class GenerateRequest:
    """What the Generate button asks for."""

    prompt: str
    negative: str
    model: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int


def command(req: GenerateRequest, store: str) -> list[str]:
    """The `stepx generate` command line of a request."""
    return [
        sys.executable, "-m", "pipeline.cli", "generate", req.prompt, "--negative", req.negative,
        "--model", req.model, "--seed", str(req.seed), "--steps", str(req.steps), "--guidance", str(req.guidance),
        "--width", str(req.width), "--height", str(req.height), "--store", store,
    ]  # fmt: skip


def run_generation(req: GenerateRequest, store: str, on_step: Callable[[int, int], None]) -> str:
    """Run one generation; returns the run id or raises RuntimeError with the CLI's message."""
    proc = subprocess.Popen(command(req, store), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors = []
    for line in proc.stderr:
        m = STEP_LINE.search(line)
        if m:
            on_step(int(m.group(1)), int(m.group(2)))
        elif line.strip():
            errors.append(line.strip())
    out = proc.stdout.read().strip()
    if proc.wait() != 0 or not out:
        raise RuntimeError(errors[-1] if errors else "generation failed")
    return out.splitlines()[-1]


def default_model(entries: list[dict]) -> tuple[str, str]:
    """SD 1.5 when present, else the embedded model, else tiny-random; with a one-line reason."""
    present = {e["name"]: e for e in entries if e["present"]}
    if "sd15" in present:
        return "sd15", "Stable Diffusion 1.5 weights found locally."
    if "shapes" in present:
        return "shapes", "SD 1.5 weights are not on this machine, so the embedded shapes model is preselected."
    return "tiny-random", "No trained model is present; tiny-random draws noise (use it to try the tools)."


def generate_panel(expanded: bool = False) -> None:
    """Prompt box, model picker and Generate button; opens the new run when done."""
    with st.expander("Generate a new image", expanded=expanded):
        entries = models()
        if not entries:
            st.error("Could not list the models (is the pipeline installed? run `make setup`).")
            return
        by_name = {e["name"]: e for e in entries}
        preselect, reason = default_model(entries)
        prompt = st.text_area("Prompt", "a red circle on the left and a blue square on the right", key="gen_prompt")
        negative = st.text_input("Negative prompt", "", key="gen_negative")
        names = list(by_name)
        model = st.selectbox(
            "Model",
            names,
            index=names.index(preselect),
            format_func=lambda n: f"{by_name[n]['title']}" + ("" if by_name[n]["present"] else " (weights absent)"),
            key="gen_model",
        )
        st.caption(reason if model == preselect else by_name[model]["where"])
        spec = by_name[model]
        c1, c2, c3, c4 = st.columns(4)
        seed = c1.number_input("Seed", 0, 2**31 - 1, 0, key="gen_seed")
        steps = c2.number_input("Steps", 1, 200, int(spec["steps"]), key=f"gen_steps_{model}")
        guidance = c3.number_input("Guidance", 0.0, 30.0, float(spec["guidance"]), 0.5, key=f"gen_guidance_{model}")
        size = c4.number_input("Size (px)", 64, 2048, int(spec["size"]), 64, key=f"gen_size_{model}")
        if st.button("Generate", type="primary", disabled=not spec["present"], key="gen_go"):
            if not prompt.strip():
                st.error("Write a prompt first.")
                return
            bar = st.progress(0.0, text="Loading the model...")
            req = GenerateRequest(prompt, negative, model, int(seed), int(steps), float(guidance), int(size), int(size))
            try:
                run_id = run_generation(req, store_path(), lambda k, n: bar.progress(k / n, text=f"Step {k} of {n}"))
            except RuntimeError as exc:
                st.error(str(exc))
                return
            select_run(run_id)
            st.rerun()
