"""Explanation losses against an independent float64 NumPy re-implementation.

Each loss's value and its gradient with respect to every weight of a tiny model
must equal central finite differences of the NumPy model (forward pass, the
derivatives of the scores by hand, Grad-CAM's eqs. 1–2, area averaging, the
loss) in float64. The model uses tanh and a linear head so that the second
derivatives the losses need are not piecewise constant. TensorFlow computes in
float32 (the engine casts maps to float32), so the documented bound is a
relative error (max-norm) of 1e-4 against the float64 reference
(measured: at most 4e-7).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from tf_gradcam.errors import InputError, NotSpatialError
from tf_gradcam.explanation_losses import (
    NO_MASK,
    GradCAMMassLoss,
    HINTLoss,
    RRRLoss,
    area_average,
    label_classes,
    prepare_masks,
)

CLASSES = 3
TOLERANCE = 1e-4


def _tiny_model() -> keras.Model:
    """x (8×8×2) → 2×2/2 conv, tanh ('features', 4×4) → 1×1 conv, tanh → GAP → Dense, softmax."""
    inputs = keras.Input((8, 8, 2))
    features = layers.Conv2D(4, 2, strides=2, activation="tanh", name="features")(inputs)
    hidden = layers.Conv2D(3, 1, activation="tanh", name="hidden")(features)
    pooled = layers.GlobalAveragePooling2D()(hidden)
    return keras.Model(inputs, layers.Dense(CLASSES, activation="softmax", name="head")(pooled))


def _batch():
    """Four images, labels, masks: image 2 unannotated, the others soft masks in [0, 1]."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 8, 8, 2)).astype(np.float32)
    labels = np.array([0, 2, 1, 1])
    masks = np.zeros((4, 8, 8), np.float32)
    masks[0, :4, :3] = 1.0
    masks[1] = rng.random((8, 8))
    masks[2] = NO_MASK
    masks[3, 5:, 2:7] = 0.7
    return x, labels, masks


# ----------------------------------------------------------------- the NumPy reference


def _forward(x: np.ndarray, w: list[np.ndarray]) -> dict[str, np.ndarray]:
    k1, b1, k2, b2, wd, bd = w
    n = x.shape[0]
    patches = x.reshape(n, 4, 2, 4, 2, 2).transpose(0, 1, 3, 2, 4, 5)  # (n, i, j, a, b, c)
    a = np.tanh(np.einsum("nijabc,abck->nijk", patches, k1) + b1)
    b = np.tanh(a @ k2[0, 0] + b2)
    z = b.mean(axis=(1, 2)) @ wd + bd
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    # dz_k/dA_ijq = Σ_m (1 − B²)_ijm K2[q, m] Wd[m, k] / Z
    dz_da = np.einsum("nijm,qm,mk->nijqk", 1.0 - b**2, k2[0, 0], wd) / 16.0
    return {"a": a, "z": z, "p": p, "dz_da": dz_da, "k1": k1}


def _raw_maps(f: dict, classes: np.ndarray, score: str) -> np.ndarray:
    rows = np.arange(len(classes))
    scores = f["dz_da"][rows, :, :, :, classes]  # (n, i, j, q): ∂z_c/∂A
    if score == "log_probability":  # ∂ log p_c/∂A = ∂z_c/∂A − Σ_k p_k ∂z_k/∂A
        scores = scores - np.einsum("nijqk,nk->nijq", f["dz_da"], f["p"])
    alpha = scores.mean(axis=(1, 2))  # eq. 1
    return np.einsum("nijq,nq->nij", f["a"], alpha)  # eq. 2 before the ReLU


def _widen(masks: np.ndarray, margin: int) -> np.ndarray:
    out = masks.copy()
    for r in range(masks.shape[1]):
        for c in range(masks.shape[2]):
            rows = slice(max(r - margin, 0), r + margin + 1)
            columns = slice(max(c - margin, 0), c + margin + 1)
            out[:, r, c] = masks[:, rows, columns].max(axis=(1, 2))
    return out


def _blocks(masks: np.ndarray) -> np.ndarray:
    """8×8 → 4×4 by the mean of each 2×2 block (area averaging on a dividing grid)."""
    return masks.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4))


