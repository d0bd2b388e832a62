"""Grad-CAM on subclassed models: the layer's output is captured during the model's call.

The reference is a hand-written functional twin with the same weights; the
user's model must come out unchanged (attributes, weights, outputs, the
patched `Layer.__call__`), and no other thread or explainer may see a capture.
"""

from __future__ import annotations

import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import tf_gradcam
from tf_gradcam import (
    GradCAM,
    InputError,
    LayerNotFoundError,
    NotSpatialError,
    TopK,
    UnsupportedModelError,
)
from tf_gradcam import capture as capture_module
from tf_gradcam.capture import capturing

LAYER_CALL = keras.layers.Layer.__dict__["__call__"]


class Net(keras.Model):
    """conv → [conv, conv] in a Python list (a `for` loop) → optional conv (`if`) → GAP → Dense."""

    def __init__(self, *, use_extra: bool = False, shared: bool = False, head: str | None = None):
        super().__init__(name="net")
        self.stem = layers.Conv2D(4, 3, activation="relu", name="stem")
        self.blocks = [
            layers.Conv2D(6, 3, activation="relu", name="b0"),
            layers.Conv2D(5, 3, activation="relu", name="b1"),
        ]
        self.extra = layers.Conv2D(5, 1, name="extra")
        self.pool = layers.GlobalAveragePooling2D()
        self.head = layers.Dense(
            3, activation=head, kernel_initializer=keras.initializers.RandomUniform(-0.5, 1.0)
        )
        self.use_extra = use_extra
        self.shared = shared
        self.explode = False

    def build(self, input_shape):
        shape = input_shape
        for layer in (self.stem, *self.blocks):
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.extra.build(shape)
        self.head.build((None, shape[-1]))

    def call(self, x, training=False):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        if self.shared:
            x = self.extra(self.extra(x))
        if self.use_extra:
            x = self.extra(x)
        if self.explode:
            raise RuntimeError("boom in call()")
        return self.head(self.pool(x))


def _twin(net: Net) -> keras.Model:
    """An independent functional model with copies of the net's weights."""
    inputs = keras.Input((16, 16, 3))
    stem = layers.Conv2D(4, 3, activation="relu")
    b0 = layers.Conv2D(6, 3, activation="relu", name="t_b0")
    b1 = layers.Conv2D(5, 3, activation="relu", name="last")
    head = layers.Dense(3)
    outputs = head(layers.GlobalAveragePooling2D()(b1(b0(stem(inputs)))))
    twin = keras.Model(inputs, outputs)
    for mine, theirs in ((stem, net.stem), (b0, net.blocks[0]), (b1, net.blocks[1])):
        mine.set_weights(theirs.get_weights())
    head.set_weights(net.head.get_weights())
    return twin


def _net(**kwargs) -> Net:
    net = Net(**kwargs)
    net(np.zeros((1, 16, 16, 3), np.float32))
    return net


@pytest.fixture
def net() -> Net:
    return _net()


def _assert_clean() -> None:
    assert keras.layers.Layer.__dict__["__call__"] is LAYER_CALL
    assert capture_module._INSTALLED == {}
    assert capture_module._CAPTURES.get() is None


def _assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


@pytest.mark.parametrize("by", ["path", "object"])
def test_maps_equal_a_functional_twin(net, images, by):
    layer = "blocks/1" if by == "path" else net.blocks[1]
    cam, ref = GradCAM(net, layer), GradCAM(_twin(net), "last")
    for target in (None, 2, TopK(2)):
        mine, theirs = cam(images, target=target), ref(images, target=target)
        for field in ("maps", "weights", "heatmaps", "raw_maps", "scores"):
            _assert_close(getattr(mine, field), getattr(theirs, field))
        np.testing.assert_array_equal(mine.classes, theirs.classes)
    assert cam.layer == "blocks/1"
    assert np.abs(mine.maps).max() > 0
    _assert_clean()


