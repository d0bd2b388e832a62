"""GradCAMCallback's robustness: bad sample images and lost event files.

Images no model could explain are refused at construction with an
`InputError`; images the model at hand cannot take disable the callback for
that fit with one warning. When the event file stops taking writes (its
folder deleted or replaced, the file deleted or replaced, a full disk), the
callback warns once and stops writing, and training is unchanged.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import glob
import re
import shutil
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers
from test_callback import SIZE, make_model, read_events

from tf_gradcam import GradCAM, GradCAMCallback
from tf_gradcam.errors import InputError

EPOCHS = 4


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    """64 random 16×16 RGB images in [0, 1]."""
    return np.random.default_rng(0).random((64, SIZE, SIZE, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def y() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 3, 64)


def _with_non_finite(images: np.ndarray) -> np.ndarray:
    """A copy with one NaN in image 1 and one -inf in image 3."""
    bad = images.copy()
    bad[1, 2, 3, 0] = np.nan
    bad[3, 0, 0, 2] = -np.inf
    return bad


def _ragged_dataset(images: np.ndarray) -> tf.data.Dataset:
    pictures = [images[0], images[1, :8]]
    return tf.data.Dataset.from_generator(
        lambda: iter(pictures), output_signature=tf.TensorSpec((None, None, 3), tf.float32)
    )


FINITE = "with 1 NaN and 1 infinite value(s), in image(s) 1, 3."
BAD_IMAGES = {
    "nan and inf": (_with_non_finite, "Received: images=float32 array of shape (4, 16, 16, 3) "),
    "nan and inf (message)": (_with_non_finite, FINITE),
    "nan and inf tensor": (lambda x: tf.constant(_with_non_finite(x)), FINITE),
    "nan and inf dataset": (
        lambda x: tf.data.Dataset.from_tensor_slices(_with_non_finite(x)).batch(3),
        FINITE,
    ),
    "strings": (
        lambda x: np.full(x.shape, "a"),
        "Received: images=<U1 array of shape (4, 16, 16, 3).",
    ),
    "objects": (
        lambda x: x.astype(object),
        "Received: images=object array of shape (4, 16, 16, 3).",
    ),
    "string dataset": (
        lambda x: tf.data.Dataset.from_tensor_slices(np.full(x.shape, "a")),
        "must hold numbers",
    ),
    "2-D": (lambda x: x[0, ..., 0], "Received: images=float32 array of shape (16, 16), of rank 2."),
    "6-D": (
        lambda x: x[None, None],
        "Received: images=float32 array of shape (1, 1, 4, 16, 16, 3), of rank 6.",
    ),
    "empty batch": (
        lambda x: x[:0],
        "at least one image. Received: images=float32 array of shape (0, 16, 16, 3).",
    ),
    "empty dataset": (
        lambda x: tf.data.Dataset.from_tensor_slices(x[:0]),
        "at least one image. Received: images=an empty tf.data.Dataset",
    ),
    "zero width": (
        lambda x: x[:, :, :0],
        "Received: images=float32 array of shape (4, 16, 0, 3).",
    ),
    "2 channels": (
        lambda x: x[..., :2],
        "2 channels cannot be shown. Received: images=float32 array of shape (4, 16, 16, 2).",
    ),
    "ragged list": (
        lambda x: [x[0], x[1, :8]],
        "Received: images=a list of 2 items of shapes [(16, 16, 3), (8, 16, 3)].",
    ),
    "ragged tuple": (
        lambda x: ([x[0], x[1, :8], x[2]], [0, 1, 2]),
        "Received: images=a list of 3 items of shapes [(16, 16, 3), (8, 16, 3)].",
    ),
    "ragged dataset": (
        _ragged_dataset,
        "whose first 2 images have shapes [(16, 16, 3), (8, 16, 3)].",
    ),
}


@pytest.mark.parametrize(("make", "message"), BAD_IMAGES.values(), ids=list(BAD_IMAGES))
def test_bad_images_raise_at_construction(x, make, message):
    """Images no model could explain or no panel could show: an InputError in __init__."""
    with pytest.raises(InputError, match=re.escape(message)):
        GradCAMCallback(make(x[:4]), max_images=4)


def test_only_the_kept_images_must_be_finite(x):
    """Without regions only max_images images are kept, and only they are checked; with
    regions every image is explained, so a NaN in any of them is refused."""
    images = x[:4].copy()
    images[3, 5, 5, 1] = np.nan
    callback = GradCAMCallback(images, max_images=3)
    np.testing.assert_array_equal(callback.images, x[:3])
    with pytest.raises(InputError, match=re.escape("1 NaN and 0 infinite value(s), in image(s) 3")):
        GradCAMCallback(images, max_images=3, regions={"corner": np.array([0, 0, 4, 4])})


def test_integer_and_bool_images_are_accepted(x):
    """uint8 pictures and bool masks are numbers: kept as given."""
    pictures = np.round(x[:2] * 255).astype(np.uint8)
    np.testing.assert_array_equal(GradCAMCallback(pictures).images, pictures)
    assert GradCAMCallback(x[:2] > 0.5).images.dtype == bool


# ------------------------------------------------------ images the model cannot take


def _fit_caught(model, x, y, callbacks, epochs=2):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            x, y, epochs=epochs, batch_size=16, callbacks=callbacks, verbose=0, shuffle=False
        )
    ours = [w for w in caught if "GradCAMCallback" in str(w.message)]
    return history, ours


MISMATCHES = {
    "channels": (
        lambda x: x[:4, ..., :1],
        "' expects 3 channels (input shape (None, 16, 16, 3)), the images have 1. "
        "Received: images=float32 array of shape (4, 16, 16, 1).",
    ),
    # rank 3 and 5 are signals and volumes: an image model finds out when the fit starts
    "one image": (
        lambda x: x[0],
        "For one image (height, width, channels), add a batch axis: images[None].",
    ),
    "5-D": (
        lambda x: x[None, :4],
        "Received: images=float32 array of shape (1, 4, 16, 16, 3). Merge the batch axes",
    ),
    "size": (
        lambda x: x[:4, :8, :8],
        "' expects images of 16x16 pixels (input shape (None, 16, 16, 3)). "
        "Received: images=float32 array of shape (4, 8, 8, 3).",
    ),
}


@pytest.mark.parametrize(("make", "message"), MISMATCHES.values(), ids=list(MISMATCHES))
def test_images_the_model_cannot_take_disable_the_callback(tmp_path, x, y, make, message):
    """Wrong channels or size for the model: one UserWarning at the start of fit, nothing
    logged, every epoch trained; strict=True raises instead, before the first step."""
    model = make_model()
    callback = GradCAMCallback(make(x), log_dir=tmp_path)
    history, ours = _fit_caught(model, x, y, [callback])
    assert len(history.history["loss"]) == 2
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert ours[0].category is UserWarning
    assert str(ours[0].message).startswith("GradCAMCallback is disabled for this fit: model '")
    assert message in str(ours[0].message)
    assert not (tmp_path / "gradcam").exists()

    model = make_model()
    strict = GradCAMCallback(make(x), log_dir=tmp_path, strict=True)
    with pytest.raises(InputError, match=re.escape(message)):
        model.fit(x, y, epochs=1, batch_size=16, callbacks=[strict], verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 0


def _head(features) -> keras.KerasTensor:
    h = layers.Conv2D(4, 3, activation="relu", name="last_conv")(features)
    return layers.Dense(3)(layers.GlobalAveragePooling2D()(h))


def _uint8_model() -> tuple[keras.Model, np.ndarray]:
    inputs = keras.Input((SIZE, SIZE, 3), dtype="uint8")
    model = keras.Model(inputs, _head(layers.Rescaling(1 / 255)(inputs)))
    return model, np.zeros((16, SIZE, SIZE, 3), np.uint8)


def _two_input_model() -> tuple[keras.Model, list[np.ndarray]]:
    a, b = keras.Input((SIZE, SIZE, 3)), keras.Input((SIZE, SIZE, 3))
    model = keras.Model([a, b], _head(layers.Concatenate()([a, b])))
    zeros = np.zeros((16, SIZE, SIZE, 3), np.float32)
    return model, [zeros, zeros]


ODD_MODELS = {
    "uint8 input": (
        _uint8_model,
        "The model's input is uint8; the images are float32 with values in [{low:.4g}, "
        "{high:.4g}], which a cast to uint8 would change (fractions are cut: floats in [0, 1] "
        "become zeros). Pass uint8 images in [0, 255], e.g. (images * 255).round().astype("
        "'uint8') for [0, 1] floats. Received: images=float32 array of shape (2, 16, 16, 3).",
    ),
    "two inputs": (
        _two_input_model,
        "takes 2 inputs [(None, 16, 16, 3), (None, 16, 16, 3)]; the callback explains models "
        "with one image input. Received: images=float32 array of shape (2, 16, 16, 3).",
    ),
}


@pytest.mark.parametrize(("build", "message"), ODD_MODELS.values(), ids=list(ODD_MODELS))
def test_models_the_callback_cannot_feed_disable_it(tmp_path, x, build, message):
    """An integer input that float images would be cut for, or several inputs: one
    UserWarning, nothing logged."""
    keras.utils.set_random_seed(3)
    model, inputs = build()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(True))
    callback = GradCAMCallback(x[:2], log_dir=tmp_path)
    _, ours = _fit_caught(model, inputs, np.zeros(16, int), [callback], epochs=1)
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert ours[0].category is UserWarning
    assert message.format(low=x[:2].min(), high=x[:2].max()) in str(ours[0].message)
    assert not (tmp_path / "gradcam").exists()


def test_any_size_fits_a_model_without_a_fixed_size(tmp_path, x, y):
    """A model with (None, None, 3) inputs takes 12×12 images: no warning, panels written."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, _head(inputs))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(True))
    callback = GradCAMCallback(x[:2, :12, :12], log_dir=tmp_path)
    _, ours = _fit_caught(model, x, y, [callback], epochs=1)
    assert ours == []
    assert [s for s, tag, _ in read_events(tmp_path) if tag == "gradcam/image_1"] == [0]


