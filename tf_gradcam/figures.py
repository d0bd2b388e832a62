"""Paper-style figures: the row layout of Selvaraju et al., Fig. 1.

Drawn with Matplotlib's object API on an Agg canvas (no `pyplot`, so the
global backend and open figures are left alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from tf_gradcam.gradcam import GradCAM
from tf_gradcam.guided import GuidedGradCAM
from tf_gradcam.image import normalize_gradients, overlay

__all__ = ["FIG1_COLUMNS", "plot_fig1"]

#: Column titles of one Fig. 1 row, left to right.
FIG1_COLUMNS = (
    "Image",
    "Guided Backprop",
    "Grad-CAM",
    "Guided Grad-CAM",
    "Counterfactual Grad-CAM",
)


def _displayable(image: np.ndarray) -> np.ndarray:
    """The image as float RGB in [0, 1] (uint8 scaled, other ranges min-max scaled)."""
    picture = image.astype(np.float32)
    if image.dtype == np.uint8:
        picture = picture / 255.0
    elif picture.min() < 0.0 or picture.max() > 1.0:
        span = picture.max() - picture.min()
        picture = (picture - picture.min()) / (span if span > 0 else 1.0)
    if picture.shape[-1] == 1:
        picture = np.repeat(picture, 3, axis=-1)
    return picture[..., :3]


def plot_fig1(
    model: keras.Model,
    image: Any,
    target: int | Sequence[int],
    layer: str | keras.layers.Layer | None = None,
    *,
    class_names: Sequence[str] | None = None,
    path: str | None = None,
    alpha: float = 0.4,
    dpi: int = 150,
) -> Any:
    """Lay out the paper's Fig. 1 for one image and several classes, one row per class.

    Columns: the image | Guided Backprop (b) | Grad-CAM (c) | Guided Grad-CAM
    (d) | counterfactual Grad-CAM (§3.3, Fig. 7): `FIG1_COLUMNS`. Gradient
    images are shown with `normalize_gradients`, maps with `overlay` (jet).

    Args:
        model: a Functional or Sequential `keras.Model`.
        image: one `(height, width, channels)` image, as the model takes it.
        target: a class index or a sequence of them, one row each.
        layer: the convolutional layer Grad-CAM explains (`None`: the last one).
        class_names: names to label the rows, indexed by class; default the index.
        path: where to save the figure as PNG (the folder must exist), or `None`.
        alpha: heatmap weight in the overlays.
        dpi: resolution of the saved PNG.

    Returns:
        The `matplotlib.figure.Figure`.

    Raises:
        ValueError: `image` is not one `(height, width, channels)` image, or
            `target` is empty.
        The errors of `GuidedGradCAM` and `GradCAM`.

    Example:
        >>> plot_fig1(model, images[0], [0, 1], class_names=["cat", "dog"],
        ...           path="fig1.png")
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(
            "`image` must be one (height, width, channels) image. Received: image with "
            f"shape {image.shape}."
        )
    classes = [int(target)] if np.ndim(target) == 0 else [int(c) for c in target]
    if not classes:
        raise ValueError(f"`target` must name at least one class. Received: target={target!r}.")
    batch = np.repeat(image[None], len(classes), axis=0)
    fused = GuidedGradCAM(model, layer)(batch, target=classes)
    counter = GradCAM(model, layer, counterfactual=True)(batch, target=classes)

    picture = _displayable(image)
    pictures = np.repeat(picture[None], len(classes), axis=0)
    panels = [
        pictures,
        normalize_gradients(fused.backprop),
        overlay(pictures, fused.cam.heatmaps, alpha=alpha),
        normalize_gradients(fused.gradients),
        overlay(pictures, counter.heatmaps, alpha=alpha),
    ]

    rows, columns = len(classes), len(FIG1_COLUMNS)
    figure = Figure(figsize=(2.0 * columns, 2.0 * rows + 0.3))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    for row, cls in enumerate(classes):
        name = class_names[cls] if class_names is not None else f"class {cls}"
        for column, panel in enumerate(panels):
            ax = axes[row, column]
            ax.imshow(panel[row], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(FIG1_COLUMNS[column], fontsize=9)
        axes[row, 0].set_ylabel(f"{name}\ny = {fused.scores[row]:.2f}", fontsize=9)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=dpi)
    return figure