def _per_image(name: str, x, classes, masks, w, score="log_probability", margin=0):
    f = _forward(x, w)
    if name == "rrr":
        k = CLASSES
        df_dz = 1.0 - k * f["p"]  # ∂/∂z Σ_k log p_k
        df_da = np.einsum("nijqk,nk->nijq", f["dz_da"], df_dz)
        df_dpre = (1.0 - f["a"] ** 2) * df_da
        df_dpatch = np.einsum("abcq,nijq->nijabc", f["k1"], df_dpre)
        grad = df_dpatch.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape)
        return np.sum((masks[..., None] * grad) ** 2, axis=(1, 2, 3))
    raw = _raw_maps(f, classes, score)
    if name == "mass":
        maps = np.maximum(raw, 0.0)
        region = _blocks(_widen(masks, margin))
        return (maps * region).sum((1, 2)) / maps.sum((1, 2))
    human = _blocks(masks).reshape(len(x), -1)
    network = raw.reshape(len(x), -1)
    ranked = human[:, :, None] > human[:, None, :]
    hinge = np.maximum(network[:, None, :] - network[:, :, None], 0.0)
    return (ranked * hinge).sum((1, 2)) / ranked.sum((1, 2))


def _reference_loss(name, x, labels, masks, w, weight, **options) -> float:
    annotated = (masks >= 0).any(axis=(1, 2))
    values = _per_image(
        name, x[annotated], labels[annotated], np.clip(masks[annotated], 0, 1), w, **options
    )
    return weight * values.mean()


def _finite_differences(fn, weights: list[np.ndarray], step: float = 1e-6) -> list[np.ndarray]:
    grads = []
    for position, value in enumerate(weights):
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            plus = [w.copy() for w in weights]
            minus = [w.copy() for w in weights]
            plus[position][index] += step
            minus[position][index] -= step
            grad[index] = (fn(plus) - fn(minus)) / (2 * step)
        grads.append(grad)
    return grads


CASES = [
    ("mass", GradCAMMassLoss, {"layer": "features"}, {}),
    ("mass", GradCAMMassLoss, {"layer": "features", "score": "logit"}, {"score": "logit"}),
    ("mass", GradCAMMassLoss, {"layer": "features", "margin": 1}, {"margin": 1}),
    ("hint", HINTLoss, {"layer": "features"}, {}),
    ("hint", HINTLoss, {"layer": "features", "score": "logit"}, {"score": "logit"}),
    ("rrr", RRRLoss, {}, {}),
]


@pytest.mark.parametrize(("name", "cls", "kwargs", "options"), CASES)
def test_value_and_weight_gradients_equal_float64_finite_differences(name, cls, kwargs, options):
    """Loss and ∂loss/∂θ for every weight equal the NumPy float64 reference (rel. error ≤ 1e-3)."""
    model = _tiny_model()
    x, labels, masks = _batch()
    weights = [w.astype(np.float64) for w in model.get_weights()]
    x64 = x.astype(np.float64)
    loss = cls(weight=1.5, **kwargs)

    def reference(w):
        return _reference_loss(name, x64, labels, masks, w, 1.5, **options)

    expected_grads = _finite_differences(reference, weights)
    with tf.GradientTape() as tape:
        value = loss(model, x, labels, masks)
    grads = tape.gradient(value, model.trainable_variables)
    np.testing.assert_allclose(float(value), reference(weights), rtol=1e-5)
    scale = max(np.abs(g).max() for g in expected_grads)
    assert scale > 1e-6  # the reference is not trivially zero
    variables = model.trainable_variables
    for variable, got, expected in zip(variables, grads, expected_grads, strict=True):
        got = np.zeros(expected.shape) if got is None else got.numpy()
        error = np.abs(got - expected).max() / scale
        assert error <= TOLERANCE, f"{variable.path}: relative error {error:.2e}"


def test_the_gradient_is_the_same_inside_a_compiled_function():
    """Under tf.function (a tf.cond around the loss) the weight gradients equal eager ones."""
    model = _tiny_model()
    x, labels, masks = _batch()
    loss = GradCAMMassLoss(layer="features", weight=1.0)

    def gradients():
        with tf.GradientTape() as tape:
            value = loss(model, tf.constant(x), tf.constant(labels), tf.constant(masks))
        return tape.gradient(value, model.trainable_variables[:4])

    for eager, compiled in zip(gradients(), tf.function(gradients)(), strict=True):
        np.testing.assert_allclose(compiled.numpy(), eager.numpy(), rtol=1e-5, atol=1e-7)


