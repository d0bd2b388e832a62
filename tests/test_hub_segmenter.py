"""A keras-hub DeepLabV3 segmenter (random weights, built from its constructors).

Its decoder resizes with shapes known only when the layer runs: the gradient
graph asks the user's layers for their output specs instead of tracing their
calls on placeholders. Its per-pixel output is the scores, not a feature map:
the default layer is the decoder's last feature map. The reference is a tape
over the backbone and the head called by hand.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_deeplabv3, make_segformer

import tf_gradcam

keras_hub = pytest.importorskip("keras_hub")


def _segmenter() -> keras.Model:
    return make_deeplabv3()


def test_deeplabv3_region_score_equals_the_tape_at_the_default_layer():
    model = _segmenter()
    x = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    region = np.zeros((64, 64), np.float32)
    region[8:40, 16:48] = 1.0

    def class_one_in_region(outputs):
        return tf.reduce_sum(outputs[..., 1] * region, axis=[1, 2])

    result = tf_gradcam.GradCAM(model)(x, target=class_one_in_region)
    assert result.layer.endswith("backbone_output_upsampling")  # not the per-pixel scores
    backbone = model.backbone
    head = model.get_layer("segmentation_output")
    with tf.GradientTape() as tape:
        features = backbone(x, training=False)
        tape.watch(features)
        score = class_one_in_region(head(features))
    gradients = tape.gradient(score, features).numpy()
    alpha = gradients.mean(axis=(1, 2))
    raw = np.einsum("bhwc,bc->bhw", features.numpy(), alpha)
    np.testing.assert_allclose(result.weights, alpha, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(result.raw_maps, raw, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(result.scores, score.numpy(), rtol=1e-5)
    assert np.abs(raw).max() > 1e-3


def test_segformer_default_is_the_decoder_map_not_the_resized_class_scores():
    """SegFormer's head: class-score conv at 1/4 resolution, then Resizing to the image.
    That conv holds the scores: the default is the decoder's fused map feeding it."""
    model = make_segformer(levels=2)
    backbone = model.backbone
    x = np.random.default_rng(1).random((2, 32, 32, 3), dtype=np.float32)
    mask = np.zeros((32, 32), np.float32)
    mask[4:20, 6:30] = 1.0

    def class_two_in_mask(outputs):
        return tf.reduce_sum(outputs[..., 2] * mask, axis=[1, 2])

    result = tf_gradcam.GradCAM(model)(x, target=class_two_in_mask)
    # the decoder's fused 8x8 map (its last activation is the backbone's output)
    assert result.layer.startswith(f"{backbone.name}/") and result.maps.shape == (2, 8, 8)
    with tf.GradientTape() as tape:
        features = backbone(x, training=False)
        tape.watch(features)
        score = class_two_in_mask(model.resizing(model.output_segmentation_head(features)))
    alpha = tape.gradient(score, features).numpy().mean(axis=(1, 2))
    np.testing.assert_allclose(result.weights, alpha, atol=1e-6, rtol=1e-4)
