"""Procedural shape scenes with known object masks, their captions, and a caption parser.

A scene holds one to three flat-coloured shapes (circle, square, triangle) in four colours (red,
green, blue, yellow) on a light grey background, each at a named position (left, right, top,
bottom, center) and of a named size (small, large). Captions read like
"a red circle on the left and a small blue square at the top"; `parse_caption` turns such text
back into `ObjectSpec`s so an evaluator knows what a free prompt asks for.

Everything is deterministic from a seed (numpy + PIL only). Some colour x shape x position
combinations (`HELDOUT`) never occur in training scenes; `shapes/splits.py` builds the validation
and test scenes from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4
BACKGROUND = (238, 238, 238)

SHAPES = ("circle", "square", "triangle")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
COLOURS = tuple(PALETTE)
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")

# Object centres on a 64 px canvas (x, y); scaled for other image sizes.
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (16.0, 32.0),
    "right": (48.0, 32.0),
    "top": (32.0, 16.0),
    "bottom": (32.0, 48.0),
    "center": (32.0, 32.0),
}
# Half the side of an object's bounding box on a 64 px canvas.
HALF_EXTENT = {"small": 6.0, "large": 9.0}
JITTER = 2.0

POSITION_PHRASES = {
    "left": ("on", "the", "left"),
    "right": ("on", "the", "right"),
    "top": ("at", "the", "top"),
    "bottom": ("at", "the", "bottom"),
    "center": ("in", "the", "center"),
}

# Colour x shape x position combinations never drawn in training scenes (fixed; part of the
# model card). Every colour appears twice, every shape and position at least once.
HELDOUT: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "right"),
    ("red", "triangle", "center"),
    ("green", "triangle", "top"),
    ("green", "square", "right"),
    ("blue", "square", "left"),
    ("blue", "triangle", "bottom"),
    ("yellow", "circle", "bottom"),
    ("yellow", "square", "top"),
)

# Words the parser accepts for each attribute (first entry of each tuple is canonical).
_SHAPE_WORDS = {
    "circle": "circle",
    "circles": "circle",
    "disc": "circle",
    "disk": "circle",
    "ball": "circle",
    "square": "square",
    "squares": "square",
    "box": "square",
    "triangle": "triangle",
    "triangles": "triangle",
}
_COLOUR_WORDS = {c: c for c in COLOURS}
_POSITION_WORDS = {
    "left": "left",
    "right": "right",
    "top": "top",
    "bottom": "bottom",
    "center": "center",
    "centre": "center",
    "middle": "center",
    "upper": "top",
    "lower": "bottom",
}
_SIZE_WORDS = {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large", "huge": "large"}


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object; position and size may be left unsaid (None)."""

    shape: str
    colour: str
    position: str | None = None
    size: str | None = None


@dataclass
class SceneObject:
    """One drawn object: the stated spec, its resolved placement, and its boolean mask."""

    spec: ObjectSpec
    position: str
    size: str
    centre: tuple[float, float]
    bbox: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False)


@dataclass
class Scene:
    """A rendered scene: RGB image (H, W, 3 uint8), caption, caption words and objects.

    `words` lists the caption's words in order, each with the index of the object it describes
    (its size, colour, shape and position words) or -1 for function words and punctuation.
    """

    image: np.ndarray = field(repr=False)
    caption: str
    words: list[tuple[str, int]]
    objects: list[SceneObject]


def is_heldout(colour: str, shape: str, position: str) -> bool:
    """True if this colour x shape x position combination is kept out of training."""
    return (colour, shape, position) in HELDOUT


def make_caption(specs: list[ObjectSpec]) -> tuple[str, list[tuple[str, int]]]:
    """Caption text and its (word, object index) list for objects in the given order."""
    words: list[tuple[str, int]] = []
    for i, spec in enumerate(specs):
        if i > 0:
            words.append(("and", -1) if i == len(specs) - 1 else (",", -1))
        words.append(("a", -1))
        if spec.size is not None:
            words.append((spec.size, i))
        words += [(spec.colour, i), (spec.shape, i)]
        if spec.position is not None:
            preposition, article, place = POSITION_PHRASES[spec.position]
            words += [(preposition, -1), (article, -1), (place, i)]
    text = ""
    for word, _ in words:
        text += word if (word == "," or not text) else " " + word
    return text, words


