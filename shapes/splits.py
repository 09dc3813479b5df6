"""The embedded model's evaluation splits: scenes that each hold a held-out combination, and their noise seeds.

Every scene here contains at least one colour x shape x position combination never drawn in training
(`scenes.HELDOUT`), with every position stated. Two splits:

- validation (`validation_suite`, noise seeds from `VALIDATION_SEEDS`): what training reads: the
  trainer's periodic evaluation, the export's guidance sweep, any tuning;
- test (`suite("test", n)`, noise seeds from `TEST_SEEDS`): read only by `shapes/evaluate.py` for the
  numbers a model card reports. Its scenes come from another RNG stream and never repeat a
  validation scene (caption and layout); multi-object test scenes never repeat a validation caption
  either (only eight one-object captions exist, one per held-out combination, so those repeat with
  another layout and unseen noise). The two seed ranges don't overlap.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from shapes.scenes import IMAGE_SIZE, Scene, render, sample_specs

# Evaluation splits. The validation stream is the one the trainer has always evaluated on (so its
# history stays comparable); the test stream is another seed, deduplicated against validation.
SPLITS = ("validation", "test")
MAX_SUITE = 256  # scenes per split; test scenes are deduplicated against this many validation scenes
SEEDS_PER_SCENE = 100  # noise seeds a scene can take (scene i of a split owns a block of this many)
_VALIDATION_STREAM = 1234
_TEST_STREAM = 4_321_000
VALIDATION_SEEDS = range(0, 1_000_000)
TEST_SEEDS = range(1_000_000_000, 1_001_000_000)
_SEED_RANGES = {"validation": VALIDATION_SEEDS, "test": TEST_SEEDS}


def _suite_scene(stream: int, index: int, attempt: int, size: int) -> Scene:
    """One evaluation scene: 1-3 objects by index, the first a held-out combination, all positions stated."""
    key = [stream, index, 9001] if attempt == 0 else [stream, index, attempt, 9001]
    rng = np.random.default_rng(key)
    specs = sample_specs(rng, 1 + index % 3, heldout="require", p_size_word=0.0)
    return render(specs, rng, size)


def scene_key(scene: Scene) -> tuple:
    """What makes two scenes the same scene: the caption and each object's position, size and placement."""
    layout = tuple((o.position, o.size, round(o.centre[0], 3), round(o.centre[1], 3)) for o in scene.objects)
    return scene.caption, layout


def check_suite(split: str, n: int, seeds: int = 1) -> None:
    """Raise ValueError (one line) unless n scenes with `seeds` noise seeds each exist in the split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: one of {', '.join(SPLITS)}")
    if not 1 <= n <= MAX_SUITE:
        raise ValueError(f"an evaluation split holds 1 to {MAX_SUITE} scenes, not {n}")
    if not 1 <= seeds <= SEEDS_PER_SCENE:
        raise ValueError(f"1 to {SEEDS_PER_SCENE} noise seeds per scene, not {seeds}")


def validation_suite(n: int = 32, size: int = IMAGE_SIZE) -> list[Scene]:
    """The validation split: n scenes, each with a held-out combination; object counts cycle 1, 2, 3.

    Training (periodic evaluation, guidance sweeps, export) reads this split only.
    """
    check_suite("validation", n)
    return [_suite_scene(_VALIDATION_STREAM, i, 0, size) for i in range(n)]


@lru_cache(maxsize=1)
def _validation_keys() -> tuple[frozenset, frozenset]:
    """Scene keys and multi-object captions of the largest validation split (for deduplication)."""
    val = validation_suite(MAX_SUITE)
    return frozenset(scene_key(s) for s in val), frozenset(s.caption for s in val if len(s.objects) > 1)


def _test_split(n: int, size: int) -> list[Scene]:
    """The test split: like validation, from another stream, never repeating a validation scene."""
    keys, captions = _validation_keys()
    out = []
    for i in range(n):
        attempt = 0
        while True:
            probe = _suite_scene(_TEST_STREAM, i, attempt, IMAGE_SIZE)
            if scene_key(probe) not in keys and (len(probe.objects) == 1 or probe.caption not in captions):
                break
            attempt += 1
        out.append(probe if size == IMAGE_SIZE else _suite_scene(_TEST_STREAM, i, attempt, size))
    return out


def suite(split: str, n: int, size: int = IMAGE_SIZE) -> list[Scene]:
    """The first n scenes of an evaluation split ('validation' or 'test')."""
    check_suite(split, n)
    return validation_suite(n, size) if split == "validation" else _test_split(n, size)


def noise_seeds(split: str, scene_index: int, count: int) -> list[int]:
    """The generation seeds of one scene of a split: a block of its own inside the split's seed range."""
    check_suite(split, scene_index + 1, count)
    base = _SEED_RANGES[split].start + scene_index * SEEDS_PER_SCENE
    return list(range(base, base + count))
