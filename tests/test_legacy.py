"""tf.keras 2 models (`tf_keras`, `TF_USE_LEGACY_KERAS=1`): same results as Keras 3 twins.

The reference for every number is a Keras 3 twin with the same weights,
explained through the Keras 3 rewiring (independent code), or values computed
here from the model's own weights. One test runs `legacy_worker.py` in a
subprocess with `TF_USE_LEGACY_KERAS=1`, where `tf.keras` *is* tf.keras 2;
the others import `tf_keras` directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_gradcam
from tf_gradcam import LayerNotFoundError, NotSpatialError, UnsupportedModelError
from tf_gradcam.cli import main

tf_keras = pytest.importorskip("tf_keras")

WORKER = Path(__file__).with_name("legacy_worker.py")


def _build(library, head: str | None = "softmax"):
    inputs = library.Input((16, 16, 3))
    x = library.layers.Conv2D(6, 3, activation="relu", name="c1")(inputs)
    x = library.layers.Conv2D(5, 3, activation="relu", name="c2")(x)
    x = library.layers.GlobalAveragePooling2D(name="gap")(x)
    return library.Model(inputs, library.layers.Dense(3, activation=head, name="head")(x))


@pytest.fixture
def pair():
    tf_keras.utils.set_random_seed(1)  # fixed weights: maps with heat
    legacy, twin = _build(tf_keras), _build(keras)
    for mine, theirs in zip(legacy.layers, twin.layers, strict=True):
        theirs.set_weights(mine.get_weights())
    return legacy, twin


def _assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


def test_under_TF_USE_LEGACY_KERAS_every_result_equals_the_keras3_twin():
    """GradCAM, explain, the guided methods and GradCAMCallback on tf.keras functional and
    Sequential models, in a process where tf.keras is Keras 2."""
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run(
        [sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["tf_keras_module"].startswith("tf_keras")
    for kind in ("functional", "sequential"):
        assert report[f"{kind}_class"].startswith("tf_keras"), report[f"{kind}_class"]
        for key, difference in report[kind].items():
            assert difference <= 1e-5, f"{kind} {key}: {difference}"
        assert len(report[kind]) == 17
        # max-pooling after the last ReLU is stepped over, as for Keras 3 models
        assert report[f"{kind}_default_layer"] == ["r2", "r2"]
        for name in ("GuidedBackprop", "Deconvolution", "GuidedGradCAM"):
            assert report[f"{kind}_{name}_type"]
            assert report[f"{kind}_{name}_nonzero"] > 0
        assert report[f"{kind}_callback_tags"] == [f"gradcam/image_{i}" for i in range(3)]


def test_scores_are_the_logits_and_maps_equal_the_twin(pair, images):
    legacy, twin = pair
    features = tf_keras.Model(legacy.inputs, legacy.get_layer("gap").output)(images).numpy()
    kernel, bias = legacy.get_layer("head").get_weights()
    logits = features @ kernel + bias
    for layer in (None, "c1", legacy.get_layer("c2")):
        mine = tf_gradcam.GradCAM(legacy, layer)(images, target=tf_gradcam.TopK(2))
        theirs = tf_gradcam.GradCAM(twin, getattr(layer, "name", layer))(
            images, target=tf_gradcam.TopK(2)
        )
        _assert_close(mine.heatmaps, theirs.heatmaps)
        _assert_close(mine.weights, theirs.weights)
        _assert_close(mine.scores, -np.sort(-logits, axis=1)[:, :2])
    assert tf_gradcam.GradCAM(legacy).layer == "c2"
    guided = tf_gradcam.GuidedBackprop(legacy)
    _assert_close(guided(images).gradients, tf_gradcam.GuidedBackprop(twin)(images).gradients)
    assert guided.replaced == ("tf.nn.relu", "tf.nn.relu")  # both conv activations


def test_the_model_is_unchanged(pair, images):
    legacy, _ = pair
    weights = [w.copy() for w in legacy.get_weights()]
    outputs = legacy(images).numpy()
    nodes = {layer.name: len(layer.inbound_nodes) for layer in legacy.layers}
    tf_gradcam.GuidedGradCAM(legacy, "c2")(images)
    tf_gradcam.GradCAM(legacy)(images)
    for before, after in zip(weights, legacy.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(legacy(images).numpy(), outputs)
    assert {layer.name: len(layer.inbound_nodes) for layer in legacy.layers} == nodes
    assert legacy.layers[-1].activation is tf_keras.activations.softmax
    assert tf.compat.v2.nn.relu is tf.nn.relu  # the ReLU functions are put back


def test_bad_models_and_layers_get_typed_errors(pair, images, tmp_path):
    legacy, _ = pair
    with pytest.raises(LayerNotFoundError, match=r"No layer 'c9'.*\['c1', 'c2'\]"):
        tf_gradcam.GradCAM(legacy, "c9")
    with pytest.raises(LayerNotFoundError, match="not a top-level layer"):
        tf_gradcam.GradCAM(legacy, tf_keras.layers.Conv2D(2, 3))
    with pytest.raises(NotSpatialError, match=r"'gap' has output shape \(None, 5\)"):
        tf_gradcam.GradCAM(legacy, "gap")
    with pytest.raises(UnsupportedModelError, match=r"Ablation-CAM.*tf\.keras 2 model"):
        tf_gradcam.AblationCAM(legacy, "c2")(images)
    with pytest.raises(UnsupportedModelError, match=r"tf\.keras \(Keras 2\) model"):
        tf_gradcam.MultiLayerGradCAM(legacy, ["c1", "c2"])
    # the error's advice works: the weights saved under tf.keras load into a Keras 3 build
    path = tmp_path / "w.h5"
    legacy.save_weights(path)
    converted = _build(keras)
    converted.load_weights(path)
    _assert_close(converted(images), legacy(images), atol=1e-6)
    layers = tf_gradcam.MultiLayerGradCAM(converted, ["c1", "c2"])(images)
    _assert_close(layers["c2"].heatmaps, tf_gradcam.GradCAM(legacy, "c2")(images).heatmaps)
    with pytest.raises(UnsupportedModelError, match="custom `call_override`"):
        tf_gradcam.GradCAM(legacy, call_override=lambda layer: None)

    class Subclassed(tf_keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = tf_keras.layers.Conv2D(2, 3)

        def call(self, x):
            return self.conv(x)

    subclassed = Subclassed()
    subclassed(images)
    with pytest.raises(UnsupportedModelError, match="no functional graph"):
        tf_gradcam.GradCAM(subclassed)


def test_a_keras3_model_holding_a_tf_keras_layer_is_refused(images):
    class Mixed(keras.Model):
        def __init__(self):
            super().__init__()
            self.old = tf_keras.layers.Conv2D(3, 3)
            self.pool = keras.layers.GlobalAveragePooling2D()

        def call(self, x):
            return self.pool(self.old(x))

    model = Mixed()
    model(images)
    with pytest.raises(UnsupportedModelError, match=r"tf\.keras 2 layer"):
        tf_gradcam.GradCAM(model, "old")
    with pytest.raises(UnsupportedModelError, match=r"tf\.keras 2 layer"):
        tf_gradcam.GradCAM(model, model.old)


def test_an_h5_file_saved_by_tf_keras_is_explained_by_the_cli(pair, tmp_path):
    """`--trust-model` loads a tf.keras 2 `.h5`; the map equals GradCAM on the tf.keras model."""
    legacy, _ = pair
    path = tmp_path / "legacy.h5"
    legacy.save(path)
    rgb = (np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8)
    image = tmp_path / "img.png"
    cv2.imwrite(str(image), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    x = rgb[None] / np.float32(255)
    label = str(int(np.argmax(legacy(x).numpy())))  # the predicted class: a map with heat
    out = tmp_path / "out"
    args = ["explain", str(path), str(image), "--class", label, "--layer", "c2", "--out", str(out)]
    assert main(args) != 0  # safe mode cannot check HDF5 files
    assert main([*args, "--trust-model"]) == 0
    expected = tf_gradcam.GradCAM(legacy, "c2")(x, target=int(label))
    assert expected.maps.max() > 0
    _assert_close(np.load(out / "img_gradcam.npy"), expected.maps[0])
