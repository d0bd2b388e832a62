"""report and `tf-gradcam report`: the page's data and pictures against NumPy, in Chromium.

The shards come from a hand-built model whose Grad-CAM answer is known in
closed form: a 1×1 convolution with the identity kernel (ReLU) feeds global
average pooling and an identity Dense layer, so class c's score is the mean
of channel c, the predicted class is the channel with the largest mean, and
class c's heatmap is channel c divided by its maximum. Every number the
report shows (scores, classes, correctness, region masses, pictures) is
checked against that, computed from the images with NumPy.

The browser tests drive the system Chromium (`/usr/bin/chromium`) through
the `playwright` package; without either they are skipped, unless
`TF_GRADCAM_REQUIRE_BROWSER=1` (CI), where they fail.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import tf_gradcam.html_report as report_module
from tf_gradcam import GradCAM, InputError, TargetError, explain_dataset, overlay, report
from tf_gradcam.cli import main

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NASTY = "</script><b>\"'&"  # a class name that must stay text
NAMES = ["red", NASTY, "blue"]
COUNT, SIZE, BATCH, PAGE = 40, 16, 16, 12
ZERO = 7  # an all-zero image: all-zero maps, no mass

# the all-zero image's map is all zero by design
pytestmark = pytest.mark.filterwarnings(r"ignore:1 GradCAM map\(s\) .* all zero:RuntimeWarning")


def _channel_model(size: int = SIZE) -> keras.Model:
    """conv = ReLU(identity 1×1) → GAP → identity Dense: y_c = mean(x_c), heatmap_c = x_c / max."""
    inputs = keras.Input((size, size, 3))
    conv = layers.Conv2D(3, 1, use_bias=False, activation="relu", name="conv")
    head = layers.Dense(3, name="head")
    model = keras.Model(inputs, head(layers.GlobalAveragePooling2D()(conv(inputs))))
    conv.set_weights([np.eye(3, dtype=np.float32)[None, None]])
    head.set_weights([np.eye(3, dtype=np.float32), np.zeros(3, np.float32)])
    return model


def _scenes(count: int = COUNT, seed: int = 0) -> dict:
    """Dim noise, a bright 5×5 blob on channel `dominant`, labels wrong on every 4th image."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 0.2, (count, SIZE, SIZE, 3)).astype(np.float32)
    dominant = rng.integers(0, 3, count)
    corners = rng.integers(0, SIZE - 5, (count, 2))
    for i, ((y, x), c) in enumerate(zip(corners, dominant, strict=True)):
        images[i, y : y + 5, x : x + 5, c] += 0.8
    images[ZERO] = 0.0
    dominant[ZERO] = 0  # all scores 0: argmax picks the first class
    labels = np.where(np.arange(count) % 4 == 1, (dominant + 1) % 3, dominant)
    boxes = np.stack([corners[:, 1], corners[:, 0], corners[:, 1] + 5, corners[:, 0] + 5], 1)
    corner = np.zeros((count, SIZE, SIZE), np.float32)
    corner[:, :6, :6] = 1.0
    return {
        "images": images,
        "predicted": dominant,
        "labels": labels,
        "regions": {"blob": boxes, "corner": corner},
    }


def _expected(scenes: dict) -> dict:
    """The report's numbers from the images alone (the model's closed form), in position order."""
    images = scenes["images"].astype(np.float64)
    count = len(images)
    channel = images[np.arange(count), :, :, scenes["predicted"]]  # (count, h, w)
    total = channel.sum(axis=(1, 2))
    boxes = scenes["regions"]["blob"]
    box_masks = np.zeros((count, SIZE, SIZE))
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        box_masks[i, y0:y1, x0:x1] = 1.0
    masses = {}
    for name, masks in (("blob", box_masks), ("corner", scenes["regions"]["corner"])):
        with np.errstate(invalid="ignore"):
            values = (channel * masks).sum(axis=(1, 2)) / total
        masses[name] = [None if t == 0 else float(v) for v, t in zip(values, total, strict=True)]
    return {
        "scores": channel.mean(axis=(1, 2)),
        "classes": scenes["predicted"],
        "correct": (scenes["predicted"] == scenes["labels"]).astype(int),
        "masses": masses,
        "heatmaps": np.divide(
            channel,
            channel.max(axis=(1, 2), keepdims=True),
            where=total[:, None, None] > 0,
            out=np.zeros_like(channel),
        ),
    }


