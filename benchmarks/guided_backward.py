"""Why the guided ReLU's backward pass is `Relu(6)Grad(relu(g), relu(x))`: three variants, one run.

Guided Grad-CAM's floor is the forward pass plus a full backward pass to the
image (target: at most 1.2x that floor). Its only extra work is the guided
rule at every ReLU. This script builds `GuidedGradCAM` three times on the same
model, each with a different backward formulation of the same rule, and times
them interleaved with the bare forward + backward pass:

- `elementwise`: `where(g > 0 and 0 < x (< 6), g, 0)`, five elementwise ops;
- `fused, features=input`: TensorFlow's `ReluGrad`/`Relu6Grad` kernel fed
  `relu(g)` and the ReLU's input `x`;
- `fused, features=output (library)`: the same kernel fed the ReLU's output,
  as TensorFlow's own Relu gradient is: `tf_gradcam.relu_rules` as shipped. The units with
  0 < relu(x) (< 6) are exactly those with 0 < x (< 6), and the input no
  longer has to be kept for the backward pass.

All three must give the same gradients (checked at the end).

Run:
    python benchmarks/guided_backward.py                     # MobileNetV2, batch 8
    python benchmarks/guided_backward.py --model resnet50 --batch 32 --repeats 7
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import MODELS, compiled_forward_backward, machine, time_interleaved

try:
    import tf_gradcam
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tf_gradcam

from tf_gradcam import relu_rules as guided


@functools.cache
def _variant_relu(
    variant: str, mode: str, negative_slope: float, max_value: float | None, threshold: float
) -> Callable:
    """A guided ReLU (plain or ReLU6) with one of the benchmarked backward formulations."""
    if mode != "guided" or negative_slope != 0.0 or threshold != 0.0:
        raise ValueError("only the guided rule for ReLU and ReLU6 is benchmarked")
    fused = tf.raw_ops.ReluGrad if max_value is None else tf.raw_ops.Relu6Grad
    top = np.inf if max_value is None else max_value

    @tf.custom_gradient
    def relu(x: tf.Tensor):
        def backward(upstream: tf.Tensor) -> tf.Tensor:
            true_backward = getattr(guided._TRUE_BACKWARD, "active", False)
            gradients = upstream if true_backward else tf.nn.relu(upstream)
            if variant == "elementwise":
                passes = tf.logical_and(x > 0, x < top)
                if not true_backward:
                    passes = tf.logical_and(passes, upstream > 0)
                return tf.where(passes, upstream, tf.zeros_like(upstream))
            return fused(gradients=gradients, features=x)

        return keras.activations.relu(x, max_value=max_value), backward

    return relu


@contextlib.contextmanager
def _backward_variant(variant: str) -> Iterator[None]:
    """Trace guided methods with `variant`'s ReLU (the shipped one for the library's variant)."""
    original = guided._modified_relu
    if variant != LIBRARY:
        guided._modified_relu = functools.partial(_variant_relu, variant)
    try:
        yield
    finally:
        guided._modified_relu = original


LIBRARY = "fused, features=output (library)"
VARIANTS = ("elementwise", "fused, features=input", LIBRARY)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mobilenetv2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--min-seconds", type=float, default=0.5)
    args = parser.parse_args(argv)

    print(machine())
    model = getattr(keras.applications, MODELS[args.model])(weights=None)
    images = np.random.default_rng(0).random((args.batch, *model.input_shape[1:]), np.float32)
    forward_backward = compiled_forward_backward(model)
    operations: dict[str, Callable[[], object]] = {
        "forward + backward": lambda: forward_backward(images)
    }
    explainers = {}
    for variant in VARIANTS:
        explainer = tf_gradcam.GuidedGradCAM(model)
        with _backward_variant(variant):
            explainer(images)  # traces the compiled step with this variant
        explainers[variant] = explainer
        operations[f"Guided Grad-CAM, {variant}"] = functools.partial(explainer, images)
    times = time_interleaved(operations, args.repeats, args.min_seconds)

    print(f"\n{args.model}, batch {args.batch}: medians of {args.repeats} interleaved repeats\n")
    print("| operation | ms/call | x (forward + backward) |")
    print("|---|---:|---:|")
    floor = times["forward + backward"]
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / floor:.2f} |")

    reference = explainers[VARIANTS[0]](images).gradients
    for variant in VARIANTS[1:]:
        np.testing.assert_allclose(
            explainers[variant](images).gradients, reference, rtol=1e-5, atol=1e-7
        )
    print("\nall variants give the same gradients (rtol 1e-5)")


if __name__ == "__main__":
    main()
