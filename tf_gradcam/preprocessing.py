"""keras-hub preprocessors: explain the caller's images, return heatmaps at their size.

A keras-hub task model (`ViTImageClassifier`, `DeepLabV3ImageSegmenter`, ...)
usually carries a `preprocessor` whose `image_converter` resizes and rescales
images; `model.predict(images)` applies it, `model(images)` does not. The
explainers follow `predict`: the images are passed through the preprocessor,
explained at the model's input size, and the heatmaps are mapped back onto the
caller's images. The converter resizes with Keras' `Resizing` rules: with
`crop_to_aspect_ratio` (keras-hub's default) it first takes the largest
centred crop of the target's aspect ratio, with `pad_to_aspect_ratio` it pads
to it; the heatmap is resized bilinearly onto the crop (pixels outside it were
never seen by the model and get 0) or onto the padded frame (then cut back).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tf_gradcam.image import upsample_maps

__all__ = ["attached_preprocessor", "heatmaps_on_original", "original_frame"]


def attached_preprocessor(model: Any) -> Any:
    """The keras-hub image preprocessor a task model carries, else `None`.

    Only preprocessors with an `image_converter` that sets a fixed `image_size`
    count: they map one image batch to the model's input.
    """
    preprocessor = getattr(model, "preprocessor", None)
    converter = getattr(preprocessor, "image_converter", None)
    if converter is None or getattr(converter, "image_size", None) is None:
        return None
    return preprocessor


def original_frame(converter: Any, height: int, width: int) -> tuple[int, int, int, int, bool]:
    """Where the model's input lies in the caller's image: `(top, left, h, w, padded)`.

    Keras' `Resizing` geometry (its backends' `image.resize`): with
    `crop_to_aspect_ratio`, the centred crop `(top, left, h, w)` of the image
    that was resized to the model's size; with `pad_to_aspect_ratio`, the
    padded frame `(h, w)` and the image's offset `(top, left)` in it
    (`padded=True`); otherwise the whole image.
    """
    target_height, target_width = converter.image_size
    if getattr(converter, "crop_to_aspect_ratio", False):
        crop_height = max(min(height, int(float(width * target_height) / target_width)), 1)
        crop_width = max(min(width, int(float(height * target_width) / target_height)), 1)
        top = int(float(height - crop_height) / 2)
        left = int(float(width - crop_width) / 2)
        return top, left, crop_height, crop_width, False
    if getattr(converter, "pad_to_aspect_ratio", False):
        pad_height = max(height, int(float(width * target_height) / target_width))
        pad_width = max(width, int(float(height * target_width) / target_height))
        top = int(float(pad_height - height) / 2)
        left = int(float(pad_width - width) / 2)
        return top, left, pad_height, pad_width, True
    return 0, 0, height, width, False


def heatmaps_on_original(heatmaps: Any, converter: Any, height: int, width: int) -> tf.Tensor:
    """Heatmaps at the model's input size → at the caller's `(height, width)`.

    Args:
        heatmaps: `(..., h, w)` heatmaps of the preprocessed images.
        converter: the preprocessor's `image_converter`.
        height, width: the caller's image size.

    Returns:
        `(..., height, width)` float32 heatmaps; 0 outside a crop.
    """
    top, left, frame_height, frame_width, padded = original_frame(converter, height, width)
    resized = upsample_maps(heatmaps, (frame_height, frame_width))
    if padded:
        return resized[..., top : top + height, left : left + width]
    rank = len(resized.shape)
    paddings = [[0, 0]] * (rank - 2) + [
        [top, height - top - frame_height],
        [left, width - left - frame_width],
    ]
    return tf.pad(resized, paddings)
