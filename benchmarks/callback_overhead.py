"""Epoch time of `model.fit` with and without GradCAMCallback at its default settings.

A small CNN (three 3×3 convolutions, 32×32 RGB inputs, 2048 images, batch 32)
is trained in alternating rounds, without and then with the callback, in one
process, so both see the same machine load. The steady-state overhead is the
ratio of median epoch times, leaving out the first epoch of every fit (it holds
Keras' own compilation and, for the callback, the one-time build and trace of
the explainer, reported separately). On a shared machine that ratio is noisy,
so two steadier measures follow: one fit in which the callback logs every other
epoch (`freq=2`, the same work per logged epoch as the default `freq=1`), epochs
with and without a log interleaved; and the callback's own epoch-end time.

Run:
    python benchmarks/callback_overhead.py            # prints the ratio
    python benchmarks/callback_overhead.py --rounds 5 --epochs 6
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
from keras import layers

try:
    import tf_gradcam
except ImportError:  # run from a source checkout without installing
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tf_gradcam


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch, from on_epoch_begin to the end of every on_epoch_end."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.times.append(time.perf_counter() - self._start)


class TimedGradCAMCallback(tf_gradcam.GradCAMCallback):
    """GradCAMCallback that also records the wall time of its own epoch-end work."""

    hook_times: list[float]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        start = time.perf_counter()
        super().on_epoch_end(epoch, logs)
        self.hook_times.append(time.perf_counter() - start)


def make_model(size: int) -> keras.Model:
    inputs = keras.Input((size, size, 3))
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(10, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="fits with and without, alternating")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit")
    parser.add_argument(
        "--interleaved", type=int, default=4, help="epochs each way in the interleaved fit"
    )
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((args.images, args.size, args.size, 3), dtype=np.float32)
    y = rng.integers(0, 10, args.images)
    model = make_model(args.size)
    with tempfile.TemporaryDirectory() as log_dir:
        callback = TimedGradCAMCallback(x[:16], log_dir=log_dir)  # default settings
        callback.hook_times = []
        times: dict[str, list[float]] = {"without": [], "with": []}
        first: dict[str, list[float]] = {"without": [], "with": []}
        for _ in range(args.rounds):
            for name, extra in (("without", []), ("with", [callback])):
                timer = EpochTimer()
                model.fit(
                    x, y, epochs=args.epochs, batch_size=32, callbacks=[*extra, timer], verbose=0
                )
                first[name].append(timer.times[0])
                times[name].extend(timer.times[1:])
        traces = callback.explainer.trace_count

        # Interleaved: one fit, the callback logging every other epoch (freq=2), so that
        # epochs with and without its work alternate a few seconds apart under the same load.
        alternating = TimedGradCAMCallback(x[:16], log_dir=log_dir, freq=2)
        alternating.hook_times = []
        timer = EpochTimer()
        model.fit(
            x,
            y,
            epochs=2 * args.interleaved + 2,
            batch_size=32,
            callbacks=[alternating, timer],
            verbose=0,
        )
        logged = statistics.median(timer.times[2::2])
        idle = statistics.median(timer.times[3::2])

    without = statistics.median(times["without"])
    with_callback = statistics.median(times["with"])
    steps = -(-args.images // 32)
    print(
        f"small CNN, {args.images} images {args.size}x{args.size}, {steps} steps/epoch, "
        f"{args.rounds} rounds x {args.epochs} epochs each way, keras {keras.__version__}"
    )
    print(f"median epoch without callback: {without * 1000:8.1f} ms")
    print(f"median epoch with callback:    {with_callback * 1000:8.1f} ms")
    print(
        f"first epoch of a fit (compile + callback setup): without "
        f"{statistics.median(first['without']) * 1000:.0f} ms, with "
        f"{statistics.median(first['with']) * 1000:.0f} ms (explainer traces: {traces})"
    )
    hook = statistics.median(callback.hook_times[1:])
    print(
        f"callback's own epoch-end work: median {hook * 1000:.1f} ms "
        f"(first, with build and trace: {callback.hook_times[0] * 1000:.0f} ms) = "
        f"{hook / without:.2%} of an epoch"
    )
    print(
        f"interleaved in one fit ({args.interleaved} epochs each): median epoch with a log "
        f"{logged * 1000:.1f} ms, without {idle * 1000:.1f} ms, ratio {logged / idle:.3f}"
    )
    print(f"overhead ratio (steady state, alternating fits): {with_callback / without:.3f}")
    print(f"overhead ratio (callback's own time / epoch):     {1 + hook / without:.3f}")


if __name__ == "__main__":
    main()
