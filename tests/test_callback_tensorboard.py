"""GradCAMCallback's logs as TensorBoard reads them: its own event loader and data provider.

TensorBoard's Python data path (`EventMultiplexer` → `MultiplexerDataProvider`,
what `tensorboard --load_fast=false` serves) reads the event files; every
value it returns is compared with an independent computation: the engine's
overlays and heatmaps and the model's own logits on the weights of each
logged epoch. Skipped only when the `tensorboard` package is not installed.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("tensorboard")

from tensorboard import context as tb_context
from tensorboard.backend.event_processing import data_ingester, data_provider
from tensorboard.backend.event_processing import plugin_event_multiplexer as multiplexer_lib
from tensorboard.plugins.text import text_plugin
from test_callback import (
    CLASS_NAMES,
    SCALE,
    SIZE,
    at_weights,
    caption_candidates,
    colour_bar_columns,
    head_logits,
    make_model,
    parse_table,
    upscaled,
)

from tf_gradcam import GradCAM, GradCAMCallback, overlay
from tf_gradcam.callback import caption_strip

EPOCHS = 2
STEPS_PER_EPOCH = 4  # 64 images, batch 16
SHOWN = 3


def load(log_dir, **samples_per_plugin) -> SimpleNamespace:
    """TensorBoard's data provider over `log_dir`, with its default sampling unless overridden.

    `samples_per_plugin` plays the part of `--samples_per_plugin`.
    """
    tensor_guidance = dict(data_ingester.DEFAULT_TENSOR_SIZE_GUIDANCE)
    tensor_guidance.update(samples_per_plugin)
    multiplexer = multiplexer_lib.EventMultiplexer(
        size_guidance=data_ingester.DEFAULT_SIZE_GUIDANCE,
        tensor_size_guidance=tensor_guidance,
    )
    multiplexer.AddRunsFromDirectory(str(log_dir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(log_dir))
    ctx = tb_context.RequestContext()
    return SimpleNamespace(multiplexer=multiplexer, provider=provider, ctx=ctx)


def images_of(board, run: str) -> dict[str, dict[int, list[np.ndarray]]]:
    """{tag: {step: [decoded PNGs]}} as the image plugin serves them (blobs 2.. of a step)."""
    series = board.provider.read_blob_sequences(
        board.ctx, experiment_id="", plugin_name="images", downsample=1000
    )[run]
    found = {}
    for tag, data in series.items():
        found[tag] = {}
        for datum in data:
            width, height, *pngs = datum.values
            read = [board.provider.read_blob(board.ctx, blob_key=b.blob_key) for b in pngs]
            pictures = [tf.io.decode_png(png).numpy() for png in read]
            for picture in pictures:
                assert picture.shape[:2] == (
                    int(board.provider.read_blob(board.ctx, blob_key=height.blob_key)),
                    int(board.provider.read_blob(board.ctx, blob_key=width.blob_key)),
                )
            found[tag][datum.step] = pictures
    return found


def scalars_of(board, run: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the scalars plugin's data."""
    series = board.provider.read_scalars(
        board.ctx, experiment_id="", plugin_name="scalars", downsample=1000
    ).get(run, {})
    return {tag: {d.step: d.value for d in data} for tag, data in series.items()}


