"""Pictures of 1-D and 3-D explanations as uint8 RGB arrays.

Grad-CAM on a Conv1D network gives one heatmap value per time step, and on a
Conv3D network one per voxel (`Explanation.heatmaps` of shape `(batch,
length)` or `(batch, depth, height, width)`). These helpers turn one such
explanation into an ordinary `(height, width, 3)` uint8 RGB picture, so the
same array can be shown with `matplotlib.pyplot.imshow`, written with
`cv2.imwrite` (after `[..., ::-1]` for BGR), or logged with
`tf.summary.image(name, picture[None])`:

- `signal_picture`: the signal as lines, and under it a colour band of the
  heatmap aligned in time with it;
- `volume_montage`: a grid of slices along one axis, each overlaid with its
  heatmap slice;
- `orthogonal_slices`: the three orthogonal slices through one voxel (by
  default the heatmap's maximum), each overlaid.

Colours are those of `tf_gradcam.image.overlay` (Matplotlib's `"jet"` by
default, blended with weight `alpha`); the pictures are drawn with NumPy and
OpenCV and need no Matplotlib figure or backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from tf_gradcam.image import overlay

__all__ = ["orthogonal_slices", "signal_picture", "volume_montage"]

#: Line colours of the signal's channels (RGB): Matplotlib's first "tab10" colours.
_LINE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
_WHITE = 255
_SUBPIXEL_BITS = 4  # cv2.polylines' fixed-point precision: 1/16 pixel


# ---------------------------------------------------------------------------
# 1-D: signals
# ---------------------------------------------------------------------------


def signal_picture(
    signal: Any,
    heatmap: Any,
    *,
    height: int = 160,
    width: int | None = None,
    band_height: int | None = None,
    max_channels: int = 4,
    colormap: str = "jet",
) -> np.ndarray:
    """The signal drawn as lines above a colour band of its heatmap, aligned in time.

    The picture has two parts, top to bottom: the plot (white background,
    one anti-aliased line per channel, at most `max_channels` of them, all
    channels on one common vertical scale from the shown values' minimum to
    their maximum), and the band, the bottom `band_height` rows, coloured by
    the heatmap with `colormap` (the colours of `overlay` with `alpha=1`).
    Column `x` of the picture stands for the time interval
    `[x * length / width, (x + 1) * length / width)`: the band's colour there
    is the largest heatmap value of the samples that interval touches (so a
    one-sample peak never disappears when `width < length`), and sample `t`
    of the signal is drawn at column `(t + 0.5) * width / length - 0.5`.

    Args:
        signal: `(length, channels)` or `(length,)` array, e.g. one input of a
            Conv1D model. Non-finite values are drawn as 0.
        heatmap: `(length,)` array in [0, 1] at the signal's length (e.g.
            `Explanation.heatmaps[i]`); values outside are clipped, NaN is 0.
        height: rows of the whole picture, at least 8.
        width: columns of the picture; by default the signal's length, but at
            least 256 and at most 2048 columns.
        band_height: rows of the colour band, `1 <= band_height < height`;
            by default a quarter of `height`.
        max_channels: how many channels (the first ones) are drawn, `>= 1`.
        colormap: a Matplotlib colormap name, as in `overlay`.

    Returns:
        uint8 RGB array of shape `(height, width, 3)`.

    Raises:
        ValueError: a signal that is not `(length,)` or `(length, channels)`,
            an empty one, a heatmap whose shape is not `(length,)` (the
            message names both shapes), or sizes out of range.

    Example:
        >>> explanation = tf_gradcam.GradCAM(model, "conv1d_2")(signals)
        >>> picture = signal_picture(signals[0], explanation.heatmaps[0])
        >>> picture.shape, picture.dtype
        ((160, 256, 3), dtype('uint8'))
    """
    values = np.asarray(signal, dtype=np.float64)
    heat = np.asarray(heatmap, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(
            "`signal` must have shape (length,) or (length, channels) with length >= 1. "
            f"Received: signal.shape={np.shape(signal)}"
        )
    length = values.shape[0]
    if heat.shape != (length,):
        raise ValueError(
            f"`heatmap` must have shape ({length},), one value per sample of `signal`. "
            f"Received: signal.shape={np.shape(signal)}, heatmap.shape={np.shape(heatmap)}; "
            "upsample the map first (Explanation.heatmaps already is)."
        )
    if width is None:
        width = min(max(length, 256), 2048)
    width = _positive(width, "width")
    height = _positive(height, "height")
    if height < 8:
        raise ValueError(f"`height` must be at least 8. Received: height={height}")
    band_height = height // 4 if band_height is None else _positive(band_height, "band_height")
    if band_height >= height:
        raise ValueError(
            f"`band_height` must be below `height` ({height}). Received: band_height={band_height}"
        )
    max_channels = _positive(max_channels, "max_channels")

    picture = np.full((height, width, 3), _WHITE, np.uint8)
    band_values = _column_maxima(heat, width)
    band = overlay(
        np.zeros((band_height, width, 3), np.float32),
        np.broadcast_to(band_values, (band_height, width)),
        alpha=1.0,
        colormap=colormap,
    )
    picture[height - band_height :] = band

    plot_height = height - band_height - 2  # two white rows between the plot and the band
    if plot_height >= 2:
        shown = np.nan_to_num(values[:, :max_channels], nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(shown.min()), float(shown.max())
        margin = max(1.0, 0.05 * plot_height)
        top, bottom = margin, plot_height - 1 - margin
        if high > low:
            rows = bottom - (shown - low) / (high - low) * (bottom - top)
        else:
            rows = np.full_like(shown, (top + bottom) / 2)
        cols = (np.arange(length) + 0.5) * width / length - 0.5
        plot = np.ascontiguousarray(picture[:plot_height])
        scale = 1 << _SUBPIXEL_BITS
        for channel in range(shown.shape[1]):
            points = np.stack([cols, rows[:, channel]], axis=1)
            points = np.round(points * scale).astype(np.int32)
            colour = _LINE_COLOURS[channel % len(_LINE_COLOURS)]
            if length == 1:
                cv2.circle(plot, tuple(points[0]), 2 * scale, colour, -1, cv2.LINE_AA, 4)
            else:
                cv2.polylines(plot, [points], False, colour, 1, cv2.LINE_AA, _SUBPIXEL_BITS)
        picture[:plot_height] = plot
    return picture


def _column_maxima(heat: np.ndarray, width: int) -> np.ndarray:
    """Per column, the largest heat value of the samples its time interval touches."""
    length = heat.size
    heat = np.clip(np.nan_to_num(heat, nan=0.0), 0.0, 1.0)
    x = np.arange(width)
    starts = (x * length) // width
    ends = np.maximum(starts + 1, -((-(x + 1) * length) // width))  # ceil, exclusive
    span = int((ends - starts).max())
    index = np.minimum(starts[:, None] + np.arange(span)[None, :], (ends - 1)[:, None])
    return heat[index].max(axis=1)


# ---------------------------------------------------------------------------
# 3-D: volumes
# ---------------------------------------------------------------------------


def volume_montage(
    volume: Any,
    heatmap: Any,
    *,
    axis: int = 0,
    slices: Sequence[int] | None = None,
    columns: int | None = None,
    max_slices: int = 16,
    zoom: int = 1,
    gap: int = 2,
    alpha: float = 0.4,
    colormap: str = "jet",
) -> np.ndarray:
    """A grid of the volume's slices along one axis, each overlaid with its heatmap slice.

    The volume is first scaled to [0, 1] as a whole (`(v - min) / (max -
    min)` over all voxels and channels; a constant volume becomes 0), so that
    slices keep their relative brightness. It is shown in grayscale (one
    channel, or the first of two) or as RGB (its first three channels). Each
    cell is `overlay(volume_slice, heatmap_slice, alpha=alpha)` enlarged
    `zoom` times by pixel repetition, where a slice is `np.take(..., i,
    axis=axis)` (rows and columns are the two remaining axes in order).
    Cells are laid out row by row, `columns` per row, with `gap` white pixels
    between them: cell `j` starts at row `(j // columns) * (cell_h + gap)`
    and column `(j % columns) * (cell_w + gap)`. Unused cells are white.

    Args:
        volume: `(depth, height, width)` or `(depth, height, width, channels)`
            array, e.g. one input of a Conv3D model.
        heatmap: `(depth, height, width)` array in [0, 1] at the volume's size
            (e.g. `Explanation.heatmaps[i]`).
        axis: the axis sliced, 0 (depth), 1 (height) or 2 (width); negative
            values count from the end of the three.
        slices: the slice indices to show, in order (negative ones count from
            the end). By default all slices when there are at most
            `max_slices`, else `max_slices` evenly spaced ones,
            `np.linspace(0, n - 1, max_slices).round()`, first and last
            included.
        columns: cells per row; by default `ceil(sqrt(number of slices))`.
        max_slices: the most slices shown by default, `>= 1`.
        zoom: integer enlargement of each cell, `>= 1`.
        gap: white pixels between cells, `>= 0`.
        alpha: weight of the heatmap colour, as in `overlay`.
        colormap: a Matplotlib colormap name, as in `overlay`.

    Returns:
        uint8 RGB array of shape `(rows * (cell_h + gap) - gap, columns *
        (cell_w + gap) - gap, 3)`.

    Raises:
        ValueError: a volume that is not 3-D or 4-D, a heatmap whose shape is
            not the volume's `(depth, height, width)` (the message names both
            shapes), an axis or slice index out of range, or sizes out of
            range.

    Example:
        >>> explanation = tf_gradcam.GradCAM(model, "conv3d_1")(volumes)
        >>> picture = volume_montage(volumes[0], explanation.heatmaps[0], zoom=4)
        >>> picture.dtype, picture.ndim
        (dtype('uint8'), 3)
    """
    base, heat = _volume_pair(volume, heatmap)
    if not isinstance(axis, (int, np.integer)) or not -3 <= axis <= 2:
        raise ValueError(f"`axis` must be 0, 1 or 2 (or -3..-1). Received: axis={axis!r}")
    axis = int(axis) % 3
    count = heat.shape[axis]
    max_slices = _positive(max_slices, "max_slices")
    zoom = _positive(zoom, "zoom")
    gap = _non_negative(gap, "gap")
    if slices is None:
        if count <= max_slices:
            chosen = list(range(count))
        else:
            chosen = [int(i) for i in np.linspace(0, count - 1, max_slices).round()]
    else:
        chosen = []
        for index in np.atleast_1d(np.asarray(slices)).tolist():
            if not isinstance(index, int) or not -count <= index < count:
                raise ValueError(
                    f"`slices` must hold ints in [-{count}, {count}), the volume having {count} "
                    f"slices along axis {axis}. Received: slices={slices!r}"
                )
            chosen.append(index % count)
        if not chosen:
            raise ValueError(f"`slices` must name at least one slice. Received: slices={slices!r}")
    columns = math.ceil(math.sqrt(len(chosen))) if columns is None else columns
    columns = _positive(columns, "columns")
    columns = min(columns, len(chosen))
    rows = math.ceil(len(chosen) / columns)

    cells = [
        _zoomed(
            overlay(
                np.take(base, i, axis=axis),
                np.take(heat, i, axis=axis),
                alpha=alpha,
                colormap=colormap,
            ),
            zoom,
        )
        for i in chosen
    ]
    cell_h, cell_w = cells[0].shape[:2]
    picture = np.full(
        (rows * (cell_h + gap) - gap, columns * (cell_w + gap) - gap, 3), _WHITE, np.uint8
    )
    for j, cell in enumerate(cells):
        top, left = (j // columns) * (cell_h + gap), (j % columns) * (cell_w + gap)
        picture[top : top + cell_h, left : left + cell_w] = cell
    return picture


def orthogonal_slices(
    volume: Any,
    heatmap: Any,
    *,
    center: Sequence[int] | None = None,
    zoom: int = 1,
    gap: int = 2,
    alpha: float = 0.4,
    colormap: str = "jet",
) -> np.ndarray:
    """The three orthogonal slices through one voxel, side by side, each overlaid.

    With `center = (z, y, x)` (depth, height, width indices), the panels are,
    left to right: `volume[z]` (height × width), `volume[:, y]` (depth ×
    width) and `volume[:, :, x]` (depth × height), each blended with the same
    slice of the heatmap by `overlay` and enlarged `zoom` times by pixel
    repetition. The volume is scaled to [0, 1] as a whole, as in
    `volume_montage`. Panels are top-aligned with `gap` white columns between
    them; rows below a shorter panel are white. Panel `p` starts at column
    `sum(widths of panels before p) + p * gap`.

    Args:
        volume: `(depth, height, width)` or `(depth, height, width, channels)`
            array (grayscale, or RGB from the first three channels).
        heatmap: `(depth, height, width)` array in [0, 1] at the volume's size.
        center: `(z, y, x)` voxel the slices go through. By default the
            heatmap's maximum (the first in C order if several share it); the
            middle voxel `(depth // 2, height // 2, width // 2)` when the
            heatmap is constant.
        zoom: integer enlargement of each panel, `>= 1`.
        gap: white pixels between panels, `>= 0`.
        alpha: weight of the heatmap colour, as in `overlay`.
        colormap: a Matplotlib colormap name, as in `overlay`.

    Returns:
        uint8 RGB array of shape `(zoom * max(height, depth), zoom * (width +
        width + height) + 2 * gap, 3)`.

    Raises:
        ValueError: mismatched or wrong shapes (the message names both), a
            `center` that is not three indices inside the volume, or sizes out
            of range.

    Example:
        >>> picture = orthogonal_slices(volumes[0], explanation.heatmaps[0], zoom=4)
        >>> picture.shape  # a 16x16x16 volume
        (64, 196, 3)
    """
    base, heat = _volume_pair(volume, heatmap)
    zoom = _positive(zoom, "zoom")
    gap = _non_negative(gap, "gap")
    if center is None:
        finite = np.nan_to_num(heat, nan=-np.inf)
        if np.nanmax(finite) > np.nanmin(finite):
            z, y, x = np.unravel_index(np.argmax(finite), heat.shape)
        else:
            z, y, x = (size // 2 for size in heat.shape)
    else:
        point = np.asarray(center)
        if (
            point.shape != (3,)
            or not np.issubdtype(point.dtype, np.integer)
            or not all(0 <= int(c) < size for c, size in zip(point, heat.shape, strict=True))
        ):
            raise ValueError(
                "`center` must be three int indices (z, y, x) inside the volume of shape "
                f"{heat.shape}. Received: center={center!r}"
            )
        z, y, x = (int(c) for c in point)
    panels = [
        _zoomed(overlay(b, h, alpha=alpha, colormap=colormap), zoom)
        for b, h in (
            (base[z], heat[z]),
            (base[:, y], heat[:, y]),
            (base[:, :, x], heat[:, :, x]),
        )
    ]
    total_h = max(p.shape[0] for p in panels)
    total_w = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    picture = np.full((total_h, total_w, 3), _WHITE, np.uint8)
    left = 0
    for panel in panels:
        picture[: panel.shape[0], left : left + panel.shape[1]] = panel
        left += panel.shape[1] + gap
    return picture


def _volume_pair(volume: Any, heatmap: Any) -> tuple[np.ndarray, np.ndarray]:
    """`((d, h, w[, 1 or 3]) volume scaled to [0, 1], (d, h, w) heatmap)`."""
    values = np.asarray(volume, dtype=np.float64)
    heat = np.asarray(heatmap, dtype=np.float32)
    if values.ndim not in (3, 4) or values.size == 0:
        raise ValueError(
            "`volume` must have shape (depth, height, width) or (depth, height, width, "
            f"channels), not empty. Received: volume.shape={np.shape(volume)}"
        )
    if heat.shape != values.shape[:3]:
        raise ValueError(
            f"`heatmap` must have the volume's shape (depth, height, width) = "
            f"{values.shape[:3]}. Received: volume.shape={np.shape(volume)}, "
            f"heatmap.shape={np.shape(heatmap)}; upsample the map first "
            "(Explanation.heatmaps already is)."
        )
    if values.ndim == 4:
        values = values[..., :3] if values.shape[-1] >= 3 else values[..., :1]
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = values.min(), values.max()
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return scaled.astype(np.float32), heat


def _zoomed(picture: np.ndarray, zoom: int) -> np.ndarray:
    if zoom == 1:
        return picture
    return np.repeat(np.repeat(picture, zoom, axis=0), zoom, axis=1)


def _positive(value: Any, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")
    return int(value)


def _non_negative(value: Any, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0. Received: {name}={value!r}")
    return int(value)
