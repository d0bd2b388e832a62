"""Tests for tf_gradcam.guided: modified ReLU rules, guided copies, fused methods."""

from __future__ import annotations

import functools
import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_gradcam
from tf_gradcam.errors import UnsupportedActivationError
from tf_gradcam.guided import ReluOverride

# Forward inputs and incoming gradients for the hand-made rule tests.
X = np.array([-3.0, -1.0, 0.0, 0.5, 2.0, 5.0, 6.0, 7.0], np.float32)
G = np.array([1.0, -2.0, 3.0, 4.0, -5.0, 6.0, 7.0, 8.0], np.float32)

# Expected backward outputs, written from the rules by hand.
RULE_CASES = [
    # (mode, parameters, expected gradient)
    ("guided", {}, [0, 0, 0, 4, 0, 6, 7, 8]),  # x > 0 and g > 0
    ("guided", {"max_value": 6.0}, [0, 0, 0, 4, 0, 6, 0, 0]),  # ... and x < 6
    ("guided", {"max_value": 5.0}, [0, 0, 0, 4, 0, 0, 0, 0]),  # x == max_value is saturated
    ("guided", {"max_value": 5.0, "threshold": -2.0}, [0, 0, 3, 4, 0, 0, 0, 0]),
    ("guided", {"threshold": 1.0}, [0, 0, 0, 0, 0, 6, 7, 8]),  # x > 1 and g > 0
    ("guided", {"negative_slope": 0.1}, [0, 0, 0, 4, 0, 6, 7, 8]),  # leaky part is "off"
    ("deconv", {}, [1, 0, 3, 4, 0, 6, 7, 8]),  # g > 0, whatever x
    ("deconv", {"max_value": 6.0, "threshold": 1.0}, [1, 0, 3, 4, 0, 6, 7, 8]),
]

PARAMETERS = [
    {},
    {"max_value": 6.0},
    {"threshold": 0.5},
    {"negative_slope": 0.1},
    {"negative_slope": 0.2, "max_value": 4.0, "threshold": 1.5},
]


def _backward(fn, x, g):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return tape.gradient(y, x, output_gradients=tf.constant(g)).numpy()


@pytest.mark.parametrize(("mode", "params", "expected"), RULE_CASES)
def test_backward_rules_on_hand_made_tensors(mode, params, expected):
    """Guided passes g where threshold < x < max_value and g > 0; deconv passes g > 0."""
    fn = tf_gradcam.guided_relu if mode == "guided" else tf_gradcam.deconv_relu
    got = _backward(functools.partial(fn, **params), X, G)
    np.testing.assert_array_equal(got, np.array(expected, np.float32))


@pytest.mark.parametrize("params", PARAMETERS)
def test_forward_identical_to_plain_activation(params):
    """Modified ReLUs (functions and layers) return exactly keras' ReLU, kinks included."""
    x = np.concatenate([X, np.random.default_rng(0).normal(0, 4, 64).astype(np.float32)])
    x = np.concatenate([x, [params.get("threshold", 0.0), params.get("max_value") or 3.0]])
    x = x.astype(np.float32)
    reference = keras.activations.relu(x, **params).numpy()
    for fn in (tf_gradcam.guided_relu, tf_gradcam.deconv_relu):
        np.testing.assert_array_equal(fn(tf.constant(x), **params).numpy(), reference)
    for layer in (tf_gradcam.GuidedReLU(**params), tf_gradcam.DeconvReLU(**params)):
        np.testing.assert_array_equal(layer(x).numpy(), keras.layers.ReLU(**params)(x).numpy())


@pytest.mark.parametrize("mode", ["guided", "deconv"])
@pytest.mark.parametrize("params", PARAMETERS)
def test_true_backward_equals_tensorflows_relu_gradient(mode, params):
    """Guided Grad-CAM's Grad-CAM factor: the modified ReLU's true backward is TF's own.

    Checked bit for bit against the gradient TensorFlow registers for the plain
    activation, at the kinks (0, threshold, max_value) too.
    """
    from tf_gradcam.relu_rules import true_relu_gradients as _true_relu_gradients

    x = np.concatenate([X, [params.get("threshold", 0.0), params.get("max_value") or 3.0]])
    g = np.concatenate([G, [2.5, 1.5]]).astype(np.float32)
    x = tf.constant(x.astype(np.float32))
    fn = tf_gradcam.guided_relu if mode == "guided" else tf_gradcam.deconv_relu
    with _true_relu_gradients():
        got = _backward(functools.partial(fn, **params), x, g)
    expected = _backward(lambda v: keras.activations.relu(v, **params), x, g)
    np.testing.assert_array_equal(got, expected)
    # ... and outside the context the same call gives the modified rule again.
    assert not np.array_equal(_backward(functools.partial(fn, **params), x, g), expected)


