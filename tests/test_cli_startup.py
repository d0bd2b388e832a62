"""The tf-gradcam command in fresh interpreters: lazy imports, quiet TensorFlow, exit status.

Each test starts `python` in a subprocess, because what is checked (which modules
a command imports, what TensorFlow's native libraries print while they load) is
decided once per process. The environment is the caller's without `TF_CPP_*`
variables, as a user's shell would be.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
from keras import layers

import tf_gradcam

ROOT = Path(__file__).resolve().parents[1]

#: What TensorFlow prints while it loads on a machine like CI's (x86, no GPU).
NOISE = (
    "oneDNN custom operations are on",
    "Could not find cuda drivers",
    "All log messages before absl::InitializeLog()",
    "This TensorFlow binary is optimized",
)
#: Any line of TensorFlow's native logging: severity letter, MMDD, time.
NATIVE_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d", re.MULTILINE)

#: Runs `main(argv)` in a fresh interpreter and reports, as the last stdout line,
#: its exit status, whether TensorFlow/Keras were imported, and the log level.
_MAIN = """
import json, os, sys
from tf_gradcam.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print(json.dumps({
    "code": code,
    "tensorflow": "tensorflow" in sys.modules,
    "keras": "keras" in sys.modules,
    "level": os.environ.get("TF_CPP_MIN_LOG_LEVEL"),
}))
"""


def _environment(**extra: str) -> dict[str, str]:
    """The test's environment without TF_CPP_* variables, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, env=_environment(**env), capture_output=True, text=True, timeout=300
    )


def _main(args: list[str], cwd: Path, **env: str) -> tuple[dict, str, str]:
    """`main(args)` in a fresh interpreter: (report, stdout without the report, stderr)."""
    done = _run([sys.executable, "-c", _MAIN, *args], cwd, **env)
    *printed, report = done.stdout.splitlines() or [""]
    assert report.startswith("{"), done.stderr[-3000:]
    return json.loads(report), "\n".join(printed), done.stderr


def _console_script() -> list[str]:
    """The installed `tf-gradcam` script, or `python -m tf_gradcam.cli` without one."""
    script = shutil.which("tf-gradcam", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "tf_gradcam.cli"]


def _model_and_image(tmp_path: Path) -> tuple[str, str]:
    """A tiny saved model with positive class weights (no all-zero map) and an 8x8 PNG."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, activation="relu")(inputs)
    head = layers.Dense(3, kernel_initializer=keras.initializers.RandomUniform(0.1, 1.0))
    model = keras.Model(inputs, head(layers.GlobalAveragePooling2D()(x)))
    model.save(tmp_path / "m.keras")
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    return str(tmp_path / "m.keras"), str(tmp_path / "a.png")


# ------------------------------------------------------------------ lazy imports


@pytest.mark.parametrize(
    "args", [["--help"], ["demo", "--help"], ["explain", "--help"], ["--version"]]
)
def test_help_answers_without_importing_tensorflow(tmp_path, args):
    """--help and --version of every command import neither TensorFlow nor Keras."""
    report, printed, err = _main(args, tmp_path)
    assert report["code"] == 0 and err == ""
    assert not report["tensorflow"] and not report["keras"]
    assert "usage: tf-gradcam" in printed or printed.startswith("tf-gradcam ")


def test_console_script_help_is_fast_and_imports_no_tensorflow(tmp_path, record_property):
    """The console script answers --help; `-X importtime` lists no TensorFlow module."""
    start = time.perf_counter()
    done = _run([*_console_script(), "--help"], tmp_path)
    record_property("help_seconds", round(time.perf_counter() - start, 3))
    assert done.returncode == 0 and "explain" in done.stdout and done.stderr == ""
    timed = _run([sys.executable, "-X", "importtime", "-m", "tf_gradcam.cli", "--help"], tmp_path)
    assert timed.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in timed.stderr.splitlines()}
    assert "tf_gradcam.errors" in imported  # the command did import its package
    assert not {name for name in imported if name.split(".")[0] in ("tensorflow", "keras")}


def test_importing_the_package_and_its_errors_loads_no_tensorflow(tmp_path):
    """`import tf_gradcam`, its error classes and `dir()` leave TensorFlow unimported."""
    script = """
