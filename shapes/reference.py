"""The embedded model's reference image: one known prompt, rendered and committed beside the
weights, so tests can check that the committed weights still produce it.

    python -m shapes.reference          # writes data/models/shapes/reference.png + reference.json
"""

from __future__ import annotations

import json
import sys

from pipeline.generate import GenerationConfig, run_pipeline
from pipeline.models import EMBEDDED_DIR, load_model

REFERENCE = {"prompt": "a red circle on the left and a blue square on the right", "seed": 0, "steps": 20}


def render_reference() -> object:
    """The reference prompt on the embedded model, on the CPU (PIL image)."""
    model = load_model("shapes", device="cpu")
    config = GenerationConfig(REFERENCE["prompt"], seed=REFERENCE["seed"], steps=REFERENCE["steps"])
    return run_pipeline(model, config.resolved(model))


def main() -> int:
    image = render_reference()
    image.save(EMBEDDED_DIR / "reference.png")
    (EMBEDDED_DIR / "reference.json").write_text(json.dumps(REFERENCE, indent=1) + "\n")
    print(EMBEDDED_DIR / "reference.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