@pytest.mark.parametrize("params", PARAMETERS)
def test_guided_differs_from_finite_differences_exactly_where_predicted(params):
    """Finite differences match guided everywhere except where the rule drops a gradient."""
    threshold, top = params.get("threshold", 0.0), params.get("max_value")
    # Away from the kinks (threshold, max_value), where the derivative is defined.
    x = np.array([-2.7, -0.6, 0.9, 1.3, 2.2, 3.1, 4.6, 7.3, 8.4, -1.9], np.float64)
    w = np.array([0.7, -1.1, 1.5, -0.4, 2.0, -2.5, 0.3, 1.2, -0.8, -1.3], np.float64)
    h = 1e-6

    def score(values):  # s(x) = sum_i w_i relu(x_i): its gradient at relu is w
        return float(np.sum(w * keras.activations.relu(tf.constant(values), **params).numpy()))

    numeric = np.array(
        [
            (score(x + h * np.eye(len(x))[i]) - score(x - h * np.eye(len(x))[i])) / (2 * h)
            for i in range(len(x))
        ]
    )
    guided = _backward(functools.partial(tf_gradcam.guided_relu, **params), x, w)
    on = (x > threshold) & (x < (top if top is not None else np.inf))
    dropped = (on & (w < 0)) | ((x < threshold) & (params.get("negative_slope", 0.0) != 0))
    assert dropped.any() and (~dropped).any()
    np.testing.assert_allclose(guided[~dropped], numeric[~dropped], atol=1e-6)
    assert np.all(np.abs(guided[dropped] - numeric[dropped]) > 1e-3)
    assert np.all(guided[dropped] == 0)


def test_layers_swap_into_a_model_and_serialize():
    """GuidedReLU in a model gives the guided gradient and round-trips through its config."""
    rng = np.random.default_rng(1)
    inputs = keras.Input((3,))
    first, second = keras.layers.Dense(4), keras.layers.Dense(1, use_bias=False)
    model = keras.Model(inputs, second(tf_gradcam.GuidedReLU()(first(inputs))))
    w1, b1 = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    w2 = np.array([[1.0], [-1.0], [2.0], [-0.5]], np.float32)
    first.set_weights([w1, b1])
    second.set_weights([w2])
    x = rng.normal(size=(5, 3)).astype(np.float32)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = model(xt)
    z = x @ w1 + b1
    expected = ((z > 0) * np.maximum(w2[:, 0], 0)) @ w1.T
    np.testing.assert_allclose(tape.gradient(y, xt).numpy(), expected, rtol=1e-5, atol=1e-6)
    for cls in (tf_gradcam.GuidedReLU, tf_gradcam.DeconvReLU):
        layer = cls(max_value=6.0, threshold=0.5)
        config = keras.saving.serialize_keras_object(layer)
        restored = keras.saving.deserialize_keras_object(config)
        assert type(restored) is cls
        assert (restored.max_value, restored.threshold) == (6.0, 0.5)


# ----------------------------------------------------------------- tiny network


def _tiny_network():
    """Input (4,4,1) -> Conv2D(3, 2x2, relu) -> Flatten -> Dense(5, relu) -> Dense(2)."""
    rng = np.random.default_rng(7)
    inputs = keras.Input((4, 4, 1))
    conv = keras.layers.Conv2D(3, 2, activation="relu", name="conv")
    hidden = keras.layers.Dense(5, activation="relu", name="hidden")
    head = keras.layers.Dense(2, name="head")
    model = keras.Model(inputs, head(hidden(keras.layers.Flatten()(conv(inputs)))))
    for layer in (conv, hidden, head):
        layer.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in layer.weights])
    images = rng.normal(size=(3, 4, 4, 1)).astype(np.float32)
    return model, images


def _numpy_backward(model, image, cls, rule):
    """Hand-written forward and backward pass of `_tiny_network` with a ReLU `rule`.

    Returns `(conv activations (3,3,3), ∂y/∂A (3,3,3), ∂y/∂x (4,4,1))`.
    """
    kernel, bias = model.get_layer("conv").get_weights()
    w1, b1 = model.get_layer("hidden").get_weights()
    w2, _ = model.get_layer("head").get_weights()
    zc = np.zeros((3, 3, 3))
    for i in range(3):
        for j in range(3):
            zc[i, j] = np.einsum("abc,abck->k", image[i : i + 2, j : j + 2], kernel) + bias
    a = np.maximum(zc, 0)
    z1 = a.reshape(-1) @ w1 + b1
    g_h1 = w2[:, cls]
    g_a = (w1 @ rule(z1, g_h1)).reshape(3, 3, 3)
    g_zc = rule(zc, g_a)
    g_x = np.zeros((4, 4, 1))
    for i in range(3):
        for j in range(3):
            g_x[i : i + 2, j : j + 2] += np.einsum("abck,k->abc", kernel, g_zc[i, j])
    return a, g_a, g_x


