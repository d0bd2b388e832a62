"""Grad-CAM's successors that change one step of it: XGrad-CAM, HiResCAM, LayerCAM.

Each is a few lines over `GradCAM` (and so over the shared engine): the
gradients are taken as in Grad-CAM, at the same layer, for the same targets,
before the softmax; only the channel weights (`channel_weights`) or the map
(`weighted_sum`) differ. The ReLU of eq. 2, the upsampling and the
normalisation are Grad-CAM's.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from tf_gradcam.gradcam import GradCAM

__all__ = ["HiResCAM", "LayerCAM", "XGradCAM"]


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
        share = tf.math.divide_no_nan(a, tf.reduce_sum(a, axis=[2, 3], keepdims=True))
        return tf.reduce_sum(share * gradients, axis=[2, 3])


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
        return tf.reduce_mean(tf.nn.relu(gradients), axis=[2, 3])

    def weighted_sum(self, activations: Any, gradients: Any, weights: Any) -> tf.Tensor:
        return tf.reduce_sum(activations[:, None] * tf.nn.relu(gradients), axis=-1)
