"""Image–text similarity as a target: which region made the image match a caption.

A dual encoder (CLIP, SigLIP, or any pair of an image tower and a text tower)
maps an image to an embedding `v` and a caption to an embedding `t` of the
same width `d`, and scores the pair by their cosine similarity, usually
scaled by a learned temperature (CLIP: `exp(logit_scale) · cos`, SigLIP adds
a bias). Grad-CAM explains any differentiable score (§3 of the paper); here
the score is

    y = scale · cos(v, t) = scale · v·t / (‖v‖ ‖t‖)

for a fixed text embedding `t`, and the explained model is the *image tower*
alone: a Keras model mapping images to embeddings `(batch, d)`. Text
embeddings are computed once beforehand (e.g. with the dual encoder's text
tower) and held as a constant.

The cosine is the natural y: it is what a dual encoder ranks captions by, and
it is bounded and independent of the embeddings' lengths. A positive `scale`
(CLIP's temperature) multiplies the scores, the weights α and the signed
maps, and leaves the normalised heatmaps unchanged; a bias (SigLIP) has no
gradient and changes nothing but the score, so it is not taken.

`image_tower(backbone)` builds that model for a keras-hub `CLIPBackbone` or
`SigLIPBackbone` from the backbone's own layers (shared weights, nothing
copied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_gradcam.errors import TargetError, UnsupportedModelError
from tf_gradcam.targets import _select_output

__all__ = ["SimilarityTarget", "image_tower"]


def _text_matrix(value: Any, what: str) -> np.ndarray:
    """Check a text embedding, `(d,)` or `(batch, d)`; return it float64, rows of unit length."""
    if isinstance(value, tf.Tensor):
        value = value.numpy()
    elif hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()  # a keras.Variable
    array = np.asarray(value)
    if array.dtype.kind not in "iuf":
        raise TargetError(
            f"{what}: `text_embedding` must be a numeric array, (d,) for every image or "
            f"(batch, d) one per image. Received an array of dtype {array.dtype}."
        )
    if array.ndim not in (1, 2) or array.size == 0:
        raise TargetError(
            f"{what}: `text_embedding` must be (d,), one caption for every image, or "
            f"(batch, d), one per image. Received shape {array.shape}."
        )
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise TargetError(f"{what}: `text_embedding` holds non-finite values (NaN or inf).")
    rows = array.reshape((-1, array.shape[-1]))
    norms = np.linalg.norm(rows, axis=-1)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        where = "" if array.ndim == 1 else f" (row {int(zero[0])})"
        raise TargetError(
            f"{what}: `text_embedding` is all zero{where}: its direction, and so the "
            "cosine similarity, is undefined."
        )
    unit = rows / norms[:, None]
    if array.ndim == 1 or unit.shape[0] == 1:  # (d,) or (1, d): one caption for all
        return unit[0]
    return unit


@dataclass(frozen=True, eq=False)
class SimilarityTarget:
    """Cosine similarity between the model's image embedding and a fixed text embedding.

    For a dual encoder's image tower, a model mapping images to embeddings
    `v` of shape `(batch, d)`, this target is

        y = scale · cos(v, t) = scale · (v / ‖v‖) · (t / ‖t‖)

    with `t` the text embedding: "which region made the model match this
    caption". Both sides are normalised (the text once, at construction; the
    image in the graph, so its derivative includes the normalisation), so the
    score is the similarity a dual encoder ranks captions by. Grad-CAM then
    runs unchanged: `α_k = mean_ij ∂y/∂A^k_ij`, map `ReLU(Σ_k α_k A^k)`.

    Since the cosine does not change when `v` is scaled, its gradient is
    orthogonal to `v`: the map shows what moves the image's *direction*
    toward the caption's, positive where the features pull toward it and
    negative where they pull away (for a tower that is linear in the
    explained features, such as global average pooling and a projection
    without bias, the signed map sums to exactly zero).

    Being a callable target, it works with every method (`GradCAM`, the CAM
    family, `GuidedGradCAM`, `Smoothed`, `MultiLayerGradCAM`), with
    `GradCAMCallback(target=...)` and `explain_dataset(target=...)`;
    `Explanation.classes` is then `None`. Compiled steps are cached per
    target object: build it once per caption and reuse it.

    Args:
        text_embedding: the caption's embedding, `(d,)` for every image, or
            `(batch, d)` one per image (`(1, d)` counts as one for all). Any
            length (it is normalised); finite and not all zero.
        scale: a positive factor on the cosine, e.g. CLIP's temperature
            `exp(logit_scale)` to get the backbone's logits as `scores`.
            Heatmaps do not depend on it. Default 1: the cosine.
        output: for models with several outputs, the position (or, for dict
            outputs, the key) of the `(batch, d)` image embeddings; default
            the first.

    Raises:
        TargetError: a text embedding that is not numeric, not `(d,)` or
            `(batch, d)`, non-finite or all zero, or a `scale` that is not a
            positive finite number (at construction); an output that is not
            `(batch, d)` or of another width than the text embedding (when
            called, naming both widths).
        tf.errors.InvalidArgumentError: when the step runs, an image whose
            embedding is all zero or non-finite (the cosine is undefined; the
            message gives the images' indices), or per-image text embeddings
            whose count is not the batch size.

    Example:
        >>> tower = tf_gradcam.similarity.image_tower(clip_backbone)  # images -> (batch, d)
        >>> text = clip_backbone.get_text_embeddings(token_ids)[0]    # "a red circle"
        >>> cam = tf_gradcam.GradCAM(tower, "clip_vision_encoder/encoder_block_0")
        >>> cam(images, target=tf_gradcam.SimilarityTarget(text)).heatmaps
    """

    text_embedding: Any
    scale: float = 1.0
    output: int | str | None = None

    def __post_init__(self) -> None:
        what = type(self).__name__
        unit = _text_matrix(self.text_embedding, what)
        scale = self.scale
        valid = isinstance(scale, (int, float, np.integer, np.floating)) and not isinstance(
            scale, bool
        )
        if not valid or not math.isfinite(float(scale)) or float(scale) <= 0:
            raise TargetError(
                f"{what}: `scale` must be a positive finite number (e.g. CLIP's "
                f"exp(logit_scale)). Received: scale={scale!r}."
            )
        object.__setattr__(self, "_text", tf.constant(unit, tf.float32))

    @property
    def width(self) -> int:
        """The embedding width d the text embedding has."""
        return int(self._text.shape[-1])

    def __repr__(self) -> str:
        text = self._text
        shown = f"<{self.width}-d>"
        if text.shape.rank == 2:
            shown = f"<{text.shape[0]} per image, {self.width}-d>"
        extra = "" if self.scale == 1.0 else f", scale={float(self.scale):.4g}"
        extra += "" if self.output is None else f", output={self.output!r}"
        return f"{type(self).__name__}(text_embedding={shown}{extra})"

    def __call__(self, outputs: Any) -> Any:
        """Return the `(batch,)` scaled cosine similarities to the text embedding."""
        what = type(self).__name__
        embeddings = tf.convert_to_tensor(_select_output(outputs, self.output, what))
        if embeddings.shape.rank != 2:
            raise TargetError(
                f"{what} needs image embeddings of shape (batch, d), the output of a dual "
                f"encoder's image tower. Received an output of shape "
                f"{tuple(embeddings.shape)}. For a transformer's token sequence, explain a "
                "model that pools and projects it (for keras-hub CLIP and SigLIP, "
                "tf_gradcam.similarity.image_tower(backbone)); for a model with several "
                "outputs choose the embeddings with `output=`."
            )
        width = embeddings.shape[-1]
        if width is not None and width != self.width:
            raise TargetError(
                f"{what}: the text embedding has width {self.width} but the model's image "
                f"embeddings have width {width} (output shape {tuple(embeddings.shape)}). "
                "Embed the text with the same dual encoder's text tower (and projection), "
                "or explain the image tower that ends in the shared embedding space."
            )
        # Every later op, the gradients' included, reads `v` after the checks: their
        # message is the error, not another op's shape mismatch or a NaN map.
        v = tf.cast(embeddings, tf.float32)
        with tf.control_dependencies(self._checks(v)):
            v = tf.identity(v)
        cosine = tf.reduce_sum(v * self._text, axis=-1) / tf.norm(v, axis=-1)
        return cosine * float(self.scale)

    def _checks(self, v: Any) -> list:
        """Graph checks: per-image count, width unknown when traced, embeddings of no direction."""
        what = type(self).__name__
        checks = []
        if self._text.shape.rank == 2:
            checks.append(
                tf.debugging.assert_equal(
                    tf.shape(self._text)[0],
                    tf.shape(v)[0],
                    message=f"{what}: `text_embedding` gives one row per image but the batch "
                    "size differs (Score-CAM and Ablation-CAM score copies of the images: "
                    "give them one (d,) text embedding)",
                )
            )
        if v.shape[-1] is None:
            checks.append(
                tf.debugging.assert_equal(
                    tf.shape(v)[-1],
                    self.width,
                    message=f"{what}: the model's image embeddings and the text embedding "
                    f"(width {self.width}) differ in width",
                )
            )
        norms = tf.norm(v, axis=-1)
        good = tf.logical_and(tf.math.is_finite(norms), norms > 0)
        checks.append(
            tf.debugging.Assert(
                tf.reduce_all(good),
                [
                    f"{what}: the image embedding is all zero or non-finite for the images "
                    "at these batch positions, so its cosine similarity is undefined:",
                    tf.where(tf.logical_not(good))[:, 0],
                ],
                name="similarity_embedding_check",
            )
        )
        return checks


def image_tower(backbone: keras.Model, *, name: str | None = None) -> keras.Model:
    """The image tower of a keras-hub dual encoder: images → embeddings `(batch, d)`.

    Wraps the backbone's own vision encoder, pooling and projection (CLIP:
    `vision_encoder` → class token → `vision_projection`; SigLIP: the vision
    encoder, whose attention-pooling head gives the embedding) in a
    functional model taking the images alone. The layers are the backbone's:
    weights are shared, nothing is copied. Its embeddings are those the
    backbone's head compares with the text embeddings
    (`backbone.get_text_embeddings(token_ids)`).

    The blocks inside the vision encoder are graph nodes of the nested
    encoder, named by path: `"clip_vision_encoder/encoder_block_0"` for CLIP
    (`tf_gradcam.layer_paths(tower)` lists them). With CLIP's class-token
    pooling, explain a block before the last one: the last block's patch
    tokens do not reach the class token (docs/transformers.md).

    Args:
        backbone: a keras-hub `CLIPBackbone` or `SigLIPBackbone` (any model
            with `vision_encoder.image_shape` and `get_vision_embeddings`).
        name: the model's name; default `"<backbone name>_image_tower"`.

    Returns:
        A `keras.Model` with one input `"images"` and the embeddings as output.

    Raises:
        UnsupportedModelError: `backbone` has no vision encoder to wrap.

    Example:
        >>> tower = image_tower(clip_backbone)
        >>> tower(images).shape  # (batch, projection_dim)
    """
    encoder = getattr(backbone, "vision_encoder", None)
    shape = getattr(encoder, "image_shape", None)
    embed = getattr(backbone, "get_vision_embeddings", None)
    if encoder is None or shape is None or not callable(embed):
        raise UnsupportedModelError(
            f"image_tower needs a keras-hub dual encoder (CLIPBackbone, SigLIPBackbone): a "
            "model with `vision_encoder.image_shape` and `get_vision_embeddings(images)`. "
            f"Received {type(backbone).__name__}. For another dual encoder build "
            "keras.Model(images, image_embeddings) from its layers."
        )
    images = keras.Input(tuple(shape), name="images")
    embeddings = embed(images)
    return keras.Model(images, embeddings, name=name or f"{backbone.name}_image_tower")
