"""Grad-CAM on Conv1D signals and Conv3D volumes: the CAM identity in 1-D and 3-D.

On a head that is global average pooling then a dense layer (§3.1), ∂y^c/∂A^k = W_kc / Z at
every position, so α_k = W_kc / Z and Grad-CAM's map is CAM's, Σ_k W_kc A^k / Z, in any number
of spatial axes. Heatmaps are that map resized by linear interpolation along each axis
(half-pixel centres, NumPy's np.interp here) and divided by its maximum.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

import tf_gradcam


def _signal_model() -> keras.Model:
    inputs = keras.Input((40, 2))
    x = layers.Conv1D(4, 5, strides=2, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.Conv1D(6, 3, strides=2, padding="same", activation="relu", name="features")(x)
    outputs = layers.Dense(3, name="head")(layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs)


def _volume_model() -> keras.Model:
    inputs = keras.Input((8, 10, 6, 1))
    x = layers.Conv3D(3, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.Conv3D(4, 3, strides=2, padding="same", activation="relu", name="features")(x)
    outputs = layers.Dense(2, name="head")(layers.GlobalAveragePooling3D()(x))
    return keras.Model(inputs, outputs)


def _interp(values: np.ndarray, size: int, axis: int) -> np.ndarray:
    n = values.shape[axis]
    positions = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    return np.apply_along_axis(lambda v: np.interp(positions, np.arange(n), v), axis, values)


def _cam(model: keras.Model, inputs: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(α, CAM map / Z) from the activations and the dense weights, float64."""
    a = keras.Model(model.input, model.get_layer("features").output)(inputs).numpy()
    a = a.astype(np.float64)
    z = np.prod(a.shape[1:-1])
    alpha = np.tile(model.get_layer("head").kernel.numpy()[:, c] / z, (len(a), 1))
    return alpha, np.einsum("n...k,nk->n...", a, alpha)


