"""TITAN-style annotation, written fresh: the prompt's object nouns become categories, each object's region
comes from text-guided detection, and the result is written as COCO JSON.

The nouns are tagged on the pipeline side at generation time (`pipeline.nouns`, spaCy there) and read here
from `tokens.noun_lemma` / `noun_plural`: no tagger is ever loaded by the read side or the dashboard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from analysis.detection import DAAM_ALONE, GUIDED, GUIDED_BY_DEFAULT, Detection, detect, guided_map
from store import Store

NOUNS_SINCE = (1, 3)  # trace schema version that stores object nouns with the tokens


class NounsUnavailable(ValueError):
    """The run was written before object nouns were stored with its tokens."""


@dataclass
class PromptObject:
    """An object noun of the prompt: the word as written, where it is, its lemma (the category), its number."""

    word: str
    word_index: int
    lemma: str
    plural: bool


def nouns_stored(run: dict) -> bool:
    """Whether the run's tokens carry object nouns (written with trace schema 1.3 or later)."""
    try:
        major, minor = (int(p) for p in str(run.get("schema_version", "0.0")).split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= NOUNS_SINCE


def run_objects(store: Store, run_id: str) -> list[PromptObject] | None:
    """The run's object nouns in prompt order, from its stored tokens; None when the run predates them."""
    if not nouns_stored(store.run(run_id)):
        return None
    out: dict[int, PromptObject] = {}
    for t in store.tokens(run_id):
        lemma = t.get("noun_lemma")
        if t.get("kind") == "word" and lemma and t["word_index"] not in out:
            out[t["word_index"]] = PromptObject(t["word"], t["word_index"], lemma, bool(t.get("noun_plural")))
    return list(out.values())


def annotate(
    store: Store, run_id: str, threshold: str | float = "otsu", guided: bool = GUIDED_BY_DEFAULT
) -> list[Detection]:
    """Detections for each object noun of a run's prompt (one region per singular noun)."""
    run = store.run(run_id)
    objects = run_objects(store, run_id)
    if objects is None:
        raise NounsUnavailable(
            f"run {run_id} was written before StepX stored object nouns (trace schema "
            f"{run.get('schema_version')} < {'.'.join(map(str, NOUNS_SINCE))}); generate it again to annotate it"
        )
    size = (run["width"], run["height"])
    sa = store.self_attention(run_id) if guided else None
    out: list[Detection] = []
    for obj in objects:
        heat = store.word_map(run_id, obj.word_index)
        if sa is not None:
            heat = guided_map(heat, sa.matrix, sa.grid)
        found = detect(heat, obj.lemma, size, threshold)
        out += found if obj.plural else found[:1]
    return out


def coco_for_runs(
    store: Store, run_ids: list[str], threshold: str | float = "otsu", guided: bool = GUIDED_BY_DEFAULT
) -> dict:
    """COCO JSON for runs: one image per run (file name = run id + .png), its object annotations."""
    images, annotations = [], []
    for image_id, run_id in enumerate(run_ids, start=1):
        run = store.run(run_id)
        images.append(
            {
                "id": image_id,
                "file_name": f"{run_id}.png",
                "width": run["width"],
                "height": run["height"],
                "stepx_run_id": run_id,
                "prompt": run["prompt"],
            }
        )
        annotations += [(image_id, d) for d in annotate(store, run_id, threshold, guided)]
    method = GUIDED if guided else DAAM_ALONE
    return coco_document(images, annotations, f"StepX TITAN annotations ({method}, threshold {threshold})")


def coco_document(images: list[dict], annotations: list[tuple[int, Detection]], description: str) -> dict:
    """A COCO detection document. images: {id, file_name, width, height}; annotations: (image id, detection)."""
    categories = sorted({d.label for _, d in annotations})
    cat_ids = {name: i + 1 for i, name in enumerate(categories)}
    anns = []
    for ann_id, (image_id, det) in enumerate(annotations, start=1):
        flat = [round(v, 2) for point in det.polygon for v in point]
        anns.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": cat_ids[det.label],
                "segmentation": [flat],
                "bbox": [round(v, 2) for v in det.bbox],
                "area": float(det.area),
                "iscrowd": 0,
                "score": round(det.score, 4),
            }
        )
    return {
        "info": {
            "description": description,
            "date_created": datetime.now(UTC).isoformat(timespec="seconds"),
            "version": "1.0",
            "contributor": "StepX",
        },
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": cat_ids[c], "name": c, "supercategory": "object"} for c in categories],
    }


def dumps(doc: dict) -> str:
    """The COCO document as indented JSON text."""
    return json.dumps(doc, indent=1)
