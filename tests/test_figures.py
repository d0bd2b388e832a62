"""Tests for tf_gradcam.figures: the Fig. 1 row layout."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

from tf_gradcam.figures import FIG1_COLUMNS, plot_fig1


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(2)(h))


@pytest.mark.filterwarnings("ignore:.*all zero:RuntimeWarning")
def test_plot_fig1_lays_out_one_row_per_class_and_saves_png(tmp_path):
    """Rows are classes, columns the five Fig. 1 panels; the PNG is written."""
    image = np.random.default_rng(0).uniform(size=(16, 16, 3)).astype(np.float32)
    path = tmp_path / "fig1.png"
    figure = plot_fig1(_model(), image, [0, 1], class_names=["cat", "dog"], path=str(path))
    axes = figure.get_axes()
    assert len(axes) == 2 * len(FIG1_COLUMNS)
    assert [ax.get_title() for ax in axes[: len(FIG1_COLUMNS)]] == list(FIG1_COLUMNS)
    assert axes[0].get_ylabel().startswith("cat") and axes[5].get_ylabel().startswith("dog")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="Received: image with shape \\(1, 16, 16, 3\\)"):
        plot_fig1(_model(), image[None], 0)
