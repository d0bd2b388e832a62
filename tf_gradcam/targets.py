"""What to explain: the one definition of a target score per image.

A target says which differentiable scalar y^c of the model's outputs Grad-CAM
explains, one per image. It is kept apart from *how* the explanation is
computed (the engine in `tf_gradcam.gradcam`). Accepted forms:

- ``None``: the predicted class (top-1) of each image.
- an ``int``: one class index for every image.
- a sequence or array of ints, one class per image.
- `TopK(k)`: the k highest-scoring classes of each image (k maps per image).
- a callable ``fn(outputs) -> (batch,)`` tensor: any differentiable score,
  e.g. a caption word's log-probability, a VQA answer's score or a
  segmenter's class scores summed over a region (`SegmentationTarget`).
  ``outputs`` has the structure of the model's outputs (tensor, list or dict), with a
  trailing softmax/sigmoid removed when the engine runs with ``logits=True``.

Class targets index the pre-softmax scores of the model's first output
(or the one chosen with ``GradCAM(..., output=...)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from tf_gradcam.errors import TargetError

__all__ = [
    "AnswerScore",
    "CaptionLogProb",
    "SegmentationTarget",
    "Target",
    "TopK",
    "WordLogProb",
    "resolve_target",
]


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


# ---------------------------------------------------------------------------
# Labels as targets: `target="labels"` in explain_dataset and GradCAMCallback
# ---------------------------------------------------------------------------

#: The target that explains each image's own label.
LABELS = "labels"
#: The callback's former name for it, accepted with a DeprecationWarning.
_DEPRECATED_LABELS = "true"


def labels_target(target: Any) -> Any:
    """`target` with the deprecated `"true"` replaced by `"labels"` (warning once per call site).

    Example:
        >>> labels_target("true")  # DeprecationWarning
        'labels'
    """
    if isinstance(target, str) and target == _DEPRECATED_LABELS:
        warnings.warn(
            'target="true" is deprecated; use target="labels" (each image\'s own label).',
            DeprecationWarning,
            stacklevel=3,
        )
        return LABELS
    return target


def check_label_kind(kind: str, dtype: str, shape: tuple, rank: int, batched: bool) -> None:
    per = "" if batched else " per element"
    received = f"Received: labels of dtype {dtype}, shape {shape}{per}"
    if kind not in "iuf":
        fix = (
            "Map string labels to class indices first (e.g. with keras.layers.StringLookup)"
            if kind in "USOa"
            else "Cast them to integer class indices (e.g. labels.astype('int32'))"
        )
        raise TargetError(
            '`target="labels"` needs numeric labels: class indices, shape (batch,), or '
            f"one-hot rows, shape (batch, classes). {received}. {fix}, or pass target=None."
        )
    if rank not in (1, 2):
        raise TargetError(
            '`target="labels"` needs class indices, shape (batch,), or one-hot rows, shape '
            f"(batch, classes). {received}. Reshape the labels to one of those."
        )


def require_labels(labels: Any) -> None:
    if labels is None:
        raise TargetError(
            '`target="labels"` needs data with labels: elements (images, labels) or '
            "(images, labels, extras)."
        )


def classes_from_labels(labels: Any, num_classes: int | None = None) -> Any:
    """Class indices `(batch,)` from integer (or whole float) labels or one-hot rows.

    Graph tensors (inside the replicas) are converted without checks: the same
    labels were checked on the host, as NumPy, before the replicas ran.
    """
    require_labels(labels)
    if isinstance(labels, tf.Tensor) and not tf.executing_eagerly():
        if labels.shape.rank == 2 and labels.shape[-1] != 1:
            return tf.cast(tf.argmax(labels, axis=-1), tf.int32)
        return tf.cast(tf.reshape(labels, [-1]), tf.int32)
    array = np.asarray(labels)
    received = f"Received: labels of dtype {array.dtype}, shape {array.shape}"
    check_label_kind(array.dtype.kind, str(array.dtype), array.shape, array.ndim, True)
    if array.ndim == 2 and array.shape[-1] == 1:
        array = array[:, 0]
    if array.ndim == 2:
        if num_classes is not None and array.shape[-1] != num_classes:
            raise TargetError(
                f"One-hot labels must have one column per class of the model ({num_classes}). "
                f"{received}. Pass class indices instead, or explain the output the labels "
                "belong to."
            )
        one_hot = np.all((array == 0) | (array == 1), axis=-1) & (array.sum(axis=-1) == 1)
        if not one_hot.all():
            row = int(np.argmin(one_hot))
            raise TargetError(
                "Labels of shape (batch, classes) must be one-hot rows (a single 1, the rest "
                f"0); row {row} is {np.array2string(array[row], precision=3)}. {received}. "
                "For soft or smoothed labels pass the class indices, e.g. labels.argmax(-1)."
            )
        array = np.argmax(array, axis=-1)
    elif array.dtype.kind == "f":
        whole = np.isfinite(array) & (array == np.round(array))
        if not whole.all():
            value = float(array[int(np.argmin(whole))])
            raise TargetError(
                f"Float labels must hold whole class numbers (e.g. 2.0); found {value}. "
                f"{received}. Pass integer class indices or one-hot rows."
            )
    classes = array.astype(np.int64)
    if num_classes is not None and classes.size:
        low, high = int(classes.min()), int(classes.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise TargetError(
                f"Label {bad} is out of range: the model's output has {num_classes} classes "
                f"(valid labels 0..{num_classes - 1}). {received}."
            )
    return classes.astype(np.int32)


# ---------------------------------------------------------------------------
# Vision-language targets (§8.1 captioning, §8.2 visual question answering)
# ---------------------------------------------------------------------------
#
# Ready-made callables for the ``fn(outputs) -> (batch,)`` form above. They are
# frozen dataclasses compared by identity (``eq=False``): the engine compiles
# one step per target object, so reusing one object across calls never
# retraces, and its per-image indices are held as tensors that the compiled
# step captures instead of baking them into the graph.


def _select_output(outputs: Any, output: int | str | None, what: str) -> Any:
    """The output a vision-language target reads: by position, by name, or the first."""
    if isinstance(outputs, dict):
        key = next(iter(outputs)) if output is None else output
        if key not in outputs:
            raise TargetError(
                f"{what}: `output={output!r}` names no output; the model's outputs are "
                f"{list(outputs)}."
            )
        return outputs[key]
    if isinstance(outputs, (list, tuple)):
        index = 0 if output is None else output
        if not isinstance(index, int) or not -len(outputs) <= index < len(outputs):
            raise TargetError(
                f"{what}: `output={output!r}` is not a valid position among the model's "
                f"{len(outputs)} outputs."
            )
        return outputs[index]
    if output not in (None, 0, -1):
        raise TargetError(f"{what}: the model has one output. Received: output={output!r}.")
    return outputs


def _index_tensor(value: Any, name: str, what: str, *, ndim: tuple[int, ...]) -> Any:
    """Validate non-negative integer indices and hold them as an int32 tensor."""
    array = np.asarray(value)
    if array.dtype.kind not in "iu" or array.ndim not in ndim or array.size == 0:
        raise TargetError(
            f"{what}: `{name}` must be a non-negative int or one int per image. "
            f"Received: {name}={value!r}."
        )
    if array.min() < 0:
        raise TargetError(f"{what}: `{name}` must be >= 0. Received: {name}={value!r}.")
    return tf.constant(array, tf.int32)


def _per_image(indices: Any, batch: Any, name: str, what: str) -> Any:
    """Broadcast a scalar index to (batch,), or check a per-image one has `batch` entries."""
    if indices.shape.rank == 0:
        return tf.fill([batch], indices)
    check = tf.debugging.assert_equal(
        tf.size(indices),
        batch,
        message=f"{what}: `{name}` gives one index per image but the batch size differs",
    )
    with tf.control_dependencies([check]):
        return tf.identity(indices)


def _check_range(indices: np.ndarray, limit: Any, name: str, what: str, axis: str) -> None:
    if limit is not None and indices.size and int(indices.max()) >= limit:
        raise TargetError(
            f"{what}: `{name}` {int(indices.max())} is out of range: the output has "
            f"{limit} {axis} (valid 0..{limit - 1})."
        )


def _caption_logits(outputs: Any, output: int | str | None, what: str) -> Any:
    logits = tf.convert_to_tensor(_select_output(outputs, output, what))
    if logits.shape.rank != 3:
        raise TargetError(
            f"{what} needs per-step word scores of shape (batch, steps, vocabulary), the "
            "output of a decoder run with teacher forcing. Received an output of shape "
            f"{tuple(logits.shape)}."
        )
    return logits


@dataclass(frozen=True, eq=False)
class WordLogProb:
    """Log-probability of one word of a caption, under teacher forcing (§8.1.1).

    The captioning model reads the image and the caption shifted right (teacher
    forcing) and outputs word scores `(batch, steps, vocabulary)`; step `t`
    predicts the caption's word `t`. This target is `log p(word | image,
    words before t) = log_softmax(scores[:, step])[word]`, the paper's
    per-word explanation ("we one-hot encode each of the visual words at the
    corresponding time-steps", §8.1.1; here through the log-probability, as in
    §8.1 for whole captions).

    The engine hands the scores over with a trailing softmax removed
    (`GradCAM(..., logits=True)`, the default), so the log-softmax is taken
    here; do not use it with `logits=False` on a softmax model.

    Args:
        word: the word's token id, one for every image or one per image.
        step: the time step `t` (0-based position in the output sequence), one
            for every image or one per image.
        output: for models with several outputs, the position or name of the
            `(batch, steps, vocabulary)` output; default the first.

    Raises:
        TargetError: negative or non-integer indices (at construction); an
            output that is not 3-D, or a word or step out of range (when called).
        tf.errors.InvalidArgumentError: per-image indices whose count is not
            the batch size (when called).

    Example:
        >>> cam = tf_gradcam.GradCAM(captioner, "last_conv")
        >>> # where does the model look to say word 2 ("circle", token id 7)?
        >>> result = cam([images, caption_inputs], target=WordLogProb(word=7, step=2))
    """

    word: Any
    step: Any
    output: int | str | None = None

    def __post_init__(self) -> None:
        what = type(self).__name__
        object.__setattr__(self, "_word", _index_tensor(self.word, "word", what, ndim=(0, 1)))
        object.__setattr__(self, "_step", _index_tensor(self.step, "step", what, ndim=(0, 1)))

    def __call__(self, outputs: Any) -> Any:
        """Return the `(batch,)` log-probabilities of the word at its step."""
        what = type(self).__name__
        logits = _caption_logits(outputs, self.output, what)
        _check_range(np.asarray(self.step), logits.shape[1], "step", what, "steps")
        _check_range(np.asarray(self.word), logits.shape[2], "word", what, "words")
        batch = tf.shape(logits)[0]
        steps = _per_image(self._step, batch, "step", what)
        words = _per_image(self._word, batch, "word", what)
        at_step = tf.gather(logits, steps, axis=1, batch_dims=1)  # (batch, vocabulary)
        log_probs = tf.nn.log_softmax(tf.cast(at_step, tf.float32), axis=-1)
        return tf.gather(log_probs, words, axis=1, batch_dims=1)


@dataclass(frozen=True, eq=False)
class CaptionLogProb:
    """Log-probability of a whole caption, under teacher forcing (§8.1).

    `Σ_t log p(tokens[t] | image, tokens before t)`, the quantity the paper
    differentiates to explain a caption ("we compute the gradient of its log
    probability w.r.t. units in the last convolutional layer"). Because the
    gradient is linear, its Grad-CAM weights are the sum of the weights of the
    `WordLogProb` targets of its words.

    Args:
        tokens: the caption's token ids as the model predicts them (step `t`
            predicts `tokens[t]`): `(steps,)` for every image or
            `(batch, steps)` per image. A negative id marks padding, which is
            left out of the sum.
        output: for models with several outputs, the position or name of the
            `(batch, steps, vocabulary)` output; default the first.

    Raises:
        TargetError: tokens that are not integers of rank 1 or 2 (at
            construction); an output that is not 3-D, or whose steps or
            vocabulary do not fit the tokens (when called).
        tf.errors.InvalidArgumentError: per-image tokens whose count is not the
            batch size (when called).

    Example:
        >>> target = CaptionLogProb(targets)         # (batch, steps) token ids
        >>> cam([images, caption_inputs], target=target).heatmaps
    """

    tokens: Any
    output: int | str | None = None

    def __post_init__(self) -> None:
        what = type(self).__name__
        array = np.asarray(self.tokens)
        if array.dtype.kind not in "iu" or array.ndim not in (1, 2) or array.size == 0:
            raise TargetError(
                f"{what}: `tokens` must be int token ids of shape (steps,) or "
                f"(batch, steps), negative for padding. Received: tokens={self.tokens!r}."
            )
        object.__setattr__(self, "_tokens", tf.constant(array, tf.int32))

    def __call__(self, outputs: Any) -> Any:
        """Return the `(batch,)` log-probabilities of the captions."""
        what = type(self).__name__
        logits = _caption_logits(outputs, self.output, what)
        tokens = self._tokens
        steps = logits.shape[1]
        if steps is not None and tokens.shape[-1] != steps:
            raise TargetError(
                f"{what}: `tokens` has {tokens.shape[-1]} steps but the output has "
                f"{steps} (shape {tuple(logits.shape)})."
            )
        _check_range(np.asarray(self.tokens), logits.shape[2], "tokens", what, "words")
        batch = tf.shape(logits)[0]
        if tokens.shape.rank == 1:
            tokens = tf.broadcast_to(tokens, tf.stack([batch, tf.size(tokens)]))
        else:
            check = tf.debugging.assert_equal(
                tf.shape(tokens)[0],
                batch,
                message=f"{what}: `tokens` has one row per image but the batch size differs",
            )
            with tf.control_dependencies([check]):
                tokens = tf.identity(tokens)
        log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
        valid = tokens >= 0
        picked = tf.gather(log_probs, tf.maximum(tokens, 0), axis=2, batch_dims=2)
        return tf.reduce_sum(tf.where(valid, picked, 0.0), axis=1)


@dataclass(frozen=True, eq=False)
class AnswerScore:
    """The score of a chosen answer of a visual question answering model (§8.2).

    VQA models classify over an answer vocabulary; the paper picks an answer
    and explains "its score" y^c, before the softmax. This target returns that
    score from the model's answer output, so it also works on models with
    several outputs (answer scores plus, say, an attention map) and with
    another answer per image, e.g. the answer the model was *not* sure of
    (Fig. 12: "when forced to answer 'yellow'"). For a single-output model
    it equals the class target `target=answer`.

    Args:
        answer: the answer's index in the answer vocabulary, one for every
            image or one per image.
        output: for models with several outputs, the position or name of the
            `(batch, answers)` output; default the first.

    Raises:
        TargetError: negative or non-integer answers (at construction); an
            output that is not `(batch, answers)` or an answer out of range
            (when called).
        tf.errors.InvalidArgumentError: per-image answers whose count is not the
            batch size (when called).

    Example:
        >>> cam = tf_gradcam.GradCAM(vqa_model, "last_conv")
        >>> cam([images, questions], target=AnswerScore(answers)).heatmaps
    """

    answer: Any
    output: int | str | None = None

    def __post_init__(self) -> None:
        what = type(self).__name__
        object.__setattr__(self, "_answer", _index_tensor(self.answer, "answer", what, ndim=(0, 1)))

    def __call__(self, outputs: Any) -> Any:
        """Return the `(batch,)` scores of the chosen answers."""
        what = type(self).__name__
        scores = tf.convert_to_tensor(_select_output(outputs, self.output, what))
        if scores.shape.rank != 2:
            raise TargetError(
                f"{what} needs answer scores of shape (batch, answers). Received an "
                f"output of shape {tuple(scores.shape)}."
            )
        _check_range(np.asarray(self.answer), scores.shape[1], "answer", what, "answers")
        answers = _per_image(self._answer, tf.shape(scores)[0], "answer", what)
        return tf.gather(scores, answers, axis=1, batch_dims=1)


# ---------------------------------------------------------------------------
# Segmentation: a class's scores summed over a region (Seg-Grad-CAM)
# ---------------------------------------------------------------------------


def _segmentation_mask(mask: Any, what: str) -> np.ndarray:
    """Check a region mask, `(height, width)` or `(batch, height, width)`; return float32."""
    if isinstance(mask, tf.Tensor):
        mask = mask.numpy()
    array = np.asarray(mask)
    if array.dtype.kind not in "biuf":
        raise TargetError(
            f"{what}: `mask` must be a numeric or bool array (1 inside the region, 0 "
            f"outside). Received an array of dtype {array.dtype}."
        )
    channel = array.ndim in (3, 4) and array.shape[-1] == 1  # (..., height, width, 1)
    if array.ndim not in (2, 3) or array.size == 0 or channel:
        hint = (
            " For a (height, width, 1) or (batch, height, width, 1) mask, drop the last "
            "axis: mask[..., 0]."
            if channel
            else ""
        )
        raise TargetError(
            f"{what}: `mask` must be (height, width), one region for every image, or "
            f"(batch, height, width), one per image. Received shape {array.shape}.{hint}"
        )
    array = array.astype(np.float32)
    if array.ndim == 3 and array.shape[0] == 1:  # (1, height, width): one region for all
        array = array[0]
    if not np.all(np.isfinite(array)):
        raise TargetError(f"{what}: `mask` holds non-finite values (NaN or inf).")
    flat = array.reshape((-1, array.shape[-2] * array.shape[-1]))
    empty = np.flatnonzero(~np.any(flat != 0, axis=1))
    if empty.size:
        where = "" if array.ndim == 2 else f" for image {int(empty[0])}"
        raise TargetError(
            f"{what}: `mask` selects no pixel{where}: the score would be 0 and the map "
            "empty. Give a region with at least one nonzero pixel, or mask=None for the "
            "pixels the model assigns to the class."
        )
    return array


@dataclass(frozen=True, eq=False)
class SegmentationTarget:
    """A segmenter's score for one class over a region: Σ_pixels region · logits[..., c].

    Grad-CAM explains any differentiable score y^c (§3 of the paper). For a
    segmentation model, whose output holds per-pixel class scores
    `(batch, height, width, classes)`, this target is the sum of class `c`'s
    pre-softmax scores over a region of the output (the Seg-Grad-CAM score,
    Vinogradova et al. 2020):

        y^c = Σ_{i,j} M_ij · S^c_ij

    where `S^c` is the class's score map and `M` the region: the given
    `mask`, or, with `mask=None`, the pixels the model assigns to the class
    (`argmax` over the classes equals `c`). The argmax region is computed
    from the same forward pass and held fixed (`tf.stop_gradient`): the
    explanation is that of the class's scores on the pixels it wins, not of
    how the region would move. A one-channel output (a sigmoid head, binary
    segmentation) has the region `S^0 > 0` (probability above 0.5).

    The engine hands the outputs over with a trailing softmax/sigmoid removed
    (`logits=True`, the default of every method), so the scores are logits.
    Being a callable target, it works with every method (`GradCAM`, the CAM
    family through `tf_gradcam.explain(..., method=...)`, `GuidedGradCAM`,
    `Smoothed`), with `GradCAMCallback(target=...)` and with
    `explain_dataset(target=...)`; `Explanation.classes` is then `None`.
    Compiled steps are cached per target object: build it once and reuse it.

    Args:
        class_index: the class, an int for every image or one int per image
            `(batch,)`.
        mask: the region, at the output's resolution: `(height, width)` for
            every image or `(batch, height, width)` one per image; 0/1 or
            bool (other numbers weigh the pixels). `None`: the pixels the
            model assigns to the class, per image.
        output: for models with several outputs, the position (or, for dict
            outputs, the key) of the `(batch, height, width, classes)` output;
            default the first.

    Raises:
        TargetError: a negative or non-integer class, a mask that is not
            numeric, of another rank, non-finite or empty (at construction);
            an output that is not `(batch, height, width, classes)`, a class
            out of range or a mask of another size than the output (when
            called).
        tf.errors.InvalidArgumentError: per-image classes or masks whose count
            is not the batch size (when called; Score-CAM and Ablation-CAM
            score copies of the images in other batches, so use one class and
            one `(height, width)` mask with them).

    Example:
        >>> target = SegmentationTarget(1, mask=region)   # class 1 inside `region`
        >>> tf_gradcam.GradCAM(segmenter)(images, target=target).heatmaps
        >>> tf_gradcam.explain(segmenter, images, SegmentationTarget(1), method="gradcam++")
    """

    class_index: Any
    mask: Any = None
    output: int | str | None = None

    def __post_init__(self) -> None:
        what = type(self).__name__
        classes = _index_tensor(self.class_index, "class_index", what, ndim=(0, 1))
        object.__setattr__(self, "_classes", classes)
        mask = None if self.mask is None else _segmentation_mask(self.mask, what)
        object.__setattr__(self, "_mask", None if mask is None else tf.constant(mask))

    def __repr__(self) -> str:
        classes = np.asarray(self.class_index)
        shown = int(classes) if classes.ndim == 0 else f"<{classes.size} per image>"
        if self._mask is None:
            region = "None (the pixels assigned to the class)"
        else:
            region = f"<{tuple(self._mask.shape)} mask>"
        extra = "" if self.output is None else f", output={self.output!r}"
        return f"{type(self).__name__}(class_index={shown}, mask={region}{extra})"

    def region(self, outputs: Any) -> Any:
        """The region `(batch, height, width)` float32 the score sums over, for these outputs.

        Example:
            >>> target = SegmentationTarget(2)
            >>> pixels = target.region(segmenter(images))  # where class 2 wins
        """
        logits, _, region = self._parts(outputs)
        return tf.broadcast_to(region, tf.shape(logits)[:3])

    def __call__(self, outputs: Any) -> Any:
        """Return the `(batch,)` sums of the class's scores over the region."""
        logits, classes, region = self._parts(outputs)
        selected = tf.gather(logits, classes, axis=3, batch_dims=1)  # (batch, height, width)
        return tf.reduce_sum(selected * region, axis=[1, 2])

    def _parts(self, outputs: Any) -> tuple[Any, Any, Any]:
        """`(logits, classes, region)`: `(batch, h, w, classes)`, `(batch,)`, `(batch, h, w)`.

        The logits pass through the graph-time checks (per-image counts, a
        mask's size against an output of unknown size) first, so that every
        later op, the gradients' included, waits for them: their message is
        the error, not another op's shape mismatch.
        """
        what = type(self).__name__
        scores = tf.convert_to_tensor(_select_output(outputs, self.output, what))
        if scores.shape.rank != 4:
            raise TargetError(
                f"{what} needs per-pixel class scores of shape (batch, height, width, "
                f"classes), a segmentation model's output. Received an output of shape "
                f"{tuple(scores.shape)}. For a classifier pass the class index as the "
                "target; for a model with several outputs choose the per-pixel one with "
                "`output=`; transpose a channels-first output in the model."
            )
        _check_range(np.asarray(self.class_index), scores.shape[-1], "class_index", what, "classes")
        classes = _per_image(self._classes, tf.shape(scores)[0], "class_index", what)
        checks = [classes, *self._mask_checks(scores)]
        with tf.control_dependencies(checks):
            logits = tf.cast(tf.identity(scores), tf.float32)
        if self._mask is not None:
            return logits, classes, tf.stop_gradient(self._mask)
        if logits.shape[-1] == 1:  # one sigmoid channel: the pixels above 0.5
            region = tf.greater(logits[..., 0], 0.0)
        else:
            winners = tf.argmax(logits, axis=-1, output_type=tf.int32)
            region = tf.equal(winners, classes[:, None, None])
        # fixed for this forward pass: argmax has no gradient, the stop makes it explicit
        return logits, classes, tf.stop_gradient(tf.cast(region, tf.float32))

    def _mask_checks(self, scores: Any) -> list:
        """Refuse a mask of another size than the output (now, or in the graph if unknown)."""
        mask = self._mask
        if mask is None:
            return []
        what = type(self).__name__
        expected = tuple(scores.shape[1:3])
        if None not in expected and tuple(mask.shape[-2:]) != expected:
            raise TargetError(
                f"{what}: `mask` is {mask.shape[-2]}x{mask.shape[-1]} (height x width) but "
                f"the model's per-pixel scores are {expected[0]}x{expected[1]} (output "
                f"shape {tuple(scores.shape)}). Give a mask of that size, e.g. "
                f"tf.image.resize(mask[..., None], {expected}, 'nearest')[..., 0]."
            )
        checks = []
        if None in expected:
            checks.append(
                tf.debugging.assert_equal(
                    tf.shape(scores)[1:3],
                    tf.shape(mask)[-2:],
                    message=f"{what}: `mask` and the model's per-pixel scores differ in size",
                )
            )
        if mask.shape.rank == 3:
            checks.append(
                tf.debugging.assert_equal(
                    tf.shape(scores)[0],
                    tf.shape(mask)[0],
                    message=f"{what}: `mask` gives one region per image but the batch size "
                    "differs (Score-CAM and Ablation-CAM score copies of the images: give "
                    "them one (height, width) mask)",
                )
            )
        return checks
