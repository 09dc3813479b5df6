"""`stepx eval`: the embedded model against its held-out scenes, through the normal capture and store.

    stepx eval --n 30 --out bench/eval.json

For each held-out scene (colour x shape x position combinations never seen in training) it
generates the caption, writes the trace to the store (gallery 'eval-heldout'), reads it back and
scores: per word class (shape nouns, colour adjectives, position words) the IoU of the all-steps
word map, thresholded at 0.4 of max (DAAM) and by Otsu, beside a uniform map, against two masks:
the object as drawn in the output (its colour's component found by segmentation; an object that
was not drawn scores 0), which is what a word map of this image should find, and the object as
the prompt laid it out (rendered from the caption), which also charges the model for misplacing
it; the generated image by colour segmentation (each object present, right colour, right
region); and detection (box and mask IoU of the top region) with DAAM alone vs DAAM + self-attention.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.filters import threshold_otsu

from analysis.detection import detect, guided_map, mask_iou
from pipeline.index import write_atomic
from schema.maps import daam_threshold, upsample
from shapes.check import check_objects
from shapes.scenes import COLOURS, POSITIONS, SHAPES, Scene, heldout_suite, parse_caption
from store import Store

WORD_CLASSES = {"shape noun": set(SHAPES), "colour adjective": set(COLOURS), "position word": set(POSITIONS)}


@dataclass
class EvalReport:
    """Everything `stepx eval` measured, with the table it prints."""

    model: str
    scenes: int
    guidance: float
    steps: int
    word_iou: dict[str, dict[str, float]]  # class -> {n, drawn_*, layout_*} for * in daam, otsu, best, uniform
    objects: dict[str, float]  # present, colour, region, correct rates; per object count
    detection: dict[str, dict[str, float]]  # method -> {mask_iou, box_iou}
    run_ids: list[str]

    def table(self) -> str:
        lines = [
            f"model {self.model}: {self.scenes} held-out scenes, {self.steps} steps, guidance {self.guidance:g}",
            "",
            "word-map mIoU against the object as drawn (not drawn: 0) | against the prompt's layout",
            "",
            "| word class | n | @0.4 max | Otsu | best | uniform "
            "| layout @0.4 max | layout Otsu | layout best | layout uniform |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for cls, r in self.word_iou.items():
            cells = [
                f"{r[f'{mask}_{k}']:.3f}" for mask in ("drawn", "layout") for k in ("daam", "otsu", "best", "uniform")
            ]
            lines.append(f"| {cls} | {r['n']:.0f} | " + " | ".join(cells) + " |")
        o = self.objects
        lines += [
            "",
            "| objects | present | right colour | right region | correct (all three) | and right shape |",
            "|---|---|---|---|---|---|",
            f"| all ({o['n']:.0f}) | {o['present']:.1%} | {o['colour']:.1%} | {o['region']:.1%} | {o['correct']:.1%} "
            f"| {o['shape']:.1%} |",
        ]
        for k in (1, 2, 3):
            if f"correct_{k}" in o:
                lines.append(f"| in {k}-object scenes | | | | {o[f'correct_{k}']:.1%} | {o[f'shape_{k}']:.1%} |")
        lines += ["", "| detection (shape nouns) | mask IoU | box IoU |", "|---|---|---|"]
        for method, r in self.detection.items():
            lines.append(f"| {method} | {r['mask_iou']:.3f} | {r['box_iou']:.3f} |")
        return "\n".join(lines)


def _otsu_mask(heat: np.ndarray) -> np.ndarray:
    if float(heat.max()) == float(heat.min()):
        return np.ones(heat.shape, dtype=bool)
    return heat >= threshold_otsu(heat)


def _box_iou(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    def box(m: np.ndarray) -> tuple[int, int, int, int] | None:
        ys, xs = np.nonzero(m)
        return None if len(xs) == 0 else (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)

    a, b = box(mask_a), box(mask_b)
    if a is None or b is None:
        return 0.0
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def score_run(store: Store, run_id: str, scene: Scene) -> dict:
    """Scores of one stored run against its scene's ground truth."""
    run = store.run(run_id)
    size = (run["width"], run["height"])
    words = store.words(run_id)
    sa = store.self_attention(run_id)
    image = np.asarray(_decode(store.image(run_id)[0]))
    out: dict = {"words": [], "objects": [], "detection": []}
    # align the caption's words with the stored words (CLIP splits exactly at the caption's spaces)
    caption_words = scene.words
    aligned = len(words) == len(caption_words) and all(
        w.word.lower() == cw.lower() for w, (cw, _) in zip(words, caption_words, strict=True)
    )
    checks = check_objects(image, parse_caption(scene.caption))
    for obj_index, obj in enumerate(scene.objects):
        truth = obj.mask.astype(bool)
        check = checks[obj_index]
        drawn = check.mask if check.colour_ok else np.zeros_like(truth)
        for pos, (text, owner) in enumerate(caption_words):
            if owner != obj_index:
                continue
            cls = next((c for c, vocab in WORD_CLASSES.items() if text in vocab), None)
            if cls is None:
                continue
            key = words[pos].word_index if aligned else text
            daam_heat = store.word_map(run_id, key)  # latent grid
            heat = upsample(daam_heat, size[1], size[0])
            row: dict = {"class": cls}
            for name, mask in (("drawn", drawn), ("layout", truth)):
                row[f"{name}_daam"] = mask_iou(daam_threshold(heat, 0.4), mask)
                row[f"{name}_otsu"] = mask_iou(_otsu_mask(heat), mask)
                row[f"{name}_uniform"] = mask_iou(np.ones_like(mask), mask)
            out["words"].append(row)
            if cls == "shape noun":
                for method, h in (
                    ("DAAM alone", daam_heat),
                    ("DAAM + self-attention", guided_map(daam_heat, sa.matrix, sa.grid)),
                ):
                    found = detect(h, text, size)
                    pred = found[0].mask if found else np.zeros_like(truth)
                    out["detection"].append(
                        {"method": method, "mask_iou": mask_iou(pred, truth), "box_iou": _box_iou(pred, truth)}
                    )
    for c in checks:
        out["objects"].append(
            {"present": c.present, "colour": c.colour_ok, "region": c.region_ok, "correct": c.correct,
             "shape": c.correct_shape, "n_objects": len(scene.objects)}
        )  # fmt: skip
    return out


