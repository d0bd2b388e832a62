"""Grad-CAM for a segmenter: each object's class summed over its pixels (`SegmentationTarget`).

A small encoder–decoder CNN learns, in about a minute on two CPU cores, to
label every pixel of generated scenes (`tf_gradcam.scenes.make_scenes`, two
objects per scene: circle, square or triangle on a noisy background) as
background or one of the three shapes. For each test scene the example
explains both objects, A (left) and B (right), with
`SegmentationTarget(class_of_the_object)`: the sum of that class's logits over
the pixels the model assigns to it. It prints

- the segmentation's pixel accuracy and per-class IoU on the test scenes;
- the share of the Grad-CAM mass (heatmaps at the image's size) inside the
  explained object's mask and inside the other object's mask, mean over the
  test scenes, next to the share a map spread evenly over the image would
  put there (the masks' area fraction: the random baseline), and how often
  the explained object gets the larger share; at the encoder's last layer
  (`bottleneck`, 12x12), at the decoder's 24x24 layer, and with HiResCAM
  (gradient times activation, no spatial averaging) for comparison.

It saves a picture (`--figure`): for a few scenes, the image, the predicted
labels, the map for object A and the map for object B (object outlines in
white).

Run (from the repository root):
    python examples/segmentation.py --figure docs/images/segmentation.png
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2
import keras
import matplotlib
import numpy as np
from keras import layers

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import tf_gradcam
import tf_gradcam.methods
from tf_gradcam.scenes import make_scenes

SIZE = 48
#: background, then the shapes of `tf_gradcam.scenes.SHAPE_NAMES`
CLASS_NAMES = ("background", "circle", "square", "triangle")
#: RGB of each class in the predicted-label picture
PALETTE = np.array([[0.15, 0.15, 0.15], [0.9, 0.3, 0.3], [0.3, 0.8, 0.3], [0.3, 0.5, 0.95]])


def pixel_labels(scenes) -> np.ndarray:
    """`(n, size, size)` int: 0 background, 1 + shape index on each object's pixels."""
    labels = np.zeros(scenes.masks.shape[:1] + scenes.masks.shape[2:], np.int32)
    for m in range(scenes.masks.shape[1]):
        shape = scenes.object_shapes[:, m, None, None] + 1
        labels = np.where(scenes.masks[:, m], shape, labels)
    return labels


def make_model() -> keras.Model:
    """Encoder (48→24→12) – decoder (12→24→48) with skip connections, softmax per pixel."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x1 = layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x1 = layers.Conv2D(16, 3, padding="same", activation="relu")(x1)
    x2 = layers.Conv2D(32, 3, padding="same", activation="relu")(layers.MaxPooling2D()(x1))
    x2 = layers.Conv2D(32, 3, padding="same", activation="relu")(x2)
    x3 = layers.Conv2D(64, 3, padding="same", activation="relu")(layers.MaxPooling2D()(x2))
    x3 = layers.Conv2D(64, 3, padding="same", activation="relu", name="bottleneck")(x3)
    y = layers.Concatenate()([layers.UpSampling2D()(x3), x2])
    y = layers.Conv2D(32, 3, padding="same", activation="relu", name="decoder_24")(y)
    y = layers.Concatenate()([layers.UpSampling2D()(y), x1])
    y = layers.Conv2D(16, 3, padding="same", activation="relu", name="decoder_48")(y)
    outputs = layers.Conv2D(len(CLASS_NAMES), 1, activation="softmax", name="classes")(y)
    return keras.Model(inputs, outputs, name="segmenter")


def shares(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of each map's mass inside each mask: `(n,)`."""
    total = heatmaps.sum(axis=(1, 2))
    return (heatmaps * masks).sum(axis=(1, 2)) / np.maximum(total, 1e-12)


