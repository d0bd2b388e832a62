"""Which layer should Grad-CAM explain in a Vision Transformer classifier?

A ViT classifier (keras-hub's `ViTImageClassifier`, `pooling="token"`) reads
only the class token of the encoder's output. After the last block every token
is processed on its own (the encoder's final LayerNorm, then `x[:, 0]` and the
dense head), so the gradient of a class score on the *patch* tokens of the last
block's output, or of the final `vit_encoder` output, is exactly zero and
Grad-CAM's eq. 1 gives α = 0: an all-zero map. Patch tokens reach the class
token only through self-attention, so a useful layer must feed an attention
layer that the class token still queries: the last block's first LayerNorm
(`layer_norm_1`, the input of its attention) or anything before it.

This script trains small ViTs from random weights (no preset is downloaded) on
`tf_gradcam.scenes` (one shape on a noisy 64×64 background; classes: circle,
square, triangle; 8×8 patches, so an 8×8 token grid after the class token) on
the CPU, with fixed seeds and deterministic ops, and prints for Grad-CAM of the
ground-truth class at each candidate layer:

- the pointing game (Zhang et al., §4.3): the heatmap's maximum on the object's
  mask (exact), and within 4 pixels (Zhang et al.'s 15 px at ~224 px, scaled);
- the localisation error given the class: the box around the largest segment of
  the map thresholded at 15% of its maximum (§4.1) has IoU < 0.5 with the
  object's box;
- the share of the heatmap's mass on the object's pixels;
- the share of all-zero (degenerate) maps (`Explanation.degenerate`).

HiResCAM and LayerCAM, whose maps weight each token by its own gradient rather
than by the gradients' mean over the grid, are scored at the last block's input
and first LayerNorm for comparison.

Attention rollout and gradient-weighted attention (`tf_gradcam.AttentionRollout`),
which follow the class token through every block instead of explaining one
layer, are scored the same way, and drawn beside the default layer's Grad-CAM in
docs/images/vit_attention.png (`--attention-picture`).

A random point hits the object with probability equal to the object's share of
the image, which is also the mass share of a uniform map: the `random point`
row gives both. Each training seed draws fresh training scenes for every
epoch; the test scenes are the same for all seeds. The `default` column says
which layer `GradCAM(model)` picks with the library in this checkout (empty
when it picks none of the candidates or raises).

It also draws docs/images/vit_layers.png: test scenes of the first seed's model
with the Grad-CAM maps of three candidate layers and HiResCAM's at the last
block's input (white box: the object; white cross: the map's maximum, the point
of the pointing game).

Run from the repository root (per seed about 3 minutes of training and 1 of
explaining on 2 shared CPU cores; the three seeds of docs/transformers.md took
11 minutes):

    python benchmarks/vit_layers.py                 # seeds 0 and 1
    python benchmarks/vit_layers.py --seeds 0 1 2   # the table of docs/transformers.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU only, for determinism
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tf_gradcam

import cv2
import keras
import keras_hub
import numpy as np
import tensorflow as tf

import tf_gradcam
from tf_gradcam import metrics
from tf_gradcam.attention import AttentionRollout
from tf_gradcam.methods import TITLES, get_method
from tf_gradcam.scenes import make_scenes

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
PATCH = 8
NUM_LAYERS = 4
#: Zhang et al.'s 15-pixel pointing tolerance at ~224 pixels, scaled to 64-pixel scenes.
TOLERANCE = 4
TRAIN_SEED, TEST_SEED = 50, 51  # scene generator seeds; epoch e of training seed s: 50 + 1000 s + e

#: Candidate layers: (label, path inside the backbone); LAST is the last block's index.
LAST, BEFORE = NUM_LAYERS - 1, NUM_LAYERS - 2
CANDIDATES = (
    (
        f"block {LAST} layer_norm_1 (last block's first LayerNorm)",
        f"encoder_layers/{LAST}/layer_norm_1",
    ),
    (f"block {BEFORE} output (last block's input)", f"encoder_layers/{BEFORE}"),
    (f"block {LAST} output (last block's output)", f"encoder_layers/{LAST}"),
    ("vit_encoder output (final LayerNorm)", "vit_encoder"),
    (f"block {BEFORE} layer_norm_1", f"encoder_layers/{BEFORE}/layer_norm_1"),
    ("block 1 output (middle)", "encoder_layers/1"),
    ("patch embedding (encoder input)", "vit_patching_and_embedding"),
)
#: Gradient methods with per-token weights, scored at the first two candidates.
OTHER_METHODS = ("hirescam", "layercam")
#: Columns of the picture after the image: (method, index into CANDIDATES).
PICTURE_COLUMNS = (("gradcam", 0), ("gradcam", 1), ("gradcam", 2), ("hirescam", 1))
#: Columns of the attention picture: the default layer's Grad-CAM, then the two rollouts.
ATTENTION_COLUMNS = (("gradcam", 1), ("rollout", None), ("gradient attention", None))


def layer_path(model: keras.Model, inner: str) -> str:
    """A candidate's path in the classifier: nodes of the backbone, or attributes of its encoder."""
    if inner.startswith("encoder_layers/"):
        inner = f"vit_encoder/{inner}"
    return f"{model.backbone.name}/{inner}"


