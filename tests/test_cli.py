"""The tf-gradcam command in-process: outputs equal the API, user errors are one line, exit 2.

Start-up behaviour that needs a fresh interpreter (no TensorFlow import for
`--help`, no TensorFlow log lines) is in test_cli_startup.py.
"""

from __future__ import annotations

import json
import logging
import warnings
import zipfile

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from tf_gradcam import GradCAM, TopK, overlay
from tf_gradcam.cli import main
from tf_gradcam.demo_model import load_demo_model
from tf_gradcam.scenes import make_scenes

LABELS = ["cat", "hot dog", "a/b"]  # the last two are not plain file names


def _tiny_model(channels: int = 3, classes: int = 3, size: int = 8) -> keras.Model:
    """Conv2D(relu, 'conv') -> GAP -> Dense(classes) on `(size, size, channels)` images."""
    inputs = keras.Input((size, size, channels))
    x = layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = layers.GlobalAveragePooling2D()(x)
    # mostly positive class weights: every class has some supporting region, no all-zero map
    head_init = keras.initializers.RandomUniform(-0.5, 1.0)
    return keras.Model(inputs, layers.Dense(classes, kernel_initializer=head_init, name="head")(x))


def _save_images(tmp_path, images):
    """Writes float RGB images in [0, 1] as 8-bit RGB PNGs; returns their paths."""
    paths = []
    for i, image in enumerate(images):
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(
            str(path), cv2.cvtColor((image * 255).round().astype(np.uint8), cv2.COLOR_RGB2BGR)
        )
        paths.append(str(path))
    return paths


def _decoded(paths) -> np.ndarray:
    """The PNGs as the float32 batch in [0, 1] that `--preprocess unit` feeds the model."""
    rgb = [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in paths]
    return (np.stack(rgb) / 255.0).astype(np.float32)


def _one_error_line(capsys) -> str:
    """The single line the command printed on stderr (asserting there is exactly one)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("tf-gradcam")
    return lines[0]


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
    decoded = _decoded(paths)
    expected = GradCAM(load_demo_model(), "last_conv")(decoded, target=1)
    np.testing.assert_allclose(
        np.load(out / "img0_gradcam.npy"), expected.maps[0], rtol=1e-4, atol=1e-5
    )
    written = cv2.cvtColor(cv2.imread(str(out / "img1_gradcam.png")), cv2.COLOR_BGR2RGB)
    rgb = (decoded[1] * 255).round().astype(np.uint8)
    # equal up to colormap quantisation of float32 rounding differences
    np.testing.assert_allclose(written, overlay(rgb, expected.heatmaps[1]), atol=3)


def test_explain_guided_methods_write_the_api_gradients(tmp_path):
    """--method guided_gradcam writes the GuidedGradCAM gradients and a display PNG."""
    from tf_gradcam import GuidedGradCAM

    model_path = tmp_path / "demo.keras"
    load_demo_model().save(model_path)
    paths = _save_images(tmp_path, make_scenes(1, seed=4).images)
    out = tmp_path / "out"
    args = ["explain", str(model_path), *paths, "--method", "guided_gradcam", "--out", str(out)]
    assert main([*args, "--class", "2"]) == 0
    expected = GuidedGradCAM(load_demo_model(), "last_conv")(_decoded(paths), target=2)
    written = np.load(out / "img0_guided-gradcam.npy")
    np.testing.assert_allclose(written, expected.gradients[0], rtol=1e-4, atol=1e-6)
    assert cv2.imread(str(out / "img0_guided-gradcam.png")).shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("method", "token", "cls"),
    [("Grad-CAM++", "gradcampp", "GradCAMPlusPlus"), ("eigencam", "eigencam", "EigenCAM")],
)
def test_explain_cam_methods_write_that_methods_maps(tmp_path, method, token, cls):
    """--method takes any CAM method name; the .npy holds that method's layer-resolution map."""
    import tf_gradcam

    model_path = tmp_path / "demo.keras"
    load_demo_model().save(model_path)
    paths = _save_images(tmp_path, make_scenes(1, seed=4).images)
    out = tmp_path / "out"
    args = ["explain", str(model_path), *paths, "--method", method, "--out", str(out)]
    assert main([*args, "--class", "2"]) == 0
    expected = getattr(tf_gradcam, cls)(load_demo_model(), "last_conv")(_decoded(paths), target=2)
    written = np.load(out / f"img0_{token}.npy")
    np.testing.assert_allclose(written, expected.maps[0], rtol=1e-4, atol=1e-5)
    plain = tf_gradcam.GradCAM(load_demo_model(), "last_conv")(_decoded(paths), target=2)
    assert np.abs(plain.maps[0] / plain.maps[0].max() - written / written.max()).max() > 1e-2