def parse_caption(text: str) -> list[ObjectSpec]:
    """Objects a free-form caption asks for, in order of mention.

    A colour word opens a new object; size words before it and the shape and position words
    after it (up to the next colour word) belong to it. A shape without a colour is ignored,
    since the evaluator can only judge coloured objects.
    """
    tokens = re.findall(r"[a-z]+", text.lower())
    specs: list[dict[str, str | None]] = []
    pending_size: str | None = None
    for tok in tokens:
        if tok in _SIZE_WORDS:
            if specs and specs[-1]["shape"] is None and specs[-1]["size"] is None:
                specs[-1]["size"] = _SIZE_WORDS[tok]
            else:
                pending_size = _SIZE_WORDS[tok]
        elif tok in _COLOUR_WORDS:
            specs.append({"colour": _COLOUR_WORDS[tok], "shape": None, "position": None, "size": pending_size})
            pending_size = None
        elif tok in _SHAPE_WORDS and specs and specs[-1]["shape"] is None:
            specs[-1]["shape"] = _SHAPE_WORDS[tok]
        elif tok in _POSITION_WORDS and specs and specs[-1]["position"] is None:
            specs[-1]["position"] = _POSITION_WORDS[tok]
    return [
        ObjectSpec(shape=str(s["shape"]), colour=str(s["colour"]), position=s["position"], size=s["size"])
        for s in specs
        if s["shape"] is not None
    ]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill: tuple[int, ...] | int
) -> None:
    x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _place(
    rng: np.random.Generator, positions: list[str], sizes: list[str | None], size: int
) -> tuple[list[tuple[float, float]], list[str]]:
    """Centres and sizes for objects at the given positions whose boxes do not touch."""
    scale = size / IMAGE_SIZE
    for _ in range(50):
        chosen = [s if s is not None else str(rng.choice(SIZES)) for s in sizes]
        centres = [
            (ANCHORS[p][0] + rng.uniform(-JITTER, JITTER), ANCHORS[p][1] + rng.uniform(-JITTER, JITTER))
            for p in positions
        ]
        boxes = [
            (cx - HALF_EXTENT[s], cy - HALF_EXTENT[s], cx + HALF_EXTENT[s], cy + HALF_EXTENT[s])
            for (cx, cy), s in zip(centres, chosen, strict=True)
        ]
        clear = all(
            a[2] + 1 < b[0] or b[2] + 1 < a[0] or a[3] + 1 < b[1] or b[3] + 1 < a[1]
            for i, a in enumerate(boxes)
            for b in boxes[i + 1 :]
        )
        if clear:
            return [(x * scale, y * scale) for x, y in centres], chosen
    fallback = ["small"] * len(positions)
    return [(ANCHORS[p][0] * scale, ANCHORS[p][1] * scale) for p in positions], fallback


def render(specs: list[ObjectSpec], rng: np.random.Generator, size: int = IMAGE_SIZE) -> Scene:
    """Draw the objects (positions/sizes left unsaid are chosen at random) and caption them.

    Objects without a position take free positions at random; positions must be distinct.
    """
    taken = {s.position for s in specs if s.position is not None}
    free = [p for p in POSITIONS if p not in taken]
    rng.shuffle(free)
    positions = [s.position if s.position is not None else free.pop() for s in specs]
    if len(set(positions)) != len(positions):
        raise ValueError("objects must have distinct positions")
    centres, sizes = _place(rng, positions, [s.size for s in specs], size)
    return _draw(specs, centres, positions, sizes, size)


def redraw(scene: Scene, shapes: list[str]) -> Scene:
    """The same scene (colours, places, sizes, stated words) with each object drawn as a new shape.

    A counterfactual twin for training: it differs from `scene` only where the shapes differ.
    """
    if len(shapes) != len(scene.objects):
        raise ValueError(f"{len(shapes)} shapes for {len(scene.objects)} objects")
    size = scene.image.shape[0]
    specs = [
        ObjectSpec(s, o.spec.colour, o.spec.position, o.spec.size) for s, o in zip(shapes, scene.objects, strict=True)
    ]
    return _draw(
        specs,
        [o.centre for o in scene.objects],
        [o.position for o in scene.objects],
        [o.size for o in scene.objects],
        size,
    )


