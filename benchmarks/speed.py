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

`--models mobilenetv2-subclassed` times a subclassed model instead: a
`keras.Model` subclass whose `call` runs MobileNetV2's stem, its 17 inverted
residual blocks (a Python list of `InvertedResidual` layers, each calling its
own convolutions) and its head, with the weights of
`keras.applications.MobileNetV2(weights=None)` copied layer by layer and
`call` returning the logits. Grad-CAM explains its `out_relu` attribute (the
last 7x7x1280 feature map), the layer being captured during the model's own
call (`tf_gradcam.capture`). Its rows: forward (`tf.function` of the subclassed
model), Grad-CAM and top-5 maps as above, and the functional MobileNetV2's
forward and Grad-CAM at the same layer in the same repeats; first a check row
gives the max |difference| between the subclassed and the functional model's
maps, raw maps, weights, heatmaps and scores at batch 2, and between their
Guided Grad-CAM gradients; Guided Grad-CAM (the ReLU functions replaced for the
call, `relu_rules.relu_functions_replaced`) is timed against the subclassed
model's forward + backward pass to the input. The peers are not run on it.

`--models vit-b16` times a Vision Transformer: keras-hub's `ViTImageClassifier`
built from its constructors with ViT-B/16 sizes (224x224, patch 16, 12 blocks,
12 heads, width 768, MLP 3072, 1,000 classes, no preprocessor; random weights,
no preset is downloaded). Grad-CAM explains the default layer, the last block's
input (`<backbone>/vit_encoder/encoder_layers/10`, whose forward pass runs the
last block for the class token only: `tf_gradcam.class_token`), the last block's
first LayerNorm (`.../encoder_layers/11/layer_norm_1`, captured during the
model's own call) and the last block's output (`.../encoder_layers/11`, all-zero
maps: no patch token reaches the class token after it). First a check row: on
batch 2, the weights and raw maps of the three against a `tf.GradientTape`
over the classifier unrolled by hand (embedding, blocks in a loop, final
LayerNorm, class token, dense head; dropouts are identity at inference). Then
forward, Grad-CAM at the three layers, top-5 maps, and two hand-written floors
at the default layer: the same tape compiled, and the tape with the last block
computed for the class token only. Notes give the CPU-time ratio
(`time.process_time`, steadier than wall time under load) and the median of
per-repeat ratios. Batches of 16 or more use at most 3 repeats and one warm-up
call (a forward pass at batch 32 takes 10-25 s on 2 cores); the whole run takes
about 10-14 minutes on 2 shared cores. A graph check counts the operations of
each compiled function. The peers are not run on it.

The other CAM methods (Grad-CAM++, XGrad-CAM, HiResCAM, LayerCAM, Eigen-CAM,
Score-CAM, Ablation-CAM, tf-keras-vis `Scorecam`) are timed against their
floors by `benchmarks/methods_speed.py`, which reuses this script's helpers.

Run:
    python benchmarks/speed.py                       # full table (minutes)
    python benchmarks/speed.py --quick               # MobileNetV2, batches 1 and 8
    python benchmarks/speed.py --models resnet50 --batches 1,32 --repeats 5
    python benchmarks/speed.py --models mobilenetv2-subclassed --batches 1,32 --no-peers
    python benchmarks/speed.py --models vit-b16 --batches 1,32 --repeats 15 --no-peers
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
#: Vision Transformers from keras-hub's constructors (random weights): name → ViTBackbone sizes.
VITS = {
    "vit-b16": dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
}
#: Subclassed twins (`MobileNetV2Subclassed`): name → (functional original, explained layer).
SUBCLASSED = {"mobilenetv2-subclassed": ("MobileNetV2", "out_relu")}
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


# ---------------------------------------------------- subclassed twin


def _bn(name: str) -> keras.layers.Layer:
    return keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.999, name=name)


