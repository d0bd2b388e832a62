"""Fig. 1 of the Grad-CAM paper on generated two-object scenes ("cat and dog").

A tiny CNN learns, in seconds, to detect two shape classes: a *striped
square* (the "cat": fine stripes, like the tiger cat's) and a *disc* (the
"dog"). Every test scene holds one of each. The example

1. draws the paper's Fig. 1 rows for both classes of a few scenes
   (image | Guided Backprop | Grad-CAM | Guided Grad-CAM | counterfactual
   Grad-CAM) and writes them as PNGs into `--out`;
2. measures class discrimination over `--scenes` generated scenes: for each
   class, the fraction of the Grad-CAM and of the Guided Grad-CAM mass
   (absolute values) inside that class's object box (and inside the other
   object's box), and the correlation between the Guided Backprop images of
   the two classes (the paper: "Fig. 1b and Fig. 1h are very similar").

Head: two independent sigmoids (multi-label), because a scene can contain
both objects, one or none, and each logit should answer "is this shape
here?" on its own. A softmax would make the two scores compete, so the
explanation of one class would partly be evidence *against* the other. The
engine explains the logits (pre-sigmoid scores), as the paper's y^c.

Run (from the repository root, with tf_gradcam installed or on PYTHONPATH):
    python examples/two_objects.py --out examples/out/
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import tf_gradcam
from tf_gradcam.figures import plot_fig1

SIZE = 48
CLASS_NAMES = ("striped square", "disc")

# ---------------------------------------------------------------------------
# Local scene generator: a stand-in for the shared `tf_gradcam.scenes`
# (written on another branch). Replace it by that module once merged.
# ---------------------------------------------------------------------------


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A bright random colour, so that colour alone does not give the class away."""
    colour = rng.uniform(0.2, 1.0, size=3)
    colour[rng.integers(3)] = rng.uniform(0.8, 1.0)
    return colour


