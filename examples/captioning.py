"""Grad-CAM for the words of a caption (Selvaraju et al., §8.1).

Trains a tiny captioning model in about a minute on a CPU and explains its
words. Like the paper's Show-and-Tell model (§8.1.1, "without fine-tuning
through the visual representation"), the image encoder is a frozen,
pre-trained CNN: the shipped demo shape classifier
(`tf_gradcam.demo_model`), whose `last_conv` features are joined with the
image's colours, pooled to the same 16×16 grid. A trainable 1×1-conv block
(`scene_conv`, with a horizontal coordinate channel so that "left of" can be
said) and global average pooling feed a GRU decoder that reads the caption
under teacher forcing: "red circle left of blue square".

For every test scene, each *visual* word is explained with `WordLogProb`
(the log-probability of that word at its step) at `scene_conv`, and the
pointing game checks whether the map's maximum falls on the object the word
names. "left" and "of" name no object and are not scored. The whole caption
is explained with `CaptionLogProb`, as in the paper's Fig. 10a.

Run:
    python examples/captioning.py --out examples/out
"""

from __future__ import annotations

import argparse
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

STEPS = 6  # "<colour> <shape> left of <colour> <shape>"
#: Output step of each visual word -> which object (0 = left, 1 = right) it names.
VISUAL_WORDS = {0: 0, 1: 0, 4: 1, 5: 1}
KIND = {0: "colour", 1: "shape", 4: "colour", 5: "shape"}
#: Pointing tolerance scaled from Zhang et al.'s 15 px at 224 px to our 64 px images.
TOLERANCE = 4


class AddCoordinates(layers.Layer):
    """Appends the horizontal position, from -1 (left) to 1 (right), as a channel."""

    def call(self, x):
        shape = tf.shape(x)
        xs = tf.cast(tf.linspace(-1.0, 1.0, shape[2]), x.dtype)
        grid = tf.broadcast_to(xs[None, None, :, None], tf.concat([shape[:3], [1]], axis=0))
        return tf.concat([x, grid], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] + 1)


def encode(scenes, vocabulary):
    """Token ids: decoder inputs `<start> w1..w5` and targets `w1..w6`."""
    index = {word: i for i, word in enumerate(vocabulary)}
    words = np.array([[index[w] for w in c.split()] for c in captions(scenes)], np.int32)
    start = np.full((len(words), 1), len(vocabulary), np.int32)  # one extra id
    return np.concatenate([start, words[:, :-1]], axis=1), words


