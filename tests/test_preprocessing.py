"""keras-hub task models with their preprocessor: the caller's images are explained.

The reference: the same explainer without the preprocessor on the images the
preprocessor produced, its heatmaps resized with `tf.image.resize` onto the
crop (or padded frame) worked out by hand from Keras' `Resizing` rules.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_gradcam
from tf_gradcam.preprocessing import original_frame

keras_hub = pytest.importorskip("keras_hub")


def _converter(**options):
    return keras_hub.layers.ViTImageConverter(image_size=(32, 32), scale=1 / 255.0, **options)


def test_frames_worked_out_by_hand():
    # 50x70 to 32x32: the centred 50x50 crop starts at column 10
    assert original_frame(_converter(), 50, 70) == (0, 10, 50, 50, False)
    assert original_frame(_converter(), 70, 50) == (10, 0, 50, 50, False)
    # padding instead: a 70x70 frame, the image 10 rows down
    padded = _converter(crop_to_aspect_ratio=False, pad_to_aspect_ratio=True)
    assert original_frame(padded, 50, 70) == (10, 0, 70, 70, True)
    plain = _converter(crop_to_aspect_ratio=False)
    assert original_frame(plain, 50, 70) == (0, 0, 50, 70, False)


def _classifier(converter) -> keras.Model:
    keras.utils.set_random_seed(2)
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )
    preprocessor = keras_hub.models.ViTImageClassifierPreprocessor(image_converter=converter)
    return keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=3, preprocessor=preprocessor
    )


def _resized(heatmaps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    flat = heatmaps.reshape(-1, *heatmaps.shape[-2:], 1)
    resized = tf.image.resize(flat, size, method="bilinear").numpy()
    return resized.reshape(*heatmaps.shape[:-2], *size)


@pytest.mark.parametrize(
    ("mode", "height", "width"), [("crop", 50, 70), ("crop", 70, 50), ("pad", 50, 70)]
)
def test_heatmaps_come_back_at_the_callers_size(mode, height, width):
    options = {} if mode == "crop" else {"crop_to_aspect_ratio": False, "pad_to_aspect_ratio": True}
    converter = _converter(**options)
    model = _classifier(converter)
    raw = np.random.default_rng(3).random((2, height, width, 3), dtype=np.float32) * 255
    layer = f"{model.backbone.name}/vit_encoder/encoder_layers/0"
    cam = tf_gradcam.GradCAM(model, layer)
    result = cam(raw, target=tf_gradcam.TopK(2))
    assert result.heatmaps.shape == (2, 2, height, width)
    np.testing.assert_allclose(
        result.scores[:, 0], model.predict(raw, verbose=0).max(axis=1), atol=1e-5
    )

    plain = tf_gradcam.GradCAM(model, layer)
    plain.preprocessor = None  # the images below are preprocessed already
    reference = plain(converter(raw).numpy(), target=tf_gradcam.TopK(2))
    np.testing.assert_allclose(result.maps, reference.maps, atol=1e-6)
    expected = np.zeros((2, 2, height, width), np.float32)
    if mode == "crop" and width > height:  # the centred 50x50 crop, columns 10 to 60
        expected[..., :, 10:60] = _resized(reference.heatmaps, (50, 50))
    elif mode == "crop":  # rows 10 to 60
        expected[..., 10:60, :] = _resized(reference.heatmaps, (50, 50))
    else:  # a 70x70 frame, the image from row 10
        expected = _resized(reference.heatmaps, (70, 70))[..., 10:60, :]
    np.testing.assert_allclose(result.heatmaps, expected, atol=1e-5)
    assert result.heatmaps.max() > 0
