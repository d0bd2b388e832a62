"""Synthetic scenes of coloured shapes, with exact ground truth for localisation.

Every picture holds one or more filled shapes (circle, square, triangle) in
saturated colours on a grey or noisy background. Because each shape is drawn
by OpenCV *without anti-aliasing*, its mask is exactly the set of pixels it
was drawn on, and its box is the tight bounding box of that mask. This makes
the scenes a cheap stand-in for the paper's datasets wherever an exact
answer is needed: tests, examples, the demo model and the benchmarks.

Scenes with several objects place them in equal-width vertical slots, left to
right, with distinct shapes and distinct colours, so they never overlap and a
sentence such as "red circle left of blue square" is always true. They serve
the paper's two-class ("cat and dog") pictures, the captioning example and the
question-answering example ("what color is the square?").

Generation is deterministic: image `i` depends only on `seed` and `i`, so
`make_scenes(10, seed=3)` equals the first ten images of
`make_scenes(100, seed=3)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import cv2
import numpy as np

__all__ = [
    "COLORS",
    "SHAPE_NAMES",
    "Questions",
    "Scenes",
    "caption_vocabulary",
    "captions",
    "color_questions",
    "make_scenes",
]

#: The shapes `make_scenes` can draw, in their default class order.
SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle")

#: Colour name -> RGB in [0, 1]. Every channel is exactly 0 or 1, values the
#: backgrounds never take, so an object's pixels are recognisable by value.
COLORS: Mapping[str, tuple[float, float, float]] = MappingProxyType(
    {
        "red": (1.0, 0.0, 0.0),
        "green": (0.0, 1.0, 0.0),
        "blue": (0.0, 0.0, 1.0),
        "yellow": (1.0, 1.0, 0.0),
        "magenta": (1.0, 0.0, 1.0),
        "cyan": (0.0, 1.0, 1.0),
    }
)

_BACKGROUNDS = ("noise", "plain")
_PLAIN_LEVEL = 0.5  # grey of the plain background
_NOISE_RANGE = (0.25, 0.75)  # uniform i.i.d. noise, per pixel and channel
_MARGIN = 1  # free pixels between an object and the edge of its slot


@dataclasses.dataclass(frozen=True)
class Scenes:
    """A batch of synthetic scenes with their ground truth.

    All arrays are read-only. `M` is the number of objects per image; objects
    are ordered left to right, so object 0 is the leftmost.

    Attributes:
        images: float32 array of shape `(batch, size, size, 3)`, RGB in [0, 1].
        labels: int64 array of shape `(batch,)`: the class index (into
            `class_names`) of object 0's shape. For single-object scenes this
            is the classification label.
        object_shapes: int64 array of shape `(batch, M)`: each object's shape,
            an index into `class_names`.
        object_colors: int64 array of shape `(batch, M)`: each object's colour,
            an index into `color_names`.
        boxes: int64 array of shape `(batch, M, 4)`: each object's box
            `(x0, y0, x1, y1)` in pixels, inclusive-exclusive: the object
            covers columns `x0 <= x < x1` and rows `y0 <= y < y1`, so
            `masks[i, m, y0:y1, x0:x1]` is its tight crop.
        masks: bool array of shape `(batch, M, size, size)`: exactly the pixels
            each object was drawn on.
        class_names: the shape names, in class-index order.
        color_names: the colour names, in colour-index order.
    """

    images: np.ndarray
    labels: np.ndarray
    object_shapes: np.ndarray
    object_colors: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray
    class_names: tuple[str, ...]
    color_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def multi_hot(self) -> np.ndarray:
        """float32 array `(batch, num_classes)`: 1 where a shape is in the image.

        The target for a multi-label model on multi-object scenes (the paper's
        "cat and dog" picture).
        """
        out = np.zeros((len(self), len(self.class_names)), dtype=np.float32)
        rows = np.repeat(np.arange(len(self)), self.object_shapes.shape[1])
        out[rows, self.object_shapes.ravel()] = 1.0
        return out


@dataclasses.dataclass(frozen=True)
class Questions:
    """One "what color is the <shape>?" question per scene, with its answer.

    Attributes:
        text: the questions, e.g. `"what color is the square?"`.
        asked_shapes: int64 array `(batch,)`: the shape asked about, an index
            into `class_names`; the natural question encoding for a model.
        answers: int64 array `(batch,)`: the answer, an index into
            `color_names`.
        object_index: int64 array `(batch,)`: which object the question is
            about, so `scenes.masks[i, object_index[i]]` is where the answer is.
    """

    text: tuple[str, ...]
    asked_shapes: np.ndarray
    answers: np.ndarray
    object_index: np.ndarray


def make_scenes(
    n: int,
    *,
    size: int = 64,
    objects: int = 1,
    shapes: Sequence[str] = SHAPE_NAMES,
    colors: Sequence[str] | None = None,
    background: str = "noise",
    object_scale: tuple[float, float] = (0.25, 0.45),
    seed: int = 0,
) -> Scenes:
    """Generates `n` scenes of filled coloured shapes with exact masks and boxes.

    Each image holds `objects` shapes, one per equal-width vertical slot from
    left to right, so objects never overlap and object `m` lies entirely left
    of object `m + 1`. Within an image the shapes are distinct and the colours
    are distinct. Each object's side length is drawn uniformly from
    `object_scale` (fractions of `size`, capped so it fits its slot), and its
    position uniformly among the places where it fits.

    Args:
        n: number of scenes, at least 1.
        size: height and width of the square images, in pixels.
        objects: number of objects per image, between 1 and `len(shapes)`.
        shapes: the shapes to draw, a subset of `SHAPE_NAMES` in any order;
            this order defines the class indices and `class_names`.
        colors: the colours to paint with, names from `COLORS`; defaults to
            all of them. Needs at least `objects` colours.
        background: `"noise"` (uniform noise in [0.25, 0.75] per pixel and
            channel) or `"plain"` (uniform grey 0.5). Neither ever contains
            the values 0 or 1 that make up the object colours.
        object_scale: `(low, high)` bounds of an object's side length as a
            fraction of `size`.
        seed: seed of the generator; the same arguments and seed always give
            identical arrays.

    Returns:
        A `Scenes` holding images `(n, size, size, 3)` float32 in [0, 1],
        labels, per-object shapes, colours, boxes and masks.

    Raises:
        ValueError: if an argument is out of range, names an unknown shape,
            colour or background, or the objects cannot fit the image.

    Example:

    >>> scenes = make_scenes(8, objects=2, background="plain", seed=1)
    >>> scenes.images.shape, scenes.masks.shape, scenes.boxes.shape
    ((8, 64, 64, 3), (8, 2, 64, 64), (8, 2, 4))
    >>> bool(np.all(scenes.boxes[:, 0, 2] <= scenes.boxes[:, 1, 0]))  # 0 left of 1
    True
    """
    shapes = tuple(shapes)
    color_names = tuple(COLORS) if colors is None else tuple(colors)
    side_range = _validate(n, size, objects, shapes, color_names, background, object_scale)
    palette = np.array([COLORS[name] for name in color_names], dtype=np.float32)
    shape_ids = np.array([SHAPE_NAMES.index(s) for s in shapes])

    images = np.empty((n, size, size, 3), dtype=np.float32)
    object_shapes = np.empty((n, objects), dtype=np.int64)
    object_colors = np.empty((n, objects), dtype=np.int64)
    masks = np.zeros((n, objects, size, size), dtype=bool)
    slot = size // objects
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n)):
        rng = np.random.default_rng(child)
        if background == "noise":
            images[i] = rng.uniform(*_NOISE_RANGE, size=(size, size, 3))
        else:
            images[i] = _PLAIN_LEVEL
        object_shapes[i] = rng.choice(len(shapes), size=objects, replace=False)
        object_colors[i] = rng.choice(len(color_names), size=objects, replace=False)
        for m in range(objects):
            side = int(rng.integers(side_range[0], side_range[1] + 1))
            x = int(rng.integers(m * slot + _MARGIN, (m + 1) * slot - _MARGIN - side + 1))
            y = int(rng.integers(_MARGIN, size - _MARGIN - side + 1))
            masks[i, m] = _draw(SHAPE_NAMES[shape_ids[object_shapes[i, m]]], x, y, side, size)
            images[i][masks[i, m]] = palette[object_colors[i, m]]

    return Scenes(
        images=_frozen(images),
        labels=_frozen(object_shapes[:, 0].copy()),
        object_shapes=_frozen(object_shapes),
        object_colors=_frozen(object_colors),
        boxes=_frozen(_boxes_of(masks)),
        masks=_frozen(masks),
        class_names=shapes,
        color_names=color_names,
    )


def captions(scenes: Scenes) -> tuple[str, ...]:
    """Describes each scene in words, objects from left to right.

    One object gives `"red circle"`, two give `"red circle left of blue
    square"`, three chain the relation: `"... left of green triangle"`.

    Args:
        scenes: the scenes to describe.

    Returns:
        One caption per scene; every word is in `caption_vocabulary(scenes)`.

    Example:

    >>> captions(make_scenes(2, objects=2, seed=0))  # doctest: +SKIP
    ('yellow circle left of red square', 'blue triangle left of green circle')
    """
    phrases = [
        [f"{scenes.color_names[c]} {scenes.class_names[s]}" for s, c in zip(*pair, strict=True)]
        for pair in zip(scenes.object_shapes, scenes.object_colors, strict=True)
    ]
    return tuple(" left of ".join(objects) for objects in phrases)


def caption_vocabulary(scenes: Scenes) -> tuple[str, ...]:
    """Lists every word `captions` can produce for these scenes, in a fixed order.

    Args:
        scenes: the scenes whose colour and class names make up the words.

    Returns:
        The colour names, then the class names, then `"left"` and `"of"`;
        a word's position is its token id.

    Example:

    >>> caption_vocabulary(make_scenes(1, shapes=("circle", "square"), colors=("red", "blue")))
    ('red', 'blue', 'circle', 'square', 'left', 'of')
    """
    return (*scenes.color_names, *scenes.class_names, "left", "of")


def color_questions(scenes: Scenes, *, seed: int = 0) -> Questions:
    """Asks "what color is the <shape>?" about one randomly chosen object per scene.

    Args:
        scenes: the scenes to ask about.
        seed: seed choosing which object each question is about.

    Returns:
        A `Questions` with the text, the asked shape, the answer (a colour
        index) and the index of the object that holds the answer.

    Example:

    >>> scenes = make_scenes(4, objects=2, seed=0)
    >>> q = color_questions(scenes, seed=0)
    >>> q.text[0]  # doctest: +SKIP
    'what color is the square?'
    >>> bool(np.all(q.answers == scenes.object_colors[np.arange(4), q.object_index]))
    True
    """
    rows = np.arange(len(scenes))
    index = np.random.default_rng(seed).integers(0, scenes.object_shapes.shape[1], size=len(rows))
    asked = scenes.object_shapes[rows, index]
    return Questions(
        text=tuple(f"what color is the {scenes.class_names[s]}?" for s in asked),
        asked_shapes=_frozen(asked),
        answers=_frozen(scenes.object_colors[rows, index]),
        object_index=_frozen(index.astype(np.int64)),
    )


def _validate(
    n: int,
    size: int,
    objects: int,
    shapes: tuple[str, ...],
    color_names: tuple[str, ...],
    background: str,
    object_scale: tuple[float, float],
) -> tuple[int, int]:
    """Checks the arguments of `make_scenes`; returns the (min, max) side in pixels."""
    if n < 1:
        raise ValueError(f"`n` must be at least 1. Received: n={n}")
    unknown = [s for s in shapes if s not in SHAPE_NAMES]
    if unknown or not shapes or len(set(shapes)) != len(shapes):
        raise ValueError(
            f"`shapes` must be distinct names from {SHAPE_NAMES}. Received: shapes={shapes}"
        )
    unknown = [c for c in color_names if c not in COLORS]
    if unknown or not color_names or len(set(color_names)) != len(color_names):
        raise ValueError(
            f"`colors` must be distinct names from {tuple(COLORS)}. Received: colors={color_names}"
        )
    if not 1 <= objects <= min(len(shapes), len(color_names)):
        raise ValueError(
            "`objects` must be between 1 and the number of shapes and of colours, since "
            f"objects in one image have distinct shapes and colours. Received: objects={objects} "
            f"with {len(shapes)} shapes and {len(color_names)} colors"
        )
    if background not in _BACKGROUNDS:
        raise ValueError(
            f"`background` must be one of {_BACKGROUNDS}. Received: background={background!r}"
        )
    low, high = object_scale
    if not 0 < low <= high <= 1:
        raise ValueError(
            "`object_scale` must be (low, high) with 0 < low <= high <= 1. "
            f"Received: object_scale={object_scale}"
        )
    fit = size // objects - 2 * _MARGIN  # the largest side a slot holds
    side_low, side_high = max(3, round(low * size)), min(round(high * size), fit)
    if side_low > side_high:
        raise ValueError(
            f"{objects} object(s) of at least {side_low} pixels do not fit side by side in a "
            f"{size}-pixel image. Received: size={size}, objects={objects}, "
            f"object_scale={object_scale}; use a larger `size` or smaller `object_scale`."
        )
    return side_low, side_high


def _draw(shape: str, x: int, y: int, side: int, size: int) -> np.ndarray:
    """Draws one filled shape in the `side`-pixel square at (x, y); returns its bool mask."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    last = side - 1
    if shape == "square":
        cv2.rectangle(canvas, (x, y), (x + last, y + last), 1, thickness=cv2.FILLED)
    elif shape == "circle":
        radius = last // 2
        center = (x + radius, y + radius)
        cv2.circle(canvas, center, radius, 1, thickness=cv2.FILLED, lineType=cv2.LINE_8)
    else:  # triangle, apex up
        points = np.array([[x, y + last], [x + last, y + last], [x + last // 2, y]], np.int32)
        cv2.fillPoly(canvas, [points], 1, lineType=cv2.LINE_8)
    return canvas.astype(bool)


def _boxes_of(masks: np.ndarray) -> np.ndarray:
    """Tight inclusive-exclusive (x0, y0, x1, y1) boxes of masks `(batch, M, size, size)`."""
    cols, rows = masks.any(axis=2), masks.any(axis=3)  # (batch, M, size) each
    x0, y0 = cols.argmax(axis=-1), rows.argmax(axis=-1)
    x1 = cols.shape[-1] - cols[..., ::-1].argmax(axis=-1)
    y1 = rows.shape[-1] - rows[..., ::-1].argmax(axis=-1)
    return np.stack([x0, y0, x1, y1], axis=-1).astype(np.int64)


def _frozen(array: np.ndarray) -> np.ndarray:
    """Marks `array` read-only and returns it."""
    array.setflags(write=False)
    return array
