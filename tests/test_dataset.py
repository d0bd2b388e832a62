"""explain_dataset: streamed shards and callbacks against direct GradCAM calls."""

from __future__ import annotations

import errno
import gc
import io
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_cnn

import tf_gradcam.dataset as dataset_module
from tf_gradcam import GradCAM, InputError, TargetError, TopK
from tf_gradcam.dataset import (
    _ShardWriter,
    _worker_count,
    _worker_index,
    explain_dataset,
    iter_shards,
)
from tf_gradcam.metrics import pointing_accuracy, pointing_game

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "dataset_workers"
FIELDS = ("heatmaps", "maps", "scores", "classes", "degenerate")


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    """Ten random 16×16 RGB images and their labels 0, 1, 2, 0, ..."""
    rng = np.random.default_rng(5)
    return rng.random((10, 16, 16, 3), dtype=np.float32), np.arange(10) % 3


def _direct(cam: GradCAM, images: np.ndarray, labels: np.ndarray, batch: int) -> dict:
    """GradCAM called batch by batch on the same batches, results concatenated."""
    starts = range(0, len(images), batch)
    parts = [cam(images[i : i + batch], labels[i : i + batch]) for i in starts]
    return {name: np.concatenate([getattr(p, name) for p in parts]) for name in FIELDS}


