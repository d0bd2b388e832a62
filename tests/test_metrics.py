"""Tests of tf_gradcam.metrics: every expected value is worked out by hand or independently."""

import math

import numpy as np
import pytest
import scipy.stats

from tf_gradcam import metrics
from tf_gradcam.errors import InputError, TargetError


def _linear_model(weights):
    """A callable whose score for class c is sum(weights[c] * x) over each image."""
    weights = np.asarray(weights, dtype=np.float64)  # (classes, height, width, channels)

    def model(images):
        return np.einsum("nhwc,khwc->nk", images, weights)

    return model


def _box_of_mask(mask):
    """Bounding box (x0, y0, x1, y1), exclusive, of a boolean mask, from its nonzero indices."""
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])


# -- §4.1 localisation -------------------------------------------------------------------------


def test_box_of_a_mask_shaped_map_is_the_mask_bounding_box():
    """A map equal to an object's mask gives that mask's box, IoU 1 and a pointing hit."""
    mask = np.zeros((12, 16), dtype=bool)
    mask[3:9, 5:14] = True
    mask[2, 7] = True  # an irregular outline, still one segment
    box = metrics.box_from_heatmap(mask.astype(np.float32)[None])
    np.testing.assert_array_equal(box, [[5, 2, 14, 9]])
    np.testing.assert_array_equal(box[0], _box_of_mask(mask))
    np.testing.assert_allclose(metrics.iou(box, _box_of_mask(mask)[None]), [1.0], atol=0)
    assert metrics.pointing_game(mask.astype(float)[None], mask[None])[0]


def test_threshold_is_inclusive_at_exactly_15_percent_of_the_max():
    """A value equal to 0.15 x max is kept and the next float below it is dropped."""
    heatmap = np.zeros((6, 8))
    heatmap[2, 2] = 1.0
    heatmap[2, 3] = 0.15  # == 0.15 * 1.0: kept, widens the box to x1 = 4
    heatmap[3, 2] = 0.15  # kept, y1 = 4
    heatmap[2, 4] = np.nextafter(0.15, 0.0)  # just below: dropped
    heatmap[4, 2] = np.nextafter(0.15, 0.0)
    np.testing.assert_array_equal(metrics.box_from_heatmap(heatmap), [[2, 2, 4, 4]])
    heatmap[2, 4] = np.nextafter(0.15, 1.0)  # just above: kept, x1 = 5
    np.testing.assert_array_equal(metrics.box_from_heatmap(heatmap), [[2, 2, 5, 4]])


def test_largest_of_two_segments_is_boxed():
    """With two segments the box surrounds the one with more pixels, not the brighter one."""
    heatmap = np.zeros((10, 10))
    heatmap[1:3, 1:3] = 1.0  # 4 pixels, brightest
    heatmap[5:8, 4:7] = 0.5  # 9 pixels, above 0.15 of the max
    np.testing.assert_array_equal(metrics.box_from_heatmap(heatmap), [[4, 5, 7, 8]])


def test_segments_use_eight_connectivity():
    """Diagonal neighbours form one segment, so a 3-pixel diagonal beats a 2-pixel bar."""
    heatmap = np.zeros((8, 8))
    heatmap[0, 0] = heatmap[1, 1] = heatmap[2, 2] = 1.0  # one segment only if diagonals touch
    heatmap[6, 4:6] = 1.0
    np.testing.assert_array_equal(metrics.box_from_heatmap(heatmap), [[0, 0, 3, 3]])


def test_all_zero_map_gives_an_empty_box_with_zero_iou():
    """An all-zero map gives the empty box (0, 0, 0, 0), whose IoU with any box is 0, not NaN."""
    boxes = metrics.box_from_heatmap(np.zeros((2, 5, 5)))
    np.testing.assert_array_equal(boxes, np.zeros((2, 4)))
    np.testing.assert_array_equal(metrics.iou(boxes, [[0, 0, 5, 5], [0, 0, 0, 0]]), [0.0, 0.0])


def test_single_map_is_a_batch_of_one():
    """A (height, width) map gives a (1, 4) box array."""
    heatmap = np.zeros((4, 4))
    heatmap[1, 2] = 1.0
    np.testing.assert_array_equal(metrics.box_from_heatmap(heatmap), [[2, 1, 3, 2]])


