"""DetectionTarget: one detection's class logits summed over the raw predictions on its box.

Every expected number comes from a computation that does not go through the
target: IoUs and sums worked out by hand on made-up raw outputs, and, on
keras-hub detectors with random weights, anchors, box decoding and IoUs
recomputed in NumPy from the formulas of keras-hub's `AnchorGenerator` and
`decode_deltas_to_boxes`, with Grad-CAM's weights and map from a
`tf.GradientTape` over the detector's feature pyramid and heads called by hand.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_gradcam
from tf_gradcam import DetectionTarget, GradCAM, TargetError

keras_hub = pytest.importorskip("keras_hub")

# ------------------------------------------------------ hand-made raw outputs
#
# Four anchors (yxyx: top, left, bottom, right) in a 20x40 image (height x width)
# and their offsets in RetinaNet's "center_xywh" encoding (dx, dy, dw, dh):
# decoded centre = (dx·w_a + cx_a, dy·h_a + cy_a), size = (exp(dw)·w_a, exp(dh)·h_a).
#
#   anchor             offsets            decoded box         IoU with BOX [0, 0, 10, 20]
#   a0 [0, 0, 10, 20]  0                  [0, 0, 10, 20]      1
#   a1 [0, 0, 20, 10]  0                  [0, 0, 20, 10]      100 / 300 = 1/3
#   a2 [10, 10, 20, 30] (-0.5, -0.9, 0, 0) [1, 0, 11, 20]     180 / 220 = 9/11
#   a3 [0, 2, 10, 22]  (1, 0, 0, 0)       [0, 22, 10, 42]     0   (the anchor itself: 9/11)
#
# At iou=0.5 the decoded boxes of a0 and a2 match. Read as xyxy (left, top,
# right, bottom), BOX is a1's region instead; the anchors (not the decoded
# boxes) match at a0 and a3.

HEIGHT, WIDTH = 20, 40
BOX = np.array([0.0, 0.0, 10.0, 20.0])
ANCHORS = np.array([[0, 0, 10, 20], [0, 0, 20, 10], [10, 10, 20, 30], [0, 2, 10, 22]], np.float32)
DELTAS = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [-0.5, -0.9, 0, 0], [1, 0, 0, 0]], np.float32)
# logits[a, c]; class 1 is explained
LOGITS = np.array([[0.3, 1.5], [0.7, -2.0], [-1.0, 0.5], [2.0, 3.0]], np.float32)
IOUS = np.array([1.0, 1 / 3, 9 / 11, 0.0])


def _anchor_outputs(batch: int = 1) -> dict:
    return {
        "bbox_regression": tf.constant(np.repeat(DELTAS[None], batch, 0)),
        "cls_logits": tf.constant(np.repeat(LOGITS[None], batch, 0)),
    }


def _hand_target(box=BOX, class_index=1, **kwargs) -> DetectionTarget:
    kwargs.setdefault("image_shape", (HEIGHT, WIDTH))
    return DetectionTarget(box, class_index, bounding_box_format="yxyx", anchors=ANCHORS, **kwargs)


def test_hand_made_anchor_outputs_match_by_the_decoded_boxes_iou():
    target = _hand_target()
    outputs = _anchor_outputs()
    np.testing.assert_allclose(target.ious(outputs).numpy()[0], IOUS, atol=1e-6)
    np.testing.assert_array_equal(target.matches(outputs).numpy()[0], [True, False, True, False])
    # y^1 = 1.5 + 0.5: the logits (not probabilities) of a0 and a2
    np.testing.assert_allclose(target(outputs).numpy(), [2.0], atol=1e-6)


@pytest.mark.parametrize(
    ("iou", "matched", "score"),
    [(0.9, [0], 1.5), (0.8, [0, 2], 2.0), (0.3, [0, 1, 2], 0.0), (1 / 3 - 1e-4, [0, 1, 2], 0.0)],
)
def test_the_iou_threshold_decides_which_predictions_count(iou, matched, score):
    target = _hand_target(iou=iou)
    outputs = _anchor_outputs()
    expected = np.zeros(4, bool)
    expected[matched] = True
    np.testing.assert_array_equal(target.matches(outputs).numpy()[0], expected)
    np.testing.assert_allclose(target(outputs).numpy(), [score], atol=1e-6)


def test_max_reduction_is_the_largest_matching_logit():
    outputs = _anchor_outputs()
    np.testing.assert_allclose(_hand_target(reduction="max")(outputs).numpy(), [1.5], atol=1e-6)
    # class 0: matches a0 (0.3) and a2 (-1.0)
    np.testing.assert_allclose(_hand_target(class_index=0, reduction="max")(outputs), [0.3])
    np.testing.assert_allclose(_hand_target(class_index=0)(outputs).numpy(), [-0.7], atol=1e-6)


def test_per_image_boxes_and_classes():
    # image 0: BOX, class 1 -> a0 + a2 = 2.0; image 1: a3's decoded box, class 0 -> 2.0
    # (its IoU with a0..a2 is 0: it lies right of x = 22)
    boxes = np.stack([BOX, [0.0, 22.0, 10.0, 42.0]])
    target = _hand_target(boxes, np.array([1, 0]))
    outputs = _anchor_outputs(batch=2)
    np.testing.assert_array_equal(
        target.matches(outputs).numpy(), [[True, False, True, False], [False, False, False, True]]
    )
    np.testing.assert_allclose(target(outputs).numpy(), [2.0, 2.0], atol=1e-6)


@pytest.mark.parametrize(
    ("box_format", "box"),
    [
        ("xyxy", [0, 0, 20, 10]),
        ("xywh", [0, 0, 20, 10]),
        ("center_xywh", [10, 5, 20, 10]),
        ("center_yxhw", [5, 10, 10, 20]),
        ("rel_yxyx", [0, 0, 0.5, 0.5]),
        ("rel_xyxy", [0, 0, 0.5, 0.5]),
    ],
)
def test_the_box_is_read_in_the_given_format(box_format, box):
    """The same region (rows 0..10, columns 0..20 of a 20x40 image) in every format."""
    anchors = keras.utils.bounding_boxes.convert_format(
        ANCHORS, source="yxyx", target=box_format, height=HEIGHT, width=WIDTH
    )
    target = DetectionTarget(
        box, 1, bounding_box_format=box_format, anchors=anchors, image_shape=(HEIGHT, WIDTH)
    )
    np.testing.assert_allclose(target.ious(_anchor_outputs()).numpy()[0], IOUS, atol=1e-6)
    np.testing.assert_allclose(target(_anchor_outputs()).numpy(), [2.0], atol=1e-6)


def test_query_outputs_use_their_own_relative_boxes():
    """D-FINE-style outputs: (cx, cy, w, h) as fractions of the 20x40 image, one per query.

    q0 (0.25, 0.25, 0.5, 0.5) -> x 0..20, y 0..10: BOX itself, IoU 1.
    q1 (0.5, 0.5, 0.5, 0.5)   -> x 10..30, y 5..15: 10·5 / (400 − 50) = 1/7.
    q2 (0.3, 0.3, 0.5, 0.5)   -> x 2..22, y 1..11: 18·9 / (400 − 162) = 162/238.
    """
    outputs = {
        "pred_boxes": tf.constant(
            [[[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5], [0.3, 0.3, 0.5, 0.5]]]
        ),
        "logits": tf.constant([[[0.0, 1.25], [0.0, 4.0], [0.0, -0.5]]]),
    }
    target = DetectionTarget(BOX, 1, bounding_box_format="yxyx", image_shape=(HEIGHT, WIDTH))
    np.testing.assert_allclose(target.ious(outputs).numpy()[0], [1.0, 1 / 7, 162 / 238], atol=1e-6)
    np.testing.assert_allclose(target(outputs).numpy(), [0.75], atol=1e-6)


def test_no_match_gives_zero_when_not_strict():
    target = _hand_target([10.0, 30.0, 20.0, 40.0], strict=False)  # bottom-right corner
    np.testing.assert_allclose(target(_anchor_outputs()).numpy(), [0.0])
    np.testing.assert_allclose(
        _hand_target([10.0, 30.0, 20.0, 40.0], strict=False, reduction="max")(_anchor_outputs()),
        [0.0],
    )


# ----------------------------------------------------------------- bad input


def test_a_box_no_prediction_matches_is_a_target_error_naming_the_best_iou():
    # a2's decoded box one row lower: IoU 9/11 with it, 2/3 with a0's, 1/3 with a1's
    target = _hand_target(iou=0.95, box=[2.0, 0.0, 12.0, 20.0])
    with pytest.raises(TargetError, match=r"best IoU .* is 0\.818.*Lower `iou`.*'yxyx'"):
        target(_anchor_outputs())
    with pytest.raises(TargetError, match="matches no raw prediction"):
        target.matches(_anchor_outputs())


def test_a_box_in_the_wrong_format_is_named_in_the_error():
    # a3's decoded box written as xyxy (left, top, right, bottom) while the format is yxyx
    target = _hand_target(box=[22.0, 0.0, 42.0, 10.0], iou=0.9)
    with pytest.raises(TargetError, match=r"Read as 'xyxy'.*IoU 1\.000"):
        target(_anchor_outputs())


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ([0.0, 0.0, 10.0], r"4 numbers .* Received: shape \(3,\)"),
        (np.zeros((2, 2, 4)), r"Received: shape \(2, 2, 4\)"),
        ([0.0, 0.0, np.nan, 10.0], "non-finite"),
        ([10.0, 0.0, 0.0, 20.0], r"no area as a 'yxyx' box \(top, left, bottom, right\)"),
        (["a", "b", "c", "d"], "4 numbers"),
    ],
)
def test_a_box_of_the_wrong_shape_is_a_target_error(box, message):
    with pytest.raises(TargetError, match=message):
        _hand_target(box=box)


def test_bad_arguments_are_target_errors():
    with pytest.raises(TargetError, match=r"class_index` 2 is out of range.*2 classes"):
        _hand_target(class_index=2)(_anchor_outputs())
    with pytest.raises(TargetError, match="must be >= 0"):
        _hand_target(class_index=-2)
    with pytest.raises(TargetError, match="-1, the label a detector's `predict` gives"):
        _hand_target(class_index=np.array([1, -1]))
    with pytest.raises(TargetError, match=r"`iou` must be in \(0, 1\]"):
        _hand_target(iou=0.0)
    with pytest.raises(TargetError, match="'sum' or 'max'"):
        _hand_target(reduction="mean")
    with pytest.raises(TargetError, match="unknown bounding box format 'yxhw'"):
        DetectionTarget(BOX, 1, bounding_box_format="yxhw")
    with pytest.raises(TargetError, match="pass `detector=`"):
        DetectionTarget(BOX, 1)
    with pytest.raises(TargetError, match="need the anchors"):
        DetectionTarget(BOX, 1, bounding_box_format="yxyx")(_anchor_outputs())
    with pytest.raises(TargetError, match=r"raw outputs, a dict with \['bbox_regression'"):
        _hand_target()(tf.zeros((1, 4, 2)))
    with pytest.raises(TargetError, match="hold 3 raw predictions but the anchors number 4"):
        _hand_target()({k: v[:, :3] for k, v in _anchor_outputs().items()})
    with pytest.raises(TargetError, match="relative format 'rel_yxyx' need the image size"):
        DetectionTarget(BOX, 1, bounding_box_format="rel_yxyx")


# ------------------------------------------------- a keras-hub RetinaNet, random weights

SIZE, CLASSES = 64, 3
LAYER = "retina_net_backbone/backbone/stack2_block0_out"  # the encoder's P4 output


@pytest.fixture(scope="module")
def retinanet() -> keras.Model:
    """ResNet (P2..P4) -> FPN P3, P4 -> heads; 9 anchors per location, 720 in all at 64x64."""
    keras.utils.set_random_seed(0)
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
    model = keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone, num_classes=CLASSES, pre_logits_num_conv_layers=1, preprocessor=None
    )
    # keras-hub 0.32 initialises the *box* head's bias to the focal-loss prior
    # (−4.6): every box would shrink to 1% far up-left. Zero it so that the
    # decoded boxes lie near their anchors, as in a trained detector.
    for weight in model.box_head.weights:
        if "bias" in weight.path:
            weight.assign(np.zeros(weight.shape, np.float32))
    return model


def _numpy_anchors(levels=(3, 4), scales=3, ratios=(0.5, 1.0, 2.0), anchor_size=4.0) -> np.ndarray:
    """keras-hub's AnchorGenerator, written out: (n, 4) xyxy, level, then row, column, anchor."""
    out = []
    for level in levels:
        cells = int(np.ceil(SIZE / 2**level))
        stride = SIZE // cells
        sizes = np.array([int(2**level * anchor_size * 2 ** (s / scales)) for s in range(scales)])
        heights = np.sqrt(ratios)[:, None] * sizes[None]  # (ratio, scale)
        widths = (1 / np.sqrt(ratios))[:, None] * sizes[None]
        base = np.round(
            np.stack([-widths.ravel(), -heights.ravel(), widths.ravel(), heights.ravel()], 1) / 2
        )
        cy, cx = np.meshgrid(np.arange(cells) * stride, np.arange(cells) * stride, indexing="ij")
        shifts = np.stack([cx.ravel(), cy.ravel(), cx.ravel(), cy.ravel()], 1)
        out.append((shifts[:, None] + base[None]).reshape(-1, 4))
    return np.concatenate(out).astype(np.float64)


