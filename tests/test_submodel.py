"""Layer resolution and gradient models across model families; the user's model stays untouched."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from conftest import make_cnn
from keras import layers

import tf_gradcam
from tf_gradcam import (
    GradCAM,
    InputError,
    LayerNotFoundError,
    NoGradientError,
    NotSpatialError,
    TargetError,
    layer_paths,
)


def _reference_map(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.maximum(np.einsum("nhwk,nk->nhw", features, weights), 0)


def _nested_three_levels():
    """image → level1(level2(level3 conv stack)) → GAP → softmax head."""
    x_in = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3, activation="relu", name="deep_conv")(x_in)
    level3 = keras.Model(x_in, x, name="level3")
    y_in = keras.Input((16, 16, 3))
    level2 = keras.Model(
        y_in, layers.Conv2D(5, 1, activation="relu", name="mid")(level3(y_in)), name="level2"
    )
    z_in = keras.Input((16, 16, 3))
    level1 = keras.Model(z_in, level2(z_in), name="level1")
    inputs = keras.Input((16, 16, 3))
    x = layers.GlobalAveragePooling2D()(level1(inputs))
    return keras.Model(inputs, layers.Dense(3, activation="softmax", name="head")(x), name="outer")


def test_nested_models_by_path_name_and_object(images):
    """A layer three models deep is found by path, by bare name and by object, with equal maps."""
    model = _nested_three_levels()
    by_path = GradCAM(model, "level1/level2/level3/deep_conv")(images, target=1)
    by_name = GradCAM(model, "deep_conv")(images, target=1)
    layer = model.get_layer("level1").get_layer("level2").get_layer("level3").get_layer("deep_conv")
    by_object = GradCAM(model, layer)(images, target=1)
    assert by_path.layer == by_name.layer == by_object.layer == "level1/level2/level3/deep_conv"
    np.testing.assert_allclose(by_name.maps, by_path.maps)
    np.testing.assert_allclose(by_object.maps, by_path.maps)


def test_nested_auto_layer_is_innermost_last_conv(images):
    """layer=None picks the last 4-D layer inside nested models, not the wrapper model."""
    model = _nested_three_levels()
    assert GradCAM(model).layer == "level1/level2/mid"
    assert layer_paths(model, spatial_only=True) == [
        "level1/level2/level3/deep_conv",
        "level1/level2/level3",
        "level1/level2/mid",
        "level1/level2",
        "level1",
    ]


def test_nested_cam_identity(images):
    """Inside a nested backbone the CAM identity still holds: α = W[:, c] / Z."""
    model = _nested_three_levels()
    result = GradCAM(model, "mid")(images, target=2)
    kernel = model.get_layer("head").kernel.numpy()
    np.testing.assert_allclose(result.weights, np.tile(kernel[:, 2] / 196, (4, 1)), rtol=1e-5)


def test_transfer_learning_with_keras_applications_backbone(images):
    """A keras.applications backbone (weights=None) nested in a functional model works."""
    backbone = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), include_top=False, weights=None, alpha=0.35
    )
    inputs = keras.Input((32, 32, 3))
    x = backbone(inputs, training=False)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(4, activation="softmax")(x))
    cam = GradCAM(model)
    assert cam.layer == f"{backbone.name}/out_relu"
    x32 = np.random.default_rng(1).random((2, 32, 32, 3), np.float32)
    result = cam(x32, target=0)
    assert result.maps.shape == (2, 1, 1) and np.isfinite(result.heatmaps).all()
    by_path = GradCAM(model, f"{backbone.name}/block_13_expand_relu")(x32, target=0)
    assert by_path.maps.shape == (2, 2, 2)


def test_sequential_declared_with_input_never_called(images):
    """A Sequential model with keras.Input that was never called gives CAM-identity weights."""
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Conv2D(4, 3, activation="relu", name="c"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(2, activation="softmax", name="d"),
        ]
    )
    result = GradCAM(model)(images, target=1)
    assert result.layer == "c"
    np.testing.assert_allclose(
        result.weights, np.tile(model.get_layer("d").kernel.numpy()[:, 1] / 196, (4, 1)), rtol=1e-5
    )


def test_sequential_built_by_call_accepts_other_batch_sizes(images):
    """A Sequential model built by calling it on one image explains batches of any size."""
    model = keras.Sequential(
        [layers.Conv2D(4, 3, activation="relu"), layers.GlobalAveragePooling2D(), layers.Dense(2)]
    )
    model(images[:1])
    result = GradCAM(model)(images, target=0)
    assert result.heatmaps.shape == (4, 16, 16)


def test_sequential_nested_in_sequential(images):
    """A Sequential feature extractor inside a Sequential classifier is expanded."""
    features = keras.Sequential(
        [layers.Conv2D(4, 3, activation="relu", name="f1"), layers.Conv2D(3, 3, name="f2")],
        name="features",
    )
    model = keras.Sequential(
        [keras.Input((16, 16, 3)), features, layers.GlobalAveragePooling2D(), layers.Dense(2)]
    )
    result = GradCAM(model, "features/f1")(images, target=1)
    assert result.layer == "features/f1" and result.maps.shape == (4, 14, 14)


def test_unbuilt_sequential_is_built_from_the_images(images):
    """A Sequential model with no Input and never called is wired from the first batch's shape."""
    model = keras.Sequential(
        [layers.Conv2D(4, 3, activation="relu"), layers.GlobalAveragePooling2D(), layers.Dense(2)]
    )
    model.build((None, 16, 16, 3))
    assert GradCAM(model)(images).heatmaps.shape == (4, 16, 16)


