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
explains its own shard of the data and writes its own files, named after its
task id.
"""

from __future__ import annotations

import collections
import functools
import os
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
from tf_gradcam.targets import Target, TargetSpec, resolve_target

__all__ = ["DatasetSummary", "ExplainedBatch", "explain_dataset", "iter_shards"]

#: The `Explanation` fields that can be saved to shards.
FIELDS = ("heatmaps", "maps", "raw_maps", "weights", "scores", "classes", "degenerate")
_DEFAULT_FIELDS = ("heatmaps", "maps", "scores", "classes", "degenerate")
_SHARD_GLOB = "gradcam-*.npz"
_LABELS = "labels"


@dataclass(frozen=True)
class ExplainedBatch:
    """One batch of a data set with its Grad-CAM explanation, as passed to `on_batch`.

    Attributes:
        index: batch number, from 0.
        offset: position of the batch's first image in the (this worker's) data.
        images: the batch's images as NumPy, `(batch, height, width, channels)`
            (a dict of arrays for multi-input models).
        labels: the labels that came with the images, as NumPy, or `None`.
        extras: anything else the data carried per image (the third element of
            `(images, labels, extras)`, e.g. ground-truth masks), as NumPy, or `None`.
        explanation: the batch's `Explanation`, NumPy arrays.
    """

    index: int
    offset: int
    images: Any
    labels: Any
    extras: Any
    explanation: Explanation


@dataclass(frozen=True)
class DatasetSummary:
    """What `explain_dataset` returns: counts and file names, never the maps.

    Attributes:
        images: number of images explained.
        batches: number of batches.
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
    **options: Any,
) -> DatasetSummary:
    """Explain every image of a data set, streaming each batch's maps to disk or a callback.

    Args:
        model: a `keras.Model`, or a `GradCAM` already built (then `layer` and
            `options` must be left out).
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
            label, given as a class index or a one-hot row (argmax).
        layer: the layer to explain (name, path, `Layer` or `None`).
        batch_size: images per batch for unbatched data and arrays; under a
            strategy, the *global* batch, split across the replicas.
        output_dir: folder for the shards `gradcam-<worker>-<batch>.npz`, one per
            batch, each with the chosen `fields`, `index` (each image's position
            in the data) and `labels` when the data has labels. Created if
            missing. `None` writes nothing.
        on_batch: called with an `ExplainedBatch` after each batch, e.g. to
            accumulate a metric; it should not keep the arrays if memory matters.
        fields: the `Explanation` fields written to the shards.
        strategy: a `tf.distribute.Strategy` to run the replicas of; `None` runs
            on the default device.
        steps: stop after this many batches (needed for an infinite dataset).
        overwrite: delete earlier shards found in `output_dir` instead of failing.
        verbose: 1 shows a `keras.utils.Progbar`, 0 is silent.
        **options: keyword options of `GradCAM` (with a model).

    Returns:
        A `DatasetSummary` (counts, shard paths, wall time), never the maps.

    Raises:
        InputError: the data is neither a dataset nor arrays, or its images
            do not fit the model.
        TargetError: `target="labels"` without labels, or labels that are
            not class indices or one-hot rows.
        ValueError: an unknown field, `batch_size < 1`, or earlier shards in
            `output_dir` without `overwrite=True`.

    Example:
        >>> hits = []
        >>> def point(batch):
        ...     hits.append(metrics.pointing_game(batch.explanation.heatmaps, batch.extras[:, 0]))
        >>> data = tf.data.Dataset.from_tensor_slices((images, labels, masks))
        >>> explain_dataset(model, data, target="labels", on_batch=point, output_dir="cams")
        >>> metrics.pointing_accuracy(np.concatenate(hits))
    """
    start = time.perf_counter()
    cam = _explainer(model, layer, options)
    fields = _check_fields(fields)
    _check_target(target)
    if isinstance(data, list):  # a list of images
        data = np.asarray(data)
    _check_data(data)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}."
        )
    worker = _worker_index(strategy)
    writer = _ShardWriter(output_dir, worker, fields, overwrite) if output_dir is not None else None
    total = _cardinality(cam, data, batch_size, steps)
    progbar = keras.utils.Progbar(total, unit_name="batch") if verbose else None
    if strategy is None:
        batches = _local_batches(cam, data, target, batch_size)
    else:
        batches = _distributed_batches(cam, data, target, batch_size, strategy)
    offset = count = 0
    try:
        for count, (images, labels, extras, explanation) in enumerate(batches, start=1):
            batch = ExplainedBatch(count - 1, offset, images, labels, extras, explanation)
            offset += len(explanation.scores)
            if writer is not None:
                writer.write(batch)
            if on_batch is not None:
                on_batch(batch)
            del batch, images, labels, extras, explanation  # hold nothing between batches
            if progbar is not None:
                progbar.update(count)
            if steps is not None and count >= steps:
                break
    finally:
        batches.close()
        shards = writer.close() if writer is not None else ()
    return DatasetSummary(offset, count, shards, time.perf_counter() - start)


