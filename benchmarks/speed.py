"""Grad-CAM's cost as a multiple of the bare compiled forward pass, from one run.

For each model and batch size the script builds every operation first, warms
each up (tracing, first-call allocations), then times them *interleaved*: in
every repeat each operation runs once (or a few times for fast ones) in turn,
so all of them see the same machine load. It prints the median time per call
and its ratio to the bare compiled forward pass of the same model and batch,
measured in the same repeats. Every operation receives the same NumPy batch,
as a user would pass it, and returns host (NumPy) results.

Rows:

- forward: `tf.function(model(x, training=False))` with a free batch size.
- Grad-CAM: `GradCAM(model)(x)`, the predicted class of every image.
- top-5 maps: `GradCAM(model)(x, target=TopK(5))`; the note gives its ratio
  to the Grad-CAM (top-1) row.
- Grad-CAM (XLA): with `--xla`, `GradCAM(model, jit_compile=True)`, next to the
  forward pass compiled with XLA.
- Guided Grad-CAM: `tf_gradcam.GuidedGradCAM`, also against the forward pass
  plus a full backward pass to the input ("n/a" where the class is missing).
- peers: tf-keras-vis, tf-explain and Xplique's Grad-CAM on the same model,
  layer, batch and class, where they import ("n/a" with the error otherwise).

Then, on the small demo model: a 1,000-call loop's resident-memory growth and
retrace count (batch sizes 1-4 and all target kinds, after one warm-up pass),
`explain_dataset` streaming 1,024 images to shards against a plain loop,
the callback's overhead on a training epoch (`benchmarks/callback_overhead.py`,
where `GradCAMCallback` exists),
and a graph check: the operations TensorFlow actually runs per call (after
Grappler's pruning), Grad-CAM's compiled step against the forward pass.

Models use `weights=None` (random weights, nothing is downloaded) at 224x224.

The other CAM methods (Grad-CAM++, XGrad-CAM, HiResCAM, LayerCAM, Eigen-CAM,
Score-CAM, Ablation-CAM, tf-keras-vis `Scorecam`) are timed against their
floors by `benchmarks/methods_speed.py`, which reuses this script's helpers.

Run:
    python benchmarks/speed.py                       # full table (minutes)
    python benchmarks/speed.py --quick               # MobileNetV2, batches 1 and 8
    python benchmarks/speed.py --models resnet50 --batches 1,32 --repeats 5
    python benchmarks/speed.py --peers-path /tmp/peers/lib/python3.11/site-packages

`--peers-path` appends a site-packages folder holding the peers (installed in a
separate virtual environment) *after* this environment's, so TensorFlow and
Keras stay this project's.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
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

from tf_gradcam import GradCAM, TopK

MODELS = {"resnet50": "ResNet50", "mobilenetv2": "MobileNetV2"}
SIZE = 224


@dataclass
class Row:
    """One line of the table."""

    model: str
    batch: str
    operation: str
    ms: float | None
    ratio: float | None
    note: str = ""


# ---------------------------------------------------------------- helpers


def rss_mb() -> float:
    """Resident memory of this process in MB (VmRSS, or the peak where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def time_interleaved(
    operations: dict[str, Callable[[], object]], repeats: int, min_seconds: float
) -> dict[str, float]:
    """Median seconds per call of each operation, timed in alternation.

    Each operation is warmed up twice; fast ones are run several times per
    repeat so that one measurement lasts about `min_seconds`. Each repeat
    runs the operations in a new order (seeded shuffle), so that no operation
    always runs right after the same one (caches, allocator state).
    """
    inner = {}
    for name, operation in operations.items():
        operation()
        start = time.perf_counter()
        operation()
        once = time.perf_counter() - start
        inner[name] = max(1, math.ceil(min_seconds / max(once, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in operations}
    order = random.Random(0)
    for _ in range(repeats):
        names = list(operations)
        order.shuffle(names)
        for name in names:
            operation = operations[name]
            start = time.perf_counter()
            for _ in range(inner[name]):
                operation()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def compiled_forward(model: keras.Model, jit_compile: bool = False) -> Callable:
    """The bare forward pass, compiled once for any batch size; returns NumPy."""
    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
    forward = tf.function(
        lambda x: model(x, training=False), input_signature=[spec], jit_compile=jit_compile
    )
    return lambda x: forward(x).numpy()


def compiled_forward_backward(model: keras.Model) -> Callable:
    """Forward pass plus the full backward pass to the input (guided methods' floor)."""
    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)

    @tf.function(input_signature=[spec])
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            score = tf.reduce_max(model(x, training=False), axis=-1)
        return tape.gradient(score, x)

    return lambda x: step(x).numpy()


# ------------------------------------------------------------------ peers


def _peer_tf_keras_vis(model: keras.Model, layer: str) -> Callable:
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import CategoricalScore

    explainer = Gradcam(model, model_modifier=ReplaceToLinear(), clone=True)
    return lambda x: explainer(CategoricalScore([0] * len(x)), x, penultimate_layer=layer)


def _peer_tf_explain(model: keras.Model, layer: str) -> Callable:
    from tf_explain.core.grad_cam import GradCAM as TfExplainGradCAM

    explainer = TfExplainGradCAM()
    return lambda x: explainer.explain((x, None), model, class_index=0, layer_name=layer)


def _peer_xplique(model: keras.Model, layer: str) -> Callable:
    from xplique.attributions import GradCAM as XpliqueGradCAM

    explainers: dict[int, object] = {}
    classes = model.output_shape[-1]

    def run(x):
        if len(x) not in explainers:
            explainers[len(x)] = XpliqueGradCAM(model, conv_layer=layer, batch_size=len(x))
        return explainers[len(x)].explain(x, tf.one_hot([0] * len(x), classes))

    return run


PEERS = {
    "tf-keras-vis Gradcam": _peer_tf_keras_vis,
    "tf-explain GradCAM": _peer_tf_explain,
    "Xplique GradCAM": _peer_xplique,
}


def _short_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:90] if text else ''}"