def test_sequential_never_built_nor_called_is_wired_from_the_first_batch(images):
    """No Input, no build(), never called: the first batch's shape builds it; CAM identity holds."""
    model = keras.Sequential(
        [layers.Conv2D(4, 3, activation="relu"), layers.GlobalAveragePooling2D(), layers.Dense(2)]
    )
    assert not model.built and not model.layers[0].built
    result = GradCAM(model)(images, target=1)
    conv, _, dense = model.layers
    features = conv(images).numpy()  # the layer's own weights, built by the first call
    kernel = dense.kernel.numpy()
    z = features.shape[1] * features.shape[2]
    np.testing.assert_allclose(result.weights, np.tile(kernel[:, 1] / z, (4, 1)), rtol=1e-5)
    cam = np.einsum("nhwk,k->nhw", features, kernel[:, 1])
    np.testing.assert_allclose(result.raw_maps * z, cam, rtol=1e-5, atol=1e-5 * np.abs(cam).max())
    np.testing.assert_allclose(result.scores, model(images).numpy()[:, 1], rtol=1e-6)
    assert result.heatmaps.shape == (4, 16, 16)


def _vqa_like():
    image = keras.Input((16, 16, 3), name="image")
    question = keras.Input((6,), name="question")
    f = layers.Conv2D(4, 3, activation="relu", name="conv")(image)
    pooled = layers.GlobalAveragePooling2D()(f)
    q = layers.Dense(4, activation="relu")(question)
    joint = layers.Multiply()([pooled, q])
    answer = layers.Dense(3, name="answer")(joint)
    aux = layers.Dense(2, name="aux")(q)
    return keras.Model({"image": image, "question": question}, {"answer": answer, "aux": aux})


def test_multi_input_multi_output(images):
    """Image + question inputs, dict outputs: class targets index the chosen output."""
    model = _vqa_like()
    questions = np.random.default_rng(3).random((4, 6), np.float32)
    cam = GradCAM(model, output="answer")
    result = cam({"image": images, "question": questions}, target=2)
    # independent computation: α_k = W[k, 2] * q_k / Z with q = relu(question dense)
    q_layer = next(layer for layer in model.layers if isinstance(layer, layers.Dense))
    q = np.maximum(questions @ q_layer.kernel.numpy() + q_layer.bias.numpy(), 0)
    w = model.get_layer("answer").kernel.numpy()[:, 2]
    np.testing.assert_allclose(result.weights, q * w / 196, rtol=1e-5, atol=1e-9)
    with pytest.raises(NoGradientError, match="does not depend on layer"):
        GradCAM(model, output="aux")({"image": images, "question": questions}, target=0)