def build_decoder(feature_shape, vocabulary_size: int) -> keras.Model:
    """Features → coordinates → 1×1 convs (`scene_conv`) → GAP → GRU under teacher forcing."""
    features = keras.Input(feature_shape, name="features")
    x = AddCoordinates(name="coordinates")(features)
    x = layers.Conv2D(64, 1, activation="relu", name="bind")(x)
    x = layers.Conv2D(48, 1, activation="relu", name="scene_conv")(x)
    vector = layers.Dense(128, activation="relu")(layers.GlobalAveragePooling2D()(x))

    words = keras.Input((STEPS,), dtype="int32", name="words")
    embedded = layers.Embedding(vocabulary_size + 1, 32)(words)
    decoder_in = layers.Concatenate()([embedded, layers.RepeatVector(STEPS)(vector)])
    state = layers.Dense(128, activation="tanh")(vector)
    hidden = layers.GRU(128, return_sequences=True)(decoder_in, initial_state=state)
    scores = layers.Dense(vocabulary_size, activation="softmax", name="next_word")(hidden)
    return keras.Model([features, words], scores, name="decoder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/out", help="folder for the figure")
    parser.add_argument("--train", type=int, default=2000, help="training scenes")
    parser.add_argument("--test", type=int, default=200, help="test scenes")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)
    started = time.perf_counter()

    train = make_scenes(args.train, objects=2, seed=args.seed)
    test = make_scenes(args.test, objects=2, seed=args.seed + 1)
    vocabulary = caption_vocabulary(train)
    train_in, train_out = encode(train, vocabulary)
    test_in, test_out = encode(test, vocabulary)

    # The encoder is frozen: compute its features once, train only the decoder.
    encoder = frozen_encoder()
    features = encoder.predict(train.images, batch_size=250, verbose=0)
    decoder = build_decoder(features.shape[1:], len(vocabulary))
    decoder.compile(keras.optimizers.Adam(4e-3), "sparse_categorical_crossentropy")
    decoder.fit([features, train_in], train_out, batch_size=64, epochs=args.epochs, verbose=0)
    image = keras.Input((64, 64, 3), name="image")
    words = keras.Input((STEPS,), dtype="int32", name="words")
    model = keras.Model([image, words], decoder([encoder(image), words]), name="captioner")

    predicted = model.predict([test.images, test_in], verbose=0).argmax(-1)
    accuracy = (predicted == test_out).mean(axis=0)
    print(
        f"trained in {time.perf_counter() - started:.0f} s; teacher-forced word accuracy on "
        f"{args.test} test scenes: {accuracy.mean():.1%} (per step: "
        + " ".join(f"{a:.0%}" for a in accuracy)
        + ")"
    )

    cam = tf_gradcam.GradCAM(model, "scene_conv")
    inputs = [test.images, test_in]
    rows = np.arange(args.test)
    heatmaps, hits, near = {}, {}, {}
    for step, obj in VISUAL_WORDS.items():
        result = cam(inputs, target=tf_gradcam.WordLogProb(test_out[:, step], step))
        heatmaps[step] = result.heatmaps
        hits[step] = metrics.pointing_game(result.heatmaps, test.masks[rows, obj])
        near[step] = metrics.pointing_game(
            result.heatmaps, test.masks[rows, obj], tolerance=TOLERANCE
        )
    whole = cam(inputs, target=tf_gradcam.CaptionLogProb(test_out)).heatmaps

    chance = test.masks.mean(axis=(2, 3)).mean()
    print(f"pointing game on {args.test} test scenes: the map's maximum on the named object")
    print(f"  {'word':<18}{'on the object':>14}{f'within {TOLERANCE} px':>14}")
    for kind in ("colour", "shape"):
        steps = [s for s in VISUAL_WORDS if KIND[s] == kind]
        on = metrics.pointing_accuracy(np.concatenate([hits[s] for s in steps]))
        close = metrics.pointing_accuracy(np.concatenate([near[s] for s in steps]))
        print(f"  {kind + ' words':<18}{on:>14.1%}{close:>14.1%}")
    on = metrics.pointing_accuracy(np.concatenate(list(hits.values())))
    close = metrics.pointing_accuracy(np.concatenate(list(near.values())))
    print(f"  {'all visual words':<18}{on:>14.1%}{close:>14.1%}")
    print(f"  a random point lands on the named object {chance:.1%} of the time")
    both = metrics.pointing_game(whole, test.masks.any(axis=1))
    print(f"  whole caption, on either object: {metrics.pointing_accuracy(both):.1%}")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "captioning.png")
    save_figure(path, test, vocabulary, test_out, heatmaps, whole)
    print(f"figure: {path}; total {time.perf_counter() - started:.0f} s")


def save_figure(path, scenes, vocabulary, tokens, heatmaps, whole, count: int = 3) -> None:
    """One row per scene: the image, the map of each visual word, the whole caption's."""
    from matplotlib.figure import Figure

    columns = 2 + len(VISUAL_WORDS)
    figure = Figure(figsize=(1.7 * columns, 1.9 * count), layout="constrained")
    axes = figure.subplots(count, columns, squeeze=False)
    for row in range(count):
        caption = " ".join(vocabulary[t] for t in tokens[row])
        axes[row, 0].imshow(scenes.images[row])
        axes[row, 0].set_title(caption.replace(" left of ", "\nleft of "), fontsize=7)
        for column, step in enumerate(VISUAL_WORDS, start=1):
            axes[row, column].imshow(tf_gradcam.overlay(scenes.images[row], heatmaps[step][row]))
            axes[row, column].set_title(f'"{vocabulary[tokens[row, step]]}" (t={step})', fontsize=8)
        axes[row, -1].imshow(tf_gradcam.overlay(scenes.images[row], whole[row]))
        axes[row, -1].set_title("whole caption", fontsize=8)
    for axis in axes.ravel():
        axis.set_axis_off()
    figure.savefig(path, dpi=72)


if __name__ == "__main__":
    main()
