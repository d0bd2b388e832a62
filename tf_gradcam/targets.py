"""What to explain: the one definition of a target score per image.

A target says which differentiable scalar y^c of the model's outputs Grad-CAM
explains, one per image. It is kept apart from *how* the explanation is
computed (the engine in `tf_gradcam.gradcam`). Accepted forms:

- ``None``: the predicted class (top-1) of each image.
- an ``int``: one class index for every image.
- a sequence or array of ints, one class per image.
- `TopK(k)`: the k highest-scoring classes of each image (k maps per image).
- a callable ``fn(outputs) -> (batch,)`` tensor: any differentiable score,
  e.g. a caption word's log-probability or a VQA answer's score. ``outputs``
  has the structure of the model's outputs (tensor, list or dict), with a
  trailing softmax/sigmoid removed when the engine runs with ``logits=True``.

Class targets index the pre-softmax scores of the model's first output
(or the one chosen with ``GradCAM(..., output=...)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tf_gradcam.errors import TargetError

__all__ = ["Target", "TopK", "resolve_target"]


@dataclass(frozen=True)
class TopK:
    """The k highest-scoring classes of each image.

    Args:
        k: how many classes to explain per image (k >= 1).

    Example:
        >>> result = cam(images, target=TopK(5))
        >>> result.heatmaps.shape  # (batch, 5, height, width)
    """

    k: int

    def __post_init__(self) -> None:
        if not isinstance(self.k, (int, np.integer)) or isinstance(self.k, bool) or self.k < 1:
            raise TargetError(f"TopK needs a positive integer k. Received: k={self.k!r}.")


Target = None | int | Sequence[int] | np.ndarray | TopK | Callable[[Any], Any]


@dataclass(frozen=True)
class TargetSpec:
    """A target resolved against a batch: what the compiled step needs.

    Attributes:
        kind: "predicted", "classes", "top_k" or "callable".
        classes: (batch,) int32 class indices for kind "classes", else zeros.
        k: number of maps per image (1 unless kind is "top_k").
        fn: the user's score function for kind "callable".
    """

    kind: str
    classes: np.ndarray
    k: int = 1
    fn: Callable[[Any], Any] | None = None


def _check_class_range(classes: np.ndarray, num_classes: int | None) -> None:
    if classes.size and classes.min() < 0:
        raise TargetError(
            f"Class indices must be >= 0. Received: target containing {int(classes.min())}."
        )
    if num_classes is not None and classes.size and classes.max() >= num_classes:
        raise TargetError(
            f"Class index {int(classes.max())} is out of range: the model's output has "
            f"{num_classes} classes (valid indices 0..{num_classes - 1})."
        )


def resolve_target(target: Target, batch_size: int | None, num_classes: int | None) -> TargetSpec:
    """Validate a user target against a batch and turn it into a `TargetSpec`.

    Args:
        target: any accepted form (see the module docstring).
        batch_size: number of images in the batch, or `None` when unknown (graph
            mode): per-image lists are then not length-checked.
        num_classes: size of the class axis of the scored output, or `None` if unknown.

    Returns:
        The `TargetSpec`.

    Raises:
        TargetError: a class out of range, a per-image list of the wrong length,
            a k larger than the number of classes, or an unsupported form.

    Example:
        >>> resolve_target(3, batch_size=2, num_classes=10).classes
        array([3, 3], dtype=int32)
    """
    zeros = np.zeros((batch_size or 1,), np.int32)
    if target is None:
        return TargetSpec("predicted", zeros)
    if isinstance(target, TopK):
        if num_classes is not None and target.k > num_classes:
            raise TargetError(
                f"TopK(k={target.k}) asks for more classes than the model's output has "
                f"({num_classes})."
            )
        return TargetSpec("top_k", zeros, k=int(target.k))
    if callable(target):
        return TargetSpec("callable", zeros, fn=target)
    if isinstance(target, bool):
        raise TargetError(f"`target` must be a class index, not a bool. Received: {target!r}.")
    if isinstance(target, (int, np.integer)):
        classes = np.full((batch_size or 1,), int(target), np.int32)
        _check_class_range(classes, num_classes)
        return TargetSpec("classes", classes)
    try:
        array = np.asarray(target)
    except Exception as error:  # pragma: no cover - exotic objects
        raise TargetError(f"Unsupported target {target!r}.") from error
    if array.dtype.kind not in "iu" or array.ndim != 1:
        raise TargetError(
            "`target` must be None, an int, one int per image, TopK(k) or a callable "
            f"returning one score per image. Received: target={target!r}."
        )
    if batch_size is not None and array.shape[0] != batch_size:
        raise TargetError(
            f"`target` gives {array.shape[0]} classes for {batch_size} images; give one "
            "class per image or a single int for all."
        )
    classes = array.astype(np.int32)
    _check_class_range(classes, num_classes)
    return TargetSpec("classes", classes)
