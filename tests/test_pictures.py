"""Pictures of 1-D and 3-D explanations: colours, time alignment, slices and their order."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps

from tf_gradcam.image import overlay
from tf_gradcam.pictures import orthogonal_slices, signal_picture, volume_montage


def _jet(value: float) -> np.ndarray:
    """uint8 RGB of Matplotlib's jet at `value`, as `overlay` rounds it with alpha=1."""
    return np.round(np.asarray(colormaps["jet"](value)[:3]) * 255.0).astype(np.uint8)


def _unit_volume(shape, seed=0) -> np.ndarray:
    """A random volume with minimum exactly 0 and maximum exactly 1: its scaling is the identity."""
    volume = np.random.default_rng(seed).uniform(0.1, 0.9, size=shape)
    volume.flat[0], volume.flat[-1] = 0.0, 1.0
    return volume


# -- signal_picture ----------------------------------------------------------------------------


def test_the_band_is_jet_of_one_at_the_peak_and_jet_of_zero_where_the_heat_is_zero():
    """100 samples on 300 columns: sample t fills columns 3t..3t+2 of the bottom band rows."""
    heat = np.zeros(100)
    heat[37] = 1.0
    heat[80:90] = 0.5
    picture = signal_picture(np.zeros(100), heat, height=100, width=300, band_height=20)
    band = picture[80:]
    assert (band == band[:1]).all()  # every band row is the same
    for column in (111, 112, 113):  # sample 37
        np.testing.assert_array_equal(band[0, column], _jet(1.0))
    for column in (0, 110, 114, 239, 270, 299):
        np.testing.assert_array_equal(band[0, column], _jet(0.0))
    np.testing.assert_array_equal(band[0, 240], _jet(0.5))  # sample 80
    np.testing.assert_array_equal(band[0, 269], _jet(0.5))  # sample 89
    assert not np.array_equal(_jet(1.0), _jet(0.0))