def test_dict_input_model_gives_no_keras_warning(images):
    """The gradient model's fresh inputs carry the dict keys as names (Keras warns otherwise)."""
    model = _vqa_like()
    questions = np.random.default_rng(3).random((4, 6), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        cam = GradCAM(model, output="answer")
        cam({"image": images, "question": questions}, target=2)


def test_multi_output_list_and_callable_targets(images):
    """List outputs: `output=` picks the scored head; a callable reads any of them."""
    inputs = keras.Input((16, 16, 3))
    f = layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    pooled = layers.GlobalAveragePooling2D()(f)
    model = keras.Model(
        inputs, [layers.Dense(2)(pooled), layers.Dense(3, activation="softmax")(pooled)]
    )
    second = GradCAM(model, output=1)(images, target=2)
    by_callable = GradCAM(model)(images, target=lambda outs: outs[1][:, 2])
    np.testing.assert_allclose(by_callable.weights, second.weights, rtol=1e-6)
    with pytest.raises(TargetError, match="out of range"):
        GradCAM(model)(images, target=2)  # the first output has 2 classes


def test_subclassed_model_is_explained_once_a_layer_is_named():
    """A subclassed model: `layer=None` asks for a layer; with one, it is explained."""

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = layers.Conv2D(2, 3)
            self.head = layers.Dense(2)

        def call(self, x):
            return self.head(keras.ops.mean(self.conv(x), axis=(1, 2)))

    net = Net()
    net(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(LayerNotFoundError, match=r"layer=.*'conv'"):
        GradCAM(net)
    result = GradCAM(net, "conv")(np.random.default_rng(0).random((2, 8, 8, 3), np.float32))
    assert result.heatmaps.shape == (2, 8, 8)
    assert result.layer == "conv"


def test_model_unchanged_after_explaining(images):
    """Weights, activations, nodes, BatchNorm statistics and predictions are untouched."""
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3, name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.Activation("relu", name="act")(x)
    x = layers.Dropout(0.5)(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(3, activation="softmax", name="head")(x))
    before_weights = [w.copy() for w in model.get_weights()]
    before_pred = model.predict(images, verbose=0)
    activations = {layer.name: getattr(layer, "activation", None) for layer in model.layers}
    nodes = {layer.name: len(layer._inbound_nodes) for layer in model.layers}

    cam = GradCAM(model, "act")
    first = cam(images, target=0)
    second = cam(images, target=0)
    np.testing.assert_array_equal(first.heatmaps, second.heatmaps)  # Dropout is off

    for before, after in zip(before_weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(model.predict(images, verbose=0), before_pred)
    assert {layer.name: getattr(layer, "activation", None) for layer in model.layers} == activations
    assert {layer.name: len(layer._inbound_nodes) for layer in model.layers} == nodes
    assert model.get_layer("head").activation is keras.activations.softmax
    assert model.get_layer("conv").output.shape == (None, 14, 14, 4)  # still single-node


def test_explainer_sees_weight_updates(images):
    """The gradient model shares the user's variables: new weights give new maps."""
    model = make_cnn(activation=None)
    cam = GradCAM(model)
    before = cam(images, target=0).weights
    head = model.get_layer("head")
    head.set_weights([head.kernel.numpy() * 2.0, head.bias.numpy()])
    np.testing.assert_allclose(cam(images, target=0).weights, 2.0 * before, rtol=1e-5)


def test_unknown_layer_lists_closest_names(cnn):
    """A misspelt layer name raises LayerNotFoundError naming the closest layers."""
    with pytest.raises(
        LayerNotFoundError, match=r"No layer 'last_cnv'.*Closest names: \['last_conv'"
    ):
        GradCAM(cnn, "last_cnv")


def test_ambiguous_layer_name_asks_for_a_path():
    """The same name in two nested models is refused with both paths listed."""

    def block(name):
        x_in = keras.Input((8, 8, 3))
        return keras.Model(x_in, layers.Conv2D(3, 1, name="conv")(x_in), name=name)

    inputs = keras.Input((8, 8, 3))
    x = block("b2")(block("b1")(inputs))
    model = keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)))
    with pytest.raises(LayerNotFoundError, match=r"ambiguous.*'b1/conv', 'b2/conv'"):
        GradCAM(model, "conv")


