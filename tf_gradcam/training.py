"""Explanation-guided training: `fit` with an explanation loss on a few annotated images.

`ExplanationGuidedModel` wraps the user's model in a functional `keras.Model`
over the same layers and weights, whose `train_step` adds an explanation loss
(`tf_gradcam.explanation_losses`) to the compiled loss. The user compiles and
fits the wrapper as any Keras model (their optimizer, metrics, callbacks,
`tf.distribute` strategy and mixed precision); the wrapped model is trained in
place and stays a plain Keras model, saved and loaded without tf_gradcam.

Data are `(x, {"labels": y, "masks": masks})`, optionally with sample weights
as a third element; `(x, y)` trains without explanation loss. See
docs/guided_training.md.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_gradcam.errors import InputError, NonFiniteLossError, UnsupportedModelError
from tf_gradcam.explanation_losses import ExplanationLoss, label_classes, prepare_masks
from tf_gradcam.keras_adapter import is_expandable

__all__ = ["ExplanationGuidedModel"]

_TARGET_KEYS = ("labels", "masks")


class ExplanationGuidedModel(keras.Model):
    """A Keras model that trains `model` with an explanation loss added to its loss.

    Use it like the model: `compile(optimizer, loss, metrics)` then `fit`.
    Each training step computes, in one compiled function (traced once per
    input signature, not per step):

    - the compiled loss (and regularisation losses) on the whole batch, the
      model run in training mode, as Keras' own `train_step` does;
    - the explanation loss on the batch's annotated images only, the model run
      in inference mode as Grad-CAM runs it (`tf_gradcam.GradCAM`: Dropout off,
      BatchNormalization with its moving statistics), skipped by a `tf.cond`
      when the batch has no annotated image, so training with masks on 1–10%
      of the images costs little more than plain training (under XLA,
      `jit_compile=True`, every image is explained and unannotated ones
      weigh 0: XLA needs static shapes);
    - one optimizer update with the gradient of their sum.

    The explanation loss is `loss.weight` times the mean per-image loss over
    the annotated images of the global batch (over all replicas under a
    `tf.distribute` strategy, which gives the same update as one device).
    It is logged as the metric `explanation_loss` (weighted, mean over
    annotated images; `val_explanation_loss` in `evaluate` and validation),
    and `loss` is the sum of the compiled loss and the explanation loss.

    A step whose loss is NaN or infinite applies zero gradients instead of its
    own, and `fit` stops with a `NonFiniteLossError` naming the step and which
    loss went non-finite (an added callback reads the step's logs).

    Why a model wrapper: the explanation losses need the model, the images and
    the masks together, which a `keras.losses.Loss` (called with `y_true`,
    `y_pred`) never sees; a functional model over the same layers keeps
    `compile`, `fit`, callbacks (`GradCAMCallback` explains it like the wrapped
    model: same layer names) and strategies working, and adds no node to the
    user's model.

    Args:
        model: a functional or Sequential `keras.Model` with defined inputs and
            one image input `(batch, height, width, channels)`; trained in place.
        loss: an `ExplanationLoss`: `GradCAMMassLoss`, `RRRLoss`, `HINTLoss`.
        name: the wrapper's name; default `<model name>_guided`.

    Data for `fit`/`evaluate`: `(x, {"labels": y, "masks": masks})` or
    `(x, {"labels": y, "masks": masks}, sample_weight)`, where `masks` are
    `(batch, height, width)` at the images' size, `tf_gradcam.NO_MASK` (-1)
    for images without annotation (see `tf_gradcam.explanation_losses`);
    `(x, y)` trains with the compiled loss alone. `predict(x)` is the model's.

    Raises:
        UnsupportedModelError: a subclassed model, a model without defined
            inputs, or one with several inputs.
        TypeError: `loss` is not an `ExplanationLoss`.
        The errors of the loss's `build` (`LayerNotFoundError`,
        `NotSpatialError`: a Grad-CAM loss on a model without a feature map).

    Example:
        >>> loss = tf_gradcam.GradCAMMassLoss(layer="last_conv", weight=1.0, margin=8)
        >>> guided = tf_gradcam.ExplanationGuidedModel(model, loss)
        >>> guided.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
        ...                metrics=["accuracy"])
        >>> guided.fit(x, {"labels": y, "masks": masks}, epochs=20)
        >>> model.save("model.keras")  # the trained model, a plain Keras model
    """

    def __init__(self, model: keras.Model, loss: ExplanationLoss, *, name: str | None = None):
        if not isinstance(loss, ExplanationLoss):
            raise TypeError(
                "`loss` must be an explanation loss (tf_gradcam.GradCAMMassLoss, RRRLoss or "
                f"HINTLoss). Received: loss={loss!r}. The classification loss goes to compile()."
            )
        inputs = _model_inputs(model)
        super().__init__(inputs=inputs, outputs=model.outputs, name=name or f"{model.name}_guided")
        self.explained_model = model
        # A copy: the caller's loss object may be built for (called on) other models.
        self.explanation = copy.copy(loss)
        self.explanation.build(model)
        self._explanation_tracker = keras.metrics.Mean(name="explanation_loss")
        self._explanation_traces = 0

    @property
    def explanation_trace_count(self) -> int:
        """How many times the explanation loss has been traced into a step (retrace check)."""
        return self._explanation_traces

    # ------------------------------------------------------------------ the steps

    def train_step(self, data: Any) -> dict:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        labels, masks = _split_targets(y)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(
                x=x, y=labels, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            explanation = self._explanation(x, labels, masks)
            total = tf.cast(loss, tf.float32) + explanation
            scaled = self.optimizer.scale_loss(total)
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        finite = tf.math.is_finite(total)
        self.optimizer.apply([_zero_unless(finite, g) for g in gradients], variables)
        self._track_loss(total, x)
        return self.compute_metrics(x, labels, y_pred, sample_weight=sample_weight)

    def test_step(self, data: Any) -> dict:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        labels, masks = _split_targets(y)
        y_pred = self(x, training=False)
        loss = self.compute_loss(
            x=x, y=labels, y_pred=y_pred, sample_weight=sample_weight, training=False
        )
        total = tf.cast(loss, tf.float32) + self._explanation(x, labels, masks, training=False)
        self._track_loss(total, x)
        return self.compute_metrics(x, labels, y_pred, sample_weight=sample_weight)

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Any:
        """The compiled loss on the labels (the masks of `{"labels", "masks"}` set aside)."""
        labels, _ = _split_targets(y)
        return super().compute_loss(x, labels, y_pred, sample_weight, training=training)

    def compute_metrics(self, x: Any, y: Any, y_pred: Any, sample_weight: Any = None) -> dict:
        """The compiled metrics on the labels (the masks of `{"labels", "masks"}` set aside)."""
        labels, _ = _split_targets(y)
        return super().compute_metrics(x, labels, y_pred, sample_weight=sample_weight)

    def _explanation(self, x: Any, labels: Any, masks: Any, *, training: bool = True) -> tf.Tensor:
        """This replica's share of the weighted explanation loss (a float32 scalar).

        `Σ_local weight·l_n / N`, with `N` the annotated images of the global
        batch, so that the replicas' gradients sum to the gradient of the
        global mean. Updates the `explanation_loss` metric.
        """
        if masks is None:
            return tf.zeros((), tf.float32)
        if training:
            self._explanation_traces += 1  # Python: counts traces, not steps
        images = _image_input(x)
        masks, annotated = prepare_masks(masks, images)
        classes = label_classes(labels)
        if self.jit_compile:
            # XLA needs static shapes: every image is explained, unannotated ones weighted
            # 0 (their masks are all 0, so their losses and gradients are 0, never NaN).
            values = self.explanation.per_image(images, classes, masks)
            values = values * tf.cast(annotated, tf.float32)
            local = tf.reduce_sum(tf.cast(annotated, tf.int32))
        else:  # only the annotated images, and nothing for a batch without any
            indices = tf.where(annotated)[:, 0]
            local = tf.size(indices)
            values = tf.cond(
                local > 0,
                lambda: self.explanation.per_image(
                    tf.gather(images, indices),
                    tf.gather(classes, indices),
                    tf.gather(masks, indices),
                ),
                lambda: tf.zeros((0,), tf.float32),
            )
        summed = self.explanation.weight * tf.reduce_sum(values)
        local = tf.cast(local, tf.float32)
        self._explanation_tracker.update_state(
            tf.math.divide_no_nan(summed, local), sample_weight=local
        )
        context = tf.distribute.get_replica_context()
        count = local
        if context is not None and context.num_replicas_in_sync > 1:
            count = context.all_reduce(tf.distribute.ReduceOp.SUM, local)
        return tf.math.divide_no_nan(summed, count)

    def _track_loss(self, total: tf.Tensor, x: Any) -> None:
        """Update the `loss` metric with the total loss, as Keras' own steps do."""
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        batch = tf.shape(keras.tree.flatten(x)[0])[0]
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(total * replicas, sample_weight=batch)

    # ------------------------------------------------------------------ fit

    def fit(self, *args: Any, **kwargs: Any) -> keras.callbacks.History:
        """`keras.Model.fit`, with a check that stops training on a non-finite loss.

        Takes the arguments of `keras.Model.fit`.

        Returns:
            The `History` of the fit.

        Raises:
            NonFiniteLossError: a step's loss was NaN or infinite; the message
                names the step (optimizer step, epoch and batch), which loss
                (compiled or explanation) and the explanation loss's weight.
            InputError: targets that are not labels or `{"labels", "masks"}`,
                masks of the wrong rank or size.
        """
        bound = inspect.signature(keras.Model.fit).bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        arguments.update(arguments.pop("kwargs", {}))
        callbacks = arguments.get("callbacks")
        guard = _NonFiniteLossGuard(self.explanation)
        if isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks.append(guard)
        else:
            arguments["callbacks"] = [*(callbacks or []), guard]
        return super().fit(**arguments)