def _guided_rule(z, g):
    return g * (z > 0) * (g > 0)


def _deconv_rule(z, g):
    return np.maximum(g, 0)


@pytest.fixture(scope="module")
def tiny():
    return _tiny_network()


@pytest.mark.parametrize(
    ("method", "rule"),
    [(tf_gradcam.GuidedBackprop, _guided_rule), (tf_gradcam.Deconvolution, _deconv_rule)],
)
def test_backprop_matches_numpy_backward_pass(tiny, method, rule):
    """Guided backprop / deconvolution equal a hand-written NumPy backward pass."""
    model, images = tiny
    targets = [0, 1, 1]
    result = method(model)(images, target=targets)
    expected = np.stack(
        [_numpy_backward(model, images[n], c, rule)[2] for n, c in enumerate(targets)]
    )
    assert result.gradients.dtype == np.float32
    np.testing.assert_allclose(result.gradients, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected).max() > 0


@pytest.mark.filterwarnings("ignore:.*all zero:RuntimeWarning")
@pytest.mark.parametrize(("mode", "rule"), [("guided", _guided_rule), ("deconv", _deconv_rule)])
def test_gradcam_relu_gradients_ablation_matches_numpy(tiny, mode, rule):
    """GradCAM(relu_gradients=...) pools the modified gradients at the layer (App. B.2.3)."""
    model, images = tiny
    result = tf_gradcam.GradCAM(model, "conv", relu_gradients=mode)(images, target=1)
    plain = tf_gradcam.GradCAM(model, "conv")(images, target=1)
    assert not result.degenerate.all()
    assert np.abs(result.weights - plain.weights).max() > 1e-2
    for n in range(len(images)):
        a, g_a, _ = _numpy_backward(model, images[n], 1, rule)
        weights = g_a.mean(axis=(0, 1))
        np.testing.assert_allclose(result.weights[n], weights, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(result.maps[n], np.maximum(a @ weights, 0), rtol=1e-4, atol=1e-6)


def test_relu_gradients_rejects_bad_values(tiny):
    """An unknown rule, or one given with call_override, is refused with the argument named."""
    model, _ = tiny
    with pytest.raises(ValueError, match="Received: mode='bogus'"):
        tf_gradcam.GradCAM(model, "conv", relu_gradients="bogus")
    with pytest.raises(ValueError, match="relu_gradients='guided'"):
        tf_gradcam.GradCAM(model, "conv", relu_gradients="guided", call_override=lambda _: None)


@pytest.mark.parametrize("max_value", [5.0, 2.5])
def test_relu_layer_with_max_value_passes_nothing_at_saturation(max_value):
    """A `ReLU(max_value=m)` layer (not ReLU6): inputs at exactly m, or above, pass nothing.

    x → ReLU(max_value=m) → Flatten → Dense(1) with weights w > 0: the guided
    gradient w.r.t. x is w where 0 < x < m, else 0 (the incoming gradient w is positive).
    """
    inputs = keras.Input((2, 3, 1))
    h = keras.layers.ReLU(max_value=max_value)(inputs)
    head = keras.layers.Dense(1)
    model = keras.Model(inputs, head(keras.layers.Flatten()(h)))
    w = np.arange(1.0, 7.0, dtype=np.float32)[:, None]
    head.set_weights([w, np.zeros(1, np.float32)])
    x = np.array([-1.0, 0.0, 1.0, max_value - 0.5, max_value, max_value + 1], np.float32)
    result = tf_gradcam.GuidedBackprop(model)(x.reshape(1, 2, 3, 1), target=0)
    expected = np.where((x > 0) & (x < max_value), w[:, 0], 0.0)
    np.testing.assert_array_equal(result.gradients.reshape(-1), expected)


# ------------------------------------------------------------- fused methods


@pytest.fixture(scope="module")
def conv_model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inputs)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(6, 3, padding="same", name="c2")(h)
    h = keras.layers.ReLU(name="r2")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(3, activation="softmax")(h)
    model = keras.Model(inputs, outputs)
    images = np.random.default_rng(4).uniform(size=(4, 16, 16, 3)).astype(np.float32)
    return model, images


