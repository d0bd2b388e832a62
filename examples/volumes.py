"""Grad-CAM on a Conv3D volume classifier: does the heat land on the object?

Each generated volume is `SIZE`³ Gaussian noise holding one small cube of
side `SIDE` at a random position: a bright cube (class 0) or a dark one
(class 1). A tiny Conv3D network learns to tell them apart in well under a
minute on a CPU. The example then

1. explains the test volumes with Grad-CAM at the last Conv3D layer, cued
   with the true class, and plays the pointing game in 3-D: a hit when the
   heatmap's maximum voxel lies inside the cube
   (`tf_gradcam.metrics.pointing_game(..., axes=3)` with the cube masks),
   printed beside a random-point baseline (the cube fills `SIDE³ / SIZE³` of
   the volume);
2. writes `volumes.png` into `--out`: for a few test volumes, the
   orthogonal slices through the heatmap's maximum
   (`tf_gradcam.pictures.orthogonal_slices`) with the cube's outline, and,
   for the first one, a montage of all its depth slices
   (`tf_gradcam.pictures.volume_montage`).

Run (from the repository root, with tf_gradcam installed or on PYTHONPATH):
    python examples/volumes.py --out examples/out/
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
from tf_gradcam.pictures import orthogonal_slices, volume_montage

SIZE = 16
SIDE = 4
CLASS_NAMES = ("bright cube", "dark cube")
ZOOM = 8


def make_volumes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(volumes (n, SIZE, SIZE, SIZE, 1), labels (n,), cube masks (n, SIZE, SIZE, SIZE))`."""
    labels = rng.integers(len(CLASS_NAMES), size=n)
    corners = rng.integers(0, SIZE - SIDE + 1, size=(n, 3))
    volumes = rng.normal(0.0, 1.0, size=(n, SIZE, SIZE, SIZE, 1)).astype(np.float32)
    masks = np.zeros((n, SIZE, SIZE, SIZE), dtype=bool)
    for i, (label, (z, y, x)) in enumerate(zip(labels, corners, strict=True)):
        cube = (i, slice(z, z + SIDE), slice(y, y + SIDE), slice(x, x + SIDE))
        volumes[cube] += 1.5 if label == 0 else -1.5
        masks[cube] = True
    return volumes, labels, masks


def build_model() -> keras.Model:
    layers = keras.layers
    inputs = keras.Input((SIZE, SIZE, SIZE, 1), name="volume")
    x = layers.Conv3D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling3D(2, name="pool1")(x)
    x = layers.Conv3D(16, 3, padding="same", activation="relu", name="last_conv")(x)
    x = layers.GlobalAveragePooling3D(name="gap")(x)
    outputs = layers.Dense(len(CLASS_NAMES), name="logits")(x)
    return keras.Model(inputs, outputs, name="volume_cnn")


def _outline(ax, left: float, top: float, width: float, height: float) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((left, top), width, height, fill=False, edgecolor="w", linewidth=1))


def save_pictures(
    path: str,
    volumes: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    heatmaps: np.ndarray,
    hits: np.ndarray,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(volumes)
    figure = plt.figure(figsize=(11, 2.6 * rows + 0.5))
    grid = figure.add_gridspec(rows, 2, width_ratios=(3, 2))
    gap = 2
    for r in range(rows):
        volume, heat, mask = volumes[r, ..., 0], heatmaps[r], masks[r]
        peak = np.unravel_index(np.argmax(heat), heat.shape)
        ax = figure.add_subplot(grid[r, 0])
        ax.imshow(orthogonal_slices(volume, heat, zoom=ZOOM, gap=gap), interpolation="nearest")
        z, y, x = (np.flatnonzero(mask.any(axis=axes))[0] for axes in ((1, 2), (0, 2), (0, 1)))
        # cube outline in each panel: (z) y-x, (y) z-x, (x) z-y; panels are SIZE*ZOOM wide
        s, step = SIDE * ZOOM, SIZE * ZOOM + gap
        for panel, (col, row, inside) in enumerate(
            (
                (x, y, mask[peak[0]].any()),
                (x, z, mask[:, peak[1]].any()),
                (y, z, mask[..., peak[2]].any()),
            )
        ):
            if inside:  # the slice cuts the cube
                _outline(ax, panel * step + col * ZOOM - 0.5, row * ZOOM - 0.5, s, s)
        ax.set_axis_off()
        ax.set_title(
            f"{CLASS_NAMES[labels[r]]}; slices z={peak[0]}, y={peak[1]}, x={peak[2]} "
            f"through the heatmap maximum ({'hit' if hits[r] else 'miss'})",
            fontsize=9,
        )
        if r == 0:
            ax = figure.add_subplot(grid[:, 1])
            ax.imshow(
                volume_montage(volume, heat, axis=0, columns=4, zoom=4, gap=2),
                interpolation="nearest",
            )
            ax.set_axis_off()
            ax.set_title(
                f"first volume, all {SIZE} depth slices (cube in z {z}..{z + SIDE - 1})",
                fontsize=9,
            )
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/out/", help="folder for the PNG")
    parser.add_argument("--train", type=int, default=1500, help="training volumes")
    parser.add_argument("--test", type=int, default=300, help="test volumes")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    began = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train_x, train_y, _ = make_volumes(args.train, rng)
    test_x, test_y, test_masks = make_volumes(args.test, rng)

    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(train_x, train_y, batch_size=32, epochs=args.epochs, verbose=0)
    print(f"trained on {args.train} volumes in {time.perf_counter() - start:.1f} s")
    predicted = np.argmax(model.predict(test_x, batch_size=128, verbose=0), axis=1)
    print(f"test accuracy: {(predicted == test_y).mean():.3f} ({args.test} volumes)")

    print("Conv3D layers:", tf_gradcam.layer_paths(model, spatial_only=True))
    cam = tf_gradcam.GradCAM(model, "last_conv")
    start = time.perf_counter()
    explanation = cam(test_x, target=test_y)
    print(f"explained {args.test} volumes in {time.perf_counter() - start:.2f} s")
    heatmaps = explanation.heatmaps  # (test, SIZE, SIZE, SIZE)

    hits = metrics.pointing_game(heatmaps, test_masks, axes=3)
    # A random point per map, 20 draws per test item (a uniform random map's maximum).
    draws = np.random.default_rng(args.seed + 1)
    random_hits = np.concatenate(
        [metrics.pointing_game(draws.random(heatmaps.shape), test_masks, axes=3) for _ in range(20)]
    )
    near = metrics.pointing_game(heatmaps, test_masks, axes=3, tolerance=1)
    print(
        f"pointing accuracy (maximum inside the cube), Grad-CAM: "
        f"{metrics.pointing_accuracy(hits):.3f}; random point: "
        f"{metrics.pointing_accuracy(random_hits):.3f} (expected {SIDE**3 / SIZE**3:.3f})"
    )
    print(f"  within 1 voxel of the cube: {metrics.pointing_accuracy(near):.3f}")
    for c, name in enumerate(CLASS_NAMES):
        chosen = test_y == c
        print(f"  class {c} ({name}): {metrics.pointing_accuracy(hits[chosen]):.3f}")
    print(f"  degenerate (all-zero) maps: {int(explanation.degenerate.sum())}")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "volumes.png")
    shown = np.r_[np.flatnonzero(test_y == 0)[:2], np.flatnonzero(test_y == 1)[:1]]
    shown = np.r_[shown, np.flatnonzero(~hits)[:1]]
    save_pictures(
        path, test_x[shown], test_y[shown], test_masks[shown], heatmaps[shown], hits[shown]
    )
    print(f"wrote {path}")
    print(f"total {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
