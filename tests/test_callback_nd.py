"""GradCAMCallback with a `tf.data` sample of signals or volumes.

A dataset of signals `(length, channels)` or volumes `(depth, height, width, channels)`,
batched or not, yielding `x`, `(x,)`, `(x, labels)` or `(x, labels, weights)` with class
indices or one-hot rows, must log the pictures the same sample logs when given as NumPy
arrays, and those pictures must be `signal_picture` / `orthogonal_slices` of heatmaps
computed outside the callback by `GradCAM` on the weights the model had when the callback
logged (SGD with a learning rate of 0 keeps the initial weights; the test checks it).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers
from test_callback import decode_image, parse_table, read_events, text

from tf_gradcam import GradCAM, GradCAMCallback, overlay
from tf_gradcam.errors import InputError
from tf_gradcam.pictures import orthogonal_slices, signal_picture

#: One signal (length, channels) and one volume (depth, height, width, channels).
SHAPES = {"signal": (32, 3), "volume": (6, 8, 8, 1)}
CLASSES = 3
COUNT = 16
SHOWN = 4  # max_images; batches of 3 make the sample cross a batch boundary
BATCH = 3


def make_model(kind: str, seed: int = 5) -> keras.Model:
    """Conv('last_conv', relu) → global average pooling → Dense(3, 'head'), logits, SGD(0)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(SHAPES[kind])
    if kind == "signal":
        x = layers.Conv1D(4, 5, activation="relu", name="last_conv")(inputs)
        x = layers.GlobalAveragePooling1D()(x)
    else:
        x = layers.Conv3D(4, 3, activation="relu", name="last_conv")(inputs)
        x = layers.GlobalAveragePooling3D()(x)
    # mostly positive class weights: every class has some supporting region
    head_init = keras.initializers.RandomUniform(-0.5, 1.0, seed=seed)
    outputs = layers.Dense(CLASSES, kernel_initializer=head_init, name="head")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def draw(kind: str, x: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    return signal_picture(x, heatmap) if kind == "signal" else orthogonal_slices(x, heatmap)


def logged_pictures(log_dir: Path) -> dict[int, np.ndarray]:
    """{image index: picture} of the epoch-0 image summaries under log_dir/gradcam."""
    found = {}
    for step, tag, value in read_events(log_dir):
        match = re.fullmatch(r"gradcam/image_(\d+)", tag)
        if match and step == 0:
            found[int(match.group(1))] = decode_image(value)
    return found


def logged_classes(log_dir: Path) -> list[int]:
    """The class column of the epoch-0 targets table."""
    (table,) = [text(v) for s, tag, v in read_events(log_dir) if tag == "gradcam/targets"]
    return [int(row["class"]) for row in parse_table(table)]


#: name: (make the sample from x, class indices, one-hot rows and weights; target)
SAMPLES = {
    "arrays, labels": (lambda x, y, h, w: (x[:SHOWN], y[:SHOWN]), "labels"),
    "arrays": (lambda x, y, h, w: x[:SHOWN], None),
    "batched (x, indices)": (
        lambda x, y, h, w: tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH),
        "labels",
    ),
    "batched (x, one-hot, weights)": (
        lambda x, y, h, w: tf.data.Dataset.from_tensor_slices((x, h, w)).batch(BATCH),
        "labels",
    ),
    "batched (x,)": (
        lambda x, y, h, w: tf.data.Dataset.from_tensor_slices((x,)).batch(BATCH),
        None,
    ),
    "unbatched (x, indices, weights)": (
        lambda x, y, h, w: tf.data.Dataset.from_tensor_slices((x, y, w)),
        "labels",
    ),
    "unbatched (x, one-hot)": (
        lambda x, y, h, w: tf.data.Dataset.from_tensor_slices((x, h)),
        "labels",
    ),
    "unbatched x": (lambda x, y, h, w: tf.data.Dataset.from_tensor_slices(x).repeat(), None),
}
DATASETS = [name for name in SAMPLES if not name.startswith("arrays")]