# --------------------------------------------------------------------- lost event files

REGION = np.array([0, 0, 8, 8])  # the top-left quarter


def _event_files(log_dir: Path) -> list[str]:
    return glob.glob(str(log_dir / "gradcam" / "events.out.tfevents.*"))


def _delete_folder(log_dir: Path) -> None:
    shutil.rmtree(log_dir)


def _replace_folder_by_file(log_dir: Path) -> None:
    shutil.rmtree(log_dir / "gradcam")
    (log_dir / "gradcam").write_text("not a folder")


def _delete_event_file(log_dir: Path) -> None:
    (path,) = _event_files(log_dir)
    os.remove(path)


def _replace_event_file_by_copy(log_dir: Path) -> None:
    """As a sync tool does: the name now leads to a copy, the writer keeps the old file."""
    (path,) = _event_files(log_dir)
    shutil.copy(path, path + ".tmp")
    os.replace(path + ".tmp", path)


class _Breaker(keras.callbacks.Callback):
    """Listed before GradCAMCallback: breaks its log folder at the end of epoch 1."""

    def __init__(self, log_dir: Path, breaking) -> None:
        super().__init__()
        self.log_dir, self.breaking = log_dir, breaking

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            self.breaking(self.log_dir)


@pytest.fixture(scope="module")
def reference_weights(x, y) -> list[np.ndarray]:
    """The weights after the same fit without any callback."""
    model = make_model()
    model.fit(x, y, epochs=EPOCHS, batch_size=16, verbose=0, shuffle=False)
    return model.get_weights()