def test_mass_of_a_map_entirely_inside_the_mask_is_one():
    """A mask covering the whole image holds all the mass: the loss is the weight itself."""
    model = _tiny_model()
    x, labels, _ = _batch()
    masks = np.ones((4, 8, 8), np.float32)
    value = GradCAMMassLoss(layer="features", weight=2.5)(model, x, labels, masks)
    np.testing.assert_allclose(float(value), 2.5, rtol=1e-6)


def test_no_annotated_image_gives_zero_and_no_gradient_of_the_loss():
    """A batch whose masks are all NO_MASK (or NaN) gives loss 0 and zero gradients."""
    model = _tiny_model()
    x, labels, _ = _batch()
    masks = np.full((4, 8, 8), NO_MASK, np.float32)
    masks[1] = np.nan
    for loss in (GradCAMMassLoss(layer="features"), HINTLoss(layer="features"), RRRLoss()):
        with tf.GradientTape() as tape:
            value = loss(model, x, labels, masks)
        grads = tape.gradient(value, model.trainable_variables)
        assert float(value) == 0.0
        assert all(g is None or not np.any(g.numpy()) for g in grads)


def test_rrr_equals_an_independent_tape_on_the_models_probabilities():
    """RRR on a Dense-only model equals Σ (A · ∂/∂x Σ_k log p_k)² from the softmax outputs."""
    inputs = keras.Input((6, 5, 2))
    hidden = layers.Dense(7, activation="tanh")(layers.Flatten()(inputs))
    model = keras.Model(inputs, layers.Dense(4, activation="softmax")(hidden))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 6, 5, 2)).astype(np.float32)
    masks = rng.random((3, 6, 5)).astype(np.float32)
    value = RRRLoss(weight=0.5)(model, x, np.array([0, 3, 1]), masks)
    images = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(images)
        summed = tf.reduce_sum(tf.math.log(model(images)), axis=-1)
    grads = tape.gradient(summed, images).numpy()
    expected = 0.5 * np.mean(np.sum((masks[..., None] * grads) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(float(value), expected, rtol=1e-4)


def test_sigmoid_activation_uses_per_label_log_sigmoid():
    """With activation='sigmoid', RRR differentiates Σ_k log σ(z_k) (multi-label heads)."""
    inputs = keras.Input((4, 4, 1))
    model = keras.Model(inputs, layers.Dense(3, activation="sigmoid")(layers.Flatten()(inputs)))
    x = np.random.default_rng(4).standard_normal((2, 4, 4, 1)).astype(np.float32)
    masks = np.ones((2, 4, 4), np.float32)
    value = RRRLoss(activation="sigmoid")(model, x, np.array([0, 1]), masks)
    kernel = model.layers[-1].kernel.numpy()  # (16, 3)
    probabilities = model(x).numpy()
    # ∂/∂x Σ_k log σ(z_k) = Σ_k (1 − σ(z_k)) W[:, k]
    grads = (1.0 - probabilities) @ kernel.T
    np.testing.assert_allclose(float(value), np.mean(np.sum(grads**2, axis=1)), rtol=1e-4)


def test_grad_cam_losses_need_a_feature_map():
    """A Grad-CAM loss on a model without a spatial layer raises NotSpatialError; RRR works."""
    inputs = keras.Input((6, 5, 2))
    model = keras.Model(inputs, layers.Dense(3, activation="softmax")(layers.Flatten()(inputs)))
    x = np.zeros((2, 6, 5, 2), np.float32)
    masks = np.ones((2, 6, 5), np.float32)
    for loss in (GradCAMMassLoss(), HINTLoss()):
        with pytest.raises(NotSpatialError):
            loss(model, x, np.array([0, 1]), masks)
    assert np.isfinite(float(RRRLoss()(model, x, np.array([0, 1]), masks)))


def test_masks_are_clipped_and_negative_or_nan_count_as_zero():
    """prepare_masks clips to [0, 1], sets negatives and NaN to 0, flags all-negative masks."""
    masks = np.array(
        [
            [[2.0, -3.0], [np.nan, 0.5]],  # annotated: values 1, 0, 0, 0.5
            [[NO_MASK] * 2] * 2,  # unannotated
            [[np.nan] * 2] * 2,  # unannotated
            [[0.0] * 2] * 2,  # annotated, nothing marked
        ],
        np.float32,
    )
    clean, annotated = prepare_masks(masks, np.zeros((4, 2, 2, 3), np.float32))
    np.testing.assert_array_equal(annotated.numpy(), [True, False, False, True])
    np.testing.assert_array_equal(clean.numpy()[0], [[1.0, 0.0], [0.0, 0.5]])
    assert not np.any(clean.numpy()[1:])


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((4, 8, 8, 2), "Received: masks of shape (4, 8, 8, 2)"),
        ((4, 64), "Received: masks of shape (4, 64)"),
        ((4, 8, 6), "The masks are 8x6 but the images are 8x8"),
    ],
)
def test_masks_of_the_wrong_rank_or_size_raise_input_error(shape, message):
    """Wrong rank or size: InputError naming the shapes received."""
    model = _tiny_model()
    x, labels, _ = _batch()
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GradCAMMassLoss(layer="features")(model, x, labels, np.zeros(shape, np.float32))


