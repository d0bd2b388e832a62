"""Attention rollout and gradient-weighted attention for ViT classifiers.

Grad-CAM explains one layer; a Vision Transformer mixes its tokens in every
block's attention. Two explanations follow the class token through all of them:

- **Attention rollout** (Abnar & Zuidema, 2020, eq. 1-2): each block's attention
  probabilities averaged over the heads, with the residual connection added as
  half an identity, `Â_l = 0.5 A_l + 0.5 I` (rows renormalised), multiplied
  through the blocks, `R = Â_L ··· Â_1`; the class token's row of `R` over the
  patch tokens is the map. It does not depend on the class.
- **Gradient-weighted attention** (Chefer, Gur & Wolf, 2021, "Generic
  Attention-model Explainability", eq. 5-6): each block's attention weighted by
  the gradient of the class score with respect to it and rectified,
  `Ā_l = E_h[(∇A_l ⊙ A_l)^+]`, accumulated as `R ← R + Ā_l R` from `R = I`; the
  class token's row over the patches, without its identity part, is the map.
  It is class-specific, like Grad-CAM.

The attention probabilities are read without changing the model: the forward
pass is the classifier's own, written out block by block (`tf_gradcam.class_token`
finds the parts) with each block's `MultiHeadAttention` called with Keras'
public `return_attention_scores=True`. When the explainer is built, that
forward pass is checked against the model's own call on a probe batch; a
model of another shape is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_gradcam.class_token import ViTParts, vit_parts
from tf_gradcam.errors import InputError, TargetError, UnsupportedModelError
from tf_gradcam.image import normalize_maps, upsample_maps
from tf_gradcam.tokens import token_layout

__all__ = ["AttentionExplanation", "AttentionRollout"]

_PROBE_RTOL = 1e-4


@dataclass(frozen=True)
class AttentionExplanation:
    """What `AttentionRollout` returns, one row per image.

    Attributes:
        heatmaps: `(batch, height, width)` float32 in [0, 1], the maps upsampled
            bilinearly to the images and divided by their maximum.
        maps: `(batch, rows, columns)` the class token's relevance of each patch.
        classes: `(batch,)` the explained classes (the predicted ones when no
            target is given); for plain rollout, the predicted classes.
        scores: `(batch,)` their scores, before any softmax of the head.
    """

    heatmaps: np.ndarray
    maps: np.ndarray
    classes: np.ndarray
    scores: np.ndarray


class AttentionRollout:
    """Attention rollout, or gradient-weighted attention, of a keras-hub ViT classifier.

    Args:
        model: a keras-hub `ViTImageClassifier` with `pooling="token"` (random
            or trained weights; its preprocessor is not applied).
        gradients: `False` for attention rollout (Abnar & Zuidema), `True` for
            gradient-weighted attention (Chefer et al.), which is class-specific.

    Raises:
        UnsupportedModelError: the model is not a class-token ViT classifier of
            the shape `tf_gradcam.class_token` knows, or its written-out forward
            pass does not reproduce the model's outputs.

    Example:
        >>> rollout = AttentionRollout(vit_classifier, gradients=True)
        >>> result = rollout(images, target=3)
        >>> result.heatmaps.shape  # (batch, height, width)
    """

    def __init__(self, model: keras.Model, *, gradients: bool = False) -> None:
        parts = vit_parts(model)
        if parts is None:
            raise UnsupportedModelError(
                f"Model {getattr(model, 'name', model)!r} is not a class-token Vision "
                "Transformer classifier (keras-hub ViTImageClassifier with pooling='token'), "
                "the one kind whose attention AttentionRollout reads. Explain other models "
                "with tf_gradcam.GradCAM at a token layer (docs/transformers.md). "
                f"Received: model of type {type(model).__name__}."
            )
        self.model = model
        self.gradients = bool(gradients)
        self._parts: ViTParts = parts
        self._rows_columns: tuple[int, int] | None = None
        self._step = tf.function(self._explain, reduce_retracing=True)
        self._checked = False

    # ---------------------------------------------------------------- forward

    def _forward(self, images: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """The classifier's forward pass: `(logits, attention probabilities per block)`."""
        parts = self._parts
        x = parts.embedding(images, training=False)
        x = parts.encoder.dropout(x, training=False)
        attentions = []
        for block in parts.blocks:
            normed = block.layer_norm_1(x)
            attended, probabilities = block.mha(
                normed, normed, return_attention_scores=True, training=False
            )
            attentions.append(probabilities)
            x = x + block.dropout(attended, training=False)
            x = x + block.mlp(block.layer_norm_2(x), training=False)
        outputs = parts.encoder.layer_norm(x)[:, 0]
        for layer in parts.head[:-1]:
            outputs = layer(outputs, training=False)
        dense = parts.head[-1]
        logits = tf.matmul(outputs, dense.kernel)  # before the head's activation
        if dense.use_bias:
            logits = logits + dense.bias
        return logits, attentions

    def _explain(self, images: tf.Tensor, classes: tf.Tensor) -> tuple[tf.Tensor, ...]:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(images)
            logits, attentions = self._forward(images)
            for probabilities in attentions:
                tape.watch(probabilities)
            predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
            classes = tf.where(classes < 0, predicted, classes)
            scores = tf.gather(logits, classes, axis=1, batch_dims=1)
        tokens = tf.shape(attentions[0])[-1]
        identity = tf.eye(tokens, batch_shape=[tf.shape(images)[0]])
        relevance = identity
        if self.gradients:
            grads = tape.gradient(scores, attentions)
            for probabilities, gradient in zip(attentions, grads, strict=True):
                weighted = tf.reduce_mean(tf.nn.relu(gradient * probabilities), axis=1)
                relevance = relevance + tf.matmul(weighted, relevance)
        else:
            for probabilities in attentions:
                mixed = 0.5 * tf.reduce_mean(probabilities, axis=1) + 0.5 * identity
                mixed = mixed / tf.reduce_sum(mixed, axis=-1, keepdims=True)
                relevance = tf.matmul(mixed, relevance)
        # the class token's row; its identity part sits in its own column, dropped below
        return relevance[:, 0], logits, classes, scores

    # ---------------------------------------------------------------- call

    def __call__(self, images: Any, target: int | Any | None = None) -> AttentionExplanation:
        """The maps of a batch of images.

        Args:
            images: `(batch, height, width, channels)` as the model takes them.
            target: `None` (the predicted class), one class index, or one per
                image. Plain rollout does not depend on it (reported only).

        Returns:
            An `AttentionExplanation`.

        Raises:
            InputError: images that are not a 4-D batch the model takes.
            TargetError: a class index out of range or a list of the wrong length.
        """
        images = tf.convert_to_tensor(images, self.model.input.dtype)
        if images.shape.rank != 4 or tuple(images.shape[1:]) != tuple(self.model.input.shape[1:]):
            raise InputError(
                "AttentionRollout needs a batch of images shaped like the model's input "
                f"{tuple(self.model.input.shape)}. Received: images of shape {tuple(images.shape)}."
            )
        classes = self._classes(target, int(images.shape[0]))
        if not self._checked:
            self._check(images)
        row, _, classes, scores = self._step(images, classes)
        size = (int(images.shape[1]), int(images.shape[2]))
        layout = token_layout(
            int(row.shape[-1]),
            size,
            layers=self._parts.embedding.layers,
            where=f"The attention of model {self.model.name!r}",
        )
        maps = tf.reshape(row[:, layout.prefix :], (-1, *layout.grid))
        heatmaps, _ = normalize_maps(upsample_maps(maps, size))
        return AttentionExplanation(
            heatmaps=heatmaps.numpy(),
            maps=maps.numpy(),
            classes=classes.numpy(),
            scores=scores.numpy(),
        )

    def _classes(self, target: Any, batch: int) -> tf.Tensor:
        count = int(self._parts.head[-1].units)
        if target is None:
            return tf.fill((batch,), -1)
        values = np.atleast_1d(np.asarray(target))
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise TargetError(
                "target must be None, a class index or one index per image. "
                f"Received: target={target!r}."
            )
        if values.size == 1:
            values = np.repeat(values, batch)
        if values.size != batch or values.min() < 0 or values.max() >= count:
            raise TargetError(
                f"target must hold {batch} class indices in [0, {count}). Received: "
                f"target={target!r}."
            )
        return tf.constant(values, tf.int32)

    def _check(self, images: tf.Tensor) -> None:
        """The written-out forward pass against the model's own call, on two of the images."""
        probe = images[:2]
        logits, _ = self._forward(probe)
        outputs = self.model(probe, training=False)
        dense = self._parts.head[-1]
        activation = keras.activations.get(dense.activation)
        ours = np.asarray(activation(logits), np.float64)
        want = np.asarray(outputs, np.float64)
        scale = max(float(np.max(np.abs(want))), 1.0)
        if ours.shape != want.shape or not np.all(np.abs(ours - want) <= _PROBE_RTOL * scale):
            raise UnsupportedModelError(
                f"Model {self.model.name!r}: its blocks do not compute layer norm → attention → "
                "residual → layer norm → MLP → residual as keras-hub's ViTEncoderBlock does (the "
                "written-out forward pass gave other outputs), so its attention cannot be "
                "rolled out. Explain it with tf_gradcam.GradCAM at a token layer."
            )
        self._checked = True
