"""Tests for tf_gradcam.scenes and the shipped demo model (tf_gradcam.demo_model)."""

import numpy as np
import pytest

from tf_gradcam.demo_model import DEMO_CLASS_NAMES, DEMO_LAYER_NAME, load_demo_model
from tf_gradcam.scenes import (
    COLORS,
    SHAPE_NAMES,
    caption_vocabulary,
    captions,
    color_questions,
    make_scenes,
)


def _pixels_of_color(images, rgb):
    """Bool (batch, h, w): pixels whose three channels equal `rgb` exactly."""
    return np.all(images == np.asarray(rgb, dtype=np.float32), axis=-1)


def _nonzero_box(mask):
    """Inclusive-exclusive (x0, y0, x1, y1) of a 2-D mask, via np.nonzero."""
    rows, cols = np.nonzero(mask)
    return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1


def test_arrays_have_documented_shapes_dtypes_and_range():
    """Images, labels, per-object arrays and names have the documented shapes and types."""
    scenes = make_scenes(7, size=48, objects=2, seed=0)
    assert scenes.images.shape == (7, 48, 48, 3) and scenes.images.dtype == np.float32
    assert scenes.images.min() >= 0.0 and scenes.images.max() <= 1.0
    assert scenes.labels.shape == (7,) and scenes.labels.dtype == np.int64
    assert scenes.object_shapes.shape == scenes.object_colors.shape == (7, 2)
    assert scenes.boxes.shape == (7, 2, 4) and scenes.boxes.dtype == np.int64
    assert scenes.masks.shape == (7, 2, 48, 48) and scenes.masks.dtype == bool
    assert scenes.class_names == SHAPE_NAMES and scenes.color_names == tuple(COLORS)
    assert len(scenes) == 7


@pytest.mark.parametrize("background", ["plain", "noise"])
@pytest.mark.parametrize("objects", [1, 2, 3])
def test_masks_are_exactly_the_pixels_painted_in_the_object_color(background, objects):
    """Each mask equals the set of pixels holding its object's colour (backgrounds never do)."""
    scenes = make_scenes(40, objects=objects, background=background, seed=1)
    for i in range(len(scenes)):
        for m in range(objects):
            rgb = COLORS[scenes.color_names[scenes.object_colors[i, m]]]
            painted = _pixels_of_color(scenes.images[i], rgb)
            np.testing.assert_array_equal(scenes.masks[i, m], painted)


def test_plain_background_is_grey_outside_objects():
    """On a plain background, every pixel outside all masks is the grey 0.5."""
    scenes = make_scenes(20, objects=2, background="plain", seed=2)
    outside = ~scenes.masks.any(axis=1)
    np.testing.assert_array_equal(scenes.images[outside], 0.5)


def test_boxes_are_tight_bounding_boxes_of_masks():
    """Every box equals the inclusive-exclusive bounding box of its mask from np.nonzero."""
    scenes = make_scenes(60, objects=2, seed=3)
    for i in range(len(scenes)):
        for m in range(2):
            assert tuple(scenes.boxes[i, m]) == _nonzero_box(scenes.masks[i, m])


def test_two_objects_do_not_overlap_and_first_is_left_of_second():
    """In two-object scenes the masks are disjoint and object 0 lies wholly left of object 1."""
    scenes = make_scenes(100, objects=2, seed=4)
    assert not np.any(scenes.masks[:, 0] & scenes.masks[:, 1])
    for i in range(len(scenes)):
        left_cols = np.nonzero(scenes.masks[i, 0])[1]
        right_cols = np.nonzero(scenes.masks[i, 1])[1]
        assert left_cols.max() < right_cols.min()
        assert left_cols.max() < 32 <= right_cols.min()  # each in its own half


def test_objects_in_one_image_have_distinct_shapes_and_colors():
    """No image repeats a shape or a colour among its objects."""
    scenes = make_scenes(100, objects=3, seed=5)
    for shapes, colors in zip(scenes.object_shapes, scenes.object_colors, strict=True):
        assert len(set(shapes)) == 3 and len(set(colors)) == 3


def test_labels_are_the_first_objects_shape():
    """`labels` equals the shape index of object 0 (the leftmost)."""
    scenes = make_scenes(50, objects=2, seed=6)
    np.testing.assert_array_equal(scenes.labels, scenes.object_shapes[:, 0])