def test_non_spatial_layer_is_refused(cnn):
    """A Dense (2-D output) layer raises NotSpatialError with its shape."""
    with pytest.raises(NotSpatialError, match=r"'gap' has output shape \(None, 5\)"):
        GradCAM(cnn, "gap")


def test_model_without_spatial_layers_is_refused():
    """A model with no 4-D layer has nothing for Grad-CAM to explain."""
    inputs = keras.Input((10,))
    model = keras.Model(inputs, layers.Dense(2)(inputs))
    with pytest.raises(NotSpatialError, match="no layer with a 4-D"):
        GradCAM(model)


def test_layer_of_another_model_is_refused(cnn):
    """A Layer object that is not in the model raises LayerNotFoundError."""
    with pytest.raises(LayerNotFoundError, match="not part of model"):
        GradCAM(cnn, layers.Conv2D(2, 3, name="stranger"))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((16, 16), np.float32), "rank 4"),
        (np.zeros((2, 16, 16), np.float32), "add a channel axis"),
        (np.zeros((2, 16, 16, 1), np.float32), "expects 3 channels"),
        (np.zeros((2, 20, 16, 3), np.float32), "axis 1 has size 20"),
        (np.full((2, 16, 16, 3), np.nan, np.float32), "non-finite"),
        (np.zeros((0, 16, 16, 3), np.float32), "empty batch"),
        (np.array([["a"]]), "numeric"),
    ],
)
def test_bad_images_are_refused(cnn, bad, message):
    """Images of the wrong rank, channels, size, values or dtype raise InputError."""
    with pytest.raises(InputError, match=message):
        GradCAM(cnn)(bad)


def test_single_image_is_a_batch_of_one(cnn, images):
    """A (height, width, channels) image is explained as a batch of one."""
    np.testing.assert_allclose(
        GradCAM(cnn)(images[0]).heatmaps[0], GradCAM(cnn)(images[:1]).heatmaps[0]
    )


@pytest.mark.parametrize(
    "target, message",
    [
        (3, "out of range"),
        (-1, ">= 0"),
        ([0, 1], "2 classes for 4 images"),
        (1.5, "must be None, an int"),
        (True, "not a bool"),
        (tf_gradcam.TopK(4), "more classes"),
    ],
)
def test_bad_targets_are_refused(cnn, images, target, message):
    """Out-of-range, mis-sized and mistyped targets raise TargetError."""
    with pytest.raises(TargetError, match=message):
        GradCAM(cnn)(images, target=target)


def test_callable_returning_wrong_shape_is_refused(cnn, images):
    """A callable target must return one score per image."""
    with pytest.raises(TargetError, match=r"shape \(batch,\)"):
        GradCAM(cnn)(images, target=lambda out: out)


def test_non_tensorflow_backend_is_refused(cnn, monkeypatch):
    """A Keras backend other than TensorFlow raises BackendError naming the fix."""
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(tf_gradcam.BackendError, match="KERAS_BACKEND=tensorflow"):
        GradCAM(cnn)


# ------------------------------------------------ inputs and outputs at the edges


def _two_input_model() -> keras.Model:
    """Named list inputs 'left' (16×16×3) and 'right' (16×16×3), one output."""
    left = keras.Input((16, 16, 3), name="left")
    right = keras.Input((16, 16, 3), name="right")
    f = layers.Conv2D(4, 3, activation="relu", name="conv")(layers.Add()([left, right]))
    outputs = layers.Dense(3, name="head")(layers.GlobalAveragePooling2D()(f))
    return keras.Model([left, right], outputs)