def iter_shards(output_dir: str | os.PathLike) -> Iterator[dict[str, np.ndarray]]:
    """Read back the shards of `explain_dataset`, one dict of arrays per shard, in order.

    Args:
        output_dir: the folder given to `explain_dataset`.

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
    for path in sorted(folder.glob(_SHARD_GLOB)):
        with np.load(path) as shard:
            yield {name: shard[name] for name in shard.files}


# ------------------------------------------------------------------ set-up


def _explainer(model: Any, layer: Any, options: dict) -> GradCAM:
    if isinstance(model, GradCAM):
        if layer is not None or options:
            raise ValueError(
                "Pass `layer` and GradCAM options when giving a model, not with a built "
                f"GradCAM. Received: layer={layer!r}, options={sorted(options)}."
            )
        return model
    return GradCAM(model, layer, **options)


def _check_fields(fields: Sequence[str]) -> tuple[str, ...]:
    fields = (fields,) if isinstance(fields, str) else tuple(fields)
    unknown = [f for f in fields if f not in FIELDS]
    if unknown or not fields:
        raise ValueError(f"`fields` must be a non-empty subset of {FIELDS}. Received: {fields!r}.")
    return fields


def _check_data(data: Any) -> None:
    if isinstance(data, tf.data.Dataset):
        return
    leaves = keras.tree.flatten(_split(data)[0])
    if not leaves or not all(hasattr(a, "shape") and hasattr(a, "__getitem__") for a in leaves):
        raise InputError(
            "`data` must be a tf.data.Dataset or arrays: images, (images, labels) or "
            f"(images, labels, extras). Received: {type(data).__name__}. Wrap a generator "
            "in tf.data.Dataset.from_generator."
        )


def _worker_index(strategy: tf.distribute.Strategy | None) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    task_id = getattr(resolver, "task_id", None)
    return int(task_id) if task_id is not None else 0


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
    return len(leaves[0].shape)


def _model_rank(cam: GradCAM) -> int | None:
    if cam._gradient_model is None:  # a Sequential model without inputs: learnt on first call
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
        if target != _LABELS:
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
    images = _split(dataset.element_spec)[0]
    rank = _image_rank(cam, images)
    model_rank = _model_rank(cam) or 4
    if rank == model_rank - 1:
        dataset = dataset.batch(batch_size)
    elif rank != model_rank:
        raise InputError(
            f"The dataset's images have rank {rank}; the model takes rank {model_rank} "
            "batches. Elements must be single images or batches of them."
        )
    return dataset.prefetch(tf.data.AUTOTUNE)


def _classes_from_labels(labels: Any) -> Any:
    """Class indices `(batch,)` from integer labels or one-hot rows."""
    if labels is None:
        raise TargetError(
            '`target="labels"` needs data with labels: elements (images, labels) or '
            "(images, labels, extras)."
        )
    if isinstance(labels, tf.Tensor) and not tf.executing_eagerly():
        if labels.shape.rank == 2 and labels.shape[-1] != 1:
            return tf.cast(tf.argmax(labels, axis=-1), tf.int32)
        return tf.cast(tf.reshape(labels, [-1]), tf.int32)
    array = np.asarray(labels)
    if array.ndim == 2 and array.shape[-1] != 1:
        return np.argmax(array, axis=-1).astype(np.int32)
    if array.ndim == 2:
        array = array[:, 0]
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise TargetError(
            '`target="labels"` needs integer class labels (batch,) or one-hot rows '
            f"(batch, classes). Received labels of shape {array.shape}, dtype {array.dtype}."
        )
    return array.astype(np.int32)


def _local_batches(
    cam: GradCAM, data: Any, target: Any, batch_size: int
) -> Iterator[tuple[Any, Any, Any, Explanation]]:
    """Explain batch by batch on the default device with the public `GradCAM` call."""
    if _is_array_data(data):
        source = _array_batches(data, batch_size)
    else:
        source = (_split(e) for e in _batched_dataset(cam, data, batch_size))
    for images, labels, extras in source:
        images, labels, extras = _numpy(images), _numpy(labels), _numpy(extras)
        batch_target = _classes_from_labels(labels) if _is_labels(target) else target
        yield images, labels, extras, cam(images, batch_target)


def _is_labels(target: Any) -> bool:
    return isinstance(target, str) and target == _LABELS


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
    options = tf.data.Options()
    # a generator cannot be split by files: every worker reads it and keeps its share
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def _step_spec(cam: GradCAM, target: Any) -> TargetSpec:
    num_classes = cam._num_classes()
    if _is_labels(target):
        return resolve_target(np.zeros((1,), np.int32), None, num_classes)
    return resolve_target(target, None, num_classes)


def _replica_classes(spec: TargetSpec, target: Any, labels: Any, batch: tf.Tensor) -> tf.Tensor:
    if _is_labels(target):
        return tf.reshape(_classes_from_labels(labels), [-1])
    if spec.kind == "classes":
        return tf.fill([batch], tf.constant(int(spec.classes[0]), tf.int32))
    return tf.zeros([batch], tf.int32)


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
) -> Iterator[tuple[Any, Any, Any, Explanation]]:
    """Split each global batch across the replicas; return the maps in order."""
    dataset = _as_dataset(cam, data, batch_size)
    if cam._gradient_model is None:  # learn the input shape from one batch
        cam._prepare(_numpy(_split(next(iter(dataset)))[0]))
    signature = keras.tree.map_structure(
        lambda t: tf.TensorSpec((None, *t.shape[1:]), t.dtype), cam.gradient_model.inputs
    )
    spec = _step_spec(cam, target)
    # the engine's compiled step for this target kind, traced once, outside the replicas
    step = cam._function(signature, spec)

    def replica_fn(images: Any, labels: Any) -> dict:
        images = keras.tree.map_structure(lambda x, s: tf.cast(x, s.dtype), images, signature)
        batch = tf.shape(keras.tree.flatten(images)[0])[0]
        return step(images, _replica_classes(spec, target, labels, batch))

    with strategy.scope():
        distributed = strategy.experimental_distribute_dataset(dataset)

    # One trace for every batch: the signature has a free batch size per replica.
    # A partial (not a closure) keeps TensorFlow's retracing detector from pooling
    # the functions of successive runs.
    distributed_step = tf.function(
        functools.partial(_run_replicas, strategy, replica_fn),
        input_signature=[distributed.element_spec],
        autograph=False,
    )
    for element in distributed:
        images, labels, extras = _split(element)
        result = distributed_step(element)
        local = {key: _local_values(strategy, value) for key, value in result.items()}
        explanation = cam._explanation(local, spec).numpy()
        yield (
            _numpy(_local_values(strategy, images)),
            _numpy(_local_values(strategy, labels)),
            _numpy(_local_values(strategy, extras)),
            explanation,
        )


# ------------------------------------------------------------------ shards


class _ShardWriter:
    """Writes one `.npz` per batch on a background thread, at most two pending."""

    def __init__(self, output_dir: Any, worker: int, fields: tuple[str, ...], overwrite: bool):
        self.folder = Path(output_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        old = sorted(self.folder.glob(_SHARD_GLOB))
        if old and not overwrite:
            raise ValueError(
                f"`output_dir` {str(self.folder)!r} already holds {len(old)} shard(s) "
                f"(e.g. {old[0].name}); choose an empty folder or pass overwrite=True."
            )
        for path in old:
            path.unlink()
        self.worker = worker
        self.fields = fields
        self.paths: list[str] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradcam-shards")
        self._pending: collections.deque[Future] = collections.deque()

    def write(self, batch: ExplainedBatch) -> None:
        arrays = {
            name: getattr(batch.explanation, name)
            for name in self.fields
            if getattr(batch.explanation, name) is not None
        }
        n = len(batch.explanation.scores)
        arrays["index"] = np.arange(batch.offset, batch.offset + n)
        if batch.labels is not None:
            arrays["labels"] = batch.labels
        path = self.folder / f"gradcam-{self.worker:03d}-{batch.index:06d}.npz"
        self.paths.append(str(path))
        self._pending.append(self._pool.submit(np.savez, path, **arrays))
        while len(self._pending) > 2:  # bound the memory held by queued shards
            self._pending.popleft().result()

    def close(self) -> tuple[str, ...]:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)
        return tuple(self.paths)
