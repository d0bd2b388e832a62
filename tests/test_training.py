"""ExplanationGuidedModel: `fit` adds the explanation loss, Keras-natively and correctly.

The updates are checked against independent computations: the gradient of the
compiled loss plus the weighted mean of each annotated image's explanation loss,
computed image by image outside the wrapper; a plain Keras step; the same step on
one device. The explanation losses themselves are checked against finite
differences in tests/test_explanation_losses.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import tf_gradcam
from tf_gradcam import (
    NO_MASK,
    ExplanationGuidedModel,
    GradCAMMassLoss,
    HINTLoss,
    NonFiniteLossError,
    RRRLoss,
)
from tf_gradcam.errors import InputError, NotSpatialError, UnsupportedModelError

REPO = Path(__file__).resolve().parents[1]
LEARNING_RATE = 0.1


def make_model(seed: int = 0, channels: int = 2) -> keras.Model:
    """x (8×8×2) → 2×2/2 conv, tanh ('features') → 1×1 conv, tanh → GAP → Dense(3), softmax."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, channels))
    features = layers.Conv2D(4, 2, strides=2, activation="tanh", name="features")(inputs)
    hidden = layers.Conv2D(3, 1, activation="tanh", name="hidden")(features)
    pooled = layers.GlobalAveragePooling2D()(hidden)
    return keras.Model(inputs, layers.Dense(3, activation="softmax", name="head")(pooled))


