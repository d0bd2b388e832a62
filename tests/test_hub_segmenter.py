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

import tf_gradcam

keras_hub = pytest.importorskip("keras_hub")


def _segmenter() -> keras.Model:
    keras.utils.set_random_seed(0)
    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 64, 64],
        stackwise_num_blocks=[1, 1, 1],
        stackwise_num_strides=[1, 2, 2],
        block_type="basic_block",
        image_shape=(64, 64, 3),
    )
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=encoder,
        low_level_feature_key="P2",
        spatial_pyramid_pooling_key="P3",
        dilation_rates=[1, 2],
        upsampling_size=2,
    )
    return keras_hub.models.DeepLabV3ImageSegmenter(
        backbone=backbone, num_classes=3, preprocessor=None
    )


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
