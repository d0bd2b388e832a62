"""Epoch time of explanation-guided `fit` against a plain `fit`, interleaved in one process.

The model and data of `examples/bias_detection.py` (a three-convolution CNN on
32×32 scenes, batch 32, 30 steps per epoch). Every configuration — plain fit, and
each explanation loss with masks on 100%, 10% and 1% of the images — is built,
compiled and traced first; then the rounds run one epoch of each configuration
in a shuffled order, so all see the same machine load. Reported: the median
epoch time per configuration and its ratio to the plain fit's. The trace count
of each guided step is checked to stay constant over the rounds (no retracing
per step or per epoch).

Run:
    python benchmarks/guided_training_speed.py               # 5 rounds
    python benchmarks/guided_training_speed.py --rounds 9 --steps 60
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(1, str(ROOT))

from bias_detection import make_model, make_scenes  # noqa: E402
from callback_overhead import EpochTimer  # noqa: E402

import tf_gradcam  # noqa: E402

LOSSES = {
    "Grad-CAM mass": lambda: tf_gradcam.GradCAMMassLoss(layer="last_conv", weight=0.3, margin=8),
    "RRR": lambda: tf_gradcam.RRRLoss(weight=100.0),
    "HINT": lambda: tf_gradcam.HINTLoss(layer="last_conv", weight=100.0),
}


def masks_for(loss, cue_boxes, object_boxes, fraction, rng) -> np.ndarray:
    """Boxes (the patch, or the object for HINT) on `fraction` of the images, NO_MASK elsewhere."""
    count = len(cue_boxes)
    masks = np.full((count, 32, 32), tf_gradcam.NO_MASK, np.float32)
    boxes = object_boxes if loss.mask_meaning == "relevant" else cue_boxes
    for i in rng.permutation(count)[: max(1, round(fraction * count))]:
        x0, y0, x1, y1 = boxes[i]
        masks[i] = 0.0
        masks[i, y0:y1, x0:x1] = 1.0
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="batches of 32 per epoch")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x, y, cue_boxes, object_boxes = make_scenes(2000, 0.95, rng)

    runs = {}  # name -> (fitted model, dataset, timer, guided or None)
    model = make_model(0)
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(2000, seed=0).repeat().batch(32)
    runs["plain fit"] = (model, data, EpochTimer(), None)
    for name, factory in LOSSES.items():
        for fraction in (1.0, 0.1, 0.01):
            loss = factory()
            guided = tf_gradcam.ExplanationGuidedModel(make_model(0), loss)
            guided.compile(
                optimizer=keras.optimizers.Adam(2e-3),
                loss="sparse_categorical_crossentropy",
                metrics=["accuracy"],
            )
            masks = masks_for(loss, cue_boxes, object_boxes, fraction, rng)
            targets = {"labels": y, "masks": masks}
            dataset = tf.data.Dataset.from_tensor_slices((x, targets)).shuffle(2000, seed=0)
            runs[f"{name}, masks on {fraction:.0%}"] = (
                guided,
                dataset.repeat().batch(32),
                EpochTimer(),
                guided,
            )

    def epoch(name: str, timer: keras.callbacks.Callback | None = None) -> None:
        fitted, dataset, _, _ = runs[name]
        callbacks = [timer] if timer is not None else []
        fitted.fit(dataset, epochs=1, steps_per_epoch=args.steps, verbose=0, callbacks=callbacks)

    start = time.perf_counter()
    for name in runs:  # build, compile and trace every step first
        epoch(name)
    traces = {name: run[3].explanation_trace_count for name, run in runs.items() if run[3]}
    order = np.random.default_rng(1)
    for _ in range(args.rounds):
        for index in order.permutation(len(runs)):
            name = list(runs)[index]
            epoch(name, runs[name][2])
    for name, run in runs.items():
        if run[3] is not None and run[3].explanation_trace_count != traces[name]:
            raise AssertionError(f"{name}: the guided step was traced again")

    plain = statistics.median(runs["plain fit"][2].times)
    print(
        f"{args.rounds} interleaved rounds of {args.steps} steps (batch 32, 32x32 scenes, "
        f"three-convolution CNN); TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"{os.cpu_count()} CPU cores\n"
    )
    print("| training | median epoch (s) | epoch time / plain |")
    print("|---|---|---|")
    for name, (_, _, timer, _) in runs.items():
        median = statistics.median(timer.times)
        print(f"| {name} | {median:.3f} | {median / plain:.2f} |")
    print(f"\nno retracing after the first epoch ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