def test_a_trailing_mask_axis_of_one_is_accepted():
    """(batch, height, width, 1) masks give the same loss as (batch, height, width)."""
    model = _tiny_model()
    x, labels, masks = _batch()
    loss = GradCAMMassLoss(layer="features")
    np.testing.assert_allclose(
        float(loss(model, x, labels, masks[..., None])), float(loss(model, x, labels, masks))
    )


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: GradCAMMassLoss(weight=-1.0), "Received: weight=-1.0"),
        (lambda: RRRLoss(weight=float("nan")), "Received: weight=nan"),
        (lambda: HINTLoss(weight=float("inf")), "Received: weight=inf"),
        (lambda: GradCAMMassLoss(weight="1"), "Received: weight='1'"),
        (lambda: GradCAMMassLoss(score="probability"), "Received: score='probability'"),
        (lambda: GradCAMMassLoss(margin=-2), "Received: margin=-2"),
        (lambda: RRRLoss(activation="relu"), "Received: activation='relu'"),
    ],
)
def test_bad_options_raise_value_error(factory, message):
    """Negative or non-finite weights and unknown options: ValueError naming the value."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        factory()


def test_area_average_is_tensorflows_area_resize_and_block_means():
    """area_average equals tf.image.resize(method='area'), and block means on dividing grids."""
    masks = np.random.default_rng(0).random((3, 32, 28)).astype(np.float32)
    for size in [(8, 7), (5, 9), (3, 3)]:
        expected = tf.image.resize(masks[..., None], size, method="area")[..., 0]
        np.testing.assert_allclose(area_average(masks, size), expected, atol=1e-6)
    blocks = masks.reshape(3, 8, 4, 7, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(area_average(masks, (8, 7)), blocks, atol=1e-6)


def test_label_classes_from_sparse_and_one_hot_labels():
    """Sparse (batch,), (batch, 1) and one-hot (batch, classes) labels give the same classes."""
    classes = np.array([2, 0, 1])
    for labels in (classes, classes[:, None].astype(np.float32), np.eye(3)[classes]):
        np.testing.assert_array_equal(label_classes(labels).numpy(), classes)
    with pytest.raises(InputError, match="Received: labels of shape"):
        label_classes(np.zeros((3, 2, 2)))


@pytest.mark.parametrize(
    "loss",
    [GradCAMMassLoss(layer="features", margin=1), HINTLoss(layer="features"), RRRLoss()],
    ids=["mass", "hint", "rrr"],
)
def test_no_broadcast_batch_matmul_in_the_loss_or_its_weight_gradient(loss):
    """The traced loss and its second-order weight gradient avoid the oneDNN-broken op.

    A batched matmul with a broadcast size-1 batch axis is wrong on AVX-512 with 2+ threads
    (docs/known-issues.md); the check reads the traced ops, so it does not depend on the CPU.
    """
    from test_known_issues import _matmul_problems

    model = _tiny_model()
    x, labels, masks = _batch()

    @tf.function
    def gradient(images):
        with tf.GradientTape() as tape:
            value = loss(model, images, labels, masks)
        return tape.gradient(value, model.trainable_variables[:4])

    graph = gradient.get_concrete_function(tf.constant(x)).graph
    assert _matmul_problems(graph, set()) == []
