"""Metrics on signal maps `(batch, length)` and volume maps `(batch, depth, height, width)`.

Every expected value is derived from the definitions: the pointing game's hit is "the first
maximum (C order) lies within `tolerance` (Euclidean, in samples or voxels) of the mask",
Spearman's rho of untied ranks is 1 - 6 Σd² / (n (n² - 1)), a linear model's score drops by
exactly the weights of what is removed.
"""

import itertools
import math

import numpy as np
import pytest

from tf_gradcam import metrics
from tf_gradcam.errors import InputError


def _one_hot(shape, index, value=1.0):
    heat = np.zeros(shape)
    heat[index] = value
    return heat


def _brute_force_hit(heat, mask, tolerance):
    """The definition, by enumeration: first maximum within `tolerance` of some mask element."""
    if heat.max() == heat.min():
        return False
    peak = np.array(np.unravel_index(np.argmax(heat), heat.shape))
    points = np.argwhere(mask)
    if len(points) == 0:
        return False
    return bool(np.sqrt(((points - peak) ** 2).sum(axis=1)).min() <= tolerance)


def _linear(weights):
    """A callable scoring one class as sum(weights * x) over each input, any number of axes."""
    weights = np.asarray(weights, dtype=np.float64)

    def model(x):
        x = np.asarray(x, np.float64)
        return (x * weights).reshape(len(x), -1).sum(axis=1)[:, None]

    return model


# -- the pointing game -------------------------------------------------------------------------


def test_a_one_hot_signal_map_hits_inside_the_event_and_misses_outside():
    event = np.zeros(100, dtype=bool)
    event[40:60] = True
    for index, expected in [
        (40, True),
        (59, True),
        (50, True),
        (39, False),
        (60, False),
        (0, False),
    ]:
        hit = metrics.pointing_game(_one_hot(100, index), event, axes=1)
        assert hit.shape == (1,) and hit[0] == expected, index


@pytest.mark.parametrize(
    ("tolerance", "expected"), [(0, False), (4, False), (4.9, False), (5, True), (5.5, True)]
)
def test_signal_tolerance_is_the_distance_in_samples_inclusive(tolerance, expected):
    """The peak at 35 is 5 samples before the event [40, 60): a hit iff tolerance >= 5."""
    event = np.zeros((1, 100), dtype=bool)
    event[0, 40:60] = True
    heat = _one_hot((1, 100), (0, 35))
    assert metrics.pointing_game(heat, event, tolerance=tolerance, axes=1)[0] == expected
    after = _one_hot((1, 100), (0, 64))  # 5 samples after the last sample, 59
    assert metrics.pointing_game(after, event, tolerance=tolerance, axes=1)[0] == expected


@pytest.mark.parametrize(("tolerance", "expected"), [(3.46, False), (3.47, True), (12.0, True)])
def test_volume_tolerance_is_euclidean_across_three_axes(tolerance, expected):
    """From the corner voxel (0, 0, 0) to (2, 2, 2) the distance is sqrt(12) = 3.4641..."""
    mask = np.zeros((6, 7, 8), dtype=bool)
    mask[2:, 2:, 2:] = True
    heat = _one_hot((6, 7, 8), (0, 0, 0))
    assert metrics.pointing_game(heat, mask, tolerance=tolerance, axes=3)[0] == expected


def test_ties_go_to_the_first_maximum_in_c_order():
    signal = np.zeros((2, 64))
    signal[:, [10, 50]] = 1.0
    masks = np.zeros((2, 64), dtype=bool)
    masks[0, 50] = True  # only the second maximum: a miss
    masks[1, 10] = True  # the first one: a hit
    np.testing.assert_array_equal(metrics.pointing_game(signal, masks, axes=1), [False, True])

    volume = np.zeros((3, 4, 5))
    volume[2, 0, 0] = volume[0, 3, 1] = 7.0  # (0, 3, 1) comes first in C order
    first, second = np.zeros((2, 3, 4, 5), dtype=bool)
    first[0, 3, 1] = True
    second[2, 0, 0] = True
    assert metrics.pointing_game(volume, first, axes=3)[0]
    assert not metrics.pointing_game(volume, second, axes=3)[0]


@pytest.mark.parametrize("axes", [1, 3])
def test_a_constant_map_points_nowhere(axes):
    shape = (30,) if axes == 1 else (3, 4, 5)
    everywhere = np.ones(shape, dtype=bool)
    for value in (0.0, 0.7):
        heat = np.full(shape, value)
        assert not metrics.pointing_game(heat, everywhere, tolerance=100, axes=axes)[0]


@pytest.mark.parametrize(("axes", "shape"), [(1, (40, 37)), (2, (40, 9, 11)), (3, (40, 5, 7, 6))])
@pytest.mark.parametrize("tolerance", [0, 1, 1.5, 2.9, 4])
def test_the_pointing_game_matches_its_definition_on_random_maps(axes, shape, tolerance):
    rng = np.random.default_rng(int(10 * tolerance) + axes)
    heat = rng.normal(size=shape)
    masks = rng.uniform(size=shape) < 0.08
    masks[0] = False  # an empty object: always a miss
    expected = [_brute_force_hit(h, m, tolerance) for h, m in zip(heat, masks, strict=True)]
    hits = metrics.pointing_game(heat, masks, tolerance=tolerance, axes=axes)
    np.testing.assert_array_equal(hits, expected)
    assert not hits[0]
    assert 0 < sum(expected) < len(expected)  # both outcomes are exercised


