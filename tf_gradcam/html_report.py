"""An HTML audit report of a data set's Grad-CAM maps: one self-contained page.

The paper finds a biased model by looking at its Grad-CAM maps (§6.3: the
"nurse" classifier looked at faces and hair, not at the tools). Over a whole
data set that means scrolling through thousands of maps; `report` turns
the `.npz` shards of `explain_dataset` (or one `Explanation`) and the images
they explain into one HTML page to do it in a browser: a grid of overlays,
each card with its position, class, score, correctness and, given masks or
boxes of named regions, the fraction of the Grad-CAM mass inside each region
(`GradCAMCallback`'s `<region>_mass`, per image). The page sorts (position,
score, class, mass on a region; wrong predictions first) and filters (class,
right or wrong, score range, least mass on a region) in the browser, and
shows one page of cards at a time.

One file and nothing else: the cards' numbers are one JSON block and each
card's picture is a base64 PNG (or JPEG) string in a second one. The page
creates `<img>` elements only for the cards of the page shown, so 10,000
images are 10,000 strings in memory but one page of pictures in the
document. No request leaves the page: its Content Security Policy allows its
own inline script and style and `data:` images, nothing else.

The pictures are encoded here, in memory, as `callback.py` encodes
TensorBoard's PNGs and `display.py` the notebook's: this module writes one
HTML file and never an image file; reading image files stays in `cli.py`,
which hands the decoded arrays in.

The report is written under a temporary name in its folder, flushed and
synced, then renamed into place: a failure (bad input found half way, a full
disk, an interrupt) leaves neither a partial report nor a changed old one.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import html
import json
import os
import time
import uuid
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from tf_gradcam.dataset import shard_paths
from tf_gradcam.errors import InputError, TargetError
from tf_gradcam.image import overlay
from tf_gradcam.targets import classes_from_labels

__all__ = ["IMAGE_FORMATS", "ReportSummary", "report"]

#: Picture formats of the cards: lossless PNG, or JPEG (smaller for photographs).
IMAGE_FORMATS = ("png", "jpeg")
_MIME = {"png": "image/png", "jpeg": "image/jpeg"}
_PAGE_SIZES = (30, 60, 120, 240)  # offered by the page, with `page_size` if it is another
_PIXELATED_BELOW = 96  # pictures smaller than this are enlarged on screen without smoothing
_SHARD_CACHE = 8  # shards' maps kept loaded while cards are drawn in position order


@dataclass(frozen=True)
class ReportSummary:
    """What `report` returns.

    Attributes:
        path: the HTML file written.
        cards: number of images in the report.
        bytes: size of the file.
        seconds: wall time of the whole call.
    """

    path: str
    cards: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class _Shard:
    """One shard's small arrays (read up front) and where its maps are."""

    name: str
    index: np.ndarray  # (n,) int64 positions in the data set
    scores: np.ndarray  # (n,) float64, the explained (top-ranked) score
    classes: np.ndarray | None  # (n,) int64, or None for a callable target
    labels: np.ndarray | None  # the shard's `labels`, as stored
    map_shape: tuple[int, ...]  # one image's heatmaps: (h, w) or (k, h, w)
    maps: Path | np.ndarray  # the file to load `heatmaps` from, or the array itself


