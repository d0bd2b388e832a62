"""AttentionRollout against attention computed by hand from the query/key/value kernels.

The reference recomputes each block's attention probabilities from its input
(the model's own blocks called in turn), its first LayerNorm and the
`MultiHeadAttention`'s kernels, with NumPy (rollout) or with a tape over a
forward pass whose attention is written out in TensorFlow ops (gradients),
then rolls them out in NumPy.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_gradcam
from tf_gradcam.attention import AttentionRollout
from tf_gradcam.errors import TargetError, UnsupportedModelError

keras_hub = pytest.importorskip("keras_hub")

IMAGES = np.random.default_rng(21).random((3, 32, 32, 3), dtype=np.float32)


def _vit(*, pooling: str = "token") -> keras.Model:
    keras.utils.set_random_seed(9)
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    return keras_hub.models.ViTImageClassifier(
        backbone=backbone,
        num_classes=4,
        pooling=pooling,
        intermediate_dim=8,
        activation="softmax",
        preprocessor=None,
    )


def _parts(model):
    encoder = model.backbone.get_layer("vit_encoder")
    return model.backbone.get_layer("vit_patching_and_embedding"), encoder, encoder.encoder_layers


def _layer_norm(x, layer):
    mean = x.mean(-1, keepdims=True)
    variance = x.var(-1, keepdims=True)
    normed = (x - mean) / np.sqrt(variance + layer.epsilon)
    return normed * layer.gamma.numpy() + layer.beta.numpy()


def _numpy_attentions(model, images):
    """Each block's attention probabilities (batch, heads, tokens, tokens), in float64."""
    embedding, _, blocks = _parts(model)
    x = embedding(images)
    found = []
    for block in blocks:
        normed = _layer_norm(x.numpy().astype(np.float64), block.layer_norm_1)
        mha = block.mha
        q = np.einsum("btd,dhk->bthk", normed, mha.query_dense.kernel.numpy())
        k = np.einsum("btd,dhk->bthk", normed, mha.key_dense.kernel.numpy())
        q += mha.query_dense.bias.numpy()
        k += mha.key_dense.bias.numpy()
        logits = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        found.append(weights / weights.sum(-1, keepdims=True))
        x = block(x, training=False)
    return found


def _rollout(attentions):
    tokens = attentions[0].shape[-1]
    relevance = np.eye(tokens)[None]
    for probabilities in attentions:
        mixed = 0.5 * probabilities.mean(axis=1) + 0.5 * np.eye(tokens)
        mixed /= mixed.sum(-1, keepdims=True)
        relevance = mixed @ relevance
    return relevance[:, 0, 1:].reshape(-1, 4, 4)


def _gradient_attention(model, images, classes):
    """Chefer et al.'s accumulation from a tape over attention written in TF ops."""
    embedding, encoder, blocks = _parts(model)
    with tf.GradientTape() as tape:
        x = embedding(images)
        probabilities = []
        for block in blocks:
            mha = block.mha
            normed = block.layer_norm_1(x)
            q = tf.einsum("btd,dhk->bthk", normed, mha.query_dense.kernel) + mha.query_dense.bias
            k = tf.einsum("btd,dhk->bthk", normed, mha.key_dense.kernel) + mha.key_dense.bias
            v = tf.einsum("btd,dhk->bthk", normed, mha.value_dense.kernel) + mha.value_dense.bias
            weights = tf.nn.softmax(tf.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1]))
            tape.watch(weights)
            probabilities.append(weights)
            context = tf.einsum("bhqt,bthk->bqhk", weights, v)
            x = x + tf.einsum("bqhk,hkd->bqd", context, mha.output_dense.kernel)
            x = x + mha.output_dense.bias
            x = x + block.mlp(block.layer_norm_2(x))
        pooled = model.intermediate_layer(encoder.layer_norm(x)[:, 0])
        logits = pooled @ model.output_dense.kernel + model.output_dense.bias
        scores = tf.gather(logits, classes, axis=1, batch_dims=1)
    gradients = tape.gradient(scores, probabilities)
    tokens = probabilities[0].shape[-1]
    relevance = np.repeat(np.eye(tokens)[None], len(images), axis=0)
    for weights, gradient in zip(probabilities, gradients, strict=True):
        weighted = np.maximum(gradient.numpy() * weights.numpy(), 0).mean(axis=1)
        relevance = relevance + weighted @ relevance
    return relevance[:, 0, 1:].reshape(-1, 4, 4), scores.numpy(), logits.numpy()


def test_rollout_equals_the_attention_recomputed_from_the_kernels():
    """Abnar & Zuidema's rollout of attention recomputed in NumPy; the class does not matter."""
    model = _vit()
    result = AttentionRollout(model)(IMAGES)
    expected = _rollout(_numpy_attentions(model, IMAGES))
    np.testing.assert_allclose(result.maps, expected, rtol=1e-4, atol=1e-6)
    up = tf_gradcam.image.upsample_maps(expected, (32, 32)).numpy()
    np.testing.assert_allclose(result.heatmaps, up / up.max(axis=(1, 2), keepdims=True), atol=1e-5)
    logits = model.predict(IMAGES, verbose=0)
    np.testing.assert_array_equal(result.classes, logits.argmax(axis=1))
    other = AttentionRollout(model)(IMAGES, target=2)
    np.testing.assert_allclose(other.maps, result.maps, rtol=1e-6)
    assert np.ptp(expected, axis=(1, 2)).min() > 1e-4  # not a constant map


def test_gradient_weighted_attention_equals_a_tape_over_written_out_attention():
    """Chefer et al.'s maps for given and predicted classes; scores before the softmax."""
    model = _vit()
    rollout = AttentionRollout(model, gradients=True)
    for classes in ([0, 1, 3], [2, 2, 2]):
        result = rollout(IMAGES, target=classes)
        expected, scores, _ = _gradient_attention(model, IMAGES, tf.constant(classes))
        np.testing.assert_allclose(result.maps, expected, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-6)
        assert np.abs(expected).max() > 1e-5
    predicted = rollout(IMAGES)
    _, _, logits = _gradient_attention(model, IMAGES, tf.constant([0, 0, 0]))
    np.testing.assert_array_equal(predicted.classes, logits.argmax(axis=1))
    by_class = [rollout(IMAGES, target=c).maps for c in range(2)]
    assert np.abs(by_class[0] - by_class[1]).max() > 1e-4 * np.abs(by_class[0]).max()


def test_other_models_and_bad_targets_are_refused():
    """A CNN, an average-pooled ViT, a block computing otherwise, bad class indices."""
    cnn = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3), keras.layers.Flatten()]
    )
    with pytest.raises(UnsupportedModelError, match="class-token Vision Transformer"):
        AttentionRollout(cnn)
    with pytest.raises(UnsupportedModelError, match="class-token Vision Transformer"):
        AttentionRollout(_vit(pooling="gap"))
    model = _vit()
    rollout = AttentionRollout(model)
    for target in (4, -1, [0, 1], [[0]], 1.5):
        with pytest.raises(TargetError):
            rollout(IMAGES, target=target)
    last = _parts(model)[2][-1]

    class ShiftedBlock(type(last)):
        def call(self, inputs):
            return super().call(inputs) + tf.reduce_mean(inputs, axis=1, keepdims=True)

    last.__class__ = ShiftedBlock
    with pytest.raises(UnsupportedModelError, match="written-out forward pass"):
        AttentionRollout(model)(IMAGES)


def test_exported_from_the_package():
    """`tf_gradcam.AttentionRollout` is the class of `tf_gradcam.attention`."""
    assert tf_gradcam.AttentionRollout is AttentionRollout
