"""Tests for tf_gradcam.display: notebook display of results and `show`.

Expected sizes come from the layout the module documents: a header line,
then one row of panels per top-k rank (and layer), one column per shown
image, each panel `PANEL_PIXELS` wide and `TITLE_PIXELS + PANEL_PIXELS` high.
"""

from __future__ import annotations

import base64
import re

import matplotlib

matplotlib.use("Agg")

import cv2
import numpy as np
import pytest
from conftest import make_cnn
from matplotlib import colormaps

import tf_gradcam
from tf_gradcam import display
from tf_gradcam.gradcam import Explanation
from tf_gradcam.pictures import orthogonal_slices, signal_picture

PANEL, TITLE, HEADER = display.PANEL_PIXELS, display.TITLE_PIXELS, display.HEADER_PIXELS


def _expected_size(rows: int, columns: int) -> tuple[int, int]:
    """(height, width) in pixels of a grid of `rows` x `columns` panels."""
    return HEADER + rows * (TITLE + PANEL), columns * PANEL


def _decode(png: bytes) -> np.ndarray:
    picture = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert picture is not None, "the PNG does not decode"
    return picture


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 16, 16, 3), dtype=np.float32)


def _explanation(heatmaps: np.ndarray, scores: np.ndarray, classes=None) -> Explanation:
    """A hand-made Explanation (no model): only the fields the display reads matter."""
    batch = heatmaps.shape[0]
    return Explanation(
        heatmaps=heatmaps,
        maps=heatmaps,
        raw_maps=heatmaps,
        weights=np.zeros((batch, 1), np.float32),
        scores=scores,
        classes=classes,
        degenerate=np.zeros(scores.shape, bool),
        layer="hand/made",
    )


@pytest.fixture(scope="module")
def cam():
    return tf_gradcam.GradCAM(make_cnn(activation=None), "last_conv")


# ------------------------------------------------------------- _repr_png_


@pytest.mark.parametrize(
    ("batch", "k"),
    [(3, None), (display.MAX_PREVIEW, None), (11, None), (3, 2), (10, 3)],
)
def test_repr_png_has_one_panel_per_shown_image_and_rank(cam, batch, k):
    """Columns: min(batch, MAX_PREVIEW) images; rows: the k ranks (1 without a k axis)."""
    target = None if k is None else tf_gradcam.TopK(k)
    result = cam(_images(batch), target=target)
    picture = _decode(result._repr_png_())
    rows, columns = (k or 1), min(batch, display.MAX_PREVIEW)
    assert picture.shape[:2] == _expected_size(rows, columns)


def test_repr_png_of_compute_tensors(cam):
    """`compute` returns tf.Tensors; the display converts them and draws the same grid."""
    images = _images(3)
    tensors = cam.compute(images)
    assert hasattr(tensors.heatmaps, "numpy") and not isinstance(tensors.heatmaps, np.ndarray)
    assert _decode(tensors._repr_png_()).shape[:2] == _expected_size(1, 3)
    html = tensors._repr_html_()
    for score in tensors.scores.numpy():
        assert f"<td>{score:.3f}</td>" in html


def test_repr_png_of_pixel_and_layer_results():
    """PixelExplanation: one panel per image; LayerExplanations: one row per layer."""
    model = make_cnn(activation=None)
    images = _images(10)
    pixel = tf_gradcam.GuidedBackprop(model)(images)
    assert _decode(pixel._repr_png_()).shape[:2] == _expected_size(1, display.MAX_PREVIEW)
    layers = tf_gradcam.explain_layers(model, images[:2], layers=["conv1", "last_conv"])
    assert _decode(layers._repr_png_()).shape[:2] == _expected_size(2, 2)
    html = layers._repr_html_()
    assert "conv1" in html and "last_conv" in html