def test_eigencam_and_scorecam_equal_the_twin_and_ablationcam_is_refused(net, images):
    twin = _twin(net)
    _assert_close(
        tf_gradcam.EigenCAM(net, "blocks/0")(images).heatmaps,
        tf_gradcam.EigenCAM(twin, "t_b0")(images).heatmaps,
    )
    for options in ({}, {"probabilities": False}):
        _assert_close(
            tf_gradcam.ScoreCAM(net, "blocks/1", **options)(images, target=2).heatmaps,
            tf_gradcam.ScoreCAM(twin, "last", **options)(images, target=2).heatmaps,
        )
    with pytest.raises(UnsupportedModelError, match="subclassed"):
        tf_gradcam.AblationCAM(net, "blocks/1")(images)
    with pytest.raises(UnsupportedModelError, match="custom `call_override`"):
        GradCAM(net, "blocks/1", call_override=lambda layer: None)(images)
    _assert_clean()


def test_gradients_reach_a_layer_with_no_variables_upstream(images):
    """The captured output is watched as it is produced: ops after it without
    variables (a bare ReLU) are recorded, so ∂y/∂A exists."""

    class Scaled(keras.Model):
        def __init__(self):
            super().__init__()
            self.scale = layers.Rescaling(2.0, offset=-1.0)
            self.conv = layers.Conv2D(4, 3)
            self.pool = layers.GlobalAveragePooling2D()
            self.head = layers.Dense(3)

        def call(self, x):
            x = keras.ops.relu(self.scale(x))
            return self.head(self.pool(self.conv(x)))

    model = Scaled()
    model(images)
    result = GradCAM(model, "scale", relu=False)(images, target=1)
    a = tf.constant(images * 2.0 - 1.0)
    with tf.GradientTape() as tape:
        tape.watch(a)
        score = model.head(model.pool(model.conv(keras.ops.relu(a))))[:, 1]
    grads = tape.gradient(score, a).numpy()
    weights = grads.mean(axis=(1, 2))
    _assert_close(result.weights[:, 0] if result.weights.ndim == 3 else result.weights, weights)
    _assert_close(
        result.raw_maps[:, 0] if result.raw_maps.ndim == 4 else result.raw_maps,
        np.einsum("nhwc,nc->nhw", a.numpy(), weights),
    )
    _assert_clean()


def _snapshot(net: Net) -> dict:
    objects = [net, *(layer for _, layer in capture_module.layer_candidates(net))]
    return {id(obj): {k: id(v) for k, v in vars(obj).items()} for obj in objects}


def test_the_model_is_unchanged(net, images):
    net(images)  # first eager call on this shape before the snapshot
    before = _snapshot(net)
    weights = [w.numpy().copy() for w in net.weights]
    outputs = net(images).numpy()
    cam = GradCAM(net, "blocks/1")
    cam(images)
    cam(images, target=TopK(2))
    assert _snapshot(net) == before
    for w, old in zip(net.weights, weights, strict=True):
        np.testing.assert_array_equal(w.numpy(), old)
    np.testing.assert_array_equal(net(images).numpy(), outputs)
    np.testing.assert_array_equal(net.predict(images, verbose=0), outputs)
    assert type(net).call is Net.call and "call" not in vars(net)
    _assert_clean()


def test_the_patch_is_undone_when_the_target_or_the_call_raises(net, images):
    def target(outputs):
        raise KeyError("target failed")

    with pytest.raises(KeyError, match="target failed"):
        GradCAM(net, "blocks/1")(images, target=target)
    _assert_clean()
    net.explode = True
    with pytest.raises(RuntimeError, match="boom"):
        GradCAM(net, "blocks/1")(images)
    _assert_clean()
    with pytest.raises(RuntimeError, match="boom"), capturing(net.blocks[1]) as capture:
        net(images)
    assert capture.calls == 1
    _assert_clean()
    net.explode = False
    assert net(images).shape == (4, 3)


def test_a_capture_is_invisible_to_other_threads(net, images):
    """While a capture is open here, another thread's forward pass is not recorded."""
    reference = net(images).numpy()
    seen = []
    with capturing(net.blocks[1]) as capture:
        worker = threading.Thread(target=lambda: seen.append(net(images).numpy()))
        worker.start()
        worker.join()
        assert capture.calls == 0 and capture.value is None
    np.testing.assert_array_equal(seen[0], reference)
    _assert_clean()


