"""Token feature maps: a transformer's patch tokens explained on their grid.

References: layouts worked out by hand; the CAM identity on a token model
(tokens → global average pooling → dense: the map is Σ_k W_kc A^k / N); and a
tape over a hand-unrolled forward pass of a keras-hub `ViTImageClassifier`
(random weights, built from its constructor, nothing downloaded).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import tf_gradcam
from tf_gradcam.tokens import CustomLayout, TokenLayout, token_layout

keras_hub = pytest.importorskip("keras_hub")


def _assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


class _Patch(layers.Layer):
    def __init__(self, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size


@pytest.mark.parametrize(
    ("tokens", "size", "patch", "expected"),
    [
        (17, (32, 32), None, TokenLayout(1, (4, 4))),  # ViT: class token + 4x4
        (16, (32, 32), None, TokenLayout(0, (4, 4))),  # no prefix
        (18, (32, 32), 8, TokenLayout(2, (4, 4), 8)),  # DeiT: class + distillation
        (21, (32, 32), None, TokenLayout(5, (4, 4))),  # DINOv2: class + 4 registers
        (33, (32, 64), None, TokenLayout(1, (4, 8))),  # a wide image
        (197, (224, 224), 16, TokenLayout(1, (14, 14), 16)),  # ViT-B/16
    ],
)
def test_layouts_worked_out_by_hand(tokens, size, patch, expected):
    found = token_layout(tokens, size, layers=[_Patch(patch)] if patch else [])
    assert found == expected
    assert found.tokens == tokens


def test_counts_that_fit_no_grid_say_to_pass_reshape():
    with pytest.raises(tf_gradcam.NotSpatialError, match="reshape="):
        token_layout(30, (32, 32))  # 30 - p, p <= 8, is none of the grids 1, 4, 16, 64, ...
    with pytest.raises(tf_gradcam.NotSpatialError, match="not fixed"):
        token_layout(None, (32, 32))


def test_to_grid_drops_the_prefix_and_keeps_row_major_order():
    tokens = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    grid = TokenLayout(1, (2, 2)).to_grid(tf.constant(tokens)).numpy()
    np.testing.assert_array_equal(grid, tokens[:, 1:].reshape(2, 2, 2, 3))
    stacked = np.stack([tokens, tokens + 100], axis=1)  # (batch, k, tokens, channels)
    grid = TokenLayout(1, (2, 2)).to_grid(tf.constant(stacked), batch_axes=2).numpy()
    np.testing.assert_array_equal(grid, stacked[:, :, 1:].reshape(2, 2, 2, 2, 3))


def _token_model() -> keras.Model:
    """Patches → tokens (16, 8) → dense mix → GAP over tokens → dense: CAM's head on tokens."""
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 4, strides=4, name="patches")(inputs)
    tokens = layers.Reshape((16, 8), name="tokens")(x)
    tokens = layers.Dense(8, name="mix")(tokens)
    pooled = layers.GlobalAveragePooling1D()(tokens)
    return keras.Model(inputs, layers.Dense(3, name="head")(pooled))


def test_the_cam_identity_holds_on_tokens(images):
    """Tokens → GAP → dense: α_k = W_kc / N and the map is ReLU(Σ_k W_kc A^k / N)."""
    keras.utils.set_random_seed(1)
    model = _token_model()
    result = tf_gradcam.GradCAM(model, "mix")(images, target=2)
    assert result.layout == TokenLayout(0, (4, 4))
    tokens = keras.Model(model.inputs, model.get_layer("mix").output)(images).numpy()
    kernel = model.get_layer("head").get_weights()[0]
    _assert_close(result.weights, np.broadcast_to(kernel[:, 2] / 16, (4, 8)))
    cam = (tokens @ kernel[:, 2] / 16).reshape(4, 4, 4)
    _assert_close(result.raw_maps, cam)
    _assert_close(result.maps, np.maximum(cam, 0))
    assert tf_gradcam.layer_paths(model, spatial_only=True)[-1] == "patches"


