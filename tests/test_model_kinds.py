"""Each kind of model of docs/models.md through guided methods, GradCAMCallback and the CLI.

Kinds: Sequential models (with and without `keras.Input`), a functional backbone nested in
a functional or a Sequential classifier, a `keras.applications` architecture (random
weights) and a subclassed `keras.Model`.

The references are independent of the engine: Grad-CAM is recomputed with a
`tf.GradientTape` over the model's own layers (the layer's activations, the gradients of
the class's pre-softmax score, α the spatial mean of the gradients, ReLU(Σ_k α_k A^k)),
its heatmap with `tf.image.resize`; guided gradients come from a flat functional twin
whose ReLUs are guided by hand. Callback panels are also compared with those logged for
a flat functional twin holding the same weights, and the CLI's saved maps with the API on
the loaded model.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from collections.abc import Callable
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import tf_gradcam
from tests.test_callback import decode_image, read_events
from tests.test_cli import _decoded, _save_images
from tests.test_subclassed import _net
from tests.test_subclassed import _twin as _subclassed_twin
from tf_gradcam import GradCAM, GradCAMCallback, GuidedBackprop, GuidedGradCAM, overlay
from tf_gradcam.callback import compose_panel
from tf_gradcam.cli import main

SIZE = 16
CLASSES = 3
SEQUENTIAL_KINDS = ["sequential-input", "sequential-no-input"]
NESTED_KINDS = ["nested-in-functional", "nested-in-sequential"]
LABELS = np.array([0, 1, 2, 1])

#: `forward(x) -> (activations, logits)`: the explained layer's output and the pre-softmax
#: scores computed from it, in one forward pass.
Forward = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


# ------------------------------------------------------------------ models


def _convs() -> list[keras.layers.Layer]:
    return [
        layers.Conv2D(6, 3, activation="relu", name="conv1"),
        layers.Conv2D(5, 3, activation="relu", name="conv2"),
    ]


def _pooling() -> list[keras.layers.Layer]:
    """Max pooling then global average pooling: ∂y^c/∂A at conv2 varies over space (only
    each window's maximum gets a gradient), so α, the gradients' mean, is no CAM weight."""
    return [layers.MaxPooling2D(2, name="pool"), layers.GlobalAveragePooling2D(name="gap")]


def _head() -> keras.layers.Layer:
    # mostly positive class weights: every class has some supporting region
    init = keras.initializers.RandomUniform(-0.5, 1.0)
    return layers.Dense(CLASSES, kernel_initializer=init, name="head")


def _backbone() -> keras.Model:
    """A small functional CNN: conv1 → conv2 (both ReLU), named 'backbone'."""
    inputs = keras.Input((SIZE, SIZE, 3))
    conv1, conv2 = _convs()
    return keras.Model(inputs, conv2(conv1(inputs)), name="backbone")


def _model(kind: str) -> keras.Model:
    """conv1 → conv2 → max pooling → GAP → Dense(3), written as the model kind `kind`."""
    keras.utils.set_random_seed(3)
    if kind == "sequential-input":
        return keras.Sequential([keras.Input((SIZE, SIZE, 3)), *_convs(), *_pooling(), _head()])
    if kind == "sequential-no-input":
        model = keras.Sequential([*_convs(), *_pooling(), _head()])
        model(np.zeros((4, SIZE, SIZE, 3), np.float32))  # built by a call, as fit would
        return model
    if kind == "nested-in-functional":
        inputs = keras.Input((SIZE, SIZE, 3))
        x = _backbone()(inputs)
        for layer in _pooling():
            x = layer(x)
        return keras.Model(inputs, _head()(x), name="classifier")
    if kind == "nested-in-sequential":
        return keras.Sequential([_backbone(), *_pooling(), _head()])
    raise AssertionError(kind)


def _twin(model: keras.Model, activation: Callable | str = "relu") -> keras.Model:
    """A flat functional conv1 → conv2 → pool → gap → head with the model's weights.

    `activation` replaces the convolutions' ReLU (a hand-guided twin).
    """
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(6, 3, activation=activation, name="conv1")(inputs)
    x = layers.Conv2D(5, 3, activation=activation, name="conv2")(x)
    for layer in _pooling():
        x = layer(x)
    twin = keras.Model(inputs, _head()(x), name="twin")
    twin.set_weights(model.get_weights())  # same order: conv1, conv2, head
    return twin


def _leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's layers in call order, nested models expanded, input layers left out."""
    leaves = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            leaves += _leaf_layers(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            leaves.append(layer)
    return leaves


def _layer_by_layer(model: keras.Model, name: str) -> Forward:
    """A forward pass calling the model's leaf layers one by one (a chain), split at `name`."""
    leaves = _leaf_layers(model)
    split = [layer.name for layer in leaves].index(name) + 1

    def forward(x):
        for layer in leaves[:split]:
            x = layer(x)
        activations = x
        for layer in leaves[split:]:
            x = layer(x)
        return activations, x

    return forward


# ------------------------------------------------------------------ references


def _reference_maps(forward: Forward, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Grad-CAM by hand: ReLU(Σ_k α_k A^k), α_k = spatial mean of ∂y^c/∂A^k, (n, h, w)."""
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        activations, logits = forward(x)
        score = tf.reduce_sum(tf.gather(logits, classes, axis=1, batch_dims=1))
    gradients = tape.gradient(score, activations)
    alpha = tf.reduce_mean(gradients, axis=(1, 2))
    return tf.nn.relu(tf.einsum("nhwk,nk->nhw", activations, alpha)).numpy()


def _reference_heatmaps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Maps resized bilinearly (half-pixel centres) to `size`, each divided by its maximum."""
    resized = tf.image.resize(maps[..., None], size, method="bilinear").numpy()[..., 0]
    return resized / resized.max(axis=(1, 2), keepdims=True)


def _reference_logits(forward: Forward, images: np.ndarray) -> np.ndarray:
    return forward(tf.constant(images))[1].numpy()


def _assert_maps_close(got, expected, rtol=1e-4):
    """Equal within rtol of each map's largest value; the maps must not be all zero."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape
    assert (expected.max(axis=(-2, -1)) > 0).all()
    scale = expected.max(axis=(-2, -1), keepdims=True)
    np.testing.assert_allclose(got / scale, expected / scale, atol=rtol, rtol=0)


def _assert_panels_show(panels, images, heatmaps, classes, logits, atol=3):
    """Each panel is the documented picture: overlay, colour bar, 'class c', 'score y^c'.

    `atol` absorbs jet's 256-colour quantisation of float rounding differences.
    """
    pictures = overlay(images, heatmaps)
    assert len(panels) == len(images)
    for i, panel in enumerate(panels):
        c = int(classes[i])
        lines = [f"class {c}", f"score {logits[i, c]:.3g}"]
        expected = compose_panel(pictures[i], lines)
        assert panel.shape == expected.shape
        np.testing.assert_allclose(panel, expected, atol=atol, rtol=0, err_msg=f"image {i}")


# ------------------------------------------------------------------ helpers


def _images(count: int = 4, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, size, size, 3), dtype=np.float32)


def _fit_with_callback(
    model, images, log_dir, *, labels=LABELS, from_logits=True, **kwargs
) -> tuple[GradCAMCallback, list]:
    """One epoch, learning rate 0, with a strict callback on (images, labels); the panels."""
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
    )
    trainable = [w.numpy().copy() for w in model.trainable_weights]
    callback = GradCAMCallback(
        (images, labels), log_dir=log_dir, target="labels", strict=True, **kwargs
    )
    x, y = _images(16, images.shape[1], seed=1), np.arange(16) % CLASSES
    model.fit(x, y, epochs=1, batch_size=8, callbacks=[callback], verbose=0)
    for before, after in zip(trainable, model.trainable_weights, strict=True):
        np.testing.assert_array_equal(before, after.numpy())
    logged = {tag: value for step, tag, value in read_events(Path(log_dir)) if step == 0}
    return callback, [decode_image(logged[f"gradcam/image_{i}"]) for i in range(len(images))]


def _explain_with_cli(tmp_path, model, images, args) -> tuple[np.ndarray, keras.Model]:
    """`tf-gradcam explain` on the saved model: (the decoded images, the loaded model)."""
    path = tmp_path / "model.keras"
    model.save(path)
    folder = tmp_path / "in"
    folder.mkdir()
    paths = _save_images(folder, images)
    assert main(["explain", str(path), *paths, "--out", str(tmp_path / "out"), *args]) == 0
    return _decoded(paths), keras.models.load_model(path)


def _assert_cli_outputs(tmp_path, decoded, expected: tf_gradcam.Explanation):
    """Saved maps equal the API's maps; the PNGs its overlays (colormap quantisation)."""
    for i in range(len(decoded)):
        written = np.load(tmp_path / "out" / f"img{i}_gradcam.npy")
        _assert_maps_close(written, expected.maps[i])
        png = cv2.imread(str(tmp_path / "out" / f"img{i}_gradcam.png"))
        png = cv2.cvtColor(png, cv2.COLOR_BGR2RGB)
        rgb = (decoded[i] * 255).round().astype(np.uint8)
        np.testing.assert_allclose(png, overlay(rgb, expected.heatmaps[i]), atol=3)


# ------------------------------------------------------------------ Grad-CAM


@pytest.mark.parametrize("kind", SEQUENTIAL_KINDS + NESTED_KINDS)
@pytest.mark.parametrize("name", ["conv1", "conv2"])
def test_gradcam_equals_the_tape_reference(kind, name):
    """Maps and heatmaps at either convolution equal the hand-made tape's, by path or name."""
    model = _model(kind)
    images = _images()
    layer = f"backbone/{name}" if kind in NESTED_KINDS else name
    result = GradCAM(model, layer)(images, target=LABELS)
    assert result.layer == layer
    maps = _reference_maps(_layer_by_layer(model, name), images, LABELS)
    _assert_maps_close(result.maps, maps)
    np.testing.assert_allclose(
        result.heatmaps, _reference_heatmaps(maps, (SIZE, SIZE)), atol=1e-4, rtol=0
    )
    if name == "conv2":  # the default layer is the last convolution
        np.testing.assert_allclose(GradCAM(model)(images, target=LABELS).maps, result.maps)


# ------------------------------------------------------------------ guided methods


def _guided_reference(model: keras.Model, images: np.ndarray, classes) -> np.ndarray:
    """∂y^c/∂x through a flat twin whose ReLUs are guided by hand (`tf_gradcam.guided_relu`)."""
    guided = _twin(model, activation=tf_gradcam.guided_relu)
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        score = tf.reduce_sum(tf.gather(guided(x), classes, axis=1, batch_dims=1))
    return tape.gradient(score, x).numpy()


@pytest.mark.parametrize("kind", SEQUENTIAL_KINDS)
def test_sequential_guided_methods(kind):
    """GuidedBackprop and GuidedGradCAM on a Sequential model equal the hand-guided twin's.

    Guided Grad-CAM is the guided gradients times the Grad-CAM heatmap (`GuidedGradCAM`'s
    docstring).
    """
    model = _model(kind)
    images = _images()
    expected = _guided_reference(model, images, LABELS)
    got = GuidedBackprop(model)(images, target=LABELS).gradients
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * scale)
    x = tf.constant(images)  # guided really differs from the plain gradient here
    with tf.GradientTape() as tape:
        tape.watch(x)
        score = tf.reduce_sum(tf.gather(model(x), LABELS, axis=1, batch_dims=1))
    assert np.abs(tape.gradient(score, x).numpy() - expected).max() > 1e-3

    result = GuidedGradCAM(model, "conv2")(images, target=LABELS)
    maps = _reference_maps(_layer_by_layer(model, "conv2"), images, LABELS)
    heatmaps = _reference_heatmaps(maps, (SIZE, SIZE))
    np.testing.assert_allclose(
        result.gradients, expected * heatmaps[..., None], rtol=0, atol=1e-4 * scale
    )
    twin = GuidedGradCAM(_twin(model), "conv2")(images, target=LABELS)
    np.testing.assert_allclose(result.gradients, twin.gradients, rtol=1e-5, atol=1e-6 * scale)


# ------------------------------------------------------------------ GradCAMCallback


def _assert_callback_matches(tmp_path, model, layer, twin_layer, leaf):
    """The callback's panels on `model` at `layer` equal those on a flat functional twin at
    `twin_layer` and the documented picture of the tape reference at the leaf `leaf`."""
    images = _images()
    twin = _twin(model)
    kwargs = {} if layer is None else {"layer": layer}
    callback, panels = _fit_with_callback(model, images, tmp_path / "model", **kwargs)
    kwargs = {} if twin_layer is None else {"layer": twin_layer}
    _, twin_panels = _fit_with_callback(twin, images, tmp_path / "twin", **kwargs)
    for panel, twin_panel in zip(panels, twin_panels, strict=True):
        np.testing.assert_allclose(panel, twin_panel, atol=1, rtol=0)
    forward = _layer_by_layer(model, leaf)
    heatmaps = _reference_heatmaps(_reference_maps(forward, images, LABELS), (SIZE, SIZE))
    _assert_panels_show(panels, images, heatmaps, LABELS, _reference_logits(forward, images))
    return callback


@pytest.mark.parametrize("kind", SEQUENTIAL_KINDS)
def test_sequential_callback(tmp_path, kind):
    """Sequential model, default layer (conv2): the panels of the flat twin and the reference."""
    callback = _assert_callback_matches(tmp_path, _model(kind), None, None, "conv2")
    assert callback.explainer.layer == "conv2"


@pytest.mark.parametrize("kind", NESTED_KINDS)
def test_nested_callback(tmp_path, kind):
    """Backbone nested in a classifier, layer='backbone/conv1' (a path): as the flat twin."""
    callback = _assert_callback_matches(tmp_path, _model(kind), "backbone/conv1", "conv1", "conv1")
    assert callback.explainer.layer == "backbone/conv1"


def _mobilenet(size: int = 64) -> keras.Model:
    keras.utils.set_random_seed(5)
    return keras.applications.MobileNetV2(
        weights=None, input_shape=(size, size, 3), classes=CLASSES, alpha=0.35
    )


def _mobilenet_forward(model: keras.Model, layer: str) -> Forward:
    """The common recipe (valid for this flat model): a sub-model with the layer's output and
    the features before the softmax classifier, whose logits are computed by hand."""
    sub = keras.Model(model.inputs, [model.get_layer(layer).output, model.layers[-1].input])
    kernel, bias = model.layers[-1].get_weights()

    def forward(x):
        activations, features = sub(x, training=False)
        return activations, features @ kernel + bias

    return forward


def test_applications_callback(tmp_path):
    """MobileNetV2 (random weights, 64×64) at block_13_expand_relu (4×4): the documented
    panels of the tape reference, scores before the softmax."""
    model = _mobilenet()
    assert model.layers[-1].name == "predictions"  # Dense(3, softmax)
    for layer in model.layers:  # frozen BatchNorm: inference mode in fit, statistics kept
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False
    weights = model.get_weights()
    images = _images(size=64)
    labels = np.array([0, 2, 0, 2])  # class 1 has all-zero maps with these weights
    callback, panels = _fit_with_callback(
        model, images, tmp_path, labels=labels, from_logits=False, layer="block_13_expand_relu"
    )
    assert callback.explainer.layer == "block_13_expand_relu"
    for before, after in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    forward = _mobilenet_forward(model, "block_13_expand_relu")
    maps = _reference_maps(forward, images, labels)
    assert maps.shape == (4, 4, 4) and (maps.max(axis=(1, 2)) > 0).all()
    heatmaps = _reference_heatmaps(maps, (64, 64))
    _assert_panels_show(panels, images, heatmaps, labels, _reference_logits(forward, images))


@pytest.mark.filterwarnings("ignore:Gradients do not exist:UserWarning")  # Net.extra, unused
@pytest.mark.parametrize(
    ("layer", "twin_layer", "depth"), [("blocks/0", "t_b0", 1), ("blocks/1", "last", 2)]
)
def test_subclassed_callback(tmp_path, layer, twin_layer, depth):
    """Subclassed `Net` with layer='blocks/<i>': the panels of its functional twin and the
    documented picture of the tape reference over the net's own layers."""
    net = _net()
    images = _images()
    callback, panels = _fit_with_callback(net, images, tmp_path / "net", layer=layer)
    assert callback.explainer.layer == layer
    _, twin_panels = _fit_with_callback(
        _subclassed_twin(net), images, tmp_path / "twin", layer=twin_layer
    )
    for panel, twin_panel in zip(panels, twin_panels, strict=True):
        np.testing.assert_allclose(panel, twin_panel, atol=1, rtol=0)

    def forward(x):
        x = net.stem(x)
        for block in net.blocks[:depth]:
            x = block(x)
        activations = x
        for block in net.blocks[depth:]:
            x = block(x)
        return activations, net.head(net.pool(x))

    heatmaps = _reference_heatmaps(_reference_maps(forward, images, LABELS), (SIZE, SIZE))
    _assert_panels_show(panels, images, heatmaps, LABELS, _reference_logits(forward, images))


# ------------------------------------------------------------------ CLI


@pytest.mark.parametrize("kind", SEQUENTIAL_KINDS)
def test_sequential_cli(tmp_path, capsys, kind):
    """`explain` on a saved Sequential model, default layer: maps of the API on the loaded
    model and of the tape reference on the original one."""
    model = _model(kind)
    images = _images(2)
    decoded, loaded = _explain_with_cli(tmp_path, model, images, ["--class", "2"])
    assert "layer conv2," in capsys.readouterr().out
    classes = np.array([2, 2])
    expected = GradCAM(loaded, "conv2")(decoded, target=classes)
    _assert_cli_outputs(tmp_path, decoded, expected)
    reference = _reference_maps(_layer_by_layer(model, "conv2"), decoded, classes)
    _assert_maps_close(expected.maps, reference)


@pytest.mark.parametrize("kind", NESTED_KINDS)
def test_nested_cli(tmp_path, capsys, kind):
    """`explain --layer backbone/conv1` (a path into the nested backbone): maps of the API on
    the loaded model and of the tape reference on the original one."""
    model = _model(kind)
    images = _images(2)
    args = ["--class", "2", "--layer", "backbone/conv1"]
    decoded, loaded = _explain_with_cli(tmp_path, model, images, args)
    assert "layer backbone/conv1," in capsys.readouterr().out
    classes = np.array([2, 2])
    expected = GradCAM(loaded, "backbone/conv1")(decoded, target=classes)
    _assert_cli_outputs(tmp_path, decoded, expected)
    reference = _reference_maps(_layer_by_layer(model, "conv1"), decoded, classes)
    _assert_maps_close(expected.maps, reference)


def test_applications_cli(tmp_path, capsys):
    """`explain --layer block_13_expand_relu` on a saved MobileNetV2 (random weights, 64×64,
    a 4×4 map): maps of the API on the loaded model and of the tape reference (before the
    softmax)."""
    model = _mobilenet()
    images = _images(2, size=64)
    layer = "block_13_expand_relu"
    decoded, loaded = _explain_with_cli(tmp_path, model, images, ["--class", "0", "--layer", layer])
    assert f"layer {layer}," in capsys.readouterr().out
    classes = np.array([0, 0])
    expected = GradCAM(loaded, layer)(decoded, target=classes)
    _assert_cli_outputs(tmp_path, decoded, expected)
    reference = _reference_maps(_mobilenet_forward(model, layer), decoded, classes)
    _assert_maps_close(expected.maps, reference)