def test_safe_stem_cannot_escape_the_output_folder():
    """Output names derived from hostile input paths stay plain names, unique per run."""
    from tf_gradcam.cli import _safe_stem

    taken: set[str] = set()
    names = [_safe_stem(p, taken) for p in ["../../etc/passwd", "a/b/../..", "x y.png", "x y.png"]]
    assert names == ["passwd", "image", "x_y", "x_y_2"]
    assert all("/" not in n and not n.startswith(".") for n in names)


# ------------------------------------------------------------------ model files


def test_explain_refuses_unsafe_lambda_models_unless_trusted(tmp_path, capsys):
    """A .keras file with a Python lambda is refused in safe mode and loads with --trust-model."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Lambda(lambda t: t * 2.0)(inputs)
    x = layers.Conv2D(2, 3, activation="relu")(x)
    model = keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)))
    path = tmp_path / "lambda.keras"
    model.save(path)
    image = _save_images(tmp_path, np.random.default_rng(0).random((1, 8, 8, 3)))
    assert main(["explain", str(path), *image, "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys)
    assert "safe mode refused" in line and "--trust-model" in line and "lambda.keras" in line
    assert main(["explain", str(path), *image, "--trust-model", "--out", str(tmp_path / "o")]) == 0


@pytest.mark.parametrize("suffix", [".h5", ".hdf5"])
def test_hdf5_models_load_only_with_trust_model(tmp_path, capsys, suffix):
    """Legacy HDF5 files are refused with the reason; with --trust-model the maps equal the API."""
    model = _tiny_model()
    path = tmp_path / f"legacy{suffix}"
    model.save(path)
    paths = _save_images(tmp_path, np.random.default_rng(1).random((1, 8, 8, 3)))
    out = tmp_path / "out"
    args = ["explain", str(path), *paths, "--class", "2", "--out", str(out)]
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert f"legacy{suffix}" in line and "safe mode cannot protect" in line
    assert "--trust-model" in line
    assert not out.exists()
    assert main([*args, "--trust-model"]) == 0
    expected = GradCAM(model, "conv")(_decoded(paths), target=2)
    assert expected.maps[0].max() > 0
    np.testing.assert_allclose(
        np.load(out / "img0_gradcam.npy"), expected.maps[0], rtol=1e-5, atol=1e-6
    )


def _broken_model(tmp_path, kind: str) -> tuple[str, list[str]]:
    """A model path that cannot be loaded, and the extra flags of the call."""
    good = tmp_path / "good.keras"
    _tiny_model().save(good)
    data = good.read_bytes()
    if kind == "missing":
        return str(tmp_path / "missing.keras"), []
    if kind == "folder":
        (tmp_path / "folder.keras").mkdir()
        return str(tmp_path / "folder.keras"), []
    if kind == "random":
        path = tmp_path / "random.keras"
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
        return str(path), []
    if kind == "truncated":
        path = tmp_path / "truncated.keras"
        path.write_bytes(data[: len(data) // 2])
        return str(path), []
    if kind == "zip-not-keras":
        path = tmp_path / "notkeras.keras"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("config.json", "{not json")
        return str(path), []
    if kind == "suffix":
        path = tmp_path / "model.pb"
        path.write_bytes(data)
        return str(path), []
    h5 = tmp_path / "good.h5"
    _tiny_model().save(h5)
    path = tmp_path / f"{kind}.h5"
    blob = h5.read_bytes()
    path.write_bytes(
        np.random.default_rng(0).bytes(len(blob)) if kind == "random-h5" else blob[: len(blob) // 2]
    )
    return str(path), ["--trust-model"]


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("missing", "No such file"),
        ("folder", "is a folder"),
        ("random", "corrupt or truncated"),
        ("truncated", "corrupt or truncated"),
        ("zip-not-keras", "cannot load model"),
        ("suffix", "not a model file"),
        ("random-h5", "not an HDF5 file"),
        ("truncated-h5", "truncated file"),
    ],
)
def test_unloadable_model_files_are_one_line_errors(tmp_path, capsys, kind, problem):
    """Missing, corrupt and truncated model files: one line naming file and problem, exit 2."""
    model, flags = _broken_model(tmp_path, kind)
    image = _save_images(tmp_path, np.random.default_rng(2).random((1, 8, 8, 3)))
    assert main(["explain", model, *image, *flags, "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys)
    assert repr(model) in line and problem in line


# ------------------------------------------------------------------ other user errors


def _user_error_case(tmp_path, case: str) -> list[str]:
    """Arguments of an `explain` call that is wrong in the way `case` names."""
    model = tmp_path / "m.keras"
    _tiny_model().save(model)
    image = _save_images(tmp_path, np.random.default_rng(3).random((1, 8, 8, 3)))[0]
    base = ["explain", str(model), image, "--out", str(tmp_path / "o")]
    if case == "class":
        return [*base, "--class", "3"]
    if case == "layer":
        return [*base, "--layer", "nope"]
    if case == "top-k":
        return [*base, "--top-k", "4"]
    if case == "image-missing":
        return ["explain", str(model), str(tmp_path / "none.png")]
    if case == "image-not-image":
        (tmp_path / "notes.png").write_text("not an image")
        return ["explain", str(model), str(tmp_path / "notes.png")]
    if case == "out-is-file":
        return ["explain", str(model), image, "--out", image]
    if case == "labels-missing":
        return [*base, "--labels", str(tmp_path / "none.txt")]
    if case == "labels-not-strings":
        (tmp_path / "l.json").write_text(json.dumps(["a", 1, "c"]))
        return [*base, "--labels", str(tmp_path / "l.json")]
    if case == "labels-blank-line":
        (tmp_path / "l.txt").write_text("a\n\nc\n")
        return [*base, "--labels", str(tmp_path / "l.txt")]
    if case == "channels":
        _tiny_model(channels=4).save(model)
        return base
    assert case == "not-an-image-model"
    inputs = keras.Input((5,))
    keras.Model(inputs, layers.Dense(2)(inputs)).save(model)
    return base


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("class", "out of range"),
        ("layer", "No layer 'nope'"),
        ("top-k", "more classes"),
        ("image-missing", "cannot read image"),
        ("image-not-image", "not a PNG/JPEG"),
        ("out-is-file", "is an existing file"),
        ("labels-missing", "cannot read labels file"),
        ("labels-not-strings", "strings only"),
        ("labels-blank-line", "empty name"),
        ("channels", "4 channels"),
        ("not-an-image-model", "one fixed-size image input"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, case, problem):
    """Wrong classes, layers, files and models: one stderr line saying what is wrong, exit 2."""
    assert main(_user_error_case(tmp_path, case)) == 2
    assert problem in _one_error_line(capsys)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["explain"],
        ["explain", "m.keras", "a.png", "--class", "1", "--top-k", "2"],
        ["explain", "m.keras", "a.png", "--alpha", "1.5"],
        ["explain", "m.keras", "a.png", "--method", "nope"],
        ["demo", "--count", "0"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(capsys, args):
    """argparse's usage errors: one line pointing at --help, status 2."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert "--help" in _one_error_line(capsys)


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["explain", "m.keras", "a.png", "--alpha", "5"], "--alpha: must be a number in [0, 1]"),
        (["explain", "m.keras", "a.png", "--alpha", "abc"], "--alpha: must be a number in [0, 1]"),
        (["explain", "m.keras", "a.png", "--alpha", "nan"], "--alpha: must be a number in [0, 1]"),
        (["explain", "m.keras", "a.png", "--top-k", "two"], "--top-k: must be a positive integer"),
        (["demo", "--count", "0"], "--count: must be a positive integer, got '0'"),
        (["demo", "--count", "x"], "--count: must be a positive integer, got 'x'"),
    ],
)
def test_bad_numbers_say_what_is_expected(capsys, args, problem):
    """Out-of-range and non-numeric values: exit 2, the option and its valid range, no internals."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    line = _one_error_line(capsys)
    assert problem in line and f"got {args[-1]!r}" in line
    assert "_unit_float" not in line and "_positive_int" not in line


# ------------------------------------------------------------------ --labels


@pytest.mark.parametrize("form", ["lines", "json"])
def test_labels_name_classes_in_files_table_and_captions(tmp_path, capsys, form):
    """--labels: class names in file names, in the printed table, and on the overlay PNGs."""
    model = _tiny_model()
    model_path = tmp_path / "m.keras"
    model.save(model_path)
    labels = tmp_path / "labels.txt"
    labels.write_text(json.dumps(LABELS) if form == "json" else "\n".join(LABELS) + "\n")
    paths = _save_images(tmp_path, np.random.default_rng(4).random((2, 8, 8, 3)))
    out = tmp_path / "out"
    args = ["explain", str(model_path), *paths, "--top-k", "2", "--out", str(out)]
    assert main([*args, "--labels", str(labels)]) == 0
    printed = capsys.readouterr().out.splitlines()

    decoded = _decoded(paths)
    expected = GradCAM(model, "conv")(decoded, target=TopK(2))
    assert not expected.degenerate.any()
    file_part = {"cat": "cat", "hot dog": "hot_dog", "a/b": "a_b"}
    captions = []
    for i in range(2):
        rgb = (decoded[i] * 255).round().astype(np.uint8)
        for j, c in enumerate(expected.classes[i]):
            label = LABELS[c]
            name = f"img{i}_{file_part[label]}_gradcam"
            np.testing.assert_allclose(
                np.load(out / f"{name}.npy"), expected.maps[i, j], rtol=1e-5, atol=1e-6
            )
            row = next(line for line in printed if f"{name}.png" in line)
            assert row.startswith(paths[i]) and f" {label} " in row
            assert float(row.split()[-2]) == pytest.approx(expected.scores[i, j], rel=1e-3)
            picture = cv2.cvtColor(cv2.imread(str(out / f"{name}.png")), cv2.COLOR_BGR2RGB)
            factor = picture.shape[1] // 8  # small pictures are enlarged for the caption
            assert factor >= 2 and picture.shape[1] == 8 * factor
            image, caption = picture[: 8 * factor], picture[8 * factor :]
            np.testing.assert_allclose(
                image[::factor, ::factor], overlay(rgb, expected.heatmaps[i, j]), atol=3
            )
            assert caption.shape[0] >= 14  # a strip tall enough to read
            assert caption.max() >= 200 and np.median(caption) < 50  # light text on black
            captions.append((label, caption))
    assert len(list(out.glob("*.png"))) == 4
    strips = {label: caption for label, caption in captions}
    assert len(strips) >= 2  # different classes were explained: their captions differ
    first, second = list(strips.values())[:2]
    assert first.shape != second.shape or not np.array_equal(first, second)


def test_labels_must_match_the_number_of_classes(tmp_path, capsys):
    """A label file one name short: one line naming both counts, exit 2, nothing written."""
    model_path = tmp_path / "m.keras"
    _tiny_model(classes=3).save(model_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    image = _save_images(tmp_path, np.random.default_rng(5).random((1, 8, 8, 3)))
    out = tmp_path / "out"
    args = ["explain", str(model_path), *image, "--labels", str(labels), "--out", str(out)]
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert "names 2 classes" in line and "has 3 outputs" in line and "labels.txt" in line
    assert not out.exists()


# ------------------------------------------------------------------ channels


def test_grayscale_model_gets_the_luma_of_rgb_images(tmp_path):
    """A 1-channel model explains an RGB PNG converted with OpenCV's RGB->gray weights."""
    model = _tiny_model(channels=1)
    model_path = tmp_path / "gray.keras"
    model.save(model_path)
    rgb = np.random.default_rng(6).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    path = tmp_path / "colour.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    assert main(["explain", str(model_path), str(path), "--class", "1", "--out", str(out)]) == 0

    luma = rgb.astype(np.float64) @ [0.299, 0.587, 0.114]  # ITU-R BT.601, OpenCV's weights
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    assert np.abs(gray - luma).max() <= 0.5 + 1e-9
    expected = GradCAM(model, "conv")(gray[None, ..., None].astype(np.float32) / 255, target=1)
    assert expected.maps[0].max() > 0
    np.testing.assert_allclose(
        np.load(out / "colour_gradcam.npy"), expected.maps[0], rtol=1e-5, atol=1e-6
    )