def report(
    results: Any,
    images: Any = None,
    *,
    out: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    labels: Any = None,
    regions: Mapping[str, Any] | None = None,
    title: str = "Grad-CAM audit report",
    thumbnail: int = 128,
    image_format: str = "png",
    quality: int = 90,
    page_size: int = 60,
    alpha: float = 0.4,
    overwrite: bool = False,
) -> ReportSummary:
    """Write one self-contained HTML page of every image's Grad-CAM overlay, to audit a data set.

    Each card shows the image with its heatmap overlaid (`tf_gradcam.overlay`),
    its position in the data set, the explained class and score, whether the
    class equals the label (when labels are known) and the fraction of the
    heatmap's mass inside each region, `Σ heatmap·mask / Σ heatmap`
    (`GradCAMCallback`'s region mass, the bias signal of §6.3, per image;
    "—" for an all-zero map). In the browser the cards sort by position,
    score, class or mass on a region, optionally wrong predictions first, and
    filter by class, right or wrong, score range and least mass on a region;
    they are shown a page at a time and only that page's pictures are made.
    The view is kept in the address's `#...` part, so a link reopens it.

    With `TopK(k)` shards the top-ranked class is shown. "Correct" compares
    the explained class with the label: it says whether the prediction is
    right for shards of the predicted class (`target=None`, the default), not
    for `target="labels"`.

    Args:
        results: the folder of `explain_dataset`'s shards (written with the
            fields `heatmaps` and `scores`, the default; `classes` and the
            shards' `labels` are used when present), or an `Explanation`
            (NumPy arrays), whose images are at positions `0..batch-1`.
        images: the images the maps explain, indexed by their position in the
            data set (the shards' `index`): an array `(count, height, width[,
            channels])` (a memory-mapped `.npy` works), a sequence of images,
            or an iterable read once, in order, such as the `tf.data.Dataset`
            given to `explain_dataset` (elements `images`, `(images, labels)`
            or `(images, labels, extras)`, single images or batches). Floats
            in [0, 1] (floats above 1 are read as [0, 255]) or uint8, 1, 3 or 4
            channels (alpha dropped). An image of another size than the maps
            gets its map resized onto it. `None` draws the heatmaps alone.
        out: the HTML file to write; its folder must exist.
        class_names: the name of each class index; `None` shows `class <i>`.
        labels: each image's label (class index or one-hot row), indexed by
            position; replaces the shards' labels. `None` uses the shards'
            labels when they hold class labels (with a warning when not).
        regions: `{name: masks or boxes}` whose mass is shown per image, at the
            maps' size and indexed by position: masks `(count, height,
            width)` (or one `(height, width)` for every image), or boxes
            `(count, 4)` (or one `(4,)`) as `(x0, y0, x1, y1)` pixels, ends
            exclusive, as in `GradCAMCallback`.
        title: the page's title and heading.
        thumbnail: the longest side of a card's picture in the file, in pixels,
            at least 8; smaller pictures are kept at their size (and enlarged
            on screen).
        image_format: `"png"` or `"jpeg"`.
        quality: JPEG quality, 1 to 100.
        page_size: cards per page when the page opens (the page offers others).
        alpha: weight of the heatmap colour in the overlays, in [0, 1].
        overwrite: replace an existing file at `out`.

    Returns:
        A `ReportSummary`: the path, number of cards, file size and seconds.

    Raises:
        FileNotFoundError: `results` names a missing folder, or `out` is in a
            missing folder.
        FileExistsError: `out` exists and `overwrite` is False.
        IsADirectoryError: `out` is a folder.
        InputError: a folder without shards; shards of different runs or
            formats in one folder (other fields, map sizes or top-k, a
            position twice); an unreadable shard; maps that are not 2-D or
            not finite; images missing, not numeric, not finite or of
            another rank; `regions` or `labels` of the wrong shape; a class
            without a name in `class_names`.
        TargetError: `labels` that are not class indices or one-hot rows.
        TypeError: `results` is neither a folder nor an `Explanation`.
        ValueError: an option out of range (`thumbnail`, `image_format`,
            `quality`, `page_size`, `alpha`).
        OSError: the file could not be written (e.g. a full disk); no partial
            file is left.

    Example:
        >>> tf_gradcam.explain_dataset(model, (images, labels), output_dir="cams")
        >>> summary = tf_gradcam.report(
        ...     "cams", images, out="report.html", class_names=["disk", "square"],
        ...     regions={"cue": cue_boxes})
        >>> summary.cards  # then open report.html; sort by "mass on cue, high → low"
        1000
    """
    start = time.perf_counter()
    _check_options(thumbnail, image_format, quality, page_size, alpha)
    path = _output_path(out, overwrite)
    shards = _read_shards(results)
    order = _card_order(shards)
    positions = np.concatenate([s.index for s in shards])[order]
    truth = _truth(labels, shards, order, positions)
    size = shards[0].map_shape[-2:]
    masks = _regions(regions, size, int(positions[-1]) + 1)
    names = _class_names(class_names, shards, truth)
    source = _image_source(images, positions)
    drawing = _Drawing(thumbnail, image_format, quality, alpha)
    temporary = path.with_name(f".{path.name[:40]}.{uuid.uuid4().hex[:12]}.part")
    try:
        with open(temporary, "x", encoding="utf-8", newline="\n") as handle:
            handle.write(_head(title))
            drawn = _write_cards(handle, shards, order, positions, source, masks, drawing)
            data = _data(shards, order, positions, truth, masks, drawn, names)
            data.update(mime=_MIME[image_format], pageSize=int(page_size))
            data["pageSizes"] = sorted({*_PAGE_SIZES, int(page_size)})
            handle.write(_tail(data))
            handle.flush()
            os.fsync(handle.fileno())
        if not overwrite and os.path.lexists(path):  # appeared while the report was drawn
            raise FileExistsError(_exists_message(path))
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):  # gone after the rename; a failure's leftover
            os.remove(temporary)
    seconds = time.perf_counter() - start
    return ReportSummary(str(path), len(positions), path.stat().st_size, seconds)


# ------------------------------------------------------------------ checks


def _check_options(
    thumbnail: Any, image_format: Any, quality: Any, page_size: Any, alpha: Any
) -> None:
    for name, value, low, high in (
        ("thumbnail", thumbnail, 8, None),
        ("page_size", page_size, 1, None),
        ("quality", quality, 1, 100),
    ):
        whole = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        if not whole or value < low or (high is not None and value > high):
            limits = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"`{name}` must be an int {limits}. Received: {name}={value!r}.")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(
            f"`image_format` must be one of {IMAGE_FORMATS}. Received: "
            f"image_format={image_format!r}."
        )
    number = isinstance(alpha, (int, float, np.floating)) and not isinstance(alpha, bool)
    if not number or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be a number in [0, 1]. Received: alpha={alpha!r}.")


def _exists_message(path: Path) -> str:
    return (
        f"The report {str(path)!r} already exists. Pass overwrite=True (--overwrite) to "
        f"replace it, or choose another `out`. Received: out={str(path)!r}."
    )


def _output_path(out: Any, overwrite: bool) -> Path:
    """The report's path, checked before any work: its folder exists, no file unless asked."""
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"`out` must be a file path. Received: out of type {type(out).__name__}.")
    path = Path(out)
    if path.is_dir():
        raise IsADirectoryError(
            f"`out` is a folder; give the report's file name, e.g. "
            f"{str(path / 'report.html')!r}. Received: out={str(path)!r}."
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"The folder of `out` does not exist: {str(path.parent)!r}. Create it first or "
            f"choose another `out`. Received: out={str(path)!r}."
        )
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(_exists_message(path))
    return path


# ------------------------------------------------------------------ shards