def _page_data(path: Path) -> tuple[dict, list[str]]:
    """The page's JSON data and picture strings, read back from the HTML."""
    text = path.read_text(encoding="utf-8")
    found = {
        name: re.search(rf'<script type="application/json" id="{name}">(.*?)</script>', text, re.S)
        for name in ("report-data", "report-pictures")
    }
    assert all(found.values()), "the page lacks a JSON block"
    return json.loads(found["report-data"][1]), json.loads(found["report-pictures"][1])


def _decode(picture: str) -> np.ndarray:
    """A card's base64 picture as uint8 RGB."""
    data = np.frombuffer(base64.b64decode(picture), np.uint8)
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _assert_masses_close(got: list, expected: list) -> None:
    assert [g is None for g in got] == [e is None for e in expected]
    pairs = [(g, e) for g, e in zip(got, expected, strict=True) if e is not None]
    np.testing.assert_allclose(*zip(*pairs, strict=True), rtol=2e-5, atol=1e-6)


@pytest.fixture(scope="module")
def scenes() -> dict:
    return _scenes()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, scenes) -> Path:
    """The explain_dataset shards of the scenes (3 shards: 16, 16 and 8 images)."""
    folder = tmp_path_factory.mktemp("shards")
    explain_dataset(
        _channel_model(),
        (scenes["images"], scenes["labels"]),
        batch_size=BATCH,
        output_dir=folder,
        verbose=0,
    )
    return folder


@pytest.fixture(scope="module")
def page_file(tmp_path_factory, shards, scenes) -> Path:
    """The report of the shards, 12 cards a page."""
    path = tmp_path_factory.mktemp("report") / "report.html"
    report(
        shards,
        scenes["images"],
        out=path,
        class_names=NAMES,
        regions=scenes["regions"],
        title="Audit </title><script>alert(1)</script>",
        page_size=PAGE,
    )
    return path


# ------------------------------------------------------------------ the data


def test_grad_cam_heatmaps_of_the_model_are_its_channels(scenes):
    """The closed form the tests rely on: heatmap_c = x_c / max x_c and y_c = mean x_c."""
    result = GradCAM(_channel_model(), "conv")(scenes["images"])
    expected = _expected(scenes)
    np.testing.assert_array_equal(result.classes, expected["classes"])
    np.testing.assert_allclose(result.scores, expected["scores"], rtol=1e-5)
    np.testing.assert_allclose(result.heatmaps, expected["heatmaps"], atol=1e-5)


def test_embedded_data_equal_the_numpy_answer(page_file, scenes):
    """Positions, scores, classes, labels, correctness, masses and flat maps, card by card."""
    data, pictures = _page_data(page_file)
    expected = _expected(scenes)
    assert data["index"] == list(range(COUNT)) and len(pictures) == COUNT
    np.testing.assert_allclose(data["score"], expected["scores"], rtol=2e-5, atol=1e-7)
    assert data["classes"] == expected["classes"].tolist()
    assert data["labels"] == scenes["labels"].tolist()
    assert data["correct"] == expected["correct"].tolist()
    assert 0 < sum(data["correct"]) < COUNT  # both kinds are there
    assert data["regions"] == ["blob", "corner"]
    for name, values in zip(data["regions"], data["masses"], strict=True):
        _assert_masses_close(values, expected["masses"][name])
    assert data["flat"] == [int(i == ZERO) for i in range(COUNT)]
    assert data["classNames"] == NAMES
    assert data["pageSize"] == PAGE and data["mime"] == "image/png"


