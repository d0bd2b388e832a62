"""explain_dataset: streamed shards and callbacks against direct GradCAM calls."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_cnn

from tf_gradcam import GradCAM, InputError, TargetError, TopK
from tf_gradcam.dataset import explain_dataset, iter_shards
from tf_gradcam.metrics import pointing_accuracy, pointing_game

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    """Ten random 16×16 RGB images and their labels 0, 1, 2, 0, ..."""
    rng = np.random.default_rng(5)
    return rng.random((10, 16, 16, 3), dtype=np.float32), np.arange(10) % 3


def _direct(cam: GradCAM, images: np.ndarray, labels: np.ndarray, batch: int) -> dict:
    """GradCAM called batch by batch on the same batches, results concatenated."""
    starts = range(0, len(images), batch)
    parts = [cam(images[i : i + batch], labels[i : i + batch]) for i in starts]
    return {
        name: np.concatenate([getattr(p, name) for p in parts])
        for name in ("heatmaps", "maps", "scores", "classes", "degenerate")
    }


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


def test_steps_stop_an_infinite_dataset(data):
    """`steps` bounds the number of batches of a repeated (infinite) dataset."""
    images, _ = data
    endless = tf.data.Dataset.from_tensor_slices(images).repeat()
    summary = explain_dataset(make_cnn(), endless, target=1, batch_size=4, steps=3, verbose=0)
    assert (summary.batches, summary.images) == (3, 12)


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


_MIRRORED_SCRIPT = """
import os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
from tf_gradcam import TopK
from tf_gradcam.dataset import explain_dataset, iter_shards

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
keras.utils.set_random_seed(0)
with strategy.scope():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu")(inputs)
    x = keras.layers.Conv2D(5, 3, activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
rng = np.random.default_rng(0)
images, labels = rng.random((9, 16, 16, 3), dtype=np.float32), np.arange(9) % 3
out = {out!r}
for i, target in enumerate(["labels", TopK(2)]):
    runs = {{}}
    for name, strat in (("plain", None), ("mirrored", strategy)):
        folder = os.path.join(out, f"{{name}}{{i}}")
        # 9 images in global batches of 4: the last batch leaves one replica empty
        explain_dataset(model, tf.data.Dataset.from_tensor_slices((images, labels)), target,
                        batch_size=4, strategy=strat, output_dir=folder, verbose=0)
        runs[name] = list(iter_shards(folder))
    assert len(runs["plain"]) == len(runs["mirrored"]) == 3
    for a, b in zip(runs["plain"], runs["mirrored"]):
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
print("OK")
"""


def test_mirrored_strategy_gives_the_same_maps(tmp_path):
    """MirroredStrategy on two logical CPUs writes the same shards as no strategy."""
    script = tmp_path / "mirrored.py"
    script.write_text(textwrap.dedent(_MIRRORED_SCRIPT.format(out=str(tmp_path))))
    env = dict(os.environ, PYTHONPATH=str(ROOT), KERAS_BACKEND="tensorflow")
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]