def build_peers(model: keras.Model, layer: str, enabled: bool) -> dict[str, Callable | str]:
    """Each peer's explain function, or the reason it is not available."""
    peers: dict[str, Callable | str] = {}
    for name, build in PEERS.items():
        if not enabled:
            peers[name] = "n/a (--no-peers)"
            continue
        try:
            peers[name] = build(model, layer)
        except Exception as error:  # an uninstallable or incompatible peer is a result
            peers[name] = f"n/a ({_short_error(error)})"
    return peers


# ----------------------------------------------------------- per model


def bench_model(key: str, batches: list[int], args: argparse.Namespace) -> list[Row]:
    """Rows for one model at every batch size."""
    model = getattr(keras.applications, MODELS[key])(weights=None, input_shape=(SIZE, SIZE, 3))
    forward = compiled_forward(model)
    cam = GradCAM(model)
    layer = cam.layer
    guided_class = getattr(tf_gradcam, "GuidedGradCAM", None)
    guided = guided_class(model) if guided_class is not None else None
    forward_backward = compiled_forward_backward(model) if guided is not None else None
    xla_forward = compiled_forward(model, jit_compile=True) if args.xla else None
    xla_cam = GradCAM(model, jit_compile=True) if args.xla else None
    peers = build_peers(model, layer, args.peers)

    def make_operations(images: np.ndarray) -> dict[str, Callable[[], object]]:
        operations: dict[str, Callable[[], object]] = {
            "forward (compiled)": lambda: forward(images),
            "Grad-CAM": lambda: cam(images),
            "top-5 maps": lambda: cam(images, target=TopK(5)),
        }
        if args.xla:
            operations["forward (compiled, XLA)"] = lambda: xla_forward(images)
            operations["Grad-CAM (XLA)"] = lambda: xla_cam(images)
        if guided is not None:
            operations["forward + backward to input"] = lambda: forward_backward(images)
            operations["Guided Grad-CAM"] = lambda: guided(images)
        for name, peer in peers.items():
            if callable(peer):
                operations[name] = lambda peer=peer: peer(images)
        return operations

    rows: list[Row] = []
    rng = np.random.default_rng(0)
    for batch in batches:
        operations = make_operations(rng.random((batch, SIZE, SIZE, 3), dtype=np.float32))
        failed: dict[str, str] = {}
        for name in list(operations):  # a peer failing on this batch is reported, not fatal
            try:
                operations[name]()
            except Exception as error:
                if name not in peers:
                    raise
                failed[name] = f"n/a ({_short_error(error)})"
                del operations[name]
        times = time_interleaved(operations, args.repeats, args.min_seconds)
        base = times["forward (compiled)"]
        batch_rows: list[Row] = []
        for name, seconds in times.items():
            note = ""
            if name == "top-5 maps":
                note = f"{seconds / times['Grad-CAM']:.2f} x top-1"
            elif name == "Grad-CAM (XLA)":
                note = f"{seconds / times['forward (compiled, XLA)']:.2f} x XLA forward"
            elif name == "Guided Grad-CAM":
                note = f"{seconds / times['forward + backward to input']:.2f} x forward+backward"
            elif name in peers:
                note = f"ours {seconds / times['Grad-CAM']:.1f}x faster"
            batch_rows.append(Row(key, str(batch), name, seconds * 1000, seconds / base, note))
        if guided is None:
            batch_rows.append(
                Row(key, str(batch), "Guided Grad-CAM", None, None, "n/a (no GuidedGradCAM)")
            )
        for name, peer in peers.items():
            reason = failed.get(name) or (None if callable(peer) else peer)
            if reason:
                batch_rows.append(Row(key, str(batch), name, None, None, reason))
        _print_rows(batch_rows, header=False)
        rows += batch_rows
    return rows