def _draw(
    specs: list[ObjectSpec], centres: list[tuple[float, float]], positions: list[str], sizes: list[str], size: int
) -> Scene:
    """Draw placed objects on the background, with their masks and caption."""
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    objects: list[SceneObject] = []
    for spec, (cx, cy), pos, sz in zip(specs, centres, positions, sizes, strict=True):
        half = HALF_EXTENT[sz] * size / IMAGE_SIZE
        args = (cx * SUPERSAMPLE, cy * SUPERSAMPLE, half * SUPERSAMPLE)
        _draw_shape(draw, spec.shape, *args, fill=PALETTE[spec.colour])
        layer = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(layer), spec.shape, *args, fill=255)
        cover = np.asarray(layer, dtype=np.float32).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE)
        mask = cover.mean(axis=(1, 3)) >= 127.5
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(SceneObject(spec, pos, sz, (cx, cy), bbox, mask))
    image = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)
    caption, words = make_caption(specs)
    return Scene(image=image.copy(), caption=caption, words=words, objects=objects)


def sample_specs(
    rng: np.random.Generator,
    n_objects: int,
    *,
    heldout: str = "exclude",
    p_size_word: float = 0.5,
    p_no_position: float = 0.1,
) -> list[ObjectSpec]:
    """Random object specs with distinct colours and positions.

    heldout: "exclude" never uses a `HELDOUT` combination (training), "require" makes the first
    object a held-out combination (evaluation), "allow" ignores the list.
    In "require" mode every position is stated and no object is left without one.
    """
    if not 1 <= n_objects <= 3:
        raise ValueError("scenes hold 1 to 3 objects")
    while True:
        positions = list(rng.choice(POSITIONS, size=n_objects, replace=False))
        colours = list(rng.choice(COLOURS, size=n_objects, replace=False))
        shapes = list(rng.choice(SHAPES, size=n_objects, replace=True))
        if heldout == "require":
            colour, shape, position = HELDOUT[int(rng.integers(len(HELDOUT)))]
            others = [p for p in positions if p != position][: n_objects - 1]
            positions = [position, *others]
            rest = [c for c in colours if c != colour][: n_objects - 1]
            colours = [colour, *rest]
            shapes[0] = shape
        triples = list(zip(colours, shapes, positions, strict=True))
        if heldout == "exclude" and any(is_heldout(*t) for t in triples):
            continue
        specs = []
        for colour, shape, position in triples:
            stated_size = str(rng.choice(SIZES)) if rng.random() < p_size_word else None
            drop = heldout != "require" and rng.random() < p_no_position
            specs.append(ObjectSpec(str(shape), str(colour), None if drop else str(position), stated_size))
        if heldout == "require":
            order = rng.permutation(n_objects)
            specs = [specs[i] for i in order]
        return specs


def training_scene(seed: int, n_objects: int | None = None, size: int = IMAGE_SIZE) -> Scene:
    """The training scene for this seed (1-3 objects unless n_objects is given)."""
    rng = np.random.default_rng([seed, 7001])
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    while True:
        specs = sample_specs(rng, n)
        scene = render(specs, rng, size)
        if not any(is_heldout(o.spec.colour, o.spec.shape, o.position) for o in scene.objects):
            return scene
        # An unstated position landed on a held-out combination: draw again.


def scene_for_prompt(text: str, seed: int = 0, size: int = IMAGE_SIZE) -> Scene:
    """Render what a free prompt asks for (ground-truth masks for an evaluator)."""
    specs = parse_caption(text)
    rng = np.random.default_rng([seed, 5003])
    stated = [s.position for s in specs if s.position is not None]
    if len(set(stated)) != len(stated) or len(specs) > len(POSITIONS):
        raise ValueError(f"cannot lay out {text!r}: positions repeat")
    scene = render(specs, rng, size)
    scene.caption = text
    return scene


__all__ = [
    "ANCHORS",
    "BACKGROUND",
    "COLOURS",
    "HELDOUT",
    "IMAGE_SIZE",
    "PALETTE",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "ObjectSpec",
    "Scene",
    "SceneObject",
    "is_heldout",
    "make_caption",
    "parse_caption",
    "render",
    "sample_specs",
    "scene_for_prompt",
    "training_scene",
]