@pytest.fixture(scope="module", params=["signal", "volume"])
def run(request, tmp_path_factory) -> SimpleNamespace:
    """One 1-epoch fit of a `kind` model with one callback per sample of SAMPLES.

    The labels 0, 1, 2, 0, 1, 2, ... differ within every batch and, for some images, from
    the predicted class.
    """
    kind = request.param
    rng = np.random.default_rng(11)
    model = make_model(kind)
    x = rng.normal(size=(COUNT, *SHAPES[kind])).astype(np.float32)
    predicted = np.argmax(model.predict(x, verbose=0), axis=-1)
    labels = np.arange(COUNT) % CLASSES
    one_hot = np.eye(CLASSES, dtype=np.float32)[labels]
    weights = np.full(COUNT, 2.0, np.float32)  # class 2 if read as labels
    log_root = tmp_path_factory.mktemp(f"{kind}_logs")
    callbacks = {}
    for i, (name, (make, target)) in enumerate(SAMPLES.items()):
        callbacks[name] = GradCAMCallback(
            make(x, labels, one_hot, weights),
            log_dir=log_root / str(i),
            target=target,
            layer="last_conv",
            max_images=SHOWN,
            annotate=False,
            strict=True,
        )
    initial = [w.copy() for w in model.get_weights()]
    model.fit(
        x,
        rng.integers(0, CLASSES, COUNT),
        epochs=1,
        batch_size=8,
        callbacks=list(callbacks.values()),
        verbose=0,
    )
    for before, after in zip(initial, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)  # the weights the callbacks saw
    logs = {name: log_root / str(i) for i, name in enumerate(SAMPLES)}
    return SimpleNamespace(
        kind=kind,
        model=model,
        x=x,
        labels=labels,
        predicted=predicted,
        callbacks=callbacks,
        pictures={name: logged_pictures(path) for name, path in logs.items()},
        classes={name: logged_classes(path) for name, path in logs.items()},
    )


def test_array_pictures_are_the_maps_of_an_independent_gradcam(run):
    """The arrays' pictures are signal_picture / orthogonal_slices of GradCAM's heatmaps for
    the labels (and for the predicted class), and the two targets give different pictures."""
    sample = run.x[:SHOWN]
    for name, target in (("arrays, labels", run.labels), ("arrays", run.predicted)):
        heatmaps = GradCAM(run.model, "last_conv")(sample, target=target[:SHOWN]).heatmaps
        assert sorted(run.pictures[name]) == list(range(SHOWN))
        for i in range(SHOWN):
            expected = draw(run.kind, sample[i], heatmaps[i])
            np.testing.assert_array_equal(run.pictures[name][i], expected)
        assert run.classes[name] == target[:SHOWN].tolist()
    differ = [
        not np.array_equal(run.pictures["arrays, labels"][i], run.pictures["arrays"][i])
        for i in range(SHOWN)
    ]
    assert any(differ), "labels and predicted classes must give different pictures"
    # Any other class gives another picture: a wrong label cannot go unnoticed.
    pictures = [
        [draw(run.kind, sample[i], h) for i, h in enumerate(cam.heatmaps)]
        for cam in (GradCAM(run.model, "last_conv")(sample, c) for c in range(CLASSES))
    ]
    for i in range(SHOWN):
        for a in range(CLASSES):
            for b in range(a):
                assert not np.array_equal(pictures[a][i], pictures[b][i]), (i, a, b)


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_logs_the_arrays_pictures(run, name):
    """A dataset sample logs, pixel for pixel, what the same sample logs as arrays, and the
    picture of an independent GradCAM; its targets table lists the labels (or predictions)."""
    target = SAMPLES[name][1]
    arrays = "arrays, labels" if target == "labels" else "arrays"
    classes = run.labels if target == "labels" else run.predicted
    callback = run.callbacks[name]
    np.testing.assert_array_equal(callback.images, run.x[:SHOWN])
    if target == "labels":
        np.testing.assert_array_equal(callback.labels, run.labels[:SHOWN])
    heatmaps = GradCAM(run.model, "last_conv")(run.x[:SHOWN], target=classes[:SHOWN]).heatmaps
    assert sorted(run.pictures[name]) == list(range(SHOWN))
    for i in range(SHOWN):
        np.testing.assert_array_equal(run.pictures[name][i], run.pictures[arrays][i])
        np.testing.assert_array_equal(run.pictures[name][i], draw(run.kind, run.x[i], heatmaps[i]))
    assert run.classes[name] == classes[:SHOWN].tolist()