def outline(picture: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The picture (uint8 RGB) with the mask's contour drawn in white."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return cv2.drawContours(np.ascontiguousarray(picture), contours, -1, (255, 255, 255), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000, help="training scenes")
    parser.add_argument("--test", type=int, default=200, help="test scenes")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--layer", default="bottleneck", help="layer of the figure's maps")
    parser.add_argument("--figure", default="examples/out/segmentation.png")
    parser.add_argument("--rows", type=int, default=4, help="scenes in the figure")
    args = parser.parse_args()
    started = time.perf_counter()
    keras.utils.set_random_seed(0)

    train = make_scenes(args.train, size=SIZE, objects=2, seed=1)
    test = make_scenes(args.test, size=SIZE, objects=2, seed=2)
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(train.images, pixel_labels(train), batch_size=32, epochs=args.epochs, verbose=0)
    trained = time.perf_counter()

    truth = pixel_labels(test)
    predicted = model.predict(test.images, verbose=0).argmax(-1)
    ious = [
        np.logical_and(predicted == c, truth == c).sum()
        / np.logical_or(predicted == c, truth == c).sum()
        for c in range(len(CLASS_NAMES))
    ]
    print(
        f"trained {args.epochs} epochs on {args.train} scenes in {trained - started:.0f} s; "
        f"test pixel accuracy {np.mean(predicted == truth):.3f}, IoU "
        + ", ".join(f"{name} {iou:.2f}" for name, iou in zip(CLASS_NAMES, ious, strict=True))
    )

    masks = test.masks.astype(np.float32)  # (n, 2, size, size)
    classes = test.object_shapes + 1  # (n, 2): each object's class
    # one target per object, for all scenes at once: its class, over the pixels given it
    targets = [tf_gradcam.SegmentationTarget(classes[:, m]) for m in (0, 1)]
    print(
        f"\nshare of the map's mass, mean over {args.test} scenes and both objects; "
        f"baseline: a map spread evenly ({masks.mean():.3f}, the masks' area)"
    )
    print(f"  {'method, layer':<28}{'in explained':>13}{'in other':>10}{'explained > other':>19}")
    heatmaps = {}
    for method, layer in (
        ("gradcam", args.layer),
        ("gradcam", "decoder_24"),
        ("hirescam", args.layer),
    ):
        explainer = tf_gradcam.methods.get_method(method)(model, layer)
        inside, other = [], []
        for m in (0, 1):
            maps = explainer(test.images, targets[m]).heatmaps
            inside.append(shares(maps, masks[:, m]))
            other.append(shares(maps, masks[:, 1 - m]))
            if (method, layer) == ("gradcam", args.layer):
                heatmaps[m] = maps
        inside, other = np.concatenate(inside), np.concatenate(other)
        name = f"{tf_gradcam.methods.TITLES[method]}, {layer}"
        print(
            f"  {name:<28}{inside.mean():>13.3f}{other.mean():>10.3f}"
            f"{np.mean(inside > other):>18.0%}"
        )
        if (method, layer) == ("gradcam", args.layer):  # by the explained object's class
            explained = np.concatenate([classes[:, 0], classes[:, 1]])
            for c in range(1, len(CLASS_NAMES)):
                chosen = explained == c
                print(
                    f"    {CLASS_NAMES[c] + 's':<26}{inside[chosen].mean():>13.3f}"
                    f"{other[chosen].mean():>10.3f}{np.mean(inside[chosen] > other[chosen]):>18.0%}"
                )

    rows = min(args.rows, args.test)
    figure, axes = plt.subplots(rows, 4, figsize=(8, 2.1 * rows), squeeze=False)
    titles = ("image", "predicted labels", "Grad-CAM: object A", "Grad-CAM: object B")
    gray = np.repeat(test.images.mean(axis=-1, keepdims=True), 3, axis=-1)  # heat stays readable
    for i in range(rows):
        names = [CLASS_NAMES[c] for c in classes[i]]
        pictures = [
            (test.images[i] * 255).astype(np.uint8),
            (PALETTE[predicted[i]] * 255).astype(np.uint8),
            tf_gradcam.overlay(gray[i], heatmaps[0][i], alpha=0.5),
            tf_gradcam.overlay(gray[i], heatmaps[1][i], alpha=0.5),
        ]
        for j, picture in enumerate(pictures):
            for m in (0, 1):
                picture = outline(picture, test.masks[i, m])
            axes[i, j].imshow(picture, interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j >= 2:
                axes[i, j].set_xlabel(f"{'AB'[j - 2]}: {names[j - 2]}", fontsize=8)
            if i == 0:
                axes[i, j].set_title(titles[j], fontsize=9)
    figure.tight_layout()
    os.makedirs(os.path.dirname(args.figure) or ".", exist_ok=True)
    figure.savefig(args.figure, dpi=110)
    print(f"\nfigure: {args.figure}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
