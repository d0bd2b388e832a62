"""Rich display of results in Jupyter, and `show`, their overlays on the images.

`Explanation`, `PixelExplanation` and `LayerExplanations` display themselves
in a notebook (`_repr_png_` and `_repr_html_` delegate here). A result holds
no images, so its picture is one panel per image (and per top-k rank when
there is a `k` axis; per layer for `LayerExplanations`), each the heatmap in
the jet colormap (for `PixelExplanation`, the gradients through
`normalize_gradients`), titled with the image index, the class index and the
score. `show(images, result)` draws the same grid with each heatmap overlaid
on its image (`tf_gradcam.image.overlay`); Conv1D signals are drawn with
`tf_gradcam.pictures.signal_picture`, Conv3D volumes with
`tf_gradcam.pictures.orthogonal_slices`.

Layout, in pixels at `DPI` dots per inch: a `HEADER_PIXELS` high line of text
(what is shown, and how many images were left out), then one row of panels
per top-k rank (and layer), one column per shown image. A panel is
`PANEL_PIXELS` wide and `TITLE_PIXELS + PANEL_PIXELS` high: two lines of
title above a square picture area. So a PNG is `columns * PANEL_PIXELS`
wide and `HEADER_PIXELS + rows * (TITLE_PIXELS + PANEL_PIXELS)` high. At
most `max_images` images are shown (`MAX_PREVIEW` for the notebook display).

Figures are drawn with Matplotlib's object API on an Agg canvas (no
`pyplot`): the global backend and the list of open figures are left alone.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tf_gradcam.errors import GradCAMError, InputError
from tf_gradcam.image import normalize_gradients, overlay
from tf_gradcam.pictures import orthogonal_slices, signal_picture

__all__ = [
    "DPI",
    "HEADER_PIXELS",
    "MAX_PREVIEW",
    "PANEL_PIXELS",
    "TITLE_PIXELS",
    "render_html",
    "render_png",
    "show",
]

#: Width of one panel, and the side of its square picture area, in pixels.
PANEL_PIXELS = 176
#: Height of the two title lines above each picture, in pixels.
TITLE_PIXELS = 32
#: Height of the figure's summary line at the top, in pixels.
HEADER_PIXELS = 24
#: Resolution of the figures: 100 pixels per inch.
DPI = 100
#: Images shown by the notebook display of a result; `show` takes `max_images`.
MAX_PREVIEW = 8

_MARGIN = 4  # pixels between a picture and its panel's edges
_BAND_ROWS = 8  # rows of the colour band of a signal heatmap shown without its signal


@dataclass(frozen=True)
class _Group:
    """One result's arrays, with the k axis always present."""

    label: str | None  # the layer path for LayerExplanations
    kind: str  # "cam" (heatmaps) or "pixel" (gradients)
    values: np.ndarray  # (batch, k, *spatial) heatmaps, or (batch, k, h, w, c) gradients
    scores: np.ndarray  # (batch, k)
    classes: np.ndarray | None  # (batch, k) ints, or None
    has_k: bool


@dataclass(frozen=True)
class _Panel:
    picture: np.ndarray  # uint8 or float RGB
    title: str
    aspect: str
    image: int
    rank: int | None
    layer: str | None
    cls: int | None
    score: float


@dataclass(frozen=True)
class _Grid:
    rows: list[list[_Panel]]
    header: str
    batch: int
    shown: int


def _numpy(value: Any) -> Any:
    """A tf.Tensor (or anything with `.numpy()`) as a NumPy array; None stays None."""
    if value is None:
        return None
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()
    return np.asarray(value)


