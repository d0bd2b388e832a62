"""SimilarityTarget: the cosine between a model's image embedding and a fixed text embedding.

Every expected number comes from a computation that does not go through the
engine: the closed form of Grad-CAM's weights for an image tower made of
convolutional features, global average pooling and a linear projection, and a
`tf.GradientTape` over keras-hub CLIP and SigLIP vision encoders unrolled by
hand (random weights, built from their constructors, nothing downloaded).

For a tower `v = Wᵀ Ā` (Ā the features averaged over the Z = h·w positions,
W the projection, no bias) and `y = s · t̂·v/‖v‖` (t̂ the unit text
embedding, s the scale), `∂y/∂v = s (t̂ − cos · v̂)/‖v‖ =: g` and
`∂y/∂A^k_ij = (W g)_k / Z` at every position, so Grad-CAM's weights are
`α = W g / Z` and its signed map `Σ_k α_k A^k`. Because g ⟂ v, the signed map
sums to `Z α·Ā = g·v = 0` over the positions: the cosine does not change
when the embedding is scaled.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import tf_gradcam
from tf_gradcam import GradCAM, SimilarityTarget, TargetError
from tf_gradcam.methods import METHODS
from tf_gradcam.similarity import image_tower

SIZE, FEATURES, WIDTH = 8, 5, 4


def _assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


# --------------------------------------------------- a hand-built image tower


def _tower(bias: bool = False) -> keras.Model:
    """Conv(3x3, relu, 'features') → GAP → Dense(WIDTH, 'projection'): embeddings (batch, 4)."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input((SIZE, SIZE, 3), name="images")
    a = layers.Conv2D(
        FEATURES,
        3,
        padding="same",
        activation="relu",
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.6, seed=2),
        bias_initializer=keras.initializers.Constant(0.05),
        name="features",
    )(inputs)
    pooled = layers.GlobalAveragePooling2D(name="gap")(a)
    v = layers.Dense(
        WIDTH,
        use_bias=bias,
        kernel_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=3),
        bias_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=4),
        name="projection",
    )(pooled)
    return keras.Model(inputs, v, name="tower")


def _images(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, SIZE, SIZE, 3), dtype=np.float32)