def test_elements_of_two_readings_follow_the_models_input_rank(tmp_path):
    """Volumes (depth, height, width, channels) are also a batch of images: a Conv3D model
    explains the volumes, a Conv2D model the images, from one dataset."""
    rng = np.random.default_rng(2)
    volumes = rng.normal(size=(5, *SHAPES["volume"])).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(volumes)
    inputs = keras.Input(SHAPES["volume"][1:])
    x = layers.Conv2D(4, 3, activation="relu", name="last_conv")(inputs)
    outputs = layers.Dense(CLASSES, name="head")(layers.GlobalAveragePooling2D()(x))
    image_model = keras.Model(inputs, outputs)
    image_model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    volume_model = make_model("volume")
    for model, expected in ((image_model, volumes[0, :2]), (volume_model, volumes[:2])):
        log_dir = tmp_path / str(expected.ndim)
        callback = GradCAMCallback(
            dataset, log_dir=log_dir, max_images=2, annotate=False, strict=True
        )
        np.testing.assert_array_equal(callback.images, volumes[0, :2])  # images until a fit
        batch = expected[:1]
        model.fit(batch, np.zeros(1), epochs=1, verbose=0, callbacks=[callback])
        np.testing.assert_array_equal(callback.images, expected)
        heatmaps = GradCAM(model, "last_conv")(expected).heatmaps
        if model is image_model:
            pictures = overlay(expected, heatmaps)
        else:
            pictures = [draw("volume", v, h) for v, h in zip(expected, heatmaps, strict=True)]
        logged = logged_pictures(log_dir)
        for i in range(2):
            np.testing.assert_array_equal(logged[i], pictures[i])