def _groups(result: Any) -> list[_Group]:
    """The result's arrays as `_Group`s: one for an explanation, one per layer.

    The result types are recognised by their fields (`heatmaps`; `gradients`
    and `backprop`; a mapping of explanations), so this module imports none
    of the modules that define them (they import it for their display).
    """
    if hasattr(result, "heatmaps") and hasattr(result, "scores"):  # Explanation
        parts = [(None, "cam", result.heatmaps, result.scores, result.classes)]
    elif hasattr(result, "gradients") and hasattr(result, "backprop"):  # PixelExplanation
        parts = [(None, "pixel", result.gradients, result.scores, result.classes)]
    elif isinstance(result, Mapping) and all(hasattr(e, "heatmaps") for e in result.values()):
        if not result:  # LayerExplanations
            raise InputError("The LayerExplanations hold no layers; there is nothing to show.")
        parts = [(str(path), "cam", e.heatmaps, e.scores, e.classes) for path, e in result.items()]
    else:
        raise TypeError(
            "`result` must be an Explanation, a PixelExplanation or LayerExplanations. "
            f"Received: result of type {type(result).__name__}."
        )
    groups = []
    for label, kind, values, scores, classes in parts:
        values, scores, classes = _numpy(values), _numpy(scores), _numpy(classes)
        received = (values.shape, scores.shape)
        if scores.ndim not in (1, 2):
            raise InputError(
                "The result's scores must have shape (batch,) or (batch, k). "
                f"Received: scores with shape {scores.shape}."
            )
        has_k = scores.ndim == 2
        if not has_k:
            values, scores = values[:, None], scores[:, None]
            classes = None if classes is None else classes[:, None]
        spatial = values.ndim - 2
        if values.shape[:2] != scores.shape or (
            spatial not in (1, 2, 3) if kind == "cam" else spatial != 3
        ):
            name = "heatmaps" if kind == "cam" else "gradients"
            expected = (
                "(batch, [k,] length), (batch, [k,] height, width) or (batch, [k,] depth, "
                "height, width)"
                if kind == "cam"
                else "(batch, [k,] height, width, channels)"
            )
            raise InputError(
                f"Cannot display {name} of shape {received[0]} with scores of shape "
                f"{received[1]}: expected {expected}."
            )
        groups.append(_Group(label, kind, values, scores, classes, has_k))
    batches = {g.scores.shape[0] for g in groups}
    if len(batches) > 1:
        raise InputError(
            f"The layers' explanations have different batch sizes {sorted(batches)}; "
            "they must explain the same images."
        )
    return groups


def _check_images(images: np.ndarray, group: _Group) -> None:
    """The images must have the result's batch size and the maps' spatial size."""
    batch = group.scores.shape[0]
    if images.ndim == 0 or images.shape[0] != batch:
        raise InputError(
            f"`images` must hold the {batch} images the result explains (batch axis first). "
            f"Received: images with shape {images.shape}, result with batch size {batch}."
        )
    spatial = group.values.shape[2:] if group.kind == "cam" else group.values.shape[2:4]
    if images.shape[1 : 1 + len(spatial)] != spatial or images.ndim > len(spatial) + 2:
        kind = {1: "signals", 2: "images", 3: "volumes"}.get(len(spatial), "images")
        raise InputError(
            f"`images` must be {kind} of size {tuple(spatial)}, the size of the maps "
            f"(batch, *size[, channels]). Received: images with shape {images.shape}; "
            "pass the images as the model took them (Explanation.heatmaps are at that size)."
        )


def _picture(group: _Group, i: int, r: int, images: np.ndarray | None, alpha: float):
    """One panel's picture and its imshow aspect."""
    values = group.values[i, r]
    if group.kind == "pixel":
        return normalize_gradients(values), "equal"
    if values.ndim == 2:
        if images is None:
            return overlay(np.zeros((*values.shape, 3), np.float32), values, alpha=1.0), "equal"
        return overlay(images[i], values, alpha=alpha), "equal"
    if values.ndim == 1:
        if images is None:
            band = np.broadcast_to(values, (_BAND_ROWS, values.shape[0]))
            return overlay(np.zeros((*band.shape, 3), np.float32), band, alpha=1.0), "auto"
        return signal_picture(images[i], values), "auto"
    if images is None:
        return orthogonal_slices(np.zeros(values.shape, np.float32), values, alpha=1.0), "equal"
    return orthogonal_slices(images[i], values, alpha=alpha), "equal"


def _class_label(cls: int | None, class_names: Sequence[str] | None) -> str:
    if cls is None:
        return "score"
    if class_names is None:
        return f"class {cls}"
    try:
        return str(class_names[cls])
    except (IndexError, KeyError, TypeError):
        raise InputError(
            f"`class_names` has no name for class {cls} (it holds {len(class_names)} names); "
            "pass one name per output class, in class-index order."
        ) from None


