"""Grad-CAM for an object detector: one detection's class score before NMS (`DetectionTarget`).

A small keras-hub `RetinaNetObjectDetector` (a 3-stage ResNet, pyramid levels
P3 and P4, 3 square anchors per location) learns, in a few minutes on two
CPU cores, to find the objects of generated scenes
(`tf_gradcam.scenes.make_scenes`, two objects per 64x64 scene: circle, square
or triangle on a noisy background). For each test scene where the detector
finds both objects (a detection of IoU >= 0.5 with the object's box after
non-max suppression), the example explains both detections, A (left) and B
(right), with `DetectionTarget(detected box, detected class)`: the class's
logits summed over the raw predictions whose decoded boxes overlap the
detection by IoU >= 0.5. It prints

- how many objects the detector finds, and with the right class;
- the share of the Grad-CAM mass (heatmaps at the image's size) inside the
  explained object's mask and inside the other object's mask, mean over the
  scenes, next to the share a map spread evenly over the image would put
  there (the masks' area fraction), and how often the explained object gets
  the larger share, and how many maps are all zero: Grad-CAM at the
  encoder's 16x16 layer and at its 8x8 layer (the pyramid's P3 input), with
  `reduction="max"` (the largest matching logit) at 8x8, and HiResCAM
  (gradient times activation, no spatial averaging) at both for comparison.

It saves a picture (`--figure`): for a few scenes, the image with the
detections, then Grad-CAM and HiResCAM at 8x8 for detection A and for
detection B.

Run (from the repository root):
    python examples/detection.py --figure docs/images/detection.png
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2
import keras
import keras_hub
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import tf_gradcam
import tf_gradcam.methods
from tf_gradcam.scenes import make_scenes

SIZE = 64
SHAPES = ("circle", "square", "triangle")
LAYERS = {
    "16x16": "retina_net_backbone/backbone/stack0_block0_out",
    "8x8 (P3)": "retina_net_backbone/backbone/stack1_block0_out",
}
COLORS = ((255, 255, 255), (255, 220, 0))  # object A, object B
FIGURE_LAYER = "8x8 (P3)"


def make_detector() -> keras.Model:
    """ResNet (64→16→8→4) → FPN P3, P4 → box and class heads, boxes in xyxy pixels."""
    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32, 32],
        stackwise_num_blocks=[1, 1, 1],
        stackwise_num_strides=[1, 2, 2],
        block_type="basic_block",
        image_shape=(SIZE, SIZE, 3),
    )
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=encoder, min_level=3, max_level=4, use_p5=False, image_shape=(SIZE, SIZE, 3)
    )
    # anchors of 16-25 px (P3) and 32-50 px (P4): the objects are 16-29 px
    anchors = keras_hub.layers.AnchorGenerator(
        "xyxy", min_level=3, max_level=4, num_scales=3, aspect_ratios=[1.0], anchor_size=2
    )
    detector = keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone,
        num_classes=len(SHAPES),
        bounding_box_format="xyxy",
        anchor_generator=anchors,
        pre_logits_num_conv_layers=1,
        preprocessor=None,
    )
    # keras-hub 0.32 gives the *box* head the focal-loss prior bias (-4.6), which
    # shrinks every initial box to 1% of its anchor; start from the anchors instead.
    for weight in detector.box_head.weights:
        if "bias" in weight.path:
            weight.assign(np.zeros(weight.shape, np.float32))
    return detector


def box_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes `(n, 4)` with one xyxy box `(4,)`."""
    wh = np.clip(np.minimum(boxes[:, 2:], box[2:]) - np.maximum(boxes[:, :2], box[:2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(areas + (box[2] - box[0]) * (box[3] - box[1]) - inter, 1e-9)


def match_detections(predictions: dict, scenes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per scene and object, the detection of highest IoU with its box (IoU >= 0.5).

    Returns `(boxes (n, 2, 4), labels (n, 2), found (n, 2) bool)`.
    """
    n = len(scenes)
    boxes = np.zeros((n, 2, 4), np.float32)
    labels = np.zeros((n, 2), np.int32)
    found = np.zeros((n, 2), bool)
    for i in range(n):
        valid = predictions["labels"][i] >= 0
        detected = predictions["boxes"][i][valid]
        if not len(detected):
            continue
        for m in range(2):
            ious = box_iou(detected, scenes.boxes[i, m].astype(np.float32))
            best = int(np.argmax(ious))
            if ious[best] >= 0.5:
                found[i, m] = True
                boxes[i, m] = detected[best]
                labels[i, m] = predictions["labels"][i][valid][best]
    return boxes, labels, found


def shares(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of each map's mass inside each mask: `(n,)`."""
    total = heatmaps.sum(axis=(1, 2))
    return (heatmaps * masks).sum(axis=(1, 2)) / np.maximum(total, 1e-12)


def draw_box(picture: np.ndarray, box: np.ndarray, color: tuple, text: str) -> np.ndarray:
    """The picture (uint8 RGB, upscaled 4x) with an xyxy box and a label."""
    x0, y0, x1, y1 = (round(float(v) * 4) for v in box)
    picture = cv2.rectangle(np.ascontiguousarray(picture), (x0, y0), (x1, y1), color, 2)
    return cv2.putText(picture, text, (x0 + 3, max(y0 - 4, 12)), 0, 0.45, color, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000, help="training scenes")
    parser.add_argument("--test", type=int, default=100, help="test scenes")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--figure", default="examples/out/detection.png")
    parser.add_argument("--rows", type=int, default=4, help="scenes in the figure")
    args = parser.parse_args()
    started = time.perf_counter()
    keras.utils.set_random_seed(0)

    train = make_scenes(args.train, size=SIZE, objects=2, shapes=SHAPES, seed=1)
    test = make_scenes(args.test, size=SIZE, objects=2, shapes=SHAPES, seed=2)
    detector = make_detector()
    detector.compile(optimizer=keras.optimizers.Adam(1e-3))
    labels = {
        "boxes": train.boxes.astype(np.float32),
        "labels": train.object_shapes.astype(np.float32),
    }
    detector.fit(train.images, labels, batch_size=16, epochs=args.epochs, verbose=0)
    trained = time.perf_counter()

    # after NMS, as `predict` returns them; eagerly: keras-hub 0.32's NonMaxSuppression
    # fails in `predict` when the batches differ in size (its batch size is then unknown)
    decoded = detector.decode_predictions(detector(test.images), test.images)
    predictions = {key: np.asarray(value) for key, value in decoded.items()}
    boxes, classes, found = match_detections(predictions, test)
    right = found & (classes == test.object_shapes)
    print(
        f"trained {args.epochs} epochs on {args.train} scenes in {trained - started:.0f} s; "
        f"on {args.test} test scenes the detector finds {found.mean():.0%} of the objects "
        f"(IoU >= 0.5 after NMS), {right.mean():.0%} with the right class"
    )

    both = np.flatnonzero(found.all(axis=1))
    images = test.images[both]
    masks = test.masks[both].astype(np.float32)  # (n, 2, size, size)
    # one target per object for all scenes at once: the detected box and class
    targets = {
        reduction: [
            tf_gradcam.DetectionTarget(
                boxes[both, m], classes[both, m], detector=detector, reduction=reduction
            )
            for m in (0, 1)
        ]
        for reduction in ("sum", "max")
    }
    matched = targets["sum"][0].matches(detector(images)).numpy().sum(axis=1)
    print(
        f"\n{len(both)} scenes with both objects found; raw predictions per detection "
        f"(IoU >= 0.5 with its box): median {np.median(matched):.0f}, "
        f"range {matched.min()}-{matched.max()}"
    )
    print(
        f"share of the map's mass, mean over the scenes and both detections; baseline: a map "
        f"spread evenly ({masks.mean():.3f}, the masks' area)"
    )
    print(
        f"  {'method, layer, reduction':<30}{'in explained':>13}{'in other':>10}"
        f"{'explained > other':>19}{'all-zero maps':>15}"
    )
    heatmaps = {}
    for method, layer, reduction in (
        ("gradcam", "16x16", "sum"),
        ("gradcam", "8x8 (P3)", "sum"),
        ("gradcam", "8x8 (P3)", "max"),
        ("hirescam", "16x16", "sum"),
        ("hirescam", "8x8 (P3)", "sum"),
    ):
        explainer = tf_gradcam.methods.get_method(method)(detector, LAYERS[layer])
        inside, other, zero = [], [], 0
        for m in (0, 1):
            with warnings.catch_warnings():  # counted below instead
                warnings.simplefilter("ignore", RuntimeWarning)
                result = explainer(images, target=targets[reduction][m])
            inside.append(shares(result.heatmaps, masks[:, m]))
            other.append(shares(result.heatmaps, masks[:, 1 - m]))
            zero += int(np.count_nonzero(result.degenerate))
            if layer == FIGURE_LAYER and reduction == "sum":
                heatmaps[method, m] = result.heatmaps
        inside, other = np.concatenate(inside), np.concatenate(other)
        name = f"{tf_gradcam.methods.TITLES[method]}, {layer}, {reduction}"
        print(
            f"  {name:<30}{inside.mean():>13.3f}{other.mean():>10.3f}"
            f"{np.mean(inside > other):>18.0%}{zero:>11} / {inside.size}"
        )

    rows = min(args.rows, len(both))
    figure, axes = plt.subplots(rows, 5, figsize=(10, 2.2 * rows), squeeze=False)
    titles = (
        "detections (after NMS)",
        f"Grad-CAM {FIGURE_LAYER}: A",
        "Grad-CAM: B",
        f"HiResCAM {FIGURE_LAYER}: A",
        "HiResCAM: B",
    )
    gray = np.repeat(images.mean(axis=-1, keepdims=True), 3, axis=-1)  # heat stays readable
    big = (SIZE * 4, SIZE * 4)
    for r in range(rows):
        i = both[r]
        pictures = [cv2.resize((test.images[i] * 255).astype(np.uint8), big, None, 0, 0, 0)]
        for method in ("gradcam", "hirescam"):
            for m in (0, 1):
                heat = tf_gradcam.overlay(gray[r], heatmaps[method, m][r], alpha=0.5)
                pictures.append(cv2.resize(heat, big, None, 0, 0, 0))
        for j, picture in enumerate(pictures):
            for m in (0, 1):
                if j == 0 or (j - 1) % 2 == m:  # every box on the image, else the explained one
                    text = f"{'AB'[m]}: {SHAPES[classes[i, m]]}"
                    picture = draw_box(picture, boxes[i, m], COLORS[m], text)
            axes[r, j].imshow(picture, interpolation="nearest")
            axes[r, j].set_xticks([])
            axes[r, j].set_yticks([])
            if r == 0:
                axes[r, j].set_title(titles[j], fontsize=9)
    figure.tight_layout()
    os.makedirs(os.path.dirname(args.figure) or ".", exist_ok=True)
    figure.savefig(args.figure, dpi=110)
    print(f"\nfigure: {args.figure}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
