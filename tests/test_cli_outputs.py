"""The tf-gradcam command's outputs and failures: no silent overwrites, whole files, exit status.

In-process `main([...])` calls. Existing outputs are refused before anything is
computed (a `GradCAM.__call__` that fails the test proves it); `--overwrite`
replaces only the files the command writes; a full disk leaves no partial file;
user errors exit 2 and internal errors exit 1, each with one stderr line, and
`--debug` adds the traceback. The same checks in a fresh interpreter, where
TensorFlow must not even be imported, are in test_cli_startup.py.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
from keras import layers

import tf_gradcam
import tf_gradcam.cli as cli
from tf_gradcam import GradCAM
from tf_gradcam.cli import main
from tf_gradcam.demo_model import DEMO_CLASS_NAMES, DEMO_LAYER_NAME, load_demo_model
from tf_gradcam.scenes import make_scenes

NO_SPACE = os.strerror(errno.ENOSPC)  # the operating system's words for a full disk


def _tiny_model(classes: int = 3) -> keras.Model:
    """Conv2D(relu, 'conv') -> GAP -> Dense(classes) on 8x8 RGB images."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = layers.GlobalAveragePooling2D()(x)
    head = layers.Dense(classes, kernel_initializer=keras.initializers.RandomUniform(-0.5, 1.0))
    return keras.Model(inputs, head(x))