def _assert_equal_maps(got: dict, expected: dict) -> None:
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def _python(script: str, *args: str, **env: str) -> subprocess.Popen:
    """Start a helper script of tests/dataset_workers in a fresh interpreter."""
    environ = dict(os.environ, PYTHONPATH=str(ROOT), KERAS_BACKEND="tensorflow", **env)
    return subprocess.Popen(
        [sys.executable, str(WORKERS / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )


def _finish(processes: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """Wait for every process at most `timeout` seconds in all; kill them all past it."""
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            results.append((process.returncode, out, err))
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        tails = [process.communicate()[1][-2000:] for process in processes]
        pytest.fail(f"helper processes ran past {timeout} s and were killed: {tails}")
    return results


def _save_model_and_data(tmp_path: Path, n: int, seed: int) -> tuple:
    model = make_cnn()
    model.save(tmp_path / "model.keras")
    rng = np.random.default_rng(seed)
    images, labels = rng.random((n, 16, 16, 3), dtype=np.float32), np.arange(n) % 3
    np.savez(tmp_path / "data.npz", images=images, labels=labels)
    return model, images, labels


def test_shards_equal_direct_gradcam(data, tmp_path):
    """The .npz shards hold exactly the maps GradCAM gives on the same batches, in order."""
    images, labels = data
    model = make_cnn()
    summary = explain_dataset(
        model, (images, labels), "labels", batch_size=4, output_dir=tmp_path, verbose=0
    )
    assert (summary.images, summary.batches, len(summary.shards)) == (10, 3, 3)
    shards = list(iter_shards(tmp_path))
    assert [len(s["index"]) for s in shards] == [4, 4, 2]
    streamed = {name: np.concatenate([s[name] for s in shards]) for name in shards[0]}
    expected = _direct(GradCAM(model), images, labels, 4)
    for name, value in expected.items():
        np.testing.assert_allclose(streamed[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(streamed["index"], np.arange(10))
    np.testing.assert_array_equal(streamed["labels"], labels)


def test_dataset_batched_unbatched_and_memmap_agree(data, tmp_path):
    """A tf.data.Dataset, batched or not, and a memory-mapped array give the same maps."""
    images, labels = data
    np.save(tmp_path / "images.npy", images)
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    cam = GradCAM(make_cnn())
    sources = {
        "unbatched": tf.data.Dataset.from_tensor_slices((images, labels)),
        "batched": tf.data.Dataset.from_tensor_slices((images, labels)).batch(4),
        "memmap": (mapped, labels),
    }
    results = {}
    for name, source in sources.items():
        got = []
        explain_dataset(cam, source, target=TopK(2), batch_size=4, verbose=0, on_batch=got.append)
        results[name] = np.concatenate([b.explanation.heatmaps for b in got])
    assert results["memmap"].shape == (10, 2, 16, 16)
    for name in ("unbatched", "batched"):
        np.testing.assert_allclose(results[name], results["memmap"], atol=1e-7)
    np.testing.assert_allclose(
        results["memmap"], cam(images, TopK(2)).heatmaps, rtol=1e-5, atol=1e-6
    )
    assert cam.trace_count == 1  # one compiled step served every batch


def test_callback_batches_are_not_kept_alive(data):
    """Memory is bounded: each batch's arrays are freed once the next batch arrives."""
    images, labels = data
    alive: list[weakref.ref] = []
    seen = []

    def on_batch(batch):
        gc.collect()
        assert all(ref() is None for ref in alive), "an earlier batch is still referenced"
        alive.extend(weakref.ref(a) for a in (batch.explanation.heatmaps, batch.images))
        seen.append((batch.index, batch.offset, len(batch.labels)))

    summary = explain_dataset(
        make_cnn(), (images, labels), batch_size=3, on_batch=on_batch, verbose=0
    )
    assert seen == [(0, 0, 3), (1, 3, 3), (2, 6, 3), (3, 9, 1)]
    assert summary.images == 10 and summary.shards == ()
    gc.collect()
    assert all(ref() is None for ref in alive)


def test_pointing_game_accumulates_over_batches():
    """A per-batch callback computes the same pointing accuracy as one call on all maps."""
    from tf_gradcam.demo_model import load_demo_model
    from tf_gradcam.scenes import make_scenes

    scenes = make_scenes(12, seed=4)
    model = load_demo_model()
    data = tf.data.Dataset.from_tensor_slices((scenes.images, scenes.labels, scenes.masks[:, 0]))
    hits = []
    explain_dataset(
        model,
        data,
        "labels",
        batch_size=5,
        verbose=0,
        on_batch=lambda b: hits.append(pointing_game(b.explanation.heatmaps, b.extras)),
    )
    direct = GradCAM(model)(scenes.images, scenes.labels)
    expected = pointing_game(direct.heatmaps, scenes.masks[:, 0])
    assert 0 < expected.mean() < 1  # hits and misses: the comparison is not trivial
    np.testing.assert_array_equal(np.concatenate(hits), expected)
    assert pointing_accuracy(np.concatenate(hits)) == pointing_accuracy(expected)


def _concatenated(shards: list[dict]) -> dict:
    return {name: np.concatenate([s[name] for s in shards]) for name in shards[0]}


@pytest.mark.parametrize("steps", [2, np.int64(2)], ids=["int", "numpy-int"])
def test_steps_stop_an_infinite_dataset(data, tmp_path, steps):
    """`steps=2` on a repeated (infinite) dataset explains exactly two batches, GradCAM's maps."""
    images, labels = data[0][:3], data[1][:3]
    endless = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
    model = make_cnn()
    summary = explain_dataset(
        model, endless, "labels", batch_size=2, steps=steps, output_dir=tmp_path, verbose=0
    )
    assert (summary.batches, summary.images, len(summary.shards)) == (2, 4, 2)
    streamed = _concatenated(list(iter_shards(tmp_path)))
    order = [0, 1, 2, 0]  # the second batch wraps around to the first image
    _assert_equal_maps(streamed, _direct(GradCAM(model), images[order], labels[order], 2))
    np.testing.assert_array_equal(streamed["index"], np.arange(4))
    np.testing.assert_array_equal(streamed["labels"], labels[order])


@pytest.mark.parametrize(
    "steps", [0, -1, 1.5, True, np.int64(0), "2"], ids=["0", "-1", "1.5", "True", "np0", "str"]
)
def test_steps_must_be_a_positive_int(data, tmp_path, steps):
    """`steps` of 0, negative, fractional, bool or str: ValueError before anything runs."""
    images, _ = data
    out = tmp_path / "cams"
    seen = []
    with pytest.raises(ValueError, match=re.escape(f"Received: steps={steps!r}.")) as raised:
        explain_dataset(
            make_cnn(),
            images,
            batch_size=4,
            steps=steps,
            output_dir=out,
            on_batch=seen.append,
            verbose=0,
        )
    assert "`steps` must be a positive int" in str(raised.value)
    assert seen == [] and not out.exists()  # refused before any work


@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
def test_an_infinite_dataset_without_steps_is_refused(data, tmp_path, batched):
    """A repeated dataset without `steps` would never end: ValueError naming `steps=` up front."""
    images, _ = data
    endless = tf.data.Dataset.from_tensor_slices(images)
    endless = (endless.batch(4) if batched else endless).repeat()
    assert endless.cardinality() == tf.data.INFINITE_CARDINALITY
    out = tmp_path / "cams"

    def on_batch(batch):  # stops the run (instead of hanging) if the refusal is missing
        raise AssertionError("an infinite dataset was explained without `steps`")

    with pytest.raises(ValueError, match="steps=") as raised:
        explain_dataset(make_cnn(), endless, target=1, output_dir=out, on_batch=on_batch, verbose=0)
    message = str(raised.value)
    assert "infinite" in message and "Received: steps=None." in message
    assert not out.exists()  # refused before any work


def test_a_dataset_of_unknown_length_runs_to_its_end_without_steps(data):
    """A filtered dataset (unknown cardinality) may end: it runs without `steps`, every image."""
    images, labels = data
    kept = tf.data.Dataset.from_tensor_slices((images, labels)).filter(lambda x, y: y != 1)
    assert kept.cardinality() == tf.data.UNKNOWN_CARDINALITY
    model = make_cnn()
    got = []
    summary = explain_dataset(model, kept, "labels", batch_size=4, on_batch=got.append, verbose=0)
    mask = labels != 1
    assert (summary.images, summary.batches) == (mask.sum(), 2) == (7, 2)
    streamed = {f: np.concatenate([getattr(b.explanation, f) for b in got]) for f in FIELDS}
    _assert_equal_maps(streamed, _direct(GradCAM(model), images[mask], labels[mask], 4))
    np.testing.assert_array_equal(np.concatenate([b.positions for b in got]), np.arange(7))


def test_bad_arguments_are_refused(data, tmp_path):
    """Missing labels, per-image lists, generators, unknown fields and old shards are refused."""
    images, labels = data
    model = make_cnn()
    with pytest.raises(TargetError, match="labels"):
        explain_dataset(model, images, "labels", verbose=0)
    with pytest.raises(TargetError, match="Per-image"):
        explain_dataset(model, (images, labels), [0] * 10, verbose=0)
    with pytest.raises(InputError, match="Dataset"):
        explain_dataset(model, (image for image in images), verbose=0)
    with pytest.raises(ValueError, match="fields"):
        explain_dataset(model, images, fields=("heat",), verbose=0)
    explain_dataset(model, images, output_dir=tmp_path, verbose=0)
    with pytest.raises(ValueError, match="overwrite"):
        explain_dataset(model, images, output_dir=tmp_path, verbose=0)
    summary = explain_dataset(model, images, output_dir=tmp_path, overwrite=True, verbose=0)
    assert len(list(tmp_path.glob("*.npz"))) == len(summary.shards) == 1


# ------------------------------------------------------------------ labels and input checks


def test_one_hot_and_whole_float_labels_equal_integer_labels(data):
    """One-hot rows (float or int), whole-number floats and lists explain the labelled class."""
    images, labels = data
    cam = GradCAM(make_cnn())
    expected = _direct(cam, images, labels, 4)
    forms = {
        "one-hot float32": np.eye(3, dtype=np.float32)[labels],
        "one-hot int64": np.eye(3, dtype=np.int64)[labels],
        "column (batch, 1)": labels[:, None],
        "whole float64": labels.astype(np.float64),
        "list": labels.tolist(),
    }
    for name, given in forms.items():
        for source in ((images, given), tf.data.Dataset.from_tensor_slices((images, given))):
            if isinstance(given, list) and isinstance(source, tf.data.Dataset):
                continue
            got = []
            explain_dataset(cam, source, "labels", batch_size=4, verbose=0, on_batch=got.append)
            streamed = {f: np.concatenate([getattr(b.explanation, f) for b in got]) for f in FIELDS}
            np.testing.assert_array_equal(streamed["classes"], labels, err_msg=name)
            _assert_equal_maps(streamed, expected)


@pytest.mark.parametrize(
    ("labels", "error", "words"),
    [
        (np.full((10, 3), 1 / 3, np.float32), TargetError, "must be one-hot rows"),
        (np.eye(3)[np.arange(10) % 3] * 0.8 + 0.1 / 3, TargetError, "labels.argmax(-1)"),
        (np.full(10, 1.5), TargetError, "whole class numbers"),
        (np.full(10, np.nan, np.float32), TargetError, "whole class numbers"),
        (np.eye(4, dtype=np.float32)[np.arange(10) % 3], TargetError, "one column per class"),
        (np.full(10, 3), TargetError, "Label 3 is out of range"),
        (np.full(10, -1), TargetError, "Label -1 is out of range"),
        (np.array(["cat"] * 10), TargetError, "StringLookup"),
        (np.arange(10) % 2 == 0, TargetError, "dtype bool"),
        (np.zeros((10, 1, 3), np.float32), TargetError, "shape (10, 1, 3)"),
    ],
    ids=[
        "uniform-rows",
        "smoothed-rows",
        "fractional",
        "nan",
        "wrong-width",
        "too-large",
        "negative",
        "strings",
        "bool",
        "rank-3",
    ],
)
def test_bad_labels_are_refused(data, tmp_path, labels, error, words):
    """Labels that are neither class indices nor one-hot rows: a typed error, nothing written."""
    images, _ = data
    with pytest.raises(error, match="labels") as raised:
        explain_dataset(
            make_cnn(), (images, labels), "labels", batch_size=4, output_dir=tmp_path, verbose=0
        )
    assert words in str(raised.value)
    assert "Received: labels of dtype" in str(raised.value) or "row" in str(raised.value)
    assert list(iter_shards(tmp_path)) == []


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda x: x[..., 0], "images[..., None]"),
        (lambda x: tf.data.Dataset.from_tensor_slices(x[..., 0]), "image[..., None]"),
        (lambda x: tf.data.Dataset.from_tensor_slices(x[..., 0]).batch(4), "image[..., None]"),
        (lambda x: x[:, None], "Remove the extra axes"),
        (lambda x: tf.data.Dataset.from_tensor_slices(x[:, None]).batch(2), "extra axes"),
        (lambda x: x[..., :2], "expects 3 channels"),
        (lambda x: tf.data.Dataset.from_tensor_slices(x[:, :8]), "Resize the images"),
    ],
    ids=[
        "gray-arrays",
        "gray-dataset",
        "gray-batched-dataset",
        "5d-arrays",
        "5d-dataset",
        "channels",
        "size",
    ],
)
def test_images_that_do_not_fit_the_model_are_refused(data, make, words):
    """Grayscale without a channel axis, 5-D stacks, wrong channels or size: InputError up front."""
    images, _ = data
    with pytest.raises(InputError, match="Received: ") as raised:
        explain_dataset(make_cnn(), make(images), batch_size=4, verbose=0)
    assert words in str(raised.value)
    assert "(None, 16, 16, 3)" in str(raised.value)  # the model's input shape is named


def test_images_of_unknown_rank_are_refused(data):
    """Images without a static rank (e.g. parsed from records): InputError naming ensure_shape."""
    images, labels = data
    unknown = tf.data.Dataset.from_generator(
        lambda: iter(zip(images, labels, strict=True)),
        output_signature=(tf.TensorSpec(None, tf.float32), tf.TensorSpec((), tf.int64)),
    )
    with pytest.raises(InputError, match="unknown rank") as raised:
        explain_dataset(make_cnn(), unknown, "labels", verbose=0)
    assert "tf.ensure_shape(image, (16, 16, 3))" in str(raised.value)


def test_labels_of_the_wrong_length_are_refused(data, tmp_path):
    """Fewer or more labels (or extras) than images: InputError before anything is written."""
    images, labels = data
    model = make_cnn()
    cases = {
        "short": ((images, labels[:7]), "10 images but 7 labels"),
        "long": ((images, np.arange(12) % 3), "10 images but 12 labels"),
        "extras": ((images, labels, labels[:3]), "10 images but 3 extras"),
    }
    for name, (source, words) in cases.items():
        for target in ("labels", None):  # wrong even when the labels are only stored
            with pytest.raises(InputError, match="one per image") as raised:
                explain_dataset(model, source, target, output_dir=tmp_path, verbose=0)
            assert words in str(raised.value), name
            assert list(iter_shards(tmp_path)) == [], name
    zipped = tf.data.Dataset.zip(
        (
            tf.data.Dataset.from_tensor_slices(images).batch(4),
            tf.data.Dataset.from_tensor_slices(labels).batch(3),
        )
    )
    with pytest.raises(InputError, match="Batch 0 of `data` has 4 images but 3 labels"):
        explain_dataset(model, zipped, "labels", output_dir=tmp_path, verbose=0)


def test_an_empty_batch_of_a_batched_dataset_is_skipped(data, tmp_path):
    """A batched dataset may hold an empty batch: it yields no shard and no callback."""
    images, labels = data
    parts = [(images[:4], labels[:4]), (images[4:4], labels[4:4]), (images[4:], labels[4:])]
    source = tf.data.Dataset.from_tensors(parts[0])
    for part in parts[1:]:
        source = source.concatenate(tf.data.Dataset.from_tensors(part))
    cam = GradCAM(make_cnn())
    seen = []
    summary = explain_dataset(
        cam, source, "labels", output_dir=tmp_path, verbose=0, on_batch=seen.append
    )
    assert (summary.images, summary.batches) == (10, 2)
    assert [len(b.positions) for b in seen] == [4, 6]
    shards = list(iter_shards(tmp_path))
    np.testing.assert_array_equal(np.concatenate([s["index"] for s in shards]), np.arange(10))
    expected = {
        f: np.concatenate(
            [getattr(cam(images[s], labels[s]), f) for s in (slice(0, 4), slice(4, 10))]
        )
        for f in FIELDS
    }
    _assert_equal_maps({f: np.concatenate([s[f] for s in shards]) for f in FIELDS}, expected)


# ------------------------------------------------------------------ shard files


def test_overwrite_deletes_only_the_library_shards(data, tmp_path):
    """Only gradcam-NNN-NNNNNN.npz are shards: other files are never read, blocking or deleted."""
    images, labels = data
    model = make_cnn()
    mine = {
        "gradcam-summary.npz": {"mean": np.ones(3)},
        "gradcam-1-2.npz": {"x": np.zeros(1)},
        "gradcam-000-000001.npz.bak": {"x": np.zeros(1)},
        "notes-gradcam-000-000001.npz": {"x": np.zeros(1)},
    }
    for name, arrays in mine.items():
        with open(tmp_path / name, "wb") as file:
            np.savez(file, **arrays)
    summary = explain_dataset(model, (images, labels), batch_size=4, output_dir=tmp_path, verbose=0)
    assert len(list(iter_shards(tmp_path))) == len(summary.shards) == 3  # the user's are not shards
    with pytest.raises(ValueError, match="overwrite=True"):
        explain_dataset(model, images, output_dir=tmp_path, verbose=0)
    summary = explain_dataset(
        model, (images, labels), batch_size=5, output_dir=tmp_path, overwrite=True, verbose=0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*mine, "gradcam-000-000000.npz", "gradcam-000-000001.npz"]
    )
    with np.load(tmp_path / "gradcam-summary.npz") as kept:
        np.testing.assert_array_equal(kept["mean"], np.ones(3))
    shards = list(iter_shards(tmp_path))
    np.testing.assert_array_equal(np.concatenate([s["index"] for s in shards]), np.arange(10))


def test_multi_worker_numbering_and_overwrite_of_own_shards_only(tmp_path):
    """With a chief, workers are numbered after it; a worker deletes only its own old shards."""
    spec = tf.train.ClusterSpec({"chief": ["a:1"], "worker": ["b:1", "c:1"]})
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver
    places = {
        (kind, task): _worker_index(
            SimpleNamespace(cluster_resolver=resolver(spec, task_type=kind, task_id=task))
        )
        for kind, task in (("chief", 0), ("worker", 0), ("worker", 1))
    }
    assert places == {("chief", 0): 0, ("worker", 0): 1, ("worker", 1): 2}
    assert _worker_count(SimpleNamespace(cluster_resolver=resolver(spec, "worker", 1))) == 3
    assert (_worker_index(None), _worker_count(None)) == (0, 1)
    for name in ("gradcam-000-000000.npz", "gradcam-001-000000.npz", "gradcam-001-000001.npz"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / f".gradcam-001-000002.npz.{os.getpid()}.tmp").write_bytes(b"")
    with pytest.raises(ValueError, match="2 shard"):  # worker 1's own two, not worker 0's
        _ShardWriter(tmp_path, 1, FIELDS, overwrite=False, own_only=True)
    _ShardWriter(tmp_path, 1, FIELDS, overwrite=True, own_only=True).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gradcam-000-000000.npz"]


def _savez_failing_at(call: int, error: type[BaseException]):
    """np.savez that writes half of the `call`-th file (1-based), then raises `error`."""
    real = np.savez
    calls = []

    def savez(file, *args, **kwds):
        calls.append(file)
        if len(calls) != call:
            return real(file, *args, **kwds)
        buffer = io.BytesIO()
        real(buffer, *args, **kwds)
        handle = file if hasattr(file, "write") else open(file, "wb")
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        handle.flush()
        raise error("No space left on device")

    return savez


@pytest.mark.parametrize("error", [OSError, RuntimeError])
def test_a_failed_write_leaves_only_complete_shards(data, tmp_path, monkeypatch, error):
    """A shard that fails half-way is never visible to iter_shards; the error reaches the caller.

    An OSError is reworded (naming the shard); any other error passes unchanged.
    Either way no later shard is written.
    """
    images, labels = data
    cam = GradCAM(make_cnn())
    monkeypatch.setattr(np, "savez", _savez_failing_at(2, error))
    with pytest.raises(error, match="No space left") as raised:
        explain_dataset(
            cam, (images, labels), "labels", batch_size=4, output_dir=tmp_path, verbose=0
        )
    monkeypatch.undo()
    named = "gradcam-000-000001.npz" in str(raised.value)
    assert named == (error is OSError) and type(raised.value) is error
    # batch 1 failed: batch 2, already queued, was not written (the shards stay a prefix)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gradcam-000-000000.npz"]
    [shard] = list(iter_shards(tmp_path))
    np.testing.assert_array_equal(shard["index"], np.arange(4))
    _assert_equal_maps(shard, _direct(cam, images[:4], labels[:4], 4))


class _FailingFile:
    """A binary file on a disk that fails: at `stage` ("write" or "flush"), OSError(`code`).

    A failing write first writes part of the data, as a disk that fills up does.
    """

    def __init__(self, file: io.BufferedWriter, code: int, stage: str):
        self.file, self.code, self.stage = file, code, stage

    def _fail(self) -> None:
        raise OSError(self.code, os.strerror(self.code))

    def write(self, data: bytes) -> int:
        if self.stage == "write" and self.file.tell() + len(data) > 200:
            self.file.write(bytes(data)[: max(0, 200 - self.file.tell())])
            self.file.flush()
            self._fail()
        return self.file.write(data)

    def flush(self) -> None:
        if self.stage == "flush":
            self._fail()
        self.file.flush()

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self) -> _FailingFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.file.close()


