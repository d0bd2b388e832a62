"""SegmentationTarget: a segmenter's class logits summed over a region (Seg-Grad-CAM).

Every expected number comes from a computation that does not go through the
engine: a `tf.GradientTape` over the keras-hub models' backbone and head
called by hand (DeepLabV3, SegFormer), or, for a hand-built segmenter whose
head is a 1x1 convolution, the closed form of Grad-CAM's weights and map.

For a head `L_c = Σ_k W_kc A^k + b_c` (1x1 convolution, logits) and the score
`y = Σ_ij M_ij L_c,ij`, `∂y/∂A^k_ij = M_ij W_kc`, so Grad-CAM's weights are
`α_k = W_kc · ΣM / (h·w)` and its map `Σ_k α_k A^k = mean(M) · (L_c − b_c)`:
the class's logit map (bias removed) scaled by the region's share of the
image. HiResCAM's map is `Σ_k M_ij W_kc A^k_ij = M · (L_c − b_c)`.
"""

from __future__ import annotations

import glob

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_deeplabv3, make_segformer
from keras import layers

import tf_gradcam
from tf_gradcam import (
    GradCAM,
    GradCAMCallback,
    GuidedGradCAM,
    SegmentationTarget,
    TargetError,
    explain,
    explain_dataset,
)
from tf_gradcam.methods import METHODS

SIZE, FEATURES, CLASSES = 8, 4, 3

# ----------------------------------------------------------- a hand-built segmenter


def _segmenter(classes: int = CLASSES, activation: str = "softmax") -> keras.Model:
    """Conv(3x3, relu, 'features') -> Conv(1x1, 'head', softmax): per-pixel class scores."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((SIZE, SIZE, 3))
    a = layers.Conv2D(
        FEATURES,
        3,
        padding="same",
        activation="relu",
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=1),
        name="features",
    )(inputs)
    # seeds for which every class wins some pixels of every test image
    head_init = keras.initializers.RandomNormal(stddev=1.0, seed=0)
    scores = layers.Conv2D(
        classes,
        1,
        activation=activation,
        kernel_initializer=head_init,
        bias_initializer=keras.initializers.RandomNormal(stddev=0.1, seed=4),
        name="head",
    )(a)
    return keras.Model(inputs, scores, name="segmenter")


def _closed_form(model: keras.Model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, logits, W, b) of the hand-built segmenter, the logits in float64 by NumPy."""
    features = keras.Model(model.input, model.get_layer("features").output)(x)
    a = np.asarray(features, np.float64)
    kernel, bias = (np.asarray(w, np.float64) for w in model.get_layer("head").get_weights())
    weights = kernel[0, 0]  # (features, classes)
    return a, a @ weights + bias, weights, bias


@pytest.fixture
def x() -> np.ndarray:
    """Three random 8x8 images in [-2, 2]."""
    return (np.random.default_rng(2).random((3, SIZE, SIZE, 3), dtype=np.float32) - 0.5) * 4


def _region() -> np.ndarray:
    """An asymmetric rectangle: a transposed or flipped mask is another region."""
    region = np.zeros((SIZE, SIZE), bool)
    region[1:4, 2:7] = True
    return region


def _balanced_class(logits: np.ndarray) -> int:
    """The class whose argmax region is largest in the image where it is smallest."""
    winners = logits.argmax(-1)
    counts = np.stack([(winners == c).sum(axis=(1, 2)) for c in range(logits.shape[-1])])
    best = int(np.argmax(counts.min(axis=1)))
    assert counts[best].min() > 0 and counts[best].max() < winners[0].size
    return best


def test_one_by_one_head_gives_the_closed_form_weights_and_map(x):
    """Mask region: α_k = W_kc · ΣM/(hw), map = mean(M)·(L_c − b_c), score Σ M·L_c."""
    model = _segmenter()
    _, logits, kernel, bias = _closed_form(model, x)
    region = _region()
    for c in range(CLASSES):
        result = GradCAM(model, "features")(x, target=SegmentationTarget(c, region))
        share = region.sum() / region.size
        np.testing.assert_allclose(result.weights, np.tile(kernel[:, c] * share, (3, 1)), atol=1e-6)
        np.testing.assert_allclose(
            result.raw_maps, share * (logits[..., c] - bias[c]), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            result.scores, (logits[..., c] * region).sum(axis=(1, 2)), rtol=1e-5, atol=1e-5
        )
        assert result.classes is None


