"""Trains the small demo CNN shipped as `tf_gradcam/assets/demo_model.keras`.

The model classifies the shape (circle, square, triangle) of one coloured
object on a noisy background, using scenes from `tf_gradcam.scenes`. It is a
plain functional CNN: input rescaled from [0, 1] to [-1, 1], four 3x3
Conv2D+ReLU layers with two max-poolings, the last convolution `last_conv`
with a 16x16x32 output, global average pooling and a
`Dense(3, activation="softmax")` head. The softmax is deliberate: Grad-CAM
must score the pre-softmax logits (the paper's y^c), so the engine has to
strip it.

Seeds are fixed, training runs on the CPU in well under a minute, and the
script prints the test accuracy on scenes drawn with a seed not used for
training. The model is saved uncompiled (weights and architecture only),
which keeps the file small and loadable with `safe_mode=True`.

Regenerate the asset from the repository root with:

    python scripts/train_demo_model.py

Options: `--output PATH` (default: the package asset), `--epochs N`,
`--train N`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the asset is built on the CPU
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # use this checkout's tf_gradcam, installed or not

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tf_gradcam.scenes import SHAPE_NAMES, make_scenes  # noqa: E402

__all__ = ["build_model", "main"]

DEFAULT_OUTPUT = REPO_ROOT / "tf_gradcam" / "assets" / "demo_model.keras"
TRAIN_SEED, VAL_SEED, TEST_SEED = 0, 1, 2  # seeds of the scene generator
IMAGE_SIZE = 64


def build_model(num_classes: int = len(SHAPE_NAMES)) -> keras.Model:
    """Builds the demo CNN: 64x64x3 in [0, 1] -> class probabilities (softmax).

    Args:
        num_classes: number of output classes.

    Returns:
        An uncompiled functional `keras.Model` named `"demo_cnn"`.

    Example:

    >>> build_model().get_layer("last_conv").output.shape
    (None, 16, 16, 32)
    """
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="image")
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="centre")(inputs)  # [0, 1] -> [-1, 1]
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv3")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="demo_cnn")


def main(argv: list[str] | None = None) -> float:
    """Trains, evaluates and saves the demo model; returns its test accuracy.

    Args:
        argv: command-line arguments; defaults to `sys.argv[1:]`.

    Returns:
        The accuracy on 1000 fresh test scenes.

    Example:

    >>> main(["--output", "/tmp/demo_model.keras"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--train", type=int, default=2400, help="number of training scenes")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    train = make_scenes(args.train, seed=TRAIN_SEED)
    val = make_scenes(500, seed=VAL_SEED)
    test = make_scenes(1000, seed=TEST_SEED)

    model = build_model(len(train.class_names))
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(
        train.images,
        train.labels,
        batch_size=32,
        epochs=args.epochs,
        validation_data=(val.images, val.labels),
        verbose=2,
    )
    seconds = time.perf_counter() - start

    predicted = model.predict(test.images, batch_size=250, verbose=0).argmax(axis=-1)
    accuracy = float(np.mean(predicted == test.labels))
    print(f"training time: {seconds:.1f} s; test accuracy: {accuracy:.4f} on {len(test)} scenes")

    # Save without the optimizer state: a fresh model carrying the trained weights.
    shipped = build_model(len(train.class_names))
    shipped.set_weights(model.get_weights())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    shipped.save(args.output)
    print(f"saved {args.output} ({args.output.stat().st_size / 1024:.1f} KiB)")
    return accuracy


if __name__ == "__main__":
    main()