def _read_shards(results: Any) -> list[_Shard]:
    """The shards of a folder (small arrays read, maps left on disk), or one Explanation."""
    if isinstance(results, (str, os.PathLike)):
        return _folder_shards(Path(results))
    if hasattr(results, "heatmaps") and hasattr(results, "scores"):  # an Explanation
        arrays = {
            name: _numpy(getattr(results, name, None)) for name in ("heatmaps", "scores", "classes")
        }
        count = len(arrays["scores"]) if arrays["scores"].ndim else 0
        if count == 0:
            raise InputError("The Explanation explains no images (batch size 0): nothing to show.")
        arrays["index"] = np.arange(count, dtype=np.int64)
        heatmaps = arrays.pop("heatmaps")
        return [_shard("the Explanation", arrays, heatmaps.shape, heatmaps)]
    raise TypeError(
        "`results` must be the folder of explain_dataset's shards or an Explanation. "
        f"Received: results of type {type(results).__name__}."
    )


def _numpy(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()
    return np.asarray(value)


def _folder_shards(folder: Path) -> list[_Shard]:
    """Read every complete shard's small arrays; refuse an empty folder and mixed runs."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"No shard folder {str(folder)!r}: give the `output_dir` of explain_dataset. "
            f"Received: results={str(folder)!r}."
        )
    paths = shard_paths(folder)
    if not paths:
        partial = len(shard_paths(folder, partial=True))
        hint = f" It holds {partial} partial shard(s) of a run that did not end." if partial else ""
        raise InputError(
            f"The folder {str(folder)!r} holds no shards (files named "
            f"gradcam-<worker>-<batch>.npz).{hint} Run explain_dataset(..., output_dir=...) "
            f"into it first. Received: results={str(folder)!r}."
        )
    shards: list[_Shard] = []
    first: tuple[str, frozenset] | None = None
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as data:
                fields = frozenset(data.files)
                if first is not None and fields != first[1]:
                    raise InputError(
                        f"The folder mixes shards of different runs or formats: {path.name} "
                        f"holds {sorted(fields)}, {first[0]} holds {sorted(first[1])}. Keep "
                        f"one run's shards per folder (explain_dataset(..., overwrite=True) "
                        f"replaces an earlier run's). Received: results={str(folder)!r}."
                    )
                first = first or (path.name, fields)
                _require(path.name, fields)
                small = ("index", "scores", "classes", "labels")
                arrays = {name: data[name] for name in small if name in fields}
            map_shape = _member_shape(path, "heatmaps")
        except InputError:
            raise
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise InputError(
                f"Cannot read the shard {path.name} ({type(error).__name__}: {error}). Delete "
                f"it, or rerun explain_dataset with overwrite=True. Received: "
                f"results={str(folder)!r}."
            ) from error
        shards.append(_shard(path.name, arrays, map_shape, path))
    return shards


def _require(name: str, fields: frozenset) -> None:
    missing = [f for f in ("heatmaps", "scores", "index") if f not in fields]
    if missing:
        raise InputError(
            f"The shard {name} has no {', '.join(missing)}: the report needs the fields "
            f'"heatmaps" and "scores" (explain_dataset\'s default) and the positions `index`. '
            f"Rerun explain_dataset with them. Received: fields {sorted(fields)}."
        )


def _member_shape(path: Path, name: str) -> tuple[int, ...]:
    """The shape of one array of an `.npz`, from its header, without reading the array."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(member)
        else:
            shape, _, _ = np.lib.format.read_array_header_2_0(member)
    return tuple(int(n) for n in shape)


def _shard(name: str, arrays: dict, heatmaps_shape: tuple, maps: Path | np.ndarray) -> _Shard:
    """One shard's arrays, checked: one row per position, 2-D maps (with or without top-k)."""
    index = np.asarray(arrays["index"])
    scores = np.asarray(arrays["scores"])
    count = len(index) if index.ndim == 1 else -1
    k = scores.ndim == 2
    classes = arrays.get("classes")
    if (
        count < 0
        or index.dtype.kind not in "iu"
        or scores.ndim not in (1, 2)
        or len(scores) != count
        or len(heatmaps_shape) != 3 + k
        or heatmaps_shape[0] != count
        or (classes is not None and np.shape(classes) != scores.shape)
    ):
        raise InputError(
            f"{name}: the report shows 2-D maps of images, one per position: heatmaps "
            "(batch, height, width), or (batch, k, height, width) with TopK, scores (batch,) "
            f"or (batch, k). Received: heatmaps of shape {heatmaps_shape}, scores of shape "
            f"{scores.shape}, index of shape {index.shape}"
            + ("" if classes is None else f", classes of shape {np.shape(classes)}")
            + ". For signals and volumes use tf_gradcam.show."
        )
    if not np.isfinite(scores).all():
        raise InputError(f"{name}: its scores are not all finite. Received: scores {scores}.")
    return _Shard(
        name=name,
        index=index.astype(np.int64),
        scores=scores.astype(np.float64).reshape(count, -1)[:, 0],
        classes=None if classes is None else np.asarray(classes, np.int64).reshape(count, -1)[:, 0],
        labels=arrays.get("labels"),
        map_shape=tuple(heatmaps_shape[1:]),
        maps=maps,
    )


def _card_order(shards: list[_Shard]) -> np.ndarray:
    """Check the shards agree (map shape, each position once); the cards' order by position."""
    for shard in shards[1:]:
        if shard.map_shape != shards[0].map_shape:
            raise InputError(
                f"The folder mixes shards of different runs or formats: {shards[0].name} holds "
                f"maps of shape {shards[0].map_shape} per image, {shard.name} "
                f"{shard.map_shape}. Keep one run's shards per folder (explain_dataset(..., "
                "overwrite=True) replaces an earlier run's)."
            )
    positions = np.concatenate([s.index for s in shards])
    if positions.min() < 0:
        raise InputError(f"The shards' `index` holds negative positions: {positions.min()}.")
    order = np.argsort(positions, kind="stable")
    ordered = positions[order]
    twice = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(twice):
        owners = [s.name for s in shards if twice[0] in s.index]
        raise InputError(
            f"Position {int(twice[0])} is explained twice ({', '.join(owners[:2])}): the folder "
            "mixes shards of different runs. Keep one run's shards per folder "
            "(explain_dataset(..., overwrite=True) replaces an earlier run's)."
        )
    return order


# ------------------------------------------------------------------ labels, names, regions


def _truth(labels: Any, shards: list[_Shard], order: np.ndarray, positions: np.ndarray):
    """Each card's label class (int64), or None when no class labels are known."""
    if labels is not None:
        values = _numpy(labels)
        if values.ndim == 0 or len(values) <= positions[-1]:
            raise InputError(
                f"`labels` must hold a label for every position up to {int(positions[-1])} "
                f"(indexed by position in the data set). Received: labels of shape "
                f"{values.shape}."
            )
        return np.asarray(classes_from_labels(values[positions]), np.int64)
    if any(s.labels is None for s in shards):
        return None
    try:
        stored = [np.asarray(s.labels) for s in shards]
        counts = [len(s.index) for s in shards]
        if any(a.ndim == 0 or len(a) != n for a, n in zip(stored, counts, strict=True)):
            raise InputError("one label per image")
        classes = np.concatenate([np.asarray(classes_from_labels(a)) for a in stored])
    except (TargetError, InputError, ValueError) as error:
        warnings.warn(
            f"The shards' labels are not class labels ({' '.join(str(error).split())[:200]}); "
            "the report shows no correctness. Pass labels= (class indices) to show it.",
            stacklevel=3,
        )
        return None
    return classes.astype(np.int64)[order]


def _class_names(
    class_names: Sequence[str] | None, shards: list[_Shard], truth: np.ndarray | None
) -> list[str] | None:
    if class_names is None:
        return None
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence):
        raise InputError(
            "`class_names` must be a sequence of names, one per class index. Received: "
            f"class_names of type {type(class_names).__name__}."
        )
    names = [str(n) for n in class_names]
    used = [s.classes for s in shards if s.classes is not None]
    if truth is not None:
        used.append(truth)
    highest = max((int(u.max()) for u in used if len(u)), default=-1)
    if highest >= len(names):
        raise InputError(
            f"`class_names` has no name for class {highest} (it holds {len(names)} names). "
            "Pass one name per output class, in class-index order."
        )
    return names


