"""Tests of GradCAMCallback: the event files it writes, read back with TensorFlow's parser.

Expected values come from independent computations: the engine (`GradCAM`,
`GuidedGradCAM`, `overlay`) or the model's own logits on the weights of each
logged epoch, and Matplotlib's jet colormap for the panels' colour bar.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import glob
import math
import random
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import tf_gradcam
import tf_gradcam.callback as callback_module
from tf_gradcam import GradCAM, GradCAMCallback, TopK, overlay
from tf_gradcam.callback import MAX_FAILURES, PANEL_MIN_SIZE, caption_strip
from tf_gradcam.methods import get_method

SIZE = 16
REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = ("cat", "dog", "bird")
#: The panels' integer upscaling of a SIZE×SIZE overlay: the smallest factor reaching
#: PANEL_MIN_SIZE pixels.
SCALE = math.ceil(PANEL_MIN_SIZE / SIZE)


def make_model(*, dropout: bool = False, seed: int = 7) -> keras.Model:
    """Conv → Conv('last_conv') → GAP → [BatchNorm, Dropout] → Dense(3, softmax), compiled."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(6, 3, activation="relu", name="conv1")(inputs)
    x = layers.Conv2D(5, 3, activation="relu", name="last_conv")(x)
    x = layers.GlobalAveragePooling2D()(x)
    if dropout:
        x = layers.BatchNormalization()(x)
        x = layers.Dropout(0.3)(x)
    head_init = keras.initializers.RandomUniform(-0.5, 1.0, seed=seed)
    outputs = layers.Dense(3, activation="softmax", kernel_initializer=head_init, name="head")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    """64 random 16×16 RGB images in [0, 1] and class labels in {0, 1, 2}."""
    rng = np.random.default_rng(0)
    return rng.random((64, SIZE, SIZE, 3), dtype=np.float32), rng.integers(0, 3, 64)


@pytest.fixture
def regions() -> dict:
    """A corner box for every image and a centre mask shared by all images."""
    centre = np.zeros((SIZE, SIZE), bool)
    centre[4:12, 4:12] = True
    return {"cue": np.array([0, 0, 5, 5]), "object": centre}