def test_several_instances_per_signal_are_merged():
    """A list of `(m, length)` mask stacks: pointing at either event is a hit."""
    heat = np.zeros((2, 50))
    heat[0, 5] = heat[1, 45] = 1.0
    stacks = []
    for _ in range(2):
        events = np.zeros((2, 50), dtype=bool)
        events[0, 0:10] = True
        events[1, 40:50] = True
        stacks.append(events)
    np.testing.assert_array_equal(metrics.pointing_game(heat, stacks, axes=1), [True, True])
    only_first = [s[:1] for s in stacks]
    np.testing.assert_array_equal(metrics.pointing_game(heat, only_first, axes=1), [True, False])


def test_pointing_game_top_k_rejects_weak_signal_maps_and_points_with_strong_ones():
    maps = np.zeros((1, 3, 40))
    maps[0, 0, 12] = 5.0  # class 3, present, strong, on its event: hit
    maps[0, 1, 30] = 0.1  # class 9, absent, weak: correct rejection
    maps[0, 2, 30] = 5.0  # class 4, absent, strong: miss
    events = np.zeros((1, 1, 40), dtype=bool)
    events[0, 0, 10:15] = True
    hits = metrics.pointing_game_top_k(maps, [[3, 9, 4]], [3], events, threshold=1.0, axes=1)
    np.testing.assert_array_equal(hits, [[True, True, False]])
    volumes = np.zeros((1, 1, 4, 4, 4))
    volumes[0, 0, 1, 2, 3] = 2.0
    blob = np.zeros((1, 1, 4, 4, 4), dtype=bool)
    blob[0, 0, 1, 2, 3] = True
    assert metrics.pointing_game_top_k(volumes, [[0]], [0], blob, threshold=1.0, axes=3)[0, 0]


# -- rank correlation, inside/outside ----------------------------------------------------------


@pytest.mark.parametrize(("axes", "shape"), [(1, (3, 50)), (3, (3, 4, 5, 3))])
def test_rank_correlation_without_ties_is_one_minus_six_sum_d_squared(axes, shape):
    rng = np.random.default_rng(axes)
    size = math.prod(shape[1:])
    a = np.stack([rng.permutation(size) for _ in range(shape[0])]).reshape(shape).astype(float)
    b = np.stack([rng.permutation(size) for _ in range(shape[0])]).reshape(shape).astype(float)
    d = (a - b).reshape(shape[0], -1)  # values are ranks - 1 already
    expected = 1 - 6 * (d**2).sum(axis=1) / (size * (size**2 - 1))
    np.testing.assert_allclose(metrics.rank_correlation(a, b, axes=axes), expected, atol=1e-12)
    np.testing.assert_allclose(metrics.rank_correlation(a, np.exp(a), axes=axes), 1.0)
    np.testing.assert_allclose(metrics.rank_correlation(a, -a, axes=axes), -1.0)


def test_rank_correlation_of_single_maps_and_of_a_constant_one():
    signal = np.arange(10.0)
    np.testing.assert_allclose(metrics.rank_correlation(signal, signal**3, axes=1), [1.0])
    assert metrics.rank_correlation(signal, np.ones(10), axes=1)[0] == 0.0
    # ties share their mean rank: ranks (1.5, 1.5, 3) against (1, 2, 3)
    rho = metrics.rank_correlation([0.0, 0.0, 1.0], [1.0, 2.0, 3.0], axes=1)[0]
    assert rho == pytest.approx(math.sqrt(3) / 2)
    volume = np.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_allclose(metrics.rank_correlation(volume, -volume, axes=3), [-1.0])


def test_inside_outside_ratio_of_signals_and_volumes():
    heat = np.ones(20)
    heat[5:10] = 3.0
    event = np.zeros(20, dtype=bool)
    event[5:10] = True
    np.testing.assert_allclose(metrics.inside_outside_ratio(heat, event, axes=1), [3.0])
    volume = np.ones((4, 4, 4))
    volume[1:3, 1:3, 1:3] = 0.5
    blob = volume < 1
    np.testing.assert_allclose(metrics.inside_outside_ratio(volume, blob, axes=3), [0.5])


# -- deletion, insertion, occlusion --------------------------------------------------------------