@pytest.mark.parametrize(
    ("build", "shape"), [(_signal_model, (5, 40, 2)), (_volume_model, (3, 8, 10, 6, 1))]
)
def test_grad_cam_equals_cam_in_one_and_three_dimensions(build, shape):
    """α = W_kc / Z and map = Σ_k α_k A^k; heatmaps = the map interpolated and scaled."""
    keras.utils.set_random_seed(3)
    model = build()
    inputs = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    result = tf_gradcam.GradCAM(model, "features")(inputs, target=1)
    alpha, raw = _cam(model, inputs, 1)
    np.testing.assert_allclose(result.weights, alpha, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(result.raw_maps, raw, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.maps, np.maximum(raw, 0), rtol=1e-4, atol=1e-6)
    heat = np.maximum(raw, 0)
    for axis, size in enumerate(shape[1:-1], start=1):
        heat = _interp(heat, size, axis)
    high = heat.reshape(len(heat), -1).max(axis=1).reshape((-1,) + (1,) * (heat.ndim - 1))
    heat = np.divide(heat, high, out=np.zeros_like(heat), where=high > 0)
    assert result.heatmaps.shape == shape[:-1]
    np.testing.assert_allclose(result.heatmaps, heat, atol=1e-5)
    assert not result.degenerate.any()


@pytest.mark.parametrize("build", [_signal_model, _volume_model])
def test_variants_keep_their_identities_in_other_dimensions(build):
    """GAP → Dense: XGrad-CAM's weights (live channels) and HiResCAM's map are Grad-CAM's."""
    keras.utils.set_random_seed(4)
    model = build()
    shape = model.input.shape[1:]
    inputs = np.random.default_rng(1).normal(size=(3, *shape)).astype(np.float32)
    plain = tf_gradcam.GradCAM(model, "features")(inputs, target=0)
    hires = tf_gradcam.HiResCAM(model, "features")(inputs, target=0)
    np.testing.assert_allclose(hires.raw_maps, plain.raw_maps, rtol=1e-4, atol=1e-6)
    x_grad = tf_gradcam.XGradCAM(model, "features")(inputs, target=0)
    a = keras.Model(model.input, model.get_layer("features").output)(inputs).numpy()
    live = a.reshape(len(a), -1, a.shape[-1]).sum(axis=1) > 0
    np.testing.assert_allclose(
        x_grad.weights, np.where(live, plain.weights, 0.0), rtol=1e-5, atol=1e-8
    )
    rows = a.reshape(len(a), -1, a.shape[-1]).astype(np.float64)
    eigen = tf_gradcam.EigenCAM(model, "features", relu=False)(inputs)
    for i in range(len(a)):
        projection = rows[i] @ np.linalg.svd(rows[i], full_matrices=False)[2][0]
        projection *= np.sign(projection @ rows[i].mean(axis=1)) or 1.0
        np.testing.assert_allclose(eigen.raw_maps[i].ravel(), projection, atol=1e-4)


def test_feature_layers_of_signal_models_are_listed():
    """layer_paths(spatial_only=True) lists the Conv1D layers of a network on signals."""
    assert tf_gradcam.layer_paths(_signal_model(), spatial_only=True)[-2:] == ["conv1", "features"]


def test_flips_mirror_the_time_axis_of_a_signal():
    """Smoothed(flips=True) on a signal: the mean of the map and the reversed copy's, reversed."""
    keras.utils.set_random_seed(5)
    model = _signal_model()
    inputs = np.random.default_rng(2).normal(size=(2, 40, 2)).astype(np.float32)
    cam = tf_gradcam.GradCAM(model, "features", relu=False)
    a = cam(inputs, target=2).raw_maps
    b = cam(inputs[:, ::-1], target=2).raw_maps[:, ::-1]
    smooth = tf_gradcam.Smoothed(cam, flips=True)(inputs, target=2)
    np.testing.assert_allclose(smooth.raw_maps, (a + b) / 2, rtol=1e-5, atol=1e-6)


def _same_length_signal_model() -> keras.Model:
    """Conv1D 'features' at the signal's own length: Score-CAM's masks need no resizing."""
    inputs = keras.Input((24, 2))
    x = layers.Conv1D(5, 3, padding="same", activation="relu", name="features")(inputs)
    outputs = layers.Dense(3, name="head")(layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs)


def test_score_cam_and_ablation_cam_on_signals_follow_their_definitions():
    """1-D: Score-CAM's masked-signal probabilities and Ablation-CAM's zeroed channels, by hand."""
    keras.utils.set_random_seed(6)
    model = _same_length_signal_model()
    x = np.random.default_rng(3).normal(size=(2, 24, 2)).astype(np.float32)
    a = keras.Model(model.input, model.get_layer("features").output)(x).numpy().astype(np.float64)
    kernel = model.get_layer("head").kernel.numpy().astype(np.float64)
    bias = model.get_layer("head").bias.numpy().astype(np.float64)
    c = 1
    score = tf_gradcam.ScoreCAM(model, "features", channel_softmax=False, baseline=None)
    result = score(x, target=c)
    for i in range(2):
        low, high = a[i].min(axis=0), a[i].max(axis=0)
        masks = np.where(high > low, (a[i] - low) / np.where(high > low, high - low, 1), 0.0)
        masked = (x[i][None] * masks.T[:, :, None]).astype(np.float32)  # (channels, 24, 2)
        logits = model.predict(masked, verbose=0).astype(np.float64)
        probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(result.weights[i], probabilities[:, c], rtol=1e-4, atol=1e-7)
    ablation = tf_gradcam.AblationCAM(model, "features")(x, target=c)
    pooled = a.mean(axis=1)  # (batch, channels)
    y = pooled @ kernel[:, c] + bias[c]
    y_k = y[:, None] - pooled * kernel[:, c]  # channel k zeroed
    np.testing.assert_allclose(ablation.weights, (y[:, None] - y_k) / y[:, None], rtol=1e-4)


@pytest.mark.parametrize("build", [_signal_model, _volume_model])
def test_guided_grad_cam_is_guided_backprop_times_the_heatmap_in_other_dimensions(build):
    """§3.2 in 1-D and 3-D: the pointwise product, the heatmap broadcast over input channels."""
    keras.utils.set_random_seed(7)
    model = build()
    shape = model.input.shape[1:]
    x = np.random.default_rng(4).normal(size=(2, *shape)).astype(np.float32)
    fused = tf_gradcam.GuidedGradCAM(model, "features")(x, target=1)
    backprop = tf_gradcam.GuidedBackprop(model)(x, target=1).gradients
    heat = tf_gradcam.GradCAM(model, "features")(x, target=1).heatmaps
    assert fused.gradients.shape == x.shape
    np.testing.assert_allclose(fused.gradients, backprop * heat[..., None], rtol=1e-5, atol=1e-8)


def test_guided_backprop_of_a_relu_free_signal_model_is_the_gradient():
    """No ReLU to modify: guided backprop equals ∂y^c/∂x from a plain tape."""
    import tensorflow as tf

    inputs = keras.Input((30, 3))
    x = layers.Conv1D(4, 5, padding="same", activation="tanh")(inputs)
    model = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)))
    signal = np.random.default_rng(5).normal(size=(2, 30, 3)).astype(np.float32)
    tensor = tf.constant(signal)
    with tf.GradientTape() as tape:
        tape.watch(tensor)
        score = model(tensor)[:, 1]
    expected = tape.gradient(score, tensor).numpy()
    result = tf_gradcam.GuidedBackprop(model)(signal, target=1).gradients
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-7)


def test_the_default_layer_of_signal_and_volume_models_is_the_last_feature_map():
    """layer=None: the last Conv1D / Conv3D map before the pooling; trailing pooling skipped."""
    assert tf_gradcam.GradCAM(_signal_model()).layer == "features"
    assert tf_gradcam.GradCAM(_volume_model()).layer == "features"
    inputs = keras.Input((40, 2))
    x = layers.Conv1D(4, 3, activation="relu", name="features")(inputs)
    x = layers.MaxPooling1D(name="pool")(x)
    model = keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling1D()(x)))
    assert tf_gradcam.GradCAM(model).layer == "features"


@pytest.mark.parametrize(("build", "count"), [(_signal_model, 10), (_volume_model, 6)])
def test_explain_dataset_streams_signals_and_volumes(build, count):
    """explain_dataset over arrays of signals / volumes: the same maps as one call, in order."""
    keras.utils.set_random_seed(8)
    model = build()
    x = np.random.default_rng(6).normal(size=(count, *model.input.shape[1:])).astype(np.float32)
    batches = []
    tf_gradcam.explain_dataset(
        model, x, layer="features", batch_size=4, verbose=0, on_batch=batches.append
    )
    streamed = np.concatenate([b.explanation.heatmaps for b in batches])
    np.testing.assert_allclose(
        streamed, tf_gradcam.GradCAM(model, "features")(x).heatmaps, rtol=1e-6, atol=1e-7
    )