def test_masses_equal_a_recomputation_from_the_shard_arrays(page_file, shards, scenes):
    """Σ heatmap·mask / Σ heatmap from the shards' own heatmaps, region by region."""
    data, _ = _page_data(page_file)
    parts = [np.load(p) for p in sorted(shards.glob("gradcam-*.npz"))]
    heatmaps = np.concatenate([p["heatmaps"] for p in parts]).astype(np.float64)
    assert np.concatenate([p["index"] for p in parts]).tolist() == list(range(COUNT))
    for name, values in zip(data["regions"], data["masses"], strict=True):
        masks = scenes["regions"][name]
        if masks.ndim == 2:  # boxes → masks, independently of the report's slicing
            rows, cols = np.mgrid[:SIZE, :SIZE]
            x0, y0, x1, y1 = (masks[:, i, None, None] for i in range(4))
            masks = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
        total = heatmaps.sum(axis=(1, 2))
        inside = (heatmaps * masks).sum(axis=(1, 2))
        expected = [None if t == 0 else i / t for i, t in zip(inside, total, strict=True)]
        _assert_masses_close(values, expected)


def test_pictures_are_the_overlays_of_the_images(page_file, scenes):
    """Each card's PNG is overlay(image, its class's channel / max), pixel for pixel (±1)."""
    _, pictures = _page_data(page_file)
    expected = overlay(scenes["images"], _expected(scenes)["heatmaps"])
    for i, picture in enumerate(pictures):
        decoded = _decode(picture).astype(int)
        assert decoded.shape == (SIZE, SIZE, 3)
        assert np.abs(decoded - expected[i]).max() <= 1, i


def test_thumbnails_average_blocks_and_jpeg_stays_close(tmp_path, shards, scenes):
    """thumbnail=8 halves 16-px images: overlay of 2×2 block means; JPEG within a few levels."""
    path = tmp_path / "small.html"
    report(shards, scenes["images"], out=path, thumbnail=8)
    data, pictures = _page_data(path)
    assert data["width"] == [8] * COUNT and data["height"] == [8] * COUNT and data["pixelated"]

    def blocks(a: np.ndarray) -> np.ndarray:
        return a.reshape(a.shape[0], 8, 2, 8, 2, *a.shape[3:]).mean(axis=(2, 4))

    expected = overlay(blocks(scenes["images"]), blocks(_expected(scenes)["heatmaps"]))
    got = np.stack([_decode(p) for p in pictures]).astype(int)
    assert np.abs(got - expected).max() <= 1
    jpeg = tmp_path / "jpeg.html"
    report(shards, scenes["images"], out=jpeg, image_format="jpeg", quality=95)
    data, pictures = _page_data(jpeg)
    assert data["mime"] == "image/jpeg"
    got = np.stack([_decode(p) for p in pictures]).astype(int)
    full = overlay(scenes["images"], _expected(scenes)["heatmaps"]).astype(int)
    distance = np.abs(got[:, None] - full[None]).mean(axis=(2, 3, 4))  # (card, overlay)
    assert (distance.argmin(axis=1) == np.arange(COUNT)).all()  # lossy, but each card its own
    assert distance.diagonal().max() < 16


def test_an_explanation_a_dataset_and_file_like_sequences_give_the_same_report(
    tmp_path, shards, scenes, page_file
):
    """An Explanation, a tf.data.Dataset read in order and a list: same data, same pictures."""
    reference = _page_data(page_file)
    result = GradCAM(_channel_model(), "conv")(scenes["images"])
    dataset = tf.data.Dataset.from_tensor_slices((scenes["images"], scenes["labels"])).batch(7)
    for name, results, images in (
        ("explanation.html", result, scenes["images"]),
        ("dataset.html", shards, dataset),
        ("list.html", shards, list(scenes["images"])),
    ):
        path = tmp_path / name
        labels = scenes["labels"] if results is result else None
        report(
            results, images, out=path, class_names=NAMES, regions=scenes["regions"],
            labels=labels, page_size=PAGE,
        )  # fmt: skip
        data, pictures = _page_data(path)
        for key in ("index", "classes", "labels", "correct", "flat", "regions"):
            assert data[key] == reference[0][key], (name, key)
        np.testing.assert_allclose(data["score"], reference[0]["score"], rtol=1e-5)
        for got, expected in zip(data["masses"], reference[0]["masses"], strict=True):
            _assert_masses_close(got, expected)
        for got, expected in zip(pictures, reference[1], strict=True):
            assert np.abs(_decode(got).astype(int) - _decode(expected)).max() <= 1, name


