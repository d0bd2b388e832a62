"""Grad-CAM for image–text similarity: which region made the image match this caption.

Trains a tiny dual encoder (CLIP-style) in about a minute on a CPU, on
two-object scenes from `tf_gradcam.scenes` and their captions ("red circle
left of blue square"), with the symmetric contrastive loss of CLIP (InfoNCE
over the batch, learned temperature).

- Image tower: the frozen image encoder of the captioning and VQA examples
  (`scene_encoder.frozen_encoder`: the shipped demo CNN's `last_conv` shape
  features joined with the image's colours, 16×16), then trainable 1×1
  convolutions (`scene_conv`), global average pooling and a linear
  projection to a 32-d embedding.
- Text tower: word embeddings averaged over the caption (padding masked),
  then a linear projection to the same 32-d space.

For every test scene, each object is named by a short phrase ("red circle"),
embedded by the text tower, and the image is explained with
`SimilarityTarget(phrase embedding)` at `scene_conv`. The pointing game
checks whether the map's maximum falls on the named object, against the
chance that a random point does.

Run:
    python examples/image_text.py --out examples/out
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf
from keras import layers
from scene_encoder import frozen_encoder

import tf_gradcam
from tf_gradcam import metrics
from tf_gradcam.scenes import caption_vocabulary, captions, make_scenes

STEPS = 6  # "<colour> <shape> left of <colour> <shape>"; phrases are padded
DIM = 32  # the shared embedding width
#: Pointing tolerance scaled from Zhang et al.'s 15 px at 224 px to our 64 px images.
TOLERANCE = 4


def tokenize(texts, vocabulary) -> np.ndarray:
    """Token ids `(n, STEPS)`, 1-based (0 is padding)."""
    index = {word: i + 1 for i, word in enumerate(vocabulary)}
    tokens = np.zeros((len(texts), STEPS), np.int32)
    for row, text in enumerate(texts):
        words = [index[w] for w in text.split()]
        tokens[row, : len(words)] = words
    return tokens


def phrases(scenes, obj: int) -> list[str]:
    """The phrase naming object `obj` of each scene: "red circle"."""
    return [
        f"{scenes.color_names[c]} {scenes.class_names[s]}"
        for s, c in zip(scenes.object_shapes[:, obj], scenes.object_colors[:, obj], strict=True)
    ]


def build_image_head(feature_shape) -> keras.Model:
    """Frozen-encoder features → 1×1 convs (`scene_conv`) → GAP → linear projection."""
    features = keras.Input(feature_shape, name="features")
    x = layers.Conv2D(64, 1, activation="relu", name="bind")(features)
    x = layers.Conv2D(48, 1, activation="relu", name="scene_conv")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(features, layers.Dense(DIM, name="image_projection")(x), name="image_head")


def build_text_tower(vocabulary_size: int) -> keras.Model:
    """Word embeddings → masked mean over the words → linear projection."""
    tokens = keras.Input((STEPS,), dtype="int32", name="tokens")
    x = layers.Embedding(vocabulary_size + 1, 32, mask_zero=True)(tokens)
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, layers.Dense(DIM, name="text_projection")(x), name="text_tower")


def train(image_head, text_tower, features, tokens, *, epochs: int, batch: int, seed: int):
    """CLIP's symmetric InfoNCE loss over each batch, with a learned temperature."""
    log_scale = tf.Variable(math.log(1 / 0.07), dtype=tf.float32, name="log_scale")
    variables = [*image_head.trainable_variables, *text_tower.trainable_variables, log_scale]
    optimizer = keras.optimizers.Adam(3e-3)

    @tf.function
    def step(f, t):
        with tf.GradientTape() as tape:
            v = tf.math.l2_normalize(image_head(f, training=True), axis=-1)
            w = tf.math.l2_normalize(text_tower(t, training=True), axis=-1)
            logits = tf.exp(log_scale) * tf.matmul(v, w, transpose_b=True)
            labels = tf.range(tf.shape(logits)[0])
            loss = 0.5 * (
                tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
                + tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels, tf.transpose(logits))
                )
            )
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        log_scale.assign(tf.minimum(log_scale, math.log(100.0)))  # CLIP's clip at 100
        return loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(features))
        epoch = [
            float(step(features[order[i : i + batch]], tokens[order[i : i + batch]]))
            for i in range(0, len(order) - batch + 1, batch)
        ]
        losses.append(float(np.mean(epoch)))
    return losses, float(tf.exp(log_scale))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/out", help="folder for the figure")
    parser.add_argument("--figure", default=None, help="figure path (default OUT/image_text.png)")
    parser.add_argument("--train", type=int, default=2000, help="training scenes")
    parser.add_argument("--test", type=int, default=200, help="test scenes")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)
    started = time.perf_counter()

    train_scenes = make_scenes(args.train, objects=2, seed=args.seed)
    test = make_scenes(args.test, objects=2, seed=args.seed + 1)
    vocabulary = caption_vocabulary(train_scenes)
    train_tokens = tokenize(captions(train_scenes), vocabulary)

    # The image encoder is frozen: compute its features once, train the rest.
    encoder = frozen_encoder()
    features = encoder.predict(train_scenes.images, batch_size=250, verbose=0)
    image_head = build_image_head(features.shape[1:])
    text_tower = build_text_tower(len(vocabulary))
    losses, scale = train(
        image_head, text_tower, features, train_tokens, epochs=args.epochs, batch=64, seed=0
    )
    image = keras.Input((64, 64, 3), name="image")
    tower = keras.Model(image, image_head(encoder(image)), name="image_tower")
    trained = time.perf_counter() - started

    # Retrieval on the test scenes: does each image rank a caption with its words first?
    # ("red circle left of blue square" and "blue circle left of red square" share their
    # words: a bag-of-words text tower embeds them alike, and scenes repeat captions.)
    image_embeddings = unit(tower.predict(test.images, batch_size=100, verbose=0))
    caption_embeddings = unit(text_tower.predict(tokenize(captions(test), vocabulary), verbose=0))
    best = (image_embeddings @ caption_embeddings.T).argmax(axis=1)
    words = [frozenset(c.split()) for c in captions(test)]
    retrieved = np.array([words[i] == words[j] for i, j in enumerate(best)])
    print(
        f"trained in {trained:.0f} s ({args.epochs} epochs, contrastive loss "
        f"{losses[0]:.2f} → {losses[-1]:.2f}, temperature scale {scale:.1f})"
    )
    print(
        f"caption retrieval among the {args.test} test captions: the best caption has the "
        f"scene's words for {retrieved.mean():.1%} of the images"
    )

    # Each object named by a phrase, explained with SimilarityTarget on the image tower
    cam = tf_gradcam.GradCAM(tower, "scene_conv")
    rows = np.arange(args.test)
    heatmaps, hits, near, other, cosines = {}, {}, {}, {}, {}
    for obj in (0, 1):
        text = text_tower.predict(tokenize(phrases(test, obj), vocabulary), verbose=0)
        result = cam(test.images, target=tf_gradcam.SimilarityTarget(text))  # one per image
        heatmaps[obj], cosines[obj] = result.heatmaps, result.scores
        masks = test.masks[rows, obj]
        hits[obj] = metrics.pointing_game(result.heatmaps, masks)
        near[obj] = metrics.pointing_game(result.heatmaps, masks, tolerance=TOLERANCE)
        other[obj] = metrics.pointing_game(result.heatmaps, test.masks[rows, 1 - obj])
    # A phrase naming no object of the scene: the colour of one and the shape of the other
    swapped = [
        f"{test.color_names[c]} {test.class_names[s]}"
        for s, c in zip(test.object_shapes[:, 1], test.object_colors[:, 0], strict=True)
    ]
    swapped_text = text_tower.predict(tokenize(swapped, vocabulary), verbose=0)
    swapped_result = cam(test.images, target=tf_gradcam.SimilarityTarget(swapped_text))

    chance = test.masks.mean(axis=(2, 3)).mean()
    on = metrics.pointing_accuracy(np.concatenate([hits[0], hits[1]]))
    close = metrics.pointing_accuracy(np.concatenate([near[0], near[1]]))
    wrong = metrics.pointing_accuracy(np.concatenate([other[0], other[1]]))
    print(f"pointing game on {args.test} test scenes x 2 objects, phrase 'colour shape':")
    print(f"  map's maximum on the named object {on:.1%} (within {TOLERANCE} px {close:.1%})")
    print(f"  on the other object {wrong:.1%}; a random point lands on an object {chance:.1%}")
    for obj, side in ((0, "left"), (1, "right")):
        print(f"  {side} object named: {metrics.pointing_accuracy(hits[obj]):.1%}")
    named = np.concatenate([cosines[0], cosines[1]])
    print(f"  cosine of the phrases: {named.mean():.2f} ± {named.std():.2f}")
    colour_object = metrics.pointing_game(swapped_result.heatmaps, test.masks[rows, 0])
    shape_object = metrics.pointing_game(swapped_result.heatmaps, test.masks[rows, 1])
    print(
        "a phrase naming no object (the left object's colour, the right one's shape): cosine "
        f"{swapped_result.scores.mean():.2f} ± {swapped_result.scores.std():.2f}; map's maximum "
        f"on the object of the colour {metrics.pointing_accuracy(colour_object):.1%}, "
        f"of the shape {metrics.pointing_accuracy(shape_object):.1%}"
    )

    figure = args.figure or os.path.join(args.out, "image_text.png")
    os.makedirs(os.path.dirname(figure) or ".", exist_ok=True)
    save_figure(figure, test, heatmaps, cosines, swapped, swapped_result)
    print(f"figure: {figure}; total {time.perf_counter() - started:.0f} s")


def save_figure(path, scenes, heatmaps, cosines, swapped, swapped_result, count: int = 4):
    """One row per test scene: the image, the map of each object's phrase, a swapped phrase."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.2, 2.0 * count), layout="constrained")
    axes = figure.subplots(count, 4, squeeze=False)
    for row in range(count):
        image = scenes.images[row]
        caption = captions(scenes)[row].replace(" left of ", "\nleft of ")
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(caption, fontsize=8)
        for obj in (0, 1):
            name = phrases(scenes, obj)[row]
            axes[row, 1 + obj].imshow(tf_gradcam.overlay(image, heatmaps[obj][row]))
            axes[row, 1 + obj].contour(scenes.masks[row, obj], levels=[0.5], colors="white")
            axes[row, 1 + obj].set_title(f'"{name}"\ncos {cosines[obj][row]:.2f}', fontsize=8)
        axes[row, 3].imshow(tf_gradcam.overlay(image, swapped_result.heatmaps[row]))
        axes[row, 3].set_title(
            f'"{swapped[row]}" (absent)\ncos {swapped_result.scores[row]:.2f}', fontsize=8
        )
    for axis in axes.ravel():
        axis.set_axis_off()
    figure.savefig(path, dpi=72)


if __name__ == "__main__":
    main()