def test_reshape_overrides_the_layout(images):
    """A column-major reshape gives the transposed maps, reported as a CustomLayout."""
    keras.utils.set_random_seed(1)
    model = _token_model()

    def column_major(tokens):
        return tf.transpose(tf.reshape(tokens, (-1, 4, 4, 8)), (0, 2, 1, 3))

    row = tf_gradcam.GradCAM(model, "mix")(images, target=tf_gradcam.TopK(2))
    column = tf_gradcam.GradCAM(model, "mix", reshape=column_major)(
        images, target=tf_gradcam.TopK(2)
    )
    assert isinstance(column.layout, CustomLayout)
    _assert_close(column.raw_maps, np.swapaxes(row.raw_maps, -1, -2))
    _assert_close(column.weights, row.weights)


def _vit() -> keras.Model:
    keras.utils.set_random_seed(3)
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )
    return keras_hub.models.ViTImageClassifier(backbone=backbone, num_classes=3, preprocessor=None)


def _vit_reference(model, images, block: int, target: int):
    """A tape over the classifier unrolled by hand, watching block `block`'s output."""
    backbone = model.backbone
    embedding = backbone.get_layer("vit_patching_and_embedding")
    encoder = backbone.get_layer("vit_encoder")
    with tf.GradientTape() as tape:
        x = embedding(images)  # the encoder's dropout: identity at inference
        for i, layer in enumerate(encoder.encoder_layers):
            x = layer(x, training=False)
            if i == block:
                activations = x
                tape.watch(activations)
        x = encoder.layer_norm(x)
        logits = model.output_dense(x[:, 0])  # dropout: identity at inference
        score = logits[:, target]
    gradients = tape.gradient(score, activations).numpy()[:, 1:]  # the 16 patch tokens
    patches = activations.numpy()[:, 1:]
    alpha = gradients.mean(axis=1)
    raw = np.einsum("bnc,bc->bn", patches, alpha).reshape(-1, 4, 4)
    return alpha, raw, score.numpy()


def test_a_keras_hub_vit_block_equals_the_unrolled_tape(images):
    """A block inside ViTEncoder (no graph node) is captured; its map equals the tape's."""
    model = _vit()
    x = np.random.default_rng(4).random((3, 32, 32, 3), dtype=np.float32)
    path = f"{model.backbone.name}/vit_encoder/encoder_layers/0"
    for target in (0, 2):
        result = tf_gradcam.GradCAM(model, path)(x, target=target)
        alpha, raw, score = _vit_reference(model, x, 0, target)
        assert result.layout == TokenLayout(1, (4, 4), 8)
        _assert_close(result.weights, alpha)
        _assert_close(result.raw_maps, raw)
        _assert_close(result.scores, score)
        assert np.abs(raw).max() > 1e-4
    by_object = tf_gradcam.GradCAM(model, model.backbone.get_layer("vit_encoder").encoder_layers[0])
    _assert_close(by_object(x, target=2).raw_maps, raw)


def test_the_patch_embedding_node_of_a_vit_is_explained_on_its_grid():
    """A token layer that is a graph node goes through the rewired graph (no capture)."""
    model = _vit()
    x = np.random.default_rng(5).random((2, 32, 32, 3), dtype=np.float32)
    result = tf_gradcam.GradCAM(model, "vit_patching_and_embedding")(x, target=1)
    assert result.layout == TokenLayout(1, (4, 4), 8)
    embedding = model.backbone.get_layer("vit_patching_and_embedding")
    encoder = model.backbone.get_layer("vit_encoder")
    with tf.GradientTape() as tape:
        tokens = embedding(x)
        tape.watch(tokens)
        pooled = encoder(tokens, training=False)[:, 0]
        score = model.output_dense(pooled)[:, 1]
    gradients = tape.gradient(score, tokens).numpy()[:, 1:]
    _assert_close(result.weights, gradients.mean(axis=1))