def test_repr_png_heatmap_panel_is_the_jet_heatmap():
    """The PNG without images shows the heatmap itself in jet: a panel centre has its colour."""
    heat = np.full((1, 8, 8), 0.0, np.float32)
    heat[0, :, 4:] = 1.0  # left half blue end of jet, right half red end
    result = _explanation(heat, np.array([1.0], np.float32), np.array([0]))
    picture = _decode(result._repr_png_())[..., ::-1]  # BGR -> RGB
    top = HEADER + TITLE + display.PANEL_PIXELS // 2
    left, right = picture[top, PANEL // 4], picture[top, 3 * PANEL // 4]
    jet = (np.asarray(colormaps["jet"]([0.0, 1.0]))[:, :3] * 255).round()
    np.testing.assert_allclose(left, jet[0], atol=2)
    np.testing.assert_allclose(right, jet[1], atol=2)


def test_repr_falls_back_to_text_for_shapes_it_cannot_draw():
    """Maps that are not 1-, 2- or 3-D (or an empty batch) give None, the plain-text repr."""
    odd = _explanation(np.zeros((2,), np.float32), np.zeros((2,), np.float32))
    assert odd._repr_png_() is None and odd._repr_html_() is None
    empty = _explanation(np.zeros((0, 4, 4), np.float32), np.zeros((0,), np.float32))
    assert empty._repr_png_() is None
    assert "0 images" in empty._repr_html_() and "<img" not in empty._repr_html_()


# ------------------------------------------------------------ _repr_html_


def test_repr_html_embeds_a_decodable_png_the_scores_and_the_hidden_count(cam):
    batch = display.MAX_PREVIEW + 3
    result = cam(_images(batch))
    html = result._repr_html_()
    sources = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(sources) == 1
    picture = _decode(base64.b64decode(sources[0]))
    assert picture.shape[:2] == _expected_size(1, display.MAX_PREVIEW)
    assert "3 more not shown" in html
    rows = re.findall(r"<tr><td>(\d+)</td><td>(\d+)</td><td>([-\d.]+)</td></tr>", html)
    assert [int(i) for i, _, _ in rows] == list(range(display.MAX_PREVIEW))
    for i, cls, score in rows:
        assert int(cls) == result.classes[int(i)]
        assert score == f"{result.scores[int(i)]:.3f}"


def test_repr_html_lists_ranks_and_says_nothing_left_out_when_all_fit(cam):
    result = cam(_images(2), target=tf_gradcam.TopK(2))
    html = result._repr_html_()
    assert "more not shown" not in html
    rows = re.findall(r"<tr><td>(\d+)</td><td>(\d+)</td><td>(\d+)</td><td>([-\d.]+)</td>", html)
    assert len(rows) == 4
    for i, rank, cls, score in rows:
        i, r = int(i), int(rank) - 1
        assert int(cls) == result.classes[i, r]
        assert score == f"{result.scores[i, r]:.3f}"


# ------------------------------------------------------------------ show


def _blend(image: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    """The overlay recomputed here: (1 - alpha) * image + alpha * jet(heat), uint8."""
    colours = np.asarray(colormaps["jet"](np.clip(heat, 0, 1)))[..., :3]
    return np.round(((1 - alpha) * image + alpha * colours) * 255).astype(np.uint8)


def test_show_draws_overlays_one_axes_per_panel_with_titles(cam):
    images = _images(5)
    result = cam(images, target=tf_gradcam.TopK(2))
    names = ["cat", "dog", "bird"]
    figure = tf_gradcam.show(images, result, class_names=names, max_images=3, alpha=0.4)
    axes = figure.axes
    assert len(axes) == 3 * 2  # 3 shown images x 2 ranks
    width, height = figure.canvas.get_width_height()
    assert (height, width) == _expected_size(2, 3)
    first = axes[0].images[0].get_array()
    np.testing.assert_array_equal(first, tf_gradcam.overlay(images[0], result.heatmaps[0, 0]))
    assert np.abs(first.astype(int) - _blend(images[0], result.heatmaps[0, 0], 0.4)).max() <= 1
    # row 1 is the second rank; column 2 is image 2
    np.testing.assert_array_equal(
        axes[3 + 2].images[0].get_array(),
        tf_gradcam.overlay(images[2], result.heatmaps[2, 1]),
    )
    title = axes[3 + 2].get_title()
    assert names[result.classes[2, 1]] in title and f"{result.scores[2, 1]:.3f}" in title
    assert "2 more not shown" in figure.texts[0].get_text()


def test_show_accepts_tensors_and_uint8_images(cam):
    images = _images(2)
    uint8 = np.round(images * 255).astype(np.uint8)
    tensors = cam.compute(images)
    figure = tf_gradcam.show(uint8, tensors, alpha=0.5)
    assert len(figure.axes) == 2
    heat = tensors.heatmaps.numpy()[1]
    np.testing.assert_array_equal(
        figure.axes[1].images[0].get_array(), tf_gradcam.overlay(uint8[1], heat, alpha=0.5)
    )
    assert "class " in figure.axes[1].get_title()
    assert "more not shown" not in figure.texts[0].get_text()


def test_show_signals_and_volumes_use_the_pictures_helpers():
    rng = np.random.default_rng(1)
    signals = rng.normal(size=(3, 40, 2)).astype(np.float32)
    heat1 = rng.random((3, 40)).astype(np.float32)
    result = _explanation(heat1, np.array([0.5, 1.5, 2.5], np.float32), np.array([0, 1, 0]))
    figure = tf_gradcam.show(signals, result, max_images=2)
    assert len(figure.axes) == 2 and "1 more not shown" in figure.texts[0].get_text()
    np.testing.assert_array_equal(
        figure.axes[1].images[0].get_array(), signal_picture(signals[1], heat1[1])
    )
    assert _decode(result._repr_png_()).shape[:2] == _expected_size(1, 3)

    volumes = rng.random((2, 6, 8, 10)).astype(np.float32)
    heat3 = rng.random((2, 6, 8, 10)).astype(np.float32)
    result = _explanation(heat3, np.array([1.0, 2.0], np.float32), np.array([1, 0]))
    figure = tf_gradcam.show(volumes, result, alpha=0.3)
    assert len(figure.axes) == 2
    np.testing.assert_array_equal(
        figure.axes[0].images[0].get_array(), orthogonal_slices(volumes[0], heat3[0], alpha=0.3)
    )
    assert _decode(result._repr_png_()).shape[:2] == _expected_size(1, 2)


def test_show_refuses_bad_inputs_with_typed_errors(cam):
    images = _images(3)
    result = cam(images)
    with pytest.raises(tf_gradcam.InputError, match=r"3 images.*shape \(2, 16, 16, 3\)"):
        tf_gradcam.show(images[:2], result)
    with pytest.raises(tf_gradcam.InputError, match=r"size \(16, 16\)"):
        tf_gradcam.show(_images(3)[:, :8, :8], result)
    with pytest.raises(ValueError, match="max_images"):
        tf_gradcam.show(images, result, max_images=0)
    with pytest.raises(ValueError, match="max_images"):
        tf_gradcam.show(images, result, max_images=2.5)
    with pytest.raises(ValueError, match="alpha"):
        tf_gradcam.show(images, result, alpha=1.5)
    with pytest.raises(tf_gradcam.InputError, match="class_names"):
        tf_gradcam.show(images, result, class_names=[])
    with pytest.raises(TypeError, match="Explanation"):
        tf_gradcam.show(images, {"heatmaps": result.heatmaps})
    with pytest.raises(tf_gradcam.InputError, match="heatmaps of shape"):
        tf_gradcam.show(images, _explanation(np.zeros((3,)), np.zeros((3,))))