def read_events(log_dir: Path) -> list[tuple[int, str, tf.compat.v1.Summary.Value]]:
    """(step, tag, value) of every summary under log_dir/gradcam, in file order."""
    found = []
    for path in sorted(glob.glob(str(log_dir / "gradcam" / "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            found += [(event.step, value.tag, value) for value in event.summary.value]
    return found


def decode_image(value: tf.compat.v1.Summary.Value) -> np.ndarray:
    """The one PNG of an image-plugin summary, checked against its width/height header."""
    width, height, *pngs = value.tensor.string_val
    assert len(pngs) == 1
    picture = tf.io.decode_png(pngs[0]).numpy()
    assert picture.shape == (int(height), int(width), 3)
    return picture


def scalar(value: tf.compat.v1.Summary.Value) -> float:
    return float(tf.make_ndarray(value.tensor))


def text(value: tf.compat.v1.Summary.Value) -> str:
    """The string of a text-plugin summary."""
    (string,) = value.tensor.string_val
    return string.decode("utf-8")


def parse_table(table: str) -> list[dict[str, str]]:
    """The rows of a Markdown table as {column: cell}."""
    header, rule, *rows = table.strip().split("\n")
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert set(rule.replace("|", "")) == {"-"}
    return [
        dict(zip(columns, (c.strip() for c in row.strip("|").split("|")), strict=True))
        for row in rows
    ]


def at_weights(model: keras.Model, weights: list[np.ndarray]) -> keras.Model:
    """A copy of `model` holding `weights` (the weights of one logged epoch)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(weights)
    return copy


def head_logits(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Pre-softmax scores of the 'head' Dense layer: features · kernel + bias, in float64."""
    features = keras.Model(model.input, model.get_layer("head").input)(x)
    kernel, bias = model.get_layer("head").get_weights()
    return np.asarray(features, np.float64) @ kernel.astype(np.float64) + bias


def upscaled(picture: np.ndarray, factor: int = SCALE) -> np.ndarray:
    """Each pixel repeated factor×factor times (nearest-neighbour upscaling)."""
    return np.repeat(np.repeat(picture, factor, axis=-3), factor, axis=-2)


def jet_ramp(height: int) -> np.ndarray:
    """uint8 RGB of jet at 1 - r/(height-1), r = 0..height-1: 1 at the top, 0 at the bottom."""
    from matplotlib import colormaps

    values = np.linspace(1.0, 0.0, height)
    return np.round(colormaps["jet"](values)[:, :3] * 255.0).astype(np.uint8)


def colour_bar_columns(panel: np.ndarray, height: int, width: int) -> list[int]:
    """Columns right of the (height×width) overlay whose first `height` rows are jet's ramp."""
    ramp = jet_ramp(height)
    return [
        column
        for column in range(width, panel.shape[1])
        if np.array_equal(panel[:height, column], ramp)
    ]


def caption_candidates(name: str, score: float) -> list[tuple[str, str]]:
    """The caption lines (name, 'score <score, .3g>'), and those of the score's neighbours.

    The score is computed in float64 here and in float32 by the engine; the
    3-digit text of the two can differ only when the value sits on a rounding
    edge, so the renderings of score·(1 ± 1e-5) are accepted too.
    """
    return [(name, f"score {score * (1 + d):.3g}") for d in (0.0, -1e-5, 1e-5)]


def fit(model, data, callback, *, epochs=2, **kwargs):
    x, y = data
    return model.fit(x, y, epochs=epochs, batch_size=16, callbacks=[callback], verbose=0, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """One 2-epoch fit (4 steps each) with regions, true-label targets, class names and
    update_freq=3.

    A spy (recording the logs and the weights at each epoch end) and an EarlyStopping on the
    cue mass are listed after the callback.
    """
    rng = np.random.default_rng(0)
    x, y = rng.random((64, SIZE, SIZE, 3), dtype=np.float32), rng.integers(0, 3, 64)
    log_dir = tmp_path_factory.mktemp("logs")
    centre = np.zeros((SIZE, SIZE), bool)
    centre[4:12, 4:12] = True
    regions = {"cue": np.array([0, 0, 5, 5]), "object": centre}
    callback = GradCAMCallback(
        (x[:8], y[:8]),
        log_dir=log_dir,
        target="labels",
        max_images=3,
        regions=regions,
        update_freq=3,
        class_names=CLASS_NAMES,
    )
    seen: list[dict] = []
    weights: list[list[np.ndarray]] = []
    model = make_model()

    def record(epoch, logs):
        seen.append(dict(logs))
        weights.append(model.get_weights())

    spy = keras.callbacks.LambdaCallback(on_epoch_end=record)
    stop = keras.callbacks.EarlyStopping(monitor="gradcam/cue_mass", mode="min", patience=5)
    history = model.fit(x, y, epochs=2, batch_size=16, callbacks=[callback, spy, stop], verbose=0)
    return SimpleNamespace(
        x=x,
        y=y,
        model=model,
        callback=callback,
        history=history,
        seen=seen,
        weights=weights,
        stop=stop,
        log_dir=log_dir,
        events=read_events(log_dir),
        centre=centre,
    )


def test_tags_image_count_and_size_per_step(trained):
    """Each log writes max_images panels, a targets table and one scalar per region."""
    epoch_tags = {"gradcam/image_0", "gradcam/image_1", "gradcam/image_2", "gradcam/targets"}
    epoch_tags |= {"gradcam/cue_mass", "gradcam/object_mass"}
    batch_tags = {tag.replace("gradcam/", "gradcam_batch/") for tag in epoch_tags}
    assert {tag for _, tag, _ in trained.events} == epoch_tags | batch_tags
    for tag in epoch_tags:
        assert [step for step, t, _ in trained.events if t == tag] == [0, 1]
    plugins = {tag: value.metadata.plugin_data.plugin_name for _, tag, value in trained.events}
    assert plugins["gradcam/image_0"] == "images"
    assert plugins["gradcam/cue_mass"] == "scalars"
    assert plugins["gradcam/targets"] == "text"
    shapes = {decode_image(v).shape for _, tag, v in trained.events if "/image_" in tag}
    assert len(shapes) == 1  # one panel size for every image and step
    (height, width, _) = shapes.pop()
    assert height > SIZE * SCALE and width > SIZE * SCALE  # the caption below, the bar right
    assert os.listdir(trained.log_dir) == ["gradcam"]


def test_update_freq_logs_every_n_optimizer_steps(trained):
    """update_freq=3 with 4 steps per epoch writes batch summaries after steps 3 and 6 only."""
    for tag in ("gradcam_batch/image_2", "gradcam_batch/targets", "gradcam_batch/cue_mass"):
        assert [step for step, t, _ in trained.events if t == tag] == [3, 6]


def test_overlays_and_masses_match_the_engine(trained):
    """At each epoch, the panels hold the engine's overlay and the masses are its maps'."""
    x, labels = trained.x[:8], trained.y[:8].astype(np.int32)
    cue = np.zeros((SIZE, SIZE))
    cue[:5, :5] = 1
    for epoch, weights in enumerate(trained.weights):
        model = at_weights(trained.model, weights)
        heatmaps = GradCAM(model, "last_conv")(x, labels).heatmaps
        expected = upscaled(overlay(x, heatmaps))
        logged = {tag: value for step, tag, value in trained.events if step == epoch}
        for i in range(3):
            panel = decode_image(logged[f"gradcam/image_{i}"])
            np.testing.assert_allclose(panel[: SIZE * SCALE, : SIZE * SCALE], expected[i], atol=1)
        for name, mask in {"cue": cue, "object": trained.centre}.items():
            mass = np.mean((heatmaps * mask).sum((1, 2)) / heatmaps.sum((1, 2)))
            np.testing.assert_allclose(scalar(logged[f"gradcam/{name}_mass"]), mass, rtol=1e-5)
            history = trained.history.history[f"gradcam/{name}_mass"]
            np.testing.assert_allclose(history[epoch], mass, rtol=1e-5)


def test_panels_carry_the_colour_bar_and_the_caption(trained):
    """Right of each overlay, a jet bar from 1 (top) to 0; below, the class name and logit."""
    x, labels = trained.x[:3], trained.y[:3]
    side = SIZE * SCALE
    for epoch, weights in enumerate(trained.weights):
        logits = head_logits(at_weights(trained.model, weights), x)
        logged = {tag: value for step, tag, value in trained.events if step == epoch}
        for i in range(3):
            panel = decode_image(logged[f"gradcam/image_{i}"])
            bar = colour_bar_columns(panel, side, side)
            assert len(bar) >= 2 and bar == list(range(bar[0], bar[-1] + 1)), bar
            strip = panel[side:]
            assert (strip < 128).any()  # dark text on the white strip
            candidates = caption_candidates(CLASS_NAMES[labels[i]], logits[i, labels[i]])
            width = panel.shape[1]
            assert any(np.array_equal(strip, caption_strip(c, width)) for c in candidates), (
                f"epoch {epoch}, image {i}: the caption is none of {candidates}"
            )
    # The comparison can tell captions apart: another name gives another strip.
    assert not np.array_equal(
        caption_strip(("cat", "score 1"), 140), caption_strip(("dog", "score 1"), 140)
    )


def test_targets_table_gives_class_and_logit_per_image(trained):
    """The text table's rows: image index, class, its name and the pre-softmax score (.4g)."""
    x, labels = trained.x[:3], trained.y[:3]
    for epoch, weights in enumerate(trained.weights):
        logits = head_logits(at_weights(trained.model, weights), x)
        (value,) = [v for s, tag, v in trained.events if tag == "gradcam/targets" and s == epoch]
        rows = parse_table(text(value))
        assert [row["image"] for row in rows] == ["0", "1", "2"]
        for i, row in enumerate(rows):
            assert int(row["class"]) == labels[i]
            assert row["name"] == CLASS_NAMES[labels[i]]
            # 4 significant digits: relative rounding error at most 5e-4
            np.testing.assert_allclose(float(row["score"]), logits[i, labels[i]], rtol=5e-4)


def test_predicted_class_targets_follow_the_logits(tmp_path, data):
    """target=None explains argmax of the logits; the table shows it, and 'class <i>' names
    a class beyond class_names."""
    model = make_model()
    x = data[0][:4]
    callback = GradCAMCallback(x, log_dir=tmp_path, class_names=CLASS_NAMES[:1], strict=True)
    with pytest.warns(UserWarning, match="1 class_names for a model with 3 output classes"):
        fit(model, data, callback, epochs=1)
    logits = head_logits(model, x)
    logged = {tag: value for _, tag, value in read_events(tmp_path)}
    rows = parse_table(text(logged["gradcam/targets"]))
    for i, row in enumerate(rows):
        predicted = int(np.argmax(logits[i]))
        assert int(row["class"]) == predicted
        assert row["name"] == (CLASS_NAMES[0] if predicted == 0 else f"class {predicted}")
        np.testing.assert_allclose(float(row["score"]), logits[i, predicted], rtol=5e-4)


def test_guided_gradcam_method_logs_the_guided_pictures(tmp_path, data):
    """method='guided_gradcam' logs display-normalised Guided Grad-CAM gradients of the weights,
    upscaled, captioned, without a colour bar (the picture is no colour-mapped heatmap)."""
    from tf_gradcam import GuidedGradCAM
    from tf_gradcam.image import normalize_gradients

    model = make_model()
    x = data[0][:2]
    callback = GradCAMCallback(x, log_dir=tmp_path, method="guided_gradcam", target=1)
    fit(model, data, callback, epochs=1)
    expected = GuidedGradCAM(model, "last_conv")(x, target=1).gradients
    pictures = upscaled(np.round(normalize_gradients(expected) * 255.0).astype(np.uint8))
    logits = head_logits(model, x)
    logged = {tag: value for _, tag, value in read_events(tmp_path)}
    side = SIZE * SCALE
    for i in range(2):
        panel = decode_image(logged[f"gradcam/image_{i}"])
        np.testing.assert_allclose(panel[:side, :side], pictures[i], atol=1)
        assert panel.shape[1] == side  # nothing right of the picture
        candidates = caption_candidates("class 1", logits[i, 1])
        assert any(np.array_equal(panel[side:], caption_strip(c, side)) for c in candidates)


def test_annotate_false_writes_the_bare_overlays(tmp_path, data):
    """annotate=False: the overlay at the input size, equal to the engine's."""
    model = make_model()
    x = data[0][:2]
    callback = GradCAMCallback(x, log_dir=tmp_path, target=2, annotate=False, strict=True)
    fit(model, data, callback, epochs=1)
    expected = overlay(x, GradCAM(model, "last_conv")(x, 2).heatmaps)
    logged = {tag: value for _, tag, value in read_events(tmp_path)}
    for i in range(2):
        np.testing.assert_allclose(decode_image(logged[f"gradcam/image_{i}"]), expected[i], atol=1)


@pytest.mark.parametrize("method", ["Grad-CAM++", "eigencam"])
def test_other_cam_methods_log_their_own_overlays(tmp_path, data, method):
    """method= any CAM name: the logged overlay is that method's, named in the description."""
    model = make_model()
    x = data[0][:2]
    callback = GradCAMCallback(
        x, log_dir=tmp_path, target=2, annotate=False, strict=True, method=method
    )
    fit(model, data, callback, epochs=1)
    cls = get_method(method)
    expected = overlay(x, cls(model, "last_conv")(x, 2).heatmaps)
    grad_cam = overlay(x, GradCAM(model, "last_conv")(x, 2).heatmaps)
    assert np.abs(expected.astype(int) - grad_cam).max() > 10  # a different picture
    logged = {tag: value for _, tag, value in read_events(tmp_path)}
    for i in range(2):
        np.testing.assert_allclose(decode_image(logged[f"gradcam/image_{i}"]), expected[i], atol=1)


def test_panel_layout_for_small_and_large_pictures():
    """Upscaling is by the smallest integer factor reaching PANEL_MIN_SIZE, never downwards."""
    from tf_gradcam.callback import compose_panel

    rng = np.random.default_rng(1)
    for size in (16, 32, 100, 224):
        picture = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        factor = max(1, math.ceil(PANEL_MIN_SIZE / size))
        panel = compose_panel(picture, ["a class", "score 1.23"])
        side = size * factor
        np.testing.assert_array_equal(panel[:side, :side], upscaled(picture, factor))
        assert colour_bar_columns(panel, side, side)
        assert compose_panel(picture, colorbar=False).shape == (side, side, 3)
    with pytest.raises(ValueError, match=re.escape("Received: picture with dtype float32")):
        compose_panel(np.zeros((4, 4, 3), np.float32))


def test_masses_reach_later_callbacks_through_logs(trained):
    """Callbacks listed after GradCAMCallback (EarlyStopping) see logs['gradcam/cue_mass']."""
    assert len(trained.seen) == 2
    for logs in trained.seen:
        assert 0.0 <= logs["gradcam/cue_mass"] <= 1.0
        assert 0.0 <= logs["gradcam/object_mass"] <= 1.0
    assert trained.stop.best == min(logs["gradcam/cue_mass"] for logs in trained.seen)


def test_traced_once_and_second_fit_reuses_the_instance(tmp_path, data):
    """One build and trace across epochs and fits; each fit closes its writer; freq=2 skips."""
    model = make_model()
    callback = GradCAMCallback(data[0][:3], log_dir=tmp_path, freq=2, update_freq=2)
    fit(model, data, callback, epochs=3)
    explainer = callback.explainer
    assert explainer.trace_count == 1
    assert callback._writer is None  # closed in on_train_end
    fit(model, data, callback, epochs=2)
    assert callback.explainer is explainer
    assert explainer.trace_count == 1
    assert len(glob.glob(str(tmp_path / "gradcam" / "events.*"))) == 2
    events = read_events(tmp_path)
    batch_steps = [s for s, tag, _ in events if tag == "gradcam_batch/image_0"]
    assert batch_steps == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]  # the optimizer's count
    assert [s for s, tag, _ in events if tag == "gradcam/image_0"] == [0, 2, 0]


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["compiled", "eager"])
@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam"])
def test_weights_identical_with_and_without_callback(tmp_path, data, regions, method, run_eagerly):
    """Same seed, same data: training with the callback gives bit-identical weights and losses.

    Batch-level logging explains after every step, so a layer left altered (a guided ReLU
    swapped in) or a draw from the training RNG (Dropout's seed generator, the data shuffle)
    would change the next steps; run eagerly, every step reads the layers' current state.
    """
    runs = []
    for use in (False, True):
        model = make_model(dropout=True)
        model.compile(
            optimizer="adam", loss="sparse_categorical_crossentropy", run_eagerly=run_eagerly
        )
        callbacks = [_every_step_callback(tmp_path, data, method, regions)] if use else []
        keras.utils.set_random_seed(11)
        history = model.fit(*data, epochs=2, batch_size=16, callbacks=callbacks, verbose=0)
        runs.append((model.get_weights(), history.history["loss"]))
    (weights_a, loss_a), (weights_b, loss_b) = runs
    assert loss_a == loss_b
    assert len(weights_a) == len(weights_b)
    for a, b in zip(weights_a, weights_b, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(read_events(tmp_path)) > 0


def _every_step_callback(tmp_path, data, method: str, regions) -> GradCAMCallback:
    """A strict callback logging after every optimizer step, on the first four images."""
    return GradCAMCallback(
        data[0][:4],
        log_dir=tmp_path,
        method=method,
        update_freq=1,
        regions=regions,
        class_names=CLASS_NAMES,
        strict=True,
    )


def next_draws() -> dict[str, np.ndarray]:
    """The next values of every global random generator a callback could draw from."""
    return {
        "numpy": np.random.rand(3),  # noqa: NPY002 (the legacy global state is the subject)
        "python random": np.array([random.random() for _ in range(3)]),
        "tf.random (global seed)": tf.random.uniform((3,)).numpy(),
        "tf.random global Generator": tf.random.get_global_generator().uniform((3,)).numpy(),
        "keras.random (global SeedGenerator)": keras.ops.convert_to_numpy(
            keras.random.uniform((3,))
        ),
    }


@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam"])
def test_global_random_state_untouched(tmp_path, data, regions, method):
    """After the same seeded fit with and without the callback, every global generator
    (NumPy's legacy one, Python's, TensorFlow's global seed and Generator, Keras'
    SeedGenerator) is in the same state and gives the same next draws."""
    runs = []
    for use in (False, True):
        model = make_model(dropout=True)
        callbacks = [_every_step_callback(tmp_path, data, method, regions)] if use else []
        keras.utils.set_random_seed(11)
        tf.random.set_global_generator(tf.random.Generator.from_seed(11))
        keras.random.uniform(())  # creates Keras' global SeedGenerator before fit
        model.fit(*data, epochs=2, batch_size=16, callbacks=callbacks, verbose=0)
        state = np.random.get_state()  # noqa: NPY002
        runs.append((state, random.getstate(), next_draws()))
    (np_a, py_a, draws_a), (np_b, py_b, draws_b) = runs
    for name in draws_a:
        np.testing.assert_array_equal(draws_a[name], draws_b[name], err_msg=name)
    assert np_a[0] == np_b[0] and np_a[2:] == np_b[2:]
    np.testing.assert_array_equal(np_a[1], np_b[1])
    assert py_a == py_b
    assert len(read_events(tmp_path)) > 0


class _Broken:
    """An explainer that raises on every call."""

    layer = "broken"

    def __init__(self, *args):
        self.calls = 0

    def __call__(self, images, target):
        self.calls += 1
        raise RuntimeError("explainer exploded")


class _BreaksAfterWriting(GradCAMCallback):
    """Opens its writer, then fails: the writer must still be closed at the end of fit."""

    def _log(self, prefix, step, logs):
        with self.writer.as_default():
            pass
        raise OSError("disk full")


def test_failures_become_warnings_then_disable(tmp_path, data, monkeypatch):
    """When the explainer raises, fit runs every epoch; after 3 failures the callback stops."""
    monkeypatch.setitem(callback_module._EXPLAINERS, "gradcam", _Broken)
    callback = GradCAMCallback(data[0][:2], log_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(make_model(), data, callback, epochs=MAX_FAILURES + 1)
    assert len(history.history["loss"]) == MAX_FAILURES + 1
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    failures = [m for m in messages if "explainer exploded" in m]
    assert len(failures) == MAX_FAILURES
    assert "RuntimeError: explainer exploded" in failures[0]
    assert sum("disabled itself" in m for m in messages) == 1
    assert callback.explainer.calls == MAX_FAILURES
    assert not (tmp_path / "gradcam").exists()  # the writer is created only to write


def test_panel_and_caption_failures_become_warnings(tmp_path, data, monkeypatch):
    """An exception while composing a panel is a warning; fit runs every epoch, and a later
    fit works again."""

    def broken_panel(*args, **kwargs):
        raise MemoryError("no room for the panel")

    monkeypatch.setattr(callback_module, "compose_panel", broken_panel)
    model = make_model()
    callback = GradCAMCallback(data[0][:2], log_dir=tmp_path, class_names=CLASS_NAMES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(model, data, callback, epochs=2)
    assert len(history.history["loss"]) == 2
    assert sum("MemoryError: no room for the panel" in str(w.message) for w in caught) == 2
    monkeypatch.undo()
    fit(model, data, callback, epochs=1)
    assert any(tag == "gradcam/image_0" for _, tag, _ in read_events(tmp_path))


def test_writer_closed_after_the_callback_disabled_itself(tmp_path, data):
    """A writer opened before the failures is closed in on_train_end all the same."""
    callback = _BreaksAfterWriting(data[0][:2], log_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(make_model(), data, callback, epochs=MAX_FAILURES + 1)
    assert sum("OSError: disk full" in str(w.message) for w in caught) == MAX_FAILURES
    assert callback._writer is None


def test_strict_reraises(tmp_path, data, monkeypatch):
    """strict=True lets the explainer's exception stop fit."""
    monkeypatch.setitem(callback_module._EXPLAINERS, "gradcam", _Broken)
    callback = GradCAMCallback(data[0][:2], log_dir=tmp_path, strict=True)
    with pytest.raises(RuntimeError, match="explainer exploded"):
        fit(make_model(), data, callback, epochs=1)


def test_mixed_precision(tmp_path, data, regions):
    """Under mixed_float16 the callback writes float32-computed overlays and finite masses."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = make_model()
        assert model.get_layer("last_conv").compute_dtype == "float16"
        callback = GradCAMCallback(data[0][:4], log_dir=tmp_path, regions=regions, strict=True)
        history = fit(model, data, callback)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    masses = history.history["gradcam/object_mass"]
    assert len(masses) == 2 and all(0.0 < m <= 1.0 for m in masses)
    images = [value for _, tag, value in read_events(tmp_path) if tag == "gradcam/image_3"]
    assert len(images) == 2 and decode_image(images[-1]).std() > 0


_MIRRORED_SCRIPT = """
import importlib.abc, os, sys

class _NoTensorBoard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorboard":
            raise ImportError("tensorboard is blocked in this test")

sys.meta_path.insert(0, _NoTensorBoard())
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
from tf_gradcam import GradCAMCallback

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
with strategy.scope():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(5, 3, activation="relu", name="last_conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
rng = np.random.default_rng(0)
x, y = rng.random((64, 16, 16, 3), dtype=np.float32), rng.integers(0, 3, 64)
callback = GradCAMCallback(
    (x[:4], y[:4]), log_dir=sys.argv[1], target="labels", update_freq=2, strict=True,
    regions={"cue": np.array([0, 0, 5, 5])},
)
history = model.fit(x, y, epochs=2, batch_size=16, callbacks=[callback], verbose=0)
assert len(history.history["gradcam/cue_mass"]) == 2
assert callback.explainer.trace_count == 1
print("OK")
"""


def test_mirrored_strategy_writes_one_set(tmp_path):
    """MirroredStrategy on 2 logical CPUs, tensorboard blocked: each tag/step written once."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_MIRRORED_SCRIPT), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")
    assert len(glob.glob(str(tmp_path / "gradcam" / "events.*"))) == 1
    written = [(step, tag) for step, tag, _ in read_events(tmp_path)]
    assert len(written) == len(set(written))
    assert sorted({s for s, tag in written if tag == "gradcam_batch/image_0"}) == [2, 4, 6, 8]
    assert sorted({s for s, tag in written if tag == "gradcam/cue_mass"}) == [0, 1]


def test_dataset_sample_with_one_hot_labels(data):
    """A batched (images, one-hot labels) dataset is sampled to max_images images and indices."""
    x, y = data
    dataset = tf.data.Dataset.from_tensor_slices((x, np.eye(3, dtype=np.float32)[y])).batch(4)
    callback = GradCAMCallback(dataset, target="labels", max_images=6)
    np.testing.assert_array_equal(callback.images, x[:6])
    np.testing.assert_array_equal(callback.labels, y[:6])
    unbatched = GradCAMCallback(tf.data.Dataset.from_tensor_slices(x).repeat(), max_images=2)
    np.testing.assert_array_equal(unbatched.images, x[:2])
    assert unbatched.labels is None


def test_boxes_and_masks_give_the_same_region():
    """A box (x0, y0, x1, y1), ends exclusive, equals the mask it describes."""
    mask = np.zeros((3, SIZE, SIZE), bool)
    mask[:, 2:9, 5:16] = True  # rows 2..8, columns 5..15
    boxes = np.tile([5, 2, 16, 9], (3, 1))
    regions = {"boxes": boxes, "masks": mask, "box": boxes[0], "mask": mask[0]}
    resolved = callback_module._region_masks(regions, (3, SIZE, SIZE))
    for name in regions:
        np.testing.assert_array_equal(np.broadcast_to(resolved[name], mask.shape), mask)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "lime"}, "Received: method='lime'"),
        ({"freq": -1}, "Received: freq=-1"),
        ({"freq": 0}, "nothing would be logged"),
        ({"update_freq": 0}, "Received: update_freq=0"),
        ({"max_images": 0}, "Received: max_images=0"),
        ({"target": TopK(2)}, "TopK"),
        ({"target": "labels"}, "needs labels"),
        ({"target": [0, 1]}, "gives 2 classes for 4 images"),
        ({"regions": {"cue": np.zeros((3, SIZE, SIZE))}}, "Received shape (3, 16, 16)"),
        ({"regions": {"a cue": np.zeros((SIZE, SIZE))}}, "Region names"),
        ({"class_names": "cat"}, "Received: class_names='cat'"),
        ({"class_names": ["cat", ""]}, "non-empty strings"),
        ({"class_names": ["cat", 1]}, "Received: class_names=['cat', 1]"),
        ({"class_names": []}, "Received: class_names=[]"),
        ({"class_names": ["cat"], "target": 2}, "`target` gives class 2,"),
        ({"class_names": ["cat"], "target": [0, 1, 0, 0]}, "`target` gives class 1,"),
        ({"annotate": "yes"}, "Received: annotate='yes'"),
    ],
)
def test_bad_arguments_raise_at_construction(data, kwargs, message):
    """Wrong options fail in __init__, naming the argument and the received value."""
    kwargs = {"max_images": 2, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        GradCAMCallback(data[0][:4], **kwargs)


def test_class_names_must_name_every_label(data):
    """target='labels' with a label beyond class_names is refused at construction."""
    x = data[0]
    labels = np.full(4, 2)
    with pytest.raises(ValueError, match=re.escape("The labels give class 2,")):
        GradCAMCallback((x[:4], labels), target="labels", class_names=["cat", "dog"])
    callback = GradCAMCallback((x[:4], labels), target="labels", class_names=list(CLASS_NAMES))
    assert callback.class_names == CLASS_NAMES


@pytest.mark.parametrize("rank", [3, 5])
def test_signals_and_volumes_log_their_pictures(tmp_path, rank):
    """Conv1D / Conv3D models: the bare panel is the signal picture / the orthogonal slices."""
    from tf_gradcam.pictures import orthogonal_slices, signal_picture

    rng = np.random.default_rng(3)
    if rank == 3:
        inputs = keras.Input((32, 2))
        x = keras.layers.Conv1D(4, 3, activation="relu", name="last_conv")(inputs)
        pooled = keras.layers.GlobalAveragePooling1D()(x)
        x_data = rng.normal(size=(16, 32, 2)).astype(np.float32)
    else:
        inputs = keras.Input((6, 8, 8, 1))
        x = keras.layers.Conv3D(4, 3, activation="relu", name="last_conv")(inputs)
        pooled = keras.layers.GlobalAveragePooling3D()(x)
        x_data = rng.normal(size=(16, 6, 8, 8, 1)).astype(np.float32)
    model = keras.Model(inputs, keras.layers.Dense(2)(pooled))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    sample = x_data[:2]
    callback = GradCAMCallback(
        sample, log_dir=tmp_path, target=1, layer="last_conv", annotate=False, strict=True
    )
    fit(model, (x_data, rng.integers(0, 2, 16)), callback, epochs=1)
    heatmaps = GradCAM(model, "last_conv")(sample, 1).heatmaps
    draw = signal_picture if rank == 3 else orthogonal_slices
    logged = {tag: value for _, tag, value in read_events(tmp_path)}
    for i in range(2):
        np.testing.assert_array_equal(
            decode_image(logged[f"gradcam/image_{i}"]), draw(sample[i], heatmaps[i])
        )
    with pytest.raises(tf_gradcam.InputError, match="regions"):
        GradCAMCallback(sample, log_dir=tmp_path, method="guided_gradcam")