def _grid(
    result: Any,
    images: Any,
    class_names: Sequence[str] | None,
    max_images: int,
    alpha: float,
) -> _Grid:
    """Check the inputs and build every shown panel, row by row."""
    if not isinstance(max_images, (int, np.integer)) or isinstance(max_images, bool):
        raise ValueError(f"`max_images` must be an int >= 1. Received: max_images={max_images!r}.")
    if max_images < 1:
        raise ValueError(f"`max_images` must be at least 1. Received: max_images={max_images}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1]. Received: alpha={alpha}.")
    groups = _groups(result)
    if images is not None:
        images = _numpy(images)
        for group in groups:
            _check_images(images, group)
    batch = groups[0].scores.shape[0]
    shown = min(batch, int(max_images))
    rows = []
    for group in groups:
        for r in range(group.scores.shape[1]):
            row = []
            for i in range(shown):
                cls = None
                if group.classes is not None and int(group.classes[i, r]) >= 0:
                    cls = int(group.classes[i, r])
                score = float(group.scores[i, r])
                picture, aspect = _picture(group, i, r, images, alpha)
                first = f"#{i}"
                if group.has_k:
                    first += f" top-{r + 1}"
                if group.label is not None:
                    first += f" {group.label}"
                title = f"{first}\n{_class_label(cls, class_names)}: {score:.3f}"
                rank = r + 1 if group.has_k else None
                row.append(_Panel(picture, title, aspect, i, rank, group.label, cls, score))
            rows.append(row)
    return _Grid(rows, _header(result, groups, batch, shown), batch, shown)


def _header(result: Any, groups: list[_Group], batch: int, shown: int) -> str:
    """One line: the result's type, batch, k, layers, and how many images were left out."""
    text = f"{type(result).__name__}: {batch} image{'s' if batch != 1 else ''}"
    if groups and groups[0].has_k:
        text += f", top-{groups[0].scores.shape[1]} classes"
    if len(groups) > 1 or groups[0].label is not None:
        text += f", {len(groups)} layer{'s' if len(groups) != 1 else ''}"
    layer = getattr(result, "layer", None)
    if isinstance(layer, str):
        text += f", layer {layer}"
    if batch > shown:
        text += f"; {batch - shown} more not shown"
    return text