def test_drawn_geometry_matches_the_shape_label():
    """Squares fill their box, circles are mirror-symmetric, triangles widen downwards."""
    scenes = make_scenes(150, objects=2, seed=7)
    for i in range(len(scenes)):
        for m in range(2):
            x0, y0, x1, y1 = _nonzero_box(scenes.masks[i, m])
            crop = scenes.masks[i, m, y0:y1, x0:x1]
            widths = crop.sum(axis=1)
            name = scenes.class_names[scenes.object_shapes[i, m]]
            if name == "square":
                assert crop.all() and crop.shape[0] == crop.shape[1]
            elif name == "circle":
                np.testing.assert_array_equal(crop, crop[::-1])
                np.testing.assert_array_equal(crop, crop[:, ::-1])
                assert widths[0] < widths[len(widths) // 2]
            else:
                assert np.all(np.diff(widths) >= 0) and widths[-1] == crop.shape[1]
                assert widths[0] < widths[-1] / 2


def test_object_sizes_and_positions_vary_within_limits():
    """Box sides stay within object_scale * size, and sizes and positions take many values."""
    scenes = make_scenes(200, size=64, object_scale=(0.25, 0.45), seed=8)
    widths = scenes.boxes[:, 0, 2] - scenes.boxes[:, 0, 0]
    heights = scenes.boxes[:, 0, 3] - scenes.boxes[:, 0, 1]
    # a circle of side s spans 2 * ((s - 1) // 2) + 1 <= s pixels, hence the -1
    assert widths.min() >= 16 - 1 and widths.max() <= 29
    assert heights.min() >= 16 - 1 and heights.max() <= 29
    assert len(np.unique(widths)) >= 10
    assert len(np.unique(scenes.boxes[:, 0, 0])) >= 20
    assert len(np.unique(scenes.boxes[:, 0, 1])) >= 20
    assert scenes.boxes[..., :2].min() >= 1 and scenes.boxes[..., 2:].max() <= 63


def test_every_class_and_color_appears_roughly_evenly():
    """Shapes and colours are drawn uniformly: each appears 20-47% / 8-26% of the time."""
    scenes = make_scenes(600, seed=9)
    class_share = np.bincount(scenes.labels, minlength=3) / 600
    color_share = np.bincount(scenes.object_colors.ravel(), minlength=6) / 600
    assert np.all((class_share > 0.20) & (class_share < 0.47))
    assert np.all((color_share > 0.08) & (color_share < 0.26))


def test_same_seed_gives_identical_arrays():
    """Two calls with the same arguments and seed return identical arrays."""
    a = make_scenes(10, objects=2, seed=11)
    b = make_scenes(10, objects=2, seed=11)
    for name in ("images", "labels", "object_shapes", "object_colors", "boxes", "masks"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_different_seed_gives_different_images():
    """A different seed gives different images and different boxes."""
    a = make_scenes(10, seed=11)
    b = make_scenes(10, seed=12)
    assert not np.array_equal(a.images, b.images)
    assert not np.array_equal(a.boxes, b.boxes)


def test_fewer_scenes_are_a_prefix_of_more_with_the_same_seed():
    """Image i depends only on the seed and i: make_scenes(5) is a prefix of make_scenes(20)."""
    small = make_scenes(5, seed=13)
    large = make_scenes(20, seed=13)
    np.testing.assert_array_equal(small.images, large.images[:5])
    np.testing.assert_array_equal(small.masks, large.masks[:5])


def test_shape_and_color_subsets_define_the_indices():
    """`shapes` and `colors` set class_names/color_names and the indices refer to them."""
    scenes = make_scenes(
        40, shapes=("triangle", "square"), colors=("cyan", "red"), background="plain", seed=14
    )
    assert scenes.class_names == ("triangle", "square")
    assert scenes.color_names == ("cyan", "red")
    assert set(scenes.labels.tolist()) == {0, 1}
    for i in range(len(scenes)):
        x0, y0, x1, y1 = scenes.boxes[i, 0]
        is_square = bool(scenes.masks[i, 0, y0:y1, x0:x1].all())
        assert is_square == (scenes.labels[i] == 1)
        rgb = COLORS[("cyan", "red")[scenes.object_colors[i, 0]]]
        assert _pixels_of_color(scenes.images[i], rgb).sum() == scenes.masks[i, 0].sum()


def test_arrays_are_read_only():
    """The frozen Scenes cannot be modified in place."""
    scenes = make_scenes(2, seed=0)
    with pytest.raises(ValueError, match="read-only"):
        scenes.images[0, 0, 0, 0] = 0.0
    with pytest.raises(AttributeError):
        scenes.images = None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "n=0"),
        ({"shapes": ("circle", "hexagon")}, "hexagon"),
        ({"shapes": ("circle", "circle")}, "distinct"),
        ({"colors": ("red", "mauve")}, "mauve"),
        ({"objects": 4}, "objects=4"),
        ({"objects": 2, "colors": ("red",)}, "objects=2"),
        ({"background": "checker"}, "checker"),
        ({"object_scale": (0.5, 0.2)}, "object_scale"),
        ({"size": 16, "objects": 3, "object_scale": (0.4, 0.5)}, "do not fit"),
    ],
)
def test_invalid_arguments_raise_with_the_received_value(kwargs, match):
    """Bad arguments raise ValueError naming the argument and the received value."""
    kwargs = {"n": 2, **kwargs}
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=match):
        make_scenes(n, **kwargs)


