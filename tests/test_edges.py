"""Inputs and models at the edges: typed errors that name the fix, and no stale state."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_cnn
from keras import layers

import tf_gradcam
from tf_gradcam import GradCAM, InputError, TargetError, explain


def _sequential() -> keras.Sequential:
    return keras.Sequential(
        [layers.Conv2D(4, 3, activation="relu"), layers.GlobalAveragePooling2D(), layers.Dense(2)]
    )


def test_explain_cache_notices_a_changed_sequential(images):
    """After pop() + add(), explain() explains the new head, not the cached old one."""
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Conv2D(4, 3, activation="relu", name="conv"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(2, name="old_head"),
        ]
    )
    before = explain(model, images, target=1, layer="conv")
    model.pop()
    model.add(layers.Dense(3, name="new_head"))
    after = explain(model, images, target=2, layer="conv")
    kernel = model.get_layer("new_head").kernel.numpy()[:, 2]
    np.testing.assert_allclose(after.weights, np.tile(kernel / 196, (4, 1)), rtol=1e-5)
    assert not np.allclose(before.weights, after.weights[:, :4])


def test_built_by_a_call_sequential_knows_its_input(images):
    """A Sequential built by calling it: wrong channels are an InputError; one image is a batch."""
    model = _sequential()
    model(images)
    with pytest.raises(InputError, match="expects 3 channels"):
        GradCAM(model)(images[..., :1])
    single = GradCAM(model)(images[0], target=1)
    batch = GradCAM(model)(images[:1], target=1)
    np.testing.assert_allclose(single.heatmaps, batch.heatmaps, atol=1e-6)


def test_unbuilt_sequential_takes_a_single_image_and_names_a_bad_shape(images):
    """Never called: a single image gains its batch axis (the first layer wants rank 4)."""
    single = GradCAM(_sequential())(images[0], target=1)
    assert single.heatmaps.shape == (1, 16, 16)
    with pytest.raises(InputError, match="cannot run on images shaped"):
        GradCAM(keras.Sequential([layers.Dense(2), layers.Conv2D(2, 3)]))(np.ones((2, 5)))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (lambda out: None, "returned None"),
        (lambda out: np.asarray(out)[:, 0], "converts a tensor to NumPy"),
    ],
)
def test_callable_targets_that_cannot_work_are_named(images, target, message):
    with pytest.raises(TargetError, match=message):
        GradCAM(make_cnn())(images, target=target)


def test_ragged_images_are_an_input_error(images):
    with pytest.raises(InputError, match=r"different shapes.*\(8, 16, 3\), \(16, 16, 3\)"):
        GradCAM(make_cnn())([images[0], images[1, :8]])


def test_wrong_length_targets_inside_tf_function(images):
    """Static batch: TargetError (not AutoGraph's StagingError); dynamic batch: a named assert."""
    cam = GradCAM(make_cnn())

    @tf.function
    def static(batch):
        return cam.compute(batch, target=[0, 1, 2]).heatmaps

    with pytest.raises(TargetError, match="3 classes for 4 images"):
        static(tf.constant(images))

    @tf.function(input_signature=[tf.TensorSpec((None, 16, 16, 3))])
    def dynamic(batch):
        return cam.compute(batch, target=[0, 1, 2]).heatmaps

    with pytest.raises(tf.errors.InvalidArgumentError, match="gives 3 classes but the batch"):
        dynamic(tf.constant(images))
    np.testing.assert_allclose(
        dynamic(tf.constant(images[:3])).numpy(),
        cam(images[:3], target=[0, 1, 2]).heatmaps,
        atol=1e-6,
    )


def _uint8_model() -> keras.Model:
    inputs = keras.Input((16, 16, 3), dtype="uint8")
    x = layers.Rescaling(1 / 255)(inputs)
    x = layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    outputs = layers.Dense(2)(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def test_float_images_into_a_uint8_input(images):
    """[0, 1] floats would be cut to zeros: refused with the cause; whole floats equal uint8."""
    model = _uint8_model()
    with pytest.raises(InputError, match=r"input is uint8.*fractions are cut.*\* 255"):
        GradCAM(model)(images)
    with pytest.raises(InputError, match="a cast to uint8 would change"):
        GradCAM(model)(np.full((1, 16, 16, 3), 300.0, np.float32))
    pixels = np.round(images * 255).astype(np.uint8)
    as_float = GradCAM(model)(pixels.astype(np.float32), target=1)
    as_uint8 = GradCAM(model)(pixels, target=1)
    np.testing.assert_array_equal(as_float.heatmaps, as_uint8.heatmaps)
    assert not as_uint8.degenerate.all()


def test_out_of_vocabulary_token_ids_are_an_input_error(images):
    """A question input read by an Embedding: ids past its vocabulary name the Embedding."""
    image = keras.Input((16, 16, 3), name="image")
    question = keras.Input((5,), dtype="int32", name="question")
    pooled = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3, activation="relu")(image))
    words = layers.GlobalAveragePooling1D()(layers.Embedding(20, 4)(question))
    model = keras.Model([image, question], layers.Dense(3)(layers.Concatenate()([pooled, words])))
    cam = GradCAM(model)
    good = np.tile(np.arange(1, 6), (4, 1))
    assert cam([images, good], target=0).heatmaps.shape == (4, 16, 16)
    with pytest.raises(InputError, match=r"Token id 25 is outside the vocabulary .* 0\.\.19"):
        cam([images, np.where(good == 5, 25, good)], target=0)
    with pytest.raises(InputError, match="Token id -5"):
        cam([images, -good], target=0)


def test_errors_keep_their_type_through_autograph():
    """GradCAMError subclasses use Exception's constructor, which AutoGraph re-raises by type."""
    assert tf_gradcam.TargetError.__init__ is Exception.__init__
    error = tf_gradcam.InputError("message")
    assert isinstance(error, ValueError) and str(error) == "message"
