"""Vision-language targets: captions under teacher forcing and VQA answers (§8)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

from tf_gradcam import GradCAM
from tf_gradcam.errors import TargetError
from tf_gradcam.targets import AnswerScore, CaptionLogProb, WordLogProb

VOCABULARY, STEPS = 5, 3


def _captioner() -> keras.Model:
    """Image → conv → initial RNN state; words → embedding → RNN → Dense(softmax).

    A SimpleRNN unrolled over its 3 steps keeps tracing fast; the targets only
    see the `(batch, steps, vocabulary)` output.
    """
    image = keras.Input((8, 8, 3), name="image")
    words = keras.Input((STEPS,), dtype="int32", name="words")
    a = layers.Conv2D(4, 3, padding="same", activation="relu", name="last_conv")(image)
    state = layers.Dense(6, activation="tanh", name="init")(layers.Flatten()(a))
    embedded = layers.Embedding(VOCABULARY, 4, name="embed")(words)
    recurrent = layers.SimpleRNN(6, return_sequences=True, unroll=True, name="rnn")
    hidden = recurrent(embedded, initial_state=state)
    scores = layers.Dense(VOCABULARY, activation="softmax", name="next_word")(hidden)
    return keras.Model([image, words], scores, name="captioner")


def _vqa(outputs_as_dict: bool = False) -> keras.Model:
    """Image CNN ⊙ question embedding → answer scores (Lu et al.'s fusion, §C.3)."""
    image = keras.Input((8, 8, 3), name="image")
    question = keras.Input((4,), dtype="int32", name="question")
    a = layers.Conv2D(4, 3, padding="same", activation="relu", name="last_conv")(image)
    v = layers.Dense(6, activation="tanh")(layers.GlobalAveragePooling2D()(a))
    q = layers.GlobalAveragePooling1D()(layers.Embedding(7, 6)(question))
    fused = layers.Multiply()([v, q])
    answers = layers.Dense(5, activation="softmax", name="answer")(fused)
    if outputs_as_dict:
        extra = layers.Dense(2, name="aux")(fused)
        return keras.Model([image, question], {"aux": extra, "answer": answers})
    return keras.Model([image, question], answers)


@pytest.fixture
def batch():
    """Two 8×8 images and two 3-word captions (token ids)."""
    rng = np.random.default_rng(3)
    images = rng.random((2, 8, 8, 3), dtype=np.float32)
    tokens = rng.integers(0, VOCABULARY, (2, STEPS))
    return images, tokens


def _numpy_log_probs(model: keras.Model, images: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """(batch, steps, vocabulary) log-softmax of the head's logits, in NumPy."""
    hidden = keras.Model(model.inputs, model.get_layer("rnn").output)([images, tokens])
    kernel, bias = model.get_layer("next_word").get_weights()
    logits = hidden.numpy().astype(np.float64) @ kernel + bias
    logits -= logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def test_word_log_prob_equals_numpy_log_softmax(batch):
    """WordLogProb's score is log_softmax(logits[:, t])[w], per image word and step."""
    images, tokens = batch
    model = _captioner()
    expected = _numpy_log_probs(model, images, tokens)
    result = GradCAM(model, "last_conv")([images, tokens], target=WordLogProb([1, 4], [2, 0]))
    np.testing.assert_allclose(result.scores, [expected[0, 2, 1], expected[1, 0, 4]], rtol=1e-5)
    assert result.classes is None


def test_caption_log_prob_is_sum_of_word_log_probs(batch):
    """CaptionLogProb's score is Σ_t log p(tokens[t]), computed in NumPy."""
    images, tokens = batch
    model = _captioner()
    expected = _numpy_log_probs(model, images, tokens)
    picked = np.take_along_axis(expected, tokens[..., None], axis=2)[..., 0]
    result = GradCAM(model, "last_conv")([images, tokens], target=CaptionLogProb(tokens))
    np.testing.assert_allclose(result.scores, picked.sum(axis=1), rtol=1e-5)


def test_caption_weights_are_sum_of_word_weights(batch):
    """Linearity of the gradient: α and Σα A of the caption are the sums over its words."""
    images, tokens = batch
    cam = GradCAM(_captioner(), "last_conv", relu=False)
    whole = cam([images, tokens], target=CaptionLogProb(tokens))
    words = [cam([images, tokens], target=WordLogProb(tokens[:, t], t)) for t in range(STEPS)]
    np.testing.assert_allclose(whole.weights, sum(w.weights for w in words), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(whole.raw_maps, sum(w.raw_maps for w in words), rtol=1e-4, atol=1e-7)


def test_caption_padding_is_left_out(batch):
    """A negative token id is padding: the caption score stops at the last real word."""
    images, tokens = batch
    model = _captioner()
    expected = _numpy_log_probs(model, images, tokens)
    picked = np.take_along_axis(expected, tokens[..., None], axis=2)[..., 0]
    padded = tokens.copy()
    padded[0, 2] = padded[1, 1:] = -1
    result = GradCAM(model, "last_conv")([images, tokens], target=CaptionLogProb(padded))
    np.testing.assert_allclose(result.scores, [picked[0, :2].sum(), picked[1, 0]], rtol=1e-5)


def test_shared_word_for_every_image_broadcasts(batch):
    """A scalar word and step apply to every image."""
    images, tokens = batch
    model = _captioner()
    expected = _numpy_log_probs(model, images, tokens)
    result = GradCAM(model, "last_conv")([images, tokens], target=WordLogProb(3, 1))
    np.testing.assert_allclose(result.scores, expected[:, 1, 3], rtol=1e-5)


def test_reused_target_object_does_not_retrace(batch):
    """The engine compiles once per target object: calling again with it does not retrace."""
    images, tokens = batch
    cam = GradCAM(_captioner(), "last_conv")
    target = CaptionLogProb(tokens)
    cam([images, tokens], target=target)
    cam([images[::-1], tokens], target=target)
    assert cam.trace_count == 1


@pytest.mark.filterwarnings("ignore:.*all zero:RuntimeWarning")
def test_answer_score_equals_class_target():
    """AnswerScore(per-image answers) gives the same maps and scores as the class target."""
    rng = np.random.default_rng(4)
    images = rng.random((3, 8, 8, 3), dtype=np.float32)
    questions = rng.integers(0, 7, (3, 4))
    cam = GradCAM(_vqa(), "last_conv")
    answers = [0, 3, 4]
    by_target = cam([images, questions], target=AnswerScore(answers))
    by_class = cam([images, questions], target=answers)
    np.testing.assert_allclose(by_target.heatmaps, by_class.heatmaps, atol=1e-6)
    np.testing.assert_allclose(by_target.scores, by_class.scores, rtol=1e-6)


def test_answer_score_picks_named_output():
    """With a dict of outputs, `output=` names the answer scores; taken before the softmax."""
    model = _vqa(outputs_as_dict=True)
    rng = np.random.default_rng(5)
    images = rng.random((2, 8, 8, 3), dtype=np.float32)
    questions = rng.integers(0, 7, (2, 4))
    result = GradCAM(model, "last_conv")([images, questions], target=AnswerScore(2, "answer"))
    head = model.get_layer("answer")
    fused = keras.Model(model.inputs, head.input)([images, questions]).numpy()
    kernel, bias = head.get_weights()
    np.testing.assert_allclose(result.scores, (fused @ kernel + bias)[:, 2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: WordLogProb(-1, 0),
        lambda: WordLogProb(1.5, 0),
        lambda: WordLogProb(1, [[0]]),
        lambda: CaptionLogProb(np.zeros((1, 1, 1), int)),
        lambda: AnswerScore("yes"),
    ],
)
def test_bad_indices_raise_target_error(make):
    """Negative, non-integer or wrongly shaped indices are rejected at construction."""
    with pytest.raises(TargetError):
        make()


def test_out_of_range_or_wrong_output_raises(batch):
    """A step, word or caption length that does not fit the output is a TargetError."""
    images, tokens = batch
    cam = GradCAM(_captioner(), "last_conv")
    for target in (WordLogProb(0, STEPS), WordLogProb(VOCABULARY, 0), CaptionLogProb([0, 1])):
        with pytest.raises(TargetError, match=r"out of range|steps"):
            cam([images, tokens], target=target)
    with pytest.raises(TargetError, match="batch, steps, vocabulary"):
        GradCAM(_vqa(), "last_conv")(
            [images, np.zeros((2, 4), int)], target=CaptionLogProb([0, 1, 2])
        )


def test_per_image_indices_must_match_batch(batch):
    """Per-image words for a batch of another size fail instead of broadcasting."""
    images, tokens = batch
    with pytest.raises(TargetError, match=r"^WordLogProb: .*batch size differs"):
        GradCAM(_captioner(), "last_conv")([images, tokens], target=WordLogProb([0, 1, 2], 0))