def test_iou_hand_computed_cases():
    """IoU of disjoint, touching, identical, half-overlapping and nested boxes."""
    a = [[0, 0, 2, 2], [0, 0, 2, 2], [1, 1, 5, 4], [0, 0, 4, 2], [0, 0, 4, 4]]
    b = [[5, 5, 7, 7], [2, 0, 4, 2], [1, 1, 5, 4], [2, 0, 6, 2], [0, 0, 2, 4]]
    # shifted by half: intersection 2x2 = 4, union 8 + 8 - 4 = 12; nested: 8 / 16
    expected = [0.0, 0.0, 1.0, 4 / 12, 8 / 16]
    np.testing.assert_allclose(metrics.iou(a, b), expected, rtol=1e-12)
    np.testing.assert_allclose(metrics.iou([0, 0, 4, 4], b[3:]), [4 / 20, 8 / 16], rtol=1e-12)


def test_localization_error_top1_and_top5_on_a_hand_made_batch():
    """Top-1 and top-5 errors follow the ILSVRC rule: right class and IoU >= 0.5."""
    good, bad = [0, 0, 10, 10], [0, 0, 10, 3]  # IoU(bad, good) = 30 / 100
    pred_classes = np.array(
        [
            [1, 2, 3, 4, 5],  # right class first, right box: correct at top-1
            [9, 8, 7, 6, 1],  # right class fifth: top-1 error, top-5 correct
            [1, 2, 3, 4, 5],  # right class, box IoU 0.3: error at both
            [2, 3, 4, 5, 6],  # matches the second gt box at IoU exactly 0.5: correct
        ]
    )
    pred_boxes = np.array(
        [
            [good, bad, bad, bad, bad],
            [good, good, good, good, good],
            [bad, good, good, good, good],
            [[20, 20, 30, 25], bad, bad, bad, bad],
        ]
    )
    gt_classes = [1, 1, 1, [2, 2]]
    gt_boxes = [good, good, good, [[0, 0, 5, 5], [20, 20, 30, 30]]]  # 50 / 100 for image 3

    top1 = metrics.localization_error(pred_classes, pred_boxes, gt_classes, gt_boxes, top_k=1)
    top5 = metrics.localization_error(pred_classes, pred_boxes, gt_classes, gt_boxes, top_k=5)
    np.testing.assert_array_equal(top1, [False, True, True, False])
    np.testing.assert_array_equal(top5, [False, False, True, False])
    assert top1.mean() == 0.5 and top5.mean() == 0.25

    padded_classes = np.array([[1, -1], [1, -1], [1, -1], [2, 2]])
    padded_boxes = np.array([[good, [0] * 4], [good, [0] * 4], [good, [0] * 4], gt_boxes[3]])
    padded = metrics.localization_error(
        pred_classes, pred_boxes, padded_classes, padded_boxes, top_k=5
    )
    np.testing.assert_array_equal(padded, top5)


# -- §4.3 pointing game ------------------------------------------------------------------------


def test_pointing_miss_when_the_peak_is_outside_the_object():
    """A map peaked off the object is a miss, and a hit once the peak moves onto it."""
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 2:5, 2:5] = True
    heatmap = np.zeros((1, 10, 10))
    heatmap[0, 7, 7] = 1.0
    heatmap[0, 3, 3] = 0.9
    assert not metrics.pointing_game(heatmap, mask)[0]
    heatmap[0, 3, 3] = 1.1
    assert metrics.pointing_game(heatmap, mask)[0]


def test_pointing_tolerance_is_an_exact_euclidean_radius():
    """A peak at distance 5 hits with tolerance 5 but not 4.999; sqrt(32) needs more than 5."""
    mask = np.zeros((12, 12), dtype=bool)
    mask[5, 5] = True
    three_four = np.zeros((12, 12))
    three_four[8, 9] = 1.0  # 3 rows and 4 columns away: distance 5
    assert not metrics.pointing_game(three_four, mask, tolerance=4.999)[0]
    assert metrics.pointing_game(three_four, mask, tolerance=5)[0]
    four_four = np.zeros((12, 12))
    four_four[9, 9] = 1.0  # distance sqrt(32) = 5.657: inside a square of half-side 5, not a disc
    assert not metrics.pointing_game(four_four, mask, tolerance=5)[0]
    assert metrics.pointing_game(four_four, mask, tolerance=math.sqrt(32))[0]