def test_without_images_the_heatmaps_are_drawn_alone(tmp_path, shards, scenes):
    """images=None: each picture is the jet heatmap on black (overlay with alpha 1)."""
    path = tmp_path / "maps.html"
    report(shards, out=path)
    data, pictures = _page_data(path)
    expected = overlay(np.zeros_like(scenes["images"]), _expected(scenes)["heatmaps"], alpha=1.0)
    for i, picture in enumerate(pictures):
        assert np.abs(_decode(picture).astype(int) - expected[i]).max() <= 1
    assert data["classNames"] is None and data["regions"] == [] and data["masses"] == []


def test_strings_cannot_break_out_of_the_page(page_file):
    """Class names and the title are escaped: three script elements, no injected markup."""
    text = page_file.read_text(encoding="utf-8")
    assert text.count("<script") == 3 and text.count("</script>") == 3
    assert "<b>" not in text and "alert(1)</script>" not in text
    assert "<title>Audit &lt;/title&gt;&lt;script&gt;alert(1)&lt;/script&gt;</title>" in text
    data, _ = _page_data(page_file)
    assert data["classNames"][1] == NASTY


def test_shards_without_class_labels_warn_and_show_no_correctness(tmp_path, scenes):
    """Labels that are no class indices (fractions) in the shards: a warning, no right/wrong."""
    folder = tmp_path / "shards"
    images = scenes["images"][:8]
    explain_dataset(
        _channel_model(), (images, np.linspace(0.1, 0.9, 8)), output_dir=folder, verbose=0
    )
    with pytest.warns(UserWarning, match="not class labels"):
        report(folder, images, out=tmp_path / "r.html")
    data, _ = _page_data(tmp_path / "r.html")
    assert data["correct"] is None and data["labels"] is None


# ------------------------------------------------------------------ bad input


def _copy(shards: Path, folder: Path) -> Path:
    shutil.copytree(shards, folder)
    return folder


