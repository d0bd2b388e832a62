"""Smoothed: flips mapped back, noise averaged, targets fixed on the originals."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

import tf_gradcam
from tf_gradcam.smoothing import Smoothed


def _mirror_symmetric_model() -> keras.Model:
    """Kernels symmetric left–right, 'same' padding: f(flip x) = flip f(x)."""
    rng = np.random.default_rng(0)

    def symmetric(shape):
        kernel = rng.normal(size=shape).astype(np.float32)
        return (kernel + kernel[:, ::-1]) / 2

    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.Conv2D(5, 3, padding="same", activation="relu", name="features")(x)
    outputs = layers.Dense(3, name="head")(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    for name in ("conv1", "features"):
        layer = model.get_layer(name)
        layer.kernel.assign(symmetric(tuple(layer.kernel.shape)))
    return model


def _linear_model() -> keras.Model:
    """x → linear 1×1 conv ('features') → GAP → Dense: the raw map is linear in x."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 1, use_bias=False, name="features")(inputs)
    outputs = layers.Dense(2, use_bias=False)(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def test_flips_change_nothing_for_a_mirror_symmetric_model():
    """Equivariant model: the mirrored copy's map, mirrored back, is the map itself."""
    model = _mirror_symmetric_model()
    images = np.random.default_rng(1).random((3, 12, 12, 3), dtype=np.float32)
    cam = tf_gradcam.GradCAM(model, "features", relu=False)
    plain = cam(images, target=1)
    mirrored = cam(images[:, :, ::-1], target=1)
    np.testing.assert_allclose(mirrored.raw_maps[:, :, ::-1], plain.raw_maps, atol=1e-5)
    smooth = Smoothed(cam, flips=True)(images, target=1)
    np.testing.assert_allclose(smooth.raw_maps, plain.raw_maps, atol=1e-5)
    np.testing.assert_allclose(smooth.heatmaps, plain.heatmaps, atol=1e-5)


def test_flips_average_the_copy_mapped_back_on_an_asymmetric_model(cnn, images):
    """Ordinary model: the mean of the map and the mirrored copy's map mirrored back."""
    cam = tf_gradcam.GradCAM(cnn, "last_conv", relu=False)
    a = cam(images, target=2).raw_maps
    b = cam(images[:, :, ::-1], target=2).raw_maps[:, :, ::-1]
    assert np.abs(a - b).max() > 1e-3  # the model is not symmetric
    smooth = Smoothed(cam, flips=True)(images, target=2)
    np.testing.assert_allclose(smooth.raw_maps, (a + b) / 2, rtol=1e-5, atol=1e-6)


def test_noise_average_of_a_linear_map_is_the_map_of_the_mean_copy():
    """Raw map linear in x (α = W/Z fixed): mean over copies = map of x + mean noise."""
    model = _linear_model()
    images = np.random.default_rng(2).random((2, 8, 8, 3), dtype=np.float32)
    noise, samples = 0.2, 5
    smooth = Smoothed(
        tf_gradcam.GradCAM(model, "features", relu=False), noise=noise, samples=samples, seed=7
    )(images, target=0)
    rng = np.random.default_rng(7)
    span = images.max(axis=(1, 2, 3), keepdims=True) - images.min(axis=(1, 2, 3), keepdims=True)
    mean_copy = np.mean(
        [images + rng.normal(size=images.shape) * noise * span for _ in range(samples)], axis=0
    )
    kernel = model.get_layer("features").kernel.numpy()[0, 0].astype(np.float64)
    alpha = model.layers[-1].kernel.numpy()[:, 0].astype(np.float64) / 64
    expected = np.einsum("nijc,ck,k->nij", mean_copy.astype(np.float64), kernel, alpha)
    np.testing.assert_allclose(smooth.raw_maps, expected, rtol=1e-4, atol=1e-6)
    plain = tf_gradcam.GradCAM(model, "features", relu=False)(images, target=0)
    assert np.abs(plain.raw_maps - expected).max() > 1e-3  # the noise did change the map
    again = Smoothed(
        tf_gradcam.GradCAM(model, "features", relu=False), noise=noise, samples=samples, seed=7
    )(images, target=0)
    np.testing.assert_array_equal(again.raw_maps, smooth.raw_maps)


def test_the_target_is_resolved_on_the_original_images():
    """Predicted classes come from the clean images; every copy explains that class."""
    images = np.random.default_rng(3).normal(size=(6, 8, 8, 3)).astype(np.float32)
    cam = tf_gradcam.GradCAM(_linear_model(), "features")  # classes flip with the mean colour
    clean = cam(images)
    smooth = Smoothed(cam, noise=1.0, samples=3)(images)
    np.testing.assert_array_equal(smooth.classes, clean.classes)
    rng = np.random.default_rng(0)
    span = images.max(axis=(1, 2, 3), keepdims=True) - images.min(axis=(1, 2, 3), keepdims=True)
    copies = [(images + rng.normal(size=images.shape) * span).astype(np.float32) for _ in range(3)]
    predicted = np.stack([cam(c).classes for c in copies])
    assert (predicted != clean.classes).any()  # the noise does move some predictions
    fixed = np.mean([cam(c, target=clean.classes).raw_maps for c in copies], axis=0)
    np.testing.assert_allclose(smooth.raw_maps, fixed, rtol=1e-5, atol=1e-6)


def test_top_k_ranks_follow_the_original_ranking(cnn, images):
    """TopK: each rank's smoothed map equals smoothing that rank's class alone."""
    cam = tf_gradcam.GradCAM(cnn, "last_conv")
    smooth = Smoothed(cam, flips=True)
    top = smooth(images, target=tf_gradcam.TopK(2))
    assert top.heatmaps.shape == (4, 2, 16, 16)
    for j in range(2):
        alone = smooth(images, target=top.classes[:, j])
        np.testing.assert_allclose(top.raw_maps[:, j], alone.raw_maps, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"samples": 0}, "samples=0"),
        ({"samples": 2.5, "noise": 0.1}, "samples=2.5"),
        ({"noise": -0.1}, "noise=-0.1"),
        ({"noise": 0.0, "samples": 4}, "identical copies"),
    ],
)
def test_bad_options_name_the_fix(cnn, options, message):
    """Each bad option is refused with its value in the message."""
    with pytest.raises(ValueError, match=message):
        Smoothed(tf_gradcam.GradCAM(cnn), **options)


def test_non_cam_explainers_are_refused(cnn):
    """Pixel methods return no heatmaps to average: a clear error."""
    with pytest.raises(ValueError, match="CAM-family"):
        Smoothed(tf_gradcam.GuidedBackprop(cnn))