def test_pointing_with_boxes_equals_pointing_with_their_masks():
    """Boxes (several per image, zero padding) score as the union of their rasterised masks."""
    rng = np.random.default_rng(0)
    heatmaps = rng.random((20, 9, 11))
    boxes = rng.integers(0, 12, size=(20, 2, 4))
    boxes[:, :, 2:] = np.maximum(boxes[:, :, :2], boxes[:, :, 2:])
    boxes[::3, 1] = 0  # padding: the empty box
    masks = np.zeros((20, 9, 11), dtype=bool)
    for mask, image_boxes in zip(masks, boxes, strict=True):
        for x0, y0, x1, y1 in image_boxes:
            mask[y0:y1, x0:x1] = True
    for tolerance in (0, 2.5):
        by_boxes = metrics.pointing_game(heatmaps, boxes, tolerance=tolerance)
        by_masks = metrics.pointing_game(heatmaps, masks, tolerance=tolerance)
        by_list = metrics.pointing_game(heatmaps, list(boxes), tolerance=tolerance)
        np.testing.assert_array_equal(by_boxes, by_masks)
        np.testing.assert_array_equal(by_list, by_masks)
    assert 0 < by_masks.sum() < 20  # the check saw both outcomes


def test_constant_map_points_nowhere():
    """An all-zero map is a miss even over an object that covers the whole image."""
    assert not metrics.pointing_game(np.zeros((5, 5)), np.ones((5, 5), dtype=bool))[0]


def test_top_k_pointing_scores_rejections_as_in_the_paper():
    """Rejecting an absent class is a hit; rejecting a present or keeping an absent one, a miss."""
    maps = np.zeros((1, 5, 8, 8))
    maps[0, 0, 1, 1] = 5.0  # class 3, present, confident, on its box: hit
    maps[0, 1, 6, 6] = 5.0  # class 4, present, confident, off its box: miss
    maps[0, 2, 1, 1] = 0.5  # class 5, present but rejected: miss
    maps[0, 3, 1, 1] = 0.5  # class 8, absent and rejected: hit
    maps[0, 4, 1, 1] = 5.0  # class 9, absent but kept: miss
    gt_classes = [[3, 4, 5]]
    gt_boxes = [[[0, 0, 4, 4], [0, 0, 4, 4], [0, 0, 4, 4]]]
    hits = metrics.pointing_game_top_k(maps, [[3, 4, 5, 8, 9]], gt_classes, gt_boxes, threshold=1.0)
    np.testing.assert_array_equal(hits, [[True, False, False, True, False]])
    assert metrics.pointing_accuracy(hits) == pytest.approx(2 / 5, abs=1e-12)
    # threshold is inclusive on the keep side: a max equal to it is not rejected
    at_threshold = metrics.pointing_game_top_k(
        maps[:, 2:3], [[5]], gt_classes, gt_boxes, threshold=0.5
    )
    np.testing.assert_array_equal(at_threshold, [[True]])


def test_pointing_accuracy_is_hits_over_all():
    """Accuracy is #hits / (#hits + #misses) over every entry."""
    assert metrics.pointing_accuracy(np.array([[True, False], [True, True]])) == 0.75


# -- §5.3 faithfulness -------------------------------------------------------------------------


def test_occlusion_of_a_linear_model_is_the_patch_sum():
    """For scores = sum(w * x) and fill 0, a non-overlapping patch's drop is sum(w * x) over it."""
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(3, 4, 6, 2))
    images = rng.normal(size=(2, 4, 6, 2))
    targets = np.array([2, 0])
    result = metrics.occlusion_map(
        _linear_model(weights), images, targets, patch_size=2, stride=2, batch_size=5
    )
    for n, c in enumerate(targets):
        contributions = (weights[c] * images[n]).sum(axis=-1)  # (4, 6)
        block_sums = contributions.reshape(2, 2, 3, 2).sum(axis=(1, 3))  # (2, 3) blocks
        expected = np.kron(block_sums, np.ones((2, 2)))
        np.testing.assert_allclose(result[n], expected, rtol=1e-10, atol=1e-12)


def test_one_pixel_occlusion_equals_gradient_times_input():
    """With 1-pixel patches a linear model's occlusion map is exactly gradient x input."""
    rng = np.random.default_rng(2)
    weights = rng.normal(size=(2, 5, 5, 3))
    images = rng.normal(size=(3, 5, 5, 3))
    targets = np.array([1, 0, 1])
    result = metrics.occlusion_map(_linear_model(weights), images, targets, patch_size=1, stride=1)
    gradient_times_input = (weights[targets] * images).sum(axis=-1)  # d score / dx = w
    np.testing.assert_allclose(result, gradient_times_input, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        metrics.rank_correlation(result, gradient_times_input), [1.0, 1.0, 1.0], atol=1e-12
    )