# ------------------------------------------------- loop, graph, callback


def small_model() -> keras.Model:
    from tf_gradcam.demo_model import load_demo_model

    return load_demo_model()


def bench_loop(calls: int) -> list[Row]:
    """Memory growth and retraces over `calls` calls on the small demo model."""
    model = small_model()
    cam = GradCAM(model)
    rng = np.random.default_rng(1)
    size = model.input_shape[1:]
    batches = [rng.random((n, *size), dtype=np.float32) for n in (1, 2, 3, 4)]
    targets = [None, 1, "per-image", TopK(2)]

    def call(i: int) -> None:
        images = batches[i % 4]
        target = targets[(i // 4) % 4]
        if target == "per-image":
            target = [i % 3] * len(images)
        cam(images, target)

    with warnings.catch_warnings():  # random images: some maps are all zero
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(16):  # warm-up: every batch size with every target kind
            call(i)
        gc.collect()
        traces, before = cam.trace_count, rss_mb()
        start = time.perf_counter()
        for i in range(calls):
            call(i)
        elapsed = time.perf_counter() - start
    gc.collect()
    growth = rss_mb() - before
    label = f"1-4 x {size[0]}x{size[1]}"
    retraces = cam.trace_count - traces
    return [
        Row("demo CNN", label, f"{calls} calls: memory growth (MB)", None, None, f"{growth:+.1f}"),
        Row("demo CNN", label, f"{calls} calls: retraces", None, None, f"{retraces}"),
        Row("demo CNN", label, f"{calls} calls: ms per call", elapsed / calls * 1000, None, ""),
    ]


def bench_dataset(images: int, repeats: int) -> list[Row]:
    """`explain_dataset` streaming shards to disk, against a plain loop of GradCAM calls."""
    explain_dataset = getattr(tf_gradcam, "explain_dataset", None)
    if explain_dataset is None:
        return [Row("demo CNN", "32", "explain_dataset", None, None, "n/a (no explain_dataset)")]
    model = small_model()
    cam = GradCAM(model)
    data = np.random.default_rng(4).random((images, *model.input_shape[1:]), dtype=np.float32)

    def plain_loop() -> None:
        for begin in range(0, images, 32):
            cam(data[begin : begin + 32])

    def streamed() -> None:
        with tempfile.TemporaryDirectory() as folder:
            explain_dataset(cam, data, batch_size=32, output_dir=folder, verbose=0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        before = rss_mb()
        times = time_interleaved({"loop": plain_loop, "stream": streamed}, repeats, 0.0)
        growth = rss_mb() - before
    label = f"32 x {model.input_shape[1]}x{model.input_shape[2]}"
    ratio = times["stream"] / times["loop"]
    return [
        Row(
            "demo CNN",
            label,
            f"explain_dataset, {images} images to .npz shards",
            times["stream"] * 1000,
            None,
            f"{ratio:.2f} x a loop of GradCAM calls; memory growth {growth:+.1f} MB",
        )
    ]


def executed_ops(function: Callable[[], object]) -> Counter | None:
    """Op types TensorFlow runs for a function's first call, after graph optimisation.

    Uses TensorFlow's run metadata (a private module: benchmark-only).
    """
    try:
        from tensorflow.python.eager import context
    except ImportError:  # pragma: no cover
        return None
    context.enable_run_metadata()
    try:
        function()
        metadata = context.export_run_metadata()
    finally:
        context.disable_run_metadata()
    counts: Counter = Counter()
    for graph in metadata.function_graphs:
        counts.update(node.op for node in graph.post_optimization_graph.node)
    return counts or None


def bench_graph() -> list[Row]:
    """Op counts per call: the compiled step against the bare forward pass.

    The step must run the forward convolutions once, no convolution backprop
    (the backward pass stops at the explained layer), and with `logits=True`
    no softmax: the extra linear call of the head replaces it, it does not
    come on top.
    """
    model = small_model()
    images = np.random.default_rng(2).random((2, *model.input_shape[1:]), dtype=np.float32)
    counts = {
        "forward": executed_ops(lambda: compiled_forward(model)(images)),
        "step": executed_ops(lambda: GradCAM(model)(images)),
        "step, logits=False": executed_ops(lambda: GradCAM(model, logits=False)(images)),
    }
    if any(c is None for c in counts.values()):
        return [Row("demo CNN", "2", "graph check", None, None, "n/a (no run metadata)")]

    def total(c: Counter, *names: str) -> int:
        return sum(v for k, v in c.items() if k in names)

    rows = []
    for name, c in counts.items():
        note = (
            f"convolutions {total(c, 'Conv2D', '_FusedConv2D')}, "
            f"matmuls {total(c, 'MatMul', '_FusedMatMul')}, Softmax {c['Softmax']}, "
            f"conv backprops {sum(v for k, v in c.items() if 'Backprop' in k)}, "
            f"{sum(c.values())} ops"
        )
        rows.append(Row("demo CNN", "2", f"graph check: {name}", None, None, note))
    return rows


def bench_callback(quick: bool) -> list[Row]:
    """The callback's overhead on a training epoch, at its default settings.

    Runs `benchmarks/callback_overhead.py` (the callback's own benchmark: a small
    CNN trained with and without `GradCAMCallback`, first epochs of each fit left
    out) in a subprocess and reports its ratios; "n/a" where the class or the
    script is missing.
    """
    label = ("small CNN", "32")
    if getattr(tf_gradcam, "GradCAMCallback", None) is None:
        return [Row(*label, "callback overhead", None, None, "n/a (no GradCAMCallback)")]
    script = Path(__file__).with_name("callback_overhead.py")
    if not script.exists():
        return [Row(*label, "callback overhead", None, None, f"n/a (no {script.name})")]
    options = ["--rounds", "1", "--epochs", "3", "--interleaved", "2"] if quick else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(script.parents[1]), *sys.path]))
    run = subprocess.run(
        [sys.executable, str(script), *options], capture_output=True, text=True, env=env
    )
    ratios = dict(re.findall(r"overhead ratio \(([^)]*)\):\s*([0-9.]+)", run.stdout))
    if run.returncode != 0 or not ratios:
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or [""]
        return [Row(*label, "callback overhead", None, None, f"n/a ({tail[0][:90]})")]
    return [
        Row(*label, f"callback overhead, {name}", None, None, f"{(float(v) - 1) * 100:+.1f}% epoch")
        for name, v in ratios.items()
    ]


