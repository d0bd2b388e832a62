"""Grad-CAM++, XGrad-CAM, HiResCAM, LayerCAM and Eigen-CAM against their equations.

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
from tf_gradcam.cams import EigenCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM


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


def test_gradcam_plus_plus_weights_follow_eq_19_with_the_exponential_score(case):
    """α = g²/(2g² + Σ_ab A·g³), w_k = Σ_ij α ReLU(g) (eq. 18–19, exp(S) divided out)."""
    model, images, a, g = case
    total = a.sum(axis=(1, 2), keepdims=True)
    denominator = 2 * g**2 + total * g**3
    alpha = np.divide(g**2, denominator, out=np.zeros_like(g), where=denominator != 0)
    weights = (alpha * np.maximum(g, 0)).sum(axis=(1, 2))
    result = GradCAMPlusPlus(model, "features")(images, target=2)
    np.testing.assert_allclose(result.weights, weights, rtol=1e-4, atol=1e-9)
    raw = np.einsum("nijk,nk->nij", a, weights)
    np.testing.assert_allclose(result.raw_maps, raw, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.maps, np.maximum(raw, 0), rtol=1e-4, atol=1e-7)
    # not Grad-CAM's weights, nor the spatial sum of ReLU(g)
    assert np.abs(result.weights - g.mean(axis=(1, 2))).max() > 1e-2 * np.abs(weights).max()
    assert np.abs(result.weights - np.maximum(g, 0).sum(axis=(1, 2))).max() > 1e-3


def test_gradcam_plus_plus_on_a_gap_dense_head_weights_channels_by_relu_of_w(images):
    """Constant g = W_kc/Z: α = 1/(2 + Σ_ab A·g) and w_k = Z·α·ReLU(g), by hand."""
    from conftest import make_cnn

    model = make_cnn(activation=None)
    a = keras.Model(model.input, model.get_layer("last_conv").output)(images).numpy()
    z = a.shape[1] * a.shape[2]
    g = model.layers[-1].kernel.numpy()[:, 1] / z  # (channels,)
    total = a.sum(axis=(1, 2))  # (batch, channels)
    denominator = 2 + total * g
    expected = np.where(g > 0, z * np.maximum(g, 0) / np.where(g > 0, denominator, 1), 0.0)
    result = GradCAMPlusPlus(model, "last_conv")(images, target=1)
    np.testing.assert_allclose(result.weights, expected, rtol=1e-4, atol=1e-9)


def test_eigencam_is_the_projection_on_the_first_right_singular_vector(case):
    """map = O v₁ (NumPy SVD), sign chosen so the map agrees with the channel mean."""
    model, images, a, _ = case
    n, h, w, c = a.shape
    result = EigenCAM(model, "features", relu=False)(images, target=2)
    for i in range(n):
        rows = a[i].reshape(h * w, c)
        _, _, vt = np.linalg.svd(rows, full_matrices=False)
        projection = rows @ vt[0]
        if projection @ rows.mean(axis=1) < 0:
            projection, v1 = -projection, -vt[0]
        else:
            v1 = vt[0]
        np.testing.assert_allclose(result.raw_maps[i], projection.reshape(h, w), atol=1e-4)
        np.testing.assert_allclose(result.weights[i], v1, atol=1e-4)
        # post-ReLU activations: the whole map is non-negative (Perron–Frobenius)
        assert (result.raw_maps[i] >= -1e-5).all()
    # class-agnostic: another target, the same map
    other = EigenCAM(model, "features", relu=False)(images, target=0)
    np.testing.assert_allclose(other.raw_maps, result.raw_maps, atol=1e-6)


def test_eigencam_sign_rule_holds_for_signed_activations():
    """Signed activations: every map agrees with the channel mean, where the raw SVD sign varies."""
    import tensorflow as tf

    inputs = keras.Input((16, 16, 5))
    identity = keras.initializers.Constant(np.eye(5)[None, None])
    features = layers.Conv2D(5, 1, use_bias=False, kernel_initializer=identity, name="features")
    model = keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling2D()(features(inputs))))
    images = np.random.default_rng(0).normal(size=(16, 16, 16, 5)).astype(np.float32)
    rows = images.reshape(16, 256, 5)  # the activations are the images themselves
    singular, u, _ = tf.linalg.svd(rows, full_matrices=False)
    raw_sign = np.sign(np.einsum("np,np->n", u[:, :, 0] * singular[:, :1], rows.mean(axis=2)))
    assert (raw_sign < 0).any() and (raw_sign > 0).any()  # the rule has work to do
    result = EigenCAM(model, "features", relu=False)(images)
    for i in range(16):
        projection = rows[i] @ np.linalg.svd(rows[i], full_matrices=False)[2][0]
        if projection @ rows[i].mean(axis=1) < 0:
            projection = -projection
        np.testing.assert_allclose(result.raw_maps[i].ravel(), projection, atol=1e-4)


def test_eigencam_center_subtracts_channel_means_first(case):
    """center=True projects the centred matrix (pytorch-grad-cam's variant)."""
    model, images, a, _ = case
    _, h, w, c = a.shape
    result = EigenCAM(model, "features", relu=False, center=True)(images)
    rows = a[0].reshape(h * w, c)
    centred = rows - rows.mean(axis=0)
    projection = centred @ np.linalg.svd(centred, full_matrices=False)[2][0]
    if projection @ rows.mean(axis=1) < 0:
        projection = -projection
    np.testing.assert_allclose(result.raw_maps[0], projection.reshape(h, w), atol=1e-4)


def test_eigencam_needs_no_gradient_path_and_refuses_one_channel():
    """A score cut off from the layer still gets Eigen-CAM; gradient methods say why not."""
    inputs = keras.Input((8, 8, 3))
    features = layers.Conv2D(4, 3, activation="relu", name="features")(inputs)
    cut = layers.Lambda(lambda t: keras.ops.stop_gradient(t), name="cut")(features)
    outputs = layers.Dense(2)(layers.GlobalAveragePooling2D()(cut))
    model = keras.Model(inputs, outputs)
    images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    assert np.isfinite(EigenCAM(model, "features")(images).heatmaps).all()
    with pytest.raises(tf_gradcam.NoGradientError, match="eigencam"):
        GradCAMPlusPlus(model, "features")(images)

    one = keras.Model(inputs, layers.Conv2D(1, 3, name="single")(inputs))
    with pytest.raises(tf_gradcam.UnsupportedLayerError, match=r"one.*channel"):
        EigenCAM(one, "single")


@pytest.mark.parametrize("method", [GradCAMPlusPlus, XGradCAM, HiResCAM, LayerCAM, EigenCAM])
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