class InvertedResidual(keras.layers.Layer):
    """MobileNetV2's inverted residual block (`keras.applications`' layer names)."""

    def __init__(self, in_channels: int, filters: int, stride: int, expansion: int, block: int):
        prefix = f"block_{block}_" if block else "expanded_conv_"
        super().__init__(name=prefix.rstrip("_"))
        self.expand = self.expand_bn = self.expand_relu = self.pad = None
        if block:  # the first block has no expansion
            self.expand = keras.layers.Conv2D(
                expansion * in_channels, 1, use_bias=False, name=f"{prefix}expand"
            )
            self.expand_bn = _bn(f"{prefix}expand_BN")
            self.expand_relu = keras.layers.ReLU(6.0, name=f"{prefix}expand_relu")
        if stride == 2:  # even sizes at 224x224: one row and column after (correct_pad)
            self.pad = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name=f"{prefix}pad")
        self.depthwise = keras.layers.DepthwiseConv2D(
            3,
            strides=stride,
            use_bias=False,
            padding="same" if stride == 1 else "valid",
            name=f"{prefix}depthwise",
        )
        self.depthwise_bn = _bn(f"{prefix}depthwise_BN")
        self.depthwise_relu = keras.layers.ReLU(6.0, name=f"{prefix}depthwise_relu")
        self.project = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{prefix}project")
        self.project_bn = _bn(f"{prefix}project_BN")
        self.residual = in_channels == filters and stride == 1

    def call(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        x = inputs
        if self.expand is not None:
            x = self.expand_relu(self.expand_bn(self.expand(x), training=training))
        if self.pad is not None:
            x = self.pad(x)
        x = self.depthwise_relu(self.depthwise_bn(self.depthwise(x), training=training))
        x = self.project_bn(self.project(x), training=training)
        return inputs + x if self.residual else x


class MobileNetV2Subclassed(keras.Model):
    """MobileNetV2 (alpha 1, 224x224) as a subclassed model whose `call` runs its blocks.

    The same layers as `keras.applications.MobileNetV2`, under the same names,
    held in attributes and a Python list of `InvertedResidual` blocks; `call`
    returns the logits (the functional original ends in a softmax, which
    `GradCAM(..., logits=True)` strips there). The last feature map is the
    `out_relu` attribute (7x7x1280).
    """

    #: (expansion, filters, repeats, first stride) of each stage (the MobileNetV2 paper, table 2).
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
    STAGES += ((6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, classes: int = 1000):
        super().__init__(name="mobilenetv2_subclassed")
        self.stem = keras.layers.Conv2D(
            32, 3, strides=2, padding="same", use_bias=False, name="Conv1"
        )
        self.stem_bn = _bn("bn_Conv1")
        self.stem_relu = keras.layers.ReLU(6.0, name="Conv1_relu")
        self.blocks = []
        channels = 32
        for expansion, filters, repeats, stride in self.STAGES:
            for i in range(repeats):
                block = InvertedResidual(
                    channels, filters, stride if i == 0 else 1, expansion, len(self.blocks)
                )
                self.blocks.append(block)
                channels = filters
        self.head_conv = keras.layers.Conv2D(1280, 1, use_bias=False, name="Conv_1")
        self.head_bn = _bn("Conv_1_bn")
        self.out_relu = keras.layers.ReLU(6.0, name="out_relu")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.classifier = keras.layers.Dense(classes, name="predictions")

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        x = self.stem_relu(self.stem_bn(self.stem(x), training=training))
        for block in self.blocks:
            x = block(x, training=training)
        x = self.out_relu(self.head_bn(self.head_conv(x), training=training))
        return self.classifier(self.pool(x))


def subclassed_twin(key: str) -> tuple[keras.Model, keras.Model]:
    """The subclassed model and its functional original, with the same (random) weights."""
    functional = getattr(keras.applications, SUBCLASSED[key][0])(
        weights=None, input_shape=(SIZE, SIZE, 3)
    )
    model = MobileNetV2Subclassed()
    model(np.zeros((1, SIZE, SIZE, 3), np.float32))  # builds every layer
    copied = 0
    for layer in model._flatten_layers(include_self=False):
        if layer.weights and not isinstance(layer, InvertedResidual):  # leaf layers
            layer.set_weights(functional.get_layer(layer.name).get_weights())
            copied += 1
    expected = sum(1 for layer in functional.layers if layer.weights)
    assert copied == expected, f"copied the weights of {copied} layers out of {expected}"
    return model, functional


def bench_subclassed(key: str, batches: list[int], args: argparse.Namespace) -> list[Row]:
    """Rows for a subclassed twin of a `keras.applications` model at every batch size.

    First a check: the maps of `GradCAM(twin, layer=path)` against those of
    `GradCAM(functional original)` at the same layer, batch 2 (max |difference|).
    Then forward and Grad-CAM of the twin, with the functional original's forward
    and Grad-CAM timed in the same repeats for comparison.
    """
    model, functional = subclassed_twin(key)
    path = SUBCLASSED[key][1]
    spec = tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32)
    step = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    forward = lambda x: step(x).numpy()  # noqa: E731
    cam = GradCAM(model, layer=path)
    reference = GradCAM(functional, layer=path)
    functional_forward = compiled_forward(functional)
    guided = tf_gradcam.GuidedGradCAM(model, layer=path)

    @tf.function(input_signature=[spec])
    def backward_step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            score = tf.reduce_max(model(x, training=False), axis=-1)
        return tape.gradient(score, x)

    forward_backward = lambda x: backward_step(x).numpy()  # noqa: E731

    images = np.random.default_rng(5).random((2, SIZE, SIZE, 3), dtype=np.float32)
    mine, theirs = cam(images), reference(images)
    fields = ("maps", "raw_maps", "weights", "heatmaps", "scores")
    diff = max(float(np.max(np.abs(getattr(mine, f) - getattr(theirs, f)))) for f in fields)
    same = bool(np.array_equal(mine.classes, theirs.classes))
    guided_mine = guided(images).gradients
    guided_theirs = tf_gradcam.GuidedGradCAM(functional, layer=path)(images).gradients
    guided_diff = float(np.max(np.abs(guided_mine - guided_theirs)))
    check = (
        f"layer {cam.layer!r} vs functional {reference.layer!r}: max |diff| {diff:.1e} over "
        "maps, raw maps, weights, heatmaps (in [0, 1]), scores; maps up to "
        f"{float(np.max(np.abs(theirs.maps))):.2g}; same classes: {same}; Guided Grad-CAM "
        f"max |diff| {guided_diff:.1e} (values up to {float(np.max(np.abs(guided_theirs))):.2g})"
    )
    rows = [Row(key, "2", "check: maps against the functional model", None, None, check)]
    _print_rows(rows, header=False)

    rng = np.random.default_rng(0)
    for batch in batches:
        images = rng.random((batch, SIZE, SIZE, 3), dtype=np.float32)
        operations: dict[str, Callable[[], object]] = {
            "forward (compiled)": lambda images=images: forward(images),
            "Grad-CAM": lambda images=images: cam(images),
            "top-5 maps": lambda images=images: cam(images, target=TopK(5)),
            "functional: forward (compiled)": lambda images=images: functional_forward(images),
            "functional: Grad-CAM": lambda images=images: reference(images),
            "forward + backward to input": lambda images=images: forward_backward(images),
            "Guided Grad-CAM": lambda images=images: guided(images),
        }
        times = time_interleaved(operations, args.repeats, args.min_seconds)
        base = times["forward (compiled)"]
        notes = {
            "top-5 maps": f"{times['top-5 maps'] / times['Grad-CAM']:.2f} x top-1",
            "functional: Grad-CAM": (
                f"{times['functional: Grad-CAM'] / times['functional: forward (compiled)']:.2f}"
                " x functional forward"
            ),
            "Guided Grad-CAM": (
                f"{times['Guided Grad-CAM'] / times['forward + backward to input']:.2f}"
                " x forward+backward"
            ),
        }
        batch_rows = [
            Row(key, str(batch), name, seconds * 1000, seconds / base, notes.get(name, ""))
            for name, seconds in times.items()
        ]
        _print_rows(batch_rows, header=False)
        rows += batch_rows
    return rows


# ------------------------------------------------------ Vision Transformer


def vit_classifier(key: str) -> keras.Model:
    """keras-hub's `ViTImageClassifier` from its constructors, random weights, 1,000 classes."""
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ViTBackbone(image_shape=(SIZE, SIZE, 3), **VITS[key])
    return keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=1000, preprocessor=None
    )