@pytest.mark.parametrize("layer", ["r2", "c1"])
@pytest.mark.parametrize(
    ("fused", "backprop", "mode"),
    [
        (tf_gradcam.GuidedGradCAM, tf_gradcam.GuidedBackprop, "guided"),
        (tf_gradcam.DeconvolutionGradCAM, tf_gradcam.Deconvolution, "deconv"),
    ],
)
def test_fused_equals_product_of_its_parts(conv_model, fused, backprop, mode, layer):
    """(Guided|Deconvolution) Grad-CAM = its backprop ⊙ plain Grad-CAM's upsampled heatmap.

    At "c1" the ReLU "r2" lies between the layer and the score: the Grad-CAM
    factor must backpropagate through it with the true gradient, not the
    modified one the pixel factor uses.
    """
    model, images = conv_model
    targets = [0, 1, 2, 1]
    result = fused(model, layer)(images, target=targets)
    cam = tf_gradcam.GradCAM(model, layer)(images, target=targets)
    assert not cam.degenerate.any()
    if layer == "c1":  # the modified rule at r2 would give other weights
        modified = tf_gradcam.GradCAM(model, layer, relu_gradients=mode)
        other = modified(images, target=targets).weights
        assert np.abs(other - cam.weights).max() > 1e-3 * np.abs(cam.weights).max()
    np.testing.assert_allclose(result.cam.weights, cam.weights, rtol=1e-5, atol=1e-8)
    pixels = backprop(model)(images, target=targets)
    np.testing.assert_allclose(result.cam.heatmaps, cam.heatmaps, atol=1e-6)
    np.testing.assert_allclose(result.backprop, pixels.gradients, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        result.gradients, pixels.gradients * cam.heatmaps[..., None], rtol=1e-5, atol=1e-7
    )
    assert result.gradients.shape == images.shape
    np.testing.assert_array_equal(result.classes, targets)