def test_grayscale_png_into_an_rgb_model_is_repeated_to_three_channels(tmp_path):
    """A 1-channel PNG fed to an RGB model equals the API on the gray channel repeated thrice."""
    model = _tiny_model(channels=3)
    model_path = tmp_path / "rgb.keras"
    model.save(model_path)
    gray = np.random.default_rng(7).integers(0, 256, (8, 8), dtype=np.uint8)
    path = tmp_path / "gray.png"
    cv2.imwrite(str(path), gray)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).ndim == 2  # really a 1-channel file
    out = tmp_path / "out"
    assert main(["explain", str(model_path), str(path), "--class", "0", "--out", str(out)]) == 0

    three = np.repeat(gray[None, ..., None], 3, axis=-1).astype(np.float32) / 255
    expected = GradCAM(model, "conv")(three, target=0)
    assert expected.maps[0].max() > 0
    np.testing.assert_allclose(
        np.load(out / "gray_gradcam.npy"), expected.maps[0], rtol=1e-5, atol=1e-6
    )


# ------------------------------------------------------------------ Python-side logging


def test_python_side_tensorflow_logging_is_silenced_unless_verbose(
    tmp_path, monkeypatch, caplog, capsys
):
    """absl / tf.get_logger() records and Keras warnings are dropped, unless --verbose."""
    import tf_gradcam.cli as cli

    original = cli._explain_with_method

    def noisy(*args, **kwargs):
        logging.getLogger("absl").warning("absl noise")
        tf.get_logger().warning("tensorflow noise")
        warnings.warn_explicit("keras noise", UserWarning, "keras/src/x.py", 1, module="keras.x")
        return original(*args, **kwargs)

    monkeypatch.setattr(cli, "_explain_with_method", noisy)
    model = tmp_path / "m.keras"
    _tiny_model().save(model)
    image = _save_images(tmp_path, np.random.default_rng(8).random((1, 8, 8, 3)))
    args = ["explain", str(model), *image, "--out", str(tmp_path / "o"), "--overwrite"]
    levels = {name: logging.getLogger(name).level for name in ("absl", "tensorflow")}
    for verbose in (False, True):
        caplog.clear()
        capsys.readouterr()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            assert main([*args, "--verbose"] if verbose else args) == 0
        noise = [r.getMessage() for r in caplog.records if r.name in ("absl", "tensorflow")]
        shown = "tf-gradcam: warning: keras noise" in capsys.readouterr().err.splitlines()
        if verbose:
            assert noise == ["absl noise", "tensorflow noise"] and shown
        else:
            assert noise == [] and not shown
        assert {name: logging.getLogger(name).level for name in levels} == levels  # restored
