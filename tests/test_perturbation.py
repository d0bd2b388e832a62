"""Score-CAM and Ablation-CAM against their equations, in closed form on tiny models.

Every expected number is computed here without the package: Score-CAM's masks
are built in NumPy (bilinear upsampling by `tf.image.resize`, min-max scaling)
and scored by running the Keras model itself on the masked images; Ablation-CAM's
ablated scores come from the head after the layer written out in NumPy
(1×1 conv, tanh → GAP → Dense), in float64.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import tf_gradcam
from tf_gradcam.perturbation import AblationCAM, ScoreCAM

# Raw increases (channel_softmax=False) and ablation weights are often all negative
# for some image: its map is all zero, which the explainers warn about once.
pytestmark = pytest.mark.filterwarnings("ignore:.*are all zero:RuntimeWarning")

# ------------------------------------------------------------------ models


def _model(size: int = 8, strides: int = 2, channels: int = 4, dead: bool = False):
    """x → Conv 3×3 (relu, 'features') → Conv 1×1 (tanh, 'hidden') → GAP → Dense ('head') → Softmax.

    Returns the model and the model of its scores before the softmax.
    """
    inputs = keras.Input((size, size, 3))
    features = layers.Conv2D(
        channels, 3, strides=strides, padding="same", activation="relu", name="features"
    )
    x = features(inputs)
    spread = keras.initializers.RandomNormal(stddev=1.5)
    x = layers.Conv2D(3, 1, activation="tanh", kernel_initializer=spread, name="hidden")(x)
    logits = layers.Dense(3, kernel_initializer=spread, name="head")(
        layers.GlobalAveragePooling2D()(x)
    )
    model = keras.Model(inputs, layers.Softmax()(logits))
    if dead:  # the last channel never fires on images in [0, 1]: a constant (zero) map
        kernel, bias = features.get_weights()
        kernel[..., -1] = -np.abs(kernel[..., -1])
        bias[-1] = -1.0
        features.set_weights([kernel, bias])
    return model, keras.Model(inputs, logits)


def _features(model: keras.Model, images) -> np.ndarray:
    return keras.Model(model.input, model.get_layer("features").output)(images).numpy()


def _head(model: keras.Model, a: np.ndarray) -> np.ndarray:
    """The model after 'features', in float64: tanh(A·K2 + b2) → mean → ·W + b."""
    k2, b2 = (v.astype(np.float64) for v in model.get_layer("hidden").get_weights())
    w, b = (v.astype(np.float64) for v in model.get_layer("head").get_weights())
    return np.tanh(a @ k2[0, 0] + b2).mean(axis=(1, 2)) @ w + b


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _masks(features: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H^k = s(Up(A^k)): (n, C, H, W), bilinear (half-pixel) then min-max per image and channel."""
    up = tf.image.resize(features, size, method="bilinear").numpy().astype(np.float64)
    low = up.min(axis=(1, 2), keepdims=True)
    span = up.max(axis=(1, 2), keepdims=True) - low
    scaled = np.where(span > 0, (up - low) / np.where(span > 0, span, 1.0), 0.0)
    return scaled.transpose(0, 3, 1, 2)


def _score_cam(
    scorer: keras.Model,
    images: np.ndarray,
    classes: np.ndarray,
    features: np.ndarray,
    *,
    channel_softmax: bool = True,
    baseline: float | None = 0.0,
):
    """Score-CAM's α (n, C) and signed maps; `scorer` gives probabilities or logits."""
    n, height, width, _ = images.shape
    masks = _masks(features, (height, width))
    channels = masks.shape[1]
    masked = (images[:, None].astype(np.float64) * masks[..., None]).astype(np.float32)
    out = scorer(masked.reshape(n * channels, height, width, -1)).numpy().astype(np.float64)
    confidence = out.reshape(n, channels, -1)[np.arange(n), :, classes]  # (n, C)
    if channel_softmax:
        alpha = _softmax(confidence, axis=1)
    elif baseline is None:
        alpha = confidence
    else:
        base = scorer(np.full(images.shape, baseline, np.float32)).numpy()
        alpha = confidence - base[np.arange(n), classes][:, None]
    raw = np.einsum("nhwc,nc->nhw", features.astype(np.float64), alpha)
    return alpha, raw