def _numpy_decode(deltas: np.ndarray, anchors_xyxy: np.ndarray) -> np.ndarray:
    """center_xywh offsets -> xyxy boxes, float64."""
    w = anchors_xyxy[:, 2] - anchors_xyxy[:, 0]
    h = anchors_xyxy[:, 3] - anchors_xyxy[:, 1]
    cx = anchors_xyxy[:, 0] + w / 2
    cy = anchors_xyxy[:, 1] + h / 2
    d = deltas.astype(np.float64)
    bx, by = d[..., 0] * w + cx, d[..., 1] * h + cy
    bw, bh = np.exp(d[..., 2]) * w, np.exp(d[..., 3]) * h
    return np.stack([bx - bw / 2, by - bh / 2, bx + bw / 2, by + bh / 2], -1)


def _numpy_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes (n, 4) with one xyxy box (4,)."""
    wh = np.clip(np.minimum(boxes[:, 2:], box[2:]) - np.maximum(boxes[:, :2], box[:2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + (box[2] - box[0]) * (box[3] - box[1]) - inter)


def _detections(raw: dict, cls: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the yxyx box of the highest-scoring in-image prediction of `cls`, and the
    (batch, n) NumPy match mask at IoU >= 0.5, with no IoU within 1e-3 of the threshold."""
    decoded = _numpy_decode(raw["bbox_regression"].numpy(), _numpy_anchors())
    logits = raw["cls_logits"].numpy()[..., cls]
    boxes, masks = [], []
    for i in range(len(decoded)):
        inside = np.all((decoded[i] >= 0) & (decoded[i] <= SIZE), axis=1)
        big = np.min(decoded[i][:, 2:] - decoded[i][:, :2], axis=1) > 8
        for a in np.argsort(-np.where(inside & big, logits[i], -np.inf)):
            ious = _numpy_iou(decoded[i], decoded[i, a])
            if np.abs(ious - 0.5).min() > 1e-3:
                break
        boxes.append(decoded[i, a][[1, 0, 3, 2]])  # xyxy -> the detector's yxyx
        masks.append(ious >= 0.5)
    return np.array(boxes, np.float32), np.array(masks)