@dataclass(frozen=True)
class _Region:
    name: str
    boxes: bool  # boxes (x0, y0, x1, y1), or masks
    values: Any  # (count, 4) / (count, h, w) array, or None when one applies to all
    single: np.ndarray | None  # the one box or mask for every image


def _regions(regions: Mapping[str, Any] | None, size: tuple, needed: int) -> list[_Region]:
    """Check the regions' shapes against the maps' size and the number of positions."""
    if regions is None:
        return []
    if not isinstance(regions, Mapping) or not regions:
        raise InputError(
            "`regions` must be a non-empty dict {name: masks or boxes}. Received: regions of "
            f"type {type(regions).__name__}."
        )
    height, width = size
    checked = []
    for name, value in regions.items():
        if not isinstance(name, str) or not name:
            raise InputError(f"Region names must be non-empty strings. Received: {name!r}.")
        # arrays (memory-mapped ones too) are indexed per image, never copied whole
        array = value if isinstance(value, np.ndarray) else _numpy(value)
        shape = tuple(array.shape)
        if np.dtype(array.dtype).kind not in "biuf":
            raise InputError(f"Region {name!r} must be numeric. Received: dtype {array.dtype}.")
        if shape == (height, width) or shape == (4,):
            single = np.asarray(array, np.float64)
            if not np.isfinite(single).all():
                raise InputError(f"Region {name!r} holds values that are not finite.")
            checked.append(_Region(name, shape == (4,), None, single))
        elif shape[1:] in ((height, width), (4,)) and len(shape) in (2, 3) and shape[0] >= needed:
            checked.append(_Region(name, shape[1:] == (4,), array, None))
        else:
            raise InputError(
                f"Region {name!r} must be masks {(needed, height, width)} or one {(height, width)} "
                f"mask, or boxes {(needed, 4)} or one (4,) box, at the maps' size and with one "
                f"per position up to {needed - 1}. Received: shape {shape}."
            )
    return checked


def _mass(heat: np.ndarray, total: float, region: _Region, position: int) -> float:
    """Fraction of the map's mass in the region (NaN for an all-zero map)."""
    if not total > 0:
        return float("nan")
    value = region.single if region.values is None else np.asarray(region.values[position])
    value = np.asarray(value, np.float64)
    if not np.isfinite(value).all():
        raise InputError(
            f"Region {region.name!r} holds values that are not finite at position {position}."
        )
    if region.boxes:  # pixel centres i with x0 <= i < x1, as GradCAMCallback's boxes
        x0, y0, x1, y1 = (int(max(v, 0)) for v in np.ceil(value))
        inside = heat[y0:y1, x0:x1].sum(dtype=np.float64)
    else:
        inside = (heat * value).sum(dtype=np.float64)
    return float(inside / total)