def test_gradient_free_methods_see_the_grid_too(images):
    """Eigen-CAM on tokens: the first principal direction of the patch-token matrix."""
    keras.utils.set_random_seed(1)
    model = _token_model()
    eigen = tf_gradcam.EigenCAM(model, "mix", relu=False)(images)
    tokens = keras.Model(model.inputs, model.get_layer("mix").output)(images).numpy()
    for i, rows in enumerate(tokens):  # (16 patches, 8 channels)
        projection = rows @ np.linalg.svd(rows, full_matrices=False)[2][0]
        projection *= np.sign(projection @ rows.mean(axis=1)) or 1.0
        _assert_close(eigen.raw_maps[i], projection.reshape(4, 4), atol=1e-4)


def test_eigencam_on_a_vit_block_leaves_the_class_token_out():
    model = _vit()
    x = np.random.default_rng(6).random((2, 32, 32, 3), dtype=np.float32)
    path = f"{model.backbone.name}/vit_encoder/encoder_layers/0"
    eigen = tf_gradcam.EigenCAM(model, path, relu=False)(x)
    encoder = model.backbone.get_layer("vit_encoder")
    embedding = model.backbone.get_layer("vit_patching_and_embedding")
    tokens = encoder.encoder_layers[0](embedding(x), training=False).numpy()
    for i, rows in enumerate(tokens[:, 1:]):  # the class token has no place on the grid
        projection = rows @ np.linalg.svd(rows, full_matrices=False)[2][0]
        projection *= np.sign(projection @ rows.mean(axis=1)) or 1.0
        _assert_close(eigen.raw_maps[i], projection.reshape(4, 4), atol=1e-4)


def test_ablationcam_refuses_token_layers(images):
    with pytest.raises(tf_gradcam.UnsupportedModelError, match="tokens"):
        tf_gradcam.AblationCAM(_token_model(), "mix")(images)


def test_swin_stages_are_token_grids_equal_to_the_tape():
    """Swin (hierarchical, windowed): each stage's tokens form a grid; the classifier averages
    the final tokens, so at the final norm Grad-CAM is the CAM identity W_kc / N."""
    keras.utils.set_random_seed(7)
    backbone = keras_hub.models.SwinTransformerBackbone(
        image_shape=(32, 32, 3), embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4
    )
    model = keras_hub.models.SwinTransformerImageClassifier(backbone=backbone, num_classes=3)
    x = np.random.default_rng(8).random((2, 32, 32, 3), dtype=np.float32)
    tokens = backbone(x).numpy()  # (2, 16, 32): the final norm's output
    kernel = model.get_layer("predictions").get_weights()[0]
    result = tf_gradcam.GradCAM(model, "norm")(x, target=2)
    assert result.layout == TokenLayout(0, (4, 4))
    _assert_close(result.weights, np.broadcast_to(kernel[:, 2] / 16, (2, 32)))
    _assert_close(result.raw_maps, (tokens @ kernel[:, 2] / 16).reshape(2, 4, 4))
    embedded = tf_gradcam.GradCAM(model, "patch_embedding")(x, target=2)
    assert embedded.layout == TokenLayout(0, (8, 8), 4)  # the patch size the layer states


def test_dinov2_register_tokens_are_dropped():
    """DINOv2 with 4 register tokens: 1 + 4 prefix tokens, then the 4x4 patches."""
    keras.utils.set_random_seed(9)
    backbone = keras_hub.models.DINOV2Backbone(
        patch_size=8,
        num_layers=2,
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        num_register_tokens=4,
        image_shape=(32, 32, 3),
        position_embedding_shape=(32, 32, 3),
    )
    inputs = keras.Input((32, 32, 3))
    pooled = keras.ops.mean(backbone(inputs)[:, 5:], axis=1)  # mean of the patch tokens
    model = keras.Model(inputs, layers.Dense(3, name="head")(pooled))
    x = np.random.default_rng(10).random((2, 32, 32, 3), dtype=np.float32)
    result = tf_gradcam.GradCAM(model, f"{backbone.name}/layernorm")(x, target=0)
    assert result.layout == TokenLayout(5, (4, 4), 8)
    patches = backbone(x).numpy()[:, 5:]
    kernel = model.get_layer("head").get_weights()[0]
    _assert_close(result.raw_maps, (patches @ kernel[:, 0] / 16).reshape(2, 4, 4))
    block = tf_gradcam.GradCAM(model, f"{backbone.name}/encoder/layers/0")(x, target=0)
    assert block.layout == TokenLayout(5, (4, 4), 8) and np.abs(block.raw_maps).max() > 0