def _ablation_cam(model: keras.Model, features: np.ndarray, classes: np.ndarray):
    """Ablation-CAM's y (n,), w (n, C) and signed maps with the NumPy head."""
    a = features.astype(np.float64)
    rows = np.arange(len(a))
    y = _head(model, a)[rows, classes]
    ablated = []
    for k in range(a.shape[-1]):
        zeroed = a.copy()
        zeroed[..., k] = 0.0
        ablated.append(_head(model, zeroed)[rows, classes])
    y_k = np.stack(ablated, axis=1)
    w = (y[:, None] - y_k) / y[:, None]
    return y, w, np.einsum("nhwc,nc->nhw", a, w)


@pytest.fixture
def case():
    keras.utils.set_random_seed(7)
    model, logits = _model()
    images = np.random.default_rng(8).random((3, 8, 8, 3), dtype=np.float32)
    return model, logits, images, _features(model, images)


def _assert_close(actual, expected, rtol=1e-5):
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


# ------------------------------------------------------------- Score-CAM


@pytest.mark.parametrize("channel_softmax", [True, False])
def test_score_cam_on_a_map_of_the_image_size(channel_softmax):
    """Layer at the input's resolution (Up is the identity), with a dead channel: no NaN."""
    keras.utils.set_random_seed(3)
    model, _ = _model(size=6, strides=1, channels=5, dead=True)
    images = np.random.default_rng(4).random((2, 6, 6, 3), dtype=np.float32)
    features = _features(model, images)
    assert features.shape == (2, 6, 6, 5) and not features[..., -1].any()
    classes = np.array([1, 2])
    alpha, raw = _score_cam(model, images, classes, features, channel_softmax=channel_softmax)
    result = ScoreCAM(model, "features", channel_softmax=channel_softmax)(images, target=classes)
    assert np.isfinite(result.weights).all()
    _assert_close(result.weights, alpha)
    _assert_close(result.raw_maps, raw)
    _assert_close(result.maps, np.maximum(raw, 0))


@pytest.mark.parametrize("channel_softmax", [True, False])
def test_score_cam_with_bilinear_upsampling_and_per_image_weights(case, channel_softmax):
    """4×4 maps upsampled to 8×8: α follows each image's own masked scores."""
    model, _, images, features = case
    classes = np.array([0, 2, 1])
    alpha, raw = _score_cam(model, images, classes, features, channel_softmax=channel_softmax)
    cam = ScoreCAM(model, "features", channel_softmax=channel_softmax)
    result = cam(images, target=classes)
    _assert_close(result.weights, alpha)
    _assert_close(result.raw_maps, raw)
    np.testing.assert_allclose(result.scores, case[1](images).numpy()[[0, 1, 2], classes], 1e-5)
    # the weights really differ between images: pooling them over the batch would be wrong
    assert np.abs(alpha - alpha.mean(axis=0)).max() > 1e-3 * np.abs(alpha).max()
    if channel_softmax:
        np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("keep", [1, 2])
@pytest.mark.parametrize("channel_softmax", [True, False])
def test_score_cam_max_channels_scores_the_most_varied_channels_only(case, channel_softmax, keep):
    """max_channels=N: each image's N channels of largest spatial std, the rest weigh 0."""
    model, _, images, features = case
    classes = np.array([2, 0, 1])
    confidence, _ = _score_cam(
        model, images, classes, features, channel_softmax=False, baseline=None
    )
    n, channels = confidence.shape  # two channels are dead in some images: no ties at the top
    top = np.argsort(-features.std(axis=(1, 2)), axis=1)[:, :keep]
    chosen = np.take_along_axis(confidence, top, axis=1)
    if channel_softmax:
        chosen = _softmax(chosen, axis=1)
    alpha = np.zeros((n, channels))
    np.put_along_axis(alpha, top, chosen, axis=1)
    cam = ScoreCAM(
        model, "features", max_channels=keep, channel_softmax=channel_softmax, baseline=None
    )
    result = cam(images, target=classes)
    _assert_close(result.weights, alpha)
    _assert_close(result.raw_maps, np.einsum("nhwc,nc->nhw", features.astype(np.float64), alpha))
    if keep == 1:
        assert len({tuple(t) for t in top}) > 1  # the images keep different channels
    full = ScoreCAM(model, "features", max_channels=channels, channel_softmax=channel_softmax)
    _assert_close(
        full(images, target=classes).weights,
        ScoreCAM(model, "features", channel_softmax=channel_softmax)(
            images, target=classes
        ).weights,
    )
    with pytest.raises(ValueError, match="Received: max_channels=0"):
        ScoreCAM(model, "features", max_channels=0)