def test_numpy_anchors_are_keras_hub_s(retinanet):
    generated = retinanet.anchor_generator(np.zeros((SIZE, SIZE, 3), np.float32))
    yxyx = np.concatenate([np.asarray(v) for v in generated.values()])
    np.testing.assert_array_equal(yxyx[:, [1, 0, 3, 2]], _numpy_anchors())


def test_retinanet_gradcam_equals_a_tape_over_the_pyramid_and_heads(retinanet):
    x = np.random.default_rng(0).random((2, SIZE, SIZE, 3), dtype=np.float32)
    raw = retinanet(x)
    cls = 1
    boxes, masks = _detections(raw, cls)
    assert masks.sum(axis=1).min() >= 1 and masks.sum() >= 3  # several anchors per detection
    target = DetectionTarget(boxes, cls, detector=retinanet)
    np.testing.assert_array_equal(target.matches(raw).numpy(), masks)
    expected_scores = (raw["cls_logits"].numpy()[..., cls] * masks).sum(axis=1)
    np.testing.assert_allclose(target(raw).numpy(), expected_scores, rtol=1e-6, atol=1e-6)

    result = GradCAM(retinanet, LAYER)(x, target=target)

    # the reference: the encoder's features, P4 watched, FPN and heads called by hand
    features = retinanet.backbone.get_layer("backbone")([x])
    fpn = retinanet.backbone.get_layer("fpn")
    with tf.GradientTape() as tape:
        tape.watch(features["P4"])
        pyramid = fpn(features)
        logits = tf.concat(
            [
                tf.reshape(retinanet.classification_head(pyramid[level]), (2, -1, CLASSES))
                for level in ("P3", "P4")
            ],
            axis=1,
        )
        score = tf.reduce_sum(logits[..., cls] * masks, axis=1)
    gradients = tape.gradient(score, features["P4"]).numpy()
    alpha = gradients.mean(axis=(1, 2))
    raw_map = np.einsum("bhwc,bc->bhw", features["P4"].numpy(), alpha)
    np.testing.assert_allclose(result.scores, score.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.weights, alpha, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.raw_maps, raw_map, rtol=1e-5, atol=1e-5)
    assert np.abs(raw_map).max() > 1e-3
    assert result.classes is None


