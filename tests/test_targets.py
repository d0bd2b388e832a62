"""Target resolution: each accepted form becomes the class indices the compiled step needs."""

from __future__ import annotations

import numpy as np
import pytest

from tf_gradcam import TargetError, TopK
from tf_gradcam.targets import resolve_target


def test_int_and_per_image_targets_become_class_arrays():
    """An int is repeated per image; a list is taken as given, as int32."""
    np.testing.assert_array_equal(resolve_target(2, 3, 5).classes, [2, 2, 2])
    spec = resolve_target(np.array([4, 0, 1], np.int64), 3, 5)
    assert spec.kind == "classes" and spec.classes.dtype == np.int32
    np.testing.assert_array_equal(spec.classes, [4, 0, 1])


def test_none_topk_and_callable_kinds():
    """None is the predicted class; TopK keeps k; a callable is kept as the score function."""
    assert resolve_target(None, 2, 5).kind == "predicted"
    spec = resolve_target(TopK(3), 2, 5)
    assert (spec.kind, spec.k) == ("top_k", 3)

    def fn(outputs):
        return outputs[:, 0]

    spec = resolve_target(fn, 2, None)
    assert spec.kind == "callable" and spec.fn is fn


def test_unknown_batch_size_skips_length_check():
    """In graph mode (batch None) a per-image list is not length-checked; an int gives one entry."""
    assert resolve_target([1, 2, 3], None, 5).classes.shape == (3,)
    assert resolve_target(1, None, 5).classes.shape == (1,)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_topk_needs_a_positive_int(k):
    """TopK(k) refuses k that is not a positive integer."""
    with pytest.raises(TargetError, match="positive integer"):
        TopK(k)


def test_one_labels_sentinel_and_the_old_name_warns():
    """`"labels"` is the one sentinel; the callback's former `"true"` maps to it with a warning."""
    import warnings

    from tf_gradcam.targets import LABELS, labels_target

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert labels_target("labels") == LABELS == "labels"
        assert labels_target(3) == 3
    with pytest.warns(DeprecationWarning, match='use target="labels"'):
        assert labels_target("true") == LABELS


def test_labels_become_classes_by_one_definition():
    """Integer, whole-float, (n, 1) and one-hot labels give the same classes; soft rows refused."""
    from tf_gradcam.targets import classes_from_labels

    expected = np.array([2, 0, 1])
    for labels in (expected, expected.astype(float), expected[:, None], np.eye(3)[expected]):
        np.testing.assert_array_equal(classes_from_labels(labels), expected)
    with pytest.raises(TargetError, match="one-hot rows"):
        classes_from_labels(np.full((3, 3), 1 / 3))