def test_empty_missing_and_unfinished_folders_are_refused(tmp_path, scenes):
    """No folder: FileNotFoundError; no shards (or only a dead run's .tmp): InputError."""
    with pytest.raises(FileNotFoundError, match="No shard folder"):
        report(tmp_path / "nope", out=tmp_path / "r.html")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no shards"):
        report(tmp_path / "empty", out=tmp_path / "r.html")
    (tmp_path / "empty" / ".gradcam-000-000000.npz.123.tmp").write_bytes(b"PK")
    with pytest.raises(InputError, match="1 partial shard"):
        report(tmp_path / "empty", out=tmp_path / "r.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_mixed_runs_and_broken_shards_are_refused(tmp_path, shards, scenes):
    """Other fields, other map sizes, a position twice, a truncated shard: InputError, no file."""
    other_fields = _copy(shards, tmp_path / "fields")
    explain_dataset(
        _channel_model(), scenes["images"][:4], fields=("heatmaps", "scores"),
        output_dir=tmp_path / "run2", verbose=0,
    )  # fmt: skip
    shutil.copy(
        tmp_path / "run2" / "gradcam-000-000000.npz", other_fields / "gradcam-001-000000.npz"
    )
    other_size = _copy(shards, tmp_path / "size")
    small = _channel_model(8)
    smaller = (scenes["images"][:4, :8, :8], scenes["labels"][:4])  # same fields, 8×8 maps
    explain_dataset(small, smaller, output_dir=tmp_path / "run3", verbose=0)
    shutil.copy(tmp_path / "run3" / "gradcam-000-000000.npz", other_size / "gradcam-000-000009.npz")
    twice = _copy(shards, tmp_path / "twice")
    shutil.copy(twice / "gradcam-000-000001.npz", twice / "gradcam-001-000000.npz")
    broken = _copy(shards, tmp_path / "broken")
    data = (broken / "gradcam-000-000001.npz").read_bytes()
    (broken / "gradcam-000-000001.npz").write_bytes(data[: len(data) // 2])
    for folder, problem in (
        (other_fields, r"mixes shards of different runs or formats: gradcam-001-000000.npz"),
        (other_size, r"maps of shape \(16, 16\) per image, gradcam-000-000009.npz \(8, 8\)"),
        (twice, r"Position 16 is explained twice \(gradcam-000-000001.npz, gradcam-001"),
        (broken, r"Cannot read the shard gradcam-000-000001.npz"),
    ):
        with pytest.raises(InputError, match=problem):
            report(folder, scenes["images"], out=tmp_path / "r.html")
    assert not list(tmp_path.glob("*.html")) and not list(tmp_path.glob(".*part"))


@pytest.mark.parametrize(
    ("case", "error", "problem"),
    [
        ("too-few", InputError, "holds 39 images but the maps explain position 39"),
        ("nan", InputError, "position 3 holds values that are not finite"),
        ("rank", InputError, r"position 0 must be a numeric \(height, width\[, channels\]\)"),
        ("strings", InputError, "must be a numeric"),
        ("dataset-short", InputError, "ended after 30 images but the maps explain position 30"),
        ("dict", InputError, "a dict of"),
        ("region-shape", InputError, r"Region 'r' must be masks \(40, 16, 16\)"),
        ("names", InputError, "no name for class 2"),
        ("labels", TargetError, "whole class numbers"),
        ("labels-short", InputError, "a label for every position up to 39"),
        ("thumbnail", ValueError, r"`thumbnail` must be an int >= 8. Received: thumbnail=4"),
        ("format", ValueError, "image_format='gif'"),
        ("quality", ValueError, r"`quality` must be an int in \[1, 100\]"),
        ("page", ValueError, "page_size=0"),
        ("alpha", ValueError, "alpha=1.5"),
    ],
)
def test_bad_input_is_a_typed_error_and_writes_nothing(
    tmp_path, shards, scenes, case, error, problem
):
    """Images, regions, names, labels and options: typed errors naming the problem; no file."""
    images = scenes["images"]
    kwargs = {"out": tmp_path / "r.html"}
    if case == "too-few":
        images = images[:-1]
    elif case == "nan":
        images = images.copy()
        images[3, 0, 0, 0] = np.nan
    elif case == "rank":
        images = images[:, None]
    elif case == "strings":
        images = np.full((COUNT, 2, 2), "x")
    elif case == "dataset-short":
        images = tf.data.Dataset.from_tensor_slices(images[:30]).batch(8)
    elif case == "dict":
        images = {"image": images}
    elif case == "region-shape":
        kwargs["regions"] = {"r": np.zeros((COUNT, 8, 8))}
    elif case == "names":
        kwargs["class_names"] = ["a", "b"]
    elif case == "labels":
        kwargs["labels"] = np.full(COUNT, 0.5)
    elif case == "labels-short":
        kwargs["labels"] = np.zeros(10, int)
    else:
        option, value = {
            "thumbnail": ("thumbnail", 4),
            "format": ("image_format", "gif"),
            "quality": ("quality", 101),
            "page": ("page_size", 0),
            "alpha": ("alpha", 1.5),
        }[case]
        kwargs[option] = value
    with pytest.raises(error, match=problem):
        report(shards, images, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_output_path_problems_are_typed_errors(tmp_path, shards, scenes):
    """A missing folder, a folder as `out`, an existing report without overwrite; then overwrite."""
    with pytest.raises(FileNotFoundError, match="folder of `out` does not exist"):
        report(shards, out=tmp_path / "missing" / "r.html")
    with pytest.raises(IsADirectoryError, match="`out` is a folder"):
        report(shards, out=tmp_path)
    old = tmp_path / "r.html"
    old.write_text("old")
    with pytest.raises(FileExistsError, match=r"already exists\. Pass overwrite=True"):
        report(shards, out=old)
    assert old.read_text() == "old"
    summary = report(shards, scenes["images"], out=old, overwrite=True)
    assert summary.cards == COUNT and summary.bytes == old.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


@pytest.mark.parametrize("failure", ["bug", "disk-full", "interrupt"])
def test_a_failure_half_way_leaves_no_partial_file_and_the_old_report(
    tmp_path, shards, scenes, monkeypatch, failure
):
    """A failure at the 20th picture: the error surfaces, the old report is intact, no leftovers."""
    old = tmp_path / "r.html"
    old.write_text("old report")
    encode = report_module._encode
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 20:
            if failure == "bug":
                raise RuntimeError("boom")
            if failure == "interrupt":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, "No space left on device")
        return encode(*args)

    monkeypatch.setattr(report_module, "_encode", failing)
    expected = {"bug": RuntimeError, "disk-full": OSError, "interrupt": KeyboardInterrupt}
    with pytest.raises(expected[failure]):
        report(shards, scenes["images"], out=old, overwrite=True)
    assert len(calls) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]
    assert old.read_text() == "old report"


# ------------------------------------------------------------------ the command


def test_cli_report_equals_the_api_from_npy_and_from_png_files(tmp_path, shards, scenes, capsys):
    """`tf-gradcam report` with an .npy or a folder of PNGs writes the API's data and pictures."""
    np.save(tmp_path / "images.npy", scenes["images"])
    np.savez(tmp_path / "regions.npz", **scenes["regions"])
    (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n")
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    as_bytes = np.round(scenes["images"] * 255).astype(np.uint8)
    for i, image in enumerate(as_bytes):
        cv2.imwrite(str(pngs / f"{i:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    common = ["--regions", str(tmp_path / "regions.npz"), "--labels", str(tmp_path / "names.txt")]
    for name, images, reference_images in (
        ("npy.html", [str(tmp_path / "images.npy")], scenes["images"]),
        ("png.html", [str(pngs)], as_bytes),
    ):
        out = tmp_path / name
        assert main(["report", str(shards), "--images", *images, *common, "--out", str(out)]) == 0
        assert f"{COUNT} images in {out}" in capsys.readouterr().out
        api = tmp_path / f"api-{name}"
        report(shards, reference_images, out=api, class_names=NAMES, regions=scenes["regions"])
        assert _page_data(out) == _page_data(api)


def test_cli_report_user_errors_are_one_line_exit_2_and_leave_nothing(
    tmp_path, shards, scenes, capsys
):
    """An undecodable image, an existing report, a missing shard folder: exit 2, one line."""
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, image in enumerate(np.round(scenes["images"] * 255).astype(np.uint8)):
        cv2.imwrite(str(pngs / f"{i:03d}.png"), image)
    (pngs / "025.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    out.mkdir()
    report = str(out / "r.html")
    assert main(["report", str(shards), "--images", str(pngs), "--out", report]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("tf-gradcam: cannot read image") and "025.png" in line
    assert "\n" not in line and list(out.iterdir()) == []
    (out / "r.html").write_text("old")
    assert main(["report", str(shards), "--out", report]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope"), "--out", report, "--overwrite"]) == 2
    assert "No shard folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["r.html"] and (out / "r.html").read_text() == "old"


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--quality", "101"], "must be an integer from 1 to 100, got '101'"),
        (["--thumbnail", "4"], "must be an integer of at least 8, got '4'"),
        (["--format", "gif"], "invalid choice: 'gif'"),
        (["--page-size", "0"], "must be a positive integer"),
    ],
)
def test_cli_report_options_out_of_range_are_usage_errors(capsys, args, problem):
    """Options the report refuses are refused by the parser first: one line, exit 2."""
    with pytest.raises(SystemExit) as stop:
        main(["report", "cams", *args])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert problem in err and len(err.strip().splitlines()) == 1


def test_cli_report_help_imports_no_tensorflow(tmp_path):
    """`tf-gradcam report --help` answers without importing TensorFlow or Keras."""
    script = (
        "import sys\nfrom tf_gradcam.cli import main\ntry:\n    main(['report', '--help'])\n"
        "except SystemExit as stop:\n    code = stop.code\n"
        "print(code, 'tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60,
    )  # fmt: skip
    assert done.stdout.split()[-3:] == ["0", "False", "False"], done.stderr
    assert "SHARDS_DIR" in done.stdout


# ------------------------------------------------------------------ in Chromium


@pytest.fixture(scope="module")
def browser():
    """Headless system Chromium through Playwright; skipped (or failed in CI) when missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "the browser tests need the playwright package (pip install playwright)"
    else:
        reason = None
        if not Path(CHROMIUM).exists():
            reason = f"the browser tests need Chromium at {CHROMIUM} (apt-get install chromium)"
    if reason is not None:
        if os.environ.get("TF_GRADCAM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"TF_GRADCAM_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        yield chromium
        chromium.close()


class _Page:
    """One open report, with every console error and uncaught exception recorded."""

    def __init__(self, browser, path: Path, view: str = ""):
        self.page = browser.new_page(viewport={"width": 1200, "height": 900})
        self.page.set_default_timeout(10_000)  # a broken page fails in seconds, not 30 s
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        self.page.on(
            "console",
            lambda m: (
                self.errors.append(f"{m.type}: {m.text}")
                if m.type in ("error", "warning")
                else None
            ),
        )
        self.page.goto(path.resolve().as_uri() + view)
        self.page.wait_for_selector("html[data-ready='1']")

    def select(self, selector: str, value: str) -> None:
        self.page.select_option(selector, value)

    def shown(self) -> list[int]:
        """The positions of the cards in the document, in order."""
        return [
            int(i)
            for i in self.page.eval_on_selector_all(".card", "c => c.map(e => e.dataset.index)")
        ]

    def all_cards(self) -> list[int]:
        """Every card of the current view, in order (one page of 240)."""
        self.select("#page-size", "240")
        return self.shown()

    def images(self) -> int:
        return self.page.eval_on_selector_all("img", "images => images.length")

    def close(self) -> None:
        self.page.close()
        assert self.errors == []


@pytest.fixture
def page(browser, page_file):
    opened = _Page(browser, page_file)
    yield opened
    opened.close()


def test_page_loads_without_errors_and_shows_one_page_of_cards(page):
    """No console error; 12 cards with 12 images; summary and status say what is shown."""
    assert page.shown() == list(range(PAGE)) and page.images() == PAGE
    assert page.page.title() == "Audit </title><script>alert(1)</script>"
    summary = page.page.text_content("#summary")
    wrong = COUNT - int(_expected(_scenes())["correct"].sum())
    assert summary.startswith(f"{COUNT} images, 3 classes explained, {wrong} wrong")
    assert page.page.text_content("#status").startswith("Page 1 of 4 · cards 1–12 of 40 shown")
    alt = page.page.get_attribute(".card img", "alt")
    assert alt.startswith("Grad-CAM overlay of image 0: ") and "mass on blob" in alt


def test_sorting_by_region_mass_follows_the_shard_masses(page, shards, scenes):
    """Sort by mass on each region, both ways: the order of Σh·m/Σh from the shards (— last)."""
    expected = _expected(scenes)["masses"]
    for r, name in enumerate(("blob", "corner")):
        masses = expected[name]
        known = [i for i in range(COUNT) if masses[i] is not None]
        unknown = [i for i in range(COUNT) if masses[i] is None]
        for direction, sign in (("desc", -1), ("asc", 1)):
            page.select("#sort", f"mass:{r}:{direction}")
            assert page.page.input_value("#page") == "1"
            order = sorted(known, key=lambda i, s=sign: (s * masses[i], i)) + unknown
            assert page.all_cards() == order, (name, direction)
            page.select("#page-size", str(PAGE))
    page.select("#sort", "mass:0:desc")
    texts = page.page.eval_on_selector_all(
        ".card .mass[data-region='blob']", "s => s.map(e => e.textContent)"
    )
    shown = [float(t.split()[-1]) for t in texts]
    assert shown == sorted(shown, reverse=True) and len(shown) == PAGE


def test_filtering_by_class_shows_exactly_that_class(page, scenes):
    """The class filter keeps exactly the cards of that class; the name stays plain text."""
    predicted = _expected(scenes)["classes"]
    options = page.page.eval_on_selector_all("#class option", "o => o.map(e => e.textContent)")
    assert options == ["all", *NAMES]
    for c in range(3):
        page.select("#class", str(c))
        assert page.all_cards() == [i for i in range(COUNT) if predicted[i] == c]
        page.select("#page-size", str(PAGE))
    page.select("#class", "1")
    heads = page.page.eval_on_selector_all(".card .head", "h => h.map(e => e.textContent)")
    assert heads and all(h.endswith(" · " + NASTY) for h in heads)
    assert page.page.eval_on_selector_all("#cards b, #cards script", "e => e.length") == 0


def test_wrong_predictions_first_then_the_chosen_order(page, scenes):
    """'wrong first' + score high→low: every wrong card first, each group by score descending."""
    expected = _expected(scenes)
    scores, correct = expected["scores"], expected["correct"]
    page.select("#sort", "score:desc")
    page.page.check("#wrong-first")
    by_score = sorted(range(COUNT), key=lambda i: (-scores[i], i))
    order = [i for i in by_score if not correct[i]] + [i for i in by_score if correct[i]]
    assert page.all_cards() == order
    page.select("#correct", "wrong")
    assert page.shown() == [i for i in order if not correct[i]]


def test_score_and_mass_filters_keep_the_cards_within_bounds(page, scenes):
    """Score ≥ a, score ≤ b and 'mass on corner ≥ t' keep exactly the cards that satisfy them."""
    expected = _expected(scenes)
    scores, corner = expected["scores"], expected["masses"]["corner"]
    low, high = np.quantile(scores, [0.25, 0.75])
    page.select("#page-size", "240")
    page.page.fill("#min-score", f"{low:.4f}")
    page.page.fill("#max-score", f"{high:.4f}")
    keep = [i for i in range(COUNT) if round(low, 4) <= scores[i] <= round(high, 4)]
    assert page.shown() == keep and 0 < len(keep) < COUNT
    page.page.fill("#min-score", "")
    page.page.fill("#max-score", "")
    page.select("#mass-region", "1")
    page.page.fill("#min-mass", "0.1")
    assert page.shown() == [i for i in range(COUNT) if corner[i] is not None and corner[i] >= 0.1]


def test_pages_hold_the_only_image_elements(page):
    """Next/previous and the arrow keys step through 4 pages; only the shown cards have images."""
    for number, count in ((2, 12), (3, 12), (4, 4)):
        page.page.click("#next")
        assert page.shown() == list(range(12 * (number - 1), 12 * (number - 1) + count))
        assert page.images() == count
        assert page.page.text_content("#status").startswith(f"Page {number} of 4")
    assert page.page.is_disabled("#next") and not page.page.is_disabled("#prev")
    page.page.evaluate("document.activeElement.blur()")
    page.page.keyboard.press("ArrowLeft")
    assert page.shown() == list(range(24, 36)) and page.images() == PAGE
    page.page.fill("#page", "1")
    page.page.dispatch_event("#page", "change")
    assert page.shown() == list(range(PAGE)) and page.page.is_disabled("#prev")


def test_the_view_is_kept_in_the_address(browser, page_file, scenes):
    """Sorting, filters and page are written to #...; opening that address restores them."""
    first = _Page(browser, page_file)
    first.select("#sort", "score:asc")
    first.select("#class", "2")
    first.select("#page-size", "30")
    address = first.page.url
    shown = first.shown()
    first.close()
    assert "#" in address and "sort=score%3Aasc" in address
    again = _Page(browser, page_file, "#" + address.split("#", 1)[1])
    assert again.page.input_value("#sort") == "score:asc" and again.shown() == shown
    again.close()
