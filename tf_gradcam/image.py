"""Map post-processing: bilinear upsampling and per-image normalisation.

The functions take and return `tf.Tensor`s so the engine can run them inside
its compiled step; they also accept NumPy arrays.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

__all__ = ["normalize_maps", "upsample_maps"]


def upsample_maps(maps: Any, size: Any) -> tf.Tensor:
    """Bilinearly resize maps to an image size (paper §3.2).

    Args:
        maps: `(..., h, w)` maps; leading axes (batch, k) are kept.
        size: `(height, width)` of the output.

    Returns:
        `(..., height, width)` float32 maps. Half-pixel centres, no antialiasing
        (the same convention as OpenCV's `cv2.resize(..., INTER_LINEAR)`).

    Example:
        >>> upsample_maps(np.ones((2, 7, 7)), (224, 224)).shape
        TensorShape([2, 224, 224])
    """
    maps = tf.convert_to_tensor(maps, tf.float32)
    lead = tf.shape(maps)[:-2]
    hw = tf.shape(maps)[-2:]
    flat = tf.reshape(maps, tf.concat([[-1], hw, [1]], axis=0))
    resized = tf.image.resize(flat, size, method="bilinear", antialias=False)
    return tf.reshape(resized, tf.concat([lead, tf.shape(resized)[1:3]], axis=0))


def normalize_maps(maps: Any, *, signed: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """Scale each map into [0, 1]; a degenerate map becomes all zeros, never NaN.

    Args:
        maps: `(..., height, width)` maps; each trailing 2-D map is scaled alone.
        signed: `False` for rectified maps (divide by the maximum, so 0 stays 0);
            `True` for maps that may be negative (min-max scaling).

    Returns:
        `(normalized, degenerate)`: the scaled maps and a boolean per map that is
        `True` where the map was constant (all zero after the ReLU) or non-finite.

    Example:
        >>> heat, flat = normalize_maps(tf.zeros((1, 4, 4)))
        >>> bool(flat[0]), float(tf.reduce_max(heat))
        (True, 0.0)
    """
    maps = tf.convert_to_tensor(maps, tf.float32)
    finite = tf.reduce_all(tf.math.is_finite(maps), axis=[-2, -1])
    maps = tf.where(tf.math.is_finite(maps), maps, tf.zeros_like(maps))
    high = tf.reduce_max(maps, axis=[-2, -1], keepdims=True)
    low = tf.reduce_min(maps, axis=[-2, -1], keepdims=True) if signed else tf.zeros_like(high)
    span = high - low
    ok = span > 0
    scaled = tf.where(ok, (maps - low) / tf.where(ok, span, tf.ones_like(span)), 0.0)
    scaled = tf.clip_by_value(scaled, 0.0, 1.0)
    degenerate = tf.logical_or(tf.logical_not(finite), tf.logical_not(ok[..., 0, 0]))
    return scaled, degenerate
