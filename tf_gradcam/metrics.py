"""The paper's evaluations of a saliency map, as plain NumPy/OpenCV functions.

Each function follows one experiment of Selvaraju et al., "Grad-CAM: Visual
Explanations from Deep Networks via Gradient-based Localization":

- §4.1 weakly-supervised localisation: `box_from_heatmap`, `iou`,
  `localization_error`;
- §4.3 and Appendix D, the pointing game: `pointing_game`,
  `pointing_game_top_k`, `pointing_accuracy`;
- §5.3 faithfulness: `occlusion_map`, `rank_correlation`, and the deletion and
  insertion curves of Petsiuk et al. (RISE): `deletion_curve`,
  `insertion_curve`;
- §8.1 captioning: `inside_outside_ratio`;
- §7 textual explanations: `textual_explanation`.

Conventions shared by every function:

- Heatmaps are `(batch, height, width)` arrays. A single `(height, width)`
  map is treated as a batch of one, and the result keeps its batch axis.
- Boxes are `(x0, y0, x1, y1)` in pixels with `x1`/`y1` exclusive: pixel
  `(row, col)` is inside when `y0 <= row < y1` and `x0 <= col < x1`, and the
  box `(0, 0, width, height)` is the whole image. A box with `x1 <= x0` or
  `y1 <= y0` is empty; `(0, 0, 0, 0)` is the empty box used for padding.
- Images are `(batch, height, width, channels)`. A model is a `keras.Model`
  (called with `training=False`) or any callable mapping images to
  `(batch, classes)` scores.
- Signals and volumes (Conv1D and Conv3D models): the functions that do not
  need image boxes, `pointing_game`, `pointing_game_top_k`,
  `rank_correlation`, `inside_outside_ratio`, `occlusion_map`,
  `deletion_curve` and `insertion_curve`, take `axes=1` for signal maps
  `(batch, length)` (inputs `(batch, length, channels)`) and `axes=3` for
  volume maps `(batch, depth, height, width)` (inputs `(batch, depth, height,
  width, channels)`); the default `axes=2` is the image layout above. Objects
  are then boolean masks of the maps' shape (boxes exist for images only),
  and distances are Euclidean between index vectors. `box_from_heatmap`,
  `iou` and `localization_error` work on image boxes only; a `(batch,
  length)` signal map cannot be told from one `(height, width)` image map,
  so do not pass one to them.

Nothing here imports TensorFlow; a Keras model passed in is simply called.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from tf_gradcam.errors import InputError, TargetError

__all__ = [
    "PerturbationCurve",
    "TextualExplanation",
    "box_from_heatmap",
    "deletion_curve",
    "insertion_curve",
    "inside_outside_ratio",
    "iou",
    "localization_error",
    "occlusion_map",
    "pointing_accuracy",
    "pointing_game",
    "pointing_game_top_k",
    "rank_correlation",
    "textual_explanation",
]

#: Maps model outputs (whatever the model returns) to `(batch, classes)` scores.
ScoreFn = Callable[[Any], Any]


# ---------------------------------------------------------------------------
# §4.1 Weakly-supervised localisation
# ---------------------------------------------------------------------------


def box_from_heatmap(heatmaps: Any, *, threshold: float = 0.15) -> np.ndarray:
    """Bounding box of the largest segment of each thresholded heatmap (§4.1).

    Following §4.1 of the paper, each map is binarised at `threshold` times its
    own maximum: a pixel is kept when `value >= threshold * max` (inclusive).
    Kept pixels are grouped into connected segments with 8-connectivity
    (diagonal neighbours touch), and the box is drawn around the single
    largest segment (most pixels; a tie goes to the segment whose first pixel
    comes first in row-major order).

    A map whose maximum is not positive (all zero, or all negative) has no
    segment; its box is the empty box `(0, 0, 0, 0)`, whose `iou` with any box
    is 0, so it simply counts as a localisation failure downstream.

    Args:
        heatmaps: array of shape `(batch, height, width)`, or `(height, width)`
            for a single map (then the result has shape `(1, 4)`).
        threshold: fraction of each map's maximum at which to binarise, in
            `[0, 1]`. The paper uses 0.15.

    Returns:
        An `int64` array of shape `(batch, 4)`: one `(x0, y0, x1, y1)` box per
        map, `x1`/`y1` exclusive.

    Raises:
        InputError: if `heatmaps` is not 2-D or 3-D (e.g. `(length,)` signal
            or `(batch, depth, height, width)` volume maps, which have no
            box: use `pointing_game` with masks and `axes=1` or `3`), is
            empty, or holds non-finite values.
        ValueError: if `threshold` is not in `[0, 1]`.

    Example:

    ```python
    heatmap = np.zeros((6, 8))
    heatmap[1:3, 2:5] = 1.0  # the largest segment
    heatmap[5, 7] = 0.9  # a smaller one
    box_from_heatmap(heatmap)  # array([[2, 1, 5, 3]])
    ```
    """
    maps = _as_heatmaps(heatmaps, "heatmaps", images_only=True)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"Argument `threshold` must be a fraction of the map's maximum, in [0, 1]. "
            f"Received: threshold={threshold!r}"
        )
    boxes = np.zeros((maps.shape[0], 4), dtype=np.int64)
    for i, heatmap in enumerate(maps):
        peak = heatmap.max()
        if not peak > 0:
            continue
        binary = (heatmap >= threshold * peak).astype(np.uint8)
        _, labels, stats, _ = cv2.connectedComponentsWithStats(
            binary, connectivity=8, ltype=cv2.CV_32S
        )
        areas = stats[1:, cv2.CC_STAT_AREA]
        tied = 1 + np.flatnonzero(areas == areas.max())
        flat = labels.ravel()
        best = min(tied, key=lambda label: int(np.argmax(flat == label)))
        x0, y0 = stats[best, cv2.CC_STAT_LEFT], stats[best, cv2.CC_STAT_TOP]
        width, height = stats[best, cv2.CC_STAT_WIDTH], stats[best, cv2.CC_STAT_HEIGHT]
        boxes[i] = (x0, y0, x0 + width, y0 + height)
    return boxes


def iou(boxes_a: Any, boxes_b: Any) -> np.ndarray:
    """Intersection over union of boxes, pair by pair.

    Areas are `(x1 - x0) * (y1 - y0)` (exclusive corners), so integer boxes
    are measured in pixels. Leading axes broadcast as in NumPy: `(batch, 4)`
    against `(batch, 4)` gives `(batch,)`, and `(4,)` against `(m, 4)` gives
    `(m,)`. When both boxes are empty the union is 0 and the IoU is defined
    as 0, never NaN.

    Args:
        boxes_a: array of shape `(..., 4)` of `(x0, y0, x1, y1)` boxes.
        boxes_b: array of shape `(..., 4)`, broadcastable against `boxes_a`.

    Returns:
        A `float64` array of the broadcast leading shape, values in `[0, 1]`.

    Raises:
        InputError: if either last axis is not 4, the leading shapes do not
            broadcast, or a coordinate is not finite.

    Example:

    ```python
    iou([0, 0, 2, 2], [1, 0, 3, 2])  # array(0.3333...): 2 shared pixels of 6
    ```
    """
    a = _as_boxes(boxes_a, "boxes_a")
    b = _as_boxes(boxes_b, "boxes_b")
    try:
        a, b = np.broadcast_arrays(a, b)
    except ValueError:
        raise InputError(
            f"Arguments `boxes_a` and `boxes_b` must have broadcastable shapes (..., 4). "
            f"Received: boxes_a.shape={a.shape}, boxes_b.shape={b.shape}"
        ) from None
    width = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    height = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.clip(width, 0, None) * np.clip(height, 0, None)
    union = _box_area(a) + _box_area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def localization_error(
    pred_classes: Any,
    pred_boxes: Any,
    gt_classes: Any,
    gt_boxes: Any,
    *,
    top_k: int = 1,
    iou_threshold: float = 0.5,
) -> np.ndarray:
    """ILSVRC top-k localisation error per image (§4.1, Table 1).

    An image is correctly localised when, among its first `top_k`
    predictions, one has a ground-truth class *and* its box has
    `iou >= iou_threshold` with a ground-truth box of that class. Otherwise it
    is a localisation error. An image may have several ground-truth boxes (and
    several classes; a match with any of them counts).

    Args:
        pred_classes: int array of shape `(batch, k)`, the predicted classes
            of each image, best first.
        pred_boxes: array of shape `(batch, k, 4)`, the box predicted for
            each of those classes (e.g. from `box_from_heatmap`).
        gt_classes: the ground-truth class of each box: an int array of shape
            `(batch,)` (one box per image) or `(batch, m)` (padded with -1),
            or a sequence of `batch` ints or 1-D int arrays. Negative classes
            are padding and are ignored.
        gt_boxes: the ground-truth boxes, matching `gt_classes`: an array of
            shape `(batch, 4)` or `(batch, m, 4)`, or a sequence of `batch`
            `(4,)` or `(m_i, 4)` arrays.
        top_k: how many predictions to consider, `1 <= top_k <= k`
            (1 and 5 in the paper).
        iou_threshold: minimum IoU of a correct box (0.5 in ILSVRC).

    Returns:
        A boolean array of shape `(batch,)`, `True` where the image is a
        localisation *error*; its mean is the error rate of Table 1.

    Raises:
        InputError: if the shapes of the predictions or of the ground truth
            disagree.
        ValueError: if `top_k` is not in `[1, k]` or `iou_threshold` not in
            `[0, 1]`.

    Example:

    ```python
    pred_classes = np.array([[3, 7]])
    pred_boxes = np.array([[[0, 0, 4, 4], [10, 10, 20, 20]]])
    localization_error(pred_classes, pred_boxes, [7], [[10, 10, 20, 20]], top_k=1)
    # array([ True]): the top-1 class is wrong
    localization_error(pred_classes, pred_boxes, [7], [[10, 10, 20, 20]], top_k=2)
    # array([False])
    ```
    """
    classes = np.asarray(pred_classes)
    boxes = np.asarray(pred_boxes, dtype=np.float64)
    if classes.ndim != 2 or not np.issubdtype(classes.dtype, np.integer):
        raise InputError(
            "Argument `pred_classes` must be an int array of shape (batch, k), best "
            "prediction first (for top-1 only, use `pred_classes[:, None]`). "
            f"Received: pred_classes.shape={classes.shape}, dtype={classes.dtype}"
        )
    if boxes.shape != (*classes.shape, 4):
        raise InputError(
            "Argument `pred_boxes` must have shape (batch, k, 4), one box per predicted "
            f"class. Received: pred_boxes.shape={boxes.shape} for "
            f"pred_classes.shape={classes.shape}"
        )
    k = classes.shape[1]
    if not 1 <= top_k <= k:
        raise ValueError(
            f"Argument `top_k` must be between 1 and the number of predictions ({k}). "
            f"Received: top_k={top_k!r}"
        )
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(
            f"Argument `iou_threshold` must be in [0, 1]. Received: iou_threshold={iou_threshold!r}"
        )
    truth = _labelled_boxes(gt_classes, gt_boxes, classes.shape[0])
    errors = np.ones(classes.shape[0], dtype=bool)
    for i, (true_classes, true_boxes) in enumerate(truth):
        for j in range(top_k):
            candidates = true_boxes[true_classes == classes[i, j]]
            if candidates.size and iou(boxes[i, j], candidates).max() >= iou_threshold:
                errors[i] = False
                break
    return errors


# ---------------------------------------------------------------------------
# §4.3 and Appendix D: the pointing game
# ---------------------------------------------------------------------------


def pointing_game(
    heatmaps: Any, masks_or_boxes: Any, *, tolerance: float = 0.0, axes: int = 2
) -> np.ndarray:
    """Whether each map's maximum point falls on the object (§4.3, Zhang et al.).

    The maximally activated pixel of each map (the first in row-major order if
    several share the maximum) is a *hit* when it lies within `tolerance`
    pixels (Euclidean distance between pixel indices, inclusive) of a pixel of
    the object, else a *miss*. With `tolerance=0` it must lie on the object
    itself; Zhang et al. use 15 pixels. A constant map (all zero, for example)
    points nowhere and is a miss.

    Signals and volumes work the same way with `axes=1` or `axes=3`: the
    maximum is the first in C order, and the tolerance is a Euclidean
    distance in samples or voxels (`|t - s| <= tolerance` along a signal).
    Their objects are boolean masks, `(batch, length)` or `(batch, depth,
    height, width)` (or a sequence of per-map masks or `(m, ...)` mask
    stacks).

    Args:
        heatmaps: array of shape `(batch, height, width)`, or `(height, width)`
            for a single map, cued with the ground-truth class; with `axes=1`
            `(batch, length)` or `(length,)`, with `axes=3` `(batch, depth,
            height, width)` or `(depth, height, width)`.
        masks_or_boxes: where the object is, for each image. Either a *boolean*
            array of shape `(batch, height, width)` (masks), a numeric array of
            shape `(batch, 4)` or `(batch, m, 4)` (boxes, empty boxes as
            padding), or a sequence of `batch` items each a boolean
            `(height, width)` / `(m, height, width)` mask or numeric `(4,)` /
            `(m, 4)` boxes. Several instances are merged: pointing at any one
            is a hit. Masks must be boolean, so that they are never mistaken
            for boxes (use `masks > 0` for 0/1 masks).
        tolerance: radius in pixels (samples, voxels), `>= 0`.
        axes: spatial axes of a map: 2 for images, 1 for signals, 3 for
            volumes.

    Returns:
        A boolean array of shape `(batch,)`, `True` for a hit. Use
        `pointing_accuracy` for `#hits / (#hits + #misses)`.

    Raises:
        InputError: if the maps or objects have a wrong shape or non-finite
            values, or boxes are given for signal or volume maps.
        ValueError: if `tolerance` is negative or `axes` not 1, 2 or 3.

    Example:

    ```python
    heatmap = np.zeros((10, 10))
    heatmap[2, 8] = 1.0
    pointing_game(heatmap, [[0, 0, 5, 5]])  # array([False])
    pointing_game(heatmap, [[0, 0, 5, 5]], tolerance=4)  # array([ True])

    signal = np.zeros(100)
    signal[42] = 1.0
    event = np.zeros(100, dtype=bool)
    event[45:60] = True
    pointing_game(signal, event, axes=1)  # array([False])
    pointing_game(signal, event, axes=1, tolerance=3)  # array([ True])
    ```
    """
    maps = _as_heatmaps(heatmaps, "heatmaps", _check_axes(axes))
    radius = _check_tolerance(tolerance)
    objects = _object_masks(masks_or_boxes, maps.shape, "masks_or_boxes")
    return np.array(
        [_is_hit(m, obj, radius) for m, obj in zip(maps, objects, strict=True)], dtype=bool
    )


def pointing_game_top_k(
    heatmaps: Any,
    pred_classes: Any,
    gt_classes: Any,
    gt_masks_or_boxes: Any,
    *,
    threshold: float,
    tolerance: float = 0.0,
    axes: int = 2,
) -> np.ndarray:
    """The paper's pointing game over the top-k predictions, with rejection (App. D).

    The paper extends the pointing game to measure recall as well as
    precision: maps are computed for the top-5 *predicted* classes, and a map
    whose maximum value is below `threshold` *rejects* its class (the method
    says the class is absent). §4.3: "if the visualization correctly rejects
    the predictions which are absent from the ground-truth categories, it
    gets that as a hit"; Appendix D: "we try to classify if the map is of the
    GT label or a category that is absent in the image". So every
    (image, predicted class) pair is scored, and none is left out:

    | predicted class is        | map max `< threshold` | map max `>= threshold`      |
    |---------------------------|-----------------------|-----------------------------|
    | absent from the image     | hit (correct reject)  | miss                        |
    | a ground-truth class      | miss (wrong reject)   | pointing game on its objects|

    The threshold compares raw map values across classes: pass maps that were
    *not* normalised per map (a map scaled to max 1 can never be rejected).

    Args:
        heatmaps: array of shape `(batch, k, height, width)`, the map of each
            predicted class; `(batch, k, length)` with `axes=1`, `(batch, k,
            depth, height, width)` with `axes=3` (objects are then boolean
            masks `(batch, [m,] length)` or `(batch, [m,] depth, height,
            width)`).
        pred_classes: int array of shape `(batch, k)`, the predicted classes.
        gt_classes: class of each ground-truth object: an int array of shape
            `(batch,)` or `(batch, m)` (padded with -1), or a sequence of
            `batch` ints or 1-D int arrays.
        gt_masks_or_boxes: the objects, matching `gt_classes`: a boolean array
            `(batch, height, width)` or `(batch, m, height, width)`, a numeric
            array `(batch, 4)` or `(batch, m, 4)`, or a sequence of `batch`
            items each a boolean `(m, height, width)` mask stack or numeric
            `(m, 4)` boxes.
        threshold: map maximum below which a class is rejected. The paper
            picks it per visualisation method; it does not report the value.
        tolerance: pointing tolerance in pixels, as in `pointing_game`.
        axes: spatial axes of a map: 2 for images, 1 for signals, 3 for
            volumes.

    Returns:
        A boolean array of shape `(batch, k)`, `True` for a hit. Its mean
        (`pointing_accuracy`) is the paper's accuracy (70.58% for Grad-CAM).

    Raises:
        InputError: if the shapes of maps, predictions and objects disagree.
        ValueError: if `tolerance` is negative, `threshold` not finite or
            `axes` not 1, 2 or 3.

    Example:

    ```python
    maps = np.zeros((1, 2, 8, 8))
    maps[0, 0, 2, 2] = 5.0  # class 3: confident, on the object
    maps[0, 1, 6, 6] = 0.1  # class 9: weak, so rejected
    pointing_game_top_k(maps, [[3, 9]], [3], [[0, 0, 4, 4]], threshold=1.0)
    # array([[ True,  True]]): a hit, and a correct rejection of absent class 9
    ```
    """
    axes = _check_axes(axes)
    maps = np.asarray(heatmaps, dtype=np.float64)
    classes = np.asarray(pred_classes)
    if maps.ndim != axes + 2 or maps.shape[1] == 0 or maps.size == 0:
        raise InputError(
            f"Argument `heatmaps` must have shape (batch, k, {_SPATIAL[axes]}), one map per "
            f"predicted class. Received: heatmaps.shape={maps.shape}"
        )
    if classes.shape != maps.shape[:2] or not np.issubdtype(classes.dtype, np.integer):
        raise InputError(
            "Argument `pred_classes` must be an int array of shape (batch, k) matching "
            f"`heatmaps`. Received: pred_classes.shape={classes.shape}, "
            f"dtype={classes.dtype}, heatmaps.shape={maps.shape}"
        )
    _check_finite(maps, "heatmaps")
    if not math.isfinite(threshold):
        raise ValueError(f"Argument `threshold` must be finite. Received: threshold={threshold!r}")
    radius = _check_tolerance(tolerance)
    n, k = maps.shape[:2]
    truth = _labelled_masks(gt_classes, gt_masks_or_boxes, (n, *maps.shape[2:]))
    hits = np.zeros((n, k), dtype=bool)
    for i, (true_classes, true_masks) in enumerate(truth):
        for j in range(k):
            present = true_classes == classes[i, j]
            if maps[i, j].max() < threshold:
                hits[i, j] = not present.any()
            elif present.any():
                hits[i, j] = _is_hit(maps[i, j], true_masks[present].any(axis=0), radius)
    return hits


def pointing_accuracy(hits: Any) -> float:
    """Pointing accuracy `#hits / (#hits + #misses)` (§4.3).

    Args:
        hits: boolean array of any shape, as returned by `pointing_game` or
            `pointing_game_top_k`; every entry is a hit or a miss.

    Returns:
        The fraction of hits, a float in `[0, 1]`.

    Raises:
        InputError: if `hits` is empty or not boolean.

    Example:

    ```python
    pointing_accuracy(np.array([True, False, True, True]))  # 0.75
    ```
    """
    outcomes = np.asarray(hits)
    if outcomes.dtype != bool or outcomes.size == 0:
        raise InputError(
            "Argument `hits` must be a non-empty boolean array of hits (True) and misses. "
            f"Received: hits.dtype={outcomes.dtype}, hits.shape={outcomes.shape}"
        )
    return float(np.count_nonzero(outcomes) / outcomes.size)


# ---------------------------------------------------------------------------
# §5.3 Faithfulness
# ---------------------------------------------------------------------------


def occlusion_map(
    model: Any,
    images: Any,
    target_classes: Any,
    *,
    patch_size: int | tuple[int, ...] = 16,
    stride: int | tuple[int, ...] = 8,
    fill_value: Any = 0.0,
    batch_size: int = 64,
    score_fn: ScoreFn | None = None,
    axes: int = 2,
) -> np.ndarray:
    """Occlusion sensitivity map (Zeiler & Fergus), the reference of §5.3.

    A `patch_size` square is slid over each image with step `stride`; its
    last position is moved flush with the bottom/right border so that every
    pixel is covered (patch rows start at `0, stride, 2*stride, ...` and
    `height - patch`). For each position the patch is set to `fill_value` and
    the *drop* in the target score is recorded:

        drop = score(image) - score(occluded image)

    so regions the class depends on are positive. Each pixel gets the mean
    drop of the patches covering it. The occluded copies of all images are
    scored in batches of `batch_size`, one model call per batch.

    The paper uses "CNN scores" and does not give patch size, stride or fill;
    the defaults here are a 16-pixel patch, stride 8, fill 0.

    With `axes=1` the inputs are signals `(batch, length, channels)` and the
    patch a window of `patch_size` samples; with `axes=3` volumes `(batch,
    depth, height, width, channels)` and the patch a box of voxels. Patch
    positions then follow the same rule along every axis.

    Args:
        model: a `keras.Model` (called as `model(x, training=False)`) or any
            callable mapping a `(batch, height, width, channels)` array to
            `(batch, classes)` scores.
        images: array of shape `(batch, height, width, channels)`, already
            preprocessed for the model.
        target_classes: int or int array of shape `(batch,)`, the class whose
            score is watched in each image.
        patch_size: side of the occluding square, or `(height, width)`; at
            most the image size. One int per spatial axis for `axes` 1 or 3
            (or one int for all of them).
        stride: step between patch positions, or `(rows, cols)` (one int per
            spatial axis).
        fill_value: what an occluded pixel becomes: a number, or an array
            broadcastable to `(patch, patch, channels)` (e.g. the per-channel
            mean); `(*patch_size, channels)` in other dimensions.
        batch_size: number of occluded copies per model call.
        score_fn: optional function applied to the model's raw outputs to get
            `(batch, classes)` scores, e.g. `np.log` to score the
            log-probabilities of a model that ends in softmax. Defaults to the
            outputs themselves.
        axes: spatial axes of an input: 2 for images, 1 for signals, 3 for
            volumes.

    Returns:
        A `float64` array of shape `(batch, height, width)` (`(batch,
        length)`, `(batch, depth, height, width)`).

    Raises:
        InputError: if `images` is not `axes + 2`-D with finite values,
            `fill_value` does not broadcast to a patch, or the model's scores
            are not `(batch, classes)`.
        TargetError: if a target class is negative or out of range of the
            scores.
        ValueError: if `patch_size`, `stride` or `batch_size` is not a
            positive int, the patch is larger than the image, or `axes` is
            not 1, 2 or 3.

    Example:

    ```python
    weights = np.arange(16.0).reshape(1, 4, 4, 1)
    linear = lambda x: (x * weights).sum(axis=(1, 2, 3))[:, None]  # 1 class
    occlusion_map(linear, np.ones((1, 4, 4, 1)), [0], patch_size=2, stride=2)
    # each 2x2 block holds the sum of its weights: [[10, 10, 18, 18], ...]
    ```
    """
    axes = _check_axes(axes)
    pixels = _as_images(images, axes)
    n, spatial, channels = pixels.shape[0], pixels.shape[1:-1], pixels.shape[-1]
    classes = _as_target_classes(target_classes, n)
    patch_shape = _positive_sizes(patch_size, "patch_size", axes)
    strides = _positive_sizes(stride, "stride", axes)
    batch_size = _positive_int(batch_size, "batch_size")
    if any(p > s for p, s in zip(patch_shape, spatial, strict=True)):
        raise ValueError(
            f"Argument `patch_size` must fit in the images ({'x'.join(map(str, spatial))}). "
            f"Received: patch_size={patch_size!r}"
        )
    # Row-major order of the patch positions (rows outer, columns inner in 2-D).
    regions = [
        tuple(slice(c, c + p) for c, p in zip(corner, patch_shape, strict=True))
        for corner in itertools.product(
            *(_patch_starts(*sizes) for sizes in zip(spatial, patch_shape, strides, strict=True))
        )
    ]
    per_image = len(regions)
    try:
        np.broadcast_to(np.asarray(fill_value, dtype=pixels.dtype), (*patch_shape, channels))
    except ValueError:
        raise InputError(
            "Argument `fill_value` must be a number or broadcastable to a patch of shape "
            f"{(*patch_shape, channels)}. Received: fill_value.shape={np.shape(fill_value)}"
        ) from None

    def occluded(rows: np.ndarray) -> np.ndarray:
        copies = pixels[rows // per_image]  # fancy indexing copies
        for copy, patch in zip(copies, rows % per_image, strict=True):
            copy[regions[patch]] = fill_value
        return copies

    scorer = _Scorer(model, score_fn, batch_size)
    original = scorer(lambda rows: pixels[rows], classes)
    drops = original[:, None] - scorer(occluded, np.repeat(classes, per_image)).reshape(n, -1)

    total = np.zeros((n, *spatial))
    count = np.zeros(spatial)
    for patch, region in enumerate(regions):
        total[(slice(None), *region)] += drops[:, patch].reshape((n,) + (1,) * axes)
        count[region] += 1
    return total / count


def rank_correlation(a: Any, b: Any, *, axes: int = 2) -> np.ndarray:
    """Spearman's rank correlation between two maps, per image (§5.3).

    The paper measures faithfulness as the rank correlation between a
    visualisation and the occlusion map (0.254 for Grad-CAM). Pixels are
    ranked within each map, tied values get the average of their ranks, and
    the result is the Pearson correlation of the ranks, as in
    `scipy.stats.spearmanr`. Where one of the maps is constant the
    correlation is undefined; it is reported as 0.0 (no association) instead
    of NaN, so that averages over a dataset stay finite.

    Signal and volume maps work the same way (`axes=1`, `axes=3`): samples or
    voxels are ranked within each map.

    Args:
        a: array of shape `(batch, height, width)`, or `(height, width)` for a
            single map; `(batch, length)` / `(length,)` with `axes=1`,
            `(batch, depth, height, width)` / `(depth, height, width)` with
            `axes=3`.
        b: array of the same shape as `a`.
        axes: spatial axes of a map: 2 for images, 1 for signals, 3 for
            volumes.

    Returns:
        A `float64` array of shape `(batch,)`, values in `[-1, 1]`.

    Raises:
        InputError: if the shapes differ, or a map is empty or not finite.
        ValueError: if `axes` is not 1, 2 or 3.

    Example:

    ```python
    rank_correlation([[1, 2], [3, 4]], [[10, 20], [30, 400]])  # array([1.])
    ```
    """
    axes = _check_axes(axes)
    first = _as_heatmaps(a, "a", axes)
    second = _as_heatmaps(b, "b", axes)
    if first.shape != second.shape:
        raise InputError(
            "Arguments `a` and `b` must have the same shape. "
            f"Received: a.shape={first.shape}, b.shape={second.shape}"
        )
    result = np.zeros(first.shape[0])
    for i, (x, y) in enumerate(zip(first, second, strict=True)):
        rank_x = _average_ranks(x.ravel())
        rank_y = _average_ranks(y.ravel())
        rank_x -= rank_x.mean()
        rank_y -= rank_y.mean()
        norm = math.sqrt(float(rank_x @ rank_x) * float(rank_y @ rank_y))
        if norm > 0:
            result[i] = np.clip(float(rank_x @ rank_y) / norm, -1.0, 1.0)
    return result


@dataclasses.dataclass(frozen=True)
class PerturbationCurve:
    """A deletion or insertion curve and its area.

    Attributes:
        fractions: `(steps + 1,)` fraction of the pixels removed (deletion) or
            inserted (insertion) at each step, from 0 to 1.
        scores: `(batch, steps + 1)` target score at each step.
        auc: `(batch,)` area under each curve, by the trapezoid rule over
            `fractions`. Lower is better for deletion, higher for insertion.
    """

    fractions: np.ndarray
    scores: np.ndarray
    auc: np.ndarray


def deletion_curve(
    model: Any,
    images: Any,
    target_classes: Any,
    heatmaps: Any,
    *,
    steps: int = 100,
    baseline: Any = 0.0,
    batch_size: int = 64,
    score_fn: ScoreFn | None = None,
    axes: int = 2,
) -> PerturbationCurve:
    """Deletion curve of Petsiuk et al. (RISE): remove the most salient pixels first.

    Pixels are ordered by decreasing heatmap value (ties in row-major order).
    At step `i` of `steps`, the first `floor(i * height * width / steps)` of
    them are replaced by `baseline` (all channels) and the target score is
    recorded; a faithful map makes the score fall fast, so a *low* area is
    good. RISE replaces pixels with zeros (black) in 224 steps of 224 pixels;
    here the number of steps is a parameter. The copies are scored in batches
    of `batch_size`.

    Args:
        model: a `keras.Model` or a callable images → `(batch, classes)`
            scores, as in `occlusion_map`.
        images: array of shape `(batch, height, width, channels)`.
        target_classes: int or int array of shape `(batch,)`.
        heatmaps: array of shape `(batch, height, width)` (`(height, width)`
            for a single image), at the images' resolution.
        steps: number of steps from no pixel to all pixels removed.
        baseline: value of a removed pixel: a number, or an array
            broadcastable to `images` (e.g. a blurred copy).
        batch_size: number of perturbed copies per model call.
        score_fn: optional function from the model's outputs to
            `(batch, classes)` scores, e.g. a softmax to score probabilities as
            RISE does.
        axes: spatial axes of an input: 2 for images, 1 for signals
            `(batch, length, channels)` with maps `(batch, length)`, 3 for
            volumes `(batch, depth, height, width, channels)` with maps
            `(batch, depth, height, width)`; samples or voxels are removed
            in decreasing map order (ties in C order).

    Returns:
        A `PerturbationCurve` with `steps + 1` points per image.

    Raises:
        InputError: if images, heatmaps or baseline disagree in shape, or the
            model's scores are not `(batch, classes)`.
        TargetError: if a target class is out of range of the scores.
        ValueError: if `steps` or `batch_size` is not a positive int, or
            `axes` not 1, 2 or 3.

    Example:

    ```python
    weights = np.arange(1.0, 5.0).reshape(1, 2, 2, 1)
    linear = lambda x: (x * weights).sum(axis=(1, 2, 3))[:, None]
    curve = deletion_curve(linear, np.ones((1, 2, 2, 1)), [0], weights[..., 0], steps=4)
    curve.scores  # array([[10., 6., 3., 1., 0.]])
    curve.auc  # array([3.75])
    ```
    """
    return _perturbation_curve(
        model, images, target_classes, heatmaps, steps, baseline, batch_size, score_fn, False, axes
    )


def insertion_curve(
    model: Any,
    images: Any,
    target_classes: Any,
    heatmaps: Any,
    *,
    steps: int = 100,
    baseline: Any = 0.0,
    batch_size: int = 64,
    score_fn: ScoreFn | None = None,
    axes: int = 2,
) -> PerturbationCurve:
    """Insertion curve of Petsiuk et al. (RISE): restore the most salient pixels first.

    Starts from `baseline` and, at step `i` of `steps`, restores the first
    `floor(i * height * width / steps)` pixels of the image in decreasing
    heatmap order (ties in row-major order); a faithful map makes the score
    rise fast, so a *high* area is good. RISE starts from a blurred copy of
    the image; here the start is `baseline`, a constant 0 by default: pass
    e.g. `cv2.GaussianBlur` outputs to follow RISE.

    Args:
        model: a `keras.Model` or a callable images → `(batch, classes)`
            scores, as in `occlusion_map`.
        images: array of shape `(batch, height, width, channels)`.
        target_classes: int or int array of shape `(batch,)`.
        heatmaps: array of shape `(batch, height, width)` (`(height, width)`
            for a single image), at the images' resolution.
        steps: number of steps from no pixel to all pixels inserted.
        baseline: the starting canvas: a number, or an array broadcastable to
            `images`.
        batch_size: number of perturbed copies per model call.
        score_fn: optional function from the model's outputs to
            `(batch, classes)` scores.
        axes: spatial axes of an input: 2 for images, 1 for signals
            `(batch, length, channels)` with maps `(batch, length)`, 3 for
            volumes `(batch, depth, height, width, channels)` with maps
            `(batch, depth, height, width)`; samples or voxels are restored
            in decreasing map order (ties in C order).

    Returns:
        A `PerturbationCurve` with `steps + 1` points per image.

    Raises:
        InputError: if images, heatmaps or baseline disagree in shape, or the
            model's scores are not `(batch, classes)`.
        TargetError: if a target class is out of range of the scores.
        ValueError: if `steps` or `batch_size` is not a positive int, or
            `axes` not 1, 2 or 3.

    Example:

    ```python
    weights = np.arange(1.0, 5.0).reshape(1, 2, 2, 1)
    linear = lambda x: (x * weights).sum(axis=(1, 2, 3))[:, None]
    curve = insertion_curve(linear, np.ones((1, 2, 2, 1)), [0], weights[..., 0], steps=4)
    curve.scores  # array([[0., 4., 7., 9., 10.]])
    curve.auc  # array([6.25])
    ```
    """
    return _perturbation_curve(
        model, images, target_classes, heatmaps, steps, baseline, batch_size, score_fn, True, axes
    )


# ---------------------------------------------------------------------------
# §8.1 Captioning: attention inside vs. outside a box
# ---------------------------------------------------------------------------


def inside_outside_ratio(heatmaps: Any, boxes: Any, *, axes: int = 2) -> np.ndarray:
    """Mean map value inside a box divided by the mean outside it (§8.1).

    The paper scores a captioning model's map for a region caption by this
    ratio: 1.0 for a map that highlights the whole image uniformly, higher
    when attention concentrates in the box (3.27 for Grad-CAM). Maps are
    expected to be non-negative, as Grad-CAM maps are.

    When the mean outside is 0, the ratio is `inf` if the mean inside is
    positive, and 1.0 if it is 0 too (an all-zero map is uniform, like the
    paper's baseline), so the result is never NaN.

    Args:
        heatmaps: array of shape `(batch, height, width)`, or `(height, width)`
            for a single map.
        boxes: one region per image: an array of shape `(batch, 4)`, or any
            form that `pointing_game` accepts (boolean masks, several boxes);
            boolean masks only for signal and volume maps.
        axes: spatial axes of a map: 2 for images, 1 for signals `(batch,
            length)`, 3 for volumes `(batch, depth, height, width)`.

    Returns:
        A `float64` array of shape `(batch,)`.

    Raises:
        InputError: if the shapes disagree, or a region covers no pixel or
            every pixel of its image (a mean would be undefined).

    Example:

    ```python
    heatmap = np.ones((4, 4))
    heatmap[:2, :2] = 3.0
    inside_outside_ratio(heatmap, [[0, 0, 2, 2]])  # array([3.])
    ```
    """
    maps = _as_heatmaps(heatmaps, "heatmaps", _check_axes(axes))
    regions = _object_masks(boxes, maps.shape, "boxes")
    ratios = np.empty(maps.shape[0])
    for i, (heatmap, region) in enumerate(zip(maps, regions, strict=True)):
        if region.all() or not region.any():
            raise InputError(
                "Argument `boxes` must leave pixels both inside and outside each image's "
                f"region. Received: a region covering {np.count_nonzero(region)} of "
                f"{region.size} pixels for image {i}"
            )
        inside = heatmap[region].mean()
        outside = heatmap[~region].mean()
        if outside != 0:
            ratios[i] = inside / outside
        else:
            ratios[i] = 1.0 if inside == 0 else math.copysign(math.inf, inside)
    return ratios


# ---------------------------------------------------------------------------
# §7 Textual explanations
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextualExplanation:
    """The most and least important neurons for a class, and a sentence (§7).

    Attributes:
        top_indices: indices of the `top_k` neurons with the largest α, largest
            first.
        top_weights: their α.
        top_names: their names.
        bottom_indices: indices of the `bottom_k` neurons with the smallest α,
            smallest first.
        bottom_weights: their α.
        bottom_names: their names.
        sentence: a one-sentence explanation naming the persuasive neurons
            (positive α) among the top ones and the inhibitory neurons
            (negative α) among the bottom ones.
    """

    top_indices: tuple[int, ...]
    top_weights: tuple[float, ...]
    top_names: tuple[str, ...]
    bottom_indices: tuple[int, ...]
    bottom_weights: tuple[float, ...]
    bottom_names: tuple[str, ...]
    sentence: str


def textual_explanation(
    weights: Any,
    neuron_names: Mapping[int, str] | Sequence[str | None] | None = None,
    *,
    class_name: str | Sequence[str] | None = None,
    top_k: int = 5,
    bottom_k: int = 5,
    named_only: bool = False,
) -> TextualExplanation | list[TextualExplanation]:
    """Name the neurons that matter most for a class (§7).

    The paper sorts the neuron importances α_k of the last convolutional
    layer (Eq. 1) and names the top-5 and bottom-5 neurons with Network
    Dissection labels (Bau et al.). A positive α means the presence of the
    neuron's concept raises the class score (persuasive), a negative α that
    its absence does (inhibitory). The sentence reads, for example:

        "The score for 'book-store' rises with book, shelf and bookcase, and
        falls with sky, road and water."

    Only top neurons with α > 0 and bottom neurons with α < 0 appear in the
    sentence, since the others do not push the score the way the sentence
    says; all of them are in the returned fields. Ties in α are broken by the
    lower index.

    Args:
        weights: neuron importances α (e.g. the engine's `result.weights`), of
            shape `(channels,)` for one image or `(batch, channels)`.
        neuron_names: names of the neurons: a dict `{index: name}`, or a
            sequence of `channels` names (`None` for unnamed ones), or `None`.
            Unnamed neurons are called `"unit <index>"`.
        class_name: name of the explained class, used in the sentence; one
            string, or one per image for `(batch, channels)` weights.
        top_k: number of most important neurons, `>= 0`.
        bottom_k: number of least important neurons, `>= 0`.
        named_only: rank only the named neurons, as the paper does when
            neurons whose Network Dissection IoU is below 0.05 get no name
            and are left out of the explanation.

    Returns:
        A `TextualExplanation` for `(channels,)` weights, or a list of `batch`
        of them for `(batch, channels)` weights.

    Raises:
        InputError: if `weights` is not 1-D or 2-D with finite values, or
            `neuron_names`/`class_name` do not match it.
        ValueError: if `top_k` or `bottom_k` is negative.

    Example:

    ```python
    alpha = np.array([0.5, -1.0, 2.0, 0.0])
    explanation = textual_explanation(
        alpha, {1: "sky", 2: "book"}, class_name="book-store", top_k=1, bottom_k=1
    )
    explanation.top_names  # ('book',)
    explanation.sentence  # "The score for 'book-store' rises with book, and falls with sky."
    ```
    """
    alphas = np.asarray(weights, dtype=np.float64)
    if alphas.ndim not in (1, 2) or alphas.shape[-1] == 0:
        raise InputError(
            "Argument `weights` must have shape (channels,) or (batch, channels). "
            f"Received: weights.shape={alphas.shape}"
        )
    _check_finite(alphas, "weights")
    for value, arg in ((top_k, "top_k"), (bottom_k, "bottom_k")):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"Argument `{arg}` must be an int >= 0. Received: {arg}={value!r}")
    channels = alphas.shape[-1]
    names = _neuron_names(neuron_names, channels)
    batch = alphas.reshape(-1, channels)
    class_names = _class_names(class_name, batch.shape[0], alphas.ndim == 2)
    explanations = [
        _explain(alpha, names, label, top_k, bottom_k, named_only)
        for alpha, label in zip(batch, class_names, strict=True)
    ]
    return explanations if alphas.ndim == 2 else explanations[0]


def _explain(
    alpha: np.ndarray,
    names: list[str | None],
    class_name: str | None,
    top_k: int,
    bottom_k: int,
    named_only: bool,
) -> TextualExplanation:
    candidates = np.arange(alpha.size)
    if named_only:
        candidates = np.array([i for i in candidates if names[i] is not None], dtype=np.int64)
    # lexsort sorts by the last key first: by alpha, ties by index.
    descending = candidates[np.lexsort((candidates, -alpha[candidates]))][:top_k]
    ascending = candidates[np.lexsort((candidates, alpha[candidates]))][:bottom_k]

    def label(index: int) -> str:
        return names[index] or f"unit {index}"

    top_names = tuple(label(i) for i in descending)
    bottom_names = tuple(label(i) for i in ascending)
    persuasive = [name for name, i in zip(top_names, descending, strict=True) if alpha[i] > 0]
    inhibitory = [name for name, i in zip(bottom_names, ascending, strict=True) if alpha[i] < 0]
    subject = f"'{class_name}'" if class_name is not None else "the class"
    clauses = []
    if persuasive:
        clauses.append(f"rises with {_enumerate(persuasive)}")
    if inhibitory:
        clauses.append(f"falls with {_enumerate(inhibitory)}")
    if clauses:
        sentence = f"The score for {subject} {', and '.join(clauses)}."
    else:
        sentence = f"No listed neuron raises or lowers the score for {subject}."
    return TextualExplanation(
        top_indices=tuple(int(i) for i in descending),
        top_weights=tuple(float(alpha[i]) for i in descending),
        top_names=top_names,
        bottom_indices=tuple(int(i) for i in ascending),
        bottom_weights=tuple(float(alpha[i]) for i in ascending),
        bottom_names=bottom_names,
        sentence=sentence,
    )


def _enumerate(words: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _neuron_names(
    neuron_names: Mapping[int, str] | Sequence[str | None] | None, channels: int
) -> list[str | None]:
    if neuron_names is None:
        return [None] * channels
    if isinstance(neuron_names, Mapping):
        bad = [key for key in neuron_names if not 0 <= int(key) < channels]
        if bad:
            raise InputError(
                f"Argument `neuron_names` must map neuron indices in [0, {channels}) to "
                f"names. Received: keys {bad[:5]}"
            )
        return [neuron_names.get(i) for i in range(channels)]
    if isinstance(neuron_names, str) or len(neuron_names) != channels:
        raise InputError(
            f"Argument `neuron_names` must be a dict {{index: name}} or a sequence of one "
            f"name per neuron ({channels}). Received: neuron_names={neuron_names!r:.80}"
        )
    return list(neuron_names)


def _class_names(
    class_name: str | Sequence[str] | None, batch: int, batched: bool
) -> list[str | None]:
    if class_name is None or isinstance(class_name, str):
        return [class_name] * batch
    if not batched or len(class_name) != batch:
        raise InputError(
            "Argument `class_name` must be a string, or one string per image for "
            f"(batch, channels) weights (batch={batch}). Received: class_name={class_name!r:.80}"
        )
    return list(class_name)


# ---------------------------------------------------------------------------
# Model scoring and perturbation helpers
# ---------------------------------------------------------------------------


class _Scorer:
    """Scores perturbed copies of images in batches, one model call per batch."""

    def __init__(self, model: Any, score_fn: ScoreFn | None, batch_size: int):
        if not callable(model):
            raise InputError(
                "Argument `model` must be a keras.Model or a callable mapping images to "
                f"(batch, classes) scores. Received: model={model!r:.80}"
            )
        self.model = model
        self.score_fn = score_fn
        self.batch_size = batch_size

    def __call__(
        self, build: Callable[[np.ndarray], np.ndarray], classes: np.ndarray
    ) -> np.ndarray:
        """Target scores of `len(classes)` inputs; `build(rows)` makes rows' inputs."""
        scores = np.empty(len(classes))
        for start in range(0, len(classes), self.batch_size):
            rows = np.arange(start, min(start + self.batch_size, len(classes)))
            outputs = self._scores(build(rows))
            targets = classes[rows]
            if targets.max() >= outputs.shape[1]:
                raise TargetError(
                    f"Argument `target_classes` must index the model's {outputs.shape[1]} "
                    f"scores. Received: target_classes containing {int(targets.max())}"
                )
            scores[rows] = outputs[np.arange(len(rows)), targets]
        return scores

    def _scores(self, batch: np.ndarray) -> np.ndarray:
        keras = sys.modules.get("keras")  # a Keras model implies Keras is imported
        if keras is not None and isinstance(self.model, keras.Layer):
            outputs = self.model(batch, training=False)
        else:
            outputs = self.model(batch)
        if self.score_fn is not None:
            outputs = self.score_fn(outputs)
        scores = np.asarray(outputs, dtype=np.float64)
        if scores.ndim != 2 or scores.shape[0] != batch.shape[0]:
            raise InputError(
                "Argument `model` (after `score_fn`) must return scores of shape "
                f"(batch, classes). Received: output shape {scores.shape} for a batch of "
                f"{batch.shape[0]}"
            )
        bad = scores.size - np.count_nonzero(np.isfinite(scores))
        if bad:
            raise InputError(
                f"Argument `model` returned {bad} non-finite score(s) (NaN or inf) on "
                f"{batch.shape[0]} perturbed images, so no curve or map can be computed. "
                "Check the model on such inputs (e.g. a normalisation that divides by a "
                "statistic the baseline makes zero) or choose another `baseline`."
            )
        return scores


def _perturbation_curve(
    model: Any,
    images: Any,
    target_classes: Any,
    heatmaps: Any,
    steps: int,
    baseline: Any,
    batch_size: int,
    score_fn: ScoreFn | None,
    insert: bool,
    axes: int,
) -> PerturbationCurve:
    axes = _check_axes(axes)
    pixels = _as_images(images, axes)
    n, spatial = pixels.shape[0], pixels.shape[1:-1]
    classes = _as_target_classes(target_classes, n)
    maps = _as_heatmaps(heatmaps, "heatmaps", axes)
    if maps.shape != (n, *spatial):
        raise InputError(
            "Argument `heatmaps` must have the images' batch and spatial shape "
            f"{(n, *spatial)}. Received: heatmaps.shape={maps.shape}"
        )
    steps = _positive_int(steps, "steps")
    batch_size = _positive_int(batch_size, "batch_size")
    try:
        canvas = np.broadcast_to(np.asarray(baseline, dtype=pixels.dtype), pixels.shape)
    except ValueError:
        raise InputError(
            f"Argument `baseline` must be a number or broadcastable to the images' shape "
            f"{pixels.shape}. Received: baseline.shape={np.shape(baseline)}"
        ) from None
    _check_finite(canvas, "baseline")

    size = math.prod(spatial)
    changed_counts = np.arange(steps + 1) * size // steps
    # rank[i, p]: position of pixel p in image i's order of decreasing saliency.
    order = np.argsort(-maps.reshape(n, size), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(size)[None, :], axis=1)
    start, end = (canvas, pixels) if insert else (pixels, canvas)

    def perturbed(rows: np.ndarray) -> np.ndarray:
        image, step = rows // (steps + 1), rows % (steps + 1)
        changed = rank[image] < changed_counts[step][:, None]
        changed = changed.reshape(len(rows), *spatial, 1)
        return np.where(changed, end[image], start[image])

    scorer = _Scorer(model, score_fn, batch_size)
    scores = scorer(perturbed, np.repeat(classes, steps + 1)).reshape(n, steps + 1)
    fractions = changed_counts / size
    return PerturbationCurve(
        fractions=fractions, scores=scores, auc=np.trapezoid(scores, fractions, axis=1)
    )


def _patch_starts(size: int, patch: int, stride: int) -> list[int]:
    """0, stride, 2*stride, ... and a last start flush with the border."""
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], values.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of start+1 .. end
    ranks = np.empty(values.size)
    ranks[order] = mean_rank[np.cumsum(starts_group) - 1]
    return ranks


def _is_hit(heatmap: np.ndarray, mask: np.ndarray, radius: float) -> bool:
    """Whether the map's maximum lies within `radius` pixels of the mask (any number of axes)."""
    if heatmap.max() == heatmap.min():
        return False
    peak = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    reach = math.floor(radius)
    # Only the mask inside the cube of side 2 * reach + 1 around the peak can be close enough.
    lows = [max(int(p) - reach, 0) for p in peak]
    window = tuple(slice(low, p + reach + 1) for low, p in zip(lows, peak, strict=True))
    offsets = np.nonzero(mask[window])
    distances = sum(
        (offset + low - p) ** 2 for offset, low, p in zip(offsets, lows, peak, strict=True)
    )
    return bool(np.any(distances <= radius * radius))


# ---------------------------------------------------------------------------
# Input checking
# ---------------------------------------------------------------------------


#: The spatial axes of a map with 1, 2 or 3 of them.
_SPATIAL = {1: "length", 2: "height, width", 3: "depth, height, width"}


def _check_axes(axes: Any) -> int:
    if isinstance(axes, bool) or not isinstance(axes, (int, np.integer)) or axes not in (1, 2, 3):
        raise ValueError(
            "Argument `axes` must be the number of spatial axes of a map: 1 (signals), "
            f"2 (images) or 3 (volumes). Received: axes={axes!r}"
        )
    return int(axes)


def _as_heatmaps(
    heatmaps: Any, name: str, axes: int = 2, *, images_only: bool = False
) -> np.ndarray:
    """`(batch, *spatial)` float64 maps with `axes` spatial axes; one map becomes a batch of one."""
    maps = np.asarray(heatmaps, dtype=np.float64)
    received = maps.shape
    if maps.ndim == axes:
        maps = maps[None]
    if maps.ndim != axes + 1 or maps.size == 0:
        single = "(length,)" if axes == 1 else f"({_SPATIAL[axes]})"
        hint = ""
        if images_only and maps.ndim in (1, 4):
            hint = (
                " Signal maps (length,) and volume maps (batch, depth, height, width) have no "
                "bounding box: use `pointing_game` with boolean masks and `axes=1` or `axes=3`."
            )
        elif axes == 2 and maps.ndim == 4:
            hint = " For volume maps (batch, depth, height, width) pass `axes=3`."
        raise InputError(
            f"Argument `{name}` must have shape (batch, {_SPATIAL[axes]}), or {single} "
            f"for a single map (squeeze a trailing channel axis first).{hint} "
            f"Received: {name}.shape={received}"
        )
    _check_finite(maps, name)
    return maps


def _as_images(images: Any, axes: int = 2) -> np.ndarray:
    """`(batch, *spatial, channels)` inputs with `axes` spatial axes."""
    pixels = np.asarray(images)
    if not np.issubdtype(pixels.dtype, np.floating):
        pixels = pixels.astype(np.float32)
    if pixels.ndim != axes + 2 or pixels.size == 0:
        hint = ""
        if axes == 2 and pixels.ndim == 3:
            hint = (
                " (A single image needs a batch axis; for signals (batch, length, channels) "
                "pass `axes=1`.)"
            )
        elif axes == 2 and pixels.ndim == 5:
            hint = " For volumes (batch, depth, height, width, channels) pass `axes=3`."
        raise InputError(
            f"Argument `images` must have shape (batch, {_SPATIAL[axes]}, channels).{hint} "
            f"Received: images.shape={pixels.shape}"
        )
    _check_finite(pixels, "images")
    return pixels


def _as_target_classes(target_classes: Any, n: int) -> np.ndarray:
    classes = np.asarray(target_classes)
    if classes.ndim == 0:
        classes = np.full(n, classes)
    if classes.shape != (n,) or not np.issubdtype(classes.dtype, np.integer) or (classes < 0).any():
        raise TargetError(
            f"Argument `target_classes` must be a non-negative int or an int array of shape "
            f"({n},), one class per image. Received: target_classes={target_classes!r:.80}"
        )
    return classes


def _as_boxes(boxes: Any, name: str) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float64)
    if array.ndim == 0 or array.shape[-1] != 4:
        raise InputError(
            f"Argument `{name}` must have shape (..., 4), boxes as (x0, y0, x1, y1). "
            f"Received: {name}.shape={array.shape}"
        )
    _check_finite(array, name)
    return array