def test_the_cli_explains_a_token_layer_of_a_saved_keras_hub_vit(tmp_path):
    """`tf-gradcam explain vit.keras img.png --layer <block path>`: the API's map on the grid."""
    import cv2

    from tf_gradcam.cli import main

    model = _vit()
    model.save(tmp_path / "vit.keras")
    rgb = (np.random.default_rng(11).random((32, 32, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "img.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    path = f"{model.backbone.name}/vit_encoder/encoder_layers/0"
    out = tmp_path / "out"
    args = [str(tmp_path / "vit.keras"), str(tmp_path / "img.png"), "--layer", path]
    assert main(["explain", *args, "--class", "1", "--out", str(out)]) == 0
    expected = tf_gradcam.GradCAM(model, path)(rgb[None] / np.float32(255), target=1)
    assert expected.maps.shape == (1, 4, 4) and expected.maps.max() > 0
    _assert_close(np.load(out / "img_gradcam.npy"), expected.maps[0])


def test_default_layers_of_transformers():
    """Class-token heads: the last block's input; a head averaging all tokens: the last tokens."""
    model = _vit()  # two blocks: the input of the last one is block 0's output
    x = np.random.default_rng(12).random((2, 32, 32, 3), dtype=np.float32)
    default = tf_gradcam.GradCAM(model)(x, target=2)
    assert default.layer == f"{model.backbone.name}/vit_encoder/encoder_layers/0"
    alpha, raw, _ = _vit_reference(model, x, 0, 2)
    _assert_close(default.weights, alpha)
    _assert_close(default.raw_maps, raw)
    keras.utils.set_random_seed(13)
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    single = keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=3, preprocessor=None
    )
    assert tf_gradcam.GradCAM(single).layer.endswith("vit_patching_and_embedding")
    swin = keras_hub.models.SwinTransformerBackbone(
        image_shape=(32, 32, 3), embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4
    )
    classifier = keras_hub.models.SwinTransformerImageClassifier(backbone=swin, num_classes=3)
    assert tf_gradcam.GradCAM(classifier).layer == f"{swin.name}/norm"


def test_the_callback_logs_a_vits_token_maps(tmp_path):
    """GradCAMCallback on a keras-hub ViT (default layer): the documented panel of the
    hand-unrolled tape's map at the last block's input, laid on the patch grid."""
    from tests.test_model_kinds import LABELS, _assert_panels_show, _fit_with_callback

    model = _vit()
    images = np.random.default_rng(14).random((4, 32, 32, 3), dtype=np.float32)
    callback, panels = _fit_with_callback(model, images, tmp_path / "vit")
    assert callback.explainer.layer == f"{model.backbone.name}/vit_encoder/encoder_layers/0"
    maps = []
    for i, c in enumerate(LABELS):
        _, raw, _ = _vit_reference(model, images[i : i + 1], 0, int(c))
        maps.append(np.maximum(raw[0], 0))
    logits = model(images).numpy()
    resized = tf.image.resize(np.stack(maps)[..., None], (32, 32), method="bilinear").numpy()
    heatmaps = resized[..., 0] / resized.max(axis=(1, 2, 3))[:, None, None]
    _assert_panels_show(panels, images, heatmaps, LABELS, logits)
