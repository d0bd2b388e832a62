"""The paper's §6.3 ("Identifying bias in dataset") in miniature, watched with GradCAMCallback.

The class of an image is set by an object's shape (a disk or a square), but a
coloured patch in the top-left corner (red or green) agrees with the class in
95% of the "biased" training images; in the test set the patch colour is a coin
flip. A model trained on the biased set learns the patch: its Grad-CAM mass
moves onto the corner during training (the `gradcam/cue_mass` scalar rises)
and its test accuracy drops towards chance on images whose patch disagrees
with the shape. The same model trained on a debiased set (patch colour
independent of the class, same size) looks at the object and generalises.
The paper fine-tuned VGG-16 on doctor/nurse photos (82% → 90% test accuracy
after debiasing); here everything is synthetic and takes about a minute on
two CPU cores.

Run:
    python examples/bias_detection.py --out examples/out
    tensorboard --logdir examples/out/logs --samples_per_plugin images=100,text=100
    # image panel: runs biased/gradcam, debiased/gradcam, every epoch on the step slider

Outputs in --out: `bias_overlays.png` (test images whose patch contradicts the
shape: input, biased model's Grad-CAM, debiased model's Grad-CAM) and the
TensorBoard logs under `logs/` (replaced at each run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf
from keras import layers

try:
    import tf_gradcam
except ImportError:  # run from a source checkout without installing
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tf_gradcam

SIZE = 32
CUE = (0, 0, 8, 8)  # (x0, y0, x1, y1) of the coloured patch, ends exclusive
CUE_COLOURS = np.array([[1.0, 0.15, 0.1], [0.1, 0.8, 0.1]], np.float32)  # class 0 red, 1 green
CLASS_NAMES = ("disk", "square")


# TODO(scenes): replace with the shared scene generator once it is merged; this
# is the smallest generator the study needs.
def make_scenes(
    count: int, cue_agreement: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grey scenes with one disk or square and a coloured corner patch.

    Args:
        count: number of images.
        cue_agreement: probability that the patch colour matches the class
            (0.5 makes it independent of the class).
        rng: the random generator.

    Returns:
        `(images, labels, cue_boxes, object_boxes)`: float32 `(count, 32, 32, 3)`
        in [0, 1], int labels (0 disk, 1 square), and `(count, 4)` boxes
        `(x0, y0, x1, y1)` (ends exclusive) of the patch and of the object.
    """
    images = rng.uniform(0.25, 0.45, (count, SIZE, SIZE, 1)).astype(np.float32)
    images = np.repeat(images, 3, axis=-1)
    labels = rng.integers(0, 2, count)
    agree = rng.random(count) < cue_agreement
    cue_class = np.where(agree, labels, 1 - labels)
    x0, y0, x1, y1 = CUE
    images[:, y0:y1, x0:x1] = CUE_COLOURS[cue_class][:, None, None, :]
    rows, cols = np.mgrid[:SIZE, :SIZE]
    object_boxes = np.zeros((count, 4), np.int64)
    for i in range(count):
        radius = rng.uniform(4.5, 6.5)
        cy, cx = rng.uniform(12, SIZE - 7, size=2)
        if labels[i] == 0:
            inside = (rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2
        else:
            half = radius * np.sqrt(np.pi) / 2  # same area as the disk
            inside = (np.abs(rows - cy) <= half) & (np.abs(cols - cx) <= half)
        images[i][inside] = rng.uniform(0.8, 1.0)
        ys, xs = np.nonzero(inside)
        object_boxes[i] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    cue_boxes = np.tile(np.array(CUE), (count, 1))
    return images, labels, cue_boxes, object_boxes


def make_model(seed: int) -> keras.Model:
    """A small CNN: three 3×3 convolutions, global average pooling, 2 logits + softmax."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="last_conv")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(2, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="examples/out", help="output folder")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="batches of 32 per epoch")
    parser.add_argument("--train", type=int, default=2000, help="training images per model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    rng = np.random.default_rng(args.seed)
    test = make_scenes(1000, cue_agreement=0.5, rng=rng)
    monitor = tuple(array[:128] for array in test)  # what the callback explains each epoch
    conflict = test[0][:, 0, 0, 0] > 0.5  # red patch...
    conflict = np.where(conflict, 0, 1) != test[1]  # ...on a square, or green on a disk

    results = []
    for name, agreement in (("biased", 0.95), ("debiased", 0.5)):
        x, y, _, _ = make_scenes(args.train, cue_agreement=agreement, rng=rng)
        model = make_model(args.seed)
        untrained = box_mass(model, monitor[0], monitor[2])
        shutil.rmtree(out / "logs" / name, ignore_errors=True)  # one run per model in TensorBoard
        callback = tf_gradcam.GradCAMCallback(
            monitor[0],
            log_dir=out / "logs" / name,
            layer="last_conv",
            max_images=6,
            regions={"cue": monitor[2], "object": monitor[3]},
            class_names=CLASS_NAMES,  # the panels name the explained class
            update_freq=10,
        )
        batches = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=args.seed)
        history = model.fit(
            batches.repeat().batch(32),
            epochs=args.epochs,
            steps_per_epoch=args.steps,
            callbacks=[callback],
            shuffle=False,  # the dataset is shuffled
            verbose=0,
        ).history
        curve = " → ".join(f"{m:.2f}" for m in history["gradcam/cue_mass"])
        print(f"{name:9s} cue mass: {untrained:.2f} untrained, then per epoch {curve}")
        predicted = model.predict(test[0], batch_size=256, verbose=0).argmax(axis=1)
        results.append(
            {
                "model": name,
                "train cue=class": f"{agreement:.0%}",
                "test acc": f"{np.mean(predicted == test[1]):.1%}",
                "acc, cue≠class": f"{np.mean(predicted[conflict] == test[1][conflict]):.1%}",
                "mass on cue": f"{history['gradcam/cue_mass'][-1]:.2f}",
                "mass on object": f"{history['gradcam/object_mass'][-1]:.2f}",
                "_model": model,
            }
        )

    print()
    print_table(results)
    cue_area = (CUE[2] - CUE[0]) * (CUE[3] - CUE[1]) / SIZE**2
    boxes = monitor[3]
    object_area = np.mean((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) / SIZE**2
    print(
        f"(masses: mean fraction of Grad-CAM mass (predicted class) in the region, over "
        f"{len(monitor[0])} balanced test images; a uniform map gives {cue_area:.2f} on the cue "
        f"and {object_area:.2f} on the object)"
    )
    models = {r["model"]: r["_model"] for r in results}
    save_figure(out / "bias_overlays.png", test[0][conflict][:4], test[1][conflict][:4], models)
    print(
        f"\nwrote {out / 'bias_overlays.png'} and TensorBoard logs in {out / 'logs'} "
        f"({time.perf_counter() - start:.0f} s)"
    )


def print_table(results: list[dict]) -> None:
    """A Markdown table of the public (non-underscore) columns."""
    columns = [c for c in results[0] if not c.startswith("_")]
    widths = [max(len(c), *(len(r[c]) for r in results)) for c in columns]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in results:
        print("| " + " | ".join(r[c].rjust(w) for c, w in zip(columns, widths, strict=True)) + " |")


def box_mass(model: keras.Model, images: np.ndarray, boxes: np.ndarray) -> float:
    """Mean fraction of Grad-CAM mass inside per-image boxes (the callback's metric)."""
    heatmaps = tf_gradcam.GradCAM(model, "last_conv")(images).heatmaps
    rows, cols = np.mgrid[:SIZE, :SIZE]
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    total = heatmaps.sum(axis=(1, 2))
    valid = total > 0
    return float(np.mean((heatmaps * inside).sum(axis=(1, 2))[valid] / total[valid]))


def save_figure(path: Path, images: np.ndarray, labels: np.ndarray, models: dict) -> None:
    """Input | biased Grad-CAM | debiased Grad-CAM, for test images whose patch contradicts
    the shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(images), 3, figsize=(6, 2 * len(images)), squeeze=False)
    for i, image in enumerate(images):
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(f"true: {CLASS_NAMES[labels[i]]}", fontsize=8)
        for j, (name, model) in enumerate(models.items(), start=1):
            result = tf_gradcam.GradCAM(model, "last_conv")(image[None])
            predicted = CLASS_NAMES[int(result.classes[0])]
            axes[i, j].imshow(tf_gradcam.overlay(image, result.heatmaps[0]))
            axes[i, j].set_title(f"{name}: predicts {predicted}", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