def test_batch_equals_one_by_one(conv_model):
    """A batch gives the same Guided Grad-CAM as each image alone."""
    model, images = conv_model
    method = tf_gradcam.GuidedGradCAM(model, "r2")
    batch = method(images, target=[2, 0, 1, 2])
    for n, c in enumerate([2, 0, 1, 2]):
        alone = method(images[n : n + 1], target=c)
        np.testing.assert_allclose(batch.gradients[n], alone.gradients[0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(batch.backprop[n], alone.backprop[0], rtol=1e-5, atol=1e-7)
    assert method.trace_count == 1  # batch sizes differ, no retrace


def test_every_target_form(conv_model):
    """Predicted, int, per-image, TopK and callable targets give the matching gradients."""
    model, images = conv_model
    method = tf_gradcam.GuidedBackprop(model)
    predicted = method(images)
    per_image = method(images, target=predicted.classes)
    np.testing.assert_allclose(predicted.gradients, per_image.gradients)
    top = method(images, target=tf_gradcam.TopK(2))
    assert top.gradients.shape == (4, 2, 16, 16, 3)
    np.testing.assert_allclose(top.gradients[:, 0], predicted.gradients, rtol=1e-6)
    called = method(images, target=lambda logits: logits[:, 1])
    np.testing.assert_allclose(called.gradients, method(images, target=1).gradients)
    assert called.classes is None


def test_guided_gradcam_runs_one_forward_pass(conv_model):
    """The compiled Guided Grad-CAM step holds each convolution's forward op once."""
    model, images = conv_model
    method = tf_gradcam.GuidedGradCAM(model, "r2")
    method(images, target=0)
    (function,) = method._engine._functions.values()
    ops = function.get_concrete_function().graph.get_operations()
    assert sum(op.type == "Conv2D" for op in ops) == 2  # c1 and c2, not twice each


# ------------------------------------------------------- nested models, ReLU6


def _nested_model(guided: bool) -> keras.Model:
    """ReLUs of every kind at three depths; `guided=True` builds them guided by hand."""
    relu = tf_gradcam.guided_relu if guided else "relu"
    relu6 = functools.partial(tf_gradcam.guided_relu, max_value=6.0) if guided else "relu6"
    leaky = tf_gradcam.GuidedReLU(negative_slope=0.1) if guided else keras.layers.LeakyReLU(0.1)
    relu_layer = tf_gradcam.GuidedReLU if guided else keras.layers.ReLU
    innermost = keras.Sequential(
        [
            keras.Input((8, 8, 4)),
            keras.layers.Conv2D(4, 3, padding="same"),
            relu_layer(max_value=6.0),  # ReLU6 as a layer
            keras.layers.Conv2D(4, 3, padding="same", activation=relu6),
        ],
        name="innermost",
    )
    # Nested models are called on their parent's Input: the engine at 9a27cd8
    # cannot yet re-run a nested Functional model called on an inner tensor.
    x = keras.Input((8, 8, 4))
    h = innermost(x)
    h = keras.layers.Conv2D(4, 3, padding="same")(h)
    h = leaky(h)
    h = keras.layers.Conv2D(4, 3, padding="same")(h)
    h = relu_layer(threshold=0.5)(h)
    middle = keras.Model(x, h, name="middle")
    inputs = keras.Input((8, 8, 4))
    h = middle(inputs)
    h = keras.layers.Conv2D(4, 3, padding="same", activation=relu)(h)
    h = keras.layers.Activation(relu, name="act")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(6, activation=relu)(h)
    outputs = keras.layers.Dense(2, activation="softmax")(h)
    return keras.Model(inputs, outputs, name="nested")


@pytest.fixture(scope="module")
def nested():
    keras.utils.set_random_seed(5)
    model = _nested_model(guided=False)
    reference = _nested_model(guided=True)
    reference.set_weights(model.get_weights())
    # Large inputs drive some ReLU6 units past 6.
    images = np.random.default_rng(6).normal(0, 3, size=(2, 8, 8, 4)).astype(np.float32)
    return model, reference, images


def _reference_gradients(reference, images, cls):
    """Gradients of the pre-softmax score through the hand-built guided model."""
    logits_model = keras.Model(reference.inputs, reference.layers[-1].input)
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        w, b = reference.layers[-1].get_weights()
        score = (logits_model(x) @ w + b)[:, cls]
    return tape.gradient(score, x).numpy()


def test_nested_and_relu6_models_are_fully_guided(nested):
    """Every ReLU at every depth is replaced (7) and matches a hand-guided copy."""
    model, reference, images = nested
    method = tf_gradcam.GuidedBackprop(model)
    result = method(images, target=1)
    assert len(method.replaced) == 7
    expected = _reference_gradients(reference, images, 1)
    np.testing.assert_allclose(result.gradients, expected, rtol=1e-4, atol=1e-6)
    plain = _reference_gradients(model, images, 1)
    assert np.abs(expected - plain).max() > 1e-3  # guided really differs here


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def test_users_model_is_untouched(nested):
    """Predictions, gradients, activations and layer.output are the same afterwards."""
    model, _, images = nested
    x = tf.constant(images)

    def predictions_and_gradients():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x)[:, 0]
        return y.numpy(), tape.gradient(y, x).numpy()

    layers = list(_all_layers(model))
    activations = {id(layer): getattr(layer, "activation", None) for layer in layers}
    nodes = {id(layer): len(layer._inbound_nodes) for layer in layers}
    before = predictions_and_gradients()
    tf_gradcam.GuidedBackprop(model)(images)
    tf_gradcam.GuidedGradCAM(model)(images)
    tf_gradcam.GradCAM(model, relu_gradients="deconv")(images)
    after = predictions_and_gradients()
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    for layer in layers:
        assert getattr(layer, "activation", None) is activations[id(layer)]
        assert len(layer._inbound_nodes) == nodes[id(layer)]  # no graph nodes added
    middle = model.get_layer("middle")
    inner = keras.Model(middle.inputs, middle.layers[2].output)  # layer.output still works
    assert inner.output_shape == (None, 8, 8, 4)


def test_undefined_activations_warn_once_and_strict_refuses():
    """Swish and GELU are named in one warning; strict=True raises a specific error."""
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, activation="swish", name="swishy")(inputs)
    h = keras.layers.Conv2D(4, 3, activation="relu", name="plain")(h)
    h = keras.layers.Activation("gelu", name="smooth")(h)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs)
    images = np.zeros((1, 8, 8, 3), np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        method = tf_gradcam.GuidedBackprop(model)
        method(images)
        method(images)
    ours = [w for w in caught if "backward rule" in str(w.message)]
    assert len(ours) == 1
    assert "'swishy' (silu)" in str(ours[0].message) and "'smooth' (gelu)" in str(ours[0].message)
    assert ours[0].category is UserWarning and ours[0].filename == __file__
    assert method.replaced == ("plain",)
    with pytest.raises(UnsupportedActivationError, match=r"strict=True.*'swishy' \(silu\)"):
        tf_gradcam.GuidedGradCAM(model, strict=True)
    with pytest.raises(ValueError, match="Received: mode='guide'"):
        ReluOverride(model, "guide")
