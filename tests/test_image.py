"""Tests for the display helpers of tf_gradcam.image: normalize_gradients and overlay."""

from __future__ import annotations

import numpy as np
import pytest

from tf_gradcam.image import normalize_gradients, overlay


def test_normalize_gradients_hand_computed():
    """(g - mean) / std * 0.1 + 0.5, with the statistics of each image."""
    image = np.array([[[0.0], [0.0]], [[0.0], [4.0]]])  # mean 1, std sqrt(3)
    low, high = 0.5 - 0.1 / np.sqrt(3.0), 0.5 + 0.3 / np.sqrt(3.0)  # 0.44226, 0.67321
    expected = np.array([[[low], [low]], [[low], [high]]], np.float32)
    got = normalize_gradients(image)
    assert got.dtype == np.float32 and got.shape == (2, 2, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    symmetric = np.array([[[-1.0, 1.0]], [[-1.0, 1.0]]])  # mean 0, std 1
    np.testing.assert_allclose(normalize_gradients(symmetric)[..., 0], 0.4, rtol=1e-6)
    np.testing.assert_allclose(normalize_gradients(symmetric)[..., 1], 0.6, rtol=1e-6)


def test_normalize_gradients_clips_and_handles_each_image_alone():
    """Values beyond 1/scale standard deviations clip; scale and zero images are per image."""
    image = np.array([[[0.0], [0.0]], [[0.0], [4.0]]])
    clipped = normalize_gradients(image, scale=1.0)  # -0.077 -> 0, 2.23 -> 1
    np.testing.assert_array_equal(clipped[..., 0], [[0.0, 0.0], [0.0, 1.0]])
    batch = np.stack([image, 1e-9 * image, np.zeros_like(image)])
    got = normalize_gradients(batch)
    np.testing.assert_allclose(got[1], got[0], rtol=1e-5)  # tiny gradients are not darkened
    np.testing.assert_array_equal(got[2], np.full((2, 2, 1), 0.5, np.float32))  # never NaN


def test_normalize_gradients_rejects_bad_arguments():
    """Too few axes or a non-positive scale raise a ValueError naming the argument."""
    with pytest.raises(ValueError, match="Received: gradients with shape \\(4, 4\\)"):
        normalize_gradients(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="Received: scale=0"):
        normalize_gradients(np.zeros((4, 4, 3)), scale=0)


def test_overlay_hand_computed_pixels():
    """(1 - alpha) * image + alpha * jet(heat): jet(0) = (0, 0, 0.5), jet(1) = (0.5, 0, 0)."""
    image = np.full((1, 2, 3), 0.2, np.float32)
    heat = np.array([[0.0, 1.0]], np.float32)
    got = overlay(image, heat, alpha=0.4)
    # 0.6 * 0.2 = 0.12 -> 30.6 -> 31; + 0.4 * 0.5 = 0.32 -> 81.6 -> 82
    expected = np.array([[[31, 31, 82], [82, 31, 31]]], np.uint8)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    as_uint8 = overlay(np.full((1, 1, 2, 3), 51, np.uint8), heat[None], alpha=0.4)
    np.testing.assert_array_equal(as_uint8[0], expected)  # 51 / 255 = 0.2
    gray = overlay(np.full((1, 2, 1), 0.2, np.float32), heat, alpha=0.4)
    np.testing.assert_array_equal(gray, expected)  # grayscale repeated to RGB
    np.testing.assert_array_equal(overlay(image, heat, alpha=0.0), np.full((1, 2, 3), 51))


def test_overlay_rejects_mismatched_shapes_and_alpha():
    """Heatmaps of another size, or alpha outside [0, 1], raise a ValueError."""
    with pytest.raises(ValueError, match="must share batch, height and width"):
        overlay(np.zeros((2, 4, 4, 3)), np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match=r"Received: alpha=1\.5"):
        overlay(np.zeros((4, 4, 3)), np.zeros((4, 4)), alpha=1.5)


def _linear_half_pixel(values: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Half-pixel linear interpolation along one axis with np.interp (edge values held)."""
    n = values.shape[axis]
    positions = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    return np.apply_along_axis(lambda v: np.interp(positions, np.arange(n), v), axis, values)


def test_upsample_maps_in_one_and_three_dimensions_is_separable_linear_interpolation():
    """1-D: linear; 3-D: trilinear = linear along each axis in turn (NumPy np.interp)."""
    from tf_gradcam.image import upsample_maps

    rng = np.random.default_rng(0)
    signal = rng.normal(size=(2, 3, 12))
    expected = _linear_half_pixel(signal, 50, axis=-1)
    np.testing.assert_allclose(upsample_maps(signal, (50,)), expected, atol=1e-5)
    volume = rng.normal(size=(2, 1, 4, 5, 3))
    expected = volume
    for axis, size in zip((-3, -2, -1), (9, 16, 7), strict=True):
        expected = _linear_half_pixel(expected, size, axis=axis)
    np.testing.assert_allclose(upsample_maps(volume, (9, 16, 7)), expected, atol=1e-5)
    image = rng.normal(size=(3, 7, 6))
    expected = _linear_half_pixel(_linear_half_pixel(image, 20, axis=-2), 11, axis=-1)
    np.testing.assert_allclose(upsample_maps(image, (20, 11)), expected, atol=1e-5)


def test_normalize_maps_scales_each_volume_alone():
    """axes=3: every (d, h, w) map divided by its own maximum; a zero map stays zero."""
    from tf_gradcam.image import normalize_maps

    maps = np.random.default_rng(1).random((2, 4, 3, 5, 6)).astype(np.float32)
    maps[1, 2] = 0.0
    scaled, degenerate = normalize_maps(maps, axes=3)
    expected = maps / np.maximum(maps.max(axis=(2, 3, 4), keepdims=True), 1e-30)
    np.testing.assert_allclose(scaled, expected, rtol=1e-6)
    assert degenerate.numpy().tolist() == [[False] * 4, [False, False, True, False]]