def test_retinanet_bad_targets(retinanet):
    x = np.random.default_rng(1).random((1, SIZE, SIZE, 3), dtype=np.float32)
    with pytest.raises(TargetError, match=r"`class_index` 3 is out of range.*3 classes"):
        DetectionTarget([0, 0, 32, 32], 3, detector=retinanet)
    with pytest.raises(TargetError, match=r"Received: shape \(2,\)"):
        DetectionTarget([0, 0], 0, detector=retinanet)
    far = DetectionTarget([-90.0, -90.0, -80.0, -80.0], 0, detector=retinanet)
    with pytest.raises(TargetError, match=r"matches no raw prediction .* best IoU .* is 0\.000"):
        far(retinanet(x))
    # Inside the compiled step the same check is an assertion; the engine re-raises it typed.
    with pytest.raises(TargetError, match=r"^DetectionTarget: .*matches no raw prediction"):
        GradCAM(retinanet, LAYER)(x, target=far)


# ---------------------------------------------------- a keras-hub D-FINE, random weights


@pytest.fixture(scope="module")
def dfine() -> keras.Model:
    from keras_hub.src.models.hgnetv2.hgnetv2_backbone import HGNetV2Backbone

    keras.utils.set_random_seed(0)
    encoder = HGNetV2Backbone(
        stem_channels=[3, 8, 8],
        stackwise_stage_filters=[
            [8, 8, 16, 1, 1, 3],
            [16, 8, 32, 1, 1, 3],
            [32, 16, 64, 1, 1, 3],
            [64, 16, 64, 1, 1, 3],
        ],
        apply_downsample=[False, True, True, True],
        use_lightweight_conv_block=[False, False, True, True],
        depths=[1, 1, 1, 1],
        hidden_sizes=[16, 32, 64, 64],
        embedding_size=8,
        use_learnable_affine_block=True,
        hidden_act="relu",
        image_shape=(SIZE, SIZE, 3),
        out_features=["stage3", "stage4"],
    )
    backbone = keras_hub.models.DFineBackbone(
        backbone=encoder,
        decoder_in_channels=[32, 32],
        encoder_hidden_dim=32,
        num_denoising=0,
        num_labels=CLASSES,
        hidden_dim=32,
        learn_initial_query=False,
        num_queries=10,
        anchor_image_size=(SIZE, SIZE),
        feat_strides=[16, 32],
        num_feature_levels=2,
        encoder_in_channels=[64, 64],
        encode_proj_layers=[1],
        num_attention_heads=2,
        encoder_ffn_dim=32,
        num_encoder_layers=1,
        hidden_expansion=0.34,
        depth_multiplier=0.5,
        eval_idx=-1,
        num_decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=32,
        decoder_n_points=[2, 2],
        lqe_hidden_dim=8,
        num_lqe_layers=1,
        out_features=["stage3", "stage4"],
        image_shape=(SIZE, SIZE, 3),
    )
    return keras_hub.models.DFineObjectDetector(backbone=backbone, num_classes=CLASSES)


