"""The CAM methods' cost against their floors, from one run.

Companion of `benchmarks/speed.py` (same machine line, same interleaved timing,
same `Row` table): where speed.py times Grad-CAM, this script times every
method of `tf_gradcam.methods.METHODS` against the work it cannot avoid.

Part 1, gradient methods (gradcam, gradcam++, xgradcam, hirescam, layercam,
and the gradient-free eigencam): per model and batch size, the bare compiled
forward pass and each method built as `get_method(name)(model, layer)` and
called as `cam(images)` (predicted class, NumPy results), timed interleaved as
in speed.py. The ratio is to the forward pass of the same repeats; the
project's target for Grad-CAM-like methods is <= 1.10.

Part 2, forward-pass methods (scorecam, ablationcam): one model at one image
size (MobileNetV2, 96x96 with --quick, 224x224 otherwise), `--images` images,
the methods built with `batch_size=--chunk`. Each is divided by its floor,
timed in the same repeats:

- Score-CAM: `images x channels` masked images pushed through the compiled
  forward pass of the full model (`tf.function(model(x))`, free batch size),
  `--chunk` images per call, from prepared tensors: the forward passes alone,
  without making the masks or the one forward pass that gives the activations.
- Ablation-CAM: `images x channels` ablated activations pushed through the
  compiled *head*, the model from the explained layer to the output
  (`keras.Model(layer.output, model.output)`), `--chunk` per call, from
  prepared tensors. Ablation-CAM also runs one forward pass of the images to
  the layer, which that floor leaves out; at small heads (MobileNetV2's is
  global pooling and one Dense layer) it is a large share of the whole, so a
  second floor row adds it ("head passes + one forward").
- tf-keras-vis `Scorecam` (where it imports; see `--peers-path`) on the same
  model, layer (`seek_penultimate_conv_layer=False`, so the very same layer
  and not the convolution before it), image and `batch_size`, with
  `max_N=-1` (full Score-CAM, the same number of masked passes as ours) and
  with `max_N=--max-n` (Faster Score-CAM: fewer passes, *not* equal work,
  shown for reference). Its note gives the speed-up of ours, and, for the
  full version, the most any Score-CAM that runs every masked pass could
  reach (tf-keras-vis / floor).

Methods whose class does not import yet, or fails on its first call, get a
row "n/a (reason)" and the run goes on.

In part 2, slow operations (first call over 5 s) are warmed up once and
timed once per repeat; faster ones (the head floors, Ablation-CAM) are
repeated to fill about a second per sample; every repeat runs all of them
in a new order. A Score-CAM call lasts seconds, long enough for the load of
other processes to change between the samples a ratio divides, so the
Score-CAM and Ablation-CAM notes also give the ratio of this process's CPU
time (`time.process_time`, all threads), which moves much less with other
processes' load. (tf-keras-vis runs much of its work in single-threaded
NumPy/SciPy, so its CPU time is not comparable and is not shown.)

Run:
    python benchmarks/methods_speed.py --quick      # a few minutes on 2 cores
    python benchmarks/methods_speed.py              # 224x224 Score-CAM: ~15 min
    python benchmarks/methods_speed.py --peers-path /tmp/peers/lib/python3.11/site-packages
    python benchmarks/methods_speed.py --parts perturbation --size 128 --perturbation-repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras
import numpy as np
import tensorflow as tf
from speed import (
    MODELS,
    Row,
    _print_rows,
    _short_error,
    compiled_forward,
    machine,
    time_interleaved,
)

from tf_gradcam import GradCAM

#: method name in `METHODS` -> row label
GRADIENT_METHODS = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "eigencam": "Eigen-CAM",
}
PERTURBATION_METHODS = {"scorecam": "Score-CAM", "ablationcam": "Ablation-CAM"}
GRADIENT_TARGET = 1.10
PERTURBATION_TARGET = 1.2
PEER_TARGET = 5.0


def build_method(name: str, model: keras.Model, layer: str, **options) -> Callable | str:
    """`get_method(name)(model, layer, **options)`, or why it is not available."""
    try:
        from tf_gradcam.methods import get_method

        return get_method(name)(model, layer, **options)
    except Exception as error:  # a method not written yet is a result, not a failure
        return f"n/a ({_short_error(error)})"


def first_calls(
    operations: dict[str, Callable[[], object]], optional: set[str]
) -> tuple[dict[str, str], dict[str, float]]:
    """Runs each operation once (warm-up); optional ones that fail are removed.

    Returns:
        `(failed, seconds)`: the reason of each removed operation, and how long
        each first call took (tracing included).
    """
    failed, seconds = {}, {}
    for name in list(operations):
        start = time.perf_counter()
        try:
            operations[name]()
        except Exception as error:
            if name not in optional:
                raise
            failed[name] = f"n/a ({_short_error(error)})"
            del operations[name]
        seconds[name] = time.perf_counter() - start
    return failed, seconds


def time_slow(
    operations: dict[str, Callable[[], object]],
    repeats: int,
    min_seconds: float,
    first: dict[str, float],
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call, for a mix of operations of seconds and of milliseconds.

    The caller has warmed every operation up once (`first_calls`, whose times
    are `first`). Operations whose first call took over 5 s run once per
    sample, with no second warm-up; the others are called once more to learn
    how many calls fill `min_seconds`, and run that often in each sample.
    Each repeat runs them all in a new order (the same seeded shuffle as
    speed.py).

    Returns:
        `(wall, cpu)`: median wall-clock seconds and median CPU seconds of
        this process (all its threads) per call. One call of Score-CAM lasts
        seconds, so the load of other processes can change between the
        samples that a wall-clock ratio divides; the CPU time counts only this
        process's work and moves much less with it.
    """
    inner = {}
    for name, operation in operations.items():
        inner[name] = 1
        if first[name] < 5.0:
            start = time.perf_counter()
            operation()
            once = time.perf_counter() - start
            inner[name] = max(1, math.ceil(min_seconds / max(once, 1e-6)))
    wall: dict[str, list[float]] = {name: [] for name in operations}
    cpu: dict[str, list[float]] = {name: [] for name in operations}
    order = random.Random(0)
    for _ in range(repeats):
        names = list(operations)
        order.shuffle(names)
        for name in names:
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(inner[name]):
                operations[name]()
            cpu[name].append((time.process_time() - start_cpu) / inner[name])
            wall[name].append((time.perf_counter() - start) / inner[name])
    return (
        {name: statistics.median(values) for name, values in wall.items()},
        {name: statistics.median(values) for name, values in cpu.items()},
    )


