"""Functional graphs holding bare Keras operations, and the default layer's rule.

`x + 3.0`, `keras.ops.relu(x)` or `keras.ops.softmax(x)` applied to symbolic
tensors become graph nodes that are operations, not layers (MobileNetV3's hard
swish, ConvNeXt's residual additions). The references are computed by hand:
a `GradientTape` over `keras.Model(inputs, [node.output, model.output])` (the
widely used formulation, valid for these flat models) and closed forms.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import tf_gradcam
from tf_gradcam import GradCAM
from tf_gradcam.submodel import is_operation


def _ops_model(head: str = "softmax") -> keras.Model:
    """conv → ops.relu → (x + 3.0) * 0.5 'shifted' → GAP → Dense → ops.softmax/sigmoid."""
    inputs = keras.Input((12, 12, 3), name="image")
    x = layers.Conv2D(5, 3, name="conv")(inputs)
    x = keras.ops.relu(x)
    shifted = (x + 3.0) * 0.5
    pooled = layers.GlobalAveragePooling2D(name="gap")(shifted)
    logits = layers.Dense(4, name="dense", kernel_initializer=keras.initializers.RandomNormal())(
        pooled
    )
    outputs = keras.ops.softmax(logits) if head == "softmax" else keras.ops.sigmoid(logits)
    return keras.Model(inputs, outputs, name=f"ops_{head}")


def _node(model: keras.Model, name: str):
    return {node.name: node for node in model.operations}[name]


def _reference(model: keras.Model, node_name: str, logits_node: str, images, classes):
    """α and the raw map from a plain tape over the flat model's own tensors."""
    reference = keras.Model(
        model.inputs[0], [_node(model, node_name).output, _node(model, logits_node).output]
    )
    with tf.GradientTape() as tape:
        activations, logits = reference(images, training=False)
        scores = tf.gather(logits, classes, axis=1, batch_dims=1)
    alpha = tf.reduce_mean(tape.gradient(scores, activations), axis=(1, 2)).numpy()
    return alpha, np.einsum("nhwk,nk->nhw", activations.numpy(), alpha)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_bare_operations_are_rerun_and_the_head_op_stripped(head):
    """Grad-CAM at the last op-made map equals the hand tape on the pre-softmax logits."""
    model = _ops_model(head)
    images = np.random.default_rng(3).random((3, 12, 12, 3), dtype=np.float32)
    last_op = [n for n in model.operations if is_operation(n)][-2]  # the "* 0.5"
    cam = GradCAM(model)
    assert cam.layer == last_op.name  # the default: last 4-D node before the pooling
    classes = np.array([0, 3, 1])
    result = cam(images, target=classes)
    alpha, raw = _reference(model, last_op.name, "dense", images, classes)
    np.testing.assert_allclose(result.weights, alpha, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.raw_maps, raw, rtol=1e-5, atol=1e-6)
    # Logits, not probabilities: the score is W[:, c] . mean(map) + b, so alpha = W[:, c] / Z
    # exactly (Z = 10 x 10 positions); through the softmax/sigmoid it would not be.
    kernel = model.get_layer("dense").kernel.numpy()
    np.testing.assert_allclose(result.weights, kernel[:, classes].T / 100, rtol=1e-5)


def test_bare_operations_do_not_gain_nodes():
    """Re-running an op-made graph adds no node to the user's operations."""
    model = _ops_model()
    before = {node.name: len(node._inbound_nodes) for node in model.operations}
    GradCAM(model)(np.zeros((1, 12, 12, 3), np.float32) + 0.5)
    tf_gradcam.GuidedGradCAM(model)(np.zeros((1, 12, 12, 3), np.float32) + 0.5)
    assert {node.name: len(node._inbound_nodes) for node in model.operations} == before