def texts_of(board, run: str) -> dict[str, dict[int, str]]:
    """{tag: {step: string}} from the text plugin's data."""
    series = board.provider.read_tensors(
        board.ctx, experiment_id="", plugin_name="text", downsample=1000
    )[run]
    return {
        tag: {d.step: d.numpy.item().decode("utf-8") for d in data} for tag, data in series.items()
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    """A 2-epoch fit with regions, true-label targets, class names, update_freq=3, and
    `keras.callbacks.TensorBoard` sharing `log_dir`, listed after GradCAMCallback."""
    rng = np.random.default_rng(0)
    x, y = rng.random((64, SIZE, SIZE, 3), dtype=np.float32), rng.integers(0, 3, 64)
    log_dir = tmp_path_factory.mktemp("logs")
    centre = np.zeros((SIZE, SIZE), bool)
    centre[4:12, 4:12] = True
    cue = np.zeros((SIZE, SIZE), bool)
    cue[:5, :5] = True  # the box (0, 0, 5, 5), ends exclusive
    callback = GradCAMCallback(
        (x[:8], y[:8]),
        log_dir=log_dir,
        target="labels",
        max_images=SHOWN,
        regions={"cue": np.array([0, 0, 5, 5]), "object": centre},
        update_freq=3,
        class_names=CLASS_NAMES,
        strict=True,
    )
    model = make_model()
    weights: list[list[np.ndarray]] = []
    spy = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: weights.append(model.get_weights())
    )
    board = keras.callbacks.TensorBoard(log_dir=str(log_dir), histogram_freq=0)
    model.fit(x, y, epochs=EPOCHS, batch_size=16, callbacks=[callback, board, spy], verbose=0)
    return SimpleNamespace(
        x=x[:8],
        y=y[:8],
        model=model,
        weights=weights,
        regions={"cue": cue, "object": centre},
        board=load(log_dir),
    )


def engine_at(run, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps, logits) of the 8 sample images with the weights after `epoch`."""
    model = at_weights(run.model, run.weights[epoch])
    heatmaps = GradCAM(model, "last_conv")(run.x, run.y.astype(np.int32)).heatmaps
    return heatmaps, head_logits(model, run.x)


def test_tensorboard_lists_the_runs_tags_plugins_and_steps(run):
    """The gradcam run holds image, text and scalar tags with the epochs or optimizer steps."""
    mux = run.board.multiplexer
    assert set(mux.Runs()) == {"gradcam", "train"}
    images = run.board.provider.list_blob_sequences(
        run.board.ctx, experiment_id="", plugin_name="images"
    )["gradcam"]
    epoch_images = {f"gradcam/image_{i}" for i in range(SHOWN)}
    batch_images = {t.replace("gradcam/", "gradcam_batch/") for t in epoch_images}
    assert set(images) == epoch_images | batch_images
    for tag in epoch_images:
        assert images[tag].max_step == EPOCHS - 1
        assert images[tag].max_length == 2 + 1  # width, height, then one PNG per step
        description = mux.SummaryMetadata("gradcam", tag).summary_description
        assert "Grad-CAM of sample image" in description and "`last_conv`" in description
    steps = [s for s in range(1, EPOCHS * STEPS_PER_EPOCH + 1) if s % 3 == 0]
    for tag in batch_images:
        assert images[tag].max_step == steps[-1]
    scalars = scalars_of(run.board, "gradcam")
    assert set(scalars) == {
        f"{prefix}/{name}_mass" for prefix in ("gradcam", "gradcam_batch") for name in run.regions
    }
    assert sorted(scalars["gradcam/cue_mass"]) == list(range(EPOCHS))
    assert sorted(scalars["gradcam_batch/cue_mass"]) == steps
    texts = texts_of(run.board, "gradcam")
    assert sorted(texts) == ["gradcam/targets", "gradcam_batch/targets"]
    assert sorted(texts["gradcam/targets"]) == list(range(EPOCHS))


def test_served_pngs_hold_the_engine_overlay_colour_bar_and_caption(run):
    """Each served PNG: the engine's overlay for that epoch, upscaled; the jet bar; the caption."""
    images = images_of(run.board, "gradcam")
    side = SIZE * SCALE
    for epoch in range(EPOCHS):
        heatmaps, logits = engine_at(run, epoch)
        expected = upscaled(overlay(run.x, heatmaps))
        for i in range(SHOWN):
            (panel,) = images[f"gradcam/image_{i}"][epoch]
            np.testing.assert_allclose(panel[:side, :side], expected[i], atol=1)
            assert colour_bar_columns(panel, side, side)
            label = run.y[i]
            candidates = caption_candidates(CLASS_NAMES[label], logits[i, label])
            width = panel.shape[1]
            assert any(np.array_equal(panel[side:], caption_strip(c, width)) for c in candidates)


