"""Detection targets: the class score of one detection, before non-max suppression.

A detector's forward pass returns raw predictions, one per anchor (RetinaNet)
or per query (D-FINE): a box and a score per class. Its `predict` decodes the
boxes and keeps the best-scoring, mutually distant ones (non-max
suppression). A detection is thus made by the raw predictions whose boxes lie
on it; `DetectionTarget` explains it through their class scores:

    y^c = Σ_{a : IoU(box_a, box) ≥ iou} s^c_a

where `box_a` is prediction `a`'s decoded box, `box` the detection to
explain and `s^c_a` its pre-sigmoid score (logit) for class `c`. The set of
matching predictions is computed inside the compiled step, from the model's
own box outputs on the same forward pass, and held fixed
(`tf.stop_gradient`): the explanation is that of the class scores of the
predictions on the box, not of how the boxes would move.

Raw outputs understood, as `model(images)` returns them (a dict):

- `{"bbox_regression", "cls_logits"}`: keras-hub `RetinaNetObjectDetector`.
  The boxes are offsets from anchors, `(dx, dy, dw, dh)` in the
  `"center_xywh"` encoding (`cx = dx·w_a + cx_a`, `w = exp(dw)·w_a`), decoded
  as `RetinaNetObjectDetector.decode_predictions` does, with the anchors of
  the detector's `anchor_generator` at the model's image size.
- `{"logits", "pred_boxes"}`: keras-hub `DFineObjectDetector`. The boxes
  are already decoded: `(cx, cy, w, h)` as fractions of the image's width
  and height, one per query, as `DFineObjectDetector.decode_predictions`
  reads them.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_gradcam.errors import TargetError
from tf_gradcam.targets import _check_range, _index_tensor, _per_image

__all__ = ["DetectionTarget"]

#: What the four numbers of a box are, per `bounding_box_format`.
_LAYOUTS = {
    "xyxy": "(left, top, right, bottom)",
    "yxyx": "(top, left, bottom, right)",
    "xywh": "(left, top, width, height)",
    "center_xywh": "(center x, center y, width, height)",
    "center_yxhw": "(center y, center x, height, width)",
}
_FORMATS = (*_LAYOUTS, *(f"rel_{name}" for name in ("xyxy", "yxyx", "xywh", "center_xywh")))
#: Raw output keys: (boxes, class logits) per detector family.
_ANCHOR_KEYS = ("bbox_regression", "cls_logits")  # RetinaNet
_QUERY_KEYS = ("pred_boxes", "logits")  # D-FINE
_REDUCTIONS = ("sum", "max")


def _layout(box_format: str) -> str:
    if box_format.startswith("rel_"):
        return f"{_LAYOUTS[box_format[4:]]} as fractions of the image's size"
    return _LAYOUTS[box_format]


def _to_xyxy(boxes: Any, box_format: str, height: Any, width: Any) -> Any:
    """Boxes `(..., 4)` in `box_format` as absolute `xyxy` (pixels of the model's input)."""
    if box_format == "xyxy":
        return boxes
    return keras.utils.bounding_boxes.convert_format(
        boxes, source=box_format, target="xyxy", height=height, width=width
    )


def _pairwise_iou(boxes: Any, targets: Any) -> Any:
    """IoU `(batch, n)` of `boxes` `(batch, n, 4)` with one target `(batch, 4)` each, in xyxy."""
    targets = targets[:, None, :]
    left = tf.maximum(boxes[..., 0], targets[..., 0])
    top = tf.maximum(boxes[..., 1], targets[..., 1])
    right = tf.minimum(boxes[..., 2], targets[..., 2])
    bottom = tf.minimum(boxes[..., 3], targets[..., 3])
    inter = tf.maximum(right - left, 0.0) * tf.maximum(bottom - top, 0.0)

    def area(b: Any) -> Any:
        return tf.maximum(b[..., 2] - b[..., 0], 0.0) * tf.maximum(b[..., 3] - b[..., 1], 0.0)

    union = area(boxes) + area(targets) - inter
    return tf.math.divide_no_nan(inter, union)


def _image_size(detector: Any, image_shape: Any) -> tuple[int | None, int | None]:
    """`(height, width)` of the images the target's boxes live in."""
    given = None
    if image_shape is not None:
        shape = tuple(image_shape)
        if len(shape) not in (2, 3) or not all(
            isinstance(v, (int, np.integer)) and v > 0 for v in shape[:2]
        ):
            raise TargetError(
                "DetectionTarget: `image_shape` must be (height, width) or (height, width, "
                f"channels) of positive ints. Received: image_shape={image_shape!r}."
            )
        given = (int(shape[0]), int(shape[1]))
    if detector is None:
        return given if given is not None else (None, None)
    try:
        model_shape = tuple(detector.input_shape[1:3])
    except (AttributeError, ValueError, TypeError):
        model_shape = (None, None)
    if None in model_shape:
        if given is None:
            raise TargetError(
                f"DetectionTarget: detector {detector.name!r} takes images of any size, so "
                "the raw predictions' anchors and boxes depend on the size of the images "
                "explained. Pass `image_shape=(height, width)` of those images."
            )
        return given
    model_shape = (int(model_shape[0]), int(model_shape[1]))
    if given is not None and given != model_shape:
        raise TargetError(
            f"DetectionTarget: `image_shape` {given} differs from detector "
            f"{detector.name!r}'s input size {model_shape}; leave `image_shape` unset."
        )
    return model_shape


def _detector_anchors(detector: Any, height: int, width: int) -> tuple[np.ndarray, str] | None:
    """The detector's anchors `(n, 4)` at this image size, in the order of its outputs."""
    generator = getattr(detector, "anchor_generator", None)
    if generator is None:
        return None
    channels = detector.input_shape[-1] or 3
    levels = generator(tf.zeros((height, width, channels)))
    # RetinaNetObjectDetector.decode_predictions concatenates the levels in this order
    anchors = np.concatenate([np.asarray(level) for level in levels.values()], axis=0)
    return anchors.astype(np.float32), generator.bounding_box_format


class DetectionTarget:
    """The class score of one detection of an object detector, before non-max suppression.

    Grad-CAM explains any differentiable score y^c (§3 of the paper). A
    detector outputs, per anchor or query, a box and a score per class; its
    `predict` decodes the boxes and keeps the best ones (non-max suppression,
    NMS). This target is one detection's y^c: the sum of class `c`'s
    pre-sigmoid scores (logits) of the raw predictions whose decoded boxes
    overlap `box` by IoU ≥ `iou`, the predictions NMS merges into that
    detection:

        y^c = Σ_{a : IoU(box_a, box) ≥ iou} s^c_a

    The matching is recomputed on each forward pass from the model's own box
    outputs and held fixed (`tf.stop_gradient`); copies of the images that
    methods score (Score-CAM, Ablation-CAM, `Smoothed`) are matched on their
    own outputs. With `reduction="max"` the score is the largest matching
    logit instead: when `box` is a detection's own box, usually the
    prediction NMS kept (NMS ranks by the largest probability over all
    classes, so another class can decide which one survives).

    Being a callable target, it works with every method, `GuidedGradCAM`,
    `Smoothed`, `GradCAMCallback(target=...)` and `explain_dataset`;
    `Explanation.classes` is then `None`. Compiled steps are cached per
    target object: build it once and reuse it.

    Args:
        box: the detection's box, four numbers in the detector's
            `bounding_box_format` (keras-hub's default `"yxyx"`: top, left,
            bottom, right), in the coordinates of the model's input images:
            `(4,)` for every image or `(batch, 4)` one per image. The boxes
            `detector.predict(images)["boxes"]` returns are in that format
            (but keras-hub 0.32's D-FINE returns `yxyx` whatever its format).
        class_index: the class, an int for every image or one per image
            (`predict`'s padding label -1 is refused).
        iou: the least IoU, in (0, 1], of a raw prediction's decoded box with
            `box` for the prediction to count.
        detector: the keras-hub `RetinaNetObjectDetector` or
            `DFineObjectDetector` explained: its `bounding_box_format`, input
            size, number of classes and (RetinaNet) anchors are read from it.
        reduction: `"sum"` (default) or `"max"` over the matching predictions.
        strict: when an image has no matching prediction, raise (default);
            with `strict=False` its score is 0 (for methods that score
            altered copies of the images, where the detection may vanish).
        bounding_box_format: the format of `box` when no `detector` is given.
        image_shape: `(height, width)` of the images; needed when the detector
            takes images of any size, or without a detector for relative
            formats and D-FINE-style outputs.
        anchors: without a detector, the anchors `(n, 4)` of RetinaNet-style
            outputs, in `bounding_box_format`, in the order of the outputs.

    Raises:
        TargetError: a box that is not 4 finite numbers, `(4,)` or
            `(batch, 4)`, or has no area; a negative, non-integer or (with a
            detector) out-of-range class; an `iou` outside (0, 1]; an unknown
            `reduction` or box format; a detector of open input size without
            `image_shape` (at construction). Outputs without the raw keys, a
            class out of range, anchors that do not fit the outputs, and, when
            called eagerly (`target(detector(images))`, `target.matches(...)`),
            a box no prediction matches: the message gives the best IoU found
            and the fix (when called).
        tf.errors.InvalidArgumentError: inside a compiled step, a box no
            prediction matches (`strict=True`), with the same message and the
            best IoU per image; per-image boxes or classes whose count is not
            the batch size. The explainers re-raise it as a `TargetError`.

    Example:
        >>> detections = detector.predict(images)            # after NMS, for the boxes
        >>> box, label = detections["boxes"][0, 0], detections["labels"][0, 0]
        >>> target = tf_gradcam.DetectionTarget(box, label, detector=detector)
        >>> tf_gradcam.GradCAM(detector, layer)(images[:1], target=target).heatmaps
    """

    def __init__(
        self,
        box: Any,
        class_index: Any,
        iou: float = 0.5,
        *,
        detector: Any = None,
        reduction: str = "sum",
        strict: bool = True,
        bounding_box_format: str | None = None,
        image_shape: Any = None,
        anchors: Any = None,
    ) -> None:
        what = type(self).__name__
        self.box = box
        self.class_index = class_index
        self.iou = iou
        self.detector = detector
        self.reduction = reduction
        self.strict = bool(strict)
        labels = np.asarray(class_index)
        if labels.dtype.kind in "iu" and labels.size and np.any(labels == -1):
            raise TargetError(
                f"{what}: `class_index` holds -1, the label a detector's `predict` gives the "
                "rows it pads its detections with (no detection there; their boxes are -1 "
                "too). Explain a row whose label is >= 0."
            )
        self._classes = _index_tensor(class_index, "class_index", what, ndim=(0, 1))
        if isinstance(iou, bool) or not isinstance(iou, (int, float, np.floating, np.integer)):
            raise TargetError(f"{what}: `iou` must be a number in (0, 1]. Received: iou={iou!r}.")
        if not 0.0 < float(iou) <= 1.0:
            raise TargetError(f"{what}: `iou` must be in (0, 1]. Received: iou={iou!r}.")
        if reduction not in _REDUCTIONS:
            raise TargetError(
                f"{what}: `reduction` must be 'sum' or 'max'. Received: reduction={reduction!r}."
            )
        box_format = self._box_format(detector, bounding_box_format)
        self.bounding_box_format = box_format
        self._height, self._width = _image_size(detector, image_shape)
        if box_format.startswith("rel_") and self._height is None:
            raise TargetError(
                f"{what}: boxes in the relative format {box_format!r} need the image size; "
                "pass `image_shape=(height, width)` or `detector=`."
            )
        self.num_classes = getattr(detector, "num_classes", None)
        if self.num_classes is not None:
            _check_range(np.asarray(class_index), self.num_classes, "class_index", what, "classes")
        self._box = tf.constant(self._checked_box(box))  # (4,) or (batch, 4), absolute xyxy
        self._anchors, self._anchor_format = self._anchors_for(detector, anchors)

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _box_format(detector: Any, bounding_box_format: str | None) -> str:
        what = "DetectionTarget"
        if detector is not None:
            box_format = getattr(detector, "bounding_box_format", None)
            if box_format is None:
                raise TargetError(
                    f"{what}: `detector` must be a keras-hub object detector "
                    "(RetinaNetObjectDetector, DFineObjectDetector) with a "
                    f"`bounding_box_format`. Received: {type(detector).__name__}."
                )
            if bounding_box_format is not None and bounding_box_format != box_format:
                raise TargetError(
                    f"{what}: `bounding_box_format={bounding_box_format!r}` differs from the "
                    f"detector's {box_format!r}; the box must be in the detector's format. "
                    "Leave `bounding_box_format` unset."
                )
        elif bounding_box_format is None:
            raise TargetError(
                f"{what}: pass `detector=` (the keras-hub object detector explained), or "
                "`bounding_box_format=` (and `anchors=` for RetinaNet-style outputs)."
            )
        else:
            box_format = bounding_box_format
        if box_format not in _FORMATS:
            raise TargetError(
                f"{what}: unknown bounding box format {box_format!r}; the formats are "
                f"{list(_FORMATS)}."
            )
        return box_format

    def _checked_box(self, box: Any) -> np.ndarray:
        what = type(self).__name__
        if isinstance(box, tf.Tensor):
            box = box.numpy()
        array = np.asarray(box)
        if array.dtype.kind not in "iuf" or array.ndim not in (1, 2) or array.shape[-1] != 4:
            raise TargetError(
                f"{what}: `box` must be 4 numbers in the {self.bounding_box_format!r} format "
                f"{_layout(self.bounding_box_format)}, shape (4,) for every image or (batch, 4) "
                f"one per image. Received: shape {array.shape}, dtype {array.dtype}."
            )
        if array.ndim == 2 and array.shape[0] == 0:
            raise TargetError(f"{what}: `box` holds no box (shape {array.shape}).")
        array = array.astype(np.float32)
        if array.ndim == 2 and array.shape[0] == 1:
            array = array[0]
        if not np.all(np.isfinite(array)):
            raise TargetError(f"{what}: `box` holds non-finite values: {array.tolist()}.")
        xyxy = np.asarray(
            _to_xyxy(array, self.bounding_box_format, self._height, self._width), np.float32
        )
        empty = (xyxy[..., 2] <= xyxy[..., 0]) | (xyxy[..., 3] <= xyxy[..., 1])
        if np.any(empty):
            shown = array if array.ndim == 1 else array[int(np.argmax(empty))]
            raise TargetError(
                f"{what}: `box` {shown.tolist()} has no area as a {self.bounding_box_format!r} "
                f"box {_layout(self.bounding_box_format)}. Check the order of its numbers: it "
                "must be in the detector's `bounding_box_format`."
            )
        return xyxy

    def _anchors_for(self, detector: Any, anchors: Any) -> tuple[Any, str | None]:
        what = type(self).__name__
        if anchors is not None:
            if detector is not None:
                raise TargetError(
                    f"{what}: pass `detector=` or `anchors=`, not both (the detector's anchors "
                    "are read from it)."
                )
            array = np.asarray(anchors, np.float32)
            if array.ndim != 2 or array.shape[-1] != 4 or array.shape[0] == 0:
                raise TargetError(
                    f"{what}: `anchors` must be (n, 4), in {self.bounding_box_format!r}. "
                    f"Received shape {array.shape}."
                )
            return tf.constant(array), self.bounding_box_format
        if detector is None or self._height is None:
            return None, None
        found = _detector_anchors(detector, self._height, self._width)
        if found is None:
            return None, None
        return tf.constant(found[0]), found[1]

    def __repr__(self) -> str:
        box = np.asarray(self.box)
        shown_box = box.tolist() if box.ndim == 1 else f"<{box.shape[0]} per image>"
        classes = np.asarray(self.class_index)
        shown = int(classes) if classes.ndim == 0 else f"<{classes.size} per image>"
        extra = "" if self.reduction == "sum" else f", reduction={self.reduction!r}"
        return (
            f"{type(self).__name__}(box={shown_box} ({self.bounding_box_format}), "
            f"class_index={shown}, iou={self.iou}{extra})"
        )

    # ------------------------------------------------------------------ the score

    def __call__(self, outputs: Any) -> Any:
        """Return the `(batch,)` scores: the class's logits summed (or max) over the matches."""
        logits, classes, matches = self._parts(outputs)
        selected = tf.gather(logits, classes, axis=2, batch_dims=1)  # (batch, n)
        if self.reduction == "sum":
            return tf.reduce_sum(tf.where(matches, selected, 0.0), axis=1)
        largest = tf.reduce_max(tf.where(matches, selected, selected.dtype.min), axis=1)
        return tf.where(tf.reduce_any(matches, axis=1), largest, 0.0)

    def ious(self, outputs: Any) -> Any:
        """IoU `(batch, n)` of each raw prediction's decoded box with the target's box.

        Example:
            >>> target.ious(detector(images))  # which anchors lie on the box
        """
        boxes, _ = self._decoded(outputs)
        return self._ious(boxes)

    def matches(self, outputs: Any) -> Any:
        """The raw predictions `(batch, n)` bool that make the detection (IoU ≥ `iou`).

        Raises:
            TargetError: called eagerly, an image whose predictions all miss the
                box (with `strict=True`).
        """
        return self._parts(outputs)[2]

    def _ious(self, boxes: Any) -> Any:
        batch = tf.shape(boxes)[0]
        box = self._box
        if box.shape.rank == 1:
            box = tf.broadcast_to(box, tf.stack([batch, 4]))
        else:
            check = tf.debugging.assert_equal(
                tf.shape(box)[0],
                batch,
                message="DetectionTarget: `box` gives one box per image but the batch size "
                "differs (Score-CAM and Ablation-CAM score copies of the images: give them "
                "one box)",
            )
            with tf.control_dependencies([check]):
                box = tf.identity(box)
        return tf.stop_gradient(_pairwise_iou(tf.stop_gradient(boxes), box))

    def _parts(self, outputs: Any) -> tuple[Any, Any, Any]:
        """`(logits, classes, matches)`: `(batch, n, classes)`, `(batch,)`, `(batch, n)` bool."""
        what = type(self).__name__
        boxes, logits = self._decoded(outputs)
        _check_range(np.asarray(self.class_index), logits.shape[-1], "class_index", what, "classes")
        classes = _per_image(self._classes, tf.shape(logits)[0], "class_index", what)
        ious = self._ious(boxes)
        matches = ious >= float(self.iou)
        best = tf.reduce_max(ious, axis=1)
        if self.strict:
            if tf.executing_eagerly():
                self._raise_unmatched(best.numpy(), boxes)
            else:
                check = tf.debugging.Assert(
                    tf.reduce_all(best >= float(self.iou)),
                    [self._unmatched_message(), "Best IoU per image:", best],
                    summarize=64,
                )
                with tf.control_dependencies([check]):
                    logits = tf.identity(logits)
        return logits, classes, tf.stop_gradient(matches)

    def _decoded(self, outputs: Any) -> tuple[Any, Any]:
        """`(boxes, logits)`: decoded boxes `(batch, n, 4)` in absolute xyxy, float32 logits."""
        what = type(self).__name__
        keys = list(outputs) if isinstance(outputs, dict) else None
        if keys is not None and all(key in outputs for key in _ANCHOR_KEYS):
            deltas, logits = (tf.convert_to_tensor(outputs[key]) for key in _ANCHOR_KEYS)
            self._check_raw(deltas, logits, _ANCHOR_KEYS)
            boxes = self._decode_deltas(tf.cast(deltas, tf.float32))
        elif keys is not None and all(key in outputs for key in _QUERY_KEYS):
            relative, logits = (tf.convert_to_tensor(outputs[key]) for key in _QUERY_KEYS)
            self._check_raw(relative, logits, _QUERY_KEYS)
            boxes = self._absolute_queries(tf.cast(relative, tf.float32))
        else:
            received = f"keys {keys}" if keys is not None else f"a {type(outputs).__name__}"
            raise TargetError(
                f"{what} needs a detector's raw outputs, a dict with "
                f"{list(_ANCHOR_KEYS)} (keras-hub RetinaNetObjectDetector) or "
                f"{list(_QUERY_KEYS)} (keras-hub DFineObjectDetector), as `detector(images)` "
                f"returns them before non-max suppression. Received {received}."
            )
        return boxes, tf.cast(logits, tf.float32)

    @staticmethod
    def _check_raw(boxes: Any, logits: Any, keys: tuple[str, str]) -> None:
        if boxes.shape.rank != 3 or boxes.shape[-1] != 4 or logits.shape.rank != 3:
            raise TargetError(
                f"DetectionTarget: the raw outputs must be {keys[0]!r} (batch, n, 4) and "
                f"{keys[1]!r} (batch, n, classes). Received shapes {tuple(boxes.shape)} and "
                f"{tuple(logits.shape)}."
            )

    def _decode_deltas(self, deltas: Any) -> Any:
        """RetinaNet's `(dx, dy, dw, dh)` offsets from the anchors, as absolute xyxy boxes."""
        what = type(self).__name__
        if self._anchors is None:
            raise TargetError(
                f"{what}: RetinaNet-style outputs ('bbox_regression' holds offsets from "
                "anchors) need the anchors: pass `detector=` (the RetinaNetObjectDetector) or "
                "`anchors=`."
            )
        count = deltas.shape[1]
        if count is not None and count != self._anchors.shape[0]:
            raise TargetError(
                f"{what}: the outputs hold {count} raw predictions but the anchors number "
                f"{self._anchors.shape[0]} (for images of {self._height}x{self._width}); pass "
                "`image_shape=` of the images explained."
            )
        height, width = self._height, self._width
        return keras.utils.bounding_boxes.decode_deltas_to_boxes(
            anchors=self._anchors,
            boxes_delta=deltas,
            anchor_format=self._anchor_format,
            box_format="xyxy",
            encoded_format="center_xywh",  # as RetinaNetObjectDetector.decode_predictions
            image_shape=None if height is None else (height, width, 3),
        )

    def _absolute_queries(self, relative: Any) -> Any:
        """D-FINE's `(cx, cy, w, h)` fractions of the image, as absolute xyxy boxes."""
        if self._height is None:
            raise TargetError(
                "DetectionTarget: D-FINE-style outputs ('pred_boxes' are fractions of the "
                "image's size) need the image size: pass `detector=` or `image_shape=`."
            )
        scale = tf.constant([self._width, self._height, self._width, self._height], tf.float32)
        return _to_xyxy(relative * scale, "center_xywh", None, None)

    # ------------------------------------------------------------------ no match

    def _unmatched_message(self, image: int | None = None, best: float | None = None) -> str:
        what = type(self).__name__
        where = "an image" if image is None else f"image {image}"
        found = "" if best is None else f" (the best IoU of a decoded box with it is {best:.3f})"
        size = "" if self._height is None else f" ({self._height}x{self._width} pixels)"
        return (
            f"{what}: the box of {where} matches no raw prediction at IoU >= {self.iou}{found}. "
            f"Lower `iou`, or check the box: it must be in the detector's bounding_box_format "
            f"{self.bounding_box_format!r} {_layout(self.bounding_box_format)} and in the "
            f"coordinates of the model's input images{size}, e.g. a box of "
            "`detector.predict(images)['boxes']`."
        )

    def _raise_unmatched(self, best: np.ndarray, boxes: Any) -> None:
        missing = np.flatnonzero(best < float(self.iou))
        if not missing.size:
            return
        image = int(missing[0])
        message = self._unmatched_message(image, float(best[image]))
        hint = self._other_format_hint(image, boxes)
        raise TargetError(message + hint)

    def _other_format_hint(self, image: int, boxes: Any) -> str:
        """The other box format, if any, under which the box would match best (eager only)."""
        original = np.asarray(self.box, np.float32).reshape(-1, 4)
        box = original[0] if original.shape[0] == 1 else original[image]
        decoded = boxes[image : image + 1]
        relative = bool(np.all((box >= 0.0) & (box <= 1.0))) and self._height is not None
        found, best = None, float(self.iou)
        for name in _FORMATS:
            if name == self.bounding_box_format or name.startswith("rel_") != relative:
                continue
            xyxy = np.asarray(_to_xyxy(box, name, self._height, self._width), np.float32)
            if xyxy[2] <= xyxy[0] or xyxy[3] <= xyxy[1]:
                continue
            value = float(tf.reduce_max(_pairwise_iou(decoded, tf.constant(xyxy[None]))))
            if value > best or (found is None and value == best):
                found, best = name, value
        if found is None:
            return ""
        return f" Read as {found!r} {_layout(found)}, the box would match (IoU {best:.3f})."