def test_dict_with_a_missing_key_names_the_expected_keys(images):
    """A dict image input without one of the model's keys: InputError listing them all."""
    model = _vqa_like()
    with pytest.raises(InputError, match=r"no entry for the model input\(s\) \['question'\]") as e:
        GradCAM(model, output="answer")({"image": images, "questoin": images[:, 0, 0]})
    assert "['image', 'question']" in str(e.value) and "['questoin'] match no input" in str(e.value)


def test_dict_keyed_by_input_names_for_a_list_input_model(images):
    """Keras accepts a dict keyed by input names for list inputs; so does the engine."""
    model = _two_input_model()
    other = images[::-1].copy()
    cam = GradCAM(model)
    by_list = cam([images, other], target=1)
    by_dict = cam({"right": other, "left": images}, target=1)
    np.testing.assert_array_equal(by_dict.heatmaps, by_list.heatmaps)
    swapped = cam([other, images], target=1)  # the conv sees left + right: the same sum
    np.testing.assert_allclose(swapped.maps, by_list.maps, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match=r"no entry for the model input\(s\) \['right'\]"):
        cam({"left": images}, target=1)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda x: [x], "takes 2 inputs; received 1"),
        (lambda x: [x, x, x], "takes 2 inputs; received 3"),
        (lambda x: [x, x[:3]], r"different batch sizes: \[3, 4\]"),
        (lambda x: x, "takes 2 inputs; received 1"),
    ],
)
def test_wrong_number_of_inputs_or_batch_sizes(images, bad, message):
    """List length and batch-size mismatches are InputErrors naming both numbers."""
    with pytest.raises(InputError, match=message):
        GradCAM(_two_input_model())(bad(images), target=0)


def test_unknown_output_names_and_positions_are_refused_at_construction():
    """`output=` is checked when the explainer is built, on single- and multi-output models."""
    inputs = keras.Input((16, 16, 3))
    f = layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    pooled = layers.GlobalAveragePooling2D()(f)
    heads = [layers.Dense(2, name="first")(pooled), layers.Dense(3, name="second")(pooled)]
    listed = keras.Model(inputs, heads)
    with pytest.raises(TargetError, match=r"names no output.*\['first', 'second'\]"):
        GradCAM(listed, output="secnd")
    with pytest.raises(TargetError, match="not a valid position among the model's 2 outputs"):
        GradCAM(listed, output=2)
    single = keras.Model(inputs, heads[1])
    with pytest.raises(TargetError, match="one output named 'second'"):
        GradCAM(single, output="first")
    with pytest.raises(TargetError, match="one output"):
        GradCAM(single, output=1)
    with pytest.raises(TargetError, match=r"names no output; the model's outputs are \['answer'"):
        GradCAM(_vqa_like(), output="answr")


def test_output_by_name_equals_output_by_position(images):
    """A list-output model's head can be named: the same maps as its position."""
    inputs = keras.Input((16, 16, 3))
    f = layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    pooled = layers.GlobalAveragePooling2D()(f)
    model = keras.Model(
        inputs, [layers.Dense(2, name="a")(pooled), layers.Dense(3, name="b")(pooled)]
    )
    by_name = GradCAM(model, output="b")(images, target=2)
    by_position = GradCAM(model, output=1)(images, target=2)
    np.testing.assert_array_equal(by_name.weights, by_position.weights)
    kernel = model.get_layer("b").kernel.numpy()[:, 2]
    np.testing.assert_allclose(by_name.weights, np.tile(kernel / 196, (4, 1)), rtol=1e-5)
    single = keras.Model(inputs, model.outputs[1])
    named = GradCAM(single, output="b")(images, target=2)  # its only output, by name
    np.testing.assert_allclose(named.weights, by_name.weights, rtol=1e-6)