# ----------------------------------------------------------------- output


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _print_rows(rows: list[Row], header: bool = True) -> None:
    if header:
        print("| model | batch | operation | ms/call | x forward | note |")
        print("|---|---|---|---:|---:|---|")
    for r in rows:
        print(
            f"| {r.model} | {r.batch} | {r.operation} | {_fmt(r.ms, 1)} | "
            f"{_fmt(r.ratio, 2)} | {r.note} |",
            flush=True,
        )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpus = len(tf.config.list_physical_devices("GPU"))
    return (
        f"{cpu}, {os.cpu_count()} CPU cores, {gpus} GPU(s), load average {load:.1f} at start; "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"Python {platform.python_version()}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="defaults MobileNetV2, batches 1,8, 3 repeats"
    )
    parser.add_argument("--models", help="comma-separated (default resnet50,mobilenetv2)")
    parser.add_argument("--batches", help="comma-separated batch sizes (default 1,8,32)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per row (default 5)")
    parser.add_argument("--min-seconds", type=float, default=0.3, help="per timed sample")
    parser.add_argument("--calls", type=int, help="calls in the memory loop (default 1000)")
    parser.add_argument("--xla", action="store_true", help="also time jit_compile=True")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="skip peers")
    parser.add_argument(
        "--peers-path", action="append", default=[], help="site-packages holding the peers"
    )
    args = parser.parse_args(argv)
    defaults = (
        {"models": "mobilenetv2", "batches": "1,8", "repeats": 3, "calls": 300}
        if args.quick
        else {"models": "resnet50,mobilenetv2", "batches": "1,8,32", "repeats": 5, "calls": 1000}
    )
    for name, value in defaults.items():  # explicit options win over --quick
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.extend(args.peers_path)
    print(f"Machine: {machine()}")
    print(
        "Medians of interleaved repeats; ratios are measured in the same repeats, so "
        "machine load affects numerator and denominator alike.\n"
    )
    _print_rows([])
    rows: list[Row] = []
    batches = [int(b) for b in args.batches.split(",")]
    for key in args.models.split(","):
        rows += bench_model(key.strip().lower(), batches, args)
    extra = (
        bench_loop(args.calls)
        + bench_dataset(1024, args.repeats)
        + bench_graph()
        + bench_callback(args.quick)
    )
    _print_rows(extra, header=False)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