def _inputs(tmp_path: Path, count: int = 2) -> tuple[keras.Model, str, list[str]]:
    """A tiny saved model and `count` random 8x8 PNGs `img<i>.png`, in `tmp_path/in`."""
    folder = tmp_path / "in"
    folder.mkdir()
    model = _tiny_model()
    model.save(folder / "m.keras")
    rng = np.random.default_rng(11)
    paths = []
    for i in range(count):
        paths.append(str(folder / f"img{i}.png"))
        cv2.imwrite(paths[-1], rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return model, str(folder / "m.keras"), paths


def _decoded(paths: list[str]) -> np.ndarray:
    """The PNGs as the float32 RGB batch in [0, 1] that `--preprocess unit` feeds the model."""
    return np.stack([cv2.imread(p)[..., ::-1] / 255.0 for p in paths]).astype(np.float32)


def _contents(folder: Path) -> dict[str, bytes]:
    """Every file in `folder`, hidden ones included: name -> bytes."""
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _one_error_line(capsys) -> str:
    """The single line the command printed on stderr (asserting there is exactly one)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("tf-gradcam: ")
    return lines[0]


@pytest.fixture
def no_computing(monkeypatch):
    """Makes any Grad-CAM computation fail the test: checks must come before it."""

    def computed(*args, **kwargs):
        pytest.fail("Grad-CAM was computed before the outputs were checked")

    monkeypatch.setattr(tf_gradcam.GradCAM, "__call__", computed)
    return monkeypatch


# ------------------------------------------------------------------ no silent overwrites


def test_explain_refuses_existing_outputs_before_computing(tmp_path, capsys, no_computing):
    """Two existing outputs: the first in writing order is named, nothing is computed or changed."""
    _, model, images = _inputs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "img1_gradcam.png").write_bytes(b"old picture")
    (out / "img0_gradcam.npy").write_bytes(b"old map")  # written before img1_gradcam.png
    before = _contents(out)
    assert main(["explain", model, *images, "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert repr(str(out / "img0_gradcam.npy")) in line and "already exists" in line
    assert "--overwrite" in line
    assert _contents(out) == before


def test_overwrite_replaces_the_outputs_and_nothing_else(tmp_path):
    """--overwrite: the outputs hold this run's results; a user's notes.txt is untouched."""
    model, model_path, images = _inputs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "img0_gradcam.npy").write_bytes(b"old map")
    (out / "img1_gradcam.png").write_bytes(b"old picture")
    args = ["explain", model_path, *images, "--class", "1", "--out", str(out), "--overwrite"]
    assert main(args) == 0
    expected = GradCAM(model, "conv")(_decoded(images), target=1)
    for i in range(2):
        assert expected.maps[i].max() > 0
        np.testing.assert_allclose(
            np.load(out / f"img{i}_gradcam.npy"), expected.maps[i], rtol=1e-5, atol=1e-6
        )
        assert cv2.imread(str(out / f"img{i}_gradcam.png")).shape == (8, 8, 3)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(_contents(out)) == sorted(
        ["notes.txt", *(f"img{i}_gradcam{s}" for i in range(2) for s in (".png", ".npy"))]
    )


@pytest.mark.parametrize(
    ("flags", "existing"),
    [
        (["--top-k", "2"], "img0_class2_gradcam.png"),
        (["--labels", "LABELS"], "img0_dog_gradcam.npy"),  # top-1 class, named
    ],
)
def test_names_that_depend_on_the_predicted_class_are_checked_before_computing(
    tmp_path, capsys, no_computing, flags, existing
):
    """With --top-k, or --labels without --class, any name a class could give counts."""
    _, model, images = _inputs(tmp_path, count=1)
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    flags = [str(tmp_path / "labels.txt") if f == "LABELS" else f for f in flags]
    out = tmp_path / "out"
    out.mkdir()
    (out / existing).write_bytes(b"earlier run")
    assert main(["explain", model, *images, *flags, "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert repr(str(out / existing)) in line and "--overwrite" in line
    assert "depend on the predicted class" in line
    assert _contents(out) == {existing: b"earlier run"}


def test_other_images_and_methods_outputs_do_not_block_top_k(tmp_path):
    """Names that only look alike (another image or method) are neither refused nor touched."""
    model, model_path, images = _inputs(tmp_path, count=1)
    out = tmp_path / "out"
    out.mkdir()
    others = {
        "img00_class1_gradcam.png": b"image img00",
        "img0_class1_guided-gradcam.png": b"another method",
        "img0_class1_gradcam.png.bak": b"a backup",
    }
    for name, data in others.items():
        (out / name).write_bytes(data)
    assert main(["explain", model_path, *images, "--top-k", "2", "--out", str(out)]) == 0
    classes = GradCAM(model, "conv")(_decoded(images), target=tf_gradcam.TopK(2)).classes[0]
    written = {f"img0_class{c}_gradcam{s}" for c in classes for s in (".png", ".npy")}
    contents = _contents(out)
    assert set(contents) == set(others) | written
    assert {name: contents[name] for name in others} == others


@pytest.mark.parametrize(
    ("command", "appears"), [("explain", "img0_gradcam.npy"), ("demo", "maps.npy")]
)
def test_an_output_that_appears_while_computing_is_not_overwritten(
    tmp_path, capsys, monkeypatch, command, appears
):
    """The exact names are checked again before the first write: nothing is half-written."""
    _, model, images = _inputs(tmp_path, count=1)
    out = tmp_path / "out"
    compute = tf_gradcam.GradCAM.__call__

    def meanwhile(self, *args, **kwargs):
        (out / appears).write_bytes(b"another process")
        return compute(self, *args, **kwargs)

    monkeypatch.setattr(tf_gradcam.GradCAM, "__call__", meanwhile)
    args = ["explain", model, *images] if command == "explain" else ["demo", "--count", "1"]
    assert main([*args, "--out", str(out)]) == 2
    assert repr(str(out / appears)) in _one_error_line(capsys)
    assert _contents(out) == {appears: b"another process"}


def test_demo_refuses_existing_outputs_unless_overwrite(tmp_path, capsys, no_computing):
    """`demo` into a folder holding maps.npy: refused; with --overwrite, its results replace it."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "maps.npy").write_bytes(b"old maps")
    (out / "notes.txt").write_text("mine")
    args = ["demo", "--count", "2", "--seed", "5", "--out", str(out)]
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert repr(str(out / "maps.npy")) in line and "--overwrite" in line
    assert _contents(out) == {"maps.npy": b"old maps", "notes.txt": b"mine"}

    no_computing.undo()
    assert main([*args, "--overwrite"]) == 0
    expected = GradCAM(load_demo_model(), DEMO_LAYER_NAME)(make_scenes(2, seed=5).images)
    np.testing.assert_allclose(np.load(out / "maps.npy"), expected.maps, rtol=1e-4, atol=1e-5)
    scenes = [f"scene_{i:02d}_{DEMO_CLASS_NAMES[c]}.png" for i, c in enumerate(expected.classes)]
    assert set(_contents(out)) == {"maps.npy", "notes.txt", "demo_grid.png", *scenes}
    assert (out / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ the output folder


def _unwritable(tmp_path: Path, case: str) -> tuple[str, str]:
    """An --out the command cannot write into, and the start of the expected message."""
    if case in ("proc-new", "proc-existing"):
        if not sys.platform.startswith("linux") or not Path("/proc/self").is_dir():
            pytest.skip("needs Linux's /proc")
        if case == "proc-new":
            return "/proc/tf-gradcam-test/out", "cannot create output folder"
        return "/proc/self", "cannot write into output folder"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        (locked / "probe").touch()
    except PermissionError:
        pass
    else:  # root with CAP_DAC_OVERRIDE writes into read-only folders
        pytest.skip("this process may write into read-only folders")
    if case == "read-only-existing":
        return str(locked), "cannot write into output folder"
    assert case == "read-only-parent"
    return str(locked / "out"), "cannot create output folder"


@pytest.mark.parametrize(
    "case", ["proc-new", "proc-existing", "read-only-existing", "read-only-parent"]
)
def test_an_unwritable_out_is_one_line_before_computing(tmp_path, capsys, no_computing, case):
    """--out under /proc or a read-only folder: one line naming it and the reason, exit 2."""
    _, model, images = _inputs(tmp_path, count=1)
    out, problem = _unwritable(tmp_path, case)
    try:
        assert main(["explain", model, *images, "--out", out]) == 2
    finally:
        if (tmp_path / "locked").exists():
            (tmp_path / "locked").chmod(0o755)  # so that pytest can remove it
    line = _one_error_line(capsys)
    assert line.startswith(f"tf-gradcam: {problem} {out!r}: ")


def test_a_failed_run_removes_the_folders_it_created(tmp_path, capsys):
    """An error after the output folder was made (an unknown layer) leaves no empty folders."""
    _, model, images = _inputs(tmp_path, count=1)
    out = tmp_path / "new" / "nested" / "out"
    assert main(["explain", model, *images, "--layer", "nope", "--out", str(out)]) == 2
    assert "No layer 'nope'" in _one_error_line(capsys)
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ a full disk


class _FullDisk:
    """A file on a disk that fills up after `room` bytes: the write that passes it raises."""

    def __init__(self, handle, room: int):
        self._handle, self._room = handle, room

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self._room:
            self._handle.write(data[: self._room])  # what fitted stays in the file
            self._room = 0
            raise OSError(errno.ENOSPC, NO_SPACE)
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._handle.close()


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("full_at", ["img0_gradcam.png", "img0_gradcam.npy"])
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(
    tmp_path, capsys, monkeypatch, full_at, overwrite
):
    """The disk fills while `full_at` is written: one line naming it, no partial or changed file.

    The earlier output stays whole; with --overwrite an old `full_at` keeps its content.
    """
    _, model, images = _inputs(tmp_path, count=1)
    out = tmp_path / "out"
    out.mkdir()
    before = {"notes.txt": b"mine"} | ({full_at: b"old content"} if overwrite else {})
    for name, data in before.items():
        (out / name).write_bytes(data)

    def full_disk_open(file, *args, **kwargs):
        handle = open(file, *args, **kwargs)
        return _FullDisk(handle, room=100) if full_at in os.fspath(file) else handle

    monkeypatch.setattr(cli, "open", full_disk_open, raising=False)  # the CLI's files only
    flags = ["--overwrite"] if overwrite else []
    assert main(["explain", model, *images, "--out", str(out), *flags]) == 2
    assert (
        _one_error_line(capsys) == f"tf-gradcam: cannot write {str(out / full_at)!r}: {NO_SPACE}."
    )
    contents = _contents(out)
    if full_at.endswith(".npy"):  # the PNG came first and is complete
        png = np.frombuffer(contents.pop("img0_gradcam.png"), np.uint8)
        assert cv2.imdecode(png, cv2.IMREAD_COLOR).shape == (8, 8, 3)
    assert contents == before  # no partial file, no temporary file, the old one unchanged


# ------------------------------------------------------------------ exit status, --debug


@pytest.mark.parametrize("command", ["explain", "demo"])
def test_an_internal_error_exits_1_with_a_short_message(tmp_path, capsys, monkeypatch, command):
    """An unexpected exception: exit 1, one line naming it; the new --out folder is removed."""

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tf_gradcam.GradCAM, "__call__", boom)
    _, model, images = _inputs(tmp_path, count=1)
    out = tmp_path / "out"
    args = ["explain", model, *images] if command == "explain" else ["demo", "--count", "1"]
    assert main([*args, "--out", str(out)]) == 1
    assert capsys.readouterr().err == (
        "tf-gradcam: internal error: RuntimeError: boom (run with --debug for the traceback)\n"
    )
    assert not out.exists()

    assert main([*args, "--out", str(out), "--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n")
    assert 'raise RuntimeError("boom")' in err and "\nRuntimeError: boom\n" in err
    assert err.endswith("\ntf-gradcam: internal error: RuntimeError: boom\n")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_adds_the_traceback_to_a_user_error(tmp_path, capsys, where):
    """--debug (before or after the subcommand): traceback, then the usual line; still exit 2."""
    _, model, images = _inputs(tmp_path, count=1)
    args = ["explain", model, *images, "--layer", "nope", "--out", str(tmp_path / "out")]
    assert main(["--debug", *args] if where == "before" else [*args, "--debug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n")
    assert "LayerNotFoundError" in err
    last = err.splitlines()[-1]
    assert last.startswith("tf-gradcam: No layer 'nope'")