def test_multi_hot_marks_exactly_the_shapes_present():
    """multi_hot has a 1 for each object's shape and 0 elsewhere."""
    scenes = make_scenes(30, objects=2, seed=15)
    expected = np.zeros((30, 3), dtype=np.float32)
    for i, shapes in enumerate(scenes.object_shapes):
        expected[i, shapes] = 1.0
    np.testing.assert_array_equal(scenes.multi_hot, expected)
    np.testing.assert_array_equal(scenes.multi_hot.sum(axis=1), 2.0)


def test_captions_name_colors_and_shapes_from_left_to_right():
    """A caption reads "<colour> <shape> left of <colour> <shape>" in left-to-right order."""
    scenes = make_scenes(30, objects=2, background="plain", seed=16)
    vocabulary = caption_vocabulary(scenes)
    for i, text in enumerate(captions(scenes)):
        words = text.split()
        assert set(words) <= set(vocabulary)
        assert words[2:4] == ["left", "of"] and len(words) == 6
        for (color, shape), m in zip([words[0:2], words[4:6]], (0, 1), strict=True):
            # derived from the pixels: the named colour is painted on this object's mask
            painted = _pixels_of_color(scenes.images[i], COLORS[color])
            np.testing.assert_array_equal(painted, scenes.masks[i, m])
            assert shape == scenes.class_names[scenes.object_shapes[i, m]]


def test_caption_of_single_object_and_vocabulary_order():
    """One object is captioned "<colour> <shape>"; the vocabulary is colours, shapes, relation."""
    scenes = make_scenes(1, shapes=("circle",), colors=("blue",), seed=0)
    assert captions(scenes) == ("blue circle",)
    assert caption_vocabulary(scenes) == ("blue", "circle", "left", "of")


def test_color_question_answer_is_the_color_painted_on_the_asked_shape():
    """The answer to "what color is the <shape>?" is the colour found on that shape's pixels."""
    scenes = make_scenes(40, objects=2, background="plain", seed=17)
    questions = color_questions(scenes, seed=3)
    assert len(questions.text) == 40 and set(questions.object_index.tolist()) == {0, 1}
    for i, text in enumerate(questions.text):
        shape = text.removeprefix("what color is the ").removesuffix("?")
        assert shape == scenes.class_names[questions.asked_shapes[i]]
        m = int(np.nonzero(scenes.object_shapes[i] == questions.asked_shapes[i])[0][0])
        assert m == questions.object_index[i]
        answer_rgb = COLORS[scenes.color_names[questions.answers[i]]]
        painted = scenes.images[i][scenes.masks[i, m]]
        np.testing.assert_array_equal(painted, np.broadcast_to(answer_rgb, painted.shape))


def test_demo_model_loads_safely_and_classifies_fresh_scenes():
    """The shipped model loads with safe_mode and gets >= 90% on unseen scenes (seed 1234)."""
    model = load_demo_model()
    assert model.get_layer(DEMO_LAYER_NAME).output.shape == (None, 16, 16, 32)
    assert model.layers[-1].get_config()["activation"] == "softmax"
    scenes = make_scenes(64, seed=1234)  # training used seeds 0-2
    assert scenes.class_names == DEMO_CLASS_NAMES
    probabilities = np.asarray(model.predict(scenes.images, verbose=0))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    accuracy = np.mean(probabilities.argmax(axis=1) == scenes.labels)
    assert accuracy >= 0.9, f"accuracy {accuracy:.3f}"