def _draw(
    image: np.ndarray, kind: int, top: int, left: int, side: int, rng: np.random.Generator
) -> None:
    """Draw object `kind` (0 striped square, 1 disc) in the box `side` x `side`."""
    rows, cols = np.mgrid[0:side, 0:side]
    if kind == 0:
        width = int(rng.integers(1, 3))  # stripes 1 or 2 pixels wide
        mask = np.ones((side, side), bool)
        shade = np.where((rows // width) % 2 == 0, 1.0, 0.25)
    else:
        centre = (side - 1) / 2.0
        mask = (rows - centre) ** 2 + (cols - centre) ** 2 <= (side / 2.0) ** 2
        shade = np.ones((side, side))
    patch = image[top : top + side, left : left + side]
    colour = _colour(rng)
    patch[mask] = (shade[..., None] * colour)[mask]


def make_scenes(
    count: int, rng: np.random.Generator, *, both: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate scenes.

    Args:
        count: number of images.
        rng: the random generator.
        both: every scene holds both objects (test scenes); otherwise each
            object is present with probability 1/2 (training scenes).

    Returns:
        `(images, labels, boxes)`: `(count, SIZE, SIZE, 3)` float32 in [0, 1],
        `(count, 2)` multi-hot labels, `(count, 2, 4)` int boxes
        `(top, left, bottom, right)` per class (zeros when absent).
    """
    images = rng.uniform(0.0, 0.15, size=(count, SIZE, SIZE, 3)).astype(np.float32)
    labels = np.zeros((count, 2), np.float32)
    boxes = np.zeros((count, 2, 4), np.int32)
    for n in range(count):
        present = [True, True] if both else list(rng.random(2) < 0.5)
        taken: list[tuple[int, int, int, int]] = []
        for kind in (0, 1):
            if not present[kind]:
                continue
            for _ in range(100):  # rejection sampling: boxes must not overlap
                side = int(rng.integers(12, 17))
                top, left = (int(v) for v in rng.integers(0, SIZE - side, size=2))
                box = (top, left, top + side, left + side)
                if all(
                    box[2] <= other[0]
                    or other[2] <= box[0]
                    or box[3] <= other[1]
                    or other[3] <= box[1]
                    for other in taken
                ):
                    break
            taken.append(box)
            _draw(images[n], kind, top, left, side, rng)
            labels[n, kind] = 1.0
            boxes[n, kind] = box
    return images, labels, boxes


# ------------------------------------------------------------- end of generator


def build_model() -> keras.Model:
    """Tiny CNN: a nested `backbone` (3 convolutions) + global pooling + 2 sigmoids."""
    backbone = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="same"),
            keras.layers.ReLU(name="features"),
        ],
        name="backbone",
    )
    inputs = keras.Input((SIZE, SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    outputs = keras.layers.Dense(2, activation="sigmoid", name="shapes")(pooled)
    return keras.Model(inputs, outputs, name="two_objects")


def box_mask(box: np.ndarray) -> np.ndarray:
    """`(SIZE, SIZE)` boolean mask of a `(top, left, bottom, right)` box."""
    mask = np.zeros((SIZE, SIZE), bool)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = True
    return mask


def mass_fractions(maps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each map's mass inside each box.

    Args:
        maps: `(n, SIZE, SIZE)` non-negative maps.
        boxes: `(n, 2, 4)` boxes of the two objects.

    Returns:
        `(n, 2)` fractions; NaN for an all-zero map.
    """
    out = np.full((len(maps), 2), np.nan)
    for n, heat in enumerate(maps):
        total = heat.sum()
        if total > 0:
            out[n] = [heat[box_mask(boxes[n, k])].sum() / total for k in (0, 1)]
    return out


def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of images, flattened."""
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(axis=1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(axis=1, keepdims=True)
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norm > 0, (a * b).sum(axis=1) / np.where(norm > 0, norm, 1.0), np.nan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/out/", help="folder for the PNGs")
    parser.add_argument("--scenes", type=int, default=200, help="test scenes to measure")
    parser.add_argument("--train", type=int, default=2000, help="training scenes")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images, labels, _ = make_scenes(args.train, rng)
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy")
    start = time.perf_counter()
    model.fit(images, labels, batch_size=64, epochs=args.epochs, verbose=0)
    print(f"trained on {args.train} scenes in {time.perf_counter() - start:.1f} s")

    test, _, boxes = make_scenes(args.scenes, rng, both=True)
    held, held_labels, _ = make_scenes(500, rng)
    predicted = model.predict(held, verbose=0) > 0.5
    print(f"held-out per-label accuracy: {(predicted == (held_labels > 0.5)).mean():.3f}")
    both = (model.predict(test, verbose=0) > 0.5).all(axis=1).mean()
    print(f"two-object scenes with both shapes detected: {both:.3f}")

    layer = "backbone/features"
    for index in range(2):
        path = os.path.join(args.out, f"two_objects_fig1_{index}.png")
        plot_fig1(model, test[index], [0, 1], layer, class_names=CLASS_NAMES, path=path)
        print(f"wrote {path}")

    guided = tf_gradcam.GuidedGradCAM(model, layer)
    deconv = tf_gradcam.DeconvolutionGradCAM(model, layer)
    results = {c: guided(test, target=c) for c in (0, 1)}
    deconv_results = {c: deconv(test, target=c) for c in (0, 1)}
    print(f"\nover {args.scenes} two-object scenes (fraction of mass inside the box of")
    print("the explained class's object / of the other object; mean over scenes):")
    for c in (0, 1):
        other = 1 - c
        rows = {
            "Grad-CAM": results[c].cam.heatmaps,
            "Guided Grad-CAM": np.abs(results[c].gradients).sum(axis=-1),
            "Guided Backprop": np.abs(results[c].backprop).sum(axis=-1),
            "Deconvolution Grad-CAM": np.abs(deconv_results[c].gradients).sum(axis=-1),
            "Deconvolution": np.abs(deconv_results[c].backprop).sum(axis=-1),
        }
        print(f"  class {c} ({CLASS_NAMES[c]}):")
        for name, maps in rows.items():
            fractions = mass_fractions(maps, boxes)
            own, theirs = np.nanmean(fractions[:, c]), np.nanmean(fractions[:, other])
            share = np.nanmean(fractions[:, c] / (fractions[:, 0] + fractions[:, 1]))
            empty = int(np.isnan(fractions[:, 0]).sum())
            note = f"  ({empty} all-zero maps left out)" if empty else ""
            print(
                f"    {name:<24} own {own:.3f}   other {theirs:.3f}   "
                f"own / (own + other) {share:.3f}{note}"
            )
    area = np.mean([box_mask(b).mean() for b in boxes.reshape(-1, 4)])
    print(f"  (a uniform map would put {area:.3f} on each box)")
    print("\nPearson correlation between the two classes' images, signed gradients")
    print("(all channels) and |gradients| summed over channels (mean / median over scenes):")
    pairs = {
        "Guided Backprop": (results[0].backprop, results[1].backprop),
        "Deconvolution": (deconv_results[0].backprop, deconv_results[1].backprop),
        "Guided Grad-CAM": (results[0].gradients, results[1].gradients),
    }
    for name, (first, second) in pairs.items():
        signed = correlation(first, second)
        magnitude = correlation(np.abs(first).sum(axis=-1), np.abs(second).sum(axis=-1))
        print(
            f"  {name:<24} signed {np.nanmean(signed):.3f} / {np.nanmedian(signed):.3f}"
            f"   |.| {np.nanmean(magnitude):.3f} / {np.nanmedian(magnitude):.3f}"
        )


if __name__ == "__main__":
    main()