def test_last_patch_is_flush_with_the_border():
    """On 5x5 with patch 2 and stride 2 the patches start at 0, 2 and 3, covering every pixel."""
    weights = np.zeros((1, 5, 5, 1))
    weights[0, 4, 4, 0] = 1.0  # the score is pixel (4, 4); only the patch at (3, 3) covers it
    result = metrics.occlusion_map(
        _linear_model(weights), np.ones((1, 5, 5, 1)), 0, patch_size=2, stride=2
    )
    # that patch's drop of 1 is averaged with the patches covering each of its pixels:
    # rows/cols 3 lie under the starts 2 and 3, rows/cols 4 under start 3 alone.
    expected = np.zeros((5, 5))
    expected[3:, 3:] = [[1 / 4, 1 / 2], [1 / 2, 1.0]]
    np.testing.assert_allclose(result[0], expected, rtol=1e-12)


def test_occlusion_with_a_keras_dense_model():
    """A keras Dense model on flattened pixels gives the hand-averaged overlapping patch sums."""
    import keras

    model = keras.Sequential(
        [keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(2, use_bias=False)]
    )
    kernel = np.arange(32, dtype=np.float32).reshape(16, 2) / 10.0
    model.layers[-1].set_weights([kernel])
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1) / 16.0
    result = metrics.occlusion_map(model, image, [1], patch_size=2, stride=1, fill_value=0.0)

    contributions = kernel[:, 1].reshape(4, 4) * image[0, :, :, 0]
    total, count = np.zeros((4, 4)), np.zeros((4, 4))
    for row in range(3):  # starts 0, 1, 2 on both axes
        for col in range(3):
            total[row : row + 2, col : col + 2] += contributions[row : row + 2, col : col + 2].sum()
            count[row : row + 2, col : col + 2] += 1
    np.testing.assert_allclose(result[0], total / count, rtol=1e-5, atol=1e-6)


def test_batched_occlusion_equals_one_patch_at_a_time():
    """Any batch size gives the maps of occluding one patch per model call, in fewer calls."""
    rng = np.random.default_rng(3)
    weights = rng.normal(size=(4, 6, 7, 3))
    images = rng.normal(size=(2, 6, 7, 3))
    targets = np.array([3, 1])
    calls = []

    def model(x):  # non-linear, so averaging is checked on arbitrary drops
        calls.append(len(x))
        return (
            np.tanh(np.einsum("nhwc,khwc->nk", x, weights)) + (x**2).mean(axis=(1, 2, 3))[:, None]
        )

    reference = np.zeros((2, 6, 7))
    for n in range(2):
        original = model(images[n : n + 1])[0, targets[n]]
        total, count = np.zeros((6, 7)), np.zeros((6, 7))
        for row in (0, 2, 3):  # patch 3, stride 2 on 6 rows: 0, 2, then flush at 3
            for col in (0, 2, 4):  # on 7 columns: 0, 2, 4 (4 is already flush)
                occluded = images[n].copy()
                occluded[row : row + 3, col : col + 3] = 0.5
                drop = original - model(occluded[None])[0, targets[n]]
                total[row : row + 3, col : col + 3] += drop
                count[row : row + 3, col : col + 3] += 1
        reference[n] = total / count

    for batch_size in (1, 4, 100):
        calls.clear()
        result = metrics.occlusion_map(
            model, images, targets, patch_size=3, stride=2, fill_value=0.5, batch_size=batch_size
        )
        np.testing.assert_allclose(result, reference, rtol=1e-10, atol=1e-12)
        # 2 originals, then 2 images x 9 patches, each cut into batches
        assert len(calls) == math.ceil(2 / batch_size) + math.ceil(18 / batch_size)


def test_score_fn_is_applied_to_the_model_outputs():
    """Negating the scores with score_fn negates the occlusion map."""
    weights = np.random.default_rng(4).normal(size=(2, 4, 4, 1))
    images = np.ones((1, 4, 4, 1))
    plain = metrics.occlusion_map(_linear_model(weights), images, [1], patch_size=2, stride=2)
    negated = metrics.occlusion_map(
        _linear_model(weights), images, [1], patch_size=2, stride=2, score_fn=np.negative
    )
    np.testing.assert_allclose(negated, -plain, rtol=1e-12)