def test_argmax_region_and_per_image_classes_give_the_closed_form(x):
    """mask=None: M = [argmax_classes L = c], from the model's logits, per image."""
    model = _segmenter()
    _, logits, kernel, bias = _closed_form(model, x)
    classes = np.array([0, 2, 1])
    target = SegmentationTarget(classes)
    result = GradCAM(model, "features")(x, target=target)
    regions = logits.argmax(-1) == classes[:, None, None]
    np.testing.assert_array_equal(target.region(model(x)).numpy(), regions)
    fixed = SegmentationTarget(0, _region()).region(model(x)).numpy()
    np.testing.assert_array_equal(fixed, np.broadcast_to(_region(), (3, SIZE, SIZE)))
    for i, c in enumerate(classes):
        region = logits[i].argmax(-1) == c
        assert 0 < region.sum() < region.size, "the test needs a proper region"
        share = region.mean()
        np.testing.assert_allclose(result.weights[i], kernel[:, c] * share, atol=1e-6)
        np.testing.assert_allclose(
            result.raw_maps[i], share * (logits[i, ..., c] - bias[c]), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(result.scores[i], (logits[i, ..., c] * region).sum(), rtol=1e-5)


def test_per_image_masks_and_hirescam_map_is_the_masked_logit_map(x):
    """HiResCAM: Σ_k M W_kc A^k = M·(L_c − b_c), one mask per image."""
    model = _segmenter()
    _, logits, _kernel, bias = _closed_form(model, x)
    masks = np.zeros((3, SIZE, SIZE), np.float32)
    masks[0, :3, :] = 1
    masks[1, :, 5:] = 1
    masks[2, 2:6, 1:4] = 1
    target = SegmentationTarget(1, masks)
    result = explain(model, x, target, "features", method="hirescam")
    expected = masks * (logits[..., 1] - bias[1])
    np.testing.assert_allclose(result.raw_maps, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.scores, (masks * logits[..., 1]).sum(axis=(1, 2)), rtol=1e-5)


def test_logits_not_probabilities_under_a_softmax_head(x):
    """The trailing softmax is removed (`logits=True`); `logits=False` sums probabilities."""
    model = _segmenter()
    _, logits, _, _ = _closed_form(model, x)
    region = _region()
    target = SegmentationTarget(2, region)
    scores = GradCAM(model, "features")(x, target).scores
    np.testing.assert_allclose(scores, (logits[..., 2] * region).sum(axis=(1, 2)), rtol=1e-5)
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    raw = GradCAM(model, "features", logits=False)(x, target).scores
    np.testing.assert_allclose(raw, (probabilities[..., 2] * region).sum(axis=(1, 2)), rtol=1e-5)


def test_one_sigmoid_channel_region_is_the_positive_logits(x):
    """Binary segmentation (one sigmoid channel): mask=None is the pixels with logit > 0."""
    model = _segmenter(classes=1, activation="sigmoid")
    _, logits, kernel, _ = _closed_form(model, x)
    region = logits[..., 0] > 0
    assert region.any() and not region.all()
    result = GradCAM(model, "features")(x, SegmentationTarget(0))
    np.testing.assert_allclose(
        result.scores, (logits[..., 0] * region).sum(axis=(1, 2)), rtol=1e-5, atol=1e-5
    )
    share = region.mean(axis=(1, 2))
    np.testing.assert_allclose(result.weights, share[:, None] * kernel[:, 0], atol=1e-6)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_cam_method_takes_it(method, x):
    """Each CAM method: finite maps of the image's size and the region score as `scores`."""
    model = _segmenter()
    _, logits, _, _ = _closed_form(model, x)
    region = _region()
    target = SegmentationTarget(0, region)
    result = explain(model, x, target, "features", method=method)
    assert result.heatmaps.shape == (3, SIZE, SIZE)
    assert np.all(np.isfinite(result.heatmaps))
    np.testing.assert_allclose(
        result.scores, (logits[..., 0] * region).sum(axis=(1, 2)), rtol=1e-5, atol=1e-5
    )


def test_guided_gradcam_is_the_hand_guided_backprop_times_the_map(x):
    """Guided backprop by hand: ∂y/∂relu = M·W_c, passed where z > 0 and the gradient > 0."""
    model = _segmenter()
    _, logits, kernel, _ = _closed_form(model, x)
    region = _region()
    c = 1
    result = GuidedGradCAM(model, "features")(x, SegmentationTarget(c, region))
    conv = model.get_layer("features")
    inputs = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        z = tf.nn.conv2d(inputs, conv.kernel, 1, "SAME") + conv.bias
    g = np.broadcast_to(region[None, ..., None] * kernel[:, c], z.shape)
    guided = np.where((z.numpy() > 0) & (g > 0), g, 0.0).astype(np.float32)
    backprop = tape.gradient(z, inputs, output_gradients=tf.constant(guided)).numpy()
    np.testing.assert_allclose(result.backprop, backprop, rtol=1e-5, atol=1e-6)
    cam = GradCAM(model, "features")(x, SegmentationTarget(c, region))
    np.testing.assert_allclose(result.cam.heatmaps, cam.heatmaps, atol=1e-6)
    np.testing.assert_allclose(
        result.gradients, backprop * cam.heatmaps[..., None], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(result.scores, (logits[..., c] * region).sum(axis=(1, 2)), rtol=1e-5)


def test_one_of_several_outputs(x):
    """`output=` picks the per-pixel output of a model that also classifies."""
    base = _segmenter()
    features = base.get_layer("features").output
    pooled = layers.Dense(2, name="classify")(layers.GlobalAveragePooling2D()(features))
    model = keras.Model(base.input, [pooled, base.output])
    _, logits, _, _ = _closed_form(base, x)
    region = _region()
    result = GradCAM(model, "features")(x, SegmentationTarget(2, region, output=1))
    np.testing.assert_allclose(result.scores, (logits[..., 2] * region).sum(axis=(1, 2)), rtol=1e-5)
    with pytest.raises(TargetError, match=r"needs per-pixel class scores.*\(None, 2\)"):
        GradCAM(model, "features")(x, SegmentationTarget(0, region, output=0))


def test_reused_target_compiles_once(x):
    model = _segmenter()
    cam = GradCAM(model, "features")
    target = SegmentationTarget(1)
    cam(x, target)
    cam(x[:2], target)
    assert cam.trace_count == 1


# ------------------------------------------------------ the callback and explain_dataset


def test_explain_dataset_maps_equal_a_direct_call(x):
    model = _segmenter()
    region = _region()
    for target in (SegmentationTarget(2, region), SegmentationTarget(0)):
        seen = []
        data = np.concatenate([x, x[::-1], x[:1]])  # 7 images in batches of 3
        explain_dataset(
            model, data, target, "features", batch_size=3, on_batch=seen.append, verbose=0
        )
        direct = GradCAM(model, "features")(data, target)
        assert [len(b.images) for b in seen] == [3, 3, 1]
        for name in ("heatmaps", "raw_maps", "scores"):
            joined = np.concatenate([getattr(b.explanation, name) for b in seen])
            np.testing.assert_allclose(joined, getattr(direct, name), rtol=1e-5, atol=1e-6)


def _events(log_dir) -> dict:
    """{(step, tag): value} of the callback's event files."""
    found = {}
    for path in sorted(glob.glob(str(log_dir / "gradcam" / "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                found[(event.step, value.tag)] = value
    return found


def test_callback_logs_the_region_score_and_the_maps_masses(tmp_path, x):
    """At each epoch end: the table's score is Σ M·L_c, the mass that of GradCAM's maps."""
    model = _segmenter()
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    images = rng.random((12, SIZE, SIZE, 3), dtype=np.float32)
    labels = rng.integers(0, CLASSES, (12, SIZE, SIZE))
    region = _region()
    right = np.zeros((SIZE, SIZE), bool)
    right[:, 4:] = True
    target = SegmentationTarget(1, region)
    callback = GradCAMCallback(
        x, log_dir=tmp_path, target=target, layer="features", regions={"right": right}
    )
    weights = []
    spy = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: weights.append(model.get_weights())
    )
    history = model.fit(
        images, labels, epochs=2, batch_size=6, callbacks=[callback, spy], verbose=0
    )
    events = _events(tmp_path)
    for epoch, epoch_weights in enumerate(weights):
        copy = keras.models.clone_model(model)
        copy.set_weights(epoch_weights)
        _, logits, _, _ = _closed_form(copy, x)
        table = events[(epoch, "gradcam/targets")].tensor.string_val[0].decode()
        rows = [line.split("|") for line in table.splitlines()[2:]]
        logged = np.array([float(row[3]) for row in rows])
        expected = (logits[..., 1] * region).sum(axis=(1, 2))
        np.testing.assert_allclose(logged, expected, rtol=5e-4)  # 4 significant digits
        heatmaps = GradCAM(copy, "features")(x, target).heatmaps
        mass = np.mean((heatmaps * right).sum((1, 2)) / heatmaps.sum((1, 2)))
        np.testing.assert_allclose(history.history["gradcam/right_mass"][epoch], mass, rtol=1e-5)
    assert weights[0][0].tolist() != weights[1][0].tolist()  # the epochs differ


# ----------------------------------------------------------------- keras-hub models


def _deeplab(activation: str | None = "softmax") -> keras.Model:
    return make_deeplabv3(activation)


def _tape_reference(features_fn, head_fn, x, c, region_fn):
    """Grad-CAM by hand: weights, raw maps and scores from a tape at `features_fn(x)`."""
    with tf.GradientTape() as tape:
        features = features_fn(x)
        tape.watch(features)
        logits = tf.cast(head_fn(features), tf.float32)
        region = tf.constant(region_fn(logits.numpy()), tf.float32)
        score = tf.reduce_sum(logits[..., c] * region, axis=[1, 2])
    gradients = tape.gradient(score, features).numpy()
    alpha = gradients.mean(axis=(1, 2))
    raw = np.einsum("bhwk,bk->bhw", features.numpy(), alpha)
    return alpha, raw, score.numpy()


def test_deeplabv3_softmax_head_mask_and_argmax_regions_equal_the_tape():
    """keras-hub DeepLabV3 with a softmax head: logits summed over the region, as a tape."""
    model = _deeplab("softmax")
    head = model.get_layer("segmentation_output")
    assert head.activation.__name__ == "softmax"
    x = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)

    def head_logits(features):  # the head's 1x1 convolution without its softmax
        return tf.einsum("bhwk,kn->bhwn", features, head.kernel[0, 0])

    def features_fn(images):
        return model.backbone(images, training=False)

    logits = head_logits(features_fn(x)).numpy()
    c = _balanced_class(logits)
    mask = np.zeros((64, 64), np.float32)
    mask[8:40, 16:56] = 1.0
    cases = {
        "mask": (SegmentationTarget(c, mask), lambda out: np.broadcast_to(mask, out.shape[:3])),
        "argmax": (SegmentationTarget(c), lambda out: out.argmax(-1) == c),
    }
    cam = GradCAM(model)
    assert cam.layer.endswith("backbone_output_upsampling")
    for name, (target, region_fn) in cases.items():
        result = cam(x, target)
        alpha, raw, score = _tape_reference(features_fn, head_logits, x, c, region_fn)
        np.testing.assert_allclose(result.weights, alpha, atol=1e-5, rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(result.raw_maps, raw, atol=1e-5, rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(result.scores, score, rtol=1e-5, err_msg=name)
        assert np.abs(raw).max() > 1e-3, name
    # the scores are logits: the probabilities' sum over the region is another number
    probabilities = tf.nn.softmax(logits).numpy()
    assert not np.allclose(
        result.scores, (probabilities[..., c] * (logits.argmax(-1) == c)).sum((1, 2))
    )


def _segformer(levels: int = 1) -> keras.Model:
    return make_segformer(levels)


def test_segformer_decoder_map_equals_the_tape():
    """keras-hub SegFormer: the decoder's fused map (8x8), logits resized to 32x32 by the model."""
    model = _segformer(levels=1)
    x = np.random.default_rng(1).random((2, 32, 32, 3), dtype=np.float32)

    def features_fn(images):
        return model.backbone(images, training=False)

    def head_fn(features):
        return model.resizing(model.output_segmentation_head(features))

    logits = head_fn(features_fn(x)).numpy()
    c = _balanced_class(logits)
    mask = np.zeros((32, 32), bool)
    mask[4:20, 10:30] = True
    cam = GradCAM(model, model.backbone.name)
    for target, region_fn in (
        (SegmentationTarget(c, mask), lambda out: np.broadcast_to(mask, out.shape[:3])),
        (SegmentationTarget(c), lambda out: out.argmax(-1) == c),
    ):
        result = cam(x, target)
        assert result.raw_maps.shape == (2, 8, 8)
        alpha, raw, score = _tape_reference(features_fn, head_fn, x, c, region_fn)
        np.testing.assert_allclose(result.weights, alpha, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(result.raw_maps, raw, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(result.scores, score, rtol=1e-5, atol=1e-5)
        assert np.abs(raw).max() > 1e-3


def test_segformer_with_two_stages_equals_the_tape():
    """Two MiT stages share one Resizing layer (called twice): each call gets its own wrapper."""
    model = _segformer(levels=2)
    x = np.random.default_rng(2).random((2, 32, 32, 3), dtype=np.float32)

    def features_fn(images):
        return model.backbone(images, training=False)

    def head_fn(features):
        return model.resizing(model.output_segmentation_head(features))

    mask = np.zeros((32, 32), bool)
    mask[6:26, 2:18] = True
    result = GradCAM(model, model.backbone.name)(x, SegmentationTarget(1, mask))
    alpha, raw, score = _tape_reference(
        features_fn, head_fn, x, 1, lambda out: np.broadcast_to(mask, out.shape[:3])
    )
    np.testing.assert_allclose(result.weights, alpha, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(result.raw_maps, raw, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(result.scores, score, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_index": -1}, "`class_index` must be >= 0"),
        ({"class_index": 1.5}, "`class_index` must be a non-negative int"),
        ({"class_index": True}, "`class_index` must be a non-negative int"),
        ({"class_index": [[0, 1]]}, "`class_index` must be a non-negative int"),
        ({"class_index": 0, "mask": np.ones(8)}, r"must be \(height, width\).*shape \(8,\)"),
        (
            {"class_index": 0, "mask": np.ones((2, 8, 8, 1))},
            r"drop the last axis: mask\[\.\.\., 0\]",
        ),
        ({"class_index": 0, "mask": np.ones((8, 8, 1))}, r"drop the last axis: mask\[\.\.\., 0\]"),
        ({"class_index": 0, "mask": np.array([["a"]])}, "numeric or bool"),
        ({"class_index": 0, "mask": np.full((8, 8), np.nan)}, "non-finite"),
        ({"class_index": 0, "mask": np.zeros((8, 8))}, "selects no pixel"),
        ({"class_index": 0, "mask": np.stack([np.ones((8, 8)), np.zeros((8, 8))])}, "image 1"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(TargetError, match=message):
        SegmentationTarget(**kwargs)


def test_bad_targets_for_the_model_raise_typed_errors(x, images, cnn):
    model = _segmenter()
    cam = GradCAM(model, "features")
    with pytest.raises(TargetError, match=r"mask` is 6x8.*scores are 8x8.*resize"):
        cam(x, SegmentationTarget(0, np.ones((6, 8))))
    with pytest.raises(TargetError, match=r"`class_index` 3 is out of range.*3 classes"):
        cam(x, SegmentationTarget(3))
    with pytest.raises(TargetError, match=r"\(batch, height, width, classes\).*\(None, 3\)"):
        GradCAM(cnn, "last_conv")(images, SegmentationTarget(0))
    with pytest.raises(TargetError, match="one output"):
        cam(x, SegmentationTarget(0, output=1))
    with pytest.raises(TargetError, match=r"^SegmentationTarget: .*one region per image"):
        cam(x, SegmentationTarget(0, np.ones((2, SIZE, SIZE))))
    with pytest.raises(TargetError, match=r"^SegmentationTarget: .*one index per image"):
        cam(x, SegmentationTarget([0, 1]))


def test_repr_is_short():
    target = SegmentationTarget(2, np.ones((64, 64)))
    assert repr(target) == "SegmentationTarget(class_index=2, mask=<(64, 64) mask>)"
    assert "per image" in repr(SegmentationTarget([0, 1]))
    assert tf_gradcam.SegmentationTarget is SegmentationTarget