def _assert_same_weights(model: keras.Model, reference: list[np.ndarray]) -> None:
    weights = model.get_weights()
    assert len(weights) == len(reference)
    for a, b in zip(weights, reference, strict=True):
        np.testing.assert_array_equal(a, b)


LOSSES = {
    "folder deleted": (_delete_folder, "the folder no longer exists"),
    "folder replaced by a file": (_replace_folder_by_file, "the path is no longer a folder"),
    "event file deleted": (_delete_event_file, "' was deleted"),
    "event file replaced by a copy": (_replace_event_file_by_copy, "' did not grow after a flush"),
}


@pytest.mark.parametrize(("breaking", "reason"), LOSSES.values(), ids=list(LOSSES))
def test_lost_event_file_warns_once_and_training_is_unchanged(
    tmp_path, x, y, reference_weights, breaking, reason
):
    """TensorFlow's writer is silent when its folder or file goes: the callback notices it
    after the next flush, warns once, writes nothing more, keeps the masses in `logs`, and the
    weights are those of a fit without callbacks."""
    model = make_model()
    callback = GradCAMCallback(x[:4], log_dir=tmp_path, regions={"corner": REGION})
    history, ours = _fit_caught(model, x, y, [_Breaker(tmp_path, breaking), callback], EPOCHS)
    assert len(history.history["loss"]) == EPOCHS
    assert len(ours) == 1, [str(w.message) for w in ours]
    message = str(ours[0].message)
    assert ours[0].category is RuntimeWarning
    assert f"to {str(tmp_path / 'gradcam')!r}: " in message
    assert reason in message
    assert "logging stopped for the rest of this fit" in message
    _assert_same_weights(model, reference_weights)
    # the masses still reach logs; the last one is that of the final weights
    masses = history.history["gradcam/corner_mass"]
    assert len(masses) == EPOCHS
    heatmaps = GradCAM(model)(x[:4]).heatmaps.astype(np.float64)
    expected = np.mean(heatmaps[:, :8, :8].sum((1, 2)) / heatmaps.sum((1, 2)))
    np.testing.assert_allclose(masses[-1], expected, rtol=1e-5)
    # nothing after the loss: at most epochs 0 and 1 in whatever file is left
    if (tmp_path / "gradcam").is_dir():
        assert {s for s, _, _ in read_events(tmp_path)} <= {0, 1}