def test_scalars_are_the_region_masses(run):
    """The scalars plugin's values equal Σ heatmap·mask / Σ heatmap, averaged over images."""
    scalars = scalars_of(run.board, "gradcam")
    for epoch in range(EPOCHS):
        heatmaps, _ = engine_at(run, epoch)
        for name, mask in run.regions.items():
            mass = np.mean((heatmaps * mask).sum((1, 2)) / heatmaps.sum((1, 2)))
            np.testing.assert_allclose(scalars[f"gradcam/{name}_mass"][epoch], mass, rtol=1e-5)


def test_text_is_a_table_of_class_name_and_logit(run):
    """The text plugin renders a table; its rows give the class, its name and the logit."""
    texts = texts_of(run.board, "gradcam")["gradcam/targets"]
    for epoch in range(EPOCHS):
        _, logits = engine_at(run, epoch)
        html = text_plugin.text_array_to_html(np.array(texts[epoch].encode()), True)
        assert "<table>" in html
        rows = parse_table(texts[epoch])
        assert len(rows) == SHOWN
        for i, row in enumerate(rows):
            label = run.y[i]
            assert (int(row["image"]), int(row["class"])) == (i, label)
            assert row["name"] == CLASS_NAMES[label] and CLASS_NAMES[label] in html
            np.testing.assert_allclose(float(row["score"]), logits[i, label], rtol=5e-4)


def test_keras_tensorboard_listed_after_plots_the_masses_again(run):
    """keras.callbacks.TensorBoard after GradCAMCallback writes logs' masses as epoch_* scalars
    in its train run: the same values as the gradcam run's."""
    ours = scalars_of(run.board, "gradcam")
    theirs = scalars_of(run.board, "train")
    for name in run.regions:
        copy = theirs[f"epoch_gradcam/{name}_mass"]
        assert sorted(copy) == list(range(EPOCHS))
        for epoch in range(EPOCHS):
            np.testing.assert_allclose(copy[epoch], ours[f"gradcam/{name}_mass"][epoch], rtol=1e-6)


def test_keras_tensorboard_listed_before_keeps_one_copy(tmp_path):
    """Listed before GradCAMCallback, keras.callbacks.TensorBoard does not see the masses;
    callbacks after GradCAMCallback (History) still do."""
    rng = np.random.default_rng(1)
    x, y = rng.random((32, SIZE, SIZE, 3), dtype=np.float32), rng.integers(0, 3, 32)
    callback = GradCAMCallback(
        x[:2], log_dir=tmp_path, regions={"cue": np.array([0, 0, 5, 5])}, strict=True
    )
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path))
    history = make_model().fit(
        x, y, epochs=2, batch_size=16, callbacks=[board, callback], verbose=0
    )
    assert len(history.history["gradcam/cue_mass"]) == 2
    loaded = load(tmp_path)
    assert "epoch_loss" in scalars_of(loaded, "train")
    assert not any("gradcam" in tag for tag in scalars_of(loaded, "train"))
    assert sorted(scalars_of(loaded, "gradcam")["gradcam/cue_mass"]) == [0, 1]


def test_default_sampling_keeps_10_images_per_tag(tmp_path):
    """TensorBoard's default reservoir keeps 10 image steps of 12 logged (the docs' warning);
    `--samples_per_plugin images=100` keeps all 12."""
    epochs = 12
    rng = np.random.default_rng(2)
    x, y = rng.random((16, SIZE, SIZE, 3), dtype=np.float32), rng.integers(0, 3, 16)
    callback = GradCAMCallback(x[:1], log_dir=tmp_path, strict=True)
    make_model().fit(x, y, epochs=epochs, batch_size=16, callbacks=[callback], verbose=0)
    default = images_of(load(tmp_path), "gradcam")["gradcam/image_0"]
    assert data_ingester.DEFAULT_TENSOR_SIZE_GUIDANCE["images"] == 10
    assert len(default) == 10 and epochs - 1 in default  # the last step is always kept
    kept = images_of(load(tmp_path, images=100), "gradcam")["gradcam/image_0"]
    assert sorted(kept) == list(range(epochs))