def _vit_unrolled(
    model: keras.Model,
    images: tf.Tensor,
    classes: tf.Tensor | None,
    persistent: bool = False,
    class_token_tail: bool = False,
) -> tuple[tf.GradientTape, dict[str, tf.Tensor], tf.Tensor]:
    """The classifier unrolled by hand under a tape: `(tape, tensors, scores)`.

    The embedding layer, the encoder blocks in a loop, the last block's call
    written out (its first LayerNorm's output watched), the encoder's final
    LayerNorm, the class token and the output dense layer; the dropouts are left
    out (identity at inference). `tensors` holds the last block's `input`,
    `layer_norm_1` and `output`; the scores are those of `classes` (the
    predicted classes when `None`).

    With `class_token_tail`, the last block after `layer_norm_1` is
    computed for the class token only (its attention queried by the class token,
    keys and values from every token; the MLP on one token): the head reads
    nothing else and every op after the attention works token by token, so the
    scores and their gradients are the same, while the backward pass no longer
    runs the MLP and the query side on 197 tokens of which 196 have a zero
    gradient. `output` is then the class token's output only.
    """
    backbone = model.backbone
    embedding = backbone.get_layer("vit_patching_and_embedding")
    encoder = backbone.get_layer("vit_encoder")
    *blocks, last = encoder.encoder_layers
    with tf.GradientTape(persistent=persistent) as tape:
        x = embedding(images)
        for block in blocks:
            x = block(x, training=False)
        tape.watch(x)
        block_input = x
        normed = last.layer_norm_1(x)
        tape.watch(normed)
        query = normed[:, :1] if class_token_tail else normed
        x = x[:, : query.shape[1]] + last.mha(query, normed, training=False)
        output = x + last.mlp(last.layer_norm_2(x))
        tape.watch(output)
        logits = model.output_dense(encoder.layer_norm(output)[:, 0])
        if classes is None:
            classes = tf.argmax(logits, axis=-1, output_type=tf.int32)
        scores = tf.gather(logits, classes, axis=1, batch_dims=1)
    return tape, {"input": block_input, "layer_norm_1": normed, "output": output}, scores