def _open_failing_at(shard: int, code: int, stage: str):
    """`open` whose `shard`-th temporary shard file (1-based) fails at `stage` with `code`."""
    temps = []

    def fake_open(file, mode="r", *args, **kwargs):
        if not str(file).endswith(".tmp"):
            return open(file, mode, *args, **kwargs)
        temps.append(file)
        if len(temps) != shard:
            return open(file, mode, *args, **kwargs)
        if stage == "open":
            raise OSError(code, os.strerror(code), str(file))
        return _FailingFile(open(file, mode, *args, **kwargs), code, stage)

    return fake_open


@pytest.mark.parametrize(
    ("code", "stage", "fix"),
    [
        (errno.ENOSPC, "write", "Free space on that disk"),
        (errno.EDQUOT, "flush", "raise your quota"),
        (errno.EROFS, "open", "Make the folder writable"),
        (errno.EACCES, "open", "Make the folder writable"),
    ],
    ids=["ENOSPC-write", "EDQUOT-flush", "EROFS-open", "EACCES-open"],
)
def test_a_full_disk_is_a_clear_oserror_after_complete_shards(
    data, tmp_path, monkeypatch, code, stage, fix
):
    """The 3rd shard cannot be written: an OSError (same errno) naming shard, folder, reason, fix.

    No temporary file is left, no later shard is written, and iter_shards reads
    exactly the first two shards, with GradCAM's maps.
    """
    images, labels = data
    model = make_cnn()
    out = tmp_path / "cams"
    monkeypatch.setattr(dataset_module, "open", _open_failing_at(3, code, stage), raising=False)
    with pytest.raises(OSError) as raised:
        explain_dataset(model, (images, labels), "labels", batch_size=2, output_dir=out, verbose=0)
    monkeypatch.undo()
    error = raised.value
    assert error.errno == code and type(error) is type(OSError(code, ""))  # e.g. PermissionError
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == code
    message = str(error)
    for words in (
        "shard gradcam-000-000002.npz",
        f"in the folder {str(out)!r}",
        f"{os.strerror(code)} ({errno.errorcode[code]})",
        fix,
        "or choose another `output_dir`",
        "The 2 shard(s) written before it are complete",
        "no partial file of it is left",
        f"Received: output_dir={str(out)!r}.",
    ):
        assert words in message, (words, message)
    # no temporary file, no later shard: only the first two, complete
    assert sorted(p.name for p in out.iterdir()) == [
        "gradcam-000-000000.npz",
        "gradcam-000-000001.npz",
    ]
    shards = list(iter_shards(out))
    assert len(shards) == 2
    direct = GradCAM(model)
    for number, shard in enumerate(shards):
        part = slice(2 * number, 2 * number + 2)
        np.testing.assert_array_equal(shard["index"], np.arange(10)[part])
        np.testing.assert_array_equal(shard["labels"], labels[part])
        _assert_equal_maps(shard, _direct(direct, images[part], labels[part], 2))


