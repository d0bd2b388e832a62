"""Grad-CAM's successors that change one step of it.

Grad-CAM++, XGrad-CAM, HiResCAM and LayerCAM are a few lines over `GradCAM`
(and so over the shared engine): the gradients are taken as in Grad-CAM, at
the same layer, for the same targets, before the softmax; only the channel
weights (`channel_weights`) or the map (`weighted_sum`) differ. Eigen-CAM
replaces the gradients by the activations' first principal component. The
ReLU of eq. 2, the upsampling and the normalisation are Grad-CAM's.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_gradcam.errors import UnsupportedLayerError
from tf_gradcam.gradcam import GradCAM, spatial_axes
from tf_gradcam.targets import TargetSpec

__all__ = ["EigenCAM", "GradCAMPlusPlus", "HiResCAM", "LayerCAM", "XGradCAM"]


class _GradientVariant(GradCAM):
    """A Grad-CAM variant: Grad-CAM's arguments less the pooling ablations.

    Args:
        model: a Functional or Sequential `keras.Model`.
        layer: the layer to explain, as in `GradCAM`.
        relu: apply the ReLU of Grad-CAM's eq. 2.
        logits: explain the score before a trailing softmax/sigmoid.
        output: for multi-output models, which output class targets index.
        jit_compile: compile the step with XLA.

    Raises:
        The errors of `GradCAM`.
    """

    def __init__(
        self,
        model: keras.Model,
        layer: str | keras.layers.Layer | None = None,
        *,
        relu: bool = True,
        logits: bool = True,
        output: int | str | None = None,
        jit_compile: bool = False,
    ) -> None:
        super().__init__(
            model, layer, relu=relu, logits=logits, output=output, jit_compile=jit_compile
        )


class GradCAMPlusPlus(_GradientVariant):
    """Grad-CAM++ (Chattopadhyay et al., WACV 2018): pixel-weighted positive gradients.

    With the exponential score `Y^c = exp(S^c)` of the paper's §3.3 and a
    piecewise-linear network (ReLU), the higher derivatives are powers of the
    first, `∂ⁿY/∂Aⁿ = exp(S)·gⁿ` with `g = ∂S^c/∂A^k_ij`, and eq. 19 becomes

        α_ij^kc = g² / (2 g² + Σ_ab A^k_ab · g³)

    (the `exp(S)` factors cancel); the channel weights are eq. 18,
    `w_k = Σ_ij α_ij^kc ReLU(∂Y^c/∂A^k_ij)`, and the map `ReLU(Σ_k w_k A^k)`.
    `Explanation.weights` holds `w_k / exp(S^c)` = `Σ_ij α_ij ReLU(g)`: the
    factor `exp(S^c)` is positive and the same for every channel of an image,
    so maps keep their shape and heatmaps are unchanged, and it would overflow
    float32 for scores above ~88. Where `g = 0`, `α = 0`; where the
    denominator vanishes (`g < 0`, whose term `ReLU(g)` is zero anyway), `α = 0`.

    Peers: pytorch-grad-cam computes the same weights (it adds 1e-7 to the
    denominator); tf-keras-vis `GradcamPlusPlus` multiplies by `exp` of the
    model's output (a softmax probability unless the softmax is removed) and
    divides α by its spatial sum `Σ_ij α_ij` before eq. 18, as the authors'
    code does, which changes the relative weights of the channels.

    Args:
        model, layer, relu, logits, output, jit_compile: as for `GradCAM` (the
            pooling ablations do not apply).

    Raises:
        The errors of `GradCAM`.

    Example:
        >>> tf_gradcam.GradCAMPlusPlus(model, "conv5_block3_out")(images).heatmaps
    """

    def channel_weights(self, activations: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
        g2 = tf.square(gradients)
        g3 = g2 * gradients
        spatial = spatial_axes(activations, batch_axes=1)
        total = tf.reduce_sum(activations, axis=spatial, keepdims=True)[:, None]
        alpha = tf.math.divide_no_nan(g2, 2.0 * g2 + total * g3)
        return tf.reduce_sum(alpha * tf.nn.relu(gradients), axis=spatial_axes(gradients))


class XGradCAM(_GradientVariant):
    """XGrad-CAM (Fu et al., "Axiom-based Grad-CAM", BMVC 2020): share-weighted gradients.

    `α_k = Σ_ij (A^k_ij / Σ_ab A^k_ab) ∂y^c/∂A^k_ij`, the weights for which the
    map satisfies the paper's sensitivity and conservation axioms (for ReLU
    feature maps, whose activations are non-negative). A channel whose
    activations sum to zero gets weight 0; pytorch-grad-cam adds 1e-7 to the
    sum instead, which changes the weights of near-silent channels.

    Args:
        model, layer, relu, logits, output, jit_compile: as for `GradCAM` (the
            pooling ablations do not apply).

    Raises:
        The errors of `GradCAM`.

    Example:
        >>> tf_gradcam.XGradCAM(model, "conv5_block3_out")(images, target=281).heatmaps
    """

    def channel_weights(self, activations: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
        a = activations[:, None]  # (batch, 1, h, w, channels) against (batch, k, h, w, channels)
        spatial = spatial_axes(gradients)
        share = tf.math.divide_no_nan(a, tf.reduce_sum(a, axis=spatial, keepdims=True))
        return tf.reduce_sum(share * gradients, axis=spatial)


class HiResCAM(_GradientVariant):
    """HiResCAM (Draelos & Carin, 2020): the gradient times the activation, element by element.

    `map_ij = Σ_k ∂y^c/∂A^k_ij · A^k_ij`, no spatial averaging of the gradients,
    so the map shows exactly the locations whose activations the score uses
    (for a head that is linear in the feature map it equals the score's
    decomposition over positions). `Explanation.weights` holds Grad-CAM's α
    (the gradients' spatial mean) for reference; the map does not use it.

    Args:
        model, layer, relu, logits, output, jit_compile: as for `GradCAM` (the
            pooling ablations do not apply).

    Raises:
        The errors of `GradCAM`.

    Example:
        >>> tf_gradcam.HiResCAM(model)(images).maps     # (batch, h, w)
    """

    def weighted_sum(self, activations: Any, gradients: Any, weights: Any) -> tf.Tensor:
        # element-wise product and a channel sum: no (batched) matrix product
        return tf.reduce_sum(activations[:, None] * gradients, axis=-1)


class LayerCAM(_GradientVariant):
    """LayerCAM (Jiang et al., IEEE TIP 2021): positive gradients as per-location weights.

    `map_ij = ReLU(Σ_k ReLU(∂y^c/∂A^k_ij) · A^k_ij)`: each location keeps its
    own weight, so earlier, finer layers give usable maps. `Explanation.weights`
    holds the spatial mean of the positive gradients, for reference.

    Args:
        model, layer, relu, logits, output, jit_compile: as for `GradCAM` (the
            pooling ablations do not apply).

    Raises:
        The errors of `GradCAM`.

    Example:
        >>> tf_gradcam.LayerCAM(model, "conv3_block4_out")(images).heatmaps
    """

    def channel_weights(self, activations: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(tf.nn.relu(gradients), axis=spatial_axes(gradients))

    def weighted_sum(self, activations: Any, gradients: Any, weights: Any) -> tf.Tensor:
        return tf.reduce_sum(activations[:, None] * tf.nn.relu(gradients), axis=-1)


class EigenCAM(GradCAM):
    """Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): the activations' first principal component.

    With the layer's activations of one image as a matrix `O` of `h·w` rows
    and `C` columns and its singular value decomposition `O = U Σ Vᵀ`, the map
    is the projection on the first right singular vector, `O v₁ = σ₁ u₁`
    (the paper's eq. 7, without centring). No gradients and no target: the map
    is the same for every class (`scores` and `classes` still report the
    target's), and it works where the score has no gradient path.

    A singular vector is defined up to its sign; the sign is fixed so that the
    map agrees with the mean activation over channels `m = Σ_k A^k / C`:
    `Σ_ij (O v₁)_ij m_ij ≥ 0`. For non-negative (post-ReLU) activations the
    first singular vector can be taken non-negative (Perron–Frobenius), and
    this rule picks that choice, so the map is non-negative everywhere.
    `Explanation.weights` holds `±v₁`, the weight of each channel in the map.

    Peers: pytorch-grad-cam subtracts each channel's spatial mean before the
    SVD (`center=True` here reproduces it) and does not fix the sign.

    Args:
        model: a Functional or Sequential `keras.Model`.
        layer: the layer to explain, as in `GradCAM`; it needs two or more channels.
        center: subtract each channel's spatial mean before the SVD.
        relu: apply a ReLU to the projection (as Grad-CAM's eq. 2).
        logits: report scores before a trailing softmax/sigmoid.
        output: for multi-output models, which output the reported scores come from.
        jit_compile: compile the step with XLA.

    Raises:
        UnsupportedLayerError: the layer has one channel (its principal
            component is the channel itself).
        The errors of `GradCAM`.

    Example:
        >>> tf_gradcam.EigenCAM(model, "conv5_block3_out")(images).heatmaps
    """

    def __init__(
        self,
        model: keras.Model,
        layer: str | keras.layers.Layer | None = None,
        *,
        center: bool = False,
        relu: bool = True,
        logits: bool = True,
        output: int | str | None = None,
        jit_compile: bool = False,
    ) -> None:
        self.center = center
        super().__init__(
            model, layer, relu=relu, logits=logits, output=output, jit_compile=jit_compile
        )
        if self.built:
            self._check_channels()

    def _check_channels(self) -> None:
        axis = 1 if self.gradient_model.channels_first else -1
        keras_model = self.gradient_model.keras_model
        if keras_model is None:  # a subclassed model: the captured output's spec
            activations = self.gradient_model.activation_spec
        else:
            activations = keras_model.outputs[0]
        if activations.shape[axis] == 1:
            raise UnsupportedLayerError(
                f"Eigen-CAM needs a layer with two or more channels; layer {self.layer!r} "
                f"has one (output shape {tuple(activations.shape)}), whose principal "
                "component is the channel itself. Choose a layer with more channels, or "
                "use Grad-CAM."
            )

    def _explain_batch(self, inputs: Any, classes: tf.Tensor, spec: TargetSpec) -> dict:
        self._check_channels()
        activations, _, scores, resolved = self.forward(inputs, classes, spec)
        shape = tf.shape(activations)
        spatial = activations.shape[1:-1]
        positions = -1 if None in spatial else int(np.prod(spatial))  # static: SVD's gradient
        rows = tf.reshape(activations, [shape[0], positions, shape[-1]])  # needs it
        mean = tf.reduce_mean(rows, axis=2)  # the channel mean m, (batch, h·w)
        if self.center:
            rows = rows - tf.reduce_mean(rows, axis=1, keepdims=True)
        singular, u, v = tf.linalg.svd(rows, full_matrices=False)
        projection = u[:, :, 0] * singular[:, :1]  # O v1 = σ1 u1, (batch, h·w)
        agreement = tf.reduce_sum(projection * mean, axis=1, keepdims=True)
        sign = tf.where(agreement < 0, -1.0, 1.0)
        raw = tf.reshape(projection * sign, shape[:-1])
        weights = v[:, :, 0] * sign
        k = tf.shape(scores)[1]
        raw = tf.repeat(raw[:, None], k, axis=1)  # one map for every target
        weights = tf.repeat(weights[:, None], k, axis=1)
        return self.finish_maps(inputs, raw, weights, scores, resolved)