def test_score_cam_raw_increase_subtracts_the_baseline(case):
    """channel_softmax=False: C(A^k) = f^c(X ∘ H^k) − f^c(X_b), for a non-zero X_b and for none."""
    model, _, images, features = case
    classes = np.array([1, 1, 0])
    for baseline in (0.5, None):
        alpha, raw = _score_cam(
            model, images, classes, features, channel_softmax=False, baseline=baseline
        )
        result = ScoreCAM(model, "features", channel_softmax=False, baseline=baseline)(
            images, target=classes
        )
        _assert_close(result.weights, alpha)
        _assert_close(result.raw_maps, raw)


def test_score_cam_baseline_cancels_under_the_channel_softmax(case):
    model, _, images, _ = case
    results = [
        ScoreCAM(model, "features", baseline=b)(images, target=2).weights for b in (0.0, 0.7, None)
    ]
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-6)
    raw = [
        ScoreCAM(model, "features", channel_softmax=False, baseline=b)(images, target=2).weights
        for b in (0.0, 0.7)
    ]
    assert np.abs(raw[0] - raw[1]).max() > 1e-4


def test_score_cam_logits_and_callable_targets(case):
    """probabilities=False scores the pre-softmax logit; a callable's score is used as it is."""
    model, logits, images, features = case
    classes = np.array([1, 1, 1])
    alpha, raw = _score_cam(logits, images, classes, features)
    by_logit = ScoreCAM(model, "features", probabilities=False)(images, target=1)
    _assert_close(by_logit.weights, alpha)
    _assert_close(by_logit.raw_maps, raw)
    by_callable = ScoreCAM(model, "features")(images, target=lambda out: out[:, 1])
    _assert_close(by_callable.weights, alpha)
    assert by_callable.classes is None
    with pytest.raises(ValueError, match="probabilities=False"):
        ScoreCAM(model, "features", logits=False)
    plain = ScoreCAM(model, "features", logits=False, probabilities=False)(images, target=1)
    np.testing.assert_allclose(plain.scores, model(images).numpy()[:, 1], rtol=1e-5)
    _assert_close(plain.weights, _score_cam(model, images, classes, features)[0])


# ----------------------------------------------------------- Ablation-CAM


def test_ablation_cam_weights_are_the_relative_drop_of_the_score(case):
    """w_k = (y^c − y^c_k) / y^c on pre-softmax scores, per image, with negative y^c too."""
    model, logits, images, features = case
    classes = np.array([0, 1, 0])
    y, w, raw = _ablation_cam(model, features, classes)
    assert (y < 0).any() and (y > 0).any() and np.abs(y).min() > 0.2
    result = AblationCAM(model, "features")(images, target=classes)
    _assert_close(result.scores, y)
    _assert_close(result.weights, w)
    _assert_close(result.raw_maps, raw)
    _assert_close(result.maps, np.maximum(raw, 0))
    np.testing.assert_allclose(result.scores, logits(images).numpy()[[0, 1, 2], classes], 1e-5)
    assert np.abs(w - w.mean(axis=0)).max() > 1e-3 * np.abs(w).max()  # per image
    # not Score-CAM's, not Grad-CAM's weights
    grad = tf_gradcam.GradCAM(model, "features")(images, target=classes).weights
    assert np.abs(grad - w).max() > 1e-2 * np.abs(w).max()


