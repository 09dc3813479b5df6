"""Text-guided detection and TITAN annotations on synthetic maps and a synthetic store; COCO JSON
validated with pycocotools."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis import detection
from analysis.detection import detect, guided_map, resample, threshold_value
from analysis.metrics import mask_iou, otsu_threshold
from analysis.titan import annotate, coco_for_runs
from jobs.synth import synth_store
from pipeline.nouns import prompt_objects
from stepx.cli import main
from store import Store

ROOT = Path(__file__).resolve().parent.parent


def blob(shape, cy, cx, sigma):
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2))


def test_detect_two_blobs_boxes_and_polygons():
    heat = blob((16, 16), 4, 4, 1.5) + blob((16, 16), 11, 12, 1.5)
    dets = detect(heat, "thing", (64, 64))
    assert len(dets) == 2
    for d in dets:
        x, y, w, h = d.bbox
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
        assert len(d.polygon) >= 3 and d.mask.sum() == d.area
    centres = sorted((d.bbox[0] + d.bbox[2] / 2, d.bbox[1] + d.bbox[3] / 2) for d in dets)
    assert abs(centres[0][0] - 18) < 4 and abs(centres[0][1] - 18) < 4  # blob at cell (4,4) of 16 -> pixel 18
    assert abs(centres[1][0] - 50) < 4 and abs(centres[1][1] - 46) < 4


def test_manual_threshold_changes_the_region_and_merging():
    heat = blob((16, 16), 8, 8, 3)
    loose = detect(heat, "x", (64, 64), threshold=0.2)[0]
    tight = detect(heat, "x", (64, 64), threshold=0.8)[0]
    assert loose.area > 2 * tight.area
    norm = heat / heat.max()
    assert 0 < threshold_value(norm) < 1 and threshold_value(norm) == otsu_threshold(norm)
    assert threshold_value(np.ones((4, 4))) == 1.0  # a flat map has no Otsu threshold: only its maximum passes
    with pytest.raises(ValueError):
        threshold_value(heat, 1.5)
    ring = blob((16, 16), 8, 5, 1.2) + blob((16, 16), 8, 8, 1.2)  # two overlapping lobes merge into one object
    assert len(detect(ring, "x", (64, 64), threshold=0.3)) == 1
    specks = np.zeros((16, 16))
    specks[0, 0] = 1.0
    assert detect(specks, "x", (64, 64), min_area_frac=0.05) == []


def test_guided_map_follows_self_attention():
    quad = np.array([(r // 8) * 2 + (c // 8) for r in range(16) for c in range(16)])
    a = (quad[:, None] == quad[None, :]).astype(np.float32)
    a /= a.sum(axis=1, keepdims=True)
    word = np.zeros((16, 16))
    word[2, 3] = 1.0  # one hot cell in the top-left quadrant
    g = guided_map(word, a, (16, 16))
    assert np.allclose(g[:8, :8], 1 / 64) and np.allclose(g[8:, :], 0) and np.allclose(g[:, 8:], 0)
    assert resample(np.ones((32, 32)), (16, 16)).shape == (16, 16)
    assert mask_iou(g > 0, g > 0) == 1.0


def test_prompt_objects_lemmas_and_spatial_words():
    objs = prompt_objects("a red circle on the left and two blue squares at the top")
    assert [(o.word, o.lemma, o.plural) for o in objs] == [("circle", "circle", False), ("squares", "square", True)]


def test_coco_json_valid_for_gallery(tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    synth_store(tmp_path, 3, steps=3, seed=4)
    store = Store(tmp_path)
    out = tmp_path / "coco.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "stepx.cli",
            "annotate",
            "--gallery",
            "synthetic",
            "--out",
            str(out),
            "--store",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    coco = COCO(str(out))
    assert len(coco.getImgIds()) == 3 and len(doc["annotations"]) >= 3
    names = {c["name"] for c in doc["categories"]}
    assert names <= {"circle", "square", "triangle", "star"}
    for ann in doc["annotations"]:
        img = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
        xs, ys = ann["segmentation"][0][0::2], ann["segmentation"][0][1::2]
        assert min(xs) >= 0 and max(xs) <= img["width"] and min(ys) >= 0 and max(ys) <= img["height"]
        assert coco.annToMask(ann).sum() > 0
    same = coco_for_runs(store, [r["run_id"] for r in store.runs()][::-1])
    assert len(same["annotations"]) == len(doc["annotations"])
    assert f"({detection.DEFAULT_METHOD}, threshold otsu)" in doc["info"]["description"]
    for flag, method in (("--guided", detection.GUIDED), ("--daam-only", detection.DAAM_ALONE)):
        assert main(["annotate", "--gallery", "synthetic", "--out", str(out), "--store", str(tmp_path), flag]) == 0
        assert f"({method}, threshold otsu)" in json.loads(out.read_text())["info"]["description"]


def test_annotate_cli_errors(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "stepx.cli",
            "annotate",
            "--gallery",
            "nope",
            "--out",
            str(tmp_path / "x.json"),
            "--store",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and "no runs in gallery 'nope'" in res.stderr and "Traceback" not in res.stderr


def test_the_default_method_is_one_measured_and_every_caller_follows_it():
    """`stepx eval` compares both methods on the test split; annotate, COCO export and the CLI take the winner."""
    assert detection.DEFAULT_METHOD in detection.METHODS
    assert (detection.DEFAULT_METHOD == detection.GUIDED) == detection.GUIDED_BY_DEFAULT
    for fn in (annotate, coco_for_runs):
        assert inspect.signature(fn).parameters["guided"].default == detection.GUIDED_BY_DEFAULT