def test_rank_correlation_matches_scipy_with_ties():
    """Per-image Spearman with average ranks for ties equals scipy.stats.spearmanr."""
    rng = np.random.default_rng(5)
    a = rng.integers(0, 4, size=(6, 7, 5)).astype(float)  # many ties
    b = a + rng.integers(0, 3, size=a.shape)
    b[0] = rng.random((7, 5))
    expected = [
        scipy.stats.spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b, strict=True)
    ]
    np.testing.assert_allclose(metrics.rank_correlation(a, b), expected, rtol=1e-12)
    np.testing.assert_allclose(metrics.rank_correlation(a, -b), -np.array(expected), rtol=1e-12)


def test_rank_correlation_of_a_constant_map_is_zero():
    """A constant map has no ranking; its correlation is 0.0 rather than NaN."""
    assert metrics.rank_correlation(np.zeros((3, 3)), np.arange(9.0).reshape(3, 3))[0] == 0.0


def test_deletion_and_insertion_areas_in_closed_form():
    """Pixel contributions 1..16 removed one per step give AUCs 748/16 and 136 - 748/16."""
    # Deleting the i largest of 1..16 leaves S_i = (16 - i)(17 - i) / 2. The trapezoid rule over
    # fractions i/16 gives (sum_i S_i - (S_0 + S_16) / 2) / 16, with sum_{m=0}^{16} m(m+1)/2 =
    # C(18, 3) = 816, S_0 = 136, S_16 = 0: (816 - 68) / 16 = 46.75. Inserting is 136 - S_i.
    contributions = np.random.default_rng(6).permutation(np.arange(1.0, 17.0)).reshape(4, 4)
    weights = contributions[None, :, :, None]
    images = np.ones((1, 4, 4, 1))
    for batch_size in (3, 64):
        deletion = metrics.deletion_curve(
            _linear_model(weights), images, [0], contributions, steps=16, batch_size=batch_size
        )
        insertion = metrics.insertion_curve(
            _linear_model(weights), images, [0], contributions, steps=16, batch_size=batch_size
        )
        i = np.arange(17)
        np.testing.assert_allclose(deletion.fractions, i / 16, rtol=1e-12)
        np.testing.assert_allclose(deletion.scores[0], (16 - i) * (17 - i) / 2, rtol=1e-12)
        np.testing.assert_allclose(deletion.auc, [46.75], rtol=1e-12)
        np.testing.assert_allclose(insertion.auc, [136 - 46.75], rtol=1e-12)


def test_deletion_plus_insertion_is_the_full_score_for_a_linear_model():
    """With baseline 0, deleted and inserted scores sum to the full score at every step."""
    rng = np.random.default_rng(7)
    weights = rng.normal(size=(3, 5, 6, 2))
    images = rng.normal(size=(2, 5, 6, 2))
    heatmaps = rng.random((2, 5, 6))
    targets = np.array([0, 2])
    deletion = metrics.deletion_curve(_linear_model(weights), images, targets, heatmaps, steps=7)
    insertion = metrics.insertion_curve(_linear_model(weights), images, targets, heatmaps, steps=7)
    full = (weights[targets] * images).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(deletion.scores + insertion.scores, full[:, None] * np.ones(8))
    np.testing.assert_allclose(deletion.auc + insertion.auc, full, rtol=1e-10)
    # 30 pixels in 7 steps: floor(i * 30 / 7) pixels changed at step i
    np.testing.assert_allclose(deletion.fractions, np.array([0, 4, 8, 12, 17, 21, 25, 30]) / 30)


def test_inside_outside_ratio_cases():
    """Ratio of means inside/outside: 3 for a hand-made map, 1 uniform, inf and 1 at zero."""
    heatmap = np.ones((4, 4))
    heatmap[:2, :2] = 3.0
    only_inside = np.zeros((4, 4))
    only_inside[0, 0] = 2.0
    maps = np.stack([heatmap, np.full((4, 4), 0.7), only_inside, np.zeros((4, 4))])
    ratios = metrics.inside_outside_ratio(maps, np.array([[0, 0, 2, 2]] * 4))
    # only_inside: mean 2/4 inside, 0 outside -> inf; all-zero -> 1.0 (uniform)
    np.testing.assert_allclose(ratios, [3.0, 1.0, np.inf, 1.0], rtol=1e-12)


# -- §7 textual explanations -------------------------------------------------------------------