def _figure(grid: _Grid) -> Any:
    """The Matplotlib figure of a grid, laid out to exact pixel sizes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = max((len(row) for row in grid.rows), default=0)
    cell = TITLE_PIXELS + PANEL_PIXELS
    width = max(columns, 1) * PANEL_PIXELS
    height = HEADER_PIXELS + len(grid.rows) * cell
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    figure.text(
        0.5, 1.0 - HEADER_PIXELS / 2 / height, grid.header, ha="center", va="center", fontsize=9
    )
    side = PANEL_PIXELS - 2 * _MARGIN
    for row_index, row in enumerate(grid.rows):
        bottom = height - HEADER_PIXELS - (row_index + 1) * cell + _MARGIN
        for column, panel in enumerate(row):
            left = column * PANEL_PIXELS + _MARGIN
            ax = figure.add_axes((left / width, bottom / height, side / width, side / height))
            ax.imshow(panel.picture, interpolation="nearest", aspect=panel.aspect)
            ax.set_axis_off()
            ax.set_title(panel.title, fontsize=7, pad=2)
    return figure


def show(
    images: Any,
    result: Any,
    class_names: Sequence[str] | None = None,
    max_images: int = 8,
    alpha: float = 0.4,
) -> Any:
    """Draw each image overlaid with its heatmap, titled with its class and score.

    One column per image (the first `max_images`), one row per top-k rank
    when the result has a `k` axis (and per layer for `LayerExplanations`).
    Images are overlaid with `tf_gradcam.image.overlay(image, heatmap,
    alpha=alpha)`; Conv1D signals `(batch, length[, channels])` are drawn
    with `tf_gradcam.pictures.signal_picture` (the signal above a colour
    band of its heatmap), Conv3D volumes `(batch, depth, height, width[,
    channels])` with `tf_gradcam.pictures.orthogonal_slices` (the three
    slices through the heatmap's maximum). A `PixelExplanation` is drawn as
    its gradients through `normalize_gradients` (the images are checked, not
    drawn). Titles: `#image [top-rank] [layer]`, then the class name (from
    `class_names`, else `class <index>`) and the score to 3 decimals. The
    figure's top line says how many images were left out. Sizes are those of
    the module docstring (`PANEL_PIXELS` and so on, at `DPI`).

    Args:
        images: the images the result explains, as the model took them:
            `(batch, height, width[, channels])` in [0, 1] or uint8 (signals
            and volumes as above). NumPy arrays or tf.Tensors.
        result: an `Explanation`, `PixelExplanation` or `LayerExplanations`,
            with NumPy arrays (`__call__`) or tf.Tensors (`compute`).
        class_names: the name of each class index, e.g.
            `tf_gradcam.demo_model.DEMO_CLASS_NAMES`; `None` for indices.
        max_images: the most images shown, `>= 1`; the first ones are.
        alpha: weight of the heatmap colour in the overlays, in [0, 1].

    Returns:
        The `matplotlib.figure.Figure` (one axes per panel, in row order);
        save it with `figure.savefig(path)`, or let a notebook display it.

    Raises:
        InputError: images whose batch size or spatial size differ from the
            result's, a `class_names` without a name for an explained class,
            or result arrays of shapes that cannot be drawn.
        ValueError: `max_images` below 1 or not an int, `alpha` outside [0, 1].
        TypeError: `result` is not one of the three result types.

    Example:
        >>> result = tf_gradcam.GradCAM(model)(scenes.images)
        >>> figure = tf_gradcam.show(scenes.images, result, class_names=scenes.class_names)
        >>> figure.savefig("show.png")
    """
    if images is None:
        raise InputError("`images` is None; pass the images the result explains.")
    grid = _grid(result, images, class_names, max_images, alpha)
    if grid.shown == 0:
        raise InputError("The result explains no images (batch size 0); there is nothing to show.")
    return _figure(grid)


def render_png(result: Any, *, max_images: int = MAX_PREVIEW) -> bytes | None:
    """The PNG bytes of a result's notebook picture (heatmaps alone, jet).

    Returns `None`, so that the notebook falls back to the plain text, for an
    empty batch or arrays this module cannot draw.
    """
    grid = _safe_grid(result, max_images)
    if grid is None or not grid.rows or grid.shown == 0:
        return None
    return _png(_figure(grid))


def render_html(result: Any, *, max_images: int = MAX_PREVIEW) -> str | None:
    """The HTML of a result's notebook display: summary line, picture, score table."""
    grid = _safe_grid(result, max_images)
    if grid is None:
        return None
    parts = [f"<div><p><b>{html.escape(grid.header)}</b></p>"]
    if grid.rows and grid.shown:
        data = base64.b64encode(_png(_figure(grid))).decode("ascii")
        parts.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(grid.header)}"/>')
        has_rank = any(p.rank is not None for row in grid.rows for p in row)
        has_layer = any(p.layer is not None for row in grid.rows for p in row)
        head = ["image"] + (["rank"] if has_rank else []) + (["layer"] if has_layer else [])
        head += ["class", "score"]
        parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
        panels = [p for row in grid.rows for p in row]
        if not has_layer:  # image by image, its ranks in order
            panels.sort(key=lambda p: (p.image, p.rank or 0))
        for p in panels:
            cells = [str(p.image)]
            cells += [str(p.rank)] if has_rank else []
            cells += [html.escape(str(p.layer))] if has_layer else []
            cells += ["" if p.cls is None else str(p.cls), f"{p.score:.3f}"]
            parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    parts.append("</div>")
    return "".join(parts)


def _safe_grid(result: Any, max_images: int) -> _Grid | None:
    """The heatmap-only grid, or None where the result's arrays cannot be drawn."""
    try:
        return _grid(result, None, None, max_images, 1.0)
    except GradCAMError:
        return None


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