import sys
import tf_gradcam
from tf_gradcam import GradCAMError, InputError, __version__
assert issubclass(InputError, GradCAMError) and issubclass(GradCAMError, ValueError)
listed = set(tf_gradcam.__all__) <= set(dir(tf_gradcam))
print(listed, "tensorflow" in sys.modules, "keras" in sys.modules)
"""
    done = _run([sys.executable, "-c", script], tmp_path)
    assert done.stdout.split() == ["True", "False", "False"], done.stderr


def test_every_public_name_is_its_defining_modules_object():
    """Lazy names are the very objects of the modules that define them; submodules import."""
    namespace: dict = {}
    exec("from tf_gradcam import *", namespace)
    for name in tf_gradcam.__all__:
        value = getattr(tf_gradcam, name)
        assert namespace[name] is value
        if name == "__version__":
            assert isinstance(value, str)
            continue
        if not callable(value):  # a constant: the object of the module the map names
            home = importlib.import_module(f"tf_gradcam.{tf_gradcam._SOURCES[name]}")
            assert getattr(home, name) is value
            continue
        home = sys.modules[value.__module__]
        assert home.__name__.startswith("tf_gradcam.") and getattr(home, name) is value
    gradcam = importlib.import_module("tf_gradcam.gradcam")
    assert tf_gradcam.gradcam is gradcam and tf_gradcam.GradCAM is gradcam.GradCAM
    assert tf_gradcam.scenes.make_scenes  # any submodule is an attribute, as with eager imports
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        tf_gradcam.nope  # noqa: B018


# ------------------------------------------------------------------ TensorFlow's log lines


@pytest.mark.parametrize("command", ["demo", "explain"])
def test_commands_print_no_tensorflow_log_lines(tmp_path, command):
    """Without --verbose, a successful demo/explain writes nothing at all on stderr."""
    if command == "demo":
        args = ["demo", "--count", "1", "--out", "out"]
    else:
        args = ["explain", *_model_and_image(tmp_path), "--out", "out"]
    report, printed, err = _main(args, tmp_path)
    assert report["code"] == 0 and report["tensorflow"]
    assert any((tmp_path / "out").glob("*.npy"))
    for text in NOISE:
        assert text not in err and text not in printed
    assert not NATIVE_LOG_LINE.search(err) and not NATIVE_LOG_LINE.search(printed)
    assert err == ""


def test_verbose_leaves_tensorflow_logging_alone(tmp_path):
    """--verbose does not force a log level, and shows what a bare TensorFlow import shows."""
    bare = _run([sys.executable, "-c", "import tensorflow as tf; tf.constant(1.0) + 1"], tmp_path)
    report, _, err = _main(["explain", *_model_and_image(tmp_path), "--verbose"], tmp_path)
    assert report["code"] == 0 and report["level"] is None
    for text in NOISE:
        assert (text in err) == (text in bare.stderr), text
    assert bool(NATIVE_LOG_LINE.search(err)) == bool(NATIVE_LOG_LINE.search(bare.stderr))


def test_a_log_level_set_by_the_user_is_kept(tmp_path):
    """TF_CPP_MIN_LOG_LEVEL from the environment wins over the command's default of 3."""
    report, _, _ = _main(
        ["explain", *_model_and_image(tmp_path)], tmp_path, TF_CPP_MIN_LOG_LEVEL="1"
    )
    assert report["code"] == 0 and report["level"] == "1"


# ------------------------------------------------------------------ exit status


def test_console_script_exits_2_with_one_line_on_a_corrupt_model(tmp_path):
    """The installed script turns a corrupt model into exit status 2 and one stderr line."""
    _, image = _model_and_image(tmp_path)
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(np.random.default_rng(1).bytes(2000))
    done = _run([*_console_script(), "explain", str(corrupt), image], tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "corrupt.keras" in done.stderr
    assert "corrupt or truncated" in done.stderr


@pytest.mark.parametrize("problem", ["existing output", "unwritable out"])
def test_output_problems_stop_explain_before_tensorflow_is_imported(tmp_path, problem):
    """An existing output file or an unwritable --out: exit 2, one line, no TensorFlow import."""
    model, image = _model_and_image(tmp_path)
    if problem == "existing output":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "a_gradcam.png").write_bytes(b"earlier run")
        out, message = "out", f"{str(Path('out', 'a_gradcam.png'))!r} already exists"
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("needs Linux's /proc")
        out, message = (
            "/proc/tf-gradcam-test",
            "cannot create output folder '/proc/tf-gradcam-test'",
        )
    report, printed, err = _main(["explain", model, image, "--out", out], tmp_path)
    assert report["code"] == 2 and not report["tensorflow"] and not report["keras"]
    assert printed == "" and err.count("\n") == 1 and message in err
    if problem == "existing output":
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_gradcam.png"]
