"""Image layouts: channels-first models, and models with several images of different sizes."""

from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import tf_gradcam
from tf_gradcam.layerwise import MultiLayerGradCAM


def _cnn(data_format: str | None, activation: str | None = "softmax") -> keras.Model:
    """Conv(relu) → Conv → ReLU → GAP → Dense; `data_format=None` follows the Keras config."""
    shape = (
        (3, 16, 16)
        if (data_format or keras.config.image_data_format()) == ("channels_first")
        else (16, 16, 3)
    )
    inputs = keras.Input(shape)
    x = layers.Conv2D(6, 3, activation="relu", data_format=data_format, name="c1")(inputs)
    x = layers.Conv2D(5, 3, data_format=data_format, name="c2")(x)
    x = layers.ReLU(name="r2")(x)
    x = layers.GlobalAveragePooling2D(data_format=data_format)(x)
    head_init = keras.initializers.RandomUniform(-0.5, 1.0)
    outputs = layers.Dense(3, activation=activation, kernel_initializer=head_init)(x)
    return keras.Model(inputs, outputs)


def _require_nchw_convolutions(model: keras.Model, images: np.ndarray) -> None:
    """Skip where TensorFlow itself cannot run the channels-first model.

    TensorFlow's own CPU Conv2D implements only NHWC; NCHW runs on the CPU through
    oneDNN (on by default on AVX512_VNNI/BF16/AMX CPUs; TensorFlow's oneDNN switch
    turns it on elsewhere) or on a GPU. Without them the model fails before any explanation
    (docs/known-issues.md); CI runs these tests in its oneDNN-on pass.
    """
    try:
        model(images[:1])
    except tf.errors.UnimplementedError as error:
        if "NHWC" not in str(error):
            raise
        pytest.skip("TensorFlow's CPU kernels without oneDNN cannot run NCHW convolutions")


@pytest.fixture
def channels_last_images() -> np.ndarray:
    return np.random.default_rng(0).random((3, 16, 16, 3), dtype=np.float32)


def _first(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("how", ["layer argument", "keras config"])
def test_channels_first_model_equals_its_channels_last_twin(how, channels_last_images):
    """Same weights, images transposed: the same heatmaps, maps, α and guided pixels."""
    reference = _cnn("channels_last")
    if how == "layer argument":
        model = _cnn("channels_first")
    else:
        keras.config.set_image_data_format("channels_first")
        try:
            model = _cnn(None)
        finally:
            keras.config.set_image_data_format("channels_last")
    assert model.get_layer("c1").data_format == "channels_first"
    model.set_weights(reference.get_weights())  # conv kernels do not depend on the layout
    images = _first(channels_last_images)
    _require_nchw_convolutions(model, images)
    np.testing.assert_allclose(model(images), reference(channels_last_images), rtol=1e-5)

    targets = [0, 2, 1]
    for layer in ("c2", "c1", "r2"):
        ours = tf_gradcam.GradCAM(model, layer)(images, target=targets)
        theirs = tf_gradcam.GradCAM(reference, layer)(channels_last_images, target=targets)
        assert ours.heatmaps.shape == (3, 16, 16) and not theirs.degenerate.any()
        np.testing.assert_allclose(ours.weights, theirs.weights, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(ours.maps, theirs.maps, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ours.heatmaps, theirs.heatmaps, atol=1e-5)

    guided = tf_gradcam.GuidedGradCAM(model, "c2")(images, target=targets)
    expected = tf_gradcam.GuidedGradCAM(reference, "c2")(channels_last_images, target=targets)
    assert guided.gradients.shape == images.shape  # the images' own layout
    np.testing.assert_allclose(guided.gradients, _first(expected.gradients), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(guided.backprop, _first(expected.backprop), rtol=1e-4, atol=1e-7)


def test_channels_first_weights_match_a_tape_reference(channels_last_images):
    """α of a channels-first layer: the spatial mean of ∂y/∂A over axes 2 and 3 (eq. 1)."""
    model = _cnn("channels_first", activation=None)
    images = _first(channels_last_images)
    _require_nchw_convolutions(model, images)
    probe = keras.Model(model.input, [model.get_layer("c2").output, model.output])
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        activations, logits = probe(x)
        score = tf.reduce_sum(logits[:, 1])
    grads = tape.gradient(score, activations).numpy()  # (n, channels, h, w)
    alpha = grads.mean(axis=(2, 3))
    result = tf_gradcam.GradCAM(model, "c2")(images, target=1)
    np.testing.assert_allclose(result.weights, alpha, rtol=1e-5, atol=1e-8)
    raw = np.einsum("nkhw,nk->nhw", activations.numpy(), alpha)
    np.testing.assert_allclose(result.raw_maps, raw, rtol=1e-5, atol=1e-6)


def test_channels_first_wrong_channels_names_axis_1(channels_last_images):
    """The channel check reads axis 1 of a channels-first image and says so."""
    model = _cnn("channels_first")
    with pytest.raises(tf_gradcam.InputError, match="3 channels on axis 1"):  # before running
        tf_gradcam.GradCAM(model, "c2")(_first(channels_last_images)[:, :1])


def _two_images() -> keras.Model:
    """A 16×16 and a 32×32 image, each through its own convolution, scored together."""
    small = keras.Input((16, 16, 3), name="small")
    large = keras.Input((32, 32, 3), name="large")
    a = layers.Conv2D(4, 3, strides=2, activation="relu", name="small_conv")(small)
    b = layers.Conv2D(4, 3, strides=2, activation="relu", name="large_conv")(large)
    pooled = layers.Concatenate()(
        [layers.GlobalAveragePooling2D()(a), layers.GlobalAveragePooling2D()(b)]
    )
    head_init = keras.initializers.RandomUniform(0.1, 1.0)
    return keras.Model([small, large], layers.Dense(2, kernel_initializer=head_init)(pooled))


def _upsampled(maps: np.ndarray, size: int) -> np.ndarray:
    up = np.stack([cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR) for m in maps])
    return up / up.max(axis=(1, 2), keepdims=True)


def test_each_layer_is_sized_after_the_image_it_sees():
    """Two images of different sizes: a layer's heatmaps take the size of its own input."""
    model = _two_images()
    rng = np.random.default_rng(1)
    images = [rng.random((2, 16, 16, 3), np.float32), rng.random((2, 32, 32, 3), np.float32)]
    for layer, size in (("small_conv", 16), ("large_conv", 32)):
        result = tf_gradcam.GradCAM(model, layer)(images, target=1)
        assert result.heatmaps.shape == (2, size, size)
        np.testing.assert_allclose(result.heatmaps, _upsampled(result.maps, size), atol=1e-5)
    both = MultiLayerGradCAM(model, ["small_conv", "large_conv"])(images, target=1)
    assert both["small_conv"].heatmaps.shape == (2, 16, 16)
    assert both["large_conv"].heatmaps.shape == (2, 32, 32)
    np.testing.assert_allclose(
        both["large_conv"].heatmaps, _upsampled(both["large_conv"].maps, 32), atol=1e-5
    )
