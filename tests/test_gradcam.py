"""The Grad-CAM engine against the paper's equations and independent computations."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_cnn
from keras import layers

import tf_gradcam
from tf_gradcam import GradCAM, TopK, explain
from tf_gradcam.image import normalize_maps, upsample_maps


def _features(model: keras.Model, name: str, images: np.ndarray) -> np.ndarray:
    """Activations of a top-level layer, computed by an independent sub-model."""
    return keras.Model(model.input, model.get_layer(name).output)(images).numpy()


def test_cam_identity_weights_are_dense_kernel_over_z(images):
    """§3.1: on GAP→Dense, α_k^c = W[k, c] / Z and Grad-CAM equals CAM up to 1/Z."""
    model = make_cnn(activation=None)
    result = GradCAM(model, "last_conv")(images, target=[0, 1, 2, 1])
    kernel = model.get_layer("head").kernel.numpy()
    features = _features(model, "last_conv", images)
    z = features.shape[1] * features.shape[2]
    expected_alpha = kernel[:, result.classes].T / z
    np.testing.assert_allclose(result.weights, expected_alpha, rtol=1e-5, atol=1e-9)
    cam = np.einsum("nhwk,nk->nhw", features, kernel[:, result.classes].T)
    np.testing.assert_allclose(result.raw_maps * z, cam, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.maps, np.maximum(result.raw_maps, 0), atol=0)


def test_cam_identity_heatmap_is_normalised_upsampled_cam(images):
    """The heatmap is the rectified CAM map, bilinearly upsampled, divided by its maximum."""
    model = make_cnn(activation=None)
    result = GradCAM(model, "last_conv")(images, target=2)
    kernel = model.get_layer("head").kernel.numpy()
    cam = np.maximum(
        np.einsum("nhwk,k->nhw", _features(model, "last_conv", images), kernel[:, 2]), 0
    )
    up = tf.image.resize(cam[..., None], (16, 16), method="bilinear").numpy()[..., 0]
    expected = up / up.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(result.heatmaps, expected, rtol=1e-5, atol=1e-6)
    assert result.heatmaps.dtype == np.float32
    np.testing.assert_allclose(result.heatmaps.max(axis=(1, 2)), 1.0, rtol=1e-6)


def test_weights_match_finite_differences(images):
    """α_k is the spatial mean of ∂y^c/∂A^k, checked by central finite differences."""
    inputs = keras.Input((8, 8, 4))
    x = layers.Conv2D(3, 3, padding="same", activation="tanh", name="mid")(inputs)
    x = layers.Flatten()(x)
    outputs = layers.Dense(2, activation="tanh")(x)
    head = keras.Model(inputs, outputs)
    image_in = keras.Input((10, 10, 3))
    a = layers.Conv2D(4, 3, activation="tanh", name="features")(image_in)
    model = keras.Model(image_in, head(a))
    x0 = np.random.default_rng(1).random((1, 10, 10, 3), np.float32)
    result = GradCAM(model, "features")(x0, target=1)

    a0 = _features(model, "features", x0).astype(np.float64)
    eps = 1e-2
    fd = np.zeros_like(a0)
    for index in np.ndindex(a0.shape):
        plus, minus = a0.copy(), a0.copy()
        plus[index] += eps
        minus[index] -= eps
        batch = np.concatenate([plus, minus]).astype(np.float32)
        y = head(batch).numpy()[:, 1].astype(np.float64)
        fd[index] = (y[0] - y[1]) / (2 * eps)
    np.testing.assert_allclose(result.weights[0], fd[0].mean(axis=(0, 1)), rtol=2e-3, atol=2e-5)


def _pattern_model() -> keras.Model:
    """A hand-built detector: the 'last' conv fires only where a plus-shaped pattern sits."""
    kernel = -np.ones((3, 3, 1, 1), np.float32)
    kernel[1, :, 0, 0] = 1.0
    kernel[:, 1, 0, 0] = 1.0  # plus sign: 5 positive taps, 4 negative
    inputs = keras.Input((20, 20, 1))
    detector = layers.Conv2D(1, 3, padding="same", activation="relu", name="detector")
    x = detector(inputs)
    pooled = layers.GlobalAveragePooling2D()(x)
    dense = layers.Dense(2, name="head")
    outputs = dense(pooled)
    model = keras.Model(inputs, outputs)
    detector.set_weights([kernel, np.array([-4.0], np.float32)])
    dense.set_weights([np.array([[1.0, -1.0]], np.float32), np.zeros(2, np.float32)])
    return model


def _plus_image(row: int, col: int) -> np.ndarray:
    image = np.zeros((20, 20, 1), np.float32)
    image[row, col - 1 : col + 2] = 1.0
    image[row - 1 : row + 2, col] = 1.0
    return image


@pytest.mark.parametrize("where", [(5, 5), (14, 9), (10, 16)])
def test_planted_pattern_moves_the_peak(where):
    """On a hand-built plus detector the map is nonzero only at the planted plus's centre."""
    model = _pattern_model()
    result = GradCAM(model, "detector")(_plus_image(*where)[None], target=0)
    peak = np.unravel_index(np.argmax(result.maps[0]), result.maps[0].shape)
    assert peak == where
    assert np.count_nonzero(result.maps[0]) == 1  # conv response 5 - 4 = 1 only at the centre
    hot = np.unravel_index(np.argmax(result.heatmaps[0]), (20, 20))
    assert hot == where  # same size: upsampling is the identity
    counter = GradCAM(model, "detector")(_plus_image(*where)[None], target=1)
    assert counter.degenerate[0] and not counter.heatmaps.any()


