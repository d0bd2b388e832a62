"""Latency of the exported explanation signature against the same model exported plain.

For each model, two SavedModels are written and loaded back with
`tf.saved_model.load`, as a server would:

- plain: `model.export(path)` (Keras' own export, `serving_default` = the
  model's forward pass);
- explain: `tf_gradcam.export(model, path)` (`explain`: predictions, top-1
  class, score and heatmap at the input size from one forward pass and the
  backward pass down to the explained layer; `explain_classes`: the same for
  given classes), and with `heatmap_size="layer"` (maps at the layer's
  resolution: no upsampling, a smaller output).

Each signature is called on the same batch (a `tf.constant`, outputs copied to
NumPy as a server serialises them), timed *interleaved* with
`benchmarks/speed.py`'s `time_paired` (every repeat runs each signature in a
new shuffled order, so machine load hits all of them alike). Columns: the
median wall time per call; its ratio to the plain export's median; the median
over the repeats of the per-repeat ratio; the ratio of median CPU times
(`time.process_time`, which other people's work on the machine lengthens much
less than wall time). A graph check first counts the ops TensorFlow runs for
the first call of each signature, after Grappler's optimisation (TensorFlow's
run metadata): the explain signature runs the forward convolutions once and
no convolution backprop (the backward pass stops at the explained layer).

Models: `keras.applications.MobileNetV2(weights=None)` at 224x224 (random
weights, nothing is downloaded; the explained layer is `out_relu`, 7x7x1280)
and the shipped demo CNN (64x64, `last_conv` 16x16x32).

Run:
    python benchmarks/export_latency.py                       # both models, batches 1 and 32
    python benchmarks/export_latency.py --models demo --batches 1,8 --repeats 15
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf
from speed import machine, time_paired

try:
    import tf_gradcam
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tf_gradcam

from tf_gradcam.demo_model import load_demo_model

#: Ops of a backward pass through convolutions: none may run in the explain signature.
CONVOLUTION_BACKPROP = (
    "Conv2DBackpropInput",
    "Conv2DBackpropFilter",
    "DepthwiseConv2dNativeBackpropInput",
    "DepthwiseConv2dNativeBackpropFilter",
)
FORWARD_CONVOLUTIONS = ("Conv2D", "_FusedConv2D", "DepthwiseConv2dNative", "_MklNativeConv2D")


def build(key: str) -> keras.Model:
    if key == "mobilenetv2":
        return keras.applications.MobileNetV2(weights=None)
    if key == "demo":
        return load_demo_model()
    raise SystemExit(f"unknown model {key!r}: mobilenetv2 or demo")


def export_all(model: keras.Model, folder: str) -> dict[str, tuple[str, str]]:
    """Write the plain and explanation SavedModels: {row name: (folder, signature key)}."""
    plain, explain = os.path.join(folder, "plain"), os.path.join(folder, "explain")
    model.export(plain, verbose=False)
    tf_gradcam.export(model, explain)
    tf_gradcam.export(model, f"{explain}_layer", heatmap_size="layer")
    return {
        "plain": (plain, "serving_default"),
        "explain": (explain, "explain"),
        "explain_classes": (explain, "explain_classes"),
        "explain, layer size": (f"{explain}_layer", "explain"),
    }


def load(path: str, key: str) -> Any:
    """A signature of a SavedModel, loaded as a server loads it."""
    return tf.saved_model.load(path).signatures[key]


def caller(name: str, function: Any, images: tf.Tensor) -> Callable[[], dict]:
    """`() -> NumPy outputs` of one signature on `images`, as a server would copy them."""
    (key,) = [k for k in function.structured_input_signature[1] if k != "classes"]
    inputs = {key: images}
    if name == "explain_classes":
        inputs["classes"] = tf.zeros(tf.shape(images)[:1], tf.int32)
    return lambda: {k: v.numpy() for k, v in function(**inputs).items()}


def executed_graph(function: Callable[[], object]) -> Counter | None:
    """Op types of the largest graph TensorFlow instantiates for a function's first call.

    Like `speed.py`'s `executed_ops` (TensorFlow's run metadata, a private
    module: benchmark-only), but per instantiated graph: a signature's wrapper
    and the function it calls may both be listed, each holding the inlined body,
    so the largest one is the graph that runs.
    """
    try:
        from tensorflow.python.eager import context
    except ImportError:  # pragma: no cover
        return None
    context.enable_run_metadata()
    try:
        context.export_run_metadata()  # drops what an earlier window left behind
        function()
        metadata = context.export_run_metadata()
    finally:
        context.disable_run_metadata()
    graphs = [
        Counter(node.op for node in graph.post_optimization_graph.node)
        for graph in metadata.function_graphs
    ]
    return max(graphs, key=lambda counts: sum(counts.values()), default=None)


def graph_note(exported: dict[str, tuple[str, str]], input_shape: tuple) -> list[str]:
    """The ops TensorFlow runs for each signature's first call, after Grappler's pruning.

    Each signature is loaded afresh, so that the run metadata of its first call
    holds its own graphs. Counts the forward convolutions and the convolution
    backprop ops a backward pass to the input would run (the saved graph holds
    some: the tape records the convolutions, whose kernels it watches, but
    nothing reads their gradients, so they are pruned when the function is
    instantiated).
    """
    images = tf.zeros((1, *input_shape[1:]))
    notes = []
    for name, (path, key) in exported.items():
        counts = executed_graph(caller(name, load(path, key), images))
        if counts is None:
            return ["n/a (no run metadata)"]
        forward = sum(counts[op] for op in FORWARD_CONVOLUTIONS)
        backward = sum(counts[op] for op in CONVOLUTION_BACKPROP)
        total = sum(counts.values())
        notes.append(f"{name}: {forward} convolutions, {backward} conv backprops, {total} ops")
    return notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenetv2,demo")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats per batch")
    parser.add_argument("--min-seconds", type=float, default=0.3, help="per timed sample")
    args = parser.parse_args(argv)
    print(f"Machine: {machine()}")
    print("Medians of interleaved, shuffled repeats of the loaded SavedModels' signatures.\n")
    print(
        "| model | batch | signature | ms/call | x plain | x plain, per-repeat median | "
        "x plain, CPU time |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    notes: list[str] = []
    for key in args.models.split(","):
        model = build(key.strip())
        with tempfile.TemporaryDirectory() as folder:
            exported = export_all(model, folder)
            notes += [f"{key}, {note}" for note in graph_note(exported, model.input_shape)]
            functions = {
                name: load(path, signature) for name, (path, signature) in exported.items()
            }
            for batch in (int(b) for b in args.batches.split(",")):
                images = tf.constant(rng.random((batch, *model.input_shape[1:]), dtype=np.float32))
                times = time_paired(
                    {name: caller(name, f, images) for name, f in functions.items()},
                    repeats=args.repeats,
                    min_seconds=args.min_seconds,
                )
                wall, cpu = times["plain"][0], times["plain"][1]
                for name, (seconds, cpu_seconds, paired) in times.items():
                    print(
                        f"| {key} | {batch} | {name} | {seconds * 1e3:.1f} | "
                        f"{seconds / wall:.3f} | {paired:.3f} | {cpu_seconds / cpu:.3f} |",
                        flush=True,
                    )
    print("\nOps run by one call at batch 1 (its first call, after Grappler's pruning):")
    for note in notes:
        print(f"  {note}")
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