def _decode(data: bytes) -> object:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def evaluate(
    root: Path,
    model_name: str = "shapes",
    n: int = 30,
    seed: int = 1234,
    guidance: float | None = None,
    steps: int = 20,
    gen_seed: int = 0,
) -> EvalReport:
    """Generate the held-out suite into the store and score it."""
    from pipeline.generate import GenerationConfig, generate_trace
    from pipeline.models import load_model
    from pipeline.trace_writer import write_trace

    model = load_model(model_name)
    scenes = heldout_suite(n, seed)
    store = Store(root)
    run_ids, parts = [], []
    for scene in scenes:
        cfg = GenerationConfig(scene.caption, seed=gen_seed, steps=steps, guidance=guidance,
                               tags=["eval"], gallery="eval-heldout")  # fmt: skip
        trace = generate_trace(model, cfg)
        run_id = write_trace(root, trace).run_id
        run_ids.append(run_id)
        parts.append(score_run(store, run_id, scene))
    words = defaultdict(list)
    for p in parts:
        for w in p["words"]:
            words[w["class"]].append(w)
    word_iou = {}
    for cls in WORD_CLASSES:
        rows = words.get(cls, [])
        if rows:
            word_iou[cls] = {"n": len(rows)}
            for mask in ("drawn", "layout"):
                for k in ("daam", "otsu", "uniform"):
                    word_iou[cls][f"{mask}_{k}"] = float(np.mean([r[f"{mask}_{k}"] for r in rows]))
                word_iou[cls][f"{mask}_best"] = max(word_iou[cls][f"{mask}_daam"], word_iou[cls][f"{mask}_otsu"])
    objs = [o for p in parts for o in p["objects"]]
    objects = {"n": len(objs)}
    for key in ("present", "colour", "region", "correct", "shape"):
        objects[key] = float(np.mean([o[key] for o in objs])) if objs else 0.0
    for k in (1, 2, 3):
        sub = [o for o in objs if o["n_objects"] == k]
        if sub:
            objects[f"correct_{k}"] = float(np.mean([o["correct"] for o in sub]))
            objects[f"shape_{k}"] = float(np.mean([o["shape"] for o in sub]))
    detection = {}
    for method in ("DAAM alone", "DAAM + self-attention"):
        rows = [d for p in parts for d in p["detection"] if d["method"] == method]
        detection[method] = {"mask_iou": float(np.mean([r["mask_iou"] for r in rows])) if rows else 0.0,
                             "box_iou": float(np.mean([r["box_iou"] for r in rows])) if rows else 0.0}  # fmt: skip
    used = trace.run["guidance"] if scenes else (guidance or 0.0)
    return EvalReport(model_name, len(scenes), used, steps, word_iou, objects, detection, run_ids)


CARD_START = "<!-- stepx eval -->"
CARD_END = "<!-- /stepx eval -->"


def update_card(card: Path, report: EvalReport, command: str) -> None:
    """Put the report's table into a model card between the stepx eval markers.

    The training export writes the markers with a placeholder, so scores shown in the card are
    always the ones `stepx eval` measured on the weights beside it. Without markers the section
    is added before "## Limits" (or at the end).
    """
    text = Path(card).read_text(encoding="utf-8")
    body = f"{CARD_START}\n`{command}`\n\n{report.table()}\n{CARD_END}"
    if CARD_START in text and CARD_END in text:
        head, rest = text.split(CARD_START, 1)
        text = head + body + rest.split(CARD_END, 1)[1]
    else:
        section = f"## stepx eval (held-out suite, through StepX's capture and store)\n\n{body}\n\n"
        at = text.find("## Limits")
        text = text[:at] + section + text[at:] if at >= 0 else text.rstrip("\n") + "\n\n" + section
    write_atomic(Path(card), text.encode("utf-8"))


def write_report(report: EvalReport, path: Path) -> None:
    """The report as JSON (the table included)."""
    Path(path).write_text(json.dumps({**report.__dict__, "table": report.table()}, indent=1) + "\n")