def test_threads_predicting_and_explaining_meanwhile(net, images):
    reference_output = net(images).numpy()
    alone = {path: GradCAM(net, path)(images, target=1).maps for path in ("blocks/0", "blocks/1")}
    stop, errors, outputs = threading.Event(), [], []

    def predict():
        try:
            while not stop.is_set():
                outputs.append(net(images).numpy())
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    results: dict[str, list] = {"blocks/0": [], "blocks/1": []}

    def explain(path):
        try:
            for _ in range(3):  # fresh explainers: each traces under a capture
                results[path].append(GradCAM(net, path)(images, target=1).maps)
        except Exception as error:
            errors.append(error)

    predictor = threading.Thread(target=predict)
    explainers = [threading.Thread(target=explain, args=(p,)) for p in results]
    predictor.start()
    for thread in explainers:
        thread.start()
    for thread in explainers:
        thread.join()
    stop.set()
    predictor.join()
    assert not errors, errors
    assert outputs
    for output in outputs:
        np.testing.assert_array_equal(output, reference_output)
    for path, maps in results.items():
        for m in maps:
            _assert_close(m, alone[path])
    _assert_clean()


def test_no_retracing(net, images):
    cam = GradCAM(net, "blocks/1")
    cam(images, target=0)
    count = cam.trace_count
    for target in (1, 2, [0, 1, 2, 0]):
        cam(images, target=target)
    cam(images[::-1].copy(), target=1)
    assert cam.trace_count == count == 1


def test_shared_layer_is_refused(images):
    net = _net(shared=True)
    with pytest.raises(LayerNotFoundError, match=r"'extra' is called 2 times.*shared"):
        GradCAM(net, "extra")(images)
    _assert_clean()
    GradCAM(net, "blocks/1")(images)  # the other layers are fine


def test_branch_not_taken_is_a_typed_error(images):
    net = _net(use_extra=False)
    with pytest.raises(LayerNotFoundError, match="'extra' is not called"):
        GradCAM(net, "extra")(images)
    _assert_clean()
    net.use_extra = True
    assert GradCAM(net, "extra")(images).heatmaps.shape == (4, 16, 16)


def test_layer_errors_list_candidates(net, images):
    with pytest.raises(LayerNotFoundError, match=r"no 'block'.*'blocks/1'"):
        GradCAM(net, "block/1")
    with pytest.raises(LayerNotFoundError, match=r"no '7'.*'blocks/0'"):
        GradCAM(net, "blocks/7")
    with pytest.raises(LayerNotFoundError, match=r"Pass `layer=`.*'blocks/1'"):
        GradCAM(net)
    with pytest.raises(LayerNotFoundError, match="not part of model"):
        GradCAM(net, layers.Conv2D(2, 3))
    with pytest.raises(NotSpatialError, match=r"output shape \(None, 5\)"):
        GradCAM(net, "pool")(images)
    assert GradCAM(net, "blocks/b1")(images).layer == "blocks/b1"  # a sublayer's name


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_a_softmax_in_call_is_explained_before_it(images, head):
    """The paper's y^c is the pre-softmax score: found as the Softmax op's input."""
    net = _net(head=head)
    features = net.pool(net.blocks[1](net.blocks[0](net.stem(images))))
    kernel, bias = net.head.get_weights()
    logits = features.numpy() @ kernel + bias
    result = GradCAM(net, "blocks/1")(images)
    _assert_close(result.scores, logits.max(axis=1))
    twin = _twin(net)  # Dense without activation: the logits model
    _assert_close(result.heatmaps, GradCAM(twin, "last")(images).heatmaps)
    probabilities = GradCAM(net, "blocks/1", logits=False)(images)
    _assert_close(probabilities.scores, net(images).numpy().max(axis=1))
    assert not np.allclose(probabilities.scores, result.scores)


def test_several_inputs_are_refused(images):
    net = _net(head="softmax")
    with pytest.raises(UnsupportedModelError, match="one image input"):
        GradCAM(net, "blocks/1")({"a": images, "b": images})
    with pytest.raises(InputError):
        GradCAM(net, "blocks/1")(images[0, 0])
