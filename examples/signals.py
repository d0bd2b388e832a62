"""Grad-CAM on a Conv1D signal classifier: does the heat land on the event?

Each generated signal is Gaussian noise holding one short *event* at a random
position: an oscillating burst (class 0) or a smooth bump (class 1), both
`EVENT` samples long. A tiny Conv1D network learns to tell them apart in a few
seconds. The example then

1. explains the test signals with Grad-CAM at the last Conv1D layer, cued with
   the true class, and plays the pointing game in 1-D: a hit when the
   heatmap's maximum lies inside the event's interval
   (`tf_gradcam.metrics.pointing_game(..., axes=1)` with the event masks),
   printed beside a random-point baseline (the event covers
   `EVENT / LENGTH` of the signal);
2. writes `signals.png` into `--out`: a few test signals drawn by
   `tf_gradcam.pictures.signal_picture` (the signal above, the heatmap as a
   jet band below it), the event's interval marked by grey ticks.

Run (from the repository root, with tf_gradcam installed or on PYTHONPATH):
    python examples/signals.py --out examples/out/
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import tf_gradcam
from tf_gradcam import metrics
from tf_gradcam.pictures import signal_picture

LENGTH = 256
EVENT = 24
CLASS_NAMES = ("burst", "bump")


def make_signals(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(signals (n, LENGTH, 1), labels (n,), event masks (n, LENGTH) bool)`."""
    t = np.arange(EVENT)
    window = np.hanning(EVENT)
    shapes = (
        2.5 * np.sin(2 * np.pi * t / 4.0) * window,  # burst: 6 periods of 4 samples
        2.0 * window,  # bump
    )
    labels = rng.integers(len(shapes), size=n)
    starts = rng.integers(0, LENGTH - EVENT + 1, size=n)
    signals = rng.normal(0.0, 1.0, size=(n, LENGTH, 1)).astype(np.float32)
    masks = np.zeros((n, LENGTH), dtype=bool)
    for i, (label, start) in enumerate(zip(labels, starts, strict=True)):
        signals[i, start : start + EVENT, 0] += shapes[label]
        masks[i, start : start + EVENT] = True
    return signals, labels, masks


def build_model() -> keras.Model:
    layers = keras.layers
    inputs = keras.Input((LENGTH, 1), name="signal")
    x = layers.Conv1D(16, 7, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling1D(2, name="pool1")(x)
    x = layers.Conv1D(32, 5, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling1D(2, name="pool2")(x)
    x = layers.Conv1D(32, 3, padding="same", activation="relu", name="last_conv")(x)
    x = layers.GlobalAveragePooling1D(name="gap")(x)
    outputs = layers.Dense(len(CLASS_NAMES), name="logits")(x)
    return keras.Model(inputs, outputs, name="signal_cnn")


def save_pictures(
    path: str,
    signals: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    heatmaps: np.ndarray,
    hits: np.ndarray,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(signals)
    figure, axes = plt.subplots(rows, 1, figsize=(8, 1.9 * rows))
    for ax, signal, label, mask, heat, hit in zip(
        axes, signals, labels, masks, heatmaps, hits, strict=True
    ):
        picture = signal_picture(signal, heat, height=120, width=512)
        ax.imshow(picture, extent=(0, LENGTH, 0, 1), aspect="auto", interpolation="nearest")
        start = int(np.argmax(mask))
        ax.axvspan(start, start + EVENT, ymin=0.0, ymax=0.04, color="0.3")
        ax.axvline(int(np.argmax(heat)) + 0.5, color="k", linestyle=":", linewidth=1)
        ax.set_yticks([])
        ax.set_title(
            f"{CLASS_NAMES[label]} at samples [{start}, {start + EVENT}); "
            f"heatmap maximum at {int(np.argmax(heat))} ({'hit' if hit else 'miss'})",
            fontsize=9,
        )
    axes[-1].set_xlabel("sample")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/out/", help="folder for the PNG")
    parser.add_argument("--train", type=int, default=2000, help="training signals")
    parser.add_argument("--test", type=int, default=400, help="test signals")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    began = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train_x, train_y, _ = make_signals(args.train, rng)
    test_x, test_y, test_masks = make_signals(args.test, rng)

    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(train_x, train_y, batch_size=64, epochs=args.epochs, verbose=0)
    print(f"trained on {args.train} signals in {time.perf_counter() - start:.1f} s")
    predicted = np.argmax(model.predict(test_x, batch_size=256, verbose=0), axis=1)
    print(f"test accuracy: {(predicted == test_y).mean():.3f} ({args.test} signals)")

    print("Conv1D layers:", tf_gradcam.layer_paths(model, spatial_only=True))
    cam = tf_gradcam.GradCAM(model, "last_conv")
    start = time.perf_counter()
    explanation = cam(test_x, target=test_y)
    print(f"explained {args.test} signals in {time.perf_counter() - start:.2f} s")
    heatmaps = explanation.heatmaps  # (test, LENGTH)

    hits = metrics.pointing_game(heatmaps, test_masks, axes=1)
    # A random point per map, 20 draws per test item (a uniform random map's maximum).
    draws = np.random.default_rng(args.seed + 1)
    random_hits = np.concatenate(
        [metrics.pointing_game(draws.random(heatmaps.shape), test_masks, axes=1) for _ in range(20)]
    )
    near = metrics.pointing_game(heatmaps, test_masks, axes=1, tolerance=4)
    print(
        f"pointing accuracy (maximum inside the event), Grad-CAM: "
        f"{metrics.pointing_accuracy(hits):.3f}; random point: "
        f"{metrics.pointing_accuracy(random_hits):.3f} (expected {EVENT / LENGTH:.3f})"
    )
    print(f"  within 4 samples of the event: {metrics.pointing_accuracy(near):.3f}")
    for c, name in enumerate(CLASS_NAMES):
        chosen = test_y == c
        print(f"  class {c} ({name}): {metrics.pointing_accuracy(hits[chosen]):.3f}")
    print(f"  degenerate (all-zero) maps: {int(explanation.degenerate.sum())}")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "signals.png")
    shown = np.r_[np.flatnonzero(test_y == 0)[:2], np.flatnonzero(test_y == 1)[:2]]
    misses = np.flatnonzero(~hits)[:1]
    shown = np.r_[shown, misses]
    save_pictures(
        path, test_x[shown], test_y[shown], test_masks[shown], heatmaps[shown], hits[shown]
    )
    print(f"wrote {path}")
    print(f"total {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
