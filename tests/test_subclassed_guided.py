"""Guided and deconvolution backprop on subclassed models: ReLU functions replaced for one call.

A subclassed model's ReLUs come from layers (`activation="relu"`, `ReLU`,
`LeakyReLU`), `keras.ops` and `tf.nn` calls in its `call`; all end in
`tf.nn.relu` / `relu6` / `leaky_relu`, which take the guided rule only inside
the explainer's forward pass and only in its context. The reference is a
functional twin with the same weights, whose ReLU layers the engine rewires
(tested against hand computations in test_guided.py).
"""

from __future__ import annotations

import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import tf_gradcam
from tf_gradcam import relu_rules

RELU = tf.nn.relu
FUNCTIONS = {name: getattr(tf.nn, name) for name in ("relu", "relu6", "leaky_relu")}


class ReluNet(keras.Model):
    """ReLUs of every kind: a conv activation, keras.ops, a ReLU6 layer, tf.nn.leaky_relu."""

    def __init__(self, head: str | None = None):
        super().__init__(name="relu_net")
        init = keras.initializers.RandomNormal(0.0, 0.6, seed=3)
        self.c1 = layers.Conv2D(6, 3, activation="relu", kernel_initializer=init)
        self.c2 = layers.Conv2D(6, 3, kernel_initializer=init)
        self.c3 = layers.Conv2D(6, 3, kernel_initializer=init)
        self.relu6 = layers.ReLU(max_value=6.0)
        self.c4 = layers.Conv2D(5, 3, kernel_initializer=init)
        self.pool = layers.GlobalAveragePooling2D()
        self.head = layers.Dense(3, activation=head, kernel_initializer=init)

    def call(self, x, training=False):
        x = self.c1(x)
        x = keras.ops.relu(self.c2(x))
        x = self.relu6(self.c3(x) * 3.0)
        x = tf.nn.leaky_relu(self.c4(x), alpha=0.1)
        return self.head(self.pool(x))


def _twin(net: ReluNet) -> keras.Model:
    """The same network as a functional model: ReLU layers the engine rewires itself."""
    inputs = keras.Input((16, 16, 3))
    c1 = layers.Conv2D(6, 3, activation="relu")
    c2, c3, c4 = layers.Conv2D(6, 3), layers.Conv2D(6, 3), layers.Conv2D(5, 3, name="last_conv")
    head = layers.Dense(3)
    x = layers.Activation("relu")(c2(c1(inputs)))
    x = layers.ReLU(max_value=6.0)(layers.Rescaling(3.0)(c3(x)))
    x = layers.LeakyReLU(negative_slope=0.1, name="last")(c4(x))
    twin = keras.Model(inputs, head(layers.GlobalAveragePooling2D()(x)))
    for mine, theirs in ((c1, net.c1), (c2, net.c2), (c3, net.c3), (c4, net.c4), (head, net.head)):
        mine.set_weights(theirs.get_weights())
    return twin


@pytest.fixture
def net(images) -> ReluNet:
    model = ReluNet()
    model(images)
    return model


def _assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


def _assert_functions_restored() -> None:
    for name, function in FUNCTIONS.items():
        assert getattr(tf.nn, name) is function, name
    assert relu_rules._FUNCTION_USERS == [0]
    assert relu_rules._FUNCTION_RULE.get() is None


@pytest.mark.parametrize(
    "method", ["GuidedBackprop", "Deconvolution", "GuidedGradCAM", "DeconvolutionGradCAM"]
)
def test_pixel_methods_equal_the_functional_twin(net, images, method):
    cls = getattr(tf_gradcam, method)
    layer = {"layer": "c4"} if method.endswith("GradCAM") else {}
    twin_layer = {"layer": "last_conv"} if method.endswith("GradCAM") else {}
    twin = _twin(net)
    for target in (None, 1, tf_gradcam.TopK(2)):
        mine = cls(net, **layer)(images, target=target)
        theirs = cls(twin, **twin_layer)(images, target=target)
        _assert_close(mine.gradients, theirs.gradients)
        _assert_close(mine.scores, theirs.scores)
        np.testing.assert_array_equal(mine.classes, theirs.classes)
    assert np.abs(mine.gradients).max() > 0
    _assert_functions_restored()