# ------------------------------------------------------------------ pictures


def _maps_loader(shards: list[_Shard]):
    """`maps(shard_number)`: a shard's top-ranked heatmaps, the last few shards kept loaded."""
    cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def maps(number: int) -> np.ndarray:
        if number in cache:
            cache.move_to_end(number)
            return cache[number]
        shard = shards[number]
        if isinstance(shard.maps, Path):
            try:
                with np.load(shard.maps, allow_pickle=False) as data:
                    heatmaps = data["heatmaps"]
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
                raise InputError(
                    f"Cannot read the heatmaps of the shard {shard.name} ({error}). Delete it, "
                    "or rerun explain_dataset with overwrite=True."
                ) from error
        else:
            heatmaps = shard.maps
        if len(shard.map_shape) == 3:  # (n, k, h, w): the top-ranked class
            heatmaps = heatmaps[:, 0]
        cache[number] = heatmaps
        while len(cache) > _SHARD_CACHE:
            cache.popitem(last=False)
        return heatmaps

    return maps


def _image_source(images: Any, positions: np.ndarray) -> Iterator[Any]:
    """The image at each of the (ascending) positions: by index, or read once in order.

    What can be checked without reading images (the type, the number of
    indexed images) is checked here, before the report's file is opened.
    """
    if images is None:
        return iter(lambda: None, object())  # None, forever
    if hasattr(images, "numpy") and hasattr(images, "shape"):  # a tf.Tensor
        images = images.numpy()
    if isinstance(images, Mapping):
        raise InputError(
            "`images` must be the images themselves (an array, or a sequence of images); "
            "for a multi-input model pass the input to draw on. Received: a dict of "
            f"{sorted(images)}."
        )
    if hasattr(images, "__getitem__") and hasattr(images, "__len__"):
        count = len(images)
        if count <= positions[-1]:
            raise InputError(
                f"`images` holds {count} images but the maps explain position "
                f"{int(positions[-1])}: pass every image of the data set given to "
                f"explain_dataset, in its order. Received: {count} images."
            )
        return (images[int(position)] for position in positions)
    if not hasattr(images, "__iter__") or isinstance(images, (str, bytes)):
        raise InputError(
            "`images` must be an array, a sequence of images or an iterable (e.g. the "
            f"tf.data.Dataset given to explain_dataset). Received: {type(images).__name__}."
        )
    return _read_in_order(images, positions)


def _read_in_order(images: Any, positions: np.ndarray) -> Iterator[np.ndarray]:
    """The images at the (ascending) positions, from an iterable of images or batches."""
    wanted = iter(positions.tolist())
    target = next(wanted)
    seen = 0
    for element in images:
        if isinstance(element, tuple):  # (images, labels[, extras])
            element = element[0]
        batch = _numpy(element)
        rows = batch if batch.ndim == 4 else batch[None]
        for row in rows:
            while target is not None and target == seen:
                yield row
                target = next(wanted, None)
            seen += 1
        if target is None:
            return
    raise InputError(
        f"`images` ended after {seen} images but the maps explain position {target}: pass "
        "every image of the data set given to explain_dataset, in its order."
    )


def _display_image(image: Any, position: int) -> np.ndarray:
    """An image as float32 RGB in [0, 1], checked."""
    array = _numpy(image)
    if array.dtype.kind not in "biuf" or array.ndim not in (2, 3):
        raise InputError(
            f"The image at position {position} must be a numeric (height, width[, channels]) "
            f"array. Received: dtype {array.dtype}, shape {array.shape}."
        )
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise InputError(
            f"The image at position {position} must have 1, 3 or 4 channels, last. Received: "
            f"shape {array.shape}."
        )
    values = array[..., :3].astype(np.float32)
    if not np.isfinite(values).all():
        raise InputError(f"The image at position {position} holds values that are not finite.")
    if array.dtype == np.uint8 or values.max(initial=0.0) > 1.0:
        values = values / 255.0
    if values.shape[-1] == 1:
        values = np.repeat(values, 3, axis=-1)
    return np.clip(values, 0.0, 1.0)