@pytest.mark.parametrize(("length", "width"), [(1000, 256), (100, 256), (7, 20), (50, 50)])
def test_each_band_column_shows_the_largest_heat_of_the_samples_it_covers(length, width):
    """Column x covers [x L / W, (x + 1) L / W); a one-sample peak survives downsampling."""
    rng = np.random.default_rng(length)
    heat = rng.uniform(0.0, 0.6, size=length)
    heat[length // 2] = 1.0
    picture = signal_picture(rng.normal(size=(length, 2)), heat, height=40, width=width)
    band = picture[-10]
    for x in range(width):
        covered = [
            t for t in range(length) if t < (x + 1) * length / width and t + 1 > x * length / width
        ]
        np.testing.assert_array_equal(band[x], _jet(heat[covered].max()), err_msg=f"column {x}")
    peak_column = (length // 2) * width // length
    np.testing.assert_array_equal(band[peak_column], _jet(1.0))


def test_the_signal_line_peaks_above_its_sample():
    """A one-sample spike at t is drawn at column (t + 0.5) W / L - 0.5, at the top of the plot."""
    signal = np.zeros(100)
    signal[60] = 1.0
    picture = signal_picture(signal, np.zeros(100), height=120, width=300, band_height=20)
    plot = picture[:98].astype(int)
    inked = (255 - plot).sum(axis=2) > 60  # clearly drawn pixels
    rows, cols = np.nonzero(inked)
    top = rows.min()
    assert top <= 0.1 * 98  # the maximum sits at the top margin
    assert abs(cols[rows == top].mean() - 180) <= 1.5
    assert rows.max() >= 0.85 * 98  # the zero baseline sits at the bottom margin
    assert (picture[98:100] == 255).all()  # a white gap above the band
    # the line is the first channel's colour (blue), not the band's
    darkest = plot[inked].min(axis=0)
    assert darkest[2] > darkest[0]


def test_only_the_first_max_channels_are_drawn():
    rng = np.random.default_rng(1)
    signal, heat = rng.normal(size=(64, 6)), rng.uniform(size=64)
    np.testing.assert_array_equal(
        signal_picture(signal, heat, max_channels=2), signal_picture(signal[:, :2], heat)
    )
    assert not np.array_equal(
        signal_picture(signal, heat, max_channels=3), signal_picture(signal[:, :2], heat)
    )


def test_a_one_dimensional_signal_is_one_channel_and_the_default_size():
    rng = np.random.default_rng(2)
    signal, heat = rng.normal(size=80), rng.uniform(size=80)
    picture = signal_picture(signal, heat)
    assert picture.dtype == np.uint8 and picture.shape == (160, 256, 3)
    np.testing.assert_array_equal(picture, signal_picture(signal[:, None], heat))
    assert signal_picture(np.zeros(3000), np.zeros(3000)).shape == (160, 2048, 3)


@pytest.mark.parametrize(
    ("signal", "heat", "match"),
    [
        (np.zeros((50, 2)), np.zeros(49), r"signal.shape=\(50, 2\).*heatmap.shape=\(49,\)"),
        (np.zeros((50, 2)), np.zeros((50, 2)), r"signal.shape=\(50, 2\).*heatmap.shape=\(50, 2\)"),
        (np.zeros((2, 50, 2)), np.zeros(50), r"signal.shape=\(2, 50, 2\)"),
        (np.zeros((0,)), np.zeros(0), r"signal.shape=\(0,\)"),
    ],
)
def test_signal_shape_errors_name_both_shapes(signal, heat, match):
    with pytest.raises(ValueError, match=match):
        signal_picture(signal, heat)


@pytest.mark.parametrize(
    "kwargs", [{"height": 4}, {"width": 0}, {"band_height": 160}, {"max_channels": 0}]
)
def test_signal_sizes_out_of_range_are_refused(kwargs):
    with pytest.raises(ValueError, match="Received"):
        signal_picture(np.zeros(10), np.zeros(10), **kwargs)


# -- volume_montage ----------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_montage_cell_j_is_the_overlay_of_slice_j(axis):
    volume = _unit_volume((5, 6, 7))
    heat = np.random.default_rng(3).uniform(size=(5, 6, 7))
    slices = [2, 0, -1]
    picture = volume_montage(volume, heat, axis=axis, slices=slices, columns=2, gap=3)
    cells = [overlay(np.take(volume, i, axis), np.take(heat, i, axis)) for i in slices]
    cell_h, cell_w = cells[0].shape[:2]
    assert picture.shape == (2 * cell_h + 3, 2 * cell_w + 3, 3)
    for j, cell in enumerate(cells):
        top, left = (j // 2) * (cell_h + 3), (j % 2) * (cell_w + 3)
        np.testing.assert_array_equal(picture[top : top + cell_h, left : left + cell_w], cell)
    assert (picture[cell_h + 3 :, cell_w + 3 :] == 255).all()  # the unused fourth cell
    assert (picture[cell_h : cell_h + 3] == 255).all()  # the gap between rows


def test_montage_defaults_to_every_slice_or_evenly_spaced_ones():
    heat = np.zeros((20, 3, 4))
    for i in range(20):
        heat[i] = i / 19  # slice i is uniformly i / 19, so a cell tells its slice
    volume = np.zeros((20, 3, 4))
    picture = volume_montage(volume, heat, gap=0, alpha=1.0)
    expected = np.linspace(0, 19, 16).round().astype(int)
    assert picture.shape == (4 * 3, 4 * 4, 3)
    for j, i in enumerate(expected):
        top, left = (j // 4) * 3, (j % 4) * 4
        np.testing.assert_array_equal(picture[top, left], _jet(i / 19), err_msg=f"cell {j}")
    assert expected[0] == 0 and expected[-1] == 19
    few = volume_montage(volume[:9], heat[:9], gap=0, alpha=1.0)
    assert few.shape == (3 * 3, 3 * 4, 3)  # all 9 slices, 3 per row
    np.testing.assert_array_equal(few[6, 8], _jet(8 / 19))


def test_montage_scales_the_whole_volume_and_zooms_by_repetition():
    volume = _unit_volume((4, 5, 6), seed=4)
    heat = np.random.default_rng(5).uniform(size=(4, 5, 6))
    np.testing.assert_array_equal(
        volume_montage(10.0 + 5.0 * volume, heat), volume_montage(volume, heat)
    )
    zoomed = volume_montage(volume, heat, slices=[1], zoom=3)
    np.testing.assert_array_equal(zoomed, np.kron(overlay(volume[1], heat[1]), np.ones((3, 3, 1))))
    constant = volume_montage(np.full((4, 5, 6), 7.0), heat, slices=[0])
    np.testing.assert_array_equal(constant, overlay(np.zeros((5, 6)), heat[0]))


def test_montage_uses_the_first_three_channels_or_grayscale():
    rgb = _unit_volume((3, 4, 5, 4), seed=6)
    rgb[..., 3] = 5.0  # ignored, so it must not enter the scaling either
    rgb[0, 0, 0, :3] = 0.0
    rgb[-1, -1, -1, :3] = 1.0
    heat = np.random.default_rng(7).uniform(size=(3, 4, 5))
    np.testing.assert_array_equal(
        volume_montage(rgb, heat, slices=[1]), overlay(rgb[1, ..., :3], heat[1])
    )
    gray = _unit_volume((3, 4, 5, 1), seed=8)
    np.testing.assert_array_equal(
        volume_montage(gray, heat, slices=[2]), overlay(gray[2, ..., 0], heat[2])
    )


@pytest.mark.parametrize(
    ("volume", "heat", "kwargs", "match"),
    [
        (np.zeros((4, 5, 6)), np.zeros((4, 6, 5)), {}, r"volume.shape=\(4, 5, 6\).*\(4, 6, 5\)"),
        (np.zeros((4, 5)), np.zeros((4, 5)), {}, r"volume.shape=\(4, 5\)"),
        (np.zeros((4, 5, 6)), np.zeros((4, 5, 6)), {"axis": 3}, "axis"),
        (np.zeros((4, 5, 6)), np.zeros((4, 5, 6)), {"slices": [4]}, "slices"),
        (np.zeros((4, 5, 6)), np.zeros((4, 5, 6)), {"slices": []}, "slices"),
        (np.zeros((4, 5, 6)), np.zeros((4, 5, 6)), {"zoom": 0}, "zoom"),
    ],
)
def test_montage_errors(volume, heat, kwargs, match):
    with pytest.raises(ValueError, match=match):
        volume_montage(volume, heat, **kwargs)


# -- orthogonal_slices -------------------------------------------------------------------------


def _panels(picture: np.ndarray, shape, zoom=1, gap=2):
    depth, height, width = (zoom * s for s in shape)
    widths = (width, width, height)
    heights = (height, depth, depth)
    out, left = [], 0
    for h, w in zip(heights, widths, strict=True):
        out.append(picture[:h, left : left + w])
        left += w + gap
    return out


def test_orthogonal_slices_go_through_the_heatmap_maximum():
    shape = (6, 7, 5)
    volume = _unit_volume(shape, seed=9)
    heat = np.random.default_rng(10).uniform(0.0, 0.9, size=shape)
    heat[2, 5, 3] = 1.0
    picture = orthogonal_slices(volume, heat)
    assert picture.shape == (7, 5 + 5 + 7 + 4, 3)
    expected = [
        overlay(volume[2], heat[2]),
        overlay(volume[:, 5], heat[:, 5]),
        overlay(volume[:, :, 3], heat[:, :, 3]),
    ]
    for panel, cell in zip(_panels(picture, shape), expected, strict=True):
        np.testing.assert_array_equal(panel, cell)
    assert (picture[6:, 7:12] == 255).all()  # below the 6-row coronal panel
    np.testing.assert_array_equal(picture, orthogonal_slices(volume, heat, center=(2, 5, 3)))


def test_orthogonal_slices_at_a_given_center_zoomed_and_in_the_middle_of_a_flat_map():
    shape = (4, 6, 8)
    volume = _unit_volume(shape, seed=11)
    heat = np.random.default_rng(12).uniform(size=shape)
    picture = orthogonal_slices(volume, heat, center=(1, 0, 7), zoom=2, gap=1)
    panels = _panels(picture, shape, zoom=2, gap=1)
    np.testing.assert_array_equal(
        panels[1], np.kron(overlay(volume[:, 0], heat[:, 0]), np.ones((2, 2, 1)))
    )
    np.testing.assert_array_equal(
        panels[2], np.kron(overlay(volume[:, :, 7], heat[:, :, 7]), np.ones((2, 2, 1)))
    )
    flat = np.zeros(shape)
    np.testing.assert_array_equal(
        orthogonal_slices(volume, flat), orthogonal_slices(volume, flat, center=(2, 3, 4))
    )


@pytest.mark.parametrize("center", [(4, 0, 0), (0, 0), (0.0, 1.0, 2.0), (-1, 0, 0)])
def test_orthogonal_slices_refuse_a_center_outside_the_volume(center):
    with pytest.raises(ValueError, match=r"center.*\(4, 6, 8\)"):
        orthogonal_slices(np.zeros((4, 6, 8)), np.zeros((4, 6, 8)), center=center)


def test_orthogonal_slices_name_both_shapes():
    with pytest.raises(ValueError, match=r"volume.shape=\(4, 6, 8, 1\).*heatmap.shape=\(4, 6\)"):
        orthogonal_slices(np.zeros((4, 6, 8, 1)), np.zeros((4, 6)))