def test_a_refused_reading_disables_the_callback_for_that_model(tmp_path):
    """Three volumes and four per-image classes: as images (4 from the first volume) the
    sample is fine, as volumes it is refused; a Conv3D model gets that reason at fit start,
    as a warning or, with strict=True, as the error before the first step."""
    volumes = np.random.default_rng(4).normal(size=(3, *SHAPES["volume"])).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(volumes)
    message = (
        "takes volumes (batch, depth, height, width, channels), and the dataset's elements "
        "read as volumes (depth, height, width, channels) are refused: `target` gives 4 "
        "classes for 3 images"
    )
    model = make_model("volume")
    callback = GradCAMCallback(dataset, log_dir=tmp_path, target=[0, 1, 2, 0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(volumes, np.zeros(3), epochs=1, verbose=0, callbacks=[callback])
    ours = [str(w.message) for w in caught if "GradCAMCallback" in str(w.message)]
    assert len(ours) == 1 and message in ours[0], ours
    assert not (tmp_path / "gradcam").exists()
    strict = GradCAMCallback(dataset, log_dir=tmp_path, target=[0, 1, 2, 0], strict=True)
    with pytest.raises(ValueError, match=re.escape(message)):
        model.fit(volumes, np.zeros(3), epochs=1, verbose=0, callbacks=[strict])
    assert int(model.optimizer.iterations.numpy()) == 1  # the first fit's step only


def _generator_dataset(batches: list[np.ndarray]) -> tf.data.Dataset:
    """Batches of signals whose element_spec gives neither their length nor channels."""
    return tf.data.Dataset.from_generator(
        lambda: iter(batches), output_signature=tf.TensorSpec((None, None, None), tf.float32)
    )


WRONG_RANKS = {
    "rank 1": (
        lambda: tf.data.Dataset.from_tensor_slices(np.zeros((4, 32), np.float32)),
        "whose elements are of rank 1 (element_spec=TensorSpec(shape=(32,), ",
    ),
    "rank 6": (
        lambda: tf.data.Dataset.from_tensor_slices((np.zeros((2, 1, 2, 6, 8, 8, 1)), [0, 1])),
        "whose elements are of rank 6 (element_spec=(TensorSpec(shape=(1, 2, 6, 8, 8, 1), ",
    ),
    "unknown rank": (
        lambda: tf.data.Dataset.from_generator(
            lambda: iter([np.zeros((32, 3), np.float32)]),
            output_signature=tf.TensorSpec(None, tf.float32),
        ),
        "whose elements are of unknown rank (element_spec=TensorSpec(shape=<unknown>, ",
    ),
}


@pytest.mark.parametrize(("make", "received"), WRONG_RANKS.values(), ids=list(WRONG_RANKS))
def test_dataset_of_a_wrong_rank_is_refused_at_construction(make, received):
    """Elements that are no signal, image or volume, nor a batch of them: an InputError
    naming the ranks accepted and the rank received."""
    accepted = (
        "The dataset's elements must be signals (length, channels), images (height, width, "
        "channels) or volumes (depth, height, width, channels), of rank 2, 3 or 4, or batches "
        "of them, of rank 3, 4 or 5. Received: images=a tf.data.Dataset "
    )
    with pytest.raises(InputError, match=re.escape(accepted + received)):
        GradCAMCallback(make())


def test_both_readings_refused_name_both():
    """Batches of signals with a NaN are refused read as images and as signals."""
    signals = np.random.default_rng(0).normal(size=(6, *SHAPES["signal"])).astype(np.float32)
    signals[1, 5, 0] = np.nan
    dataset = tf.data.Dataset.from_tensor_slices(signals).batch(BATCH)
    message = (
        "The dataset's elements can be read as images (height, width, channels) or as batches "
        "of signals (batch, length, channels); neither reading gives a sample the callback can "
        "explain. Read as images (height, width, channels): "
    )
    with pytest.raises(InputError, match=re.escape(message)) as raised:
        GradCAMCallback(dataset, max_images=2)
    assert "Read as batches of signals (batch, length, channels): " in str(raised.value)
    assert "with 1 NaN and 0 infinite value(s), in image(s) 1." in str(raised.value)


def test_batches_of_signals_of_unknown_length_say_how_to_give_it(tmp_path):
    """Rank-3 elements without a static length and channels are read as images only: a
    Conv1D model says how to give them (strict: raised before the first step), and
    batches of different sizes, refused as images, say it at construction."""
    signals = np.random.default_rng(0).normal(size=(6, *SHAPES["signal"])).astype(np.float32)
    dataset = _generator_dataset([signals[:3], signals[3:]])
    callback = GradCAMCallback(dataset, log_dir=tmp_path, strict=True)
    np.testing.assert_array_equal(callback.images, signals.reshape(2, 3, 32, 3))
    model = make_model("signal")
    hint = (
        "The dataset's elements were read as images: for them to be read as batches of "
        "signals, give their length and channels in the element_spec, e.g. "
        "dataset.map(lambda x, *rest: (tf.ensure_shape(x, (None, 32, 3)), *rest))."
    )
    with pytest.raises(InputError, match=re.escape(hint)):
        model.fit(signals, np.zeros(6), epochs=1, verbose=0, callbacks=[callback])
    assert int(model.optimizer.iterations.numpy()) == 0
    note = (
        "whose first 2 images have shapes [(3, 32, 3), (2, 32, 3)]. Resize them to one size "
        "in the dataset (e.g. with tf.image.resize). (If the elements are batches of signals "
        "(batch, length, channels), give their length and channels in the element_spec, e.g. "
        "with tf.ensure_shape in a dataset.map, to have them read as such.)"
    )
    with pytest.raises(InputError, match=re.escape(note)):
        GradCAMCallback(_generator_dataset([signals[:3], signals[3:5]]))