def _texts(n: int = 3, seed: int = 1) -> np.ndarray:
    """Text embeddings of assorted lengths (the target normalises them)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, WIDTH)) * rng.uniform(0.3, 5.0, (n, 1))).astype(np.float32)


def _closed_form(model, images, text, scale=1.0):
    """α = W g / Z, signed map Σ_k α_k A^k, score s·cos, from the weights and features."""
    features = keras.Model(model.input, model.get_layer("features").output)(images).numpy()
    kernel = model.get_layer("projection").get_weights()[0].astype(np.float64)  # (K, d)
    feats = features.astype(np.float64)
    v = feats.mean(axis=(1, 2)) @ kernel  # (batch, d), no bias
    text = np.broadcast_to(np.asarray(text, np.float64), v.shape)
    t_hat = text / np.linalg.norm(text, axis=-1, keepdims=True)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    cosine = np.sum(v / norm * t_hat, axis=-1)
    g = scale * (t_hat - cosine[:, None] * v / norm) / norm  # ∂y/∂v
    alpha = g @ kernel.T / (features.shape[1] * features.shape[2])  # (batch, K)
    raw = np.einsum("bhwk,bk->bhw", feats, alpha)
    return alpha, raw, scale * cosine


def test_gap_projection_tower_gives_the_closed_form():
    model, x = _tower(), _images()
    text = _texts(1)[0]
    result = GradCAM(model, "features")(x, target=SimilarityTarget(text))
    alpha, raw, score = _closed_form(model, x, text)
    _assert_close(result.weights, alpha)
    _assert_close(result.raw_maps, raw)
    _assert_close(result.maps, np.maximum(raw, 0))
    _assert_close(result.scores, score)
    assert result.classes is None
    assert np.abs(alpha).max() > 1e-3 and not result.degenerate.any()


def test_per_image_texts_and_the_scale_give_the_closed_form():
    model, x, texts = _tower(), _images(), _texts(3)
    cam = GradCAM(model, "features")
    result = cam(x, target=SimilarityTarget(texts, scale=14.3))
    alpha, raw, score = _closed_form(model, x, texts, scale=14.3)
    _assert_close(result.weights, alpha, atol=1e-4)
    _assert_close(result.raw_maps, raw, atol=1e-4)
    _assert_close(result.scores, score, atol=1e-4)
    for i in range(3):  # row i of the batch = the same image with text i for everyone
        one = cam(x[i : i + 1], target=SimilarityTarget(texts[i], scale=14.3))
        _assert_close(one.raw_maps[0], result.raw_maps[i], atol=1e-4)
    unscaled = cam(x, target=SimilarityTarget(texts))
    _assert_close(unscaled.heatmaps, result.heatmaps)
    _assert_close(unscaled.weights * 14.3, result.weights, atol=1e-4)


def test_the_signed_map_sums_to_zero_unlike_the_dot_product():
    """Scale invariance of the cosine: g ⟂ v, so Σ_ij Σ_k α_k A^k_ij = g·v = 0."""
    model, x = _tower(), _images()
    text = _texts(1)[0]
    cam = GradCAM(model, "features")
    cosine = cam(x, target=SimilarityTarget(text))
    sums = cosine.raw_maps.sum(axis=(1, 2))
    _assert_close(sums, np.zeros(3), atol=1e-5)
    assert np.abs(cosine.raw_maps).max() > 1e-3
    t = tf.constant(text)

    def dot(v):  # the dot product, not normalised: its signed map sums to t·v, not 0
        return tf.reduce_sum(v * t, axis=-1)

    dot_sums = cam(x, target=dot).raw_maps.sum(axis=(1, 2))
    assert np.abs(dot_sums).min() > 1e-3


def test_a_nonlinear_tower_with_a_bias_equals_the_tape():
    model, x = _tower(bias=True), _images(4, seed=5)
    text = _texts(1, seed=6)[0]
    result = GradCAM(model, "features")(x, target=SimilarityTarget(text, scale=2.5))
    features_model = keras.Model(model.input, model.get_layer("features").output)
    with tf.GradientTape() as tape:
        a = features_model(x)
        tape.watch(a)
        v = model.get_layer("projection")(model.get_layer("gap")(a))
        score = 2.5 * tf.reduce_sum(v * text, -1) / (tf.norm(v, axis=-1) * np.linalg.norm(text))
    gradients = tape.gradient(score, a).numpy()
    alpha = gradients.mean(axis=(1, 2))
    _assert_close(result.weights, alpha)
    _assert_close(result.raw_maps, np.einsum("bhwk,bk->bhw", a.numpy(), alpha))
    _assert_close(result.scores, score.numpy())


def test_the_embeddings_of_a_two_output_model_by_position_and_name():
    tower = _tower()
    other = layers.Dense(3, name="other")(tower.get_layer("gap").output)
    model = keras.Model(tower.inputs, {"logits": other, "embedding": tower.output})
    x, text = _images(), _texts(1)[0]
    expected = GradCAM(tower, "features")(x, target=SimilarityTarget(text))
    by_name = GradCAM(model, "features")(x, target=SimilarityTarget(text, output="embedding"))
    _assert_close(by_name.raw_maps, expected.raw_maps)
    listed = keras.Model(tower.inputs, [other, tower.output])
    by_position = GradCAM(listed, "features")(x, target=SimilarityTarget(text, output=1))
    _assert_close(by_position.raw_maps, expected.raw_maps)


def test_every_method_takes_it_and_a_reused_target_compiles_once():
    model, x = _tower(), _images(2)
    target = SimilarityTarget(_texts(1)[0])
    for method in METHODS:
        result = tf_gradcam.explain(model, x, target, method=method, layer="features")
        assert result.heatmaps.shape == (2, SIZE, SIZE)
        assert np.all(np.isfinite(result.heatmaps))
    cam = GradCAM(model, "features")
    cam(x, target=target)
    traced = cam.trace_count
    cam(_images(2, seed=9), target=target)
    assert cam.trace_count == traced


# ------------------------------------------------------------ keras-hub dual encoders

keras_hub = pytest.importorskip("keras_hub")


def _clip():
    keras.utils.set_random_seed(3)
    vision = keras_hub.models.CLIPVisionEncoder(
        patch_size=8,
        hidden_dim=16,
        num_layers=2,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(32, 32, 3),
    )
    text = keras_hub.models.CLIPTextEncoder(
        vocabulary_size=50,
        embedding_dim=16,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=32,
        max_sequence_length=8,
    )
    return keras_hub.models.CLIPBackbone(
        vision_encoder=vision, text_encoder=text, projection_dim=12
    )


def _siglip():
    keras.utils.set_random_seed(3)
    vision = keras_hub.models.SigLIPVisionEncoder(
        patch_size=8,
        hidden_dim=16,
        num_layers=2,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(32, 32, 3),
    )
    text = keras_hub.models.SigLIPTextEncoder(
        vocabulary_size=50,
        embedding_dim=16,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=32,
        max_sequence_length=8,
    )
    return keras_hub.models.SigLIPBackbone(vision_encoder=vision, text_encoder=text)


def _pair_inputs(seed: int = 4):
    rng = np.random.default_rng(seed)
    images = rng.random((3, 32, 32, 3), dtype=np.float32)
    tokens = rng.integers(1, 49, (3, 8)).astype("int32")
    return images, tokens


def _cosine(v, text):
    text = np.asarray(text, np.float64)
    t_hat = (text / np.linalg.norm(text, axis=-1, keepdims=True)).astype(np.float32)
    return tf.reduce_sum(v * t_hat, axis=-1) / tf.norm(v, axis=-1)


def _token_reference(run, images, text, watched: int):
    """Tape over `run(images, watched) -> (tokens at block `watched`, embeddings)`."""
    with tf.GradientTape() as tape:
        activations, v = run(images, watched, tape)
        score = _cosine(v, text)
    return activations.numpy(), tape.gradient(score, activations).numpy(), score.numpy()


def _grad_cam_of_tokens(tokens, gradients, prefix: int):
    patches, grads = tokens[:, prefix:], gradients[:, prefix:]
    alpha = grads.mean(axis=1)
    side = round(patches.shape[1] ** 0.5)
    return alpha, np.einsum("bnc,bc->bn", patches, alpha).reshape(-1, side, side)


def test_clip_image_tower_equals_the_unrolled_tape():
    backbone = _clip()
    tower = image_tower(backbone)
    x, tokens = _pair_inputs()
    texts = backbone.get_text_embeddings(tokens).numpy()  # (3, 12)
    encoder = backbone.vision_encoder

    def run(images, watched, tape):
        h = encoder.pre_layer_norm(encoder.embedding(images))
        for i, block in enumerate(encoder.encoder_layers):
            h = block(h, training=False)
            if i == watched:
                activations = h
                tape.watch(activations)
        return activations, backbone.vision_projection(encoder.layer_norm(h)[:, 0])

    blocks = f"{encoder.name}/encoder_block"  # "clip_vision_encoder/encoder_block"
    cam = GradCAM(tower, f"{blocks}_0")
    for text in (texts[0], texts):  # one caption for all, one per image
        result = cam(x, target=SimilarityTarget(text))
        tokens_0, gradients, score = _token_reference(run, x, text, 0)
        alpha, raw = _grad_cam_of_tokens(tokens_0, gradients, prefix=1)
        assert result.layout == tf_gradcam.tokens.TokenLayout(1, (4, 4), 8)
        _assert_close(result.weights, alpha)
        _assert_close(result.raw_maps, raw)
        _assert_close(result.scores, score)
        assert np.abs(raw).max() > 1e-4
    # scaled by the temperature, the scores are CLIP's own logits for each (image, text)
    scale = float(np.exp(backbone.get_layer("clip_head").logit_scale.numpy()))
    logits = backbone({"images": x, "token_ids": tokens})["vision_logits"].numpy()
    scaled = cam(x, target=SimilarityTarget(texts, scale=scale))
    _assert_close(scaled.scores, np.diag(logits), atol=1e-4)
    # after the last block only the class token is read: all-zero maps
    with pytest.warns(RuntimeWarning):
        last = GradCAM(tower, f"{blocks}_1")(x, target=SimilarityTarget(texts[0]))
    assert last.degenerate.all()


def test_siglip_image_tower_equals_the_unrolled_tape():
    backbone = _siglip()
    tower = image_tower(backbone)
    x, tokens = _pair_inputs(5)
    texts = backbone.get_text_embeddings(tokens).numpy()  # (3, 16)
    encoder = backbone.vision_encoder

    def run(images, watched, tape):
        h = encoder.embedding(images)
        for i, block in enumerate(encoder.encoder_layers):
            h = block(h, training=False)
            if i == watched:
                activations = h
                tape.watch(activations)
        return activations, encoder.head(encoder.post_layer_norm(h), training=False)

    def grid(t):  # 16 patch tokens, no class token (see the xfail below)
        return tf.reshape(t, (-1, 4, 4, t.shape[-1]))

    for block in (0, 1):  # attention pooling reads every token: the last block works too
        path = f"{encoder.name}/encoder_block_{block}"
        result = GradCAM(tower, path, reshape=grid)(x, target=SimilarityTarget(texts))
        tokens_b, gradients, score = _token_reference(run, x, texts, block)
        alpha, raw = _grad_cam_of_tokens(tokens_b, gradients, prefix=0)
        _assert_close(result.weights, alpha)
        _assert_close(result.raw_maps, raw)
        _assert_close(result.scores, score)
        assert np.abs(raw).max() > 1e-4
    head = backbone.get_layer("siglip_head")
    scale = float(np.exp(head.logit_scale.numpy()))
    logits = backbone({"images": x, "token_ids": tokens})["vision_logits"].numpy()
    scaled = GradCAM(tower, f"{encoder.name}/encoder_block_0", reshape=grid)(
        x, target=SimilarityTarget(texts, scale=scale)
    )
    # SigLIP's logits add a bias, which has no gradient: cos·scale = logit − bias
    _assert_close(scaled.scores, np.diag(logits) - float(head.logit_bias.numpy()), atol=1e-4)


def test_siglip_inferred_layout_despite_the_static_token_count():
    """keras-hub 0.32's SigLIP patch embedding declares patches + 1 tokens (a class token it
    does not produce): the grid takes the last rows x columns tokens, so the inferred layout
    gives the reshape= result."""
    backbone = _siglip()
    x, tokens = _pair_inputs(5)
    texts = backbone.get_text_embeddings(tokens).numpy()
    path = f"{backbone.vision_encoder.name}/encoder_block_0"
    tower = image_tower(backbone)

    def grid(t):
        return tf.reshape(t, (-1, 4, 4, t.shape[-1]))

    inferred = GradCAM(tower, path)(x, target=SimilarityTarget(texts))
    given = GradCAM(tower, path, reshape=grid)(x, target=SimilarityTarget(texts))
    _assert_close(inferred.raw_maps, given.raw_maps)
    _assert_close(inferred.weights, given.weights)


# ------------------------------------------------------------------------- errors


def test_bad_arguments_raise_at_construction():
    with pytest.raises(TargetError, match="non-finite"):
        SimilarityTarget(np.array([1.0, np.nan, 0.0, 2.0]))
    with pytest.raises(TargetError, match="all zero"):
        SimilarityTarget(np.zeros(4))
    with pytest.raises(TargetError, match=r"all zero \(row 1\)"):
        SimilarityTarget(np.stack([np.ones(4), np.zeros(4)]))
    with pytest.raises(TargetError, match=r"\(d,\).*Received shape \(2, 3, 4\)"):
        SimilarityTarget(np.ones((2, 3, 4)))
    with pytest.raises(TargetError, match="Received shape"):
        SimilarityTarget(np.ones((0,)))
    with pytest.raises(TargetError, match="numeric"):
        SimilarityTarget(np.array(["a", "red", "circle"]))
    for scale in (0.0, -1.0, float("inf"), True, "14"):
        with pytest.raises(TargetError, match="scale"):
            SimilarityTarget(np.ones(4), scale=scale)


def test_bad_targets_for_the_model_raise_typed_errors():
    model, x = _tower(), _images()
    cam = GradCAM(model, "features")
    with pytest.raises(TargetError, match=r"text embedding has width 6 .* width 4"):
        cam(x, target=SimilarityTarget(np.ones(6)))
    with pytest.raises(TargetError, match=r"\(batch, d\).*\(None, 8, 8, 5\)"):
        GradCAM(keras.Model(model.input, model.get_layer("features").output), "features")(
            x, target=SimilarityTarget(np.ones(5))
        )
    inputs = keras.Input((16, 16, 3))
    tokens = layers.Reshape((16, 12))(layers.Conv2D(12, 4, strides=4, name="patches")(inputs))
    with pytest.raises(TargetError, match=r"\(batch, d\).*\(None, 16, 12\)"):
        GradCAM(keras.Model(inputs, tokens), "patches")(
            np.zeros((1, 16, 16, 3), np.float32), target=SimilarityTarget(np.ones(12))
        )
    with pytest.raises(TargetError, match="names no output"):
        two = keras.Model(model.inputs, {"embedding": model.output})
        GradCAM(two, "features")(x, target=SimilarityTarget(np.ones(4), output="text"))


def test_images_without_a_direction_and_wrong_counts_fail_when_the_step_runs():
    model = _tower()
    model.get_layer("features").bias.assign(-np.ones(FEATURES, np.float32))
    cam = GradCAM(model, "features")
    x = _images()
    zero = np.zeros((2, SIZE, SIZE, 3), np.float32)  # relu(0 - 1) = 0: the embedding is 0
    with pytest.raises(TargetError, match=r"^SimilarityTarget: .*all zero or non-finite"):
        cam(zero, target=SimilarityTarget(np.ones(4)))
    with pytest.raises(TargetError, match=r"^SimilarityTarget: .*one row per image"):
        cam(x[:2], target=SimilarityTarget(_texts(3)))


def test_image_tower_refuses_other_models_and_repr_is_short():
    with pytest.raises(tf_gradcam.UnsupportedModelError, match="CLIPBackbone"):
        image_tower(_tower())
    assert repr(SimilarityTarget(np.ones(4))) == "SimilarityTarget(text_embedding=<4-d>)"
    shown = repr(SimilarityTarget(np.ones((3, 4)), scale=2.0, output="embedding"))
    assert shown == (
        "SimilarityTarget(text_embedding=<3 per image, 4-d>, scale=2, output='embedding')"
    )