class _NonFiniteLossGuard(keras.callbacks.Callback):
    """Raises `NonFiniteLossError` after the first step whose loss is NaN or infinite."""

    def __init__(self, explanation: ExplanationLoss) -> None:
        super().__init__()
        self.explanation = explanation
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        total = _as_float(logs.get("loss"))
        explanation = _as_float(logs.get("explanation_loss"))
        if math.isfinite(total) and math.isfinite(explanation):
            return
        step = int(self.model.optimizer.iterations.numpy())
        where = f"optimizer step {step} (epoch {self._epoch}, batch {batch})"
        if not math.isfinite(explanation):
            cause = (
                f"the explanation loss {self.explanation!r} is {explanation}: its weight "
                f"{self.explanation.weight:g} times a per-image loss overflowed or was "
                "undefined. Lower `weight` (the losses are O(1) for the Grad-CAM losses; "
                "RRR's sum of squared input gradients can be large) or clip the gradients "
                "(e.g. optimizer=keras.optimizers.Adam(clipnorm=1.0))"
            )
        else:
            cause = (
                f"the compiled loss is {total} while the explanation loss is {explanation:g}: "
                "the data (non-finite images or labels out of range) or weights that an "
                "earlier step's large update made overflow. Lower the learning rate or "
                f"`weight` ({self.explanation.weight:g})"
            )
        raise NonFiniteLossError(
            f"Training stopped at {where}: {cause}. That step's update was not applied "
            "(its gradients were replaced by zeros)."
        )


