"""The one table of input limits (generation and SQL console), shared by the CLI, pipeline, dashboard, queue.

    from schema.limits import check_generation, LimitError
    check_generation("shapes", steps=20, height=2048, width=64, seed=0, guidance=1.5)
    # LimitError: height 2048 is past the shapes model's limit: 32 to 128 px

Declarative like datasette's settings: each limit is (name, default, min, max, help); a model may narrow
the bounds (the embedded shapes model was trained at 64 px, SD-class models at 512 or 1024 px). A value of
None means "the model's default" and is not checked here. Torch-free, so every side can import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

SIZE_MULTIPLE = 8  # every registered VAE halves the image 3 times: sizes must divide by 8


class LimitError(ValueError):
    """A generation request outside the limits; the message is one line for the user."""


@dataclass(frozen=True)
class Limit:
    """One input setting: its default, inclusive bounds and what it means."""

    name: str
    default: int | float | None  # None: the model's own default
    min: int | float
    max: int | float
    help: str
    integer: bool = True
    multiple: int = 1
    unit: str = ""


LIMITS: dict[str, Limit] = {
    limit.name: limit
    for limit in [
        # 1000 = the training timesteps of every registered scheduler; the loaded scheduler may allow fewer.
        Limit("steps", None, 1, 1000, "denoising steps (one UNet evaluation each)"),
        # 4096: the largest latent SD-class UNets were ever run at; a model's own limit is usually lower.
        Limit("width", None, 8, 4096, "image width in pixels", multiple=SIZE_MULTIPLE, unit=" px"),
        Limit("height", None, 8, 4096, "image height in pixels", multiple=SIZE_MULTIPLE, unit=" px"),
        # 2^32 - 1: the range SD front-ends and numpy's legacy seeding use, exact in the browser's number widget.
        Limit("seed", 0, 0, 2**32 - 1, "seed of the initial noise"),
        # 50: far past any useful classifier-free guidance; 0 to 1 turns the unconditional batch off.
        Limit("guidance", None, 0.0, 50.0, "classifier-free guidance scale", integer=False),
        # the tokenizer keeps 77 tokens anyway; 10,000 characters bounds what is stored and shown.
        Limit("prompt_chars", 10_000, 1, 10_000, "prompt length in characters"),
        # The SQL console's limits (store/sql.py, README "Security model"): 10 s answers every example
        # question on a 10k-run store; a day is past any interactive use.
        Limit("timeout_s", 10.0, 0.001, 86_400, "seconds before a SQL query is stopped", integer=False, unit=" s"),
        # 1000 rows read comfortably in a terminal; a million rows of a wide table is ~1 GB of Python objects.
        Limit("max_rows", 1000, 1, 1_000_000, "rows a SQL query returns; more set the truncated flag"),
        # 1 GB holds every example on a 10k-run store; the query process is capped a little above it.
        Limit("memory_limit_mb", 1024, 64, 1_048_576, "memory one SQL query may use", unit=" MB"),
    ]
}

# Per-model bounds (registry names from `stepx models`): sizes a model can draw something sensible at.
MODEL_LIMITS: dict[str, dict[str, tuple[int | float, int | float]]] = {
    "shapes": {"width": (32, 128), "height": (32, 128), "steps": (1, 200)},  # trained on 64 px scenes
    "tiny-random": {"width": (8, 1024), "height": (8, 1024)},  # random weights: for tests
    "sd15": {"width": (128, 1024), "height": (128, 1024)},  # trained at 512 px
    "sd21-base": {"width": (128, 1024), "height": (128, 1024)},  # trained at 512 px
    "sdxl": {"width": (256, 2048), "height": (256, 2048)},  # trained at 1024 px
}


def limit_for(name: str, model: str | None = None) -> Limit:
    """The limit called `name`, with a model's narrower bounds when it has them."""
    base = LIMITS[name]
    bounds = MODEL_LIMITS.get(model or "", {}).get(name)
    return base if bounds is None else replace(base, min=bounds[0], max=bounds[1])


def check_value(name: str, value: object, model: str | None = None) -> int | float:
    """Return `value` as the limit's type, or raise LimitError naming the setting and its bounds."""
    lim = limit_for(name, model)
    where = f" for the {model} model" if model in MODEL_LIMITS and name in MODEL_LIMITS[model] else ""
    bounds = f"{_num(lim.min)} and {_num(lim.max)}{lim.unit}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LimitError(f"{name} must be a number, got {value!r}")
    if lim.integer and isinstance(value, float):
        if not value.is_integer():
            raise LimitError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise LimitError(f"{name} must be a finite number between {bounds}, got {value}")
    if not lim.min <= value <= lim.max:
        raise LimitError(f"{name} must be between {bounds}{where}, got {_num(value)}")
    if lim.multiple > 1 and value % lim.multiple:
        raise LimitError(f"{name} must be a multiple of {lim.multiple} (between {bounds}{where}), got {_num(value)}")
    return value


def _num(value: int | float) -> str:
    """A bound or value as the user typed it: whole numbers in full, others short."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def check_prompt(prompt: object, negative: object = "") -> None:
    """Raise LimitError for prompt text that can't run: empty, too long, control characters."""
    if not isinstance(prompt, str) or not isinstance(negative, str):
        raise LimitError("the prompt must be text")
    if not prompt.strip():
        raise LimitError("the prompt is empty: give a text prompt such as 'a red circle'")
    most = LIMITS["prompt_chars"].max
    for label, text in (("prompt", prompt), ("negative prompt", negative)):
        if len(text) > most:
            raise LimitError(f"the {label} is {len(text)} characters; the limit is {most:,}")
        if any((ord(c) < 32 or 127 <= ord(c) < 160) and c not in "\t\n" for c in text):  # C0, DEL and C1 (CSI)
            raise LimitError(f"the {label} holds control characters; remove them")


def check_generation(
    model: str | None,
    steps: object = None,
    height: object = None,
    width: object = None,
    seed: object = 0,
    guidance: object = None,
) -> None:
    """Raise LimitError (one line) for settings outside the limits; None means the model's default."""
    settings = {"steps": steps, "width": width, "height": height, "seed": seed, "guidance": guidance}
    for name, value in settings.items():
        if value is not None:
            check_value(name, value, model)
