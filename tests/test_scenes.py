"""The embedded model's data and judge: procedural scenes, captions, held-out split, the image
checker that `stepx eval` uses, and the grounding loss of the training recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shapes import scenes
from shapes.check import check_objects, find_components, iou
from shapes.scenes import HELDOUT, ObjectSpec, heldout_suite, parse_caption, render, training_scene


def test_caption_round_trips_through_the_parser():
    for seed in range(60):
        scene = training_scene(seed)
        specs = parse_caption(scene.caption)
        assert [(s.colour, s.shape) for s in specs] == [(o.spec.colour, o.spec.shape) for o in scene.objects]
        assert [s.position for s in specs] == [o.spec.position for o in scene.objects]
        assert [s.size for s in specs] == [o.spec.size for o in scene.objects]


def test_parser_accepts_synonyms_and_ignores_uncoloured_shapes():
    assert parse_caption("A big RED ball in the middle, a square and a tiny blue box at the lower edge") == [
        ObjectSpec("circle", "red", "center", "large"),
        ObjectSpec("square", "blue", "bottom", "small"),
    ]
    assert parse_caption("") == [] and parse_caption("a circle on the left") == []


def test_scenes_are_deterministic_and_masks_match_the_drawing():
    a, b = training_scene(7), training_scene(7)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    for obj in a.objects:
        x0, y0, x1, y1 = obj.bbox
        assert obj.mask.sum() > 40 and not obj.mask[:y0].any() and not obj.mask[:, x1:].any()
        pixels = a.image[obj.mask].astype(int)
        assert np.abs(pixels - scenes.PALETTE[obj.spec.colour]).max(axis=1).mean() < 30
    union = np.sum([o.mask for o in a.objects], axis=0)
    assert union.max() <= 1  # objects never overlap
    background = a.image[union == 0].astype(int)
    assert (np.abs(background - scenes.BACKGROUND).max(axis=1) <= 2).mean() > 0.95


def test_heldout_combinations_never_train_and_every_eval_scene_has_one():
    for seed in range(400):
        for obj in training_scene(seed).objects:
            assert (obj.spec.colour, obj.spec.shape, obj.position) not in HELDOUT
    suite = heldout_suite(12)
    assert [len(s.objects) for s in suite] == [1, 2, 3] * 4
    for s in suite:
        assert any((o.spec.colour, o.spec.shape, o.position) in HELDOUT for o in s.objects)
        assert all(o.spec.position is not None for o in s.objects)


def test_a_shape_twin_changes_only_the_shapes_and_never_trains_a_heldout_combination():
    from shapes.train import shape_twin

    rng = np.random.default_rng(0)
    for seed in range(150):
        scene = training_scene(seed)
        same = scenes.redraw(scene, [o.spec.shape for o in scene.objects])
        assert np.array_equal(same.image, scene.image) and same.caption == scene.caption
        twin = shape_twin(scene, rng)
        assert len(twin.words) == len(scene.words)
        for (w, k), (tw, tk) in zip(scene.words, twin.words, strict=True):
            assert k == tk and (w == tw) == (w not in scenes.SHAPES)
        union = np.zeros(scene.image.shape[:2], dtype=bool)
        for obj, new in zip(scene.objects, twin.objects, strict=True):
            assert new.spec.shape != obj.spec.shape
            assert (new.spec.colour, new.position, new.size, new.centre) == (
                obj.spec.colour, obj.position, obj.size, obj.centre)  # fmt: skip
            assert (new.spec.colour, new.spec.shape, new.position) not in HELDOUT
            x0, y0, x1, y1 = obj.bbox  # the same box for every shape, antialiased edges included
            union[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = True
        changed = np.abs(twin.image.astype(int) - scene.image.astype(int)).max(axis=2) > 0
        assert changed.any() and not (changed & ~union).any()
        assert all(c.shape_ok for c in check_objects(twin.image, parse_caption(twin.caption)))


def test_checker_accepts_the_rendered_scene_and_finds_its_masks():
    for scene in heldout_suite(9, seed=5):
        checks = check_objects(scene.image, parse_caption(scene.caption))
        assert all(c.correct and c.shape_ok for c in checks)
        for c, obj in zip(checks, scene.objects, strict=True):
            assert iou(c.mask, obj.mask) > 0.8


def test_checker_rejects_wrong_colour_wrong_place_and_blank():
    rng = np.random.default_rng(0)
    scene = render([ObjectSpec("square", "red", "left", "large")], rng)
    assert not check_objects(scene.image, [ObjectSpec("circle", "red", "left")])[0].shape_ok
    moved = check_objects(scene.image, [ObjectSpec("square", "red", "right")])[0]
    assert moved.colour_ok and not moved.region_ok and not moved.correct
    recoloured = check_objects(scene.image, [ObjectSpec("square", "blue", "left")])[0]
    assert recoloured.present and not recoloured.colour_ok and not recoloured.correct
    blank = np.full_like(scene.image, 238)
    assert find_components(blank) == []
    nothing = check_objects(blank, [ObjectSpec("circle", "green", "top")])[0]
    assert not (nothing.present or nothing.colour_ok) and not nothing.mask.any()


def test_grounding_loss_is_lowest_when_each_word_attends_to_its_own_object():
    from shapes.train import Config, grounding_loss

    cfg = Config()
    masks = torch.zeros(1, 3, 4, 4)
    masks[0, 0, :, :2] = 1  # object 0 on the left half
    masks[0, 1, :, 2:] = 1  # object 1 on the right half
    owner = torch.tensor([[-1, 0, 0, 1, 1, -1]])  # BOS, two words per object, EOS
    keep = torch.tensor([True])

    def probs(assign: dict[int, torch.Tensor]) -> torch.Tensor:
        logits = torch.full((1, 16, 6), -8.0)
        logits[..., 0] = 0.0
        for tok, where in assign.items():
            logits[0, where.flatten().bool(), tok] = 4.0
        return logits.softmax(-1)

    left, right = masks[0, 0], masks[0, 1]
    own = probs({1: left, 2: left, 3: right, 4: right})
    swapped = probs({1: right, 2: right, 3: left, 4: left})
    shared = probs({1: left + right, 2: left + right, 3: left + right, 4: left + right})
    loss = {name: grounding_loss([p], owner, masks, keep, cfg, step=10_000)[0].item()
            for name, p in (("own", own), ("swapped", swapped), ("shared", shared))}  # fmt: skip
    assert loss["own"] < loss["shared"] < loss["swapped"]
    _, stats = grounding_loss([own], owner, masks, keep, cfg, step=10_000)
    assert stats["mass_in"] == pytest.approx(1.0, abs=1e-3)
    dropped = grounding_loss([swapped], owner, masks, torch.tensor([False]), cfg, step=10_000)[0]
    assert dropped.item() == pytest.approx(0.0, abs=1e-6)  # captions dropped for CFG are not grounded


def test_grounding_at_high_noise_can_be_limited_to_position_words():
    from shapes.train import Config, grounding_loss

    cfg = Config()
    masks = torch.zeros(1, 3, 4, 4)
    masks[0, 0, :, :2] = 1
    owner = torch.tensor([[-1, 0, 0, -1]])  # BOS, "red" (object 0), "left" (object 0), EOS
    keep = torch.tensor([True])
    logits = torch.full((1, 16, 4), -8.0)
    logits[..., 0] = 0.0
    logits[0, masks[0, 0].flatten().bool(), 2] = 4.0  # "left" attends to its object, "red" nowhere useful
    probs = logits.softmax(-1)
    everything = grounding_loss([probs], owner, masks, keep, cfg, step=10_000)[0]
    only_left = grounding_loss([probs], owner, masks, keep, cfg, 10_000, torch.tensor([[True, False, True, True]]))[0]
    assert only_left < everything  # the ungrounded "red" no longer counts
    nothing = grounding_loss([probs], owner, masks, keep, cfg, 10_000, torch.zeros(1, 4, dtype=torch.bool))[0]
    assert torch.isfinite(nothing) and nothing.item() == pytest.approx(0.0, abs=1e-6)