def _verdict(ratio: float, target: float) -> str:
    met = round(ratio, 2) <= target  # as printed
    return f"target <= {target:.2f}: {'met' if met else 'NOT met'}"


# ------------------------------------------------------ part 1: gradients


def bench_gradient_methods(key: str, batches: list[int], args: argparse.Namespace) -> list[Row]:
    """Each gradient method (and Eigen-CAM) against the bare compiled forward pass."""
    size = 224
    model = getattr(keras.applications, MODELS[key])(weights=None, input_shape=(size, size, 3))
    forward = compiled_forward(model)
    layer = GradCAM(model).layer
    cams = {label: build_method(name, model, layer) for name, label in GRADIENT_METHODS.items()}

    def make_operations(images: np.ndarray) -> dict[str, Callable[[], object]]:
        operations: dict[str, Callable[[], object]] = {
            "forward (compiled)": lambda: forward(images)
        }
        for label, cam in cams.items():
            if callable(cam):
                operations[label] = lambda cam=cam: cam(images)
        return operations

    rows: list[Row] = []
    rng = np.random.default_rng(0)
    for batch in batches:
        operations = make_operations(rng.random((batch, size, size, 3), dtype=np.float32))
        failed, _ = first_calls(operations, set(cams))
        times = time_interleaved(operations, args.repeats, args.min_seconds)
        base = times["forward (compiled)"]
        batch_rows = [
            Row(key, str(batch), "forward (compiled)", base * 1000, 1.0, f"layer {layer}")
        ]
        for label, cam in cams.items():
            if label in times:
                ratio = times[label] / base
                note = _verdict(ratio, GRADIENT_TARGET)
                if label == "Eigen-CAM":
                    note = f"gradient-free (forward + SVD); {note}"
                batch_rows.append(Row(key, str(batch), label, times[label] * 1000, ratio, note))
            else:
                reason = failed.get(label) or str(cam)
                batch_rows.append(Row(key, str(batch), label, None, None, reason))
        _print_rows(batch_rows, header=False)
        rows += batch_rows
    return rows


# ---------------------------------------------------- part 2: perturbation


