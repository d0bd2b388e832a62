"""Grad-CAM over a whole data set, batch by batch, streaming the results.

The paper's localisation and pointing-game experiments (§4.1, §4.3) explain
thousands of images. `explain_dataset` runs one `GradCAM` over a
`tf.data.Dataset` or a large (possibly memory-mapped) array, shows a Keras
progress bar, and hands each batch's maps on as soon as they exist: written
to `.npz` shards in a folder and/or passed to a callback. Nothing accumulates:
memory stays that of one batch (plus at most two shards being written), so
the data set can be far larger than memory.

Under a `tf.distribute` strategy each global batch is split across the
replicas (`strategy.run`) and the replicas' maps are put back together in
order. The same code runs under `MultiWorkerMirroredStrategy`: every worker
explains its own share of the data and writes its own files, named after its
place in the cluster; each image keeps its position in the whole data set
(the shards' `index`), so the union of every worker's shards is the data set.

Shards are written atomically (a temporary name, flushed and synced, then
renamed), so a worker that dies mid-run leaves only complete shards behind. A
write that fails (a full disk, a read-only folder) stops the run with an
`OSError` that says why and what to do; the shards before it stay complete
and none after it is written.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_gradcam.errors import InputError, TargetError
from tf_gradcam.gradcam import Explanation, GradCAM
from tf_gradcam.methods import get_method
from tf_gradcam.targets import (
    LABELS,
    Target,
    TargetSpec,
    check_label_kind,
    classes_from_labels,
    labels_target,
    require_labels,
    resolve_target,
)

__all__ = ["DatasetSummary", "ExplainedBatch", "explain_dataset", "iter_shards"]

#: The `Explanation` fields that can be saved to shards.
FIELDS = ("heatmaps", "maps", "raw_maps", "weights", "scores", "classes", "degenerate")
_DEFAULT_FIELDS = ("heatmaps", "maps", "scores", "classes", "degenerate")
# The only names this module writes, reads back or deletes: gradcam-<worker>-<batch>.npz,
# and, while a shard is being written, .gradcam-<worker>-<batch>.npz.<pid>.tmp.
_SHARD_NAME = re.compile(r"gradcam-(\d{3,})-(\d{6,})\.npz")
_TEMP_NAME = re.compile(r"\.gradcam-(\d{3,})-(\d{6,})\.npz\.\d+\.tmp")


@dataclass(frozen=True)
class ExplainedBatch:
    """One batch of a data set with its Grad-CAM explanation, as passed to `on_batch`.

    Attributes:
        index: batch number (of this worker), from 0.
        offset: position of the batch's first image in this worker's share of
            the data (the whole data without a multi-worker strategy).
        images: the batch's images as NumPy, `(batch, height, width, channels)`
            (a dict of arrays for multi-input models).
        labels: the labels that came with the images, as NumPy, or `None`.
        extras: anything else the data carried per image (the third element of
            `(images, labels, extras)`, e.g. ground-truth masks), as NumPy, or `None`.
        explanation: the batch's `Explanation`, NumPy arrays.
        positions: `(batch,)` int64, each image's position in the whole data
            set, across every worker (the shards' `index`).
    """

    index: int
    offset: int
    images: Any
    labels: Any
    extras: Any
    explanation: Explanation
    positions: Any = None


@dataclass(frozen=True)
class DatasetSummary:
    """What `explain_dataset` returns: counts and file names, never the maps.

    Attributes:
        images: number of images explained (by this worker).
        batches: number of batches handed on (written and/or passed to `on_batch`).
        shards: paths of the `.npz` shards written, in order (empty without
            `output_dir`).
        seconds: wall time of the whole run.
    """

    images: int
    batches: int
    shards: tuple[str, ...]
    seconds: float


def explain_dataset(
    model: keras.Model | GradCAM,
    data: Any,
    target: Target | str = None,
    layer: str | keras.layers.Layer | None = None,
    *,
    batch_size: int = 32,
    output_dir: str | os.PathLike | None = None,
    on_batch: Callable[[ExplainedBatch], None] | None = None,
    fields: Sequence[str] = _DEFAULT_FIELDS,
    strategy: tf.distribute.Strategy | None = None,
    steps: int | None = None,
    overwrite: bool = False,
    verbose: int = 1,
    method: str = "gradcam",
    **options: Any,
) -> DatasetSummary:
    """Explain every image of a data set, streaming each batch's maps to disk or a callback.

    Args:
        model: a `keras.Model`, or a CAM-family explainer already built
            (`GradCAM`, `GradCAMPlusPlus`, `ScoreCAM`...; then `layer`,
            `method` and `options` must be left out).
        data: a `tf.data.Dataset` or NumPy-like arrays. Each element (or the
            arrays) is `images`, `(images, labels)` or `(images, labels,
            extras)`; `images` is `(height, width, channels)` per element, or
            already batched `(batch, height, width, channels)` (a dict of such
            for multi-input models). Unbatched data and arrays are batched by
            `batch_size`; a batched dataset is used as it is. Arrays are read one
            batch at a time, so `np.load(..., mmap_mode="r")` arrays larger than
            memory work.
        target: what to explain, as in `GradCAM.__call__`: `None` (predicted
            class), an int, `TopK(k)`, a callable, or `"labels"`: each image's
            label, given as a class index (an integer, or a float holding a
            whole number) or a one-hot row (one 1, the rest 0).
        layer: the layer to explain (name, path, `Layer` or `None`).
        batch_size: images per batch for unbatched data and arrays; under a
            strategy, the *global* batch, split across the replicas (of every
            worker).
        output_dir: folder for the shards `gradcam-<worker>-<batch>.npz`, one per
            batch, each with the chosen `fields`, `index` (each image's position
            in the whole data set, across workers) and `labels` when the data
            has labels. Created if missing. `None` writes nothing. Each shard is
            written under a temporary name and renamed when complete.
        on_batch: called with an `ExplainedBatch` after each batch, e.g. to
            accumulate a metric; it should not keep the arrays if memory matters.
        fields: the `Explanation` fields written to the shards.
        strategy: a `tf.distribute.Strategy` to run the replicas of; `None` runs
            on the default device.
        steps: a positive int: stop after this many batches (at most; fewer if
            the data end first). Needed for an infinite dataset (e.g. after
            `repeat()`), which is refused without it. `None` explains the data
            to their end, also for a dataset of unknown length (e.g. after
            `filter`).
        overwrite: delete the shards of an earlier run found in `output_dir`
            (only files named `gradcam-<worker>-<batch>.npz`, and under a
            multi-worker strategy only this worker's) instead of failing.
        verbose: 1 shows a `keras.utils.Progbar`, 0 is silent.
        method: the CAM method, by name (`tf_gradcam.methods.METHODS`:
            `"gradcam"`, `"gradcam++"`, `"scorecam"`...), with a model.
        **options: keyword options of the method's class (with a model). An
            option named like one of this function's (Score-CAM's
            `batch_size`) cannot pass through: build the explainer, e.g.
            `ScoreCAM(model, batch_size=64)`, and pass it as `model`.

    Returns:
        A `DatasetSummary` (counts, shard paths, wall time), never the maps.

    Raises:
        InputError: the data is neither a dataset nor arrays, its images do
            not fit the model (rank, size, channels), or it has a different
            number of labels (or extras) than images.
        TargetError: `target="labels"` without labels, or labels that are not
            class indices or one-hot rows, or classes out of the model's range.
        UnknownMethodError: `method` names no CAM method.
        ValueError: an unknown field, `batch_size < 1`, `steps` that is not a
            positive int or `None`, an infinite dataset without `steps`, or
            earlier shards in `output_dir` without `overwrite=True`.
        OSError: a shard could not be written (e.g. `ENOSPC`, no space left on
            the device): the message names the shard, the folder, the reason
            and the fix, and the `errno` is the operating system's. The shards
            before it are complete and no later one is written.

    Example:
        >>> hits = []
        >>> def point(batch):
        ...     hits.append(metrics.pointing_game(batch.explanation.heatmaps, batch.extras[:, 0]))
        >>> data = tf.data.Dataset.from_tensor_slices((images, labels, masks))
        >>> explain_dataset(model, data, target="labels", on_batch=point, output_dir="cams")
        >>> metrics.pointing_accuracy(np.concatenate(hits))
    """
    start = time.perf_counter()
    _check_steps(steps)
    cam = _explainer(model, layer, method, options)
    fields = _check_fields(fields)
    target = labels_target(target)
    _check_target(target)
    if isinstance(data, list):  # a list of images
        data = np.asarray(data)
    if isinstance(data, tuple) and len(data) > 1 and isinstance(data[1], list):
        data = (data[0], np.asarray(data[1]), *data[2:])  # a list of labels
    _check_data(cam, data, target)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}."
        )
    _check_finite(data, steps)
    worker, workers = _worker_index(strategy), _worker_count(strategy)
    writer = (
        _ShardWriter(output_dir, worker, fields, overwrite, own_only=workers > 1)
        if output_dir is not None
        else None
    )
    total = _cardinality(cam, data, batch_size, steps)
    progbar = keras.utils.Progbar(total, unit_name="batch") if verbose else None
    if strategy is None:
        batches = _local_batches(cam, data, target, batch_size)
    else:
        batches = _distributed_batches(cam, data, target, batch_size, strategy)
    offset = handed = 0
    try:
        for step, (positions, images, labels, extras, explanation) in enumerate(batches, 1):
            if len(positions):  # a worker's share of the last global batch may be empty
                batch = ExplainedBatch(
                    handed, offset, images, labels, extras, explanation, positions
                )
                handed += 1
                offset += len(positions)
                if writer is not None:
                    writer.write(batch)
                if on_batch is not None:
                    on_batch(batch)
                del batch
            del positions, images, labels, extras, explanation  # hold nothing between batches
            if progbar is not None:
                progbar.update(step)
            if steps is not None and step >= steps:
                break
    finally:
        batches.close()
        shards = writer.close() if writer is not None else ()
    return DatasetSummary(offset, handed, shards, time.perf_counter() - start)


def iter_shards(output_dir: str | os.PathLike) -> Iterator[dict[str, np.ndarray]]:
    """Read back the shards of `explain_dataset`, one dict of arrays per shard.

    Only complete shards are read: files named exactly
    `gradcam-<worker>-<batch>.npz`, ordered by worker, then batch. Shards still
    being written (or left behind by a worker that died) have a temporary name
    and are skipped, and so are other files of the folder. With several
    workers, each image's position in the data set is in the shard's `index`.

    Args:
        output_dir: the folder given to `explain_dataset` (for several workers,
            a folder holding every worker's shards).

    Returns:
        An iterator of `{field: array}` dicts (one shard in memory at a time).

    Raises:
        FileNotFoundError: the folder does not exist.

    Example:
        >>> heatmaps = np.concatenate([s["heatmaps"] for s in iter_shards("cams")])
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"No shard folder {str(folder)!r}.")
    for path in shard_paths(folder):
        with np.load(path) as shard:
            yield {name: shard[name] for name in shard.files}


def shard_paths(folder: str | os.PathLike, *, partial: bool = False) -> list[Path]:
    """The shard files of an `explain_dataset` folder, by worker, then batch.

    Args:
        folder: an existing folder.
        partial: list the temporary files of shards still being written (or left
            by a run that died) instead of the complete shards.

    Returns:
        The paths, in the order `iter_shards` reads them.

    Example:
        >>> shard_paths("cams")[0].name
        'gradcam-000-000000.npz'
    """
    return _find_files(Path(folder), _TEMP_NAME if partial else _SHARD_NAME)


# ------------------------------------------------------------------ set-up


def _explainer(model: Any, layer: Any, method: str, options: dict) -> GradCAM:
    if isinstance(model, GradCAM):
        if layer is not None or options or method != "gradcam":
            raise ValueError(
                "Pass `layer`, `method` and method options when giving a model, not with a "
                f"built {type(model).__name__}. Received: layer={layer!r}, method={method!r}, "
                f"options={sorted(options)}."
            )
        return model
    return get_method(method)(model, layer, **options)


def _check_steps(steps: Any) -> None:
    """`steps` must be `None` or a positive int (not a bool, a float or a str)."""
    if steps is None:
        return
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(
            "`steps` must be a positive int, the number of batches to explain, or None to "
            f"explain the data to their end. Received: steps={steps!r}."
        )


def _check_finite(data: Any, steps: int | None) -> None:
    """Refuse an infinite dataset without `steps`: the run would never end."""
    if steps is not None or not isinstance(data, tf.data.Dataset):
        return
    if int(data.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
        raise ValueError(
            "The dataset is infinite (its cardinality is tf.data.INFINITE_CARDINALITY, e.g. "
            "after repeat()), so explaining it would never end. Pass steps=<number of "
            "batches> to stop after that many, or end the dataset (e.g. data.take(n)). "
            "Received: steps=None."
        )


def _check_fields(fields: Sequence[str]) -> tuple[str, ...]:
    fields = (fields,) if isinstance(fields, str) else tuple(fields)
    unknown = [f for f in fields if f not in FIELDS]
    if unknown or not fields:
        raise ValueError(f"`fields` must be a non-empty subset of {FIELDS}. Received: {fields!r}.")
    return fields


def _check_data(cam: GradCAM, data: Any, target: Any) -> None:
    """Refuse, before any work, data whose structure cannot be explained."""
    if isinstance(data, tf.data.Dataset):
        images, labels, _ = _split(data.element_spec)
        rank = _image_rank(cam, images)
        model_rank = _model_rank(cam) or 4
        if rank not in (model_rank - 1, model_rank):
            shapes = keras.tree.map_structure(lambda spec: tuple(spec.shape), images)
            raise InputError(
                f"The dataset's images must be single images of rank {model_rank - 1} or "
                f"batches of rank {model_rank} for the model's input "
                f"{_model_shape(cam) or '(batch, height, width, channels)'}. Received: "
                f"element images of shape {shapes} (rank {rank}). "
                + _rank_hint(cam, rank + (rank < model_rank), model_rank, dataset=True)
            )
        batched = rank == model_rank
        _check_image_shape(cam, images, batched)
        if _is_labels(target):
            _check_labels_spec(labels, batched)
        return
    images, labels, extras = _split(data)
    leaves = keras.tree.flatten(images)
    if not leaves or not all(hasattr(a, "shape") and hasattr(a, "__getitem__") for a in leaves):
        raise InputError(
            "`data` must be a tf.data.Dataset or arrays: images, (images, labels) or "
            f"(images, labels, extras). Received: {type(data).__name__}. Wrap a generator "
            "in tf.data.Dataset.from_generator."
        )
    model_rank = _model_rank(cam)
    rank = len(leaves[0].shape)
    if model_rank is not None and len(leaves) == 1 and rank != model_rank:
        raise InputError(
            f"The images of `data` must be a batch of rank {model_rank} for the model's "
            f"input {_model_shape(cam)}. Received: images of shape "
            f"{tuple(leaves[0].shape)} (rank {rank}). "
            + _rank_hint(cam, rank, model_rank, dataset=False)
        )
    _check_image_shape(cam, images, batched=True)
    count = len(leaves[0])
    for name, part in (("labels", labels), ("extras", extras)):
        for leaf in [] if part is None else keras.tree.flatten(part):
            if not hasattr(leaf, "__len__") or len(leaf) != count:
                length = len(leaf) if hasattr(leaf, "__len__") else "no"
                raise InputError(
                    f"`data` has {count} images but {length} {name}: give one per image, "
                    f"in the same order. Received: {name} of shape {np.shape(leaf)}, "
                    f"images of shape {tuple(leaves[0].shape)}."
                )
    if _is_labels(target):
        _check_labels_spec(labels, batched=True)


def _model_shape(cam: GradCAM) -> tuple | None:
    if not cam.built:
        return None
    inputs = keras.tree.flatten(cam.gradient_model.inputs)
    return tuple(inputs[0].shape) if len(inputs) == 1 else None


def _rank_hint(cam: GradCAM, batch_rank: int, model_rank: int, dataset: bool) -> str:
    """How to fix images whose (batched) rank is `batch_rank` instead of `model_rank`."""
    shape = _model_shape(cam)
    if batch_rank == model_rank - 1:
        channels = shape[-1] if shape else None
        fix = (
            "data.map(lambda image, *rest: (image[..., None], *rest))"
            if dataset
            else "images[..., None]"
        )
        hint = f"Grayscale images without a channel axis need one: {fix}"
        if channels not in (None, 1):
            hint += f", then repeat it to the model's {channels} channels"
        return hint + "."
    if batch_rank > model_rank:
        target = shape[1:] if shape else "(height, width, channels)"
        return (
            f"Remove the extra axes so that each image has shape {target}, e.g. with "
            "np.squeeze or a reshape."
        )
    return "Give the images the model's input shape."


def _check_image_shape(cam: GradCAM, images: Any, batched: bool) -> None:
    """Compare the known sizes of single-input images with the model's input."""
    shape = _model_shape(cam)
    leaves = keras.tree.flatten(images)
    if shape is None or len(leaves) != 1:
        return
    given = tuple(leaves[0].shape)[1:] if batched else tuple(leaves[0].shape)
    if len(given) != len(shape) - 1:
        return
    if not batched and len(shape) == 4 and given[1:] == shape[1:3] and given[-1] != shape[-1]:
        raise InputError(
            f"The dataset's elements look like batches of grayscale images without a channel "
            f"axis. Received: element images of shape {tuple(leaves[0].shape)}, expected "
            f"{shape[1:]} per image or {shape} per batch. Add the axis: "
            "data.map(lambda image, *rest: (image[..., None], *rest)), then repeat it to the "
            f"model's {shape[-1]} channels if needed."
        )
    for axis, (want, got) in enumerate(zip(shape[1:], given, strict=True), start=1):
        if want is None or got is None or want == got:
            continue
        if axis == len(shape) - 1 and len(shape) == 4:
            raise InputError(
                f"The model expects {want} channels; the images of `data` have {got}. "
                f"Received: images of shape {tuple(leaves[0].shape)}, expected {shape}. "
                "Convert them, e.g. grayscale→RGB with np.repeat(images, 3, axis=-1) (or "
                "tf.image.grayscale_to_rgb in a dataset.map)."
            )
        raise InputError(
            f"Image axis {axis} has size {got} but the model expects {want}. Received: "
            f"images of shape {tuple(leaves[0].shape)}, expected {shape}. Resize the "
            "images to the model's input size (e.g. tf.image.resize in a dataset.map)."
        )


def _check_labels_spec(labels: Any, batched: bool) -> None:
    """The dtype and rank of labels used as targets, from an array or a TensorSpec."""
    require_labels(labels)
    leaves = keras.tree.flatten(labels)
    if len(leaves) != 1:
        raise TargetError(
            '`target="labels"` needs one label array (class indices or one-hot rows). '
            f"Received: labels structured as {keras.tree.map_structure(lambda _: '...', labels)}."
        )
    leaf = leaves[0]
    shape = tuple(leaf.shape)
    rank = len(shape) + (0 if batched else 1)
    check_label_kind(_dtype_kind(leaf.dtype), _dtype_name(leaf.dtype), shape, rank, batched)


def _dtype_kind(dtype: Any) -> str:
    """NumPy's kind letter of a NumPy or TensorFlow dtype ("U"/"O" for strings)."""
    if isinstance(dtype, tf.DType):
        return "O" if dtype == tf.string else np.dtype(dtype.as_numpy_dtype).kind
    return np.dtype(dtype).kind


def _dtype_name(dtype: Any) -> str:
    return dtype.name if isinstance(dtype, tf.DType) else str(np.dtype(dtype))


def _worker_index(strategy: tf.distribute.Strategy | None) -> int:
    """This worker's place in the cluster: the chief first, then the workers."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_id = getattr(resolver, "task_id", None)
    if task_id is None:
        return 0
    jobs = resolver.cluster_spec().as_dict()
    if resolver.task_type == "worker" and "chief" in jobs:
        return int(task_id) + 1
    return int(task_id)


def _worker_count(strategy: tf.distribute.Strategy | None) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    jobs = resolver.cluster_spec().as_dict()
    return max(1, sum(len(jobs.get(job, ())) for job in ("chief", "worker")))


def _is_array_data(data: Any) -> bool:
    return not isinstance(data, tf.data.Dataset)


def _split(element: Any) -> tuple[Any, Any, Any]:
    """`images`, `(images, labels)` or `(images, labels, extras)` → three parts."""
    if isinstance(element, tuple):
        if not 1 <= len(element) <= 3:
            raise InputError(
                "Data elements must be images, (images, labels) or (images, labels, extras); "
                f"received a tuple of {len(element)}."
            )
        images, labels, extras = element + (None,) * (3 - len(element))
        if labels is None and extras is not None:
            raise InputError("Data with extras needs labels: (images, labels, extras).")
        return images, labels, extras
    return element, None, None


def _image_rank(cam: GradCAM, images: Any) -> int:
    leaves = keras.tree.flatten(images)
    if not leaves:
        raise InputError("The data holds no images.")
    shape = leaves[0].shape
    if getattr(shape, "rank", 0) is None:
        expected = _model_shape(cam)
        example = expected[1:] if expected else "(height, width, channels)"
        raise InputError(
            "The dataset's images have an unknown rank (e.g. from tf.io.parse_tensor or a "
            f"py_function). Received: element images of shape {shape}. Give them their "
            f"shape: data.map(lambda image, *rest: (tf.ensure_shape(image, {example}), *rest))."
        )
    return len(shape)


def _model_rank(cam: GradCAM) -> int | None:
    if not cam.built:  # a Sequential model without inputs: learnt on first call
        return None
    return len(keras.tree.flatten(cam.gradient_model.inputs)[0].shape)


def _cardinality(cam: GradCAM, data: Any, batch_size: int, steps: int | None) -> int | None:
    """Number of batches when known, for the progress bar."""
    if isinstance(data, tf.data.Dataset):
        known = int(data.cardinality())
        total = known if known >= 0 else None
        images = _split(data.element_spec)[0]
        if total is not None and _image_rank(cam, images) == (_model_rank(cam) or 4) - 1:
            total = -(-total // batch_size)  # unbatched: counted in images
    else:
        n = len(keras.tree.flatten(_split(data)[0])[0])
        total = -(-n // batch_size)
    if steps is None:
        return total
    return steps if total is None else min(steps, total)


def _check_target(target: Any) -> None:
    if isinstance(target, str):
        if target != LABELS:
            raise TargetError(
                f'`target` may be the string "labels" (each image\'s label) and no other. '
                f"Received: target={target!r}."
            )
    elif isinstance(target, (Sequence, np.ndarray, tf.Tensor)):
        raise TargetError(
            "Per-image class lists are not accepted over a data set: put the classes in "
            'the data as labels, (images, labels), and pass target="labels".'
        )


# ------------------------------------------------------------ local batches


def _numpy(value: Any) -> Any:
    if value is None:
        return None
    return keras.tree.map_structure(
        lambda v: v.numpy() if isinstance(v, tf.Tensor) else np.asarray(v), value
    )


def _array_batches(data: Any, batch_size: int) -> Iterator[tuple[Any, Any, Any]]:
    images, labels, extras = _split(data)
    n = len(keras.tree.flatten(images)[0])
    for begin in range(0, n, batch_size):
        part = slice(begin, begin + batch_size)
        yield (
            keras.tree.map_structure(lambda a, p=part: np.asarray(a[p]), images),
            None if labels is None else np.asarray(labels[part]),
            None if extras is None else keras.tree.map_structure(lambda a, p=part: a[p], extras),
        )


def _batched_dataset(cam: GradCAM, dataset: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """The dataset in batches (ranks were checked by `_check_data`)."""
    images = _split(dataset.element_spec)[0]
    if _image_rank(cam, images) == (_model_rank(cam) or 4) - 1:
        dataset = dataset.batch(batch_size)
    return dataset


def _batch_length(images: Any) -> int:
    return len(keras.tree.flatten(images)[0])


def _check_batch_labels(labels: Any, count: int, number: int) -> None:
    """Every batch must carry one label per image."""
    if labels is None:
        return
    for leaf in keras.tree.flatten(labels):
        if len(leaf) != count:
            raise InputError(
                f"Batch {number} of `data` has {count} images but {len(leaf)} labels: give "
                f"one label per image. Received: labels of shape {np.shape(leaf)}. Zip "
                "images and labels before batching them (or batch both by the same size)."
            )


def _local_batches(
    cam: GradCAM, data: Any, target: Any, batch_size: int
) -> Iterator[tuple[np.ndarray, Any, Any, Any, Explanation | None]]:
    """Explain batch by batch on the default device with the public `GradCAM` call."""
    if _is_array_data(data):
        source = _array_batches(data, batch_size)
    else:
        dataset = _batched_dataset(cam, data, batch_size).prefetch(tf.data.AUTOTUNE)
        source = (_split(e) for e in dataset)
    offset = 0
    for number, (images, labels, extras) in enumerate(source):
        images, labels, extras = _numpy(images), _numpy(labels), _numpy(extras)
        count = _batch_length(images)
        _check_batch_labels(labels, count, number)
        positions = np.arange(offset, offset + count, dtype=np.int64)
        offset += count
        if count == 0:  # an empty batch of a batched dataset: nothing to explain
            yield positions, images, labels, extras, None
            continue
        if _is_labels(target):
            num_classes = cam.num_classes
            batch_target = classes_from_labels(labels, num_classes)
        else:
            batch_target = target
        yield positions, images, labels, extras, cam(images, batch_target)


def _is_labels(target: Any) -> bool:
    return isinstance(target, str) and target == LABELS


# ------------------------------------------------------ distributed batches


def _as_dataset(cam: GradCAM, data: Any, batch_size: int) -> tf.data.Dataset:
    """A batched dataset of the data; arrays are streamed by a generator."""
    if not _is_array_data(data):
        return _batched_dataset(cam, data, batch_size)
    first = next(_array_batches(data, batch_size))
    signature = tuple(
        None
        if part is None
        else keras.tree.map_structure(
            lambda a: tf.TensorSpec((None, *np.shape(a)[1:]), tf.as_dtype(np.asarray(a).dtype)),
            part,
        )
        for part in first
    )
    present = tuple(s for s in signature if s is not None)
    present_index = [i for i, s in enumerate(signature) if s is not None]

    def generate() -> Iterator[tuple]:
        for parts in _array_batches(data, batch_size):
            yield tuple(parts[i] for i in present_index)

    dataset = tf.data.Dataset.from_generator(generate, output_signature=present)
    if len(present) == 1:
        dataset = dataset.map(lambda images: images)
    return dataset


@tf.autograph.experimental.do_not_convert
def _number_images(offset: tf.Tensor, element: Any) -> tuple[tf.Tensor, tuple]:
    """`scan` step: pair a batch with the positions of its images in the data."""
    first = keras.tree.flatten(_split(element)[0])[0]
    count = tf.shape(first, out_type=tf.int64)[0]
    return offset + count, (tf.range(offset, offset + count), element)


def _with_positions(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`(positions, element)` batches, numbered before any split across workers.

    The positions are computed from the whole data set, then travel with the
    images through the split into replicas and workers. For them to be the
    positions in the whole data set, the workers must split it by elements:
    the auto-shard policy is set to `DATA` (every worker reads the data and
    keeps its share of each batch), whatever the dataset asked for: `FILE`
    would give each worker other files, whose positions no worker knows, and
    `OFF` every image to every worker.
    """
    numbered = dataset.scan(tf.constant(0, tf.int64), _number_images)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return numbered.with_options(options).prefetch(tf.data.AUTOTUNE)


def _step_spec(cam: GradCAM, target: Any) -> TargetSpec:
    num_classes = cam.num_classes
    if _is_labels(target):
        return resolve_target(np.zeros((1,), np.int32), None, num_classes)
    return resolve_target(target, None, num_classes)


def _replica_classes(spec: TargetSpec, target: Any, labels: Any, batch: tf.Tensor) -> tf.Tensor:
    if _is_labels(target):
        return tf.reshape(classes_from_labels(labels), [-1])
    if spec.kind == "classes":
        return tf.fill([batch], tf.constant(int(spec.classes[0]), tf.int32))
    return tf.zeros([batch], tf.int32)


def _pad_batch(value: tf.Tensor, missing: tf.Tensor) -> tf.Tensor:
    """`value` with `missing` (0 or 1) zero rows appended along the batch axis."""
    rank = value.shape.rank
    paddings = tf.concat([tf.stack([[0, missing]]), tf.zeros([rank - 1, 2], missing.dtype)], axis=0)
    return tf.pad(value, paddings)


def _run_replicas(strategy: tf.distribute.Strategy, replica_fn: Callable, element: Any) -> Any:
    images, labels, _ = _split(element)
    return strategy.run(replica_fn, args=(images, labels))


def _local_values(strategy: tf.distribute.Strategy, value: Any) -> Any:
    """This worker's parts of a per-replica structure, joined along the batch axis."""
    if value is None:
        return None
    parts = strategy.experimental_local_results(value)
    return keras.tree.map_structure(lambda *p: tf.concat(p, axis=0), *parts)


def _distributed_batches(
    cam: GradCAM, data: Any, target: Any, batch_size: int, strategy: tf.distribute.Strategy
) -> Iterator[tuple[np.ndarray, Any, Any, Any, Explanation]]:
    """Split each global batch across the replicas; return this worker's maps in order."""
    dataset = _as_dataset(cam, data, batch_size)
    if not cam.built:  # learn the input shape from one batch
        cam.build(_numpy(_split(next(iter(dataset)))[0]))
    dataset = _with_positions(dataset)
    signature = cam.input_signature()
    spec = _step_spec(cam, target)
    num_classes = cam.num_classes
    # the engine's compiled step for this target kind, traced once, outside the replicas
    step = cam.compiled_step(signature, spec)

    def replica_fn(images: Any, labels: Any) -> dict:
        images = keras.tree.map_structure(lambda x, s: tf.cast(x, s.dtype), images, signature)
        count = tf.shape(keras.tree.flatten(images)[0])[0]
        # A replica can receive 0 images (the last global batch split over more
        # replicas than it has images), and oneDNN's convolutions return a tensor
        # shaped like their input on an empty batch, which fails the next layer.
        # Every replica therefore explains at least one image: a zero image is
        # appended to an empty batch (tf.pad by max(1 - count, 0): no control
        # flow, a no-op otherwise) and its results are sliced off.
        missing = tf.maximum(1 - count, 0)
        images = keras.tree.map_structure(lambda x: _pad_batch(x, missing), images)
        classes = _pad_batch(_replica_classes(spec, target, labels, count), missing)
        return {key: value[:count] for key, value in step(images, classes).items()}

    with strategy.scope():
        distributed = strategy.experimental_distribute_dataset(dataset)

    # One trace for every batch: the signature has a free batch size per replica.
    # A partial (not a closure) keeps TensorFlow's retracing detector from pooling
    # the functions of successive runs.
    distributed_step = tf.function(
        functools.partial(_run_replicas, strategy, replica_fn),
        input_signature=[distributed.element_spec[1]],
        autograph=False,
    )
    for number, (positions, element) in enumerate(distributed):
        images, labels, extras = _split(element)
        local_images = _numpy(_local_values(strategy, images))
        local_labels = _numpy(_local_values(strategy, labels))
        _check_batch_labels(local_labels, _batch_length(local_images), number)
        if _is_labels(target):  # refuse bad labels here, with their values, not in the graph
            classes_from_labels(local_labels, num_classes)
        result = distributed_step(element)
        local = {key: _local_values(strategy, value) for key, value in result.items()}
        explanation = cam.to_explanation(local, spec).numpy()
        yield (
            _numpy(_local_values(strategy, positions)),
            local_images,
            local_labels,
            _numpy(_local_values(strategy, extras)),
            explanation,
        )


# ------------------------------------------------------------------ shards


def _find_files(folder: Path, pattern: re.Pattern, worker: int | None = None) -> list[Path]:
    """Files of `folder` whose whole name matches `pattern`, by (worker, batch)."""
    found = []
    for path in folder.iterdir():
        match = pattern.fullmatch(path.name)
        if match and (worker is None or int(match[1]) == worker) and path.is_file():
            found.append(((int(match[1]), int(match[2])), path))
    return [path for _, path in sorted(found)]


def _temp_path(path: Path) -> Path:
    """The temporary name of the shard `path` while it is written (not a shard name)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an `.npz` under a temporary name, sync it, then rename it to `path`.

    The temporary name does not match the shard pattern, so a shard is either
    complete under its final name or absent from `iter_shards`. On failure the
    temporary file is removed (where the OS allows) and the error re-raised.
    """
    temp = _temp_path(path)
    try:
        with open(temp, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _sync_folder(path.parent)


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def _write_error(error: OSError, path: Path, earlier: int) -> OSError:
    """The `OSError` of a failed shard write, saying why, what is left and what to do.

    Args:
        error: the error of the write.
        path: the shard's final path.
        earlier: the number of shards (of this worker) written before it.

    Returns:
        An `OSError` with the same `errno` (so the same subclass, e.g.
        `PermissionError` for `EACCES`), to be raised from `error`.
    """
    code = error.errno
    reason = error.strerror or str(error) or type(error).__name__
    if code in errno.errorcode:
        reason += f" ({errno.errorcode[code]})"
    if code in _NO_SPACE:
        fix = "Free space on that disk (or raise your quota there), or choose another `output_dir`"
    elif code in _NOT_WRITABLE:
        fix = "Make the folder writable, or choose another `output_dir`"
    else:
        fix = "Check the folder and its disk, or choose another `output_dir`"
    temp = _temp_path(path)
    left = (
        f"its partial file {temp.name} could not be removed: delete it"
        if temp.exists()
        else "no partial file of it is left"
    )
    message = (
        f"Could not write the shard {path.name} in the folder {str(path.parent)!r}: {reason}. "
        f"{fix}; rerunning into the same folder needs overwrite=True. The {earlier} shard(s) "
        f"written before it are complete (iter_shards reads them), no later one was written, "
        f"and {left}. Received: output_dir={str(path.parent)!r}."
    )
    return OSError(message) if code is None else OSError(code, message)


def _sync_folder(folder: Path) -> None:
    """Make a rename durable: fsync the folder where the platform allows it."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


class _ShardWriter:
    """Writes one `.npz` per batch on a background thread, at most two pending.

    The first failed write stops the writing: the shards queued after it are
    skipped, so the shards on disk are always the first batches, complete; the
    failure is raised by a later `write` (at most two later) or by `close`.
    """

    def __init__(
        self,
        output_dir: Any,
        worker: int,
        fields: tuple[str, ...],
        overwrite: bool,
        own_only: bool = False,
    ):
        self.folder = Path(output_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Under several workers sharing a folder, each one only looks at (and
        # deletes) its own shards: the others may already be writing theirs.
        owner = worker if own_only else None
        old = _find_files(self.folder, _SHARD_NAME, owner)
        if old and not overwrite:
            raise ValueError(
                f"`output_dir` {str(self.folder)!r} already holds {len(old)} shard(s) "
                f"(e.g. {old[0].name}); choose an empty folder or pass overwrite=True."
            )
        if overwrite:
            for path in old + _find_files(self.folder, _TEMP_NAME, owner):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        self.worker = worker
        self.fields = fields
        self.paths: list[str] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradcam-shards")
        self._pending: collections.deque[Future] = collections.deque()
        self._failed = False

    def write(self, batch: ExplainedBatch) -> None:
        arrays = {
            name: getattr(batch.explanation, name)
            for name in self.fields
            if getattr(batch.explanation, name) is not None
        }
        arrays["index"] = np.asarray(batch.positions, np.int64)
        if batch.labels is not None:
            arrays["labels"] = batch.labels
        path = self.folder / f"gradcam-{self.worker:03d}-{batch.index:06d}.npz"
        self._pending.append(self._pool.submit(self._write, path, arrays, len(self.paths)))
        self.paths.append(str(path))
        while len(self._pending) > 2:  # bound the memory held by queued shards
            self._pending.popleft().result()

    def _write(self, path: Path, arrays: dict[str, np.ndarray], earlier: int) -> None:
        """Write one shard (on the background thread), unless an earlier write failed."""
        if self._failed:
            return
        try:
            _write_atomically(path, arrays)
        except OSError as error:
            self._failed = True
            raise _write_error(error, path, earlier) from error
        except BaseException:
            self._failed = True
            raise

    def close(self) -> tuple[str, ...]:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)
        return tuple(self.paths)