def _box_area(boxes: np.ndarray) -> np.ndarray:
    width = np.clip(boxes[..., 2] - boxes[..., 0], 0, None)
    height = np.clip(boxes[..., 3] - boxes[..., 1], 0, None)
    return width * height


def _boxes_to_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """`(m, height, width)` masks of `(m, 4)` boxes: x0 <= col < x1, y0 <= row < y1."""
    rows = np.arange(height)[None, :, None]
    cols = np.arange(width)[None, None, :]
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    return (x0 <= cols) & (cols < x1) & (y0 <= rows) & (rows < y1)


def _per_image(items: Any, n: int, name: str) -> list[Any]:
    """Split a per-image argument into `n` entries.

    Arrays are split along their first axis and lists/tuples item by item. With
    a single image, an argument that is not a batch of one is that image's
    entry (so `(4,)` boxes or an `(height, width)` mask go with one map).
    """
    if isinstance(items, (list, tuple)):
        entries = list(items)
    else:
        array = np.asarray(items)
        entries = list(array) if array.ndim else [array]
    if n == 1 and len(entries) != 1:
        entries = [items]
    if len(entries) != n:
        raise InputError(
            f"Argument `{name}` must hold one entry per image ({n}). "
            f"Received: {len(entries)} entries"
        )
    return entries