def _dfine_box_and_mask(raw: dict) -> tuple[np.ndarray, np.ndarray]:
    """Query 4's box (yxyx pixels) and the NumPy IoU >= 0.5 mask of image 0."""
    cx, cy, w, h = (raw["pred_boxes"].numpy()[0].astype(np.float64) * SIZE).T
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    mask = _numpy_iou(xyxy, xyxy[4]) >= 0.5
    return xyxy[4][[1, 0, 3, 2]].astype(np.float32), mask


def test_dfine_raw_outputs_match_by_the_queries_boxes(dfine):
    x = np.random.default_rng(2).random((1, SIZE, SIZE, 3), dtype=np.float32)
    raw = dfine(x)
    box, mask = _dfine_box_and_mask(raw)
    target = DetectionTarget(box, 2, detector=dfine)
    np.testing.assert_array_equal(target.matches(raw).numpy()[0], mask)
    expected = (raw["logits"].numpy()[0, :, 2] * mask).sum()
    np.testing.assert_allclose(target(raw).numpy(), [expected], rtol=1e-6, atol=1e-6)


def test_dfine_gradcam_equals_a_tape_over_the_backbones_own_graph(dfine):
    """D-FINE's encoder takes keyword arguments mixing tensors and Python values: the
    gradient graph passes the tensors alone through its wrapper. Its maps equal a tape
    over `keras.Model(backbone.input, [layer.output, backbone.output])`, run by Keras."""
    x = np.random.default_rng(2).random((2, SIZE, SIZE, 3), dtype=np.float32)
    raw = dfine(x)
    box, _ = _dfine_box_and_mask(raw)
    target = DetectionTarget(box, 2, detector=dfine)
    layer = "encoder_input_proj_bn_1"
    result = GradCAM(dfine, f"{dfine.backbone.name}/{layer}")(x, target=target)

    backbone = dfine.backbone
    inner = keras.Model(backbone.input, [backbone.get_layer(layer).output, backbone.output])
    with tf.GradientTape() as tape:
        activations, outputs = inner(x, training=False)
        tape.watch(activations)
        score = target(
            {
                "logits": outputs["intermediate_logits"][:, -1],
                "pred_boxes": outputs["intermediate_reference_points"][:, -1],
            }
        )
    gradients = tape.gradient(score, activations).numpy()
    alpha = gradients.mean(axis=(1, 2))
    raw_map = np.einsum("bhwc,bc->bhw", activations.numpy(), alpha)
    np.testing.assert_allclose(score.numpy(), target(raw).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.scores, score.numpy(), rtol=1e-5, atol=1e-5)
    # random weights give small gradients: compared relative to their largest value
    for got, want in ((result.weights, alpha), (result.raw_maps, raw_map)):
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_exported_from_the_package_with_a_short_repr():
    assert tf_gradcam.DetectionTarget is DetectionTarget
    assert "DetectionTarget" in tf_gradcam.__all__
    assert repr(_hand_target()) == (
        "DetectionTarget(box=[0.0, 0.0, 10.0, 20.0] (yxyx), class_index=1, iou=0.5)"
    )


def test_the_default_layer_of_a_detector_is_not_its_shared_head(retinanet):
    """The box and class heads run once per pyramid level: no single activation. The
    default is the last feature map called once; its score is the detection's."""
    gradcam = GradCAM(retinanet)
    assert "head" not in gradcam.layer
    x = np.random.default_rng(0).random((2, SIZE, SIZE, 3), dtype=np.float32)
    raw = retinanet(x)
    boxes, masks = _detections(raw, 1)
    result = gradcam(x, target=DetectionTarget(boxes, 1, detector=retinanet))
    expected = (raw["cls_logits"].numpy()[..., 1] * masks).sum(axis=1)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-5)
