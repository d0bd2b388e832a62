"""The class-token shortcut (`tf_gradcam.class_token`) against the full forward pass.

The reference is a `tf.GradientTape` over a keras-hub `ViTImageClassifier`
unrolled by hand with every block run on every token, as the model runs, and
the scores taken before the head's softmax from the head's own weights.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_gradcam
from tf_gradcam.capture import SubclassedGradientModel
from tf_gradcam.class_token import ClassTokenGradientModel, class_token_tail

keras_hub = pytest.importorskip("keras_hub")

IMAGES = np.random.default_rng(11).random((3, 32, 32, 3), dtype=np.float32)


def _vit(*, num_layers: int = 3, pooling: str = "token", seed: int = 5) -> keras.Model:
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=num_layers,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )
    return keras_hub.models.ViTImageClassifier(
        backbone=backbone,
        num_classes=4,
        pooling=pooling,
        intermediate_dim=8,
        activation="softmax",
        preprocessor=None,
    )


def _encoder(model: keras.Model):
    return model.backbone.get_layer("vit_encoder")


def _reference(model: keras.Model, images: np.ndarray, block: int, target: int):
    """Grad-CAM at block `block`'s output by a tape over the full, unrolled classifier."""
    embedding = model.backbone.get_layer("vit_patching_and_embedding")
    encoder = _encoder(model)
    with tf.GradientTape() as tape:
        x = embedding(images)  # the encoder's dropout: identity at inference
        for i, layer in enumerate(encoder.encoder_layers):
            x = layer(x, training=False)
            if i == block:
                activations = x
                tape.watch(activations)
        x = encoder.layer_norm(x)
        pooled = x[:, 0] if model.pooling == "token" else tf.reduce_mean(x, axis=1)
        hidden = model.intermediate_layer(pooled)
        dense = model.output_dense
        logits = hidden @ dense.kernel + dense.bias  # before the head's softmax
        score = logits[:, target]
    gradients = tape.gradient(score, activations).numpy()
    alpha = gradients[:, 1:].mean(axis=1)  # the class token left out (it is always there)
    raw = np.einsum("bnc,bc->bn", activations.numpy()[:, 1:], alpha).reshape(-1, 4, 4)
    return alpha, raw, score.numpy()


def _assert_matches_reference(result, model, block: int, target: int) -> None:
    alpha, raw, score = _reference(model, IMAGES, block, target)
    np.testing.assert_allclose(result.weights, alpha, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(result.raw_maps, raw, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(result.scores, score, atol=1e-5, rtol=1e-4)
    assert np.abs(raw).max() > 1e-3  # the comparison is not between zeros


def test_the_shortcut_gives_the_full_forward_passs_maps():
    """Default layer and an earlier block: shortcut taken, maps equal the full tape's."""
    model = _vit()
    encoder = _encoder(model)
    for block, layer in ((1, None), (0, encoder.encoder_layers[0])):
        cam = tf_gradcam.GradCAM(model, layer)
        assert isinstance(cam.gradient_model, ClassTokenGradientModel)
        assert cam.gradient_model.tail is not None and cam.gradient_model.tail.index == block
        for target in (0, 3):
            _assert_matches_reference(cam(IMAGES, target=target), model, block, target)


def test_top_k_and_counterfactual_maps_through_the_shortcut():
    """Top-2 maps and counterfactual maps equal their full-tape references."""
    model = _vit()
    cam = tf_gradcam.GradCAM(model)
    top = cam(IMAGES, target=tf_gradcam.TopK(2))
    for rank in range(2):
        for image in range(len(IMAGES)):
            target = int(top.classes[image, rank])
            alpha, raw, _ = _reference(model, IMAGES[image : image + 1], 1, target)
            np.testing.assert_allclose(top.raw_maps[image, rank], raw[0], atol=1e-5, rtol=1e-4)
    counter = tf_gradcam.GradCAM(model, counterfactual=True)(IMAGES, target=2)
    alpha, raw, _ = _reference(model, IMAGES, 1, 2)
    np.testing.assert_allclose(counter.weights, -alpha, atol=1e-5, rtol=1e-4)


def test_the_last_block_and_layers_inside_it_run_the_model_as_it_is():
    """No shortcut where the last block's patch tokens are needed: plain capture."""
    model = _vit()
    last = _encoder(model).encoder_layers[-1]
    for layer in (last, last.layer_norm_1):
        gradient_model = tf_gradcam.GradCAM(model, layer).gradient_model
        assert type(gradient_model) is SubclassedGradientModel
    assert class_token_tail(model, last) is None


def test_average_pooled_vits_and_custom_reshapes_are_run_as_they_are():
    """pooling="gap" reads every token and `reshape=` takes over: no shortcut, same maps."""
    model = _vit(pooling="gap")
    cam = tf_gradcam.GradCAM(model, _encoder(model).encoder_layers[1])
    assert type(cam.gradient_model) is SubclassedGradientModel
    _assert_matches_reference(cam(IMAGES, target=1), model, 1, 1)

    model = _vit()
    grid = lambda tokens: tf.reshape(tokens[:, 1:], (-1, 4, 4, 16))  # noqa: E731
    cam = tf_gradcam.GradCAM(model, _encoder(model).encoder_layers[1], reshape=grid)
    assert type(cam.gradient_model) is SubclassedGradientModel
    _assert_matches_reference(cam(IMAGES, target=1), model, 1, 1)


def test_a_block_that_computes_otherwise_falls_back_with_a_warning():
    """When the shortcut does not reproduce the model's outputs, the model runs as it is."""
    model = _vit()
    last = _encoder(model).encoder_layers[-1]

    class ScaledBlock(type(last)):
        """A block with the same parts whose call differs (a mean over the tokens added)."""

        def call(self, inputs):
            return super().call(inputs) + tf.reduce_mean(inputs, axis=1, keepdims=True)

    last.__class__ = ScaledBlock
    with pytest.warns(UserWarning, match="class-token shortcut"):
        cam = tf_gradcam.GradCAM(model, _encoder(model).encoder_layers[1])
        assert cam.gradient_model.tail is None
    _assert_matches_reference(cam(IMAGES, target=0), model, 1, 0)


def test_the_users_model_is_left_as_it_was():
    """Building and running the shortcut adds no layer, node or weight change to the model."""
    model = _vit()
    config = model.get_config()
    layers = [layer.name for layer in model.backbone.layers]
    weights = [w.numpy().copy() for w in model.weights]
    before = model.predict(IMAGES, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cam = tf_gradcam.GradCAM(model)
        cam(IMAGES)
    assert cam.gradient_model.tail is not None  # the probe check passed: no fallback
    assert not [w for w in caught if "class-token" in str(w.message)]
    assert model.get_config() == config
    assert [layer.name for layer in model.backbone.layers] == layers
    for old, new in zip(weights, model.weights, strict=True):
        np.testing.assert_array_equal(old, new.numpy())
    np.testing.assert_array_equal(model.predict(IMAGES, verbose=0), before)