def _picture(image: np.ndarray | None, heat: np.ndarray, thumbnail: int, alpha: float):
    """The card's uint8 RGB overlay, at most `thumbnail` pixels on its longest side."""
    import cv2

    base = np.zeros((*heat.shape, 3), np.float32) if image is None else image
    height, width = base.shape[:2]
    scale = min(1.0, thumbnail / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # OpenCV: (w, h)
    if size != (width, height):
        base = cv2.resize(base, size, interpolation=cv2.INTER_AREA)
    if heat.shape != (size[1], size[0]):
        smaller = size[0] * size[1] < heat.size
        method = cv2.INTER_AREA if smaller else cv2.INTER_LINEAR
        heat = cv2.resize(heat.astype(np.float32), size, interpolation=method)
    return overlay(base, heat, alpha=1.0 if image is None else alpha)


def _encode(picture: np.ndarray, image_format: str, quality: int) -> str:
    import cv2

    bgr = np.ascontiguousarray(picture[..., ::-1])
    if image_format == "png":
        ok, data = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    else:
        ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {picture.shape} picture as {image_format}.")
    return base64.b64encode(data.tobytes()).decode("ascii")


@dataclass(frozen=True)
class _Drawing:
    """How the cards' pictures are drawn and encoded."""

    thumbnail: int
    image_format: str
    quality: int
    alpha: float


@dataclass(frozen=True)
class _Drawn:
    masses: np.ndarray  # (cards, regions) float64, NaN for an all-zero map
    flat: np.ndarray  # (cards,) bool, all-zero maps
    sizes: np.ndarray  # (cards, 2) int, each picture's (width, height)


def _write_cards(
    handle: TextIO,
    shards: list[_Shard],
    order: np.ndarray,
    positions: np.ndarray,
    source: Iterator[Any],
    regions: list[_Region],
    drawing: _Drawing,
) -> _Drawn:
    """Draw, encode and write every card's picture in position order; measure its masses."""
    counts = [len(s.index) for s in shards]
    shard_of = np.repeat(np.arange(len(shards)), counts)[order]
    row_of = np.concatenate([np.arange(n) for n in counts])[order]
    maps = _maps_loader(shards)
    masses = np.full((len(positions), len(regions)), np.nan)
    flat = np.zeros(len(positions), bool)
    sizes = np.zeros((len(positions), 2), np.int64)
    handle.write('<script type="application/json" id="report-pictures">[')
    for card, (number, row, position) in enumerate(zip(shard_of, row_of, positions, strict=True)):
        heat = np.asarray(maps(int(number))[row], np.float64)
        if not np.isfinite(heat).all():
            raise InputError(
                f"The heatmap of position {int(position)} in {shards[number].name} is not "
                "finite; rerun explain_dataset with overwrite=True."
            )
        total = float(heat.sum())
        flat[card] = not total > 0
        for r, region in enumerate(regions):
            masses[card, r] = _mass(heat, total, region, int(position))
        image = next(source)
        image = None if image is None else _display_image(image, int(position))
        picture = _picture(image, heat, drawing.thumbnail, drawing.alpha)
        sizes[card] = picture.shape[1], picture.shape[0]
        encoded = _encode(picture, drawing.image_format, drawing.quality)
        handle.write(("," if card else "") + '"' + encoded + '"')
    handle.write("]</script>\n")
    return _Drawn(masses, flat, sizes)


# ------------------------------------------------------------------ the page


def _rounded(values: np.ndarray) -> list:
    """Six significant digits; NaN becomes JSON null."""
    return [None if not np.isfinite(v) else float(f"{v:.6g}") for v in values.tolist()]


def _data(
    shards: list[_Shard],
    order: np.ndarray,
    positions: np.ndarray,
    truth: np.ndarray | None,
    regions: list[_Region],
    drawn: _Drawn,
    names: list[str] | None,
) -> dict:
    """The page's JSON: one list per column, in card (position) order."""
    scores = np.concatenate([s.scores for s in shards])[order]
    classes = None
    if all(s.classes is not None for s in shards):
        classes = np.concatenate([s.classes for s in shards])[order]
    correct = None
    if truth is not None and classes is not None:
        correct = (classes == truth).astype(int).tolist()
    small = bool((drawn.sizes.max(axis=1) < _PIXELATED_BELOW).all())
    return {
        "index": positions.tolist(),
        "score": _rounded(scores),
        "classes": None if classes is None else classes.tolist(),
        "labels": None if truth is None else truth.tolist(),
        "correct": correct,
        "flat": drawn.flat.astype(int).tolist(),
        "regions": [r.name for r in regions],
        "masses": [_rounded(drawn.masses[:, r]) for r in range(len(regions))],
        "classNames": names,
        "width": drawn.sizes[:, 0].tolist(),
        "height": drawn.sizes[:, 1].tolist(),
        "pixelated": small,
    }


def _script_json(value: Any) -> str:
    """JSON that cannot end its <script> element or open a comment: <, > and & escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _head(title: str) -> str:
    title = html.escape(str(title), quote=True)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{_POLICY}">
<meta name="generator" content="tf_gradcam.report">
<title>{title}</title>
<style>{_STYLE}</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p id="summary"></p>
</header>
<noscript><p>This report needs JavaScript to show its cards.</p></noscript>
<form id="controls" aria-label="Sort and filter">
<label>Sort by <select id="sort"></select></label>
<label id="wrong-first-label"><input type="checkbox" id="wrong-first"> wrong predictions \
first</label>
<label id="class-label">Class <select id="class"><option value="">all</option></select></label>
<label id="correct-label">Prediction <select id="correct"><option value="">all</option>\
<option value="wrong">wrong only</option><option value="right">right only</option></select></label>
<label>Score &ge; <input type="number" id="min-score" step="any" size="7"></label>
<label>Score &le; <input type="number" id="max-score" step="any" size="7"></label>
<label id="mass-label">Mass on <select id="mass-region"></select> &ge; \
<input type="number" id="min-mass" min="0" max="1" step="0.05" size="5"></label>
<label>Per page <select id="page-size"></select></label>
</form>
<nav class="pager" aria-label="Pages">
<button type="button" id="prev">&larr; Previous</button>
<label>Page <input type="number" id="page" min="1" value="1" size="4"></label>
<button type="button" id="next">Next &rarr;</button>
<span id="status" role="status" aria-live="polite"></span>
</nav>
<ul id="cards" aria-label="Explained images"></ul>
"""


def _tail(data: dict) -> str:
    return (
        f'<script type="application/json" id="report-data">{_script_json(data)}</script>\n'
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )


_POLICY = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #1b1b1b; background: #f6f6f6; }
h1 { font-size: 20px; margin: 0 0 4px; }
#summary { margin: 0 0 10px; color: #444; }
#controls, .pager { display: flex; flex-wrap: wrap; gap: 6px 14px; align-items: center;
  margin: 0 0 8px; }