def test_softmax_head_gives_same_maps_as_linear_head(images):
    """The engine differentiates pre-softmax scores: softmax and linear heads agree exactly."""
    linear = make_cnn(activation=None, name="linear")
    softmax = make_cnn(activation="softmax", name="softmax")
    softmax.set_weights(linear.get_weights())
    inputs = keras.Input((16, 16, 3))
    separate = keras.Model(inputs, layers.Softmax()(linear(inputs)), name="separate")
    activation = keras.Model(inputs, layers.Activation("softmax")(linear(inputs)), name="act")
    reference = GradCAM(linear)(images, target=[0, 1, 2, 0])
    for model in (softmax, separate, activation):
        result = GradCAM(model)(images, target=[0, 1, 2, 0])
        np.testing.assert_allclose(result.raw_maps, reference.raw_maps, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(result.scores, reference.scores, rtol=1e-6)


def test_logits_false_scores_after_softmax(images):
    """With logits=False the target score is the probability itself."""
    model = make_cnn()
    result = GradCAM(model, logits=False)(images, target=1)
    np.testing.assert_allclose(result.scores, model(images).numpy()[:, 1], rtol=1e-6)


def test_counterfactual_is_relu_of_negated_sum(images):
    """§3.3: negating the gradients gives ReLU(−Σ α A) with the plain α."""
    model = make_cnn()
    plain = GradCAM(model)(images, target=1)
    counter = GradCAM(model, counterfactual=True)(images, target=1)
    np.testing.assert_allclose(counter.weights, -plain.weights, rtol=1e-6)
    np.testing.assert_allclose(counter.maps, np.maximum(-plain.raw_maps, 0), rtol=1e-5, atol=1e-7)


def test_pooling_max_and_absolute_gradients(images):
    """Appendix B ablations: max-pooled and absolute gradients, checked against ∂y/∂A."""
    model = make_cnn(activation=None)
    features = _features(model, "last_conv", images)
    # y = W[:, c]·mean(A): ∂y/∂A_ij^k = W[k, c] / Z at every position
    z = features.shape[1] * features.shape[2]
    w = model.get_layer("head").kernel.numpy()[:, 0]
    maxed = GradCAM(model, pooling="max")(images, target=0)
    np.testing.assert_allclose(maxed.weights, np.tile(w / z, (4, 1)), rtol=1e-5)
    absolute = GradCAM(model, absolute_gradients=True)(images, target=0)
    np.testing.assert_allclose(absolute.weights, np.tile(np.abs(w) / z, (4, 1)), rtol=1e-5)


def test_no_relu_keeps_signed_map_and_min_max_heatmap(images):
    """relu=False (B.2.1): maps equal the signed sum, heatmaps are min-max scaled."""
    model = make_cnn()
    result = GradCAM(model, relu=False)(images, target=1)
    np.testing.assert_allclose(result.maps, result.raw_maps)
    assert (result.raw_maps < 0).any()
    np.testing.assert_allclose(result.heatmaps.min(axis=(1, 2)), 0.0, atol=1e-7)
    np.testing.assert_allclose(result.heatmaps.max(axis=(1, 2)), 1.0, atol=1e-6)


def test_batch_equals_one_by_one(images):
    """Weights are per image: a batch gives the maps of its images explained alone."""
    model = make_cnn()
    cam = GradCAM(model)
    batch = cam(images)
    assert not batch.degenerate.any()
    for i in range(len(images)):
        single = cam(images[i : i + 1])
        np.testing.assert_allclose(single.weights[0], batch.weights[i], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(single.heatmaps[0], batch.heatmaps[i], rtol=1e-5, atol=1e-6)


def test_predicted_class_is_argmax(images, cnn):
    """The default target is each image's top-1 class."""
    result = GradCAM(cnn)(images)
    np.testing.assert_array_equal(result.classes, np.argmax(cnn(images).numpy(), axis=1))


def test_top_k_equals_per_class_runs(images, cnn):
    """TopK(k): k maps per image, each equal to the map of that class explained alone."""
    cam = GradCAM(cnn)
    top = cam(images, target=TopK(2))
    assert top.heatmaps.shape == (4, 2, 16, 16) and top.weights.shape == (4, 2, 5)
    assert not top.degenerate.any()
    order = np.argsort(-cnn(images).numpy(), axis=1)[:, :2]
    np.testing.assert_array_equal(top.classes, order)
    for j in range(2):
        alone = cam(images, target=order[:, j])
        np.testing.assert_allclose(top.heatmaps[:, j], alone.heatmaps, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(top.scores[:, j], alone.scores, rtol=1e-6)


def test_callable_target_equals_class_target(images):
    """A callable score is differentiated like a class score: logit difference is linear."""
    model = make_cnn(activation=None)
    cam = GradCAM(model)
    diff = cam(images, target=lambda out: out[:, 2] - out[:, 0])
    a, b = cam(images, target=2), cam(images, target=0)
    np.testing.assert_allclose(diff.weights, a.weights - b.weights, rtol=1e-5, atol=1e-8)
    assert diff.classes is None


def test_no_retrace_on_repeated_calls(images, cnn):
    """After warm-up, calls with other batch sizes and classes reuse the compiled step."""
    cam = GradCAM(cnn)
    cam(images)
    cam(images, target=1)
    warm = cam.trace_count
    for n in (1, 2, 3, 4):
        cam(images[:n])
        cam(images[:n], target=[2] * n)
    assert cam.trace_count == warm == 2


def test_new_callable_each_call_is_bounded_and_warned(images, cnn, monkeypatch):
    """Inline lambdas recompile; the explainer keeps a bounded number of steps and warns once."""
    monkeypatch.setattr(tf_gradcam.engine, "_MAX_COMPILED_STEPS", 4)
    cam = GradCAM(cnn)
    limit = 4
    with pytest.warns(RuntimeWarning, match="define the target function once"):
        for c in range(limit + 2):
            cam(images[:1], target=lambda out, c=c: out[:, c % 3])
    assert len(cam._functions) == limit


def test_explain_function_reuses_the_engine(images, cnn):
    """explain() equals GradCAM()(...) and does not rebuild between calls."""
    a = explain(cnn, images, target=1, layer="conv1")
    b = GradCAM(cnn, "conv1")(images, target=1)
    np.testing.assert_allclose(a.heatmaps, b.heatmaps, rtol=1e-6)
    assert a.layer == "conv1"
    explain(cnn, images, target=2, layer="conv1")
    (cam,) = [c for key, c in tf_gradcam.methods._CACHE.items() if key[0] == id(cnn)]
    assert cam.model is cnn and cam.trace_count == 1


def test_explain_cache_is_bounded_and_releases_models(images, monkeypatch):
    """explain() keeps at most a few explainers, so models it saw can be garbage-collected."""
    import gc
    import weakref

    monkeypatch.setattr(tf_gradcam.methods, "_CACHE_SIZE", 2)
    refs = []
    for i in range(3):
        model = make_cnn(name=f"m{i}")
        explain(model, images[:1])
        refs.append(weakref.ref(model))
        del model
    gc.collect()
    assert len(tf_gradcam.methods._CACHE) <= tf_gradcam.methods._CACHE_SIZE
    assert refs[0]() is None  # the oldest model is no longer held by the cache


def test_all_zero_map_is_finite_and_flagged():
    """When no region supports the class the map is zero, not NaN, and warns once."""
    model = make_cnn(activation=None)
    head = model.get_layer("head")
    kernel = np.full(head.kernel.shape, -1.0, np.float32)  # relu features ≥ 0 → α < 0
    head.set_weights([kernel, np.zeros(3, np.float32)])
    cam = GradCAM(model)
    x = np.random.default_rng(2).random((2, 16, 16, 3), np.float32)
    with pytest.warns(RuntimeWarning, match="all zero"):
        result = cam(x, target=0)
    assert np.isfinite(result.heatmaps).all() and not result.heatmaps.any()
    assert result.degenerate.all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cam(x, target=0)  # warned once only


def test_normalize_maps_keeps_zero_maps_zero():
    """normalize_maps divides by the max, leaves zero maps zero and cleans non-finite values."""
    maps = np.stack([np.zeros((3, 3)), np.arange(9.0).reshape(3, 3), np.full((3, 3), np.nan)])
    scaled, degenerate = normalize_maps(maps)
    np.testing.assert_allclose(scaled[1], np.arange(9.0).reshape(3, 3) / 8.0, rtol=1e-7)
    assert not np.asarray(scaled)[[0, 2]].any()
    np.testing.assert_array_equal(degenerate, [True, False, True])


def test_upsample_maps_matches_opencv_bilinear():
    """upsample_maps is the half-pixel bilinear resize OpenCV computes (INTER_LINEAR)."""
    import cv2

    m = np.random.default_rng(3).random((5, 7)).astype(np.float32)
    ours = np.asarray(upsample_maps(m[None], (20, 28)))[0]
    theirs = cv2.resize(m, (28, 20), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_mixed_precision_gives_float32_maps(images):
    """Under mixed_float16 the maps are float32 and equal the float32 model's to fp16 precision."""
    reference_model = make_cnn(activation=None)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = make_cnn(activation=None, name="mixed")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.set_weights(reference_model.get_weights())
    result = GradCAM(model)(images, target=1)
    reference = GradCAM(reference_model)(images, target=1)
    assert result.heatmaps.dtype == np.float32 and result.weights.dtype == np.float32
    assert not reference.degenerate.any()
    np.testing.assert_allclose(result.heatmaps, reference.heatmaps, atol=2e-2)


def test_compute_is_differentiable_and_works_in_graph_mode(images, cnn):
    """compute() returns tensors: usable inside tf.function and under a GradientTape."""
    cam = GradCAM(cnn)
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        total = tf.reduce_sum(cam.compute(x, target=1).raw_maps)
    grad = tape.gradient(total, x)
    assert grad is not None and float(tf.reduce_sum(tf.abs(grad))) > 0

    @tf.function
    def in_graph(batch):
        return cam.compute(batch, target=1).heatmaps

    np.testing.assert_allclose(in_graph(x).numpy(), cam(images, target=1).heatmaps, atol=1e-6)


def test_jit_compile_gives_the_same_maps(images, cnn):
    """jit_compile=True (XLA) computes the same maps, weights and top-k classes."""
    plain, xla = GradCAM(cnn), GradCAM(cnn, jit_compile=True)
    for target in (None, TopK(2)):
        a, b = plain(images, target), xla(images, target)
        np.testing.assert_allclose(b.heatmaps, a.heatmaps, atol=1e-5)
        np.testing.assert_allclose(b.weights, a.weights, rtol=1e-5, atol=1e-8)
        np.testing.assert_array_equal(b.classes, a.classes)


# ------------------------------------------- a head whose gradients vary over space


def _tanh_head_model(classes: int = 2, activation: str | None = None) -> keras.Model:
    """x (8×8×3) → 3×3/2 conv, tanh ('features') → 1×1 conv, tanh ('hidden') → GAP → Dense.

    The head after 'features' is nonlinear, so ∂y/∂A varies over space and from
    image to image (unlike GAP → Dense, where it is W/Z everywhere).
    """
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(5, 3, strides=2, padding="same", activation="tanh", name="features")(inputs)
    # large weights: the tanh saturates unevenly, so the head is far from linear
    spread = keras.initializers.RandomNormal(stddev=1.5)
    x = layers.Conv2D(4, 1, activation="tanh", kernel_initializer=spread, name="hidden")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(classes, activation=activation, name="head")(x)
    return keras.Model(inputs, outputs)


def _logit_gradients(model: keras.Model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Activations A (n, h, w, k) and ∂z_j/∂A (n, h, w, k, classes) in closed form.

    z = mean_ij(tanh(A K2 + b2)) · W + b, so ∂z_j/∂A_ijk = Σ_m (1 − B²_ijm) K2[k, m] W[m, j] / Z.
    """
    a = _features(model, "features", images).astype(np.float64)
    b = _features(model, "hidden", images).astype(np.float64)
    k2 = model.get_layer("hidden").kernel.numpy()[0, 0].astype(np.float64)
    w = model.get_layer("head").kernel.numpy().astype(np.float64)
    z = a.shape[1] * a.shape[2]
    return a, np.einsum("nijm,km,mc->nijkc", 1.0 - b**2, k2, w) / z


@pytest.fixture
def varied_images() -> np.ndarray:
    return np.random.default_rng(11).normal(size=(4, 8, 8, 3)).astype(np.float32)


def test_max_pooling_is_the_spatial_maximum_of_the_gradients(varied_images):
    """pooling='max' (App. B.2.2): α_k = max_ij ∂y/∂A_ij^k, not the mean."""
    model = _tanh_head_model()
    _, dz = _logit_gradients(model, varied_images)
    maxed = GradCAM(model, "features", pooling="max")(varied_images, target=1)
    expected = dz[..., 1].max(axis=(1, 2))
    np.testing.assert_allclose(maxed.weights, expected, rtol=1e-5, atol=1e-7)
    # the gradients do vary over space: the mean is a different answer
    assert np.abs(expected - dz[..., 1].mean(axis=(1, 2))).min() > 1e-3 * np.abs(expected).max()


def test_alpha_is_per_image_on_a_nonlinear_head(varied_images):
    """One shared target, a nonlinear head: each image gets its own α (eq. 1), never pooled."""
    model = _tanh_head_model()
    a, dz = _logit_gradients(model, varied_images)
    result = GradCAM(model, "features")(varied_images, target=1)
    alpha = dz[..., 1].mean(axis=(1, 2))
    np.testing.assert_allclose(result.weights, alpha, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        result.raw_maps, np.einsum("nijk,nk->nij", a, alpha), rtol=1e-5, atol=1e-6
    )
    # the images' α differ, so α pooled over the batch would be wrong for each
    spread = np.abs(alpha - alpha.mean(axis=0)).max(axis=1)
    assert (spread > 0.05 * np.abs(alpha).max()).all()


def test_relu_false_heatmap_is_the_min_max_scaled_upsampled_raw_map(varied_images):
    """relu=False (App. B.2.1): maps keep their sign; heatmaps are (up − min) / (max − min)."""
    import cv2

    model = _tanh_head_model()
    a, dz = _logit_gradients(model, varied_images)
    result = GradCAM(model, "features", relu=False)(varied_images, target=0)
    raw = np.einsum("nijk,nk->nij", a, dz[..., 0].mean(axis=(1, 2)))
    assert (raw < 0).any() and (raw > 0).any()
    np.testing.assert_allclose(result.maps, raw, rtol=1e-5, atol=1e-6)
    up = np.stack([cv2.resize(m, (8, 8), interpolation=cv2.INTER_LINEAR) for m in raw])
    low, high = up.min(axis=(1, 2), keepdims=True), up.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(result.heatmaps, (up - low) / (high - low), atol=1e-5)


def test_logits_false_weights_follow_the_softmax_derivative(varied_images):
    """logits=False: y = p_c, so ∂y/∂A = p_c Σ_j (δ_cj − p_j) ∂z_j/∂A, averaged (eq. 1)."""
    model = _tanh_head_model(classes=3, activation="softmax")
    _, dz = _logit_gradients(model, varied_images)
    p = model(varied_images).numpy().astype(np.float64)
    c = 2
    delta = np.eye(3)[c]
    dp = np.einsum("nijkc,nc->nijk", dz, p[:, c : c + 1] * (delta - p))
    result = GradCAM(model, "features", logits=False)(varied_images, target=c)
    np.testing.assert_allclose(result.scores, p[:, c], rtol=1e-5)
    np.testing.assert_allclose(result.weights, dp.mean(axis=(1, 2)), rtol=1e-4, atol=1e-8)
    logit_alpha = GradCAM(model, "features")(varied_images, target=c).weights
    np.testing.assert_allclose(logit_alpha, dz[..., c].mean(axis=(1, 2)), rtol=1e-5, atol=1e-7)


def test_a_fixed_non_square_input_is_upsampled_to_its_own_height_and_width():
    """A fixed 20x28 input: heatmaps are the rectified raw maps resized by OpenCV to 28
    wide, 20 high, then scaled to [0, 1] (height and width never swapped)."""
    import cv2

    keras.utils.set_random_seed(4)
    inputs = keras.Input((20, 28, 3))
    features = layers.Conv2D(4, 3, strides=(2, 4), padding="same", name="features")(inputs)
    outputs = layers.Dense(3)(layers.GlobalAveragePooling2D()(features))
    model = keras.Model(inputs, outputs)
    images = np.random.default_rng(8).random((2, 20, 28, 3), dtype=np.float32)
    result = GradCAM(model, "features")(images, target=1)
    assert result.maps.shape == (2, 10, 7) and result.heatmaps.shape == (2, 20, 28)
    raw = np.maximum(result.raw_maps, 0)
    up = np.stack([cv2.resize(m, (28, 20), interpolation=cv2.INTER_LINEAR) for m in raw])
    expected = up / up.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(result.heatmaps, expected, atol=1e-5)