def _instance_masks(item: Any, spatial: tuple[int, ...], name: str, index: int) -> np.ndarray:
    """`(m, *spatial)` boolean masks from one map's masks, or (images only) boxes."""
    array = np.asarray(item)
    spatial = tuple(spatial)
    if array.dtype == bool:
        masks = array[None] if array.ndim == len(spatial) else array
        if masks.ndim != len(spatial) + 1 or masks.shape[1:] != spatial:
            raise InputError(
                f"Argument `{name}` must hold boolean masks of the maps' size "
                f"{spatial}. Received: {name}[{index}].shape={array.shape}"
            )
        return masks
    if len(spatial) != 2:
        kind = "signal" if len(spatial) == 1 else "volume"
        raise InputError(
            f"Argument `{name}` must hold boolean masks of the {kind} maps' size {spatial} "
            "(boxes (x0, y0, x1, y1) exist for images only; use `masks > 0` for 0/1 masks). "
            f"Received: {name}[{index}] of dtype {array.dtype} and shape {array.shape}"
        )
    height, width = spatial
    if array.size and not np.issubdtype(array.dtype, np.number):
        raise InputError(
            f"Argument `{name}` must hold boolean masks or numeric boxes. "
            f"Received: {name}[{index}].dtype={array.dtype}"
        )
    looks_like_mask = array.ndim >= 2 and array.shape[-2:] == (height, width)
    if looks_like_mask or array.ndim > 2 or array.shape[-1:] not in ((4,), (0,)):
        raise InputError(
            f"Argument `{name}` must hold boxes of shape (4,) or (m, 4), or boolean masks "
            f"(use `masks > 0` for 0/1 masks). Received: {name}[{index}].shape={array.shape}"
        )
    boxes = _as_boxes(array.reshape(-1, 4), name)
    return _boxes_to_mask(boxes, height, width)