def test_guided_differs_from_the_true_gradient(net, images):
    """The rule is really applied: the guided map is not the plain input gradient."""
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        score = net(x)[:, 0]
    plain = tape.gradient(score, x).numpy()
    guided = tf_gradcam.GuidedBackprop(net)(images, target=0).gradients
    assert np.abs(guided - plain).max() > 1e-3
    # the model itself still backpropagates its true gradient afterwards
    with tf.GradientTape() as tape:
        tape.watch(x)
        score = net(x)[:, 0]
    _assert_close(tape.gradient(score, x), plain, atol=0)


def test_relu_gradients_option_and_the_replaced_calls(net, images):
    cam = tf_gradcam.GradCAM(net, "c4", relu_gradients="guided", relu=False)
    twin = tf_gradcam.GradCAM(_twin(net), "last_conv", relu_gradients="guided", relu=False)
    _assert_close(cam(images, target=2).raw_maps, twin(images, target=2).raw_maps)
    guided = tf_gradcam.GuidedBackprop(net)
    guided(images)
    # conv activation, keras.ops.relu, ReLU(max_value=6) → relu6, tf.nn.leaky_relu
    assert guided.replaced == ("tf.nn.relu", "tf.nn.relu", "tf.nn.relu6", "tf.nn.leaky_relu")
    _assert_functions_restored()


def test_softmax_head_is_explained_before_the_softmax(images):
    net = ReluNet(head="softmax")
    net(images)
    twin = _twin(net)  # its head has no softmax: the logits
    mine = tf_gradcam.GuidedGradCAM(net, "c4")(images)
    theirs = tf_gradcam.GuidedGradCAM(twin, "last_conv")(images)
    _assert_close(mine.scores, twin(images).numpy().max(axis=1))
    _assert_close(mine.gradients, theirs.gradients)


def test_other_threads_keep_the_true_relu_gradient():
    """While one context has the guided rule, a ReLU in another thread is unchanged."""
    x = tf.constant([-1.0, 2.0, 3.0])
    upstream = tf.constant([5.0, -4.0, 7.0])
    opened, done = threading.Event(), threading.Event()
    inside: dict = {}

    def explainer():
        with relu_rules.relu_functions_replaced("guided"):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = tf.nn.relu(x)
            inside["guided"] = tape.gradient(y, x, output_gradients=upstream).numpy()
            opened.set()
            done.wait(10)

    thread = threading.Thread(target=explainer)
    thread.start()
    assert opened.wait(10)
    assert tf.nn.relu is not RELU  # the wrapper is installed right now...
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.nn.relu(x)
    outside = tape.gradient(y, x, output_gradients=upstream).numpy()
    done.set()
    thread.join()
    np.testing.assert_array_equal(outside, [0.0, -4.0, 7.0])  # ...and changes nothing here
    np.testing.assert_array_equal(inside["guided"], [0.0, 0.0, 7.0])
    _assert_functions_restored()


def test_functions_are_restored_when_the_call_raises(net, images):
    class Exploding(ReluNet):
        def call(self, x, training=False):
            keras.ops.relu(x)
            raise RuntimeError("boom in call()")

    model = Exploding()
    model.c1.build((None, 16, 16, 3))
    with pytest.raises(RuntimeError, match="boom"):
        tf_gradcam.GuidedBackprop(model)(images)
    _assert_functions_restored()
    outputs = net(images).numpy()
    tf_gradcam.GuidedGradCAM(net, "c4")(images)
    np.testing.assert_array_equal(net(images).numpy(), outputs)


def test_no_retracing(net, images):
    guided = tf_gradcam.GuidedGradCAM(net, "c4")
    for _ in range(3):
        guided(images)
        guided(images[:2], target=1)
    assert guided.trace_count <= 2
