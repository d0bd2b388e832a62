"""Map post-processing: bilinear upsampling and per-image normalisation.

`upsample_maps` and `normalize_maps` take and return `tf.Tensor`s so the
engine can run them inside its compiled step; they also accept NumPy arrays.
The display helpers `overlay` and `normalize_gradients` return NumPy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

__all__ = ["normalize_gradients", "normalize_maps", "overlay", "upsample_maps"]


def upsample_maps(maps: Any, size: Any) -> tf.Tensor:
    """Resize maps to an input's size: bilinearly in 2-D (paper §3.2), linearly per axis otherwise.

    Args:
        maps: `(..., h, w)` maps; leading axes (batch, k) are kept. With a
            `size` of one or three numbers, `(..., length)` or
            `(..., d, h, w)` maps (Conv1D signals, Conv3D volumes).
        size: the output's spatial size, `(height, width)` (or `(length,)`,
            `(depth, height, width)`); its length is the number of trailing
            axes resized.

    Returns:
        `(..., *size)` float32 maps. Half-pixel centres, no antialiasing
        (the same convention as OpenCV's `cv2.resize(..., INTER_LINEAR)`);
        1-D and 3-D maps are interpolated linearly / trilinearly with the same
        convention along each axis.

    Example:
        >>> upsample_maps(np.ones((2, 7, 7)), (224, 224)).shape
        TensorShape([2, 224, 224])
    """
    maps = tf.convert_to_tensor(maps, tf.float32)
    size = tf.cast(size, tf.int32)
    axes = int(size.shape[0])
    shape = tf.shape(maps)
    # Linear interpolation is separable: each spatial axis is resized by one
    # small matrix product, out = R · map along that axis. Two such products beat
    # tf.image.resize on single-channel maps (~4x on 160 7x7 -> 224x224 maps,
    # CPU) and give the same values to float rounding.
    #
    # Rank-2 MatMuls only, never a batched or broadcast one: oneDNN's batched
    # matmul corrupts memory on broadcast batch axes such as (n, 1, h, w) maps
    # (docs/known-issues.md), and an einsum here lowers to exactly that in the
    # backward pass. The other axes are folded into the rows instead.
    x = tf.reshape(maps, tf.concat([[-1], shape[-axes:]], axis=0))  # (B, s_1, ..., s_r)
    for axis in range(1, axes + 1):
        weights = _interpolation_matrix(tf.shape(x)[axis], size[axis - 1])
        order = [0, *[a for a in range(1, axes + 1) if a != axis], axis]
        moved = tf.transpose(x, order)  # the resized axis last
        moved_shape = tf.shape(moved)
        resized = tf.matmul(tf.reshape(moved, [-1, moved_shape[-1]]), weights, transpose_b=True)
        resized = tf.reshape(resized, tf.concat([moved_shape[:-1], size[axis - 1 : axis]], 0))
        x = tf.transpose(resized, np.argsort(order))  # back in place
    return tf.reshape(x, tf.concat([shape[:-axes], size], axis=0))


def spatial_size(batch: Any, channels_first: bool) -> tf.Tensor:
    """The spatial size of a batch as an int32 tensor: `(height, width)` of images,
    `(length,)` of signals, `(depth, height, width)` of volumes.

    Read from the batch at run time even when the traced shape knows it: as a graph
    constant it made TensorFlow 2.21 feed the wrong tensor to a convolution of the
    second replica under `MirroredStrategy` (docs/known-issues.md).

    Example:
        >>> spatial_size(tf.zeros((2, 64, 48, 3)), channels_first=False).numpy()
        array([64, 48], dtype=int32)
    """
    rank = batch.shape.rank
    axes = slice(2, rank) if channels_first else slice(1, rank - 1)
    return tf.shape(batch)[axes]


def _interpolation_matrix(size_in: tf.Tensor, size_out: tf.Tensor) -> tf.Tensor:
    """`(size_out, size_in)` weights of half-pixel bilinear interpolation along one axis.

    Resizing the identity along its rows only (its columns keep their size, so
    they are copied exactly) applies the linear map to each basis vector: the
    result is the map's matrix, with TensorFlow's own edge handling.
    """
    # expand_dims, not [:, :, None]: TFLite has no builtin for a new-axis strided slice
    identity = tf.expand_dims(tf.eye(size_in, dtype=tf.float32), -1)
    weights = tf.image.resize(
        identity, tf.stack([size_out, size_in]), method="bilinear", antialias=False
    )
    return weights[:, :, 0]


def normalize_maps(
    maps: Any, *, signed: bool = False, axes: int = 2
) -> tuple[tf.Tensor, tf.Tensor]:
    """Scale each map into [0, 1]; a degenerate map becomes all zeros, never NaN.

    Args:
        maps: `(..., height, width)` maps; each trailing 2-D map is scaled alone.
        signed: `False` for rectified maps (divide by the maximum, so 0 stays 0);
            `True` for maps that may be negative (min-max scaling).
        axes: how many trailing axes one map spans: 2 for images, 1 for
            signals, 3 for volumes.

    Returns:
        `(normalized, degenerate)`: the scaled maps and a boolean per map that is
        `True` where the map was constant (all zero after the ReLU) or non-finite.

    Example:
        >>> heat, flat = normalize_maps(tf.zeros((1, 4, 4)))
        >>> bool(flat[0]), float(tf.reduce_max(heat))
        (True, 0.0)
    """
    maps = tf.convert_to_tensor(maps, tf.float32)
    spatial = list(range(-axes, 0))
    finite = tf.reduce_all(tf.math.is_finite(maps), axis=spatial)
    maps = tf.where(tf.math.is_finite(maps), maps, tf.zeros_like(maps))
    high = tf.reduce_max(maps, axis=spatial, keepdims=True)
    low = tf.reduce_min(maps, axis=spatial, keepdims=True) if signed else tf.zeros_like(high)
    span = high - low
    ok = span > 0
    scaled = tf.where(ok, (maps - low) / tf.where(ok, span, tf.ones_like(span)), 0.0)
    scaled = tf.clip_by_value(scaled, 0.0, 1.0)
    degenerate = tf.logical_or(tf.logical_not(finite), tf.logical_not(tf.squeeze(ok, spatial)))
    return scaled, degenerate


def overlay(
    images: Any,
    heatmaps: Any,
    *,
    alpha: float = 0.4,
    colormap: str = "jet",
) -> np.ndarray:
    """Blend colour-mapped heatmaps onto images.

    Args:
        images: `(batch, height, width, channels)` or one `(height, width,
            channels)` image; float in [0, 1] or uint8 in [0, 255]; 1 or 3
            channels (grayscale is repeated to RGB).
        heatmaps: `(batch, height, width)` or `(height, width)` maps in [0, 1]
            at the images' size (e.g. `Explanation.heatmaps`).
        alpha: weight of the heatmap colour in the blend, in [0, 1].
        colormap: a Matplotlib colormap name (`"jet"`, the paper's, by default).

    Returns:
        uint8 RGB array `(batch, height, width, 3)` (or `(height, width, 3)`
        for a single image): `(1 - alpha) * image + alpha * colormap(heatmap)`.

    Raises:
        ValueError: shapes that do not match, or `alpha` outside [0, 1].

    Example:
        >>> rgb = overlay(images, cam(images).heatmaps)
        >>> rgb.dtype, rgb.shape
        (dtype('uint8'), (8, 224, 224, 3))
    """
    from matplotlib import colormaps

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1]. Received: alpha={alpha}.")
    images = np.asarray(images)
    heatmaps = np.asarray(heatmaps, np.float32)
    single = heatmaps.ndim == 2
    if single:
        images, heatmaps = images[None], heatmaps[None]
    if images.ndim == 3:  # (batch, h, w) grayscale
        images = images[..., None]
    if images.shape[:3] != heatmaps.shape:
        raise ValueError(
            f"`images` {images.shape} and `heatmaps` {heatmaps.shape} must share batch, "
            "height and width; upsample the maps first (Explanation.heatmaps already is)."
        )
    base = images.astype(np.float32)
    if images.dtype == np.uint8 or base.max(initial=0.0) > 1.0:
        base = base / 255.0
    if base.shape[-1] == 1:
        base = np.repeat(base, 3, axis=-1)
    base = np.clip(base[..., :3], 0.0, 1.0)
    colours = colormaps[colormap](np.clip(np.nan_to_num(heatmaps), 0.0, 1.0))[..., :3]
    blended = (1.0 - alpha) * base + alpha * colours
    out = np.round(blended * 255.0).astype(np.uint8)
    return out[0] if single else out


def normalize_gradients(gradients: Any, *, scale: float = 0.1) -> np.ndarray:
    """Map pixel-space gradients to [0, 1] for display, each image on its own.

    The normalisation of the Guided Backpropagation literature (Chollet's
    `deprocess_image`, pytorch-grad-cam's `deprocess_image`): subtract the
    image's mean, divide by its standard deviation, multiply by `scale`, add
    0.5 and clip to [0, 1]. Zero gradient shows as mid-grey; a value `1/scale`
    standard deviations from the mean reaches black or white. The statistics
    are taken over height, width and channels of each image.

    Departure: those implementations divide by `std + 1e-5`, which darkens
    images whose gradients are small (Guided Grad-CAM values often are); here
    the division is exact and a constant image (e.g. all-zero gradients) maps
    to 0.5 everywhere, never NaN. Non-finite values count as 0.

    Args:
        gradients: `(height, width, channels)` or `(..., height, width,
            channels)` gradients, e.g. `PixelExplanation.gradients`.
        scale: standard deviations are multiplied by it (0.1 by default).

    Returns:
        float32 array of the same shape, in [0, 1].

    Raises:
        ValueError: fewer than 3 axes, or `scale` not positive.

    Example:
        >>> picture = normalize_gradients(tf_gradcam.GuidedBackprop(model)(images).gradients)
        >>> picture.shape, float(picture.min()) >= 0.0, float(picture.max()) <= 1.0
        ((8, 224, 224, 3), True, True)
    """
    if not scale > 0:
        raise ValueError(f"`scale` must be positive. Received: scale={scale}.")
    values = np.asarray(gradients, np.float64)
    if values.ndim < 3:
        raise ValueError(
            "`gradients` must have (height, width, channels) as last axes. Received: "
            f"gradients with shape {values.shape}."
        )
    values = np.where(np.isfinite(values), values, 0.0)
    axes = (-3, -2, -1)
    centred = values - values.mean(axis=axes, keepdims=True)
    std = np.sqrt(np.mean(centred**2, axis=axes, keepdims=True))
    safe = np.where(std > 0, std, 1.0)
    scaled = np.where(std > 0, centred / safe, 0.0) * scale + 0.5
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)
