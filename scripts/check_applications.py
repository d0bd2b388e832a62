"""Run Grad-CAM and Guided Grad-CAM on every `keras.applications` architecture.

For each architecture (random weights, nothing downloaded, a small input) it
prints the layer Grad-CAM picks by default, the map size, the largest
deviation of α and of the raw map from a hand-built `GradientTape` reference
(relative; the raw map relative to the size of its summed terms), whether the
results are finite, and the warnings the guided methods give (activations
without a guided rule). `tests/test_applications.py` runs six of them in CI.

Run:
    python scripts/check_applications.py                 # one model per family
    python scripts/check_applications.py --all           # all 40 (30 min, a few GB)
    python scripts/check_applications.py ResNet50 Xception --size 224
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf

try:
    import tf_gradcam
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tf_gradcam

#: The smallest input each architecture accepts (32 for the rest).
MIN_SIZE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}
#: Architectures that only accept their native input size without weights.
NATIVE_SIZE = {"NASNetLarge": 331, "NASNetMobile": 224}
ONE_PER_FAMILY = (
    "ConvNeXtTiny DenseNet121 EfficientNetB0 EfficientNetV2B0 InceptionResNetV2 InceptionV3 "
    "MobileNet MobileNetV2 MobileNetV3Small NASNetMobile ResNet50 ResNet50V2 VGG16 Xception"
).split()


def check(name: str, size: int | None) -> str:
    size = size or NATIVE_SIZE.get(name) or MIN_SIZE.get(name, 32)
    start = time.perf_counter()
    build = getattr(keras.applications, name)
    kwargs = dict(weights=None, input_shape=(size, size, 3), classes=10)
    model = build(**kwargs, classifier_activation="softmax")
    twin = build(**kwargs, classifier_activation=None)
    twin.set_weights(model.get_weights())
    images = np.random.default_rng(0).random((2, size, size, 3), np.float32) * 255
    classes = np.array([1, 7])

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        result = tf_gradcam.GradCAM(model)(images, target=classes)
    position = [node.name for node in model.operations].index(result.layer)
    node = twin.operations[position]
    with tf.GradientTape() as tape:
        activations, logits = keras.Model(twin.inputs[0], [node.output, twin.output])(images)
        scores = tf.gather(logits, classes, axis=1, batch_dims=1)
    alpha = tf.reduce_mean(tape.gradient(scores, activations), axis=(1, 2)).numpy()
    activations = activations.numpy()
    raw = np.einsum("nhwk,nk->nhw", activations, alpha)
    scale = np.einsum("nhwk,nk->nhw", np.abs(activations), np.abs(alpha)).max()
    alpha_error = np.abs(result.weights - alpha).max() / max(np.abs(alpha).max(), 1e-30)
    map_error = np.abs(result.raw_maps - raw).max() / max(scale, 1e-30)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guided = tf_gradcam.GuidedGradCAM(model)
        pixels = guided(images, target=classes)
    undefined = [re.match(r"(\d+) activation", str(w.message)) for w in caught]
    notes = [f"{m.group(1)} activations without a rule" for m in undefined if m]
    finite = bool(np.isfinite(result.heatmaps).all() and np.isfinite(pixels.gradients).all())
    return (
        f"| {name} | {size} | {result.layer} | {result.maps.shape[1]}x{result.maps.shape[2]} "
        f"| {alpha_error:.1e} | {map_error:.1e} | {finite} | {len(guided.replaced)} "
        f"| {'; '.join(notes)} | {time.perf_counter() - start:.0f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="architectures (default: one per family)")
    parser.add_argument("--all", action="store_true", help="every architecture")
    parser.add_argument("--size", type=int, help="input size (default: the smallest allowed)")
    args = parser.parse_args(argv)
    names = args.names or (
        sorted(n for n in dir(keras.applications) if n[0].isupper()) if args.all else ONE_PER_FAMILY
    )
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}\n")
    print(
        "| architecture | input | default layer | map | α error | map error | finite "
        "| ReLUs guided | guided warning | s |"
    )
    print("|---|---:|---|---|---:|---:|---|---:|---|---:|")
    failures = 0
    for name in names:
        try:
            print(check(name, args.size), flush=True)
        except Exception as error:  # report and go on: this is a survey
            failures += 1
            print(f"| {name} | | FAILED: {type(error).__name__}: {error} | | | | | | | |")
        keras.backend.clear_session()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