def build_model(classes: int) -> keras.Model:
    """A 4-block ViT (hidden 64, 4 heads, MLP 128) on 64×64 images, 8×8 patches, class token."""
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(SIZE, SIZE, 3),
        patch_size=PATCH,
        num_layers=NUM_LAYERS,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
    )
    return keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=classes, preprocessor=None
    )


def centred(images: np.ndarray) -> np.ndarray:
    """Scenes in [0, 1] → the model's input in [-1, 1]."""
    return images * 2.0 - 1.0


def train(seed: int, args, classes: int) -> keras.Model:
    """AdamW with warm-up and cosine decay; fresh scenes every epoch."""
    keras.utils.set_random_seed(seed)
    model = build_model(classes)
    steps = args.epochs * (args.train // args.batch)
    warmup = steps // 10
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps - warmup, alpha=0.01, warmup_target=args.lr, warmup_steps=warmup
    )
    model.compile(
        keras.optimizers.AdamW(schedule, weight_decay=0.05, clipnorm=1.0),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    for epoch in range(args.epochs):
        scenes = make_scenes(args.train, seed=TRAIN_SEED + 1000 * seed + epoch)
        data = tf.data.Dataset.from_tensor_slices((centred(scenes.images), scenes.labels))
        model.fit(data.batch(args.batch, drop_remainder=True), epochs=1, verbose=0)
    return model


def evaluate(
    model: keras.Model, path: str, test, method: str = "gradcam"
) -> tuple[tuple[float, ...], np.ndarray]:
    """Grad-CAM-family scores at one layer (`score_heatmaps`), and the heatmaps."""
    cam = get_method(method)(model, path)
    result = cam(centred(test.images), target=test.labels)
    heatmaps = np.asarray(result.heatmaps)
    return score_heatmaps(heatmaps, test, np.asarray(result.degenerate)), heatmaps


def evaluate_attention(
    model: keras.Model, test, gradients: bool
) -> tuple[tuple[float, ...], np.ndarray]:
    """The same scores for attention rollout or gradient-weighted attention (all blocks)."""
    result = AttentionRollout(model, gradients=gradients)(centred(test.images), target=test.labels)
    degenerate = result.heatmaps.max(axis=(1, 2)) <= 0
    return score_heatmaps(result.heatmaps, test, degenerate), result.heatmaps


def score_heatmaps(heatmaps: np.ndarray, test, degenerate: np.ndarray) -> tuple[float, ...]:
    """(pointing %, pointing ≤ TOLERANCE px %, loc. error %, mass %, all-zero %)."""
    masks = test.masks[:, 0]
    exact, near = (
        100 * metrics.pointing_accuracy(metrics.pointing_game(heatmaps, masks, tolerance=t))
        for t in (0, TOLERANCE)
    )
    boxes = metrics.box_from_heatmap(heatmaps)
    errors = metrics.localization_error(
        test.labels[:, None], boxes[:, None], test.labels, test.boxes[:, 0], top_k=1
    )
    total = heatmaps.sum(axis=(1, 2))
    on_object = (heatmaps * masks).sum(axis=(1, 2))
    mass = np.divide(on_object, total, out=np.zeros_like(total), where=total > 0)
    zero = 100 * float(np.mean(degenerate))
    return (exact, near, 100 * float(errors.mean()), 100 * float(mass.mean()), zero)


def random_point(test) -> tuple[float, ...]:
    """Expected scores of a uniformly random point (pointing) and a uniform map (mass)."""
    masks = test.masks[:, 0]
    exact = 100 * float(masks.mean())
    near = []
    for mask in masks:  # distance of every pixel to the object
        distance = cv2.distanceTransform(
            (~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE
        )
        near.append(np.mean(distance <= TOLERANCE))
    return exact, 100 * float(np.mean(near)), float("nan"), exact, float("nan")


def default_layer(model: keras.Model) -> str | None:
    """The layer `GradCAM(model)` picks in this checkout, or None when it raises."""
    try:
        return tf_gradcam.GradCAM(model).layer
    except Exception as error:  # any refusal means "no default"
        print(f"  GradCAM(model) picks no layer: {type(error).__name__}", flush=True)
        return None


def picture(
    path: Path,
    model: keras.Model,
    test,
    heatmaps: dict,
    rows: list[int],
    columns_shown: tuple = PICTURE_COLUMNS,
) -> None:
    """Scenes | the maps of `columns_shown`, with the object's box and each map's maximum."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    predicted = model.predict(centred(test.images[rows]), verbose=0).argmax(-1)
    columns = len(columns_shown) + 1
    figure = Figure(figsize=(2.2 * columns, 2.2 * len(rows) + 0.5))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    titles = ["image"] + [
        f"{TITLES[method]}: {CANDIDATES[index][0].replace(' (', chr(10) + '(')}"
        if index is not None
        else f"{method}\n(all blocks)"
        for method, index in columns_shown
    ]
    for row, scene in enumerate(rows):
        image = test.images[scene]
        x0, y0, x1, y1 = test.boxes[scene, 0]
        name = test.class_names[test.labels[scene]]
        for column in range(columns):
            ax = axes[row, column]
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[column], fontsize=7)
            if column == 0:
                ax.imshow(image, interpolation="nearest")
                ax.set_ylabel(f"{name} (pred. {test.class_names[predicted[row]]})", fontsize=8)
                continue
            heat = heatmaps[columns_shown[column - 1]][scene]
            ax.imshow(tf_gradcam.overlay(image, heat), interpolation="nearest")
            ax.add_patch(
                Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="white", lw=1)
            )
            if heat.max() > 0:
                y, x = np.unravel_index(np.argmax(heat), heat.shape)
                ax.plot(x, y, "+", color="white", markersize=9, markeredgewidth=2)
            else:
                ax.text(SIZE / 2, 6, "all zero", color="white", ha="center", va="top", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"Wrote {path}")


def picture_rows(test, rows: int) -> list[int]:
    """The first scene of each class, then the next ones, `rows` in all."""
    first = [int(np.argmax(test.labels == c)) for c in range(len(test.class_names))]
    rest = [i for i in range(len(test)) if i not in first]
    return sorted((first + rest)[:rows])


def run(args) -> tuple[list, float, dict]:
    test = make_scenes(args.test, seed=TEST_SEED)
    classes = len(test.class_names)
    rows, accuracies = [], []
    for seed in args.seeds:
        started = time.perf_counter()
        model = train(seed, args, classes)
        trained = time.perf_counter() - started
        predicted = model.predict(centred(test.images), batch_size=250, verbose=0).argmax(-1)
        accuracies.append(100 * float(np.mean(predicted == test.labels)))
        default = default_layer(model)
        maps = {}
        for index, (label, inner) in enumerate(CANDIDATES):
            path = layer_path(model, inner)
            methods = ("gradcam", *OTHER_METHODS) if index < 2 else ("gradcam",)
            for method in methods:
                scores, maps[method, index] = evaluate(model, path, test, method)
                rows.append((seed, method, label, inner, path == default, *scores))
        for method, gradients in (("rollout", False), ("gradient attention", True)):
            scores, maps[method, None] = evaluate_attention(model, test, gradients)
            rows.append((seed, method, "all blocks", "", False, *scores))
        if args.picture and seed == args.seeds[0]:
            scenes = picture_rows(test, args.picture_rows)
            picture(Path(args.picture), model, test, maps, scenes)
        if args.attention_picture and seed == args.seeds[0]:
            scenes = picture_rows(test, args.picture_rows)
            picture(Path(args.attention_picture), model, test, maps, scenes, ATTENTION_COLUMNS)
        print(
            f"  seed {seed}: test accuracy {accuracies[-1]:.1f}%, trained in {trained:.0f} s, "
            f"explained in {time.perf_counter() - started - trained:.0f} s",
            flush=True,
        )
    return rows, random_point(test), dict(zip(args.seeds, accuracies, strict=True))


def _cell(values: np.ndarray) -> str:
    if np.isnan(values).all():
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{values.mean():.1f} ({values.min():.1f}–{values.max():.1f})"


def print_table(rows, baseline, accuracies) -> None:
    seeds = list(accuracies)
    accuracy = np.array(list(accuracies.values()))
    print(
        f"\nTest accuracy over seeds {seeds}: {_cell(accuracy)}%"
        + ("  (mean (min–max))" if len(seeds) > 1 else "")
    )
    metric_names = (
        f"pointing % (on object) | pointing % (≤{TOLERANCE} px) | loc. error % (GT class) "
        "| map mass on object % | all-zero maps %"
    )
    baseline_cells = " | ".join(_cell(np.array([v])) for v in baseline)
    for method in ("gradcam", *OTHER_METHODS):
        keys = dict.fromkeys((r[2], r[3]) for r in rows if r[1] == method)
        if method == "gradcam":
            print(f"\n{TITLES[method]}:\n")
            print(f"| layer | path in `vit_encoder` | default | {metric_names} |")
            print("|---|---|:---:|---:|---:|---:|---:|---:|")
        elif method == OTHER_METHODS[0]:
            print(
                "\nMethods with per-token weights, at the last block's input and first LayerNorm:\n"
            )
            print(f"| method | layer | {metric_names} |")
            print("|---|---|---:|---:|---:|---:|---:|")
        for label, inner in keys:
            mine = [r for r in rows if r[1:4] == (method, label, inner)]
            values = np.array([r[5:] for r in mine])
            cells = " | ".join(_cell(values[:, i]) for i in range(values.shape[1]))
            if method == "gradcam":
                default = "✓" if any(r[4] for r in mine) else ""
                print(f"| {label} | `{inner}` | {default} | {cells} |")
            else:
                print(f"| {TITLES[method]} | {label} | {cells} |")
        if method in ("gradcam", OTHER_METHODS[-1]):
            lead = (
                "| random point / uniform map | — | |"
                if method == "gradcam"
                else "| random point / uniform map | — |"
            )
            print(f"{lead} {baseline_cells} |")
    print("\nAttention through all blocks (tf_gradcam.AttentionRollout):\n")
    print(f"| method | {metric_names} |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in ("rollout", "gradient attention"):
        values = np.array([r[5:] for r in rows if r[1] == method])
        cells = " | ".join(_cell(values[:, i]) for i in range(values.shape[1]))
        print(f"| {method} | {cells} |")
    print(f"| random point / uniform map | {baseline_cells} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=4000, help="fresh training scenes per epoch")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--test", type=int, default=400, help="test scenes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument(
        "--picture",
        default=str(ROOT / "docs" / "images" / "vit_layers.png"),
        help="where to draw the first seed's maps ('' for none)",
    )
    parser.add_argument("--picture-rows", type=int, default=4)
    parser.add_argument(
        "--attention-picture",
        default=str(ROOT / "docs" / "images" / "vit_attention.png"),
        help="where to draw the first seed's attention maps ('' for none)",
    )
    args = parser.parse_args(argv)
    tf.config.experimental.enable_op_determinism()
    tf.get_logger().setLevel("ERROR")  # Keras's retracing notes on repeated predict calls
    # The all-zero maps are counted in the table; Keras notes that a Dataset is not reshuffled.
    warnings.filterwarnings("ignore", message=r".*map\(s\) at layer .* are all zero")
    warnings.filterwarnings("ignore", message=r"`shuffle=True` was passed")
    started = time.perf_counter()
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, keras-hub {keras_hub.__version__}"
    )
    rows, baseline, accuracies = run(args)
    print_table(rows, baseline, accuracies)
    print(f"\nTotal time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