def _object_masks(masks_or_boxes: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    """`(batch, *spatial)` union of each map's object masks or boxes; `shape` is the maps'."""
    n, spatial = shape[0], tuple(shape[1:])
    if isinstance(masks_or_boxes, np.ndarray) and masks_or_boxes.dtype == bool:
        if masks_or_boxes.shape == (n, *spatial) or (n == 1 and masks_or_boxes.shape == spatial):
            return masks_or_boxes.reshape(n, *spatial)
    items = _per_image(masks_or_boxes, n, name)
    return np.stack(
        [_instance_masks(item, spatial, name, i).any(axis=0) for i, item in enumerate(items)]
    )


def _ground_truth_classes(gt_classes: Any, n: int) -> list[np.ndarray]:
    classes = [np.atleast_1d(np.asarray(c)) for c in _per_image(gt_classes, n, "gt_classes")]
    for i, c in enumerate(classes):
        if c.ndim != 1 or (c.size and not np.issubdtype(c.dtype, np.integer)):
            raise InputError(
                f"Argument `gt_classes` must hold ints, one per ground-truth object. "
                f"Received: gt_classes[{i}]={c!r:.80}"
            )
    return [c.astype(np.int64) for c in classes]


def _labelled_boxes(gt_classes: Any, gt_boxes: Any, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, `(classes (m,), boxes (m, 4))` without padding."""
    classes = _ground_truth_classes(gt_classes, n)
    truth = []
    for i, (c, b) in enumerate(zip(classes, _per_image(gt_boxes, n, "gt_boxes"), strict=True)):
        boxes = _as_boxes(np.asarray(b, dtype=np.float64).reshape(-1, 4), "gt_boxes")
        if len(boxes) != len(c):
            raise InputError(
                f"Arguments `gt_classes` and `gt_boxes` must give one class per box. "
                f"Received: {len(c)} classes and {len(boxes)} boxes for image {i}"
            )
        truth.append((c[c >= 0], boxes[c >= 0]))
    return truth


def _labelled_masks(
    gt_classes: Any, gt_objects: Any, shape: tuple[int, ...]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per map, `(classes (m,), masks (m, *spatial))` without padding; shape `(n, *spatial)`."""
    n, spatial = shape[0], tuple(shape[1:])
    classes = _ground_truth_classes(gt_classes, n)
    truth = []
    for i, (c, item) in enumerate(
        zip(classes, _per_image(gt_objects, n, "gt_masks_or_boxes"), strict=True)
    ):
        masks = _instance_masks(item, spatial, "gt_masks_or_boxes", i)
        if len(masks) != len(c):
            raise InputError(
                f"Arguments `gt_classes` and `gt_masks_or_boxes` must give one class per "
                f"object. Received: {len(c)} classes and {len(masks)} objects for image {i}"
            )
        truth.append((c[c >= 0], masks[c >= 0]))
    return truth


def _check_finite(array: np.ndarray, name: str) -> None:
    if not np.isfinite(array).all():
        raise InputError(
            f"Argument `{name}` must hold finite values. "
            f"Received: {np.count_nonzero(~np.isfinite(array))} NaN or infinite values"
        )


def _check_tolerance(tolerance: float) -> float:
    if not (isinstance(tolerance, (int, float, np.number)) and 0 <= tolerance < math.inf):
        raise ValueError(
            f"Argument `tolerance` must be a radius in pixels, >= 0. "
            f"Received: tolerance={tolerance!r}"
        )
    return float(tolerance)


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Argument `{name}` must be a positive int. Received: {name}={value!r}")
    return int(value)


def _positive_sizes(value: Any, name: str, axes: int) -> tuple[int, ...]:
    """One positive int per spatial axis, from an int or a tuple of `axes` ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,) * axes
    if not isinstance(value, (tuple, list)) or len(value) != axes:
        what = "a pair of ints" if axes == 2 else f"a tuple of {axes} ints"
        raise ValueError(f"Argument `{name}` must be an int or {what}. Received: {name}={value!r}")
    return tuple(_positive_int(v, name) for v in value)
