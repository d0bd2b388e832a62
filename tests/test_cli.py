"""The tf-gradcam command: demo output, explain output confined to --out, safe model loading."""

from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest
from keras import layers

from tf_gradcam import GradCAM, overlay
from tf_gradcam.cli import main
from tf_gradcam.demo_model import load_demo_model
from tf_gradcam.scenes import make_scenes


def test_demo_writes_overlays_whose_heat_is_on_the_objects(tmp_path, capsys):
    """`demo` writes a grid, one overlay per scene, and maps whose peaks hit the objects."""
    assert main(["demo", "--out", str(tmp_path), "--count", "4", "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    assert "demo_grid.png" in printed and str(tmp_path) in printed
    assert (tmp_path / "demo_grid.png").is_file()
    assert len(list(tmp_path.glob("scene_*.png"))) == 4
    maps = np.load(tmp_path / "maps.npy")
    scenes = make_scenes(4, seed=7)
    for i in range(4):  # the map maximum (layer resolution: 4 px cells) lies on the object
        r, c = np.unravel_index(np.argmax(maps[i]), maps[i].shape)
        assert scenes.masks[i, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].any()


def _save_images(tmp_path, images):
    paths = []
    for i, image in enumerate(images):
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(
            str(path), cv2.cvtColor((image * 255).round().astype(np.uint8), cv2.COLOR_RGB2BGR)
        )
        paths.append(str(path))
    return paths


def test_explain_writes_maps_equal_to_the_api_and_only_into_out(tmp_path):
    """`explain` maps equal GradCAM on the decoded images; files land only in --out."""
    model_path = tmp_path / "demo.keras"
    load_demo_model().save(model_path)
    scenes = make_scenes(2, seed=3)
    inputs = tmp_path / "in"
    inputs.mkdir()
    paths = _save_images(inputs, scenes.images)
    out = tmp_path / "out"
    before = set(tmp_path.rglob("*"))
    assert main(["explain", str(model_path), *paths, "--class", "1", "--out", str(out)]) == 0
    created = set(tmp_path.rglob("*")) - before
    assert created and all(out in p.parents or p == out for p in created)
    decoded = np.stack([cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in paths]) / 255.0
    expected = GradCAM(load_demo_model(), "last_conv")(decoded.astype(np.float32), target=1)
    np.testing.assert_allclose(
        np.load(out / "img0_gradcam.npy"), expected.maps[0], rtol=1e-4, atol=1e-5
    )
    written = cv2.cvtColor(cv2.imread(str(out / "img1_gradcam.png")), cv2.COLOR_BGR2RGB)
    rgb = (decoded[1] * 255).round().astype(np.uint8)
    # equal up to colormap quantisation of float32 rounding differences
    np.testing.assert_allclose(written, overlay(rgb, expected.heatmaps[1]), atol=3)


def test_explain_refuses_unsafe_lambda_models_unless_trusted(tmp_path):
    """A .keras file with a Python lambda is refused in safe mode and loads with --trust-model."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Lambda(lambda t: t * 2.0)(inputs)
    x = layers.Conv2D(2, 3, activation="relu")(x)
    model = keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)))
    path = tmp_path / "lambda.keras"
    model.save(path)
    image = _save_images(tmp_path, np.random.default_rng(0).random((1, 8, 8, 3)))
    with pytest.raises(SystemExit, match="safe mode refused"):
        main(["explain", str(path), *image, "--out", str(tmp_path / "o")])
    assert main(["explain", str(path), *image, "--trust-model", "--out", str(tmp_path / "o")]) == 0


def test_explain_refuses_h5_and_unreadable_images(tmp_path):
    """Legacy .h5 models and files that are not images get specific errors."""
    with pytest.raises(SystemExit, match=r"not a \.keras file"):
        main(["explain", str(tmp_path / "model.h5"), "x.png"])
    model_path = tmp_path / "demo.keras"
    load_demo_model().save(model_path)
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    with pytest.raises(SystemExit, match="cannot read image"):
        main(["explain", str(model_path), str(bogus)])


def test_safe_stem_cannot_escape_the_output_folder():
    """Output names derived from hostile input paths stay plain names, unique per run."""
    from tf_gradcam.cli import _safe_stem

    taken: set[str] = set()
    names = [_safe_stem(p, taken) for p in ["../../etc/passwd", "a/b/../..", "x y.png", "x y.png"]]
    assert names == ["passwd", "image", "x_y", "x_y_2"]
    assert all("/" not in n and not n.startswith(".") for n in names)


def test_explain_guided_methods_write_the_api_gradients(tmp_path):
    """--method guided_gradcam writes the GuidedGradCAM gradients and a display PNG."""
    from tf_gradcam import GuidedGradCAM

    model_path = tmp_path / "demo.keras"
    load_demo_model().save(model_path)
    paths = _save_images(tmp_path, make_scenes(1, seed=4).images)
    out = tmp_path / "out"
    args = ["explain", str(model_path), *paths, "--method", "guided_gradcam", "--out", str(out)]
    assert main([*args, "--class", "2"]) == 0
    decoded = cv2.cvtColor(cv2.imread(paths[0]), cv2.COLOR_BGR2RGB)[None] / 255.0
    expected = GuidedGradCAM(load_demo_model(), "last_conv")(decoded.astype(np.float32), target=2)
    written = np.load(out / "img0_guided-gradcam.npy")
    np.testing.assert_allclose(written, expected.gradients[0], rtol=1e-4, atol=1e-6)
    assert cv2.imread(str(out / "img0_guided-gradcam.png")).shape == (64, 64, 3)