@pytest.mark.parametrize(("axes", "spatial"), [(1, (8,)), (3, (2, 2, 2))])
def test_deletion_and_insertion_of_a_linear_model_follow_the_sorted_weights(axes, spatial):
    """Deleting the k most salient elements of ones removes the k largest weights exactly."""
    weights = np.array([3.0, 8.0, 1.0, 6.0, 2.0, 7.0, 4.0, 5.0]).reshape(1, *spatial, 1)
    model, inputs, heat = _linear(weights), np.ones((1, *spatial, 1)), weights[..., 0]
    descending = np.sort(weights.ravel())[::-1]
    removed = np.r_[0.0, np.cumsum(descending)]  # after 0, 1, ..., 8 elements
    deletion = metrics.deletion_curve(model, inputs, [0], heat, steps=8, axes=axes)
    np.testing.assert_allclose(deletion.scores, [36.0 - removed])
    np.testing.assert_allclose(deletion.fractions, np.arange(9) / 8)
    insertion = metrics.insertion_curve(model, inputs, [0], heat, steps=4, axes=axes)
    np.testing.assert_allclose(insertion.scores, [removed[::2]])  # 2 elements per step
    np.testing.assert_allclose(insertion.auc, [np.trapezoid(removed[::2], np.arange(5) / 4)])


def test_occlusion_of_a_signal_averages_the_drops_of_the_windows_covering_each_sample():
    """Length 5, window 2, stride 2: windows start at 0, 2 and (flush) 3."""
    w = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    heat = metrics.occlusion_map(
        _linear(w.reshape(1, 5, 1)), np.ones((1, 5, 1)), [0], patch_size=2, stride=2, axes=1
    )
    windows = {0: w[0] + w[1], 2: w[2] + w[3], 3: w[3] + w[4]}
    expected = [windows[0], windows[0], windows[2], (windows[2] + windows[3]) / 2, windows[3]]
    np.testing.assert_allclose(heat, [expected])


def test_occlusion_of_a_volume_gives_each_block_its_weight_sum():
    w = np.random.default_rng(0).uniform(size=(4, 4, 6))
    heat = metrics.occlusion_map(
        _linear(w[None, ..., None]),
        np.ones((1, 4, 4, 6, 1)),
        [0],
        patch_size=(2, 2, 3),
        stride=(2, 2, 3),
        axes=3,
    )
    assert heat.shape == (1, 4, 4, 6)
    for z, y, x in itertools.product((0, 2), (0, 2), (0, 3)):
        block = (slice(z, z + 2), slice(y, y + 2), slice(x, x + 3))
        np.testing.assert_allclose(heat[0][block], w[block].sum())


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        # boxes are image boxes: signals and volumes take boolean masks
        (
            lambda: metrics.pointing_game(np.zeros((2, 30)), [[0, 0, 5, 5]] * 2, axes=1),
            InputError,
            r"masks_or_boxes.*boolean masks of the signal maps' size \(30,\).*Received",
        ),
        (
            lambda: metrics.pointing_game(np.zeros((1, 3, 4, 5)), [[0, 0, 2, 2]], axes=3),
            InputError,
            r"boolean masks of the volume maps' size \(3, 4, 5\).*Received",
        ),
        (
            lambda: metrics.pointing_game(np.zeros((2, 30)), np.zeros((2, 31), bool), axes=1),
            InputError,
            r"masks_or_boxes.*\(30,\).*Received.*\(31,\)",
        ),
        (
            lambda: metrics.pointing_game(np.zeros(30), np.zeros(30, bool), axes=4),
            ValueError,
            "axes",
        ),
        (
            lambda: metrics.pointing_game(np.zeros((2, 3, 4, 5)), np.zeros((2, 3, 4, 5), bool)),
            InputError,
            r"heatmaps.*pass `axes=3`.*Received: heatmaps.shape=\(2, 3, 4, 5\)",
        ),
        (
            lambda: metrics.box_from_heatmap(np.zeros((2, 3, 4, 5))),
            InputError,
            r"heatmaps.*no bounding box.*pointing_game.*Received",
        ),
        (
            lambda: metrics.box_from_heatmap(np.zeros(30)),
            InputError,
            r"heatmaps.*no bounding box.*Received: heatmaps.shape=\(30,\)",
        ),
        (
            lambda: metrics.deletion_curve(
                _linear(np.ones((1, 2, 2, 2, 1))),
                np.ones((1, 2, 2, 2, 1)),
                [0],
                np.ones((1, 2, 2, 2)),
            ),
            InputError,
            r"images.*pass `axes=3`.*Received",
        ),
        (
            lambda: metrics.occlusion_map(
                _linear(np.ones((1, 9, 1))), np.ones((1, 9, 1)), [0], patch_size=(2, 2), axes=1
            ),
            ValueError,
            r"patch_size.*a tuple of 1 ints.*Received",
        ),
        (
            lambda: metrics.occlusion_map(
                _linear(np.ones((1, 9, 1))), np.ones((1, 9, 1)), [0], patch_size=10, axes=1
            ),
            ValueError,
            r"patch_size.*fit in the images \(9\).*Received",
        ),
        (
            lambda: metrics.insertion_curve(
                _linear(np.ones((1, 9, 1))), np.ones((1, 9, 1)), [0], np.ones((1, 8)), axes=1
            ),
            InputError,
            r"heatmaps.*\(1, 9\).*Received: heatmaps.shape=\(1, 8\)",
        ),
        (lambda: metrics.rank_correlation(np.ones(5), np.ones(6), axes=1), InputError, "`a`"),
    ],
)
def test_signal_and_volume_errors_say_what_is_needed(call, error, match):
    with pytest.raises(error, match=match):
        call()