def test_textual_explanation_picks_the_extreme_neurons_and_names_them():
    """Top and bottom neurons are the largest and smallest α; unnamed ones get 'unit i'."""
    alpha = np.array([0.3, -2.0, 1.5, 0.0, -0.5, 2.5, 0.1, -1.0])
    names = {5: "book", 2: "shelf", 1: "sky", 7: "road"}
    result = metrics.textual_explanation(alpha, names, class_name="book-store", top_k=3, bottom_k=3)
    assert result.top_indices == (5, 2, 0)
    assert result.top_weights == (2.5, 1.5, 0.3)
    assert result.top_names == ("book", "shelf", "unit 0")
    assert result.bottom_indices == (1, 7, 4)
    assert result.bottom_names == ("sky", "road", "unit 4")
    assert result.sentence == (
        "The score for 'book-store' rises with book, shelf and unit 0, "
        "and falls with sky, road and unit 4."
    )
    with pytest.raises(AttributeError):
        result.top_indices = (0,)  # frozen


def test_textual_explanation_batched_named_only_and_sign_filter():
    """(N, K) α gives one result per image; named_only skips unnamed units; sign filters text."""
    alpha = np.array([[0.3, -2.0, 1.5, 0.2], [-0.1, -0.2, -0.3, -0.4]])
    names = [None, "sky", "shelf", "lamp"]
    first, second = metrics.textual_explanation(
        alpha, names, class_name=["a", "b"], top_k=2, bottom_k=1, named_only=True
    )
    assert first.top_indices == (2, 3) and first.bottom_indices == (1,)
    assert second.top_indices == (1, 2)  # all negative: the least negative named ones
    assert second.bottom_indices == (3,)
    assert second.sentence == "The score for 'b' falls with lamp."


# -- argument checking ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "argument"),
    [
        (lambda: metrics.box_from_heatmap(np.ones((2, 2)), threshold=1.5), ValueError, "threshold"),
        (lambda: metrics.box_from_heatmap(np.ones((1, 2, 2, 1))), InputError, "heatmaps"),
        (lambda: metrics.iou([0, 0, 1], [0, 0, 1, 1]), InputError, "boxes_a"),
        (
            lambda: metrics.pointing_game(np.ones((2, 2)), [0, 0, 1, 1], tolerance=-1),
            ValueError,
            "tolerance",
        ),
        (
            lambda: metrics.pointing_game(np.ones((2, 3, 3)), np.ones((2, 3, 3))),
            InputError,
            "masks_or_boxes",
        ),
        (
            lambda: metrics.pointing_game(np.ones((2, 4, 4)), np.ones((2, 4, 4), np.uint8)),
            InputError,
            "masks_or_boxes",
        ),
        (
            lambda: metrics.occlusion_map(
                _linear_model(np.ones((2, 4, 4, 1))), np.ones((1, 4, 4, 1)), [2], patch_size=2
            ),
            TargetError,
            "target_classes",
        ),
        (
            lambda: metrics.occlusion_map(
                _linear_model(np.ones((2, 4, 4, 1))), np.ones((1, 4, 4, 1)), [0], patch_size=5
            ),
            ValueError,
            "patch_size",
        ),
        (lambda: metrics.rank_correlation(np.ones((2, 2)), np.ones((3, 3))), InputError, "`a`"),
        (lambda: metrics.textual_explanation([1.0, 2.0], ["only one"]), InputError, "neuron_names"),
    ],
)
def test_errors_name_the_argument_and_what_was_received(call, error, argument):
    """Bad arguments raise a specific ValueError naming the argument and the received value."""
    with pytest.raises(error, match=f"{argument}.*Received"):
        call()


def _nan_when_dark(images):
    """A model whose score is NaN once any pixel is zero (it divides by the darkest pixel)."""
    x = np.asarray(images, np.float64)
    darkest = x.min(axis=(1, 2, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        score = x.sum(axis=(1, 2, 3)) * np.where(darkest > 0, 1.0, np.nan)
    return score[:, None]


@pytest.mark.parametrize("curve", [metrics.deletion_curve, metrics.insertion_curve])
def test_non_finite_model_scores_are_an_error_not_a_nan_auc(curve):
    """Deletion to a black baseline makes this model's score NaN: an InputError, never a NaN AUC."""
    images = np.ones((1, 4, 4, 1))
    heat = np.arange(16.0).reshape(1, 4, 4)
    with pytest.raises(InputError, match=r"non-finite score\(s\).*baseline"):
        curve(_nan_when_dark, images, [0], heat, steps=4)
    finite = curve(_nan_when_dark, images, [0], heat, steps=4, baseline=0.5)
    assert np.isfinite(finite.auc).all()
