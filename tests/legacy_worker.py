"""Run under `TF_USE_LEGACY_KERAS=1` by test_legacy.py: tf.keras 2 models against Keras 3 twins.

With the variable set before TensorFlow is imported, `tf.keras` is the
tf.keras 2 package (`tf_keras`) while `import keras` stays Keras 3, as in a
user's process that still builds its models with `tf.keras`. Prints one JSON
object: the largest differences between each result on the tf.keras model
and on a Keras 3 twin with the same weights, and what the callback logged.
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import tf_gradcam


def build(library, sequential: bool):
    """conv(relu) → conv → ReLU → max-pool → GAP → dense(softmax), in `library`."""
    stack = [
        library.layers.Conv2D(6, 3, activation="relu", name="c1"),
        library.layers.Conv2D(5, 3, name="c2"),
        library.layers.ReLU(name="r2"),
        library.layers.MaxPooling2D(name="pool"),
        library.layers.GlobalAveragePooling2D(name="gap"),
        library.layers.Dense(3, activation="softmax", name="head"),
    ]
    if sequential:
        return library.Sequential([library.Input((16, 16, 3)), *stack], name="seq")
    inputs = library.Input((16, 16, 3))
    x = inputs
    for layer in stack:
        x = layer(x)
    return library.Model(inputs, x, name="fn")


def largest(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def logged_images(log_dir: Path) -> dict[str, np.ndarray]:
    found = {}
    for path in sorted(log_dir.glob("gradcam/events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag.startswith("gradcam/image_"):
                    png = value.tensor.string_val[2]
                    found[value.tag] = tf.io.decode_png(png).numpy()
    return found


def fit_with_callback(model, images, labels, log_dir: Path) -> dict[str, np.ndarray]:
    """One epoch at learning rate 0 (weights unchanged) with a strict callback."""
    library = keras if isinstance(model, keras.Model) else tf.keras
    model.compile(library.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    callback = tf_gradcam.GradCAMCallback(images[:3], log_dir=str(log_dir), strict=True)
    model.fit(images, labels, epochs=1, batch_size=8, verbose=0, callbacks=[callback])
    return logged_images(log_dir)


def main() -> None:
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(0)
    images = rng.random((8, 16, 16, 3), dtype=np.float32)
    labels = rng.integers(0, 3, 8)
    report: dict = {"tf_keras_module": tf.keras.Model.__module__}
    folder = Path(tempfile.mkdtemp())
    for sequential in (False, True):
        kind = "sequential" if sequential else "functional"
        tf.keras.utils.set_random_seed(1)  # fixed weights: Grad-CAM maps with heat
        legacy, twin = build(tf.keras, sequential), build(keras, sequential)
        for mine, theirs in zip(legacy.layers, twin.layers, strict=True):
            theirs.set_weights(mine.get_weights())
        diffs: dict = {}
        report[kind] = diffs
        report[f"{kind}_class"] = type(legacy).__module__
        for layer in (None, "c2", "c1"):
            for target in (None, 1, tf_gradcam.TopK(2)):
                a = tf_gradcam.GradCAM(legacy, layer)(images, target=target)
                b = tf_gradcam.GradCAM(twin, layer)(images, target=target)
                key = f"gradcam/{layer}/{target}"
                diffs[key] = max(largest(a.heatmaps, b.heatmaps), largest(a.scores, b.scores))
                if layer is None:
                    report[f"{kind}_default_layer"] = [a.layer, b.layer]
        # the scores are the logits: GAP features through the head's kernel and bias
        features = tf.keras.Model(legacy.inputs, legacy.get_layer("gap").output)(images)
        kernel, bias = legacy.get_layer("head").get_weights()
        logits = features.numpy() @ kernel + bias
        diffs["scores_are_logits"] = largest(
            tf_gradcam.GradCAM(legacy)(images).scores, logits.max(axis=1)
        )
        for method in ("gradcam++", "scorecam", "eigencam"):
            a = tf_gradcam.explain(legacy, images, method=method)
            b = tf_gradcam.explain(twin, images, method=method)
            diffs[f"explain/{method}"] = largest(a.heatmaps, b.heatmaps)
        for name, layer in (
            ("GuidedBackprop", {}),
            ("Deconvolution", {}),
            ("GuidedGradCAM", {"layer": "c2"}),
        ):
            method = getattr(tf_gradcam, name)
            a = method(legacy, **layer)(images, target=2)
            b = method(twin, **layer)(images, target=2)
            diffs[name] = largest(a.gradients, b.gradients)
            report[f"{kind}_{name}_type"] = type(a).__name__ == type(b).__name__
            report[f"{kind}_{name}_nonzero"] = float(np.abs(a.gradients).max())
        legacy_panels = fit_with_callback(legacy, images, labels, folder / f"{kind}_legacy")
        twin_panels = fit_with_callback(twin, images, labels, folder / f"{kind}_twin")
        report[f"{kind}_callback_tags"] = sorted(legacy_panels)
        diffs["callback_panels"] = max(
            largest(legacy_panels[tag], twin_panels[tag]) for tag in twin_panels
        )
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