.pager { position: sticky; top: 0; background: #f6f6f6; padding: 6px 0; z-index: 1; }
select, input, button { font: inherit; }
input[type=number] { width: 6em; }
button { padding: 2px 10px; }
:focus-visible { outline: 3px solid #1a5fb4; outline-offset: 1px; }
[hidden] { display: none !important; }
#cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr));
  gap: 10px; list-style: none; padding: 0; margin: 0; }
.card { background: #fff; border: 2px solid #c9c9c9; border-radius: 6px; padding: 5px; }
.card.wrong { border-color: #b3261e; background: #fff4f3; }
.card figure { margin: 0; }
.card img { display: block; width: 100%; height: auto; background: #000; }
.pixelated .card img { image-rendering: pixelated; }
.card figcaption { font-size: 12px; margin-top: 4px; overflow-wrap: anywhere; }
.card .head { font-weight: 600; }
.card .verdict { color: #1e6b2c; }
.card.wrong .verdict { color: #b3261e; font-weight: 600; }
.card .flat { color: #8a5a00; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var el = function (id) { return document.getElementById(id); };
  var data = JSON.parse(el("report-data").textContent);
  var pictures = JSON.parse(el("report-pictures").textContent);
  var count = data.index.length;
  var regions = data.regions;
  var ui = {
    sort: el("sort"), wrongFirst: el("wrong-first"), cls: el("class"), correct: el("correct"),
    minScore: el("min-score"), maxScore: el("max-score"), massRegion: el("mass-region"),
    minMass: el("min-mass"), pageSize: el("page-size"), page: el("page")
  };
  var view = [];
  var page = 0;

  function className(c) {
    if (c === null || c === undefined) return "custom target";
    if (data.classNames && c >= 0 && c < data.classNames.length) return data.classNames[c];
    return "class " + c;
  }
  function addOption(select, value, text) {
    var option = document.createElement("option");
    option.value = value;
    option.textContent = text;
    select.appendChild(option);
  }
  function number(input) {
    var value = parseFloat(input.value);
    return isFinite(value) ? value : null;
  }
  function fixed(value, digits) { return value === null ? "\u2014" : value.toFixed(digits); }

  addOption(ui.sort, "index:asc", "position in the data set");
  addOption(ui.sort, "score:desc", "score, high \u2192 low");
  addOption(ui.sort, "score:asc", "score, low \u2192 high");
  regions.forEach(function (name, r) {
    addOption(ui.sort, "mass:" + r + ":desc", "mass on " + name + ", high \u2192 low");
    addOption(ui.sort, "mass:" + r + ":asc", "mass on " + name + ", low \u2192 high");
    addOption(ui.massRegion, String(r), name);
  });
  if (data.classes) {
    addOption(ui.sort, "class:asc", "class");
    Array.from(new Set(data.classes)).sort(function (a, b) { return a - b; })
      .forEach(function (c) { addOption(ui.cls, String(c), className(c)); });
  }
  data.pageSizes.forEach(function (n) { addOption(ui.pageSize, String(n), String(n)); });
  ui.pageSize.value = String(data.pageSize);
  el("class-label").hidden = !data.classes;
  el("correct-label").hidden = !data.correct;
  el("wrong-first-label").hidden = !data.correct;
  el("mass-label").hidden = regions.length === 0;
  if (data.pixelated) document.body.classList.add("pixelated");

  var summary = count.toLocaleString("en") + " images";
  if (data.classes) summary += ", " + new Set(data.classes).size + " classes explained";
  if (data.correct) {
    var wrong = data.correct.filter(function (c) { return c === 0; }).length;
    summary += ", " + wrong.toLocaleString("en") + " wrong (explained class \u2260 label)";
  }
  if (regions.length) summary += "; Grad-CAM mass on " + regions.join(", ");
  el("summary").textContent = summary + ".";

  function keep(i) {
    if (ui.cls.value !== "" && data.classes[i] !== Number(ui.cls.value)) return false;
    if (data.correct && ui.correct.value === "wrong" && data.correct[i] !== 0) return false;
    if (data.correct && ui.correct.value === "right" && data.correct[i] !== 1) return false;
    var low = number(ui.minScore), high = number(ui.maxScore);
    if (low !== null && !(data.score[i] >= low)) return false;
    if (high !== null && !(data.score[i] <= high)) return false;
    var least = number(ui.minMass);
    if (least !== null && regions.length) {
      var mass = data.masses[Number(ui.massRegion.value)][i];
      if (mass === null || !(mass >= least)) return false;
    }
    return true;
  }
  function comparer() {
    var parts = ui.sort.value.split(":");
    var descending = parts[parts.length - 1] === "desc" ? -1 : 1;
    var values = parts[0] === "score" ? data.score
      : parts[0] === "mass" ? data.masses[Number(parts[1])]
      : parts[0] === "class" ? data.classes : data.index;
    var wrongFirst = ui.wrongFirst.checked && data.correct;
    return function (a, b) {
      if (wrongFirst) {
        var wa = data.correct[a] === 0 ? 0 : 1, wb = data.correct[b] === 0 ? 0 : 1;
        if (wa !== wb) return wa - wb;
      }
      var va = values[a], vb = values[b];
      if (va !== vb) {
        if (va === null) return 1;
        if (vb === null) return -1;
        return descending * (va < vb ? -1 : 1);
      }
      return data.index[a] - data.index[b];
    };
  }
  function pageSize() { return Number(ui.pageSize.value) || data.pageSize; }
  function pages() { return Math.max(1, Math.ceil(view.length / pageSize())); }

  function card(i) {
    var item = document.createElement("li");
    item.className = "card" + (data.correct && data.correct[i] === 0 ? " wrong" : "");
    item.dataset.index = String(data.index[i]);
    var figure = document.createElement("figure");
    var image = document.createElement("img");
    var caption = document.createElement("figcaption");
    var name = className(data.classes ? data.classes[i] : null);
    var words = ["Grad-CAM overlay of image " + data.index[i] + ": " + name +
      ", score " + fixed(data.score[i], 3)];
    function line(text, kind) {
      var row = document.createElement("div");
      row.className = kind;
      row.textContent = text;
      caption.appendChild(row);
      return row;
    }
    line("#" + data.index[i] + " \u00b7 " + name, "head");
    line("score " + fixed(data.score[i], 3), "score");
    if (data.correct) {
      var label = className(data.labels[i]);
      var right = data.correct[i] === 1;
      line((right ? "\u2713 right" : "\u2717 wrong") + " \u00b7 label " + label, "verdict");
      words.push("label " + label + ", " + (right ? "right" : "wrong"));
    } else if (data.labels) {
      line("label " + className(data.labels[i]), "verdict");
    }
    if (regions.length) {
      var row = line("", "masses");
      regions.forEach(function (region, r) {
        var mass = data.masses[r][i];
        var span = document.createElement("span");
        span.className = "mass";
        span.dataset.region = region;
        span.textContent = (r ? " \u00b7 " : "") + region + " " + fixed(mass, 2);
        row.appendChild(span);
        words.push("mass on " + region + " " + fixed(mass, 2));
      });
    }
    if (data.flat[i]) {
      line("all-zero map", "flat");
      words.push("all-zero map");
    }
    image.alt = words.join("; ");
    image.width = data.width[i];
    image.height = data.height[i];
    image.decoding = "async";
    image.src = "data:" + data.mime + ";base64," + pictures[i];
    figure.appendChild(image);
    figure.appendChild(caption);
    item.appendChild(figure);
    return item;
  }

  function render() {
    page = Math.min(Math.max(page, 0), pages() - 1);
    var size = pageSize(), first = page * size;
    var shown = view.slice(first, first + size);
    var fragment = document.createDocumentFragment();
    shown.forEach(function (i) { fragment.appendChild(card(i)); });
    el("cards").replaceChildren(fragment);
    ui.page.value = String(page + 1);
    ui.page.max = String(pages());
    el("prev").disabled = page === 0;
    el("next").disabled = page >= pages() - 1;
    el("status").textContent = "Page " + (page + 1) + " of " + pages() + " \u00b7 cards " +
      (shown.length ? first + 1 : 0) + "\u2013" + (first + shown.length) + " of " +
      view.length.toLocaleString("en") + " shown" +
      (view.length < count ? " (" + count.toLocaleString("en") + " in the report)" : "");
    saveState();
  }
  function update() {
    view = [];
    for (var i = 0; i < count; i++) if (keep(i)) view.push(i);
    view.sort(comparer());
    render();
  }

  var fields = ["sort", "wrongFirst", "cls", "correct", "minScore", "maxScore", "massRegion",
    "minMass", "pageSize"];
  function value(key) {
    var input = ui[key];
    return input.type === "checkbox" ? (input.checked ? "1" : "") : input.value;
  }
  var defaults = {};
  fields.forEach(function (key) { defaults[key] = value(key); });
  function saveState() {  // the view in the address's #..., without the defaults
    var state = new URLSearchParams();
    fields.forEach(function (key) {
      if (value(key) !== defaults[key]) state.set(key, value(key));
    });
    if (page) state.set("page", String(page + 1));
    var hash = state.toString();
    if (hash !== location.hash.slice(1)) {
      history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
    }
  }
  function loadState() {
    var state = new URLSearchParams(location.hash.slice(1));
    fields.forEach(function (key) {
      if (!state.has(key)) return;
      var input = ui[key], value = state.get(key);
      if (input.type === "checkbox") input.checked = value === "1";
      else if (input.tagName !== "SELECT" ||
        Array.from(input.options).some(function (o) { return o.value === value; })) {
        input.value = value;
      }
    });
    page = (parseInt(state.get("page"), 10) || 1) - 1;
  }

  fields.forEach(function (key) {
    var events = ui[key].type === "number" ? ["input"] : ["change"];
    events.forEach(function (type) {
      ui[key].addEventListener(type, function () { page = 0; update(); });
    });
  });
  ui.page.addEventListener("change", function () {
    page = (parseInt(ui.page.value, 10) || 1) - 1;
    render();
  });
  el("prev").addEventListener("click", function () { page -= 1; render(); });
  el("next").addEventListener("click", function () { page += 1; render(); });
  el("controls").addEventListener("submit", function (event) { event.preventDefault(); });
  document.addEventListener("keydown", function (event) {
    var tag = event.target.tagName;
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA") return;
    if (event.key === "ArrowLeft" && page > 0) { page -= 1; render(); }
    if (event.key === "ArrowRight" && page < pages() - 1) { page += 1; render(); }
  });
  loadState();
  update();
  document.documentElement.dataset.ready = "1";
})();
"""
