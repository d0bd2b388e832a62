"""`explain_dataset` under MirroredStrategy on two logical CPUs, against direct GradCAM calls.

Usage: python mirrored.py OUT_DIR

For 1, 5, 8 and 9 images in global batches of 4 (so that the last batch of 1,
5 and 9 images leaves one of the two replicas with no image), the shards of
`explain_dataset(strategy=MirroredStrategy)` with `target="labels"` are
compared with `GradCAM` called directly on the same batches, and with
`explain_dataset` without a strategy; for 9 images also one-hot labels from
arrays, `TopK(2)` and a fixed class. Bad labels must be refused with the same
typed errors as without a strategy. Prints one JSON line: the per-replica
sizes of each last batch, and the failures (none when all is well).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tf_gradcam import GradCAM, InputError, TargetError, TopK  # noqa: E402
from tf_gradcam.dataset import explain_dataset, iter_shards  # noqa: E402

BATCH = 4
FIELDS = ("heatmaps", "maps", "raw_maps", "weights", "scores", "classes", "degenerate")
out = sys.argv[1]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
keras.utils.set_random_seed(0)
with strategy.scope():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu")(inputs)
    x = keras.layers.Conv2D(5, 3, activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, kernel_initializer=keras.initializers.RandomUniform(-0.5, 1))(x)
    model = keras.Model(inputs, outputs)
cam = GradCAM(model)
failures: list[str] = []
splits: dict[int, list[int]] = {}


def direct(images: np.ndarray, target: object) -> dict:
    """GradCAM called on each batch of BATCH images, results concatenated."""
    parts = []
    for begin in range(0, len(images), BATCH):
        batch_target = target[begin : begin + BATCH] if isinstance(target, np.ndarray) else target
        parts.append(cam(images[begin : begin + BATCH], batch_target))
    return {name: np.concatenate([getattr(p, name) for p in parts]) for name in FIELDS}


def shards(folder: str) -> dict:
    read = list(iter_shards(folder))
    return {name: np.concatenate([s[name] for s in read]) for name in read[0]}


def compare(label: str, got: dict, expected: dict) -> None:
    for name, value in expected.items():
        try:
            if value.dtype.kind in "biu":
                np.testing.assert_array_equal(got[name], value)
            else:
                np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6)
        except AssertionError as error:
            failures.append(f"{label} {name}: {str(error)[:400]}")


for n in (1, 5, 8, 9):
    rng = np.random.default_rng(n)
    images = rng.random((n, 16, 16, 3), dtype=np.float32)
    labels = np.arange(n) % 3
    one_hot = np.eye(3, dtype=np.float32)[labels]
    # how MirroredStrategy splits the last global batch between the two replicas
    dist = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(images).batch(BATCH)
    )
    last = list(dist)[-1]
    splits[n] = [int(t.shape[0]) for t in strategy.experimental_local_results(last)]
    runs = {"labels": (tf.data.Dataset.from_tensor_slices((images, labels)), "labels", labels)}
    if n == 9:  # the other target kinds and array data, on the largest case
        runs["one-hot"] = ((images, one_hot), "labels", labels)
        runs["top2"] = (tf.data.Dataset.from_tensor_slices(images), TopK(2), TopK(2))
        runs["class1"] = ((images, labels), 1, 1)
    for name, (data, target, direct_target) in runs.items():
        label = f"n={n} {name}"
        results = {}
        for mode, strat in (("plain", None), ("mirrored", strategy)):
            folder = os.path.join(out, f"{mode}-{n}-{name}")
            try:
                summary = explain_dataset(
                    model,
                    data,
                    target,
                    batch_size=BATCH,
                    strategy=strat,
                    output_dir=folder,
                    fields=FIELDS,
                    verbose=0,
                )
            except Exception as error:  # reported, not raised: every case is tried
                failures.append(f"{label} {mode}: {type(error).__name__}: {str(error)[:600]}")
                continue
            if summary.images != n:
                failures.append(f"{label} {mode}: {summary.images} images explained")
            results[mode] = shards(folder)
            if not np.array_equal(results[mode]["index"], np.arange(n)):
                failures.append(f"{label} {mode}: index {results[mode]['index'].tolist()}")
        expected = direct(images, direct_target)
        for mode, got in results.items():
            compare(f"{label} {mode} vs GradCAM", got, expected)
        if len(results) == 2:
            compare(f"{label} mirrored vs plain", results["mirrored"], results["plain"])

# bad labels are refused on the distributed path too, with typed errors
rng = np.random.default_rng(0)
images = rng.random((6, 16, 16, 3), dtype=np.float32)
bad = {
    "soft rows": ((images, np.full((6, 3), 1 / 3, np.float32)), TargetError, "one-hot"),
    "fractional": ((images, np.full(6, 0.5, np.float32)), TargetError, "whole"),
    "out of range": ((images, np.full(6, 7)), TargetError, "out of range"),
    "mismatched batches": (
        tf.data.Dataset.zip(
            (
                tf.data.Dataset.from_tensor_slices(images).batch(4),
                tf.data.Dataset.from_tensor_slices(np.zeros(6, np.int64)).batch(3),
            )
        ),
        InputError,
        "4 images but 3 labels",
    ),
}
for name, (data, error_type, words) in bad.items():
    try:
        explain_dataset(model, data, "labels", batch_size=4, strategy=strategy, verbose=0)
        failures.append(f"bad {name}: accepted")
    except error_type as error:
        if words not in str(error):
            failures.append(f"bad {name}: message {error}")
    except Exception as error:
        failures.append(f"bad {name}: {type(error).__name__}: {str(error)[:400]}")

print(json.dumps({"splits": splits, "failures": failures}), flush=True)
