"""Explaining a model never changes what anyone else sees of it, not even for a moment.

A web service predicts and explains with one model from several threads. While
an explainer is built and traced, the user's layers must keep their own
activations: the softmax head stays a softmax and the ReLUs keep their true
gradients for every other caller.
"""

from __future__ import annotations

import threading

import keras
import numpy as np
import tensorflow as tf
from keras import layers

import tf_gradcam

# Each builder thread builds and calls this many explainers of each kind. Every
# build traces the softmax head's pre-activation call and (for the guided
# methods) every ReLU's guided call once or twice; with a predictor calling the
# model in a loop meanwhile, 3 × 3 × 2 builds gave a wrong prediction in every
# run when the layers' activations were swapped in place (checked by putting
# the in-place swap back), in about 10 s on 2 cores.
ROUNDS = 3
BUILDERS = 2


def _model() -> keras.Model:
    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(6, 3, activation="relu", name="conv1")(inputs)
    x = layers.Conv2D(5, 3, name="conv2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(4, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs)


def test_predictions_and_gradients_of_other_threads_are_never_affected():
    """A thread predicting (eager call, predict, gradient) while others build explainers."""
    model = _model()
    images = np.random.default_rng(0).random((3, 12, 12, 3), dtype=np.float32)
    expected = model(images).numpy()
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(model(x)[:, 1])
    expected_gradient = tape.gradient(loss, x).numpy()

    stop = threading.Event()
    wrong: list[str] = []
    calls = [0]
    errors: list[BaseException] = []

    def predictor() -> None:
        try:
            while not stop.is_set():
                got = model(images).numpy()
                if not np.allclose(got, expected, rtol=1e-5, atol=1e-7):
                    wrong.append(f"model(x) rows sum to {got.sum(axis=1)}")
                got = model.predict(images, verbose=0)
                if not np.allclose(got, expected, rtol=1e-5, atol=1e-7):
                    wrong.append(f"predict rows sum to {got.sum(axis=1)}")
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    loss = tf.reduce_sum(model(x)[:, 1])
                gradient = tape.gradient(loss, x).numpy()
                if not np.allclose(gradient, expected_gradient, rtol=1e-4, atol=1e-7):
                    wrong.append("the gradient of the model's output changed")
                calls[0] += 1
        except BaseException as error:  # reported below
            errors.append(error)

    def builder() -> None:
        try:
            for _ in range(ROUNDS):
                for method in (
                    tf_gradcam.GradCAM(model, "conv2"),
                    tf_gradcam.GuidedBackprop(model),
                    tf_gradcam.GuidedGradCAM(model, "conv2"),
                ):
                    method(images, target=1)
        except BaseException as error:
            errors.append(error)

    watcher = threading.Thread(target=predictor)
    watcher.start()
    builders = [threading.Thread(target=builder) for _ in range(BUILDERS)]
    for thread in builders:
        thread.start()
    for thread in builders:
        thread.join()
    stop.set()
    watcher.join()
    assert not errors, errors
    assert calls[0] > 0
    assert not wrong, f"{len(wrong)} of {calls[0]} rounds saw a changed model: {wrong[:3]}"
    np.testing.assert_array_equal(model(images).numpy(), expected)
    assert model.get_layer("head").activation is keras.activations.softmax