def test_ablation_cam_zero_score_gives_zero_weights_not_nan(case):
    model, _, images, _ = case
    head = model.get_layer("head")
    kernel, bias = head.get_weights()
    kernel[:, 2], bias[2] = 0.0, 0.0  # y^2 = 0 whatever the channels
    head.set_weights([kernel, bias])
    with pytest.warns(RuntimeWarning, match="all zero"):
        result = AblationCAM(model, "features")(images, target=2)
    assert (result.weights == 0).all() and (result.maps == 0).all() and result.degenerate.all()
    assert np.isfinite(result.heatmaps).all()


def test_ablation_cam_logits_false_uses_probabilities(case):
    model, _, images, features = case
    probabilities = model(images).numpy()[:, 1]
    result = AblationCAM(model, "features", logits=False)(images, target=1)
    np.testing.assert_allclose(result.scores, probabilities, rtol=1e-5)
    a = features.astype(np.float64)
    drops = []
    for k in range(a.shape[-1]):
        zeroed = a.copy()
        zeroed[..., k] = 0.0
        drops.append(_softmax(_head(model, zeroed))[:, 1])
    expected = (probabilities[:, None] - np.stack(drops, axis=1)) / probabilities[:, None]
    _assert_close(result.weights, expected, rtol=1e-4)


def test_ablation_head_reads_earlier_layers_as_they_were():
    """a → b ('explained') → a + b: the skip from a, before the layer, keeps a's values."""
    keras.utils.set_random_seed(13)
    inputs = keras.Input((6, 6, 2))
    a = layers.Conv2D(3, 3, padding="same", activation="relu", name="a")(inputs)
    b = layers.Conv2D(3, 1, activation="relu", name="b")(a)
    head = layers.Dense(2, name="head")
    model = keras.Model(inputs, head(layers.GlobalAveragePooling2D()(layers.Add()([a, b]))))
    images = np.random.default_rng(14).random((2, 6, 6, 2), dtype=np.float32)
    a_values, b_values = (t.numpy().astype(np.float64) for t in keras.Model(inputs, [a, b])(images))
    w, bias = (v.astype(np.float64) for v in head.get_weights())

    def scores(b_part):
        return ((a_values + b_part).mean(axis=(1, 2)) @ w + bias)[:, 1]

    y = scores(b_values)
    y_k = []
    for k in range(3):
        zeroed = b_values.copy()
        zeroed[..., k] = 0.0
        y_k.append(scores(zeroed))
    result = AblationCAM(model, "b")(images, target=1)
    _assert_close(result.weights, (y[:, None] - np.stack(y_k, axis=1)) / y[:, None])


def test_ablation_leaves_the_users_model_untouched(case):
    model, _, images, _ = case
    nodes = [len(layer._inbound_nodes) for layer in model.layers]
    before = model(images).numpy()
    cam = AblationCAM(model, "features")
    cam(images)
    assert cam.head_model() is cam.head_model()  # built once
    assert [len(layer._inbound_nodes) for layer in model.layers] == nodes
    np.testing.assert_array_equal(model(images).numpy(), before)
    assert len(model.inputs) == 1 and len(model.outputs) == 1


# ------------------------------------------------------- shared mechanics

_METHODS = [ScoreCAM, AblationCAM]


