"""Grad-CAM at several layers from one pass (Appendix B.1, Fig. 13)."""

from __future__ import annotations

import keras
import matplotlib.image
import numpy as np
import pytest
from conftest import make_cnn
from keras import layers

from tf_gradcam import GradCAM, TopK
from tf_gradcam.errors import LayerNotFoundError, NotSpatialError
from tf_gradcam.layerwise import MultiLayerGradCAM, explain_layers, plot_layers


def _nested_model() -> keras.Model:
    """A backbone model nested inside the classifier, to exercise paths."""
    inner_in = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3, activation="relu", name="b_conv1")(inner_in)
    x = layers.MaxPooling2D(name="b_pool")(x)
    x = layers.Conv2D(5, 3, activation="relu", name="b_conv2")(x)
    backbone = keras.Model(inner_in, x, name="backbone")
    outer_in = keras.Input((16, 16, 3), name="image")
    y = layers.Conv2D(3, 1, activation="relu", name="top_conv")(backbone(outer_in))
    y = layers.Flatten()(y)
    outputs = layers.Dense(3, activation="softmax", name="head")(y)
    return keras.Model(outer_in, outputs, name="nested")


def _assert_same(result, reference):
    for field in ("heatmaps", "maps", "raw_maps", "weights", "scores"):
        np.testing.assert_allclose(
            getattr(result, field), getattr(reference, field), rtol=1e-5, atol=1e-6
        )
    np.testing.assert_array_equal(result.classes, reference.classes)
    np.testing.assert_array_equal(result.degenerate, reference.degenerate)


@pytest.mark.filterwarnings("ignore:.*all zero:RuntimeWarning")
def test_each_layer_equals_single_layer_gradcam(images):
    """Every layer's explanation equals GradCAM(model, layer) on the same target."""
    model = _nested_model()
    results = explain_layers(model, images, target=[0, 1, 2, 1])
    assert list(results) == ["backbone/b_conv1", "backbone/b_pool", "backbone/b_conv2", "top_conv"]
    for path, result in results.items():
        assert result.layer == path
        _assert_same(result, GradCAM(model, path)(images, target=[0, 1, 2, 1]))


def test_top_k_and_options_match_single_layer(images, cnn):
    """TopK targets and engine options (max pooling, no ReLU) pass through to each layer."""
    cams = MultiLayerGradCAM(cnn, ["conv1", "last_conv"], pooling="max", relu=False)
    results = cams(images, target=TopK(2))
    for path in ("conv1", "last_conv"):
        reference = GradCAM(cnn, path, pooling="max", relu=False)(images, target=TopK(2))
        assert results[path].heatmaps.shape == (4, 2, 16, 16)
        _assert_same(results[path], reference)


def test_one_trace_for_repeated_calls(images, cnn):
    """All layers share one compiled step, not retraced for another batch of the same size."""
    cams = MultiLayerGradCAM(cnn)
    cams(images, target=1)
    cams(images[::-1], target=2)
    assert cams.trace_count == 1
    assert cams.layers == ["conv1", "last_conv"]


def test_unknown_or_flat_layer_is_rejected(cnn):
    """Layers are resolved like GradCAM's: unknown names and non-4-D outputs fail early."""
    with pytest.raises(LayerNotFoundError, match="conv_9"):
        MultiLayerGradCAM(cnn, ["conv1", "conv_9"])
    with pytest.raises(NotSpatialError, match="gap"):
        MultiLayerGradCAM(cnn, ["gap"])
    flat_in = keras.Input((4,))
    with pytest.raises(NotSpatialError, match="no layer with a 4-D"):
        MultiLayerGradCAM(keras.Model(flat_in, layers.Dense(2)(flat_in)))


