"""The default layer of fully-convolutional classifiers: the feature map, not the class scores.

A head `Conv2D(classes) → GlobalAveragePooling2D → Softmax` (Network in
Network, SqueezeNet, mini-Xception) makes the pooled channel c the score y^c,
so Grad-CAM at that convolution is just ReLU(A^c / Z). `layer=None` steps back
to the feature layer that feeds it (`benchmarks/default_layer.py` measured
both); a convolution with as many channels as classes that a Dense layer reads
is a feature layer and stays the default.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

from tf_gradcam import GradCAM, layer_paths

CLASSES = 3


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(5).random((3, 16, 16, 3), dtype=np.float32)


def _trunk(inputs):
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="conv1")(inputs)
    return layers.Conv2D(5, 3, padding="same", activation="relu", name="features")(x)


def _class_head(x, *, kernel=3, after=(), ending="softmax_layer", conv=layers.Conv2D):
    """Conv(CLASSES, kernel, 'class_conv') → *after → GAP → the ending."""
    x = conv(CLASSES, kernel, padding="same", name="class_conv")(x)
    for layer in after:
        x = layer(x)
    if ending == "softmax_layer":
        return layers.Softmax(name="softmax")(layers.GlobalAveragePooling2D(name="gap")(x))
    if ending == "sigmoid_activation":
        return layers.Activation("sigmoid")(layers.GlobalAveragePooling2D(name="gap")(x))
    if ending == "softmax_operation":
        return keras.ops.softmax(layers.GlobalAveragePooling2D(name="gap")(x))
    if ending == "keepdims_flatten":  # SqueezeNet in keras-contrib style
        x = layers.GlobalAveragePooling2D(keepdims=True, name="gap")(x)
        return layers.Activation("softmax")(layers.Flatten()(x))
    if ending == "none":  # pooled features: an embedding, or logits nobody can tell apart
        return layers.GlobalAveragePooling2D(name="gap")(x)
    if ending == "dense":  # the control: the pooled channels are features of a Dense head
        x = layers.GlobalAveragePooling2D(name="gap")(x)
        return layers.Dense(CLASSES, activation="softmax", name="head")(x)
    raise ValueError(ending)


def _model(**head) -> keras.Model:
    inputs = keras.Input((16, 16, 3))
    return keras.Model(inputs, _class_head(_trunk(inputs), **head), name="fcn")


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize(
    "ending", ["softmax_layer", "sigmoid_activation", "softmax_operation", "keepdims_flatten"]
)
def test_class_score_convolution_gives_way_to_the_feature_layer(kernel, ending):
    assert GradCAM(_model(kernel=kernel, ending=ending)).layer == "features"


def test_separable_class_convolution_too():
    assert GradCAM(_model(conv=layers.SeparableConv2D)).layer == "features"


def test_same_convolutions_with_a_dense_head_keep_the_last_convolution():
    """`class_conv` has CLASSES channels, but a Dense layer reads them: they are features."""
    model = _model(ending="dense")
    assert model.get_layer("class_conv").filters == model.output.shape[-1]
    assert GradCAM(model).layer == "class_conv"


def test_without_softmax_or_sigmoid_the_pooled_channels_are_features():
    """Conv → GAP as the output is a feature extractor (`pooling="avg"`): left alone."""
    assert GradCAM(_model(ending="none")).layer == "class_conv"
    backbone = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), include_top=False, pooling="avg"
    )  # Conv_1 → Conv_1_bn → out_relu → GAP: a convolution, its BN and ReLU, then pooling
    assert GradCAM(backbone).layer == "out_relu"


def test_class_convolution_on_pooled_features_of_a_dense_head_is_left_alone():
    """GAP → Dense → Softmax after a CLASSES-channel conv + ReLU: the ReLU stays the default."""
    model = _model(after=[layers.ReLU(name="relu")], ending="dense")
    assert GradCAM(model).layer == "relu"


@pytest.mark.parametrize(
    "after, expected_path",
    [
        ([layers.Activation("relu", name="relu")], "features"),
        ([layers.ReLU(name="relu")], "features"),
        ([layers.BatchNormalization(name="bn"), layers.Activation("relu")], "features"),
        ([layers.BatchNormalization(name="bn"), layers.SpatialDropout2D(0.2)], "features"),
    ],
)
def test_the_class_convolutions_own_activation_and_batch_norm_are_stepped_over(
    after, expected_path
):
    assert GradCAM(_model(after=after)).layer == expected_path


def test_dropout_and_pooling_between_features_and_class_convolution_are_stepped_over():
    """SqueezeNet: fire9 → Dropout → conv10 → ReLU → GAP → softmax; the feature map is fire9's."""
    inputs = keras.Input((16, 16, 3))
    x = layers.MaxPooling2D(name="pool")(_trunk(inputs))
    x = layers.Dropout(0.5, name="dropout")(x)
    model = keras.Model(inputs, _class_head(x, kernel=1, after=[layers.ReLU()]))
    assert GradCAM(model).layer == "features"