def _token_cam(tokens: tf.Tensor, gradients: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Eq. 1 and 2 on the patch tokens (class token dropped): `(weights, raw maps)`."""
    patches = tokens[:, 1:]
    side = round(math.sqrt(int(patches.shape[1])))
    alpha = tf.reduce_mean(gradients[:, 1:], axis=1)
    raw = tf.einsum("bnc,bc->bn", patches, alpha)
    return alpha, tf.reshape(raw, (-1, side, side))


def vit_reference(
    model: keras.Model, images: np.ndarray, classes: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Grad-CAM by hand, eagerly: {"input" | "layer_norm_1" | "output": (weights, raw maps)}."""
    tape, tensors, scores = _vit_unrolled(
        model, tf.constant(images), tf.constant(classes, tf.int32), persistent=True
    )
    found = {}
    for name, tensor in tensors.items():
        alpha, raw = _token_cam(tensor, tape.gradient(scores, tensor))
        found[name] = (alpha.numpy(), raw.numpy())
    return found


def vit_hand_cam(model: keras.Model, class_token_tail: bool = False) -> Callable:
    """Grad-CAM at the last block's input, compiled: the floor of its backward pass.

    A `tf.function` over `_vit_unrolled` (predicted class), returning the raw
    maps as NumPy; no upsampling, ReLU or normalisation.
    """
    spec = tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32)

    @tf.function(input_signature=[spec])
    def step(x):
        tape, tensors, scores = _vit_unrolled(model, x, None, class_token_tail=class_token_tail)
        tokens = tensors["input"]
        return _token_cam(tokens, tape.gradient(scores, tokens))[1]

    return lambda x: step(x).numpy()