def _as_float(value: Any) -> float:
    return 0.0 if value is None else float(np.asarray(value))


def _zero_unless(finite: tf.Tensor, gradient: Any) -> Any:
    """The gradient where the loss is finite, else zeros (also for `IndexedSlices`)."""
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        values = tf.where(finite, gradient.values, tf.zeros_like(gradient.values))
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    return tf.where(finite, gradient, tf.zeros_like(gradient))


def _split_targets(y: Any) -> tuple[Any, Any]:
    """`(labels, masks)` of `{"labels": y, "masks": m}`; `(y, None)` for plain labels."""
    if not isinstance(y, dict):
        return y, None
    if set(y) != set(_TARGET_KEYS):
        raise InputError(
            'The targets of an ExplanationGuidedModel are labels, or a dict {"labels": y, '
            f'"masks": masks}}. Received: a dict with keys {sorted(y)}.'
        )
    return y["labels"], y["masks"]


def _image_input(x: Any) -> tf.Tensor:
    flat = keras.tree.flatten(x)
    if len(flat) != 1:
        raise InputError(
            "Explanation losses take one image input; received inputs "
            f"{[tuple(t.shape) for t in flat]}."
        )
    return flat[0]


def _model_inputs(model: keras.Model) -> Any:
    """The model's symbolic inputs; an `UnsupportedModelError` when it has none or several."""
    if not isinstance(model, keras.Model) or not is_expandable(model):
        raise UnsupportedModelError(
            "ExplanationGuidedModel wraps a functional or Sequential keras.Model. Received: "
            f"model of type {type(model).__name__}. Wrap a subclassed model in a functional "
            "one: inputs = keras.Input(shape); keras.Model(inputs, model(inputs))."
        )
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise UnsupportedModelError(
            f"Model {model.name!r} has no defined inputs; build it with keras.Input(shape) "
            "as its first layer, or call it once on a batch."
        )
    if len(inputs) != 1:
        raise UnsupportedModelError(
            f"ExplanationGuidedModel trains models with one image input; model {model.name!r} "
            f"has {len(inputs)}."
        )
    return inputs