def test_a_feature_map_inside_a_nested_backbone():
    """The features are the last layer of a nested backbone; the class head is outside."""
    inner = keras.Input((16, 16, 3))
    backbone = keras.Model(inner, _trunk(inner), name="backbone")
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, _class_head(backbone(inputs)), name="outer")
    assert GradCAM(model).layer == "backbone/features"


def test_the_class_head_inside_a_nested_model():
    """The class convolution, its pooling and softmax form a nested `classifier` model."""
    features = keras.Input((16, 16, 5))
    classifier = keras.Model(features, _class_head(features, after=[layers.ReLU()]), name="cls")
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, classifier(_trunk(inputs)), name="outer")
    assert GradCAM(model).layer == "features"
    wrapper = keras.Model(inputs, model(inputs), name="wrapper")  # one more level
    assert GradCAM(wrapper).layer == "outer/features"


def _sequential(*head: layers.Layer) -> keras.Sequential:
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Conv2D(6, 3, padding="same", activation="relu", name="conv1"),
            layers.Conv2D(5, 3, padding="same", activation="relu", name="features"),
            layers.Conv2D(CLASSES, 1, name="class_conv"),
            layers.BatchNormalization(name="bn"),
            layers.ReLU(name="relu"),
            layers.GlobalAveragePooling2D(),
            *head,
        ]
    )


def test_sequential_model(images):
    """A Sequential model declared with `keras.Input` resolves its layer on the first batch."""
    assert GradCAM(_sequential(layers.Softmax()))(images).layer == "features"
    control = _sequential(layers.Dense(CLASSES, activation="softmax"))
    assert GradCAM(control)(images).layer == "relu"


def test_class_convolution_reading_the_image_has_nothing_to_step_back_to():
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, _class_head(inputs))
    assert GradCAM(model).layer == "class_conv"


def test_a_layer_that_does_not_feed_the_class_convolution_is_never_picked():
    """A backbone's second output, unused, comes between the features and the class
    convolution in call order; the graph check refuses it and the default stays put."""
    inner = keras.Input((16, 16, 3))
    features = _trunk(inner)
    unused = layers.Conv2D(5, 1, name="unused")(features)
    backbone = keras.Model(inner, [features, unused], name="backbone")
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, _class_head(backbone(inputs)[0]), name="outer")
    assert layer_paths(model).index("backbone/unused") < layer_paths(model).index("class_conv")
    assert GradCAM(model).layer == "class_conv"


def test_default_equals_the_feature_layer_and_the_class_conv_is_its_own_channel(images):
    """The default's maps are the feature layer's; at `class_conv` they are ReLU(A^c) / Z."""
    model = _model(kernel=3)
    targets = np.array([0, 1, 2])
    default = GradCAM(model)(images, target=targets)
    explicit = GradCAM(model, "features")(images, target=targets)
    assert default.layer == explicit.layer == "features"
    np.testing.assert_array_equal(default.maps, explicit.maps)
    np.testing.assert_array_equal(default.heatmaps, explicit.heatmaps)
    np.testing.assert_array_equal(default.weights, explicit.weights)

    # The other choice stays available: at the class-score convolution, α is 1/Z on the
    # target's channel and 0 elsewhere, so the map is that channel, scaled.
    at_scores = GradCAM(model, "class_conv")(images, target=targets)
    assert at_scores.layer == "class_conv"
    channels = keras.Model(model.input, model.get_layer("class_conv").output)(images).numpy()
    area = 16 * 16
    np.testing.assert_allclose(at_scores.weights, np.eye(CLASSES)[targets] / area, atol=1e-7)
    own = channels[np.arange(3), :, :, targets] / area
    np.testing.assert_allclose(at_scores.raw_maps, own, rtol=1e-5, atol=1e-7)
    assert not np.allclose(at_scores.heatmaps, default.heatmaps, atol=1e-3)


def test_demo_model_keeps_last_conv():
    from tf_gradcam.demo_model import DEMO_LAYER_NAME, load_demo_model

    assert GradCAM(load_demo_model()).layer == DEMO_LAYER_NAME
