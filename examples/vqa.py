"""Grad-CAM for the answers of a visual question answering model (Selvaraju et al., §8.2).

Trains a tiny VQA model in about a minute on a CPU: scenes of two coloured
shapes, questions "what color is the <shape>?", answers a colour. Like the
paper's VQA model (Lu et al., Appendix C.3), an image vector and an LSTM-style
question vector are multiplied point-wise and classified over the answers.
The image side is the frozen demo CNN (`tf_gradcam.demo_model`, shape
features) joined with the image's colours pooled to its 16×16 grid, then a
trainable 1×1-conv block (`scene_conv`) and global average pooling; the
question side is an embedding and a GRU.

Grad-CAM explains the score of an answer (`AnswerScore`) at `scene_conv`.
The pointing game checks whether the map's maximum falls on the object the
question asks about; and, as in the paper's Fig. 12 ("when forced to answer
'yellow', the model concentrates on its top yellow cap"), whether the map for
the *other* object's colour moves to that other object.

Run:
    python examples/vqa.py --out examples/out
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from keras import layers
from scene_encoder import frozen_encoder

import tf_gradcam
from tf_gradcam import metrics
from tf_gradcam.scenes import color_questions, make_scenes

#: Pointing tolerance scaled from Zhang et al.'s 15 px at 224 px to our 64 px images.
TOLERANCE = 4


def tokenize(questions):
    """Word ids of the questions ("what color is the square?" → 5 ids) and the vocabulary."""
    texts = [q.rstrip("?").split() for q in questions.text]
    vocabulary = sorted({word for text in texts for word in text})
    index = {word: i for i, word in enumerate(vocabulary)}
    return np.array([[index[w] for w in text] for text in texts], np.int32), vocabulary


def build_answerer(feature_shape, question_length, vocabulary_size, answers) -> keras.Model:
    """Image vector ⊙ question vector → MLP → answer scores (softmax)."""
    features = keras.Input(feature_shape, name="features")
    x = layers.Conv2D(64, 1, activation="relu", name="bind")(features)
    x = layers.Conv2D(48, 1, activation="relu", name="scene_conv")(x)
    image_vector = layers.Dense(64, activation="tanh")(layers.GlobalAveragePooling2D()(x))

    question = keras.Input((question_length,), dtype="int32", name="question")
    embedded = layers.Embedding(vocabulary_size, 16)(question)
    question_vector = layers.Dense(64, activation="tanh")(layers.GRU(32)(embedded))

    fused = layers.Multiply()([image_vector, question_vector])
    hidden = layers.Dense(64, activation="relu")(fused)
    scores = layers.Dense(answers, activation="softmax", name="answer")(hidden)
    return keras.Model([features, question], scores, name="answerer")


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
    train_q = color_questions(train, seed=args.seed)
    test_q = color_questions(test, seed=args.seed + 1)
    train_words, vocabulary = tokenize(train_q)
    test_words, _ = tokenize(test_q)

    # The encoder is frozen: compute its features once, train only the rest.
    encoder = frozen_encoder()
    features = encoder.predict(train.images, batch_size=250, verbose=0)
    answerer = build_answerer(
        features.shape[1:], train_words.shape[1], len(vocabulary), len(train.color_names)
    )
    answerer.compile(
        keras.optimizers.Adam(4e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    answerer.fit(
        [features, train_words], train_q.answers, batch_size=64, epochs=args.epochs, verbose=0
    )
    image = keras.Input((64, 64, 3), name="image")
    question = keras.Input(train_words.shape[1:], dtype="int32", name="question")
    model = keras.Model([image, question], answerer([encoder(image), question]), name="vqa")

    inputs = [test.images, test_words]
    predicted = model.predict(inputs, verbose=0).argmax(-1)
    print(
        f"trained in {time.perf_counter() - started:.0f} s; answer accuracy on {args.test} "
        f"test questions: {(predicted == test_q.answers).mean():.1%}"
    )

    rows = np.arange(args.test)
    asked = test.masks[rows, test_q.object_index]
    other = test.masks[rows, 1 - test_q.object_index]
    other_colour = test.object_colors[rows, 1 - test_q.object_index]
    cam = tf_gradcam.GradCAM(model, "scene_conv")
    right = cam(inputs, target=tf_gradcam.AnswerScore(test_q.answers)).heatmaps
    forced = cam(inputs, target=tf_gradcam.AnswerScore(other_colour)).heatmaps

    chance = test.masks.mean(axis=(2, 3)).mean()
    print(f"pointing game on {args.test} test questions: the map's maximum on the object")
    print(f"  {'map for':<40}{'on it':>8}{f'within {TOLERANCE} px':>14}")
    for label, heat, mask in (
        ("the right answer -> the asked object", right, asked),
        ("the other object's colour -> that object", forced, other),
    ):
        on = metrics.pointing_accuracy(metrics.pointing_game(heat, mask))
        close = metrics.pointing_accuracy(metrics.pointing_game(heat, mask, tolerance=TOLERANCE))
        print(f"  {label:<40}{on:>8.1%}{close:>14.1%}")
    print(f"  a random point lands on a given object {chance:.1%} of the time")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "vqa.png")
    save_figure(path, test, test_q, other_colour, right, forced)
    print(f"figure: {path}; total {time.perf_counter() - started:.0f} s")


def save_figure(path, scenes, questions, other_colour, right, forced, count: int = 4) -> None:
    """One row per question: the image, the map of the answer, the map of the other colour."""
    from matplotlib.figure import Figure

    names = scenes.color_names
    figure = Figure(figsize=(5.4, 1.9 * count), layout="constrained")
    axes = figure.subplots(count, 3, squeeze=False)
    for row in range(count):
        axes[row, 0].imshow(scenes.images[row])
        axes[row, 0].set_title(questions.text[row], fontsize=8)
        answer = names[questions.answers[row]]
        axes[row, 1].imshow(tf_gradcam.overlay(scenes.images[row], right[row]))
        axes[row, 1].set_title(f'answer "{answer}"', fontsize=8)
        axes[row, 2].imshow(tf_gradcam.overlay(scenes.images[row], forced[row]))
        axes[row, 2].set_title(f'forced: "{names[other_colour[row]]}"', fontsize=8)
    for axis in axes.ravel():
        axis.set_axis_off()
    figure.savefig(path, dpi=72)


if __name__ == "__main__":
    main()