def chunked(run_chunk: Callable, sample: tuple[int, ...], total: int, chunk: int) -> Callable:
    """Pushes `total` prepared inputs of shape `sample` through `run_chunk`, `chunk` at a time."""
    data = tf.constant(np.random.default_rng(3).random((chunk, *sample), dtype=np.float32))
    sizes = [chunk] * (total // chunk) + ([total % chunk] if total % chunk else [])
    parts = {n: data[:n] for n in set(sizes)}

    def run() -> np.ndarray:
        return np.concatenate([run_chunk(parts[n]) for n in sizes])

    return run


def _peer_scorecam(model: keras.Model, layer: str, chunk: int, max_n: int) -> Callable:
    from tf_keras_vis.scorecam import Scorecam
    from tf_keras_vis.utils.scores import CategoricalScore

    explainer = Scorecam(model)  # no model modifier: Score-CAM needs none, nothing is cloned

    def run(x: np.ndarray) -> object:
        # model.predict's progress bar; Keras 3's warning on the list input it passes
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return explainer(
                CategoricalScore([0] * len(x)),
                x,
                penultimate_layer=layer,
                seek_penultimate_conv_layer=False,
                batch_size=chunk,
                max_N=max_n,
            )

    return run


def bench_perturbation_methods(args: argparse.Namespace) -> list[Row]:
    """Score-CAM and Ablation-CAM against their batched-forward floors, tf-keras-vis beside."""
    key, size, n, chunk = args.perturbation_model, args.size, args.images, args.chunk
    model = getattr(keras.applications, MODELS[key])(weights=None, input_shape=(size, size, 3))
    layer = GradCAM(model).layer
    layer_output = model.get_layer(layer).output
    channels = int(layer_output.shape[-1])
    total = n * channels
    head = keras.Model(layer_output, model.output)
    forward = compiled_forward(model)
    score_floor = chunked(forward, (size, size, 3), total, chunk)
    head_floor = chunked(compiled_forward(head), tuple(layer_output.shape[1:]), total, chunk)
    cams = {
        label: build_method(name, model, layer, batch_size=chunk)
        for name, label in PERTURBATION_METHODS.items()
    }
    fast_ours = f"Score-CAM, max_channels={args.max_n}"
    cams[fast_ours] = build_method(
        "scorecam", model, layer, batch_size=chunk, max_channels=args.max_n
    )
    peers: dict[str, Callable | str] = {}
    peer_full = "tf-keras-vis Scorecam, max_N=-1 (full)"
    peer_fast = f"tf-keras-vis Scorecam, max_N={args.max_n} (Faster Score-CAM)"
    for label, max_n in ((peer_full, -1), (peer_fast, args.max_n)):
        if not args.peers:
            peers[label] = "n/a (--no-peers)"
            continue
        try:
            peers[label] = _peer_scorecam(model, layer, chunk, max_n)
        except Exception as error:
            peers[label] = f"n/a ({_short_error(error)})"

    images = np.random.default_rng(0).random((n, size, size, 3), dtype=np.float32)
    floor_score = f"floor: {total} masked images, compiled forward, {chunk}/call"
    floor_head = f"floor: {total} ablated activations, compiled head, {chunk}/call"
    floor_both = "floor: the same head passes + one forward pass of the images"
    operations: dict[str, Callable[[], object]] = {
        floor_score: score_floor,
        floor_head: head_floor,
        floor_both: lambda: (forward(images), head_floor()),
    }
    for label, explainer in {**cams, **peers}.items():
        if callable(explainer):
            operations[label] = lambda explainer=explainer: explainer(images)
    failed, first = first_calls(operations, set(cams) | set(peers))
    times, cpu = time_slow(operations, args.perturbation_repeats, 1.0, first)

    label = f"{n} x {size}x{size}"
    setting = f"layer {layer}, {channels} ch"
    rows = [Row(key, label, floor_score, times[floor_score] * 1000, 1.0, setting)]

    def add(name: str, floor: str, note: Callable[[float], str], missing: object) -> None:
        if name in times:
            ratio = times[name] / times[floor]
            rows.append(Row(key, label, name, times[name] * 1000, ratio, note(ratio)))
        else:
            rows.append(Row(key, label, name, None, None, failed.get(name) or str(missing)))

    ours = times.get("Score-CAM")

    def peer_note(ratio: float, name: str, equal: bool) -> str:
        if equal:
            work = f"same {total} masked passes"
            bound = f"; a full Score-CAM can be at most {ratio:.1f}x faster than this"
        else:
            work = f"NOT equal work: {args.max_n} of {channels} channels per image"
            bound = ""
        if ours is None:
            return work + bound
        speedup = times[name] / ours
        verdict = "met" if speedup >= PEER_TARGET else "NOT met"
        target = f" (target >= {PEER_TARGET:.0f}x: {verdict})" if equal else ""
        pace = f"ours {speedup:.2f}x faster" if speedup >= 1 else f"ours {1 / speedup:.2f}x slower"
        return f"{pace}{target}; {work}{bound}"

    def cpu_note(name: str, floor: str) -> str:
        return f"CPU-time ratio {cpu[name] / cpu[floor]:.2f}"

    def score_note(ratio: float) -> str:
        return f"{_verdict(ratio, PERTURBATION_TARGET)}; {cpu_note('Score-CAM', floor_score)}"

    add("Score-CAM", floor_score, score_note, cams["Score-CAM"])
    add(peer_full, floor_score, lambda r: peer_note(r, peer_full, True), peers[peer_full])
    add(peer_fast, floor_score, lambda r: peer_note(r, peer_fast, False), peers[peer_fast])

    def fast_note(ratio: float) -> str:
        note = f"{args.max_n} of {channels} channels per image"
        if fast_ours in times and peer_fast in times:
            speedup = times[peer_fast] / times[fast_ours]
            verdict = "met" if speedup >= PEER_TARGET else "NOT met"
            note += (
                f"; {speedup:.2f}x faster than tf-keras-vis max_N={args.max_n} at equal work "
                f"(target >= {PEER_TARGET:.0f}x: {verdict})"
            )
        return note

    add(fast_ours, floor_score, fast_note, cams[fast_ours])
    head_note = "the head: the model after the layer, keras.Model(layer.output, model.output)"
    rows.append(Row(key, label, floor_head, times[floor_head] * 1000, 1.0, head_note))
    both = times[floor_both]
    rows.append(Row(key, label, floor_both, both * 1000, both / times[floor_head], ""))

    def ablation_note(ratio: float) -> str:
        extra = times["Ablation-CAM"] / both
        return (
            f"{_verdict(ratio, PERTURBATION_TARGET)}; {cpu_note('Ablation-CAM', floor_head)}; "
            f"{extra:.2f} x (head passes + one forward), CPU "
            f"{cpu['Ablation-CAM'] / cpu[floor_both]:.2f}"
        )

    add("Ablation-CAM", floor_head, ablation_note, cams["Ablation-CAM"])
    return rows


# ----------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="part 1 batches 1,8; part 2 at 96x96, 3 repeats"
    )
    parser.add_argument("--parts", default="gradient,perturbation", help="which parts to run")
    parser.add_argument("--models", default="mobilenetv2,resnet50", help="part 1 models")
    parser.add_argument("--batches", help="part 1 batch sizes (default 1,8,32; --quick 1,8)")
    parser.add_argument("--repeats", type=int, help="part 1 interleaved repeats (default 5)")
    parser.add_argument("--min-seconds", type=float, default=0.3, help="part 1 per timed sample")
    parser.add_argument("--perturbation-model", default="mobilenetv2", choices=sorted(MODELS))
    parser.add_argument("--size", type=int, help="part 2 image size (default 224; --quick 96)")
    parser.add_argument("--images", type=int, default=1, help="part 2 images per call")
    parser.add_argument("--chunk", type=int, default=32, help="part 2 batch_size of masked passes")
    parser.add_argument("--max-n", type=int, default=128, help="tf-keras-vis Faster Score-CAM")
    parser.add_argument("--perturbation-repeats", type=int, help="part 2 repeats (default 5)")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="skip tf-keras-vis")
    parser.add_argument(
        "--peers-path", action="append", default=[], help="site-packages holding tf-keras-vis"
    )
    args = parser.parse_args(argv)
    defaults = (
        {"batches": "1,8", "repeats": 5, "size": 96, "perturbation_repeats": 3}
        if args.quick
        else {"batches": "1,8,32", "repeats": 5, "size": 224, "perturbation_repeats": 5}
    )
    for name, value in defaults.items():  # explicit options win over --quick
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.extend(args.peers_path)
    parts = {p.strip() for p in args.parts.split(",")}
    print(f"Machine: {machine()}")
    print(
        "Medians of interleaved repeats; ratios are measured in the same repeats, so "
        "machine load affects numerator and denominator alike.\n"
    )
    start = time.perf_counter()
    if "gradient" in parts:
        print("Gradient methods (and Eigen-CAM), 224x224, against the compiled forward pass:\n")
        _print_rows([])
        for key in args.models.split(","):
            bench_gradient_methods(
                key.strip().lower(), [int(b) for b in args.batches.split(",")], args
            )
        print()
    if "perturbation" in parts:
        print(
            "Forward-pass methods against their floors (ratio column: x the floor row above "
            "them), tf-keras-vis beside:\n"
        )
        print("| model | images | operation | ms/call | x floor | note |")
        print("|---|---|---|---:|---:|---|")
        _print_rows(bench_perturbation_methods(args), header=False)
    print(
        f"\nload average at end: {os.getloadavg()[0]:.1f}; "
        f"wall time {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
