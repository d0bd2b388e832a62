"""One worker of a local MultiWorkerMirroredStrategy cluster running `explain_dataset`.

Usage: python multi_worker.py CONFIG.json TASK_INDEX

CONFIG holds `ports` (one localhost port per worker), `model` (a .keras file),
`data` (an .npz with `images` and `labels`), `records` (TFRecord files of the
same images and labels, in order), `out` (a folder), `batch_size`. The worker
explains the data three times into the same shared folders as its peers:
`out/dataset` from a tf.data.Dataset of (images, integer labels),
`out/arrays` from arrays of (images, one-hot labels) and `out/files` from the
TFRecord files with `AutoShardPolicy.FILE` set, with `overwrite=True`
(each worker removes only its own shards of an earlier run). It prints one
JSON line with its counts.
"""

from __future__ import annotations

import json
import os
import sys

config = json.loads(open(sys.argv[1]).read())
task = int(sys.argv[2])
os.environ["TF_CONFIG"] = json.dumps(
    {
        "cluster": {"worker": [f"localhost:{port}" for port in config["ports"]]},
        "task": {"type": "worker", "index": task},
    }
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_gradcam.dataset import explain_dataset  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    model = keras.saving.load_model(config["model"])
with np.load(config["data"]) as data:
    images, labels = data["images"], data["labels"]
classes = model.output_shape[-1]
features = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


def parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    example = tf.io.parse_single_example(record, features)
    image = tf.ensure_shape(tf.io.parse_tensor(example["image"], tf.float32), images.shape[1:])
    return image, example["label"]


file_policy = tf.data.Options()
file_policy.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.FILE
runs = {
    "dataset": tf.data.Dataset.from_tensor_slices((images, labels)),
    "arrays": (images, np.eye(classes, dtype=np.float32)[labels]),
    # several files, and a FILE policy asking tf.distribute for each worker's own files
    "files": tf.data.TFRecordDataset(config["records"]).map(parse).with_options(file_policy),
}
report = {"task": task, "replicas": strategy.num_replicas_in_sync}
for name, source in runs.items():
    summary = explain_dataset(
        model,
        source,
        "labels",
        batch_size=config["batch_size"],
        strategy=strategy,
        output_dir=os.path.join(config["out"], name),
        overwrite=True,
        verbose=0,
    )
    report[name] = {"images": summary.images, "batches": summary.batches}
print(json.dumps(report), flush=True)