def make_data(count: int = 8, annotated: tuple[int, ...] = (0, 2, 3), channels: int = 2):
    """Random images and labels; masks (a corner box or random values) on `annotated` only."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((count, 8, 8, channels)).astype(np.float32)
    y = rng.integers(0, 3, count)
    masks = np.full((count, 8, 8), NO_MASK, np.float32)
    for i in annotated:
        masks[i] = rng.random((8, 8)) if i % 2 else 0.0
        masks[i, :4, :4] = 1.0
    return x, y, masks


def guided_model(loss, seed: int = 0, optimizer=None) -> ExplanationGuidedModel:
    guided = ExplanationGuidedModel(make_model(seed), loss)
    guided.compile(
        optimizer=optimizer or keras.optimizers.SGD(LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
    )
    return guided


def reference_step(model, loss, x, y, masks) -> tuple[list[np.ndarray], float, float]:
    """Weights after one SGD step on CE + weight × mean of per-image losses, computed apart."""
    loss.build(model)
    annotated = [i for i in range(len(x)) if np.any(masks[i] >= 0)]
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        cross_entropy = keras.losses.sparse_categorical_crossentropy(y, model(x))
        cross_entropy = tf.reduce_mean(cross_entropy)
        per_image = [  # one image at a time: no batching, gathering or averaging shared
            loss.per_image(x[i : i + 1], tf.constant([y[i]]), np.clip(masks[i : i + 1], 0, 1))
            for i in annotated
        ]
        explanation = loss.weight * tf.reduce_mean(tf.concat(per_image, 0)) if annotated else 0.0
        total = cross_entropy + explanation
    grads = tape.gradient(total, variables)
    weights = [
        v.numpy() - LEARNING_RATE * (0 if g is None else g.numpy())
        for v, g in zip(variables, grads, strict=True)
    ]
    return weights, float(total), float(explanation)


@pytest.mark.parametrize(
    "loss",
    [
        GradCAMMassLoss(layer="features", weight=2.0),
        RRRLoss(weight=50.0),
        HINTLoss(layer="features", weight=3.0),
    ],
    ids=["mass", "rrr", "hint"],
)
def test_one_step_follows_the_gradient_of_compiled_plus_explanation_loss(loss):
    """A batch mixing annotated and unannotated images: the update is −lr ∇(CE + λ·mean)."""
    x, y, masks = make_data()
    guided = guided_model(loss)
    model = guided.explained_model
    expected, total, explanation = reference_step(make_model(), loss, x, y, masks)
    history = guided.fit(
        x, {"labels": y, "masks": masks}, batch_size=8, epochs=1, shuffle=False, verbose=0
    ).history
    for got, want in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert explanation > 0
    np.testing.assert_allclose(history["explanation_loss"][0], explanation, rtol=1e-4)
    np.testing.assert_allclose(history["loss"][0], total, rtol=1e-4)


def test_with_xla_every_image_is_explained_and_unannotated_ones_weigh_zero():
    """jit_compile=True (Keras' default on GPUs): the same update as the reference, no NaN."""
    x, y, masks = make_data()
    loss = GradCAMMassLoss(layer="features", weight=2.0)
    guided = ExplanationGuidedModel(make_model(), loss)
    guided.compile(
        keras.optimizers.SGD(LEARNING_RATE), "sparse_categorical_crossentropy", jit_compile=True
    )
    expected, _, explanation = reference_step(make_model(), loss, x, y, masks)
    history = guided.fit(
        x, {"labels": y, "masks": masks}, batch_size=8, epochs=1, shuffle=False, verbose=0
    ).history
    for got, want in zip(guided.explained_model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(history["explanation_loss"][0], explanation, rtol=1e-4)


def test_a_batch_without_annotation_is_a_plain_keras_step():
    """All masks NO_MASK: the weights after a step equal those of model.fit on the labels."""
    x, y, _ = make_data()
    masks = np.full((8, 8, 8), NO_MASK, np.float32)
    guided = guided_model(GradCAMMassLoss(layer="features", weight=5.0))
    plain = make_model()
    plain.compile(keras.optimizers.SGD(LEARNING_RATE), "sparse_categorical_crossentropy")
    plain.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    history = guided.fit(
        x, {"labels": y, "masks": masks}, batch_size=8, epochs=1, shuffle=False, verbose=0
    ).history
    for got, want in zip(guided.explained_model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert history["explanation_loss"] == [0.0]


def test_plain_labels_train_without_explanation_loss():
    """`(x, y)` data train with the compiled loss alone, as the wrapped model would."""
    x, y, _ = make_data()
    guided = guided_model(GradCAMMassLoss(layer="features"))
    plain = make_model()
    plain.compile(keras.optimizers.SGD(LEARNING_RATE), "sparse_categorical_crossentropy")
    plain.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    guided.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(guided.explained_model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_no_retracing_across_steps_and_epochs():
    """The explanation loss is traced into the step at the first batch only, not per step."""
    x, y, masks = make_data(32, annotated=tuple(range(0, 32, 3)))
    guided = guided_model(GradCAMMassLoss(layer="features"))
    counts = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: counts.append(guided.explanation_trace_count)
    )
    guided.fit(
        x, {"labels": y, "masks": masks}, batch_size=8, epochs=3, verbose=0, callbacks=[record]
    )
    assert len(counts) == 12
    # TensorFlow traces a step twice when its first call creates variables (the optimizer's)
    assert counts[0] in (1, 2) and counts == [counts[0]] * 12


def test_validation_reports_the_explanation_loss():
    """evaluate() with masks logs explanation_loss = the loss called on the same batch."""
    x, y, masks = make_data()
    loss = GradCAMMassLoss(layer="features", weight=2.0)
    guided = guided_model(loss)
    logs = guided.evaluate(
        x, {"labels": y, "masks": masks}, batch_size=8, verbose=0, return_dict=True
    )
    expected = float(loss(guided.explained_model, x, y, masks))
    np.testing.assert_allclose(logs["explanation_loss"], expected, rtol=1e-5)
    assert expected > 0


def test_a_non_finite_explanation_loss_stops_fit_naming_the_step_and_the_cause():
    """A weight that overflows at the third step: NonFiniteLossError names step 3, weights kept."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 1))
    big = keras.initializers.RandomNormal(stddev=30.0)
    model = keras.Model(
        inputs,
        layers.Dense(3, activation="softmax", kernel_initializer=big)(layers.Flatten()(inputs)),
    )
    guided = ExplanationGuidedModel(model, RRRLoss(weight=3e38))
    guided.compile(keras.optimizers.SGD(1e-3), "sparse_categorical_crossentropy")
    x = np.random.default_rng(0).standard_normal((6, 4, 4, 1)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    masks = np.full((6, 4, 4), NO_MASK, np.float32)
    masks[4] = 1.0  # only the third batch (images 4, 5) is annotated
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: seen.append(model.get_weights())
    )
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 3 \(epoch 0, batch 2\)") as info:
        guided.fit(
            x,
            {"labels": y, "masks": masks},
            batch_size=2,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[record],
        )
    assert "explanation loss RRRLoss(weight=3e+38) is inf" in str(info.value)
    assert len(seen) == 3  # stopped after the third batch
    for got, before in zip(model.get_weights(), seen[-1], strict=True):
        np.testing.assert_array_equal(got, before)  # its update was not applied


def test_a_non_finite_compiled_loss_is_reported_as_such():
    """NaN images make the compiled loss NaN: the error names it, not the explanation loss."""
    x, y, masks = make_data()
    x[5] = np.nan
    guided = guided_model(GradCAMMassLoss(layer="features"))
    with pytest.raises(NonFiniteLossError, match=r"step 2 \(epoch 0, batch 1\): the compiled loss"):
        guided.fit(x, {"labels": y, "masks": masks}, batch_size=4, shuffle=False, verbose=0)
    assert all(np.all(np.isfinite(w)) for w in guided.explained_model.get_weights())


def test_mixed_precision_matches_float32_to_half_precision():
    """Under mixed_float16 (loss scaling on), the logged losses equal float32's to fp16 accuracy."""
    x, y, masks = make_data()
    data = (x, {"labels": y, "masks": masks})
    results = {}
    for policy in ("mixed_float16", "float32"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            guided = guided_model(
                GradCAMMassLoss(layer="features", weight=2.0),
                optimizer=keras.optimizers.SGD(0.0),  # keep the weights: compare the losses
            )
            if policy == "mixed_float16":
                assert guided.explained_model.get_layer("features").compute_dtype == "float16"
                assert isinstance(guided.optimizer, keras.optimizers.LossScaleOptimizer)
            results[policy] = guided.fit(*data, batch_size=8, verbose=0).history
        finally:
            keras.mixed_precision.set_global_policy("float32")
    for key in ("loss", "explanation_loss"):
        np.testing.assert_allclose(
            results["mixed_float16"][key], results["float32"][key], rtol=2e-2
        )


def test_gradcam_callback_on_the_wrapper_logs_the_trained_models_region_mass(tmp_path):
    """GradCAMCallback passed to the wrapper's fit measures the wrapped model's maps."""
    x, y, masks = make_data(16, annotated=(0, 1, 2, 3, 4, 5), channels=3)
    x = (x - x.min()) / (x.max() - x.min())  # images the panels can show
    guided = ExplanationGuidedModel(make_model(channels=3), GradCAMMassLoss(layer="features"))
    guided.compile(keras.optimizers.SGD(LEARNING_RATE), "sparse_categorical_crossentropy")
    region = np.zeros((4, 8, 8), bool)
    region[:, :4, :4] = True
    callback = tf_gradcam.GradCAMCallback(
        x[:4], log_dir=tmp_path, layer="features", regions={"corner": region}
    )
    history = guided.fit(
        x, {"labels": y, "masks": masks}, batch_size=8, epochs=2, verbose=0, callbacks=[callback]
    ).history
    heatmaps = tf_gradcam.GradCAM(guided.explained_model, "features")(x[:4]).heatmaps
    expected = np.mean((heatmaps * region).sum((1, 2)) / heatmaps.sum((1, 2)))
    np.testing.assert_allclose(history["gradcam/corner_mass"][-1], expected, rtol=1e-4)


def test_wrapping_does_not_change_the_model():
    """Building the wrapper adds no node, layer or weight change to the user's model."""
    model = make_model()
    config, weights = model.get_config(), model.get_weights()
    guided = ExplanationGuidedModel(model, GradCAMMassLoss(layer="features"))
    assert model.get_config() == config
    assert len(guided.trainable_variables) == len(model.trainable_variables)
    features = keras.Model(model.input, model.get_layer("features").output)  # still one node
    x, _, _ = make_data()
    np.testing.assert_array_equal(guided.predict(x, verbose=0), model.predict(x, verbose=0))
    assert features(x).shape == (8, 4, 4, 4)
    for got, want in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(got, want)


def test_bad_inputs_raise_typed_errors():
    """Subclassed models, other losses, unknown target keys, wrong masks, no feature map."""

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(UnsupportedModelError, match="Received: model of type Subclassed"):
        ExplanationGuidedModel(Subclassed(), GradCAMMassLoss())
    with pytest.raises(TypeError, match="Received: loss='mse'"):
        ExplanationGuidedModel(make_model(), "mse")
    inputs = keras.Input((8, 8, 2))
    dense = keras.Model(inputs, layers.Dense(3)(layers.Flatten()(inputs)))
    with pytest.raises(NotSpatialError):
        ExplanationGuidedModel(dense, GradCAMMassLoss())
    x, y, masks = make_data()
    guided = guided_model(GradCAMMassLoss(layer="features"))
    with pytest.raises(InputError, match=r"Received: a dict with keys \['labels', 'mask'\]"):
        guided.fit(x, {"labels": y, "mask": masks}, batch_size=8, verbose=0)
    with pytest.raises(InputError, match="The masks are 4x8 but the images are 8x8"):
        guided.fit(x, {"labels": y, "masks": masks[:, :4]}, batch_size=8, verbose=0)
    with pytest.raises(InputError, match=r"Received: masks of shape \((None|8), 64\)"):
        guided.fit(x, {"labels": y, "masks": masks.reshape(8, 64)}, batch_size=8, verbose=0)


_MIRRORED_SCRIPT = """
import sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_training import make_data, make_model
from tf_gradcam import ExplanationGuidedModel, GradCAMMassLoss

# replica 0 gets images 0-3 (three annotated), replica 1 images 4-7 (one annotated)
x, y, masks = make_data(8, annotated=(0, 1, 2, 6))
results = {}
for name, strategy in (
    ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])),
    ("one device", tf.distribute.OneDeviceStrategy("/cpu:0")),
):
    with strategy.scope():
        guided = ExplanationGuidedModel(make_model(), GradCAMMassLoss(layer="features", weight=2.0))
        guided.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    history = guided.fit(x, {"labels": y, "masks": masks}, batch_size=8, shuffle=False, verbose=0)
    results[name] = (guided.explained_model.get_weights(), history.history)
assert strategy.num_replicas_in_sync == 1
difference = max(
    float(np.abs(a - b).max())
    for a, b in zip(results["mirrored"][0], results["one device"][0], strict=True)
)
print("weights", difference)
for key in ("loss", "explanation_loss"):
    print(key, results["mirrored"][1][key][0], results["one device"][1][key][0])
"""


def test_mirrored_strategy_step_equals_the_one_device_step():
    """Two replicas with 3 and 1 annotated images: the same update and logs as one device."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_MIRRORED_SCRIPT), str(REPO / "tests")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert float(lines["weights"]) < 1e-6
    for key in ("loss", "explanation_loss"):
        mirrored, one = (float(v) for v in lines[key].split())
        np.testing.assert_allclose(mirrored, one, rtol=1e-5)


_LOAD_SCRIPT = """
import importlib.abc, sys

class _NoPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tf_gradcam":
            raise ImportError("tf_gradcam is blocked in this test")

sys.meta_path.insert(0, _NoPackage())
import keras
import numpy as np

model = keras.models.load_model(sys.argv[1])
data = np.load(sys.argv[2])
print(float(np.abs(model.predict(data["x"], verbose=0) - data["predictions"]).max()))
"""


def test_the_trained_model_saves_and_loads_without_tf_gradcam(tmp_path):
    """After a guided fit the model is plain Keras: it loads where tf_gradcam cannot be imported."""
    x, y, masks = make_data()
    guided = guided_model(GradCAMMassLoss(layer="features"))
    guided.fit(x, {"labels": y, "masks": masks}, batch_size=4, verbose=0)
    model = guided.explained_model
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "data.npz", x=x, predictions=model.predict(x, verbose=0))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ""}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_LOAD_SCRIPT),
            str(tmp_path / "model.keras"),
            str(tmp_path / "data.npz"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-6