def time_paired(
    operations: dict[str, Callable[[], object]],
    repeats: int,
    min_seconds: float,
    warmups: int = 2,
) -> dict[str, tuple[float, float, float]]:
    """`time_interleaved`'s schedule, with CPU time and per-repeat ratios too.

    `warmups` calls of each operation come first, the last one timed to set the
    calls per sample (1 saves a call where every operation takes seconds).

    Returns {name: (median wall seconds, median CPU seconds, median over the
    repeats of the wall-time ratio to the *first* operation in the same repeat)}.
    CPU time is `time.process_time` (this process, all threads): other people's
    work on the machine lengthens the wall time of a call, much less its CPU time.
    """
    inner = {}
    for name, operation in operations.items():
        for _ in range(warmups - 1):
            operation()
        start = time.perf_counter()
        operation()
        inner[name] = max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-6)))
    wall: dict[str, list[float]] = {name: [] for name in operations}
    cpu: dict[str, list[float]] = {name: [] for name in operations}
    order = random.Random(0)
    for _ in range(repeats):
        names = list(operations)
        order.shuffle(names)
        for name in names:
            operation = operations[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(inner[name]):
                operation()
            wall[name].append((time.perf_counter() - start) / inner[name])
            cpu[name].append((time.process_time() - start_cpu) / inner[name])
    base = wall[next(iter(operations))]
    return {
        name: (
            statistics.median(wall[name]),
            statistics.median(cpu[name]),
            statistics.median(w / b for w, b in zip(wall[name], base, strict=True)),
        )
        for name in operations
    }


def bench_vit(key: str, batches: list[int], args: argparse.Namespace) -> list[Row]:
    """`_bench_vit`, random images' all-zero-map warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _bench_vit(key, batches, args)


def _bench_vit(key: str, batches: list[int], args: argparse.Namespace) -> list[Row]:
    """Rows for a keras-hub ViT classifier at every batch size.

    First a check on batch 2: Grad-CAM's weights and raw maps at the default
    layer (the last block's input), its first LayerNorm and its output against
    `vit_reference`, and the raw maps of the two compiled hand-written versions
    against Grad-CAM's. Then, timed as `time_paired`: forward, Grad-CAM at the
    three layers, top-5 maps at the default layer, and the two hand-written floors
    (`vit_hand_cam`: the same tape compiled, and with the class-token tail); each
    note gives the CPU-time ratio and the median of the per-repeat ratios.
    Batches of 16 images or more use at most 3 repeats and one warm-up call (a
    ViT-B/16 forward pass at batch 32 takes 10-25 s on 2 shared cores). Last, a
    graph check: the operations each compiled function runs per call.
    """
    model = vit_classifier(key)
    last = f"{model.backbone.name}/vit_encoder/encoder_layers/{VITS[key]['num_layers'] - 1}"
    norm = f"{last}/layer_norm_1"
    forward = compiled_forward(model)
    cam = GradCAM(model)
    cam_norm = GradCAM(model, layer=norm)
    cam_output = GradCAM(model, layer=last)
    hand = vit_hand_cam(model)
    tail = vit_hand_cam(model, class_token_tail=True)

    images = np.random.default_rng(5).random((2, SIZE, SIZE, 3), dtype=np.float32)
    mine = {"input": cam(images), "layer_norm_1": cam_norm(images), "output": cam_output(images)}
    same = all(np.array_equal(r.classes, mine["input"].classes) for r in mine.values())
    shortcut = getattr(cam.gradient_model, "tail", None) is not None
    reference = vit_reference(model, images, mine["input"].classes)
    parts = []
    for name, result in mine.items():
        alpha, raw = reference[name]
        weights_diff = float(np.max(np.abs(result.weights - alpha)))
        raw_diff = float(np.max(np.abs(result.raw_maps - raw)))
        parts.append(
            f"{name}: weights {weights_diff:.1e} (values up to {np.max(np.abs(alpha)):.2g}), "
            f"raw maps {raw_diff:.1e} (values up to {np.max(np.abs(raw)):.2g})"
        )
    raw_maps = mine["input"].raw_maps
    hand_diff = float(np.max(np.abs(hand(images) - raw_maps)))
    tail_diff = float(np.max(np.abs(tail(images) - raw_maps)))
    check = (
        f"default layer {cam.layer} (class-token shortcut taken: {shortcut}); layout "
        f"{mine['input'].layout.describe()}; max |diff| against the tape over "
        f"the unrolled classifier: {'; '.join(parts)}; same classes: {same}; compiled "
        f"by-hand raw maps at the block input {hand_diff:.1e}, class-token tail {tail_diff:.1e}"
    )
    rows = [Row(key, "2", "check: Grad-CAM against the unrolled tape", None, None, check)]
    _print_rows(rows, header=False)

    rng = np.random.default_rng(0)
    for batch in batches:
        images = rng.random((batch, SIZE, SIZE, 3), dtype=np.float32)
        operations: dict[str, Callable[[], object]] = {
            "forward (compiled)": lambda images=images: forward(images),
            "Grad-CAM, default layer": lambda images=images: cam(images),
            "Grad-CAM, layer_norm_1": lambda images=images: cam_norm(images),
            "Grad-CAM, block output": lambda images=images: cam_output(images),
            "top-5 maps, default layer": lambda images=images: cam(images, target=TopK(5)),
            "by hand: tape, default layer": lambda images=images: hand(images),
            "by hand: class-token tail, default layer": lambda images=images: tail(images),
        }
        large = batch >= 16
        repeats = min(args.repeats, 3) if large else args.repeats
        times = time_paired(operations, repeats, args.min_seconds, warmups=1 if large else 2)
        base_wall, base_cpu, _ = times["forward (compiled)"]
        batch_rows = []
        for name, (seconds, cpu, paired) in times.items():
            note = f"CPU {cpu / base_cpu:.2f}, paired {paired:.2f}"
            if name == "forward (compiled)":
                note = f"{repeats} repeats"
            elif name == "Grad-CAM, default layer":
                hand_seconds = times["by hand: class-token tail, default layer"][0]
                note += f"; {seconds / hand_seconds:.2f} x by hand (class-token tail)"
            elif name == "Grad-CAM, block output":
                note += "; all-zero maps (no patch token reaches the class token after it)"
            elif name.startswith("top-5"):
                note += f"; {seconds / times['Grad-CAM, default layer'][0]:.2f} x top-1"
            batch_rows.append(Row(key, str(batch), name, seconds * 1000, seconds / base_wall, note))
        _print_rows(batch_rows, header=False)
        rows += batch_rows

    images = np.random.default_rng(2).random((2, SIZE, SIZE, 3), dtype=np.float32)
    counts = {  # new functions: run metadata lists the graphs instantiated during the call
        "forward": executed_ops(lambda: compiled_forward(model)(images)),
        "Grad-CAM step, default layer": executed_ops(lambda: GradCAM(model)(images)),
        "Grad-CAM step, layer_norm_1": executed_ops(lambda: GradCAM(model, layer=norm)(images)),
        "Grad-CAM step, block output": executed_ops(lambda: GradCAM(model, layer=last)(images)),
        "by hand: tape, default layer": executed_ops(lambda: vit_hand_cam(model)(images)),
        "by hand: class-token tail": executed_ops(
            lambda: vit_hand_cam(model, class_token_tail=True)(images)
        ),
    }
    graph_rows = []
    for name, c in counts.items():
        if c is None:
            graph_rows.append(Row(key, "2", f"graph check: {name}", None, None, "n/a"))
            continue
        note = (
            f"MatMul {c['MatMul'] + c['_FusedMatMul']}, BatchMatMul "
            f"{sum(v for k, v in c.items() if k.startswith('BatchMatMul'))}, Einsum "
            f"{c['Einsum']}, Softmax {c['Softmax']}, Conv2D "
            f"{c['Conv2D'] + c['_FusedConv2D']}, {sum(c.values())} ops"
        )
        graph_rows.append(Row(key, "2", f"graph check: {name}", None, None, note))
    _print_rows(graph_rows, header=False)
    return rows + graph_rows


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
    parser.add_argument(
        "--models",
        help="comma-separated: resnet50, mobilenetv2, mobilenetv2-subclassed, vit-b16 "
        "(default resnet50,mobilenetv2)",
    )
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
        key = key.strip().lower()
        bench = bench_subclassed if key in SUBCLASSED else bench_vit if key in VITS else bench_model
        rows += bench(key, batches, args)
    extra = (
        # The graph check first: after `bench_dataset` the run metadata of its
        # first forward call also held a Grad-CAM step's graph (262 ops instead of 47).
        bench_graph()
        + bench_loop(args.calls)
        + bench_dataset(1024, args.repeats)
        + bench_callback(args.quick)
    )
    _print_rows(extra, header=False)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