def test_a_later_fit_writes_again(tmp_path, x, y):
    """After the folder was lost, the next fit opens a new event file and logs."""
    model = make_model()
    callback = GradCAMCallback(x[:2], log_dir=tmp_path)
    _, ours = _fit_caught(model, x, y, [_Breaker(tmp_path, _delete_folder), callback], 3)
    assert len(ours) == 1
    _, ours = _fit_caught(model, x, y, [callback], epochs=1)
    assert ours == []
    assert [s for s, tag, _ in read_events(tmp_path) if tag == "gradcam/image_0"] == [0]


def _failing_writers(monkeypatch, error: Exception, after: int = 1) -> None:
    """Writers whose flush raises `error` from flush number `after + 1` on (a disk filling)."""
    create = tf.summary.create_file_writer

    def create_failing(*args, **kwargs):
        writer = create(*args, **kwargs)
        flushes = [0]
        real_flush = writer.flush

        def flush():
            flushes[0] += 1
            if flushes[0] > after:
                raise error
            return real_flush()

        writer.flush = flush
        return writer

    monkeypatch.setattr(tf.summary, "create_file_writer", create_failing)


FULL = tf.errors.ResourceExhaustedError(
    None, None, "{{function_node __wrapped__FlushSummaryWriter}} /x/events; No space left on device"
)


def test_write_error_warns_once_and_training_is_unchanged(
    tmp_path, x, y, reference_weights, monkeypatch
):
    """A flush that raises (a full disk): one warning naming the cause; fit unchanged."""
    _failing_writers(monkeypatch, FULL)
    model = make_model()
    callback = GradCAMCallback(x[:4], log_dir=tmp_path)
    history, ours = _fit_caught(model, x, y, [callback], EPOCHS)
    assert len(history.history["loss"]) == EPOCHS
    assert len(ours) == 1, [str(w.message) for w in ours]
    message = str(ours[0].message)
    assert ours[0].category is RuntimeWarning
    assert f"to {str(tmp_path / 'gradcam')!r}: " in message
    assert "ResourceExhaustedError: /x/events; No space left on device." in message
    assert "logging stopped" in message
    _assert_same_weights(model, reference_weights)


def test_write_error_with_strict_raises(tmp_path, x, y, monkeypatch):
    """strict=True: the lost event file stops fit with an OSError naming the folder."""
    _failing_writers(monkeypatch, FULL, after=0)
    callback = GradCAMCallback(x[:4], log_dir=tmp_path, strict=True)
    with pytest.raises(OSError, match=re.escape(f"to {str(tmp_path / 'gradcam')!r}")):
        make_model().fit(x, y, epochs=2, batch_size=16, callbacks=[callback], verbose=0)


def test_unusable_log_dir_warns_once(tmp_path, x, y):
    """A log_dir that is a file: the writer cannot be created; one warning, fit goes on."""
    log_dir = tmp_path / "logs"
    log_dir.write_text("a file")
    callback = GradCAMCallback(x[:2], log_dir=log_dir, update_freq=2)
    history, ours = _fit_caught(make_model(), x, y, [callback], epochs=3)
    assert len(history.history["loss"]) == 3
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "FailedPreconditionError: " in str(ours[0].message)
    assert "is not a directory" in str(ours[0].message)