@pytest.mark.parametrize(
    ("make", "max_value"),
    [
        (keras.ops.relu, None),
        (keras.ops.relu6, 6.0),
        (lambda x: keras.activations.relu(x, max_value=4.0), 4.0),
        (lambda x: keras.ops.leaky_relu(x, negative_slope=0.3), None),
    ],
)
def test_guided_backprop_replaces_relu_operations(make, max_value):
    """A ReLU applied as an operation gets the guided rule: checked by hand on one layer."""
    inputs = keras.Input((4, 4, 1))
    conv = layers.Conv2D(3, 1, use_bias=True, name="conv")
    score = layers.Dense(1, use_bias=False, name="score")
    x = make(conv(inputs))
    model = keras.Model(inputs, score(layers.Flatten()(x)))
    rng = np.random.default_rng(5)
    conv.set_weights([rng.normal(size=(1, 1, 1, 3)).astype(np.float32), np.zeros(3, np.float32)])
    w_score = rng.normal(size=(48, 1)).astype(np.float32)
    score.set_weights([w_score])
    images = (rng.normal(size=(2, 4, 4, 1)) * 4).astype(np.float32)

    method = tf_gradcam.GuidedBackprop(model)
    got = method(images, target=0).gradients
    assert len(method.replaced) == 1
    # Hand-written guided backward: g = w_score reshaped, pass where 0 < pre (< max) and g > 0.
    kernel = conv.kernel.numpy()[0, 0, 0]  # (3,)
    pre = images[..., :1] * kernel  # (2, 4, 4, 3)
    g = np.broadcast_to(w_score[:, 0].reshape(4, 4, 3), pre.shape)
    top = np.inf if max_value is None else max_value
    passes = (pre > 0) & (pre < top) & (g > 0)
    expected = np.sum(np.where(passes, g, 0) * kernel, axis=-1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_guided_warns_about_undefined_activation_operations():
    """keras.ops.silu has no guided rule: named in the warning, refused with strict=True."""
    inputs = keras.Input((6, 6, 2))
    x = keras.ops.silu(layers.Conv2D(3, 3, name="conv")(inputs))
    model = keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)))
    with pytest.warns(UserWarning, match=r"keras\.ops\.silu"):
        tf_gradcam.GuidedBackprop(model)
    with pytest.raises(tf_gradcam.UnsupportedActivationError, match=r"keras\.ops\.silu"):
        tf_gradcam.GuidedBackprop(model, strict=True)


def test_default_layer_skips_layers_after_global_pooling():
    """MobileNet-style 1x1 classifier conv after GAP(keepdims) is not the default layer.

    The squeeze-and-excitation branch (pooled → 1x1 convs → multiply) is skipped
    too, while the product, which also depends on the unpooled map, is kept.
    """
    inputs = keras.Input((10, 10, 3))
    x = layers.Conv2D(6, 3, activation="relu", name="features")(inputs)
    squeeze = layers.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    excite = layers.Conv2D(6, 1, activation="sigmoid", name="se_conv")(squeeze)
    x = layers.Multiply(name="se_scale")([x, excite])
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name="gap")(x)
    x = layers.Dropout(0.1, name="dropout")(pooled)
    x = layers.Conv2D(4, 1, name="conv_preds")(x)  # (batch, 1, 1, 4): the classifier
    outputs = layers.Activation("softmax")(layers.Reshape((4,))(x))
    model = keras.Model(inputs, outputs)
    cam = GradCAM(model)
    assert cam.layer == "se_scale"
    # an explicit choice is still honoured
    assert GradCAM(model, "conv_preds").layer == "conv_preds"
    images = np.random.default_rng(2).random((2, 10, 10, 3), dtype=np.float32)
    assert cam(images).heatmaps.shape == (2, 10, 10)


def test_default_layer_steps_back_over_trailing_pooling():
    """conv → MaxPool → Flatten → Dense: the default is the conv (finer map), as in §3's VGG.

    A pooling layer between convolutions stays a candidate; an explicit pool is honoured.
    """
    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = layers.AveragePooling2D(1, name="pool3")(x)
    outputs = layers.Dense(3, activation="softmax")(layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    cam = GradCAM(model)
    assert cam.layer == "conv2"
    images = np.random.default_rng(4).random((2, 12, 12, 3), dtype=np.float32)
    assert cam(images).maps.shape == (2, 6, 6)
    assert GradCAM(model, "pool2").layer == "pool2"
    only_pool = keras.Model(inputs, layers.MaxPooling2D()(inputs))
    assert GradCAM(only_pool, logits=False).layer == only_pool.layers[-1].name


def test_an_operation_object_names_the_layer():
    """A residual `x + y` has a generated name; the operation object itself selects it."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    y = layers.Conv2D(4, 1, name="branch")(x)
    summed = x + y
    model = keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling2D()(summed)))
    add = next(node for node in model.operations if is_operation(node))
    images = np.random.default_rng(6).random((2, 8, 8, 3), dtype=np.float32)
    by_object = GradCAM(model, add)(images, target=1)
    assert by_object.layer == add.name
    np.testing.assert_array_equal(by_object.maps, GradCAM(model, add.name)(images, target=1).maps)
    np.testing.assert_array_equal(by_object.maps, GradCAM(model)(images, target=1).maps)
