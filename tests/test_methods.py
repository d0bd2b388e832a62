"""Methods by name: the registry, `explain(method=)`, its errors and its smoothing options."""

from __future__ import annotations

import numpy as np
import pytest

import tf_gradcam
from tf_gradcam.methods import METHODS, explain, get_method, method_name


@pytest.mark.parametrize("name", sorted(METHODS))
def test_explain_by_name_equals_the_class(cnn, images, name):
    """explain(method=name) returns exactly what the registered class returns."""
    cls = get_method(name)
    assert cls is getattr(tf_gradcam, cls.__name__)  # every method is public
    direct = cls(cnn, "last_conv")(images, target=1)
    by_name = explain(cnn, images, target=1, layer="last_conv", method=name)
    np.testing.assert_allclose(by_name.heatmaps, direct.heatmaps, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(by_name.weights, direct.weights, rtol=1e-6, atol=1e-7)


def test_spellings_of_a_name_are_one_method():
    """Case, '-', '_' and spaces are ignored; 'plusplus' means '++'."""
    assert method_name("Grad-CAM++") == "gradcam++"
    assert method_name("gradcam_plus_plus") == "gradcam++"
    assert method_name("Score CAM") == "scorecam"
    assert get_method("HiRes-CAM") is tf_gradcam.HiResCAM


def test_unknown_method_lists_the_known_ones(cnn, images):
    """A typo is a typed error naming every method."""
    with pytest.raises(tf_gradcam.UnknownMethodError) as error:
        explain(cnn, images, method="gradcam+")
    for name in METHODS:
        assert name in str(error.value)
    with pytest.raises(tf_gradcam.UnknownMethodError, match="method=3"):
        method_name(3)


def test_an_option_the_method_lacks_is_a_type_error(cnn, images):
    """Grad-CAM's pooling ablation does not exist for XGrad-CAM."""
    with pytest.raises(TypeError, match="pooling"):
        explain(cnn, images, method="xgradcam", pooling="max")


def test_explain_smooths_with_flips_like_smoothed(cnn, images):
    """explain(flips=True) is Smoothed(method, flips=True)."""
    cam = tf_gradcam.GradCAMPlusPlus(cnn, "last_conv")
    expected = tf_gradcam.Smoothed(cam, flips=True)(images, target=2)
    result = explain(cnn, images, target=2, layer="last_conv", method="gradcam++", flips=True)
    np.testing.assert_allclose(result.heatmaps, expected.heatmaps, rtol=1e-6, atol=1e-7)
    plain = explain(cnn, images, target=2, layer="last_conv", method="gradcam++")
    assert np.abs(plain.heatmaps - result.heatmaps).max() > 1e-3


@pytest.mark.parametrize("name", ["gradcam++", "eigencam"])
def test_explain_dataset_runs_the_named_method(cnn, images, name):
    """explain_dataset(method=name) streams the same maps as the class called directly."""
    batches = []
    tf_gradcam.explain_dataset(
        cnn,
        images,
        layer="last_conv",
        method=name,
        batch_size=3,
        verbose=0,
        on_batch=batches.append,
    )
    streamed = np.concatenate([b.explanation.heatmaps for b in batches])
    direct = get_method(name)(cnn, "last_conv")(images).heatmaps
    np.testing.assert_allclose(streamed, direct, rtol=1e-5, atol=1e-6)


def test_explain_dataset_refuses_a_method_with_a_built_explainer(cnn, images):
    """A built explainer already is a method: a second one is a contradiction."""
    with pytest.raises(ValueError, match="method='scorecam'"):
        tf_gradcam.explain_dataset(tf_gradcam.GradCAM(cnn), images, method="scorecam", verbose=0)