def test_plot_layers_writes_one_row_per_image(tmp_path, images):
    """The PNG has one row per image and a column per layer plus the input."""
    model = make_cnn()
    results = explain_layers(model, images[:2], target=0)
    path = tmp_path / "layers.png"
    figure = plot_layers(images[:2], results, path, size=1.0)
    picture = matplotlib.image.imread(path)
    width, height = figure.get_size_inches() * figure.dpi
    assert picture.shape[:2] == (round(height), round(width))
    assert len(figure.axes) == 2 * (len(results) + 1)
    with pytest.raises(ValueError, match="TopK"):
        plot_layers(images, explain_layers(model, images, target=TopK(2)))


def test_wrong_length_targets_inside_tf_function_are_named(cnn, images):
    """MultiLayerGradCAM runs through the engine's one `_run`: the same target checks."""
    import tensorflow as tf

    cams = MultiLayerGradCAM(cnn, ["conv1", "last_conv"])

    @tf.function(input_signature=[tf.TensorSpec((None, 16, 16, 3))])
    def dynamic(batch):
        return cams.compute(batch, target=[0, 1, 2])["last_conv"].heatmaps

    with pytest.raises(tf.errors.InvalidArgumentError, match="gives 3 classes but the batch"):
        dynamic(tf.constant(images))


@pytest.mark.parametrize("method", ["gradcam++", "layercam", "hirescam"])
def test_every_layer_gets_the_named_method(method):
    """method=: each layer's explanation is that method's on that layer alone."""
    import tf_gradcam

    model = _nested_model()
    images = np.random.default_rng(4).random((3, 16, 16, 3), dtype=np.float32)
    paths = ["backbone/b_conv1", "backbone/b_conv2", "top_conv"]
    results = MultiLayerGradCAM(model, paths, method=method)(images, target=1)
    assert isinstance(results, tf_gradcam.LayerExplanations) and isinstance(results, dict)
    cls = tf_gradcam.methods.get_method(method)
    for path in paths:
        _assert_same(results[path], cls(model, path)(images, target=1))


def test_layercam_fusion_is_the_max_of_tanh_scaled_upsampled_maps():
    """fused(): tanh(γ·M/max M) per layer, bilinear to the input size, element-wise max (eq. 9)."""
    import tensorflow as tf

    model = _nested_model()
    images = np.random.default_rng(5).random((2, 16, 16, 3), dtype=np.float32)
    results = MultiLayerGradCAM(model, ["backbone/b_conv1", "backbone/b_conv2"], method="layercam")(
        images, target=2
    )
    expected = None
    for explanation in results.values():
        maps = explanation.maps.astype(np.float64)
        high = maps.max(axis=(1, 2), keepdims=True)
        scaled = np.tanh(2.0 * np.divide(maps, high, out=np.zeros_like(maps), where=high > 0))
        up = tf.image.resize(scaled[..., None], (16, 16), method="bilinear").numpy()[..., 0]
        expected = up if expected is None else np.maximum(expected, up)
    fused = results.fused()
    np.testing.assert_allclose(fused, expected, atol=1e-5)
    # the shallow layer wins somewhere and the deep one elsewhere: a real fusion
    shallow, deep = (np.asarray(e.heatmaps) for e in results.values())
    assert (shallow > deep + 0.05).any() and (deep > shallow + 0.05).any()
    plain = results.fused(gamma=0)
    assert np.abs(plain - fused).max() > 0.05


def test_methods_without_per_layer_gradient_steps_are_refused(cnn):
    """Score-CAM needs its own passes per layer; Grad-CAM's ablations belong to Grad-CAM."""
    import tf_gradcam

    with pytest.raises(tf_gradcam.UnknownMethodError, match="method='scorecam'"):
        MultiLayerGradCAM(cnn, method="scorecam")
    with pytest.raises(ValueError, match="pooling"):
        MultiLayerGradCAM(cnn, method="layercam", pooling="max")
    with pytest.raises(ValueError, match="gamma=-1"):
        MultiLayerGradCAM(cnn, ["conv1"])(np.zeros((1, 16, 16, 3), np.float32)).fused(gamma=-1)
