"""Explanation losses: penalties on what a model's explanation shows, to train with.

The paper's §6.3 uses Grad-CAM to *find* a bias and removes it with a better
training set. The losses here remove it during training instead, from a few
images annotated with a mask, in the manner of the paper's reference [49]
(Selvaraju et al., "Taking a HINT", ICCV 2019) and of Ross et al., "Right for
the Right Reasons" (IJCAI 2017):

- `GradCAMMassLoss`: the share of the true class's Grad-CAM map that lies
  inside a region marked irrelevant (a second-order loss: the map holds
  ∂y^c/∂A, so its gradient with respect to the weights holds second
  derivatives of the model);
- `RRRLoss`: Ross et al.'s eq. 1, the squared input gradients of the summed
  log-probabilities inside the irrelevant region;
- `HINTLoss`: HINT's ranking loss between Grad-CAM importances and human
  importances (a mask of *relevant* pixels).

Each loss says *what* is penalised for a batch of annotated images;
`tf_gradcam.training.ExplanationGuidedModel` says *how* `fit` trains with it.
A loss is called as `loss(model, images, labels, masks)` and returns the
weighted mean over the annotated images of the batch, so it also serves a
custom training loop.

Masks are `(batch, height, width)` arrays at the images' size (a trailing axis
of 1 is accepted). Values are clipped to [0, 1]; negative and NaN values count
as 0; an image whose mask has no value >= 0 (e.g. filled with `NO_MASK`) is
unannotated and gets no explanation loss, so one batch may mix annotated and
unannotated images.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_gradcam.errors import InputError, NotSpatialError
from tf_gradcam.gradcam import GradCAM
from tf_gradcam.submodel import GradientModel, build_gradient_model
from tf_gradcam.targets import TargetSpec

__all__ = [
    "NO_MASK",
    "ExplanationLoss",
    "GradCAMMassLoss",
    "HINTLoss",
    "RRRLoss",
    "area_average",
    "label_classes",
    "prepare_masks",
]

#: Mask value of an unannotated image: a mask with no value >= 0 adds no explanation loss.
NO_MASK = -1.0

_SCORES = ("log_probability", "logit")
_ACTIVATIONS = ("softmax", "sigmoid")


# --------------------------------------------------------------------------- masks


def prepare_masks(masks: Any, images: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """Check masks against a batch of images; return the clipped masks and who is annotated.

    Args:
        masks: `(batch, height, width)` or `(batch, height, width, 1)` masks at
            the images' size.
        images: the `(batch, height, width, channels)` images they annotate.

    Returns:
        `(masks, annotated)`: float32 `(batch, height, width)` masks in [0, 1]
        (negative and NaN values set to 0), and a `(batch,)` bool tensor,
        `True` where the mask has a value >= 0.

    Raises:
        InputError: masks of another rank, or another height or width than
            the images (checked when the shapes are known while tracing;
            otherwise a TensorFlow assertion fails when the step runs).

    Example:
        >>> masks = np.full((4, 32, 32), NO_MASK)
        >>> masks[0, :8, :8] = 1.0                # only image 0 is annotated
        >>> clean, annotated = prepare_masks(masks, images)
    """
    masks = tf.convert_to_tensor(masks)
    images = tf.convert_to_tensor(images)
    if masks.shape.rank == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    if masks.shape.rank != 3:
        raise InputError(
            "Masks must be (batch, height, width) (or with a trailing axis of 1), one per "
            f"image. Received: masks of shape {tuple(masks.shape)}. Give each image a mask "
            f"at its size, filled with NO_MASK ({NO_MASK}) for images without annotation."
        )
    if images.shape.rank != 4:
        raise InputError(
            "Explanation losses take images (batch, height, width, channels) and masks "
            f"(batch, height, width). Received: images of shape {tuple(images.shape)}."
        )
    expected = tuple(images.shape[1:3])
    given = tuple(masks.shape[1:3])
    if None not in expected and None not in given:
        if expected != given:
            raise InputError(
                f"The masks are {given[0]}x{given[1]} but the images are "
                f"{expected[0]}x{expected[1]}. Received: masks of shape "
                f"{tuple(masks.shape)}, images of shape {tuple(images.shape)}. Resize the "
                "masks to the images' size (nearest neighbour keeps them binary)."
            )
    else:
        check = tf.debugging.assert_equal(
            tf.shape(masks)[1:3],
            tf.shape(images)[1:3],
            message="The masks' height and width differ from the images'",
        )
        with tf.control_dependencies([check]):
            masks = tf.identity(masks)
    masks = tf.cast(masks, tf.float32)
    valid = masks >= 0.0  # False for NaN
    annotated = tf.reduce_any(valid, axis=[1, 2])
    return tf.where(valid, tf.minimum(masks, 1.0), 0.0), annotated


def area_average(masks: Any, size: Any) -> tf.Tensor:
    """Resize `(batch, height, width)` masks to a layer's grid by area averaging.

    Each cell of the grid gets the mean of the mask over the part of the image
    it covers (fractional pixels weighted by their overlap), the convention of
    `tf.image.resize(..., method="area")`; for a grid dividing the image, the
    mean over each block. The grid is laid over the whole image, as Grad-CAM's
    upsampling lays the map over it.

    Args:
        masks: `(batch, height, width)` float masks.
        size: the grid's `(rows, columns)`.

    Returns:
        `(batch, rows, columns)` float32.

    Example:
        >>> area_average(np.ones((1, 32, 32)), (8, 8)).shape
        TensorShape([1, 8, 8])
    """
    masks = tf.convert_to_tensor(masks, tf.float32)
    size = tf.cast(size, tf.int32)
    shape = tf.shape(masks)
    n, height, width = shape[0], shape[1], shape[2]
    # Rank-2 MatMuls only: a batched product with a broadcast batch axis is wrong on
    # oneDNN with AVX-512 (docs/known-issues.md), and the loss is differentiated.
    columns = tf.matmul(
        tf.reshape(masks, [-1, width]), _area_matrix(width, size[1]), transpose_b=True
    )
    columns = tf.transpose(tf.reshape(columns, [n, height, size[1]]), [0, 2, 1])
    rows = tf.matmul(
        tf.reshape(columns, [-1, height]), _area_matrix(height, size[0]), transpose_b=True
    )
    return tf.transpose(tf.reshape(rows, [n, size[1], size[0]]), [0, 2, 1])


def _area_matrix(size_in: Any, size_out: Any) -> tf.Tensor:
    """`(size_out, size_in)` weights: the overlap of each output cell with each input pixel."""
    cells = tf.cast(size_out, tf.float32)
    pixels = tf.cast(size_in, tf.float32)
    scale = pixels / cells
    start = tf.range(cells)[:, None] * scale
    pixel = tf.range(pixels)[None, :]
    overlap = tf.nn.relu(tf.minimum(pixel + 1.0, start + scale) - tf.maximum(pixel, start))
    return overlap / scale


def _widen(masks: tf.Tensor, margin: int) -> tf.Tensor:
    """Grow each mask by `margin` pixels in every direction (a max filter)."""
    if margin == 0:
        return masks
    window = 2 * margin + 1
    widened = tf.nn.max_pool2d(masks[..., None], window, strides=1, padding="SAME")
    return widened[..., 0]


def label_classes(labels: Any) -> tf.Tensor:
    """Class indices `(batch,)` int32 from sparse labels or one-hot rows.

    Args:
        labels: `(batch,)` or `(batch, 1)` class indices, or `(batch, classes)` one-hot
            (or soft) rows, whose arg-max is taken.

    Returns:
        `(batch,)` int32 class indices.

    Raises:
        InputError: labels of rank 0 or above 2.

    Example:
        >>> label_classes(np.eye(3)[[2, 0]]).numpy()
        array([2, 0], dtype=int32)
    """
    labels = tf.convert_to_tensor(labels)
    rank = labels.shape.rank
    if rank == 2 and labels.shape[-1] != 1:
        return tf.cast(tf.argmax(labels, axis=-1), tf.int32)
    if rank == 2:
        return tf.cast(labels[:, 0], tf.int32)
    if rank == 1:
        return tf.cast(labels, tf.int32)
    raise InputError(
        "Labels must be class indices (batch,) or one-hot rows (batch, classes). "
        f"Received: labels of shape {tuple(labels.shape)}."
    )


def _log_probabilities(scores: tf.Tensor, activation: str) -> tf.Tensor:
    """Log-probabilities from pre-activation scores: log-softmax, or per-label log-sigmoid."""
    scores = tf.cast(scores, tf.float32)
    return tf.nn.log_softmax(scores) if activation == "softmax" else tf.math.log_sigmoid(scores)


def _first_output(outputs: Any) -> tf.Tensor:
    return keras.tree.flatten(outputs)[0]


# --------------------------------------------------------------------------- the losses


class ExplanationLoss:
    """What an explanation loss is: a weight, a mask meaning, and a loss per annotated image.

    Subclasses define `per_image` (and `build` for what they derive from the
    model once). Calling a loss returns `weight` times the mean of `per_image`
    over the annotated images of the batch (0 when none is annotated).

    Args:
        weight: λ, the factor of the loss in the training objective; a finite
            number >= 0.

    Raises:
        ValueError: `weight` is negative, not finite or not a number.
    """

    #: "irrelevant" (the mask marks pixels the model must not use) or "relevant"
    #: (it marks the pixels a person looks at).
    mask_meaning = "irrelevant"

    def __init__(self, *, weight: float = 1.0) -> None:
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float, np.integer, np.floating))
            or not math.isfinite(float(weight))
            or weight < 0
        ):
            raise ValueError(f"`weight` must be a finite number >= 0. Received: weight={weight!r}.")
        self.weight = float(weight)
        self._model: keras.Model | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight:g})"

    def build(self, model: keras.Model) -> None:
        """Derive what the loss needs from the model (once per model).

        Args:
            model: the `keras.Model` whose explanations are penalised.

        Raises:
            The errors of `tf_gradcam.GradCAM` for Grad-CAM losses (unknown
            layer, a layer without a spatial output, a subclassed model...).
        """
        if self._model is not model:
            self._build(model)
            self._model = model

    def _build(self, model: keras.Model) -> None:
        """Subclasses: build the explainer of `model`."""

    def per_image(self, images: tf.Tensor, classes: tf.Tensor, masks: tf.Tensor) -> tf.Tensor:
        """The unweighted loss of each image, `(batch,)` float32; all images are annotated.

        Args:
            images: `(batch, height, width, channels)` images.
            classes: `(batch,)` int32 true classes.
            masks: `(batch, height, width)` masks in [0, 1].
        """
        raise NotImplementedError

    def __call__(self, model: keras.Model, images: Any, labels: Any, masks: Any) -> tf.Tensor:
        """The weighted mean loss over the annotated images of a batch.

        Differentiable with respect to the model's weights: use it under a
        `tf.GradientTape` in a custom training loop (or let
        `ExplanationGuidedModel` add it in `fit`).

        Args:
            model: the model being trained.
            images: `(batch, height, width, channels)` images.
            labels: class indices `(batch,)` or one-hot rows `(batch, classes)`.
            masks: `(batch, height, width)` masks (see the module docstring).

        Returns:
            A float32 scalar: `weight` × the mean over annotated images (0 if none is).

        Raises:
            InputError: masks of the wrong rank or size, labels of the wrong rank.

        Example:
            >>> loss = GradCAMMassLoss(layer="last_conv", weight=1.0, margin=8)
            >>> with tf.GradientTape() as tape:
            ...     total = ce(y, model(x, training=True)) + loss(model, x, y, masks)
        """
        self.build(model)
        images = tf.convert_to_tensor(images)
        masks, annotated = prepare_masks(masks, images)
        indices = tf.where(annotated)[:, 0]
        count = tf.size(indices)
        values = tf.cond(
            count > 0,
            lambda: self.per_image(
                tf.gather(images, indices),
                tf.gather(label_classes(labels), indices),
                tf.gather(masks, indices),
            ),
            lambda: tf.zeros((0,), tf.float32),
        )
        mean = tf.math.divide_no_nan(tf.reduce_sum(values), tf.cast(count, tf.float32))
        return self.weight * mean


class _GradCAMLoss(ExplanationLoss):
    """A loss on the Grad-CAM map of the true class at one layer (shared by mass and HINT)."""

    def __init__(
        self,
        layer: str | keras.layers.Layer | None = None,
        *,
        weight: float = 1.0,
        score: str = "log_probability",
        activation: str = "softmax",
    ) -> None:
        super().__init__(weight=weight)
        if score not in _SCORES:
            raise ValueError(f"`score` must be one of {_SCORES}. Received: score={score!r}.")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {_ACTIVATIONS}. Received: activation={activation!r}."
            )
        self.layer = layer
        self.score = score
        self.activation = activation
        self._cam: GradCAM | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layer={self.layer!r}, weight={self.weight:g}, "
            f"score={self.score!r})"
        )

    def _build(self, model: keras.Model) -> None:
        self._cam = GradCAM(model, self.layer)  # pre-softmax scores (logits=True)

    def raw_maps(self, images: tf.Tensor, classes: tf.Tensor) -> tf.Tensor:
        """The signed Grad-CAM maps `Σ_k α_k A^k` of the true classes, `(batch, h, w)`.

        The engine's own steps (`GradCAM.gradients`, `channel_weights`,
        `weighted_sum`: eqs. 1–2 before the ReLU), run inside the caller's
        trace, so the maps are differentiable with respect to the weights.
        """
        cam = self._cam
        if self.score == "logit":
            spec = TargetSpec("classes", np.zeros((0,), np.int32))
        else:  # log p_c: also sees evidence *against* the other classes

            def log_probability(outputs: Any) -> tf.Tensor:
                logs = _log_probabilities(_first_output(outputs), self.activation)
                return tf.gather(logs, classes, axis=1, batch_dims=1)

            spec = TargetSpec("callable", np.zeros((0,), np.int32), fn=log_probability)
        activations, gradients, _, _ = cam.gradients(images, classes, spec)
        if activations.shape.rank != 4:
            raise NotSpatialError(
                f"Explanation losses need a 2-D feature map (batch, height, width, channels); "
                f"layer {cam.layer!r} gives activations of shape {tuple(activations.shape)}. "
                "Choose a convolutional layer of the image branch."
            )
        weights = cam.channel_weights(activations, gradients)
        return cam.weighted_sum(activations, gradients, weights)[:, 0]


class GradCAMMassLoss(_GradCAMLoss):
    """The share of the true class's Grad-CAM map inside the irrelevant region.

    For each annotated image, with `M = ReLU(Σ_k α_k^c A^k)` the Grad-CAM map
    (eqs. 1–2 of Selvaraju et al.) of the true class `c` at `layer` and `m` the
    mask resized to the layer's grid by area averaging (`area_average`), the
    loss is `Σ_ij M_ij m_ij / Σ_ij M_ij` (0 for an all-zero map): the fraction
    of the map's mass the model draws from pixels marked irrelevant, the
    quantity `GradCAMCallback` logs as `gradcam/<region>_mass`. Its gradient
    holds second derivatives of the model (∂/∂θ of ∂y^c/∂A).

    Two departures from the plain Grad-CAM of the paper, both measured on the
    bias study of `examples/guided_training.py` (docs/guided_training.md):

    - `score="log_probability"` (default) explains `log p_c` instead of the
      pre-softmax `y^c`. With `y^c` the model keeps the shortcut by moving it
      into evidence *against* the other class, which the ReLU of eq. 2 hides
      from the map of class `c`; `log p_c = y^c - log Σ_k exp y^k` sees it.
      `score="logit"` is the paper's score.
    - `margin` widens the mask by that many pixels before it is resized. A
      cell of a deep layer sees pixels well outside its own block (its
      receptive field), so with the bare mask the model moves the shortcut
      into the cells next to the region; a margin of about half the layer's
      receptive field covers them.

    Args:
        layer: the layer whose Grad-CAM map is penalised (as for `GradCAM`).
        weight: λ, the loss's factor in the objective.
        score: `"log_probability"` or `"logit"` (see above).
        activation: how the scores become probabilities for
            `score="log_probability"`: `"softmax"` (also for a model that
            outputs logits) or `"sigmoid"` (multi-label; `log σ(y^c)`).
        margin: pixels by which the irrelevant region is widened, >= 0.

    Raises:
        ValueError: an option out of range.

    Example:
        >>> loss = tf_gradcam.GradCAMMassLoss(layer="last_conv", weight=1.0, margin=8)
        >>> guided = tf_gradcam.ExplanationGuidedModel(model, loss)
    """

    def __init__(
        self,
        layer: str | keras.layers.Layer | None = None,
        *,
        weight: float = 1.0,
        score: str = "log_probability",
        activation: str = "softmax",
        margin: int = 0,
    ) -> None:
        super().__init__(layer, weight=weight, score=score, activation=activation)
        if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
            raise ValueError(f"`margin` must be an int >= 0 (pixels). Received: margin={margin!r}.")
        self.margin = int(margin)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, margin={self.margin})"

    def per_image(self, images: tf.Tensor, classes: tf.Tensor, masks: tf.Tensor) -> tf.Tensor:
        """`Σ M m / Σ M` per image, `(batch,)` float32."""
        maps = tf.nn.relu(self.raw_maps(images, classes))
        region = area_average(_widen(masks, self.margin), tf.shape(maps)[1:3])
        inside = tf.reduce_sum(maps * region, axis=[1, 2])
        return tf.math.divide_no_nan(inside, tf.reduce_sum(maps, axis=[1, 2]))


class HINTLoss(_GradCAMLoss):
    """HINT's ranking loss between Grad-CAM importances and human importances.

    Selvaraju et al., "Taking a HINT: Leveraging Explanations to Make Vision
    and Language Models More Grounded" (ICCV 2019), align the network's
    gradient-based importance of each image region with the importance people
    give it: for every pair of regions `(i, j)` where the human importance
    `H_i > H_j`, the loss `max(0, N_j - N_i)` penalises the network for
    ranking `j` above `i`. Here the regions are the cells of `layer`'s grid,
    `N` is the signed Grad-CAM map of the true class (eqs. 1–2 before the
    ReLU: HINT's importances are signed), and `H` is the mask of *relevant*
    pixels (where a person looks) averaged over each cell (`area_average`).

    Departures: HINT ranks object proposals of a VQA or captioning model and
    sums over pairs; here the regions are grid cells, and the sum is divided
    by the number of ordered pairs with `H_i > H_j` so that `weight` does not
    grow with the grid (0 for a mask that ranks no pair). `score` is as for
    `GradCAMMassLoss`. Memory grows with the square of the grid's cells
    (`(batch, cells, cells)` float32: 64 MB for 8 images on a 28×28 grid).

    Args:
        layer: the layer whose Grad-CAM importances are ranked.
        weight: λ, the loss's factor in the objective.
        score: `"log_probability"` (default) or `"logit"` (the paper's y^c).
        activation: `"softmax"` or `"sigmoid"`, for `score="log_probability"`.

    Raises:
        ValueError: an option out of range.

    Example:
        >>> loss = tf_gradcam.HINTLoss(layer="last_conv", weight=1.0)
        >>> guided = tf_gradcam.ExplanationGuidedModel(model, loss)  # masks: objects
    """

    mask_meaning = "relevant"

    def per_image(self, images: tf.Tensor, classes: tf.Tensor, masks: tf.Tensor) -> tf.Tensor:
        """Mean of `max(0, N_j - N_i)` over pairs with `H_i > H_j`, per image."""
        raw = self.raw_maps(images, classes)
        human = area_average(masks, tf.shape(raw)[1:3])
        n = tf.shape(raw)[0]
        network = tf.reshape(raw, [n, -1])  # (batch, cells)
        human = tf.reshape(human, [n, -1])
        ranked = tf.cast(human[:, :, None] > human[:, None, :], tf.float32)  # [i, j]: H_i > H_j
        hinge = tf.nn.relu(network[:, None, :] - network[:, :, None])  # [i, j]: N_j - N_i
        return tf.math.divide_no_nan(
            tf.reduce_sum(ranked * hinge, axis=[1, 2]), tf.reduce_sum(ranked, axis=[1, 2])
        )


class RRRLoss(ExplanationLoss):
    """Right for the Right Reasons: squared input gradients inside the irrelevant region.

    Ross, Hughes and Doshi-Velez, "Right for the Right Reasons: Training
    Differentiable Models by Constraining their Explanations" (IJCAI 2017),
    eq. 1: the "right reasons" term `Σ_d (A_d ∂/∂x_d Σ_k log ŷ_k)^2` of each
    image, where `A` is the mask of irrelevant input features (here each
    pixel's mask value, for all its channels) and `ŷ_k` the predicted
    probabilities; `weight` is their λ₁. Their λ₂ (an L2 penalty on the
    weights) is left to the model's own regularisers.

    The log-probabilities are computed from the scores before a trailing
    softmax/sigmoid (as `tf_gradcam` takes them), by log-softmax, or per-label
    log-sigmoid with `activation="sigmoid"`, which is more precise than the
    log of the model's probabilities. No feature map is needed: the loss works
    on any model, convolutional or not. Note that with two classes
    `Σ_k log ŷ_k` has zero gradient where `ŷ = (½, ½)`: the term also rewards
    uncertain predictions on the annotated images.

    Args:
        weight: λ₁, the loss's factor in the objective.
        activation: `"softmax"` (also for a model that outputs logits) or `"sigmoid"`.

    Raises:
        ValueError: an option out of range.

    Example:
        >>> guided = tf_gradcam.ExplanationGuidedModel(model, tf_gradcam.RRRLoss(weight=100.0))
    """

    def __init__(self, *, weight: float = 1.0, activation: str = "softmax") -> None:
        super().__init__(weight=weight)
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {_ACTIVATIONS}. Received: activation={activation!r}."
            )
        self.activation = activation
        self._gradient_model: GradientModel | None = None

    def _build(self, model: keras.Model) -> None:
        self._gradient_model = build_gradient_model(model, logits=True, expose_layer=False)

    def per_image(self, images: tf.Tensor, classes: tf.Tensor, masks: tf.Tensor) -> tf.Tensor:
        """`Σ_d (A_d ∂/∂x_d Σ_k log ŷ_k)^2` per image, `(batch,)` float32."""
        images = tf.cast(images, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(images)
            _, outputs = self._gradient_model(images)
            summed = tf.reduce_sum(_log_probabilities(_first_output(outputs), self.activation), -1)
        gradients = tape.gradient(summed, images)
        return tf.reduce_sum(tf.square(masks[..., None] * gradients), axis=[1, 2, 3])