def test_a_process_killed_mid_shard_leaves_only_complete_shards(tmp_path):
    """SIGKILL half-way through the second shard: only the first is read back, and it is whole."""
    if not hasattr(signal, "SIGKILL"):
        pytest.skip("needs POSIX signals")
    model, images, labels = _save_model_and_data(tmp_path, 10, seed=11)
    out = tmp_path / "shards"
    [(code, stdout, stderr)] = _finish(
        [
            _python(
                "kill_mid_shard.py",
                str(tmp_path / "model.keras"),
                str(tmp_path / "data.npz"),
                str(out),
            )
        ],
        timeout=120,
    )
    assert code == -signal.SIGKILL, (code, stdout, stderr[-3000:])
    names = sorted(p.name for p in out.iterdir())
    # the half-written shard exists, under its temporary name only
    assert names[0].startswith(".gradcam-000-000001.npz.") and names[0].endswith(".tmp"), names
    assert names[1:] == ["gradcam-000-000000.npz"], names
    [shard] = list(iter_shards(out))
    np.testing.assert_array_equal(shard["index"], np.arange(4))
    _assert_equal_maps(shard, _direct(GradCAM(model), images[:4], labels[:4], 4))


# ------------------------------------------------------------------ tf.distribute


def test_onednn_empty_batch_conv_bug_is_still_there(record_property):
    """Pin of the TensorFlow/oneDNN bug that the replica padding of explain_dataset works around.

    oneDNN's Conv2D/DepthwiseConv2D of an empty batch return a tensor shaped like
    their input. Runs with the environment as given: with oneDNN active, when
    TensorFlow returns the right (0, 14, 14, 6), this test fails so that the
    workaround and its known-issues entry are removed; with oneDNN off, the
    shapes must be right.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the oneDNN CPU kernels in question are x86 ones")
    [(code, stdout, stderr)] = _finish([_python("onednn_empty_conv.py")], timeout=120)
    assert code == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    shapes = report["shapes"]
    if report["onednn"] is False:  # oneDNN off (CI's second pass, or a CPU where it is off)
        assert all(shape == [0, 14, 14, 6] for shape in shapes.values()), shapes
        return
    buggy = [name for name, shape in shapes.items() if shape == [0, 16, 16, 3]]
    state = f"TensorFlow {report['tensorflow']}: empty-batch oneDNN convolutions {shapes}"
    record_property("onednn_empty_batch_conv", "buggy" if buggy else "fixed")
    print(state)
    if all(shape == [0, 14, 14, 6] for shape in shapes.values()):
        pytest.fail(
            "TensorFlow fixed the empty-batch oneDNN conv bug: remove the padding in "
            f"dataset.py and docs/known-issues.md entry. {state}"
        )
    assert buggy, f"unexpected shapes, neither the bug nor the fix: {state}"


def test_mirrored_strategy_gives_the_same_maps(tmp_path):
    """MirroredStrategy on two logical CPUs, 1, 5, 8 and 9 images: maps equal GradCAM's.

    In global batches of 4, the last batch of 1, 5 and 9 images leaves one of the
    two replicas empty (checked, so the case stays covered); under TensorFlow's
    default oneDNN kernels that failed before the replicas were padded.
    """
    [(code, stdout, stderr)] = _finish([_python("mirrored.py", str(tmp_path))], timeout=240)
    assert code == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["splits"] == {"1": [1, 0], "5": [1, 0], "8": [2, 2], "9": [1, 0]}
    assert report["failures"] == [], "\n".join(report["failures"])


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("localhost", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def test_multi_worker_shards_hold_every_image_once(tmp_path):
    """Two MultiWorkerMirroredStrategy workers: the union of their shards is the data set.

    Nine images in global batches of 4 over two workers: worker 0 gets images
    0-1, 4-5, 8 and worker 1 gets 2-3, 6-7 and an empty last share. Every image
    appears exactly once, at its global position in `index`, with GradCAM's maps,
    whether the data are a dataset, arrays or two TFRecord files whose dataset
    asks for `AutoShardPolicy.FILE` (a split by file, whose global positions no
    worker would know); stale shards of an earlier run are replaced
    (`overwrite=True`).
    """
    model, images, labels = _save_model_and_data(tmp_path, 9, seed=7)
    records = [str(tmp_path / f"data-{i}.tfrecord") for i in (0, 1)]
    for path, part in zip(records, (slice(0, 5), slice(5, 9)), strict=True):
        with tf.io.TFRecordWriter(path) as writer:
            for image, label in zip(images[part], labels[part], strict=True):
                feature = {
                    "image": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[tf.io.serialize_tensor(image).numpy()])
                    ),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                }
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())
    out = tmp_path / "out"
    for run in ("dataset", "arrays", "files"):  # shards of an earlier run, of both workers
        (out / run).mkdir(parents=True)
        for worker in (0, 1):
            np.savez(out / run / f"gradcam-{worker:03d}-000007.npz", index=np.arange(3))
    config = {
        "ports": _free_ports(2),
        "model": str(tmp_path / "model.keras"),
        "data": str(tmp_path / "data.npz"),
        "records": records,
        "out": str(out),
        "batch_size": 4,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    workers = [_python("multi_worker.py", str(tmp_path / "config.json"), str(i)) for i in (0, 1)]
    results = _finish(workers, timeout=150)
    for code, _, stderr in results:
        assert code == 0, stderr[-3000:]
    reports = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in results]
    assert [r["replicas"] for r in reports] == [2, 2]
    expected = GradCAM(model)(images, labels)
    one_hot = np.eye(3, dtype=np.float32)[labels]
    for run, stored_labels in (("dataset", labels), ("arrays", one_hot), ("files", labels)):
        assert [r[run] for r in reports] == [
            {"images": 5, "batches": 3},
            {"images": 4, "batches": 2},
        ]
        names = sorted(p.name for p in (out / run).iterdir())
        assert names == [f"gradcam-000-00000{i}.npz" for i in range(3)] + [
            f"gradcam-001-00000{i}.npz" for i in range(2)
        ]
        shards = list(iter_shards(out / run))
        union = {name: np.concatenate([s[name] for s in shards]) for name in shards[0]}
        np.testing.assert_array_equal(union["index"], [0, 1, 4, 5, 8, 2, 3, 6, 7])
        order = np.argsort(union["index"])
        np.testing.assert_array_equal(union["index"][order], np.arange(9))  # each image once
        np.testing.assert_array_equal(union["labels"][order], stored_labels)
        _assert_equal_maps(
            {name: value[order] for name, value in union.items()},
            {name: getattr(expected, name) for name in FIELDS},
        )


def test_a_partial_file_that_cannot_be_removed_is_named(data, tmp_path, monkeypatch):
    """If even the partial file cannot be deleted, the error names it; iter_shards skips it."""
    images, labels = data
    model = make_cnn()
    out = tmp_path / "cams"
    monkeypatch.setattr(
        dataset_module, "open", _open_failing_at(3, errno.ENOSPC, "write"), raising=False
    )
    unlink = Path.unlink

    def stuck_unlink(path, *args, **kwargs):
        if path.name.endswith(".tmp"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", stuck_unlink)
    with pytest.raises(OSError) as raised:
        explain_dataset(model, (images, labels), "labels", batch_size=2, output_dir=out, verbose=0)
    monkeypatch.undo()
    temp = f".gradcam-000-000002.npz.{os.getpid()}.tmp"
    assert raised.value.errno == errno.ENOSPC
    assert f"its partial file {temp} could not be removed: delete it" in str(raised.value)
    assert sorted(p.name for p in out.iterdir()) == [
        temp,
        "gradcam-000-000000.npz",
        "gradcam-000-000001.npz",
    ]
    shards = list(iter_shards(out))
    np.testing.assert_array_equal(np.concatenate([s["index"] for s in shards]), np.arange(4))
    _assert_equal_maps(_concatenated(shards), _direct(GradCAM(model), images[:4], labels[:4], 2))