@pytest.mark.parametrize("method", _METHODS)
def test_results_do_not_depend_on_the_chunk_size(case, method):
    """batch_size 1, 3 (a partial last chunk), C and 1000 (one chunk): the same numbers."""
    model, _, images, features = case
    channels = features.shape[-1]
    assert (2 * channels) % 3  # 2 images × C channels: the last chunk of 3 is partial
    runs = [
        method(model, "features", batch_size=b)(images[:2], target=tf_gradcam.TopK(2))
        for b in (1, 3, channels, 1000)
    ]
    # float32 passes over batches of other sizes may round differently (TensorFlow's
    # own kernels, oneDNN off): an ablation weight (y − y_k) / y carries ~1e-7 of it
    for run in runs[1:]:
        np.testing.assert_allclose(run.weights, runs[0].weights, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(run.heatmaps, runs[0].heatmaps, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", _METHODS)
def test_each_forward_pass_holds_at_most_batch_size_images(case, method):
    """2 images × 4 channels = 8 perturbed images, 2 per pass (the target sees each pass)."""
    model, _, images, _ = case

    def score(outputs):
        check = tf.debugging.assert_less_equal(tf.shape(outputs)[0], 2, message="oversized pass")
        with tf.control_dependencies([check]):
            return tf.identity(outputs[:, 1])

    chunked = method(model, "features", batch_size=2)(images[:2], target=score)
    alone = method(model, "features", batch_size=1000)(images[:2], target=lambda out: out[:, 1])
    np.testing.assert_allclose(chunked.weights, alone.weights, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", _METHODS)
def test_batch_equals_one_by_one_and_top_k_equals_per_class(case, method):
    model, _, images, _ = case
    cam = method(model, "features", batch_size=5)
    top = cam(images, target=tf_gradcam.TopK(2))
    assert top.weights.shape == (3, 2, 4) and top.heatmaps.shape == (3, 2, 8, 8)
    for j in range(2):
        alone = cam(images, target=top.classes[:, j])
        np.testing.assert_allclose(top.weights[:, j], alone.weights, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(top.maps[:, j], alone.maps, rtol=1e-5, atol=1e-7)
    batch = cam(images, target=1)
    for i in range(len(images)):
        single = cam(images[i : i + 1], target=1)
        np.testing.assert_allclose(single.weights[0], batch.weights[i], rtol=1e-5, atol=1e-6)


def _ranking_model() -> keras.Model:
    """A0 = x, A1 = 1 − x ('features'); scores (2·mean A0, 2·mean A1, 0.9).

    Masking the image (it darkens) or removing a channel reorders the classes.
    """
    inputs = keras.Input((4, 4, 1))
    features = layers.Conv2D(2, 1, name="features")
    head = layers.Dense(3, name="head")
    outputs = head(layers.GlobalAveragePooling2D()(features(inputs)))
    features.set_weights(
        [np.array([[[[1.0, -1.0]]]], np.float32), np.array([0.0, 1.0], np.float32)]
    )
    head.set_weights(
        [np.array([[2, 0, 0], [0, 2, 0]], np.float32), np.array([0, 0, 0.9], np.float32)]
    )
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("method", _METHODS)
def test_top_k_scores_the_classes_of_the_unperturbed_images(method):
    """TopK's classes are chosen once, on the images; perturbed passes do not re-rank them."""
    model = _ranking_model()
    images = np.random.default_rng(5).uniform(0.5, 1.0, (2, 4, 4, 1)).astype(np.float32)
    order = np.argsort(-model(images).numpy(), axis=1)
    if method is ScoreCAM:
        masks = _masks(_features(model, images), (4, 4))
        perturbed = model((images[:, None] * masks[..., None]).reshape(4, 4, 4, 1)).numpy()
    else:  # the scores with A0, then A1, set to zero
        means = images.mean(axis=(1, 2, 3))
        perturbed = np.array([s for m in means for s in ((0, 2 - 2 * m, 0.9), (2 * m, 0, 0.9))])
    assert (np.argsort(-perturbed, axis=1) != np.repeat(order, 2, axis=0)).any()
    cam = method(model, "features", batch_size=3)
    top = cam(images, target=tf_gradcam.TopK(3))
    np.testing.assert_array_equal(top.classes, order)
    for j in range(3):
        alone = cam(images, target=order[:, j])
        np.testing.assert_allclose(top.weights[:, j], alone.weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", _METHODS)
def test_no_retrace_across_batch_sizes_and_classes(case, method):
    model, _, images, _ = case
    cam = method(model, "features", batch_size=2)
    cam(images, target=1)
    warm = cam.trace_count
    for n in (1, 2, 3):
        cam(images[:n], target=[2] * n)
        cam(images[:n], target=0)
    assert cam.trace_count == warm == 1


@pytest.mark.parametrize("method", _METHODS)
@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_bad_batch_size_names_the_value(case, method, bad):
    with pytest.raises(ValueError, match=rf"Received: batch_size={bad!r}") as error:
        method(case[0], "features", batch_size=bad)
    assert "positive integer" in str(error.value)


def _two_input_model():
    """image → conv ('features', relu) → GAP; image → GAP (skips the layer); vector → Dense."""
    image = keras.Input((8, 8, 3))
    vector = keras.Input((2,))
    pooled = layers.GlobalAveragePooling2D()(
        layers.Conv2D(3, 3, strides=2, padding="same", activation="relu", name="features")(image)
    )
    skip = layers.GlobalAveragePooling2D()(image)
    side = layers.Dense(2, name="side")(vector)
    scores = layers.Dense(3, name="head")(layers.Concatenate()([pooled, skip, side]))
    return keras.Model([image, vector], layers.Softmax()(scores))


def test_two_input_model_masks_and_ablates_only_the_image_path():
    keras.utils.set_random_seed(11)
    model = _two_input_model()
    rng = np.random.default_rng(12)
    images = rng.random((2, 8, 8, 3), dtype=np.float32)
    vectors = rng.normal(size=(2, 2)).astype(np.float32)
    features = keras.Model(model.inputs, model.get_layer("features").output)(
        [images, vectors]
    ).numpy()
    classes = np.array([2, 0])

    # Score-CAM: the image is masked, the vector repeated as it is
    masks = _masks(features, (8, 8))
    masked = (images[:, None] * masks[..., None]).astype(np.float32).reshape(6, 8, 8, 3)
    probs = model([masked, np.repeat(vectors, 3, axis=0)]).numpy().reshape(2, 3, 3)
    alpha = _softmax(probs[np.arange(2), :, classes].astype(np.float64), axis=1)
    result = ScoreCAM(model, "features")([images, vectors], target=classes)
    _assert_close(result.weights, alpha)

    # Ablation-CAM: the skip branch and the vector keep their values
    w, b = (v.astype(np.float64) for v in model.get_layer("head").get_weights())
    side = vectors @ model.get_layer("side").kernel.numpy() + model.get_layer("side").bias.numpy()
    rest = np.concatenate([images.mean(axis=(1, 2)), side], axis=1).astype(np.float64)

    def head(a):
        return np.concatenate([a.mean(axis=(1, 2)), rest], axis=1) @ w + b

    a = features.astype(np.float64)
    y = head(a)[np.arange(2), classes]
    y_k = []
    for k in range(3):
        zeroed = a.copy()
        zeroed[..., k] = 0.0
        y_k.append(head(zeroed)[np.arange(2), classes])
    expected = (y[:, None] - np.stack(y_k, axis=1)) / y[:, None]
    result = AblationCAM(model, "features")([images, vectors], target=classes)
    _assert_close(result.scores, y)
    _assert_close(result.weights, expected)


def test_channels_first_model_equals_its_channels_last_twin(case):
    model, _, images, _ = case
    inputs = keras.Input((3, 8, 8))
    x = layers.Conv2D(
        4,
        3,
        strides=2,
        padding="same",
        activation="relu",
        data_format="channels_first",
        name="features",
    )(inputs)
    x = layers.Conv2D(3, 1, activation="tanh", data_format="channels_first", name="hidden")(x)
    x = layers.GlobalAveragePooling2D(data_format="channels_first")(x)
    first = keras.Model(inputs, layers.Softmax()(layers.Dense(3, name="head")(x)))
    first.set_weights(model.get_weights())
    transposed = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    try:
        first(transposed[:1])
    except tf.errors.UnimplementedError as error:
        if "NHWC" not in str(error):
            raise
        pytest.skip("TensorFlow's CPU kernels without oneDNN cannot run NCHW convolutions")
    for method in _METHODS:
        ours = method(first, "features")(transposed, target=[0, 1, 2])
        theirs = method(model, "features")(images, target=[0, 1, 2])
        np.testing.assert_allclose(ours.weights, theirs.weights, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ours.heatmaps, theirs.heatmaps, rtol=1e-4, atol=1e-5)


def test_no_broadcast_batch_matmul_forward_or_backward(case):
    """The graph audit of tests/test_known_issues.py, through the chunk loop and its gradient."""
    from test_known_issues import _matmul_problems

    model, _, images, _ = case
    x = tf.constant(images)
    for method in _METHODS:
        cam = method(model, "features", batch_size=2)

        @tf.function
        def gradient(x, cam=cam):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(cam.compute(x, target=tf_gradcam.TopK(2)).heatmaps)
            return tape.gradient(loss, x)

        graph = gradient.get_concrete_function(x).graph
        assert _matmul_problems(graph, set()) == [], method.__name__
