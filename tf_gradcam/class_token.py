"""The class-token shortcut: a ViT classifier's last block run for the class token only.

A keras-hub `ViTImageClassifier(pooling="token")` reads one token of its last
block's output, the class token. Every operation of a transformer block is
per token except attention, whose output for the class token needs only the
class token's query and every token's keys and values. So the last block can
be computed for the class token alone: layer norm of all tokens (the keys and
values), attention with one query, the residual, the second layer norm and the
MLP on one token. The scores are the same numbers (up to float summation
order), and Grad-CAM at an earlier block (the default layer is the input of the
last block, docs/transformers.md) skips about (tokens - 1) / tokens of the last
block's MLP and query work, forward and backward.

The shortcut is taken only for models of exactly this shape (checked from their
attributes: `pooling == "token"`, a `backbone` whose encoder holds a list of
blocks with `layer_norm_1`, `mha`, `dropout`, `layer_norm_2`, `mlp`, and the head
`intermediate_layer` (optional) → dropout → `output_dense`), and it is
verified when the gradient model is built: on a probe batch its scores and
activations must equal the model's own call; otherwise the model is run as it is,
with a warning. Nothing of the user's model is changed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_gradcam.capture import SubclassedGradientModel, watch

__all__ = ["ClassTokenGradientModel", "ClassTokenTail", "ViTParts", "class_token_tail", "vit_parts"]

_BLOCK_PARTS = ("layer_norm_1", "mha", "dropout", "layer_norm_2", "mlp")
#: Probe tolerance, relative to the largest magnitude of the compared tensor.
_PROBE_RTOL = 1e-4


@dataclass(frozen=True)
class ViTParts:
    """The layers of a class-token ViT classifier, as its call uses them.

    Attributes:
        embedding: the backbone's layers before the encoder, as a functional model
            over the backbone's own graph (no layer is called to build it).
        encoder: the encoder layer (its `dropout` runs first, its `layer_norm` last).
        blocks: the encoder's blocks, in order.
        head: the classifier's layers after the class token, in order.
    """

    embedding: keras.Model
    encoder: Any
    blocks: tuple[Any, ...]
    head: tuple[Any, ...]


@dataclass(frozen=True)
class ClassTokenTail:
    """What the shortcut runs: the classifier's parts and the explained block.

    Attributes:
        parts: the classifier's layers (`ViTParts`).
        index: the block whose output is explained (never the last one).
    """

    parts: ViTParts
    index: int


def vit_parts(model: keras.Model) -> ViTParts | None:
    """The parts of a keras-hub class-token ViT classifier, or `None` for other models.

    Args:
        model: any model.

    Returns:
        A `ViTParts` when the model has the shape the module docstring names.

    Example:
        >>> len(vit_parts(classifier).blocks)
        12
    """
    if getattr(model, "pooling", None) != "token":
        return None
    backbone = getattr(model, "backbone", None)
    layers = getattr(backbone, "layers", None)
    if not isinstance(backbone, keras.Model) or not layers:
        return None
    encoders = [
        candidate
        for candidate in layers
        if isinstance(getattr(candidate, "encoder_layers", None), (list, tuple))
        and hasattr(candidate, "layer_norm")
        and hasattr(candidate, "dropout")
    ]
    if len(encoders) != 1 or encoders[0] is not layers[-1]:
        return None
    encoder = encoders[0]
    blocks = tuple(encoder.encoder_layers)
    if not blocks or not all(hasattr(block, part) for block in blocks for part in _BLOCK_PARTS):
        return None
    # the head's dropout is the identity at inference (and `model.dropout` is its rate)
    head = tuple(
        part
        for part in (
            getattr(model, "intermediate_layer", None),
            getattr(model, "output_dense", None),
        )
        if isinstance(part, keras.layers.Layer)
    )
    if head[-1:] != (getattr(model, "output_dense", None),):
        return None
    try:
        embedding = keras.Model(backbone.input, encoder.input, name=f"{backbone.name}_embedding")
    except (AttributeError, ValueError, TypeError):
        return None
    return ViTParts(embedding, encoder, blocks, head)


def class_token_tail(model: keras.Model, layer: Any) -> ClassTokenTail | None:
    """The shortcut's parts when `model` is a class-token ViT classifier, else `None`.

    Args:
        model: the model to explain.
        layer: the explained layer object (a block of the encoder, for the shortcut).

    Returns:
        A `ClassTokenTail`, or `None` when the model is not of that shape or the
        layer is not a block before the last one.

    Example:
        >>> tail = class_token_tail(classifier, classifier.backbone.layers[-1].encoder_layers[10])
        >>> tail.index
        10
    """
    parts = vit_parts(model)
    if parts is None:
        return None
    index = next((i for i, block in enumerate(parts.blocks) if block is layer), None)
    if index is None or index == len(parts.blocks) - 1:
        return None
    return ClassTokenTail(parts, index)


class ClassTokenGradientModel(SubclassedGradientModel):
    """`SubclassedGradientModel` whose forward pass takes the class-token shortcut.

    Same interface and results as the model run as it is (see the module
    docstring); falls back to running it as it is when the probe check fails.

    Attributes:
        tail: the shortcut's parts, or `None` after a failed probe check.
    """

    def __init__(self, model: keras.Model, layer: Any, *, tail: ClassTokenTail, **kwargs: Any):
        self.tail: ClassTokenTail | None = tail
        super().__init__(model, layer, **kwargs)
        self._probe(tuple(kwargs["sample_shape"]), kwargs["dtype"])

    def _forward(self, inputs: Any) -> tuple[Any, Any]:
        tail = self.tail
        if tail is None:
            return super()._forward(inputs)
        parts = tail.parts
        x = parts.embedding(inputs, training=False)
        x = parts.encoder.dropout(x, training=False)
        activations = None
        for i, block in enumerate(parts.blocks[:-1]):
            x = block(x, training=False)
            if i == tail.index:
                activations = x
                watch(activations)
        last = parts.blocks[-1]
        normed = last.layer_norm_1(x)
        attended = last.mha(normed[:, :1], normed, training=False)
        token = x[:, :1] + last.dropout(attended, training=False)
        token = token + last.mlp(last.layer_norm_2(token), training=False)
        outputs = parts.encoder.layer_norm(token)[:, 0]
        for layer in parts.head:
            outputs = layer(outputs, training=False)
        return activations, outputs

    def _probe(self, sample_shape: tuple[int | None, ...], dtype: str) -> None:
        """Compare the shortcut with the model's own call on a fixed random batch."""
        shape = (2, *(8 if size is None else size for size in sample_shape[1:]))
        probe = tf.constant(np.random.default_rng(0).uniform(0.0, 1.0, shape), dtype=dtype)
        shortcut = self._forward(probe)
        tail, self.tail = self.tail, None
        reference = self._forward(probe)
        self.tail = tail
        for got, want in zip(shortcut, reference, strict=True):
            got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
            scale = max(float(np.max(np.abs(want))), 1.0)
            if got.shape != want.shape or not np.all(np.abs(got - want) <= _PROBE_RTOL * scale):
                warnings.warn(
                    f"Model {self.model.name!r}: the class-token shortcut (its last block run "
                    "for the class token only) did not reproduce the model's own outputs on "
                    "a probe batch, so the model is run as it is (a little slower). "
                    "Please report this with your keras-hub version.",
                    stacklevel=4,
                )
                self.tail = None
                return
