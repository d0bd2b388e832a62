"""XGrad-CAM, HiResCAM and LayerCAM against their equations, in closed form on a tiny model.

The model's head after the explained layer is nonlinear (1×1 conv, tanh → GAP →
Dense), so ∂z_c/∂A_ijk = Σ_m (1 − B²_ijm) K2[k, m] W[m, c] / Z varies over
space and between images: averaging, share-weighting and element-wise products
of the gradients all give different maps, and each is computed here in NumPy.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

import tf_gradcam
from tf_gradcam.cams import HiResCAM, LayerCAM, XGradCAM


def _model() -> keras.Model:
    """x (8×8×3) → 3×3/2 conv, ReLU ('features') → 1×1 conv, tanh ('hidden') → GAP → Dense(3)."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(5, 3, strides=2, padding="same", activation="relu", name="features")(inputs)
    spread = keras.initializers.RandomNormal(stddev=1.5)
    x = layers.Conv2D(4, 1, activation="tanh", kernel_initializer=spread, name="hidden")(x)
    outputs = layers.Dense(3, name="head")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def _closed_form(model: keras.Model, images: np.ndarray, c: int):
    """Activations A (n, h, w, k) and ∂z_c/∂A (n, h, w, k), float64."""
    probe = keras.Model(
        model.input, [model.get_layer("features").output, model.get_layer("hidden").output]
    )
    a, b = (t.numpy().astype(np.float64) for t in probe(images))
    k2 = model.get_layer("hidden").kernel.numpy()[0, 0].astype(np.float64)
    w = model.get_layer("head").kernel.numpy()[:, c].astype(np.float64)
    return a, ((1.0 - b**2) * w) @ k2.T / (a.shape[1] * a.shape[2])


@pytest.fixture
def case():
    keras.utils.set_random_seed(5)
    model = _model()
    images = np.random.default_rng(6).normal(size=(4, 8, 8, 3)).astype(np.float32)
    a, g = _closed_form(model, images, 2)
    assert (g > 0).any() and (g < 0).any()  # signed, spatially varying gradients
    return model, images, a, g


def test_xgradcam_weights_are_activation_share_weighted_gradients(case):
    model, images, a, g = case
    total = a.sum(axis=(1, 2), keepdims=True)
    share = np.divide(a, total, out=np.zeros_like(a), where=total != 0)
    alpha = (share * g).sum(axis=(1, 2))
    result = XGradCAM(model, "features")(images, target=2)
    np.testing.assert_allclose(result.weights, alpha, rtol=1e-5, atol=1e-9)
    raw = np.einsum("nijk,nk->nij", a, alpha)
    np.testing.assert_allclose(result.raw_maps, raw, rtol=1e-5, atol=1e-7)
    plain = tf_gradcam.GradCAM(model, "features")(images, target=2)
    assert np.abs(plain.weights - alpha).max() > 1e-3 * np.abs(alpha).max()


def test_hirescam_map_is_the_element_wise_product_summed_over_channels(case):
    model, images, a, g = case
    result = HiResCAM(model, "features", relu=False)(images, target=2)
    raw = (a * g).sum(axis=-1)
    np.testing.assert_allclose(result.raw_maps, raw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.weights, g.mean(axis=(1, 2)), rtol=1e-5, atol=1e-9)
    # not Grad-CAM's map: the gradients vary over space
    grad_cam = np.einsum("nijk,nk->nij", a, g.mean(axis=(1, 2)))
    assert np.abs(grad_cam - raw).max() > 1e-2 * np.abs(raw).max()
    rectified = HiResCAM(model, "features")(images, target=2)
    np.testing.assert_allclose(rectified.maps, np.maximum(raw, 0), rtol=1e-5, atol=1e-7)


def test_layercam_map_uses_positive_gradients_per_location(case):
    model, images, a, g = case
    result = LayerCAM(model, "features")(images, target=2)
    raw = (a * np.maximum(g, 0)).sum(axis=-1)
    np.testing.assert_allclose(result.raw_maps, raw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.maps, np.maximum(raw, 0), rtol=1e-5, atol=1e-7)
    assert np.abs((a * g).sum(axis=-1) - raw).max() > 1e-3  # negative gradients were dropped


@pytest.mark.parametrize("method", [XGradCAM, HiResCAM, LayerCAM])
def test_variants_inherit_targets_and_compilation(case, method):
    """TopK maps equal per-class runs; no retrace across batch sizes and classes."""
    model, images, _, _ = case
    cam = method(model, "features")
    top = cam(images, target=tf_gradcam.TopK(2))
    for j in range(2):
        alone = cam(images, target=top.classes[:, j])
        np.testing.assert_allclose(top.raw_maps[:, j], alone.raw_maps, rtol=1e-5, atol=1e-7)
    warm = cam.trace_count
    cam(images[:1], target=1)
    cam(images[:3], target=[0, 1, 2])
    assert cam.trace_count == warm


def test_on_a_gap_dense_head_xgradcam_and_hirescam_equal_gradcam(images):
    """∂y_c/∂A = W[:, c] / Z everywhere (§3.1): share weights, element-wise sums change nothing."""
    from conftest import make_cnn

    model = make_cnn(activation=None)
    plain = tf_gradcam.GradCAM(model, "last_conv")(images, target=1)
    x_grad = XGradCAM(model, "last_conv")(images, target=1)
    hi_res = HiResCAM(model, "last_conv")(images, target=1)
    features = keras.Model(model.input, model.get_layer("last_conv").output)(images).numpy()
    silent = features.sum(axis=(1, 2)) == 0  # a dead ReLU channel: weight 0 by definition
    assert silent.any() and not silent.all()
    expected = np.where(silent, 0.0, plain.weights)
    np.testing.assert_allclose(x_grad.weights, expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(hi_res.raw_maps, plain.raw_maps, rtol=1e-5, atol=1e-7)
