"""The `tf-gradcam` command: `demo`, `explain`, `report`. The only module touching image files.

    tf-gradcam demo [--out DIR] [--count N] [--seed S] [--overwrite] [--verbose] [--debug]
    tf-gradcam explain MODEL INPUT... [--layer NAME] [--class INDEX | --top-k K]
                       [--method gradcam|gradcam++|xgradcam|hirescam|layercam|scorecam|
                                 ablationcam|eigencam|counterfactual|guided_backprop|
                                 guided_gradcam]
                       [--preprocess unit|raw|symmetric] [--labels FILE] [--out DIR]
                       [--alpha A] [--trust-model] [--overwrite] [--verbose] [--debug]
    tf-gradcam report SHARDS_DIR [--images FILE.npy | --images IMAGE_OR_DIR...]
                      [--labels FILE] [--regions FILE.npz] [--out FILE.html] [--title TEXT]
                      [--thumbnail PX] [--format png|jpeg] [--quality Q] [--page-size N]
                      [--alpha A] [--overwrite] [--verbose] [--debug]

`report` writes one self-contained HTML page of the overlays of an
`explain_dataset` shard folder (`tf_gradcam.html_report.report`); the images
come from one `.npy` array (memory-mapped) or PNG/JPEG files (a folder's,
sorted by name), the i-th for position i, decoded here one at a time.

`explain` loads a `.keras` model with Keras' safe mode on (`--trust-model`
turns it off, and is required for legacy `.h5`/`.hdf5` files, which safe mode
cannot check), reads PNG/JPEG images, converts them to the model's channels
(RGB or grayscale) and size, and writes colour overlays and the raw maps
(`.npy`) into the output folder and nowhere else. `--labels` names the classes
in the file names, the printed table and a caption on each PNG.

For a model whose one input is a signal `(batch, length, channels)` (Conv1D) or
a volume `(batch, depth, height, width, channels)` (Conv3D), the inputs are
`.npy` files (or `.npz` files holding one array), each one signal `(length,
channels)` or volume `(depth, height, width, channels)`, the channel axis
optional for a one-channel model; they are fed as stored (float32), their
shapes checked against the model's first. It writes per input and class the
raw map (`.npy`) and `pictures.signal_picture` for a signal, or
`pictures.volume_montage` (`_montage.png`) and `pictures.orthogonal_slices`
(`_slices.png`) for a volume. Image files for such a model, and arrays for an
image model, are refused.

Outputs: the output folder is created and checked writable, and every file the
command would write is checked absent (unless `--overwrite`), before anything
is computed. Each file is written under a temporary name and renamed into place
once complete, so a failure (a full disk...) leaves no partial file, and a
replaced file is either the old one or the new one. Other files in the folder
are never touched; the folders the command created are removed again if it
fails before writing into them.

The module imports TensorFlow only when a subcommand needs it, so `--help`
answers at once, and hides TensorFlow's start-up log lines unless `--verbose`
is given. Exit status: 0 on success; 2 on a user error (a missing or
unreadable file, an unknown layer, an out-of-range class, an existing output,
a full disk...), after one line on stderr; 1 on an internal error (a bug),
after one line naming the exception. `--debug` adds the traceback to both.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import traceback
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import numpy as np

from tf_gradcam import __version__
from tf_gradcam.errors import GradCAMError, UnknownMethodError
from tf_gradcam.methods import METHODS, method_name

__all__ = ["main"]

_PREPROCESS = {
    "unit": (1.0 / 255.0, 0.0),  # [0, 1]
    "raw": (1.0, 0.0),  # [0, 255]
    "symmetric": (2.0 / 255.0, -1.0),  # [-1, 1]
}
#: --method values beyond the CAM methods of `tf_gradcam.methods.METHODS`
_PIXEL_METHODS = ("counterfactual", "guided_backprop", "guided_gradcam")
_HDF5_SUFFIXES = (".h5", ".hdf5")
_PYTHON_LOGGERS = ("absl", "tensorflow")  # `tf.get_logger()` is the "tensorflow" logger
_CAPTION_MIN_WIDTH = 256  # captioned pictures are enlarged to at least this width
_CAPTION_FONT = "DejaVuSans.ttf"  # ships with Matplotlib; Latin, Greek, Cyrillic
_EXPLAIN_SUFFIXES = (".png", ".npy")  # the files `explain` writes per image and class
_ARRAY_SUFFIXES = (".npy", ".npz")  # inputs read as arrays (signals, volumes), not images
#: the files `explain` writes per input and class, by the kind of input the model takes
_KIND_SUFFIXES = {
    "image": _EXPLAIN_SUFFIXES,
    "signal": _EXPLAIN_SUFFIXES,
    "volume": ("_montage.png", "_slices.png", ".npy"),
}
#: array inputs by the model's input rank, with the axes of one input (no batch axis)
_ARRAY_KINDS = {
    3: ("signal", "(length, channels)"),
    5: ("volume", "(depth, height, width, channels)"),
}
_VOLUME_CELL = 128  # volume pictures are enlarged by a whole factor to about this many pixels


class CommandError(Exception):
    """A user error: `main` prints its message on one line and returns exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose usage errors are one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ------------------------------------------------------------------ TensorFlow


@contextmanager
def _stderr_captured() -> Iterator[None]:
    """Sends file descriptor 2 to a temporary file; replays its text only on an exception."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to protect
        yield
        return
    failed = False
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                captured.seek(0)
                sys.stderr.write(captured.read().decode(errors="replace"))


def _import_tensorflow(verbose: bool) -> None:
    """Imports TensorFlow and Keras, without their log output unless `verbose`.

    Without `verbose`: `TF_CPP_MIN_LOG_LEVEL` is set to 3 (no INFO, WARNING or ERROR
    lines) unless the environment already sets it; the lines TensorFlow's native
    libraries print while they load, which no log level controls (oneDNN, CUDA and
    CPU-feature notices), are captured and shown only if the import fails; the Python
    loggers of absl and TensorFlow drop everything below ERROR, and Keras/TensorFlow
    warnings are ignored (`main` restores both on exit).

    Args:
        verbose: leave the environment, stderr and the loggers as they are.
    """
    if "tensorflow" not in sys.modules:
        if not verbose:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with nullcontext() if verbose else _stderr_captured():
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
    if not verbose:
        for name in _PYTHON_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=r"(keras|tensorflow|absl)(\.|$)")


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """`warnings.showwarning` for the command: one line, `tf-gradcam: warning: ...`."""
    print(f"tf-gradcam: warning: {' '.join(str(message).split())}", file=file or sys.stderr)


@contextmanager
def _command_diagnostics() -> Iterator[None]:
    """Warnings shown as one line each; logger levels and warning settings restored on exit."""
    registry = logging.Logger.manager.loggerDict
    levels = {
        name: getattr(registry.get(name), "level", logging.NOTSET) for name in _PYTHON_LOGGERS
    }
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            yield
        finally:
            for name, level in levels.items():
                if name in registry:
                    logging.getLogger(name).setLevel(level)


# ------------------------------------------------------------------ reading inputs


def _check_model_file(name: str, trust: bool) -> None:
    """Checks a model file before TensorFlow is imported: exists, readable, right format.

    Args:
        name: the model path as given on the command line.
        trust: whether `--trust-model` was given.

    Raises:
        CommandError: a missing, unreadable, corrupt or truncated file; a suffix other
            than `.keras`, `.h5`, `.hdf5`; an HDF5 file without `trust`.
    """
    path = Path(name)
    if path.is_dir():
        raise CommandError(f"model {name!r} is a folder; give a .keras model file.")
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise CommandError(f"cannot read model {name!r}: {error.strerror}.") from error
    suffix = path.suffix.lower()
    if suffix in _HDF5_SUFFIXES:
        if not trust:
            raise CommandError(
                f"{name!r} is a legacy HDF5 model; Keras' safe mode cannot protect HDF5 files, "
                "which can hold arbitrary code (Lambda layers). Pass --trust-model only if you "
                "trust its source, or re-save it with model.save('model.keras')."
            )
        import h5py

        if not h5py.is_hdf5(path):
            raise CommandError(f"cannot load model {name!r}: not an HDF5 file (corrupt?).")
    elif suffix == ".keras":
        if not zipfile.is_zipfile(path):
            raise CommandError(
                f"cannot load model {name!r}: not a .keras (zip) archive; the file is "
                "corrupt or truncated."
            )
    else:
        raise CommandError(
            f"{name!r} is not a model file: expected a .keras file (or .h5/.hdf5 with "
            "--trust-model)."
        )


def _load_model(name: str, trust: bool) -> Any:
    """Loads a checked model file, uncompiled, with safe mode on unless `trust`.

    Args:
        name: the model path as given on the command line.
        trust: whether `--trust-model` was given.

    Returns:
        The `keras.Model`.

    Raises:
        CommandError: if safe mode refuses the model or Keras cannot load it.
    """
    import keras

    import tf_gradcam.guided  # noqa: F401  registers GuidedReLU/DeconvReLU for loading

    try:
        return keras.saving.load_model(name, compile=False, safe_mode=not trust)
    except Exception as error:
        text = str(error)
        if "safe_mode" in text or "unsafe" in text.lower():
            raise CommandError(
                f"Keras safe mode refused {name!r}: it holds Python code such as a Lambda "
                "layer. Pass --trust-model only if you trust where this model comes from."
            ) from error
        first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        raise CommandError(f"cannot load model {name!r}: {first_line[:300]}") from error


def _read_labels(name: str) -> list[str]:
    """Class names from a file: a JSON list of strings, or else one name per line.

    Args:
        name: the `--labels` path.

    Returns:
        The names, stripped of surrounding whitespace; trailing blank lines are ignored.

    Raises:
        CommandError: an unreadable file, a JSON list holding non-strings, no names,
            or an empty line between names.
    """
    try:
        text = Path(name).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise CommandError(f"cannot read labels file {name!r}: {reason}.") from error
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, list):
        if not all(isinstance(item, str) for item in parsed):
            raise CommandError(f"labels file {name!r}: the JSON list must hold strings only.")
        labels = [item.strip() for item in parsed]
    else:
        labels = [line.strip() for line in text.splitlines()]
        while labels and not labels[-1]:
            labels.pop()
    if not labels:
        raise CommandError(f"labels file {name!r} names no classes.")
    if "" in labels:
        raise CommandError(
            f"labels file {name!r}: class {labels.index('')} has an empty name (blank line?)."
        )
    return labels


def _read_rgb(name: str) -> np.ndarray:
    """Decodes an image file to RGB; a grayscale file's channel is repeated three times.

    Args:
        name: the image path.

    Returns:
        uint8 `(height, width, 3)` RGB array.

    Raises:
        CommandError: a missing or unreadable file, or one OpenCV cannot decode.
    """
    import cv2

    try:
        data = Path(name).read_bytes()
    except OSError as error:
        raise CommandError(f"cannot read image {name!r}: {error.strerror}.") from error
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise CommandError(f"cannot read image {name!r}: not a PNG/JPEG file (or corrupt).")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _is_array_file(name: str) -> bool:
    """Whether an input path names a NumPy file (`.npy`, `.npz`) rather than an image."""
    return Path(name).suffix.lower() in _ARRAY_SUFFIXES


def _read_array(name: str) -> np.ndarray:
    """Reads one input array from a `.npy` file, or a `.npz` file holding exactly one array.

    Pickled (object) arrays are refused: `np.load` runs with `allow_pickle=False`.

    Args:
        name: the `.npy`/`.npz` path.

    Returns:
        The array as stored (its shape is checked against the model later).

    Raises:
        CommandError: a missing or unreadable file, one NumPy cannot read, an `.npz`
            holding no array or several, a non-numeric or empty array, or non-finite values.
    """
    try:
        with open(name, "rb") as handle:
            loaded = np.load(handle, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    keys = list(loaded.files)
                    if len(keys) != 1:
                        raise CommandError(
                            f"{name!r} holds {len(keys)} arrays {keys}; an .npz input must hold "
                            "exactly one (save it with np.savez(path, array) or np.save as .npy)."
                        )
                    loaded = loaded[keys[0]]
    except OSError as error:
        raise CommandError(f"cannot read array {name!r}: {error.strerror or error}.") from error
    except (ValueError, EOFError, zipfile.BadZipFile) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise CommandError(
            f"cannot read array {name!r}: not a NumPy .npy/.npz file, corrupt, or a pickled "
            f"object array{f' ({first})' if first else ''}."
        ) from error
    array = np.asarray(loaded)
    if array.dtype.kind not in "biuf":
        raise CommandError(
            f"{name!r} holds a {array.dtype} array; the model needs numbers (bool, int or float)."
        )
    if array.size == 0:
        raise CommandError(f"{name!r} holds an empty array, of shape {array.shape}.")
    if not np.isfinite(array).all():
        raise CommandError(f"{name!r} holds NaN or infinite values; the model needs finite ones.")
    return array


def _model_shape(model: Any) -> tuple[int | None, ...]:
    """The shape of the model's one input, batch axis included.

    Raises:
        CommandError: for models with several inputs, or an input that is neither an
            image `(batch, height, width, channels)` nor an array the CLI reads (a
            signal of rank 3 or a volume of rank 5).
    """
    inputs = getattr(model, "inputs", None) or []
    shape = tuple(inputs[0].shape) if len(inputs) == 1 else ()
    if len(shape) not in (3, 4, 5):
        described = [tuple(t.shape) for t in inputs] if inputs else "unknown"
        raise CommandError(
            "the CLI needs a model with one fixed-size image input, or one signal "
            "(batch, length, channels) or volume (batch, depth, height, width, channels) input "
            f"read from .npy files; this model's inputs are {described}. Use the Python API "
            "for other models."
        )
    return shape


def _shown_shape(shape: Sequence[int | None]) -> str:
    """A shape as text, with `None` (any size) written as `any`: `(any, 2)`."""
    parts = ["any" if size is None else str(size) for size in shape]
    return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"  # () for none


def _fits(shape: Sequence[int], expected: Sequence[int | None]) -> bool:
    """Whether an array shape matches a model shape whose `None` sizes match anything."""
    return len(shape) == len(expected) and all(
        size is None or size == got for got, size in zip(shape, expected, strict=True)
    )


def _model_array(name: str, array: np.ndarray, model_shape: Sequence[int | None]) -> np.ndarray:
    """One signal or volume as the model's float32 input, its shape checked against the model.

    Accepted: exactly the model's input shape without the batch axis (sizes the model
    leaves open, `None`, take any value), or that shape without its channel axis when
    the model has one channel.

    Args:
        name: the file the array came from, for the message.
        array: the array read from it.
        model_shape: the model's input shape, batch axis included (rank 3 or 5).

    Returns:
        float32 array of the model's input shape without the batch axis.

    Raises:
        CommandError: naming the file, the shape received and the shape expected.
    """
    kind, axes = _ARRAY_KINDS[len(model_shape)]
    expected = tuple(model_shape[1:])
    if _fits(array.shape, expected):
        return array.astype(np.float32)
    if expected[-1] == 1 and _fits(array.shape, expected[:-1]):
        return array[..., None].astype(np.float32)
    one_channel = (
        f" (or {_shown_shape(expected[:-1])} for one channel)" if expected[-1] == 1 else ""
    )
    if array.ndim == len(expected) + 1 and _fits(array.shape[1:], expected):
        hint = f"it looks like a batch of {array.shape[0]}; save one {kind} per file"
    elif array.ndim == len(expected) and _fits(sorted(array.shape), sorted(expected)):
        hint = f"are its axes in another order? The model wants them as {axes}"
    else:
        hint = f"save each {kind} with np.save(path, array) at that shape"
    raise CommandError(
        f"{name!r} holds an array of shape {_shown_shape(array.shape)}, but the model takes one "
        f"{kind} of shape {axes} = {_shown_shape(expected)}{one_channel} per file; {hint}."
    )


def _check_input_kinds(
    names: Sequence[str], model_shape: Sequence[int | None], preprocess: str | None
) -> str:
    """The kind of input the model takes, after checking the files given suit it.

    Image models take image files only; signal and volume models take `.npy`/`.npz`
    files only, fed as stored, so `--preprocess` (image pixel scaling) is refused.

    Returns:
        "image", "signal" or "volume".

    Raises:
        CommandError: naming the first file of the wrong kind and what to give instead.
    """
    shown = tuple(model_shape)
    if len(model_shape) == 4:
        for name in names:
            if _is_array_file(name):
                raise CommandError(
                    f"{name!r} is an array file, but the model takes images (batch, height, width, "
                    f"channels) = {shown}; give PNG/JPEG files (.npy/.npz inputs are read for "
                    "Conv1D signal and Conv3D volume models), or use the Python API for arrays."
                )
        return "image"
    kind, axes = _ARRAY_KINDS[len(model_shape)]
    expected = _shown_shape(model_shape[1:])
    for name in names:
        if not _is_array_file(name):
            raise CommandError(
                f"{name!r} is not a .npy/.npz file, but the model takes {kind}s (batch, "
                f"{axes[1:-1]}) = {shown}, not images; give .npy files each holding one {kind} "
                f"of shape {axes} = {expected} (np.save(path, array))."
            )
    if preprocess is not None:
        raise CommandError(
            f"--preprocess scales image pixels; the model takes {kind}s, which are fed as stored "
            "in the .npy files. Scale the arrays before saving them, and leave --preprocess out."
        )
    return kind


def _model_inputs(
    originals: Sequence[np.ndarray], size: tuple[int, int], channels: int, preprocess: str
) -> np.ndarray:
    """The model's float32 batch: images in its channels, resized (area) and scaled.

    RGB becomes grayscale for a 1-channel model with OpenCV's `COLOR_RGB2GRAY`
    (Y = 0.299 R + 0.587 G + 0.114 B) before resizing.

    Args:
        originals: uint8 RGB images of any size.
        size: the model's `(height, width)`.
        channels: the model's input channels, 1 or 3.
        preprocess: a `_PREPROCESS` key.

    Returns:
        float32 `(batch, height, width, channels)` array.
    """
    import cv2

    scale, shift = _PREPROCESS[preprocess]
    batch = []
    for rgb in originals:
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if channels == 1 else rgb
        resized = cv2.resize(pixels, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        batch.append(resized.reshape(*size, channels).astype(np.float32) * scale + shift)
    return np.stack(batch)


def _image_geometry(model: Any) -> tuple[tuple[int, int], int]:
    """The model's input `(height, width)` and channels (1 or 3).

    Args:
        model: the loaded `keras.Model`.

    Raises:
        CommandError: for models without one fixed-size 1- or 3-channel image input.
    """
    inputs = getattr(model, "inputs", None) or []
    shape = tuple(inputs[0].shape) if len(inputs) == 1 else ()
    if len(shape) != 4 or shape[1] is None or shape[2] is None:
        described = [tuple(t.shape) for t in inputs] if inputs else "unknown"
        raise CommandError(
            "the CLI needs a model with one fixed-size image input; this model's inputs are "
            f"{described}. Use the Python API for other models."
        )
    if shape[3] not in (1, 3):
        raise CommandError(
            f"the model's input has {shape[3]} channels; the CLI feeds RGB (3) or grayscale (1) "
            "images. Use the Python API for other inputs."
        )
    return (int(shape[1]), int(shape[2])), int(shape[3])


def _check_labels(labels: list[str], model: Any, name: str) -> None:
    """Checks that there is one label per output of the model's `(batch, classes)` head.

    Args:
        labels: the class names read from `name`.
        model: the loaded `keras.Model`.
        name: the `--labels` path, for the message.

    Raises:
        CommandError: for other heads, or a count that differs from the model's.
    """
    outputs = getattr(model, "outputs", None) or []
    shape = tuple(outputs[0].shape) if len(outputs) == 1 else ()
    if len(shape) != 2:
        raise CommandError(
            f"--labels needs a model with one (batch, classes) output; this model's outputs "
            f"are {[tuple(t.shape) for t in outputs]}."
        )
    if len(labels) != shape[1]:
        raise CommandError(
            f"labels file {name!r} names {len(labels)} classes but the model has "
            f"{shape[1]} outputs."
        )


# ------------------------------------------------------------------ writing outputs


def _safe_name(text: str) -> str:
    """`text` as a plain file-name part: no separators, no leading dot."""
    return re.sub(r"[^\w.-]", "_", text).lstrip(".")


def _unique(name: str, taken: set[str]) -> str:
    """`name`, or `name_2`, `name_3`... if taken; records the result in `taken`."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


def _safe_stem(path: str, taken: set[str]) -> str:
    """A file-name stem from an input path that cannot leave the output folder."""
    return _unique(_safe_name(Path(path).stem) or "image", taken)


def _image_stems(paths: Sequence[str]) -> list[str]:
    """The file-name stem of each input image: safe, and unique within the run."""
    taken: set[str] = set()
    return [_safe_stem(path, taken) for path in paths]


@contextmanager
def _output_folder(name: str) -> Iterator[Path]:
    """The output folder, created with its missing parents and checked writable.

    If the command then fails, the folders created here are removed again while
    still empty, so a run that wrote nothing leaves nothing behind.

    Args:
        name: the `--out` path as given on the command line.

    Yields:
        The folder.

    Raises:
        CommandError: if it is an existing file, cannot be created or cannot be
            written into (no permission, a read-only or special file system...).
    """
    out = Path(name)
    if out.exists() and not out.is_dir():
        raise CommandError(f"output folder {name!r} is an existing file.")
    created = [folder for folder in (out, *out.parents) if not os.path.lexists(folder)]
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CommandError(
                f"cannot create output folder {name!r}: {error.strerror or error}."
            ) from error
        try:
            with tempfile.NamedTemporaryFile(dir=out, prefix=".tf-gradcam-", suffix=".probe"):
                pass
        except OSError as error:
            raise CommandError(
                f"cannot write into output folder {name!r}: {error.strerror or error}."
            ) from error
        yield out
    except BaseException:
        for folder in created:  # deepest first
            with suppress(OSError):
                folder.rmdir()
        raise


def _refuse_existing(out: Path, targets: Sequence[str | re.Pattern[str]], overwrite: bool) -> None:
    """Stops the command if a file it would write is already in `out`, unless `overwrite`.

    Args:
        out: the output folder.
        targets: what the command writes, in writing order: exact file names, or
            patterns matching every name an output can get where the name depends on
            the predicted class (checked before the classes are known).
        overwrite: whether `--overwrite` was given; then nothing is checked.

    Raises:
        CommandError: naming the first existing file and the `--overwrite` flag.
    """
    if overwrite:
        return
    present = sorted(os.listdir(out))
    for target in targets:
        if isinstance(target, str):
            found = target if os.path.lexists(out / target) else None
            reason = "already exists"
        else:
            found = next((name for name in present if target.fullmatch(name)), None)
            reason = (
                "already exists and may be replaced (output names depend on the predicted class)"
            )
        if found is not None:
            raise CommandError(
                f"{str(out / found)!r} {reason}; pass --overwrite to replace existing files, "
                "or choose another --out."
            )


def _write_file(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Writes a file whole or not at all: into a temporary name, renamed once complete.

    The temporary file is a hidden sibling of `path`, removed if writing fails, so a
    full disk leaves neither a partial file nor a changed old one.

    Args:
        path: the file to write (replaced if it exists).
        write: writes the content into the open binary file it is given.

    Raises:
        CommandError: naming the file and the operating system's reason.
    """
    # a hidden, unique sibling, its name short enough for any file system's limit
    temporary = path.with_name(f".{path.name[:40]}.{uuid.uuid4().hex[:12]}.part")
    try:
        with open(temporary, "xb") as handle:
            write(handle)
        os.replace(temporary, path)
    except OSError as error:
        raise CommandError(f"cannot write {str(path)!r}: {error.strerror or error}.") from error
    finally:
        with suppress(OSError):  # gone after the rename; what is left of it after a failure
            os.remove(temporary)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    """Writes a uint8 RGB image as PNG; `CommandError` if the file cannot be written."""
    import cv2

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise CommandError(f"cannot write {str(path)!r}: PNG encoding failed.")
    data = encoded.tobytes()
    _write_file(path, lambda handle: handle.write(data))


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Saves an array as `.npy`; `CommandError` if the file cannot be written."""
    _write_file(path, lambda handle: np.save(handle, array, allow_pickle=False))


def _captioned(rgb: np.ndarray, label: str, score: float) -> np.ndarray:
    """The picture above a black strip that reads "label: score" in white.

    Pictures narrower than `_CAPTION_MIN_WIDTH` are first enlarged by the smallest
    integer factor that reaches it, each pixel becoming a square block, so the
    caption is legible on small model-sized images. A caption too long for the
    width is set smaller, down to 11 px, and then the label is shortened with "…".

    Args:
        rgb: uint8 `(height, width, 3)` picture.
        label: the class name, any Unicode.
        score: the explained score.

    Returns:
        uint8 `(factor * height + strip, factor * width, 3)` picture.
    """
    from matplotlib import get_data_path
    from PIL import Image, ImageDraw, ImageFont

    factor = -(-_CAPTION_MIN_WIDTH // rgb.shape[1])  # ceil
    big = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
    width = big.shape[1]
    size = max(14, width // 18)
    font = ImageFont.truetype(str(Path(get_data_path()) / "fonts" / "ttf" / _CAPTION_FONT), size)
    text = f"{label}: {score:.3g}"
    if font.getlength(text) > width - size:
        size = max(11, int(size * (width - size) / font.getlength(text)))
        font = font.font_variant(size=size)
    while font.getlength(text) > width - size and len(label) > 1:
        label = label[:-1]
        text = f"{label}…: {score:.3g}"
    strip = Image.new("RGB", (width, round(size * 1.6)), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    draw.text((size // 2, round(size * 0.8)), text, fill=(255, 255, 255), font=font, anchor="lm")
    return np.concatenate([big, np.asarray(strip)], axis=0)


# ------------------------------------------------------------------ subcommands


def _run_demo(args: argparse.Namespace) -> int:
    """`tf-gradcam demo`: the shipped model on generated scenes; writes PNGs and maps."""
    with _output_folder(args.out) as out:
        _import_tensorflow(args.verbose)
        from tf_gradcam import GradCAM, overlay
        from tf_gradcam.demo_model import DEMO_CLASS_NAMES, DEMO_LAYER_NAME, load_demo_model
        from tf_gradcam.metrics import pointing_game
        from tf_gradcam.scenes import make_scenes

        fixed = ["maps.npy", "demo_grid.png"]
        shapes = "|".join(map(re.escape, DEMO_CLASS_NAMES))  # scenes are named after the class
        any_scene = [re.compile(rf"scene_{i:02d}_(?:{shapes})\.png") for i in range(args.count)]
        _refuse_existing(out, [*any_scene, *fixed], args.overwrite)
        scenes = make_scenes(args.count, seed=args.seed)
        result = GradCAM(load_demo_model(), DEMO_LAYER_NAME)(scenes.images)
        overlays = overlay(scenes.images, result.heatmaps)
        hits = pointing_game(result.heatmaps, scenes.masks[:, 0])
        names = [f"scene_{i:02d}_{DEMO_CLASS_NAMES[c]}.png" for i, c in enumerate(result.classes)]
        _refuse_existing(out, [*names, *fixed], args.overwrite)
        for name, picture in zip(names, overlays, strict=True):
            _write_png(out / name, picture)
        _save_npy(out / "maps.npy", result.maps)
        _write_file(
            out / "demo_grid.png", lambda handle: _demo_grid(handle, scenes, result, overlays)
        )

    accuracy = float(np.mean(result.classes == scenes.labels))
    print(f"tf_gradcam demo: explained {len(scenes)} generated scenes with the shipped model")
    print(f"  layer: {result.layer}   predicted correctly: {accuracy:.0%}")
    print(f"  map maximum on the object (pointing game): {hits.mean():.0%}")
    print(f"  overview:  {(out / 'demo_grid.png').resolve()}")
    print(f"  overlays:  {len(scenes)} PNGs in {out.resolve()}")
    print(f"  raw maps:  {(out / 'maps.npy').resolve()}  shape {result.maps.shape}")
    return 0


def _demo_grid(handle: BinaryIO, scenes: Any, result: Any, overlays: np.ndarray) -> None:
    """Draws the demo's overview, scenes above overlays, as a PNG into `handle`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tf_gradcam.demo_model import DEMO_CLASS_NAMES

    columns = len(scenes)
    figure, axes = plt.subplots(2, columns, figsize=(2.0 * columns, 4.3))
    try:
        axes = np.asarray(axes).reshape(2, columns)
        for i in range(columns):
            truth = DEMO_CLASS_NAMES[scenes.labels[i]]
            guess = DEMO_CLASS_NAMES[result.classes[i]]
            axes[0, i].imshow(scenes.images[i])
            axes[0, i].set_title(f"true: {truth}", fontsize=9)
            axes[1, i].imshow(overlays[i])
            axes[1, i].set_title(f"Grad-CAM: {guess}", fontsize=9)
            for ax in axes[:, i]:
                ax.axis("off")
        figure.suptitle(f"tf_gradcam demo — layer {result.layer!r}", fontsize=10)
        figure.tight_layout()
        figure.savefig(handle, format="png", dpi=100)
    finally:
        plt.close(figure)


def _run_explain(args: argparse.Namespace) -> int:
    """`tf-gradcam explain`: a PNG (two for volumes) and a `.npy` per input and class."""
    _check_model_file(args.model, args.trust_model)
    labels = _read_labels(args.labels) if args.labels else None
    inputs = [
        _read_array(name) if _is_array_file(name) else _read_rgb(name) for name in args.images
    ]
    guessed = [_guessed_kind(name, x) for name, x in zip(args.images, inputs, strict=True)]
    with _output_folder(args.out) as out:
        _refuse_existing(out, _explain_targets(args, labels, guessed), args.overwrite)
        _import_tensorflow(args.verbose)
        from tf_gradcam import TopK

        model = _load_model(args.model, args.trust_model)
        model_shape = _model_shape(model)
        kind = _check_input_kinds(args.images, model_shape, args.preprocess)
        if kind == "image":
            size, channels = _image_geometry(model)
        if labels is not None:
            _check_labels(labels, model, args.labels)
        target = TopK(args.top_k) if args.top_k else args.class_index
        if kind == "image":
            images = _model_inputs(inputs, size, channels, args.preprocess or "unit")
            result, pixels = _explain_with_method(model, images, target, args)
            rows = _write_explanations(out, args, inputs, result, pixels, labels)
            layer = result.layer
        else:
            arrays = [
                _model_array(name, x, model_shape)
                for name, x in zip(args.images, inputs, strict=True)
            ]
            explained = _explain_arrays(model, arrays, target, args)
            rows = _write_array_explanations(out, args, arrays, explained, labels, kind)
            layer = explained[0][0].layer
    _print_table(rows, labels is not None, "image" if kind == "image" else "input")
    if kind == "volume":
        wrote = f"{len(rows)} montage PNG(s), {len(rows)} slices PNG(s) and {len(rows)} .npy"
    else:
        wrote = f"{len(rows)} PNG + .npy pair(s)"
    print(f"layer {layer}, method {args.method}: wrote {wrote} into {out.resolve()}")
    return 0


def _guessed_kind(name: str, data: np.ndarray) -> str:
    """The kind of an input from its file alone, before the model is loaded.

    It fixes which output names are checked before anything is computed: an image
    file is an image, an array of 3 or 4 axes a volume, any other array a signal.
    The model's input decides in the end (`_check_input_kinds`).
    """
    if not _is_array_file(name):
        return "image"
    return "volume" if data.ndim in (3, 4) else "signal"


def _explanation_names(
    args: argparse.Namespace, classes: Sequence[Sequence[int]], labels: list[str] | None
) -> list[list[str]]:
    """The output file names, without suffix, of each image's explained classes.

    `<image>_<method>`, `<image>_class<k>_<method>` with `--top-k`, or
    `<image>_<class name>_<method>` with `--labels`; unique within the run.

    Args:
        args: the parsed `explain` arguments (images, method, top-k).
        classes: the explained classes of each image.
        labels: the class names, or None.
    """
    method = _method_token(args.method)
    taken: set[str] = set()
    names = []
    for stem, image_classes in zip(_image_stems(args.images), classes, strict=True):
        row = []
        for c in image_classes:
            if labels is not None:
                row.append(_unique(f"{stem}_{_safe_name(labels[c]) or c}_{method}", taken))
            elif args.top_k:
                row.append(_unique(f"{stem}_class{c}_{method}", taken))
            else:
                row.append(_unique(f"{stem}_{method}", taken))
        names.append(row)
    return names


def _explain_targets(
    args: argparse.Namespace, labels: list[str] | None, kinds: Sequence[str] | None = None
) -> list[str | re.Pattern[str]]:
    """What `explain` will write, in writing order, known before anything is computed.

    Exact file names where the arguments fix them; where they depend on the
    predicted classes (`--top-k`, or `--labels` without `--class`), one pattern per
    input matching every name its classes can give. `kinds` gives each input's kind
    ("image", "signal", "volume": which files it gets); all images by default.
    """
    kinds = kinds if kinds is not None else ["image"] * len(args.images)
    endings = [_KIND_SUFFIXES[kind] for kind in kinds]
    if not args.top_k and (labels is None or args.class_index in range(len(labels))):
        classes = [[args.class_index or 0]] * len(args.images)
        rows = _explanation_names(args, classes, labels)
        return [
            f"{name}{suffix}"
            for row, suffixes in zip(rows, endings, strict=True)
            for name in row
            for suffix in suffixes
        ]
    if labels is not None:
        part = "|".join(re.escape(_safe_name(label) or str(c)) for c, label in enumerate(labels))
    else:
        part = r"class\d+"
    method = re.escape(_method_token(args.method))
    return [
        re.compile(
            rf"{re.escape(stem)}_(?:{part})_{method}(?:_\d+)?(?:{'|'.join(map(re.escape, ends))})"
        )
        for stem, ends in zip(_image_stems(args.images), endings, strict=True)
    ]


def _method(value: str) -> str:
    """`--method`: a CAM method (any spelling `method_name` accepts) or a pixel method."""
    if value in _PIXEL_METHODS:
        return value
    try:
        return method_name(value)
    except UnknownMethodError:
        raise argparse.ArgumentTypeError(
            f"unknown method {value!r}; choose from {', '.join([*METHODS, *_PIXEL_METHODS])}"
        ) from None


def _method_token(method: str) -> str:
    """The method as written in output file names: `guided-gradcam`, `gradcampp`."""
    return method.replace("_", "-").replace("++", "pp")


def _explain_with_method(
    model: Any, images: np.ndarray, target: Any, args: argparse.Namespace
) -> tuple[Any, np.ndarray | None]:
    """Run the chosen method: (Grad-CAM explanation, pixel gradients or None)."""
    from tf_gradcam import GradCAM, GuidedBackprop, GuidedGradCAM
    from tf_gradcam.methods import get_method

    if args.method in METHODS:
        return get_method(args.method)(model, args.layer)(images, target=target), None
    if args.method == "counterfactual":
        return GradCAM(model, args.layer, counterfactual=True)(images, target=target), None
    fused = GuidedGradCAM(model, args.layer)(images, target=target)
    if args.method == "guided_gradcam":
        return fused.cam, fused.gradients
    backprop = GuidedBackprop(model)(images, target=target)
    return fused.cam, backprop.gradients


def _write_explanations(
    out: Path,
    args: argparse.Namespace,
    originals: Sequence[np.ndarray],
    result: Any,
    pixels: np.ndarray | None,
    labels: list[str] | None,
) -> list[tuple[str, int, str, float, str]]:
    """Writes a PNG and a `.npy` per image and class, none of which may exist yet.

    Grad-CAM methods write the overlay on the original image and the layer-resolution
    map; guided methods write the display-normalised and the raw pixel gradients.
    With `labels`, file names carry the class name and each PNG a caption
    "name: score".

    Returns:
        One row per file pair: (image path, class, class name or "", score, PNG name).

    Raises:
        CommandError: if one of the files exists and `--overwrite` was not given (checked
            before the first is written), or a file cannot be written.
    """
    import cv2

    from tf_gradcam import overlay
    from tf_gradcam.image import normalize_gradients

    height, width = result.heatmaps.shape[-2:]
    classes = [np.atleast_1d(image_classes).tolist() for image_classes in result.classes]
    names = _explanation_names(args, classes, labels)
    files = [f"{name}{suffix}" for row in names for name in row for suffix in _EXPLAIN_SUFFIXES]
    _refuse_existing(out, files, args.overwrite)  # exact names, now that the classes are known
    rows = []
    for i, (path, rgb) in enumerate(zip(args.images, originals, strict=True)):
        scores = np.atleast_1d(result.scores[i]).tolist()
        heat = result.heatmaps[i].reshape(len(classes[i]), height, width)
        maps = result.maps[i].reshape(len(classes[i]), *result.maps.shape[-2:])
        for j, (c, score, name) in enumerate(zip(classes[i], scores, names[i], strict=True)):
            label = labels[c] if labels is not None else ""
            if pixels is None:
                big = cv2.resize(
                    heat[j], (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR
                )
                picture, array = overlay(rgb, big, alpha=args.alpha), maps[j]
            else:
                array = pixels[i].reshape(len(classes[i]), height, width, -1)[j]
                shown = normalize_gradients(array[None])[0]
                shown = np.repeat(shown, 3, axis=-1) if shown.shape[-1] == 1 else shown[..., :3]
                picture = np.round(shown * 255).astype(np.uint8)
            if labels is not None:
                picture = _captioned(picture, label, score)
            _write_png(out / f"{name}.png", picture)
            _save_npy(out / f"{name}.npy", array)
            rows.append((path, int(c), label, float(score), f"{name}.png"))
    return rows


def _explain_arrays(
    model: Any, arrays: Sequence[np.ndarray], target: Any, args: argparse.Namespace
) -> list[tuple[Any, np.ndarray | None, int]]:
    """Runs the method on signals or volumes, one batch per distinct input shape.

    Arrays of one shape (always so for a model of fixed size) form one batch; a model
    that leaves a size open (`None`) gets one batch per size given.

    Returns:
        Per input, in order: (its batch's explanation, its batch's pixel gradients or
        None, its position in that batch).
    """
    batches: dict[tuple[int, ...], list[int]] = {}
    for i, array in enumerate(arrays):
        batches.setdefault(array.shape, []).append(i)
    explained: list[Any] = [None] * len(arrays)
    for indices in batches.values():
        batch = np.stack([arrays[i] for i in indices])
        result, pixels = _explain_with_method(model, batch, target, args)
        for position, i in enumerate(indices):
            explained[i] = (result, pixels, position)
    return explained


def _gradient_heat(gradients: np.ndarray) -> np.ndarray:
    """Where pixel gradients are large: max |g| over channels, divided by its maximum."""
    size = np.abs(gradients).max(axis=-1)
    top = size.max()
    return size / top if top > 0 else np.zeros_like(size)


def _write_array_explanations(
    out: Path,
    args: argparse.Namespace,
    arrays: Sequence[np.ndarray],
    explained: Sequence[tuple[Any, np.ndarray | None, int]],
    labels: list[str] | None,
    kind: str,
) -> list[tuple[str, int, str, float, str]]:
    """Writes the pictures and a `.npy` per signal or volume and class.

    Signals get `pictures.signal_picture` (the signal above a colour band of the
    heatmap); volumes get `pictures.volume_montage` (`_montage.png`, depth slices)
    and `pictures.orthogonal_slices` (`_slices.png`, through the heatmap's maximum),
    each enlarged by `ceil(_VOLUME_CELL / largest side)` and blended with `--alpha`.
    CAM methods draw the heatmap and save the layer-resolution map; guided methods
    draw the gradients' size (`_gradient_heat`) and save the raw input gradients.

    Returns:
        One row per input and class: (input path, class, class name or "", score,
        first PNG name).

    Raises:
        CommandError: if one of the files exists and `--overwrite` was not given (checked
            before the first is written), or a file cannot be written.
    """
    from tf_gradcam.pictures import orthogonal_slices, signal_picture, volume_montage

    def per_class(values: np.ndarray) -> np.ndarray:  # the k axis `TopK` adds, or one class
        return values if args.top_k else values[None]

    classes = [np.atleast_1d(result.classes[p]).tolist() for result, _, p in explained]
    names = _explanation_names(args, classes, labels)
    suffixes = _KIND_SUFFIXES[kind]
    _refuse_existing(
        out,
        [f"{name}{suffix}" for row in names for name in row for suffix in suffixes],
        args.overwrite,
    )
    rows = []
    for path, x, (result, pixels, p), input_classes, input_names in zip(
        args.images, arrays, explained, classes, names, strict=True
    ):
        scores = np.atleast_1d(result.scores[p]).tolist()
        heat, maps = per_class(result.heatmaps[p]), per_class(result.maps[p])
        gradients = None if pixels is None else per_class(pixels[p])
        zoom = max(1, -(-_VOLUME_CELL // max(x.shape[:-1])))
        for j, (c, score, name) in enumerate(zip(input_classes, scores, input_names, strict=True)):
            label = labels[c] if labels is not None else ""
            if gradients is None:
                shown, array = heat[j], maps[j]
            else:
                shown, array = _gradient_heat(gradients[j]), gradients[j]
            if kind == "signal":
                pictures = [signal_picture(x, shown)]
            else:
                pictures = [
                    volume_montage(x, shown, zoom=zoom, alpha=args.alpha),
                    orthogonal_slices(x, shown, zoom=zoom, alpha=args.alpha),
                ]
            if labels is not None:
                pictures = [_captioned(picture, label, score) for picture in pictures]
            for picture, suffix in zip(pictures, suffixes, strict=False):
                _write_png(out / f"{name}{suffix}", picture)
            _save_npy(out / f"{name}.npy", array)
            rows.append((path, int(c), label, float(score), f"{name}{suffixes[0]}"))
    return rows


def _print_table(
    rows: list[tuple[str, int, str, float, str]], with_labels: bool, first: str = "image"
) -> None:
    """Prints one aligned line per written file: image (or `first`), class, [name,] score, file."""
    header = (first, "class", "name", "score", "file")
    cells = [(p, str(c), n, f"{s:.4g}", f) for p, c, n, s, f in rows]
    keep = [k for k in range(5) if with_labels or k != 2]
    widths = [max(len(header[k]), *(len(r[k]) for r in cells)) for k in range(5)]
    right = {1, 3}  # numbers
    for row in [header, *cells]:
        parts = [row[k].rjust(widths[k]) if k in right else row[k].ljust(widths[k]) for k in keep]
        print("  ".join(parts).rstrip())


# ------------------------------------------------------------------ report

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class _ImageFiles(Sequence):
    """Image files as a sequence of RGB arrays, each decoded when indexed (`CommandError`)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: Any) -> np.ndarray:
        return _read_rgb(self.paths[index])


def _report_images(names: Sequence[str] | None) -> Any:
    """`--images`: None, a memory-mapped `.npy` array, or PNG/JPEG files (folders: sorted)."""
    if not names:
        return None
    if len(names) == 1 and Path(names[0]).suffix.lower() == ".npy":
        try:
            return np.load(names[0], mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise CommandError(f"cannot read images {names[0]!r}: {error}.") from error
    paths: list[str] = []
    for name in names:
        if Path(name).is_dir():
            found = sorted(p for p in Path(name).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
            if not found:
                raise CommandError(f"image folder {name!r} holds no PNG/JPEG files.")
            paths += [str(p) for p in found]
        else:
            paths.append(name)
    return _ImageFiles(paths)


def _report_regions(name: str | None) -> dict[str, np.ndarray] | None:
    """`--regions`: a `.npz` whose arrays are named regions (masks or boxes per image)."""
    if name is None:
        return None
    try:
        data = np.load(name, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("it is not an .npz file of named arrays")
        with data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise CommandError(f"cannot read regions {name!r}: {error}.") from error


def _run_report(args: argparse.Namespace) -> int:
    """`tf-gradcam report`: one HTML page of an explain_dataset shard folder's overlays."""
    labels = _read_labels(args.labels) if args.labels else None
    images = _report_images(args.images)
    regions = _report_regions(args.regions)
    _import_tensorflow(args.verbose)
    from tf_gradcam.html_report import report

    try:
        summary = report(
            args.shards,
            images,
            out=args.out,
            class_names=labels,
            regions=regions,
            title=args.title,
            thumbnail=args.thumbnail,
            image_format=args.format,
            quality=args.quality,
            page_size=args.page_size,
            alpha=args.alpha,
            overwrite=args.overwrite,
        )
    except OSError as error:  # a missing folder, an existing report, a full disk
        raise CommandError(str(error)) from error
    print(
        f"tf_gradcam report: {summary.cards} images in {Path(summary.path).resolve()} "
        f"({summary.bytes / 1e6:.1f} MB, {summary.seconds:.1f} s)"
    )
    return 0


# ------------------------------------------------------------------ command line


def _positive_int(text: str) -> int:
    """argparse type of `--count` and `--top-k`: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type of `report --thumbnail` and `--quality`: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text!r}")
        return value

    return parse


def _unit_float(text: str) -> float:
    """argparse type of `--alpha`: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    """The `tf-gradcam` argument parser; each subcommand sets `run`."""
    verbose_help = "show TensorFlow's log output (hidden by default)"
    debug_help = "print the traceback of an error as well as its one-line message"
    common = _Parser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help
    )
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    common.add_argument(
        "--overwrite",
        action="store_true",
        help="replace output files that already exist in --out (refused by default)",
    )
    parser = _Parser(
        prog="tf-gradcam",
        description="Grad-CAM explanations for Keras models.",
        epilog="exit status: 0 success, 1 internal error, 2 user error",
    )
    parser.add_argument("--version", action="version", version=f"tf-gradcam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,explain,report}")

    demo = sub.add_parser(
        "demo", parents=[common], help="explain generated scenes with the shipped demo model"
    )
    demo.add_argument("--out", metavar="DIR", default="tf_gradcam_demo", help="output folder")
    demo.add_argument(
        "--count", metavar="N", type=_positive_int, default=6, help="number of scenes (6)"
    )
    demo.add_argument("--seed", metavar="S", type=int, default=2026, help="scene generator seed")
    demo.set_defaults(run=_run_demo)

    explain = sub.add_parser(
        "explain",
        parents=[common],
        help="explain images, signals or volumes with a saved Keras model",
        description="Explain PNG/JPEG images with a saved Keras image model, or .npy/.npz "
        "arrays with a Conv1D (signals) or Conv3D (volumes) model; writes a PNG (two for "
        "volumes) and a .npy per input and class into --out.",
    )
    explain.add_argument(
        "model",
        help="a .keras model file (legacy .h5/.hdf5 files only with --trust-model)",
    )
    explain.add_argument(
        "images",
        nargs="+",
        metavar="INPUT",
        help="PNG/JPEG image files for an image model; for a model on signals (batch, length, "
        "channels) or volumes (batch, depth, height, width, channels), .npy files (or .npz "
        "with one array) each holding one input without the batch axis, fed as stored",
    )
    explain.add_argument(
        "--layer", metavar="NAME", default=None, help="layer name or 'outer/inner' path"
    )
    which = explain.add_mutually_exclusive_group()
    which.add_argument(
        "--class",
        dest="class_index",
        metavar="INDEX",
        type=int,
        default=None,
        help="class index to explain",
    )
    which.add_argument(
        "--top-k",
        metavar="K",
        type=_positive_int,
        default=0,
        help="explain the k highest-scoring classes",
    )
    explain.add_argument(
        "--labels",
        metavar="FILE",
        help="class names: one per line, or a JSON list; used in file names, captions and "
        "the printed table",
    )
    explain.add_argument("--out", metavar="DIR", default="gradcam_out", help="output folder")
    explain.add_argument(
        "--preprocess",
        choices=sorted(_PREPROCESS),
        default=None,
        help="pixel scaling the model expects: unit [0,1] (the default), raw [0,255], "
        "symmetric [-1,1]; image files only (arrays are fed as stored)",
    )
    explain.add_argument(
        "--method",
        type=_method,
        default="gradcam",
        metavar="METHOD",
        help="what to draw: a CAM method's overlay (gradcam, the default; "
        f"{', '.join(m for m in METHODS if m != 'gradcam')}), counterfactual Grad-CAM "
        "(§3.3), or guided_backprop / guided_gradcam gradients (§3.2)",
    )
    explain.add_argument(
        "--alpha",
        metavar="A",
        type=_unit_float,
        default=0.4,
        help="overlay opacity on images and volume slices (0.4); a signal's band is opaque",
    )
    explain.add_argument(
        "--trust-model",
        action="store_true",
        help="load with Keras safe mode off, for models from a trusted source only; required "
        "for legacy .h5/.hdf5 files, which safe mode cannot protect (they can hold arbitrary "
        "code in Lambda layers)",
    )
    explain.set_defaults(run=_run_explain)

    report = sub.add_parser(
        "report",
        parents=[common],
        help="one HTML page of the overlays of an explain_dataset shard folder",
        description="Write one self-contained HTML page of the Grad-CAM overlays in an "
        "explain_dataset shard folder: sortable and filterable by class, score, correctness "
        "and mass on regions, one page of cards at a time.",
    )
    report.add_argument("shards", metavar="SHARDS_DIR", help="the output_dir of explain_dataset")
    report.add_argument(
        "--images",
        nargs="+",
        metavar="PATH",
        help="the images the maps explain, the i-th for position i: one .npy array (count, "
        "height, width[, channels]), or PNG/JPEG files or folders of them (sorted by name); "
        "without it the heatmaps are drawn alone",
    )
    report.add_argument(
        "--labels", metavar="FILE", help="class names: one per line, or a JSON list"
    )
    report.add_argument(
        "--regions",
        metavar="FILE",
        help="a .npz of named regions whose Grad-CAM mass is shown: masks (count, height, "
        "width) or boxes (count, 4) as x0 y0 x1 y1, at the maps' size",
    )
    report.add_argument("--out", metavar="FILE", default="report.html", help="the HTML file")
    report.add_argument(
        "--title", metavar="TEXT", default="Grad-CAM audit report", help="the page's title"
    )
    report.add_argument(
        "--thumbnail",
        metavar="PX",
        type=_int_in(8),
        default=128,
        help="longest side of a card's picture in pixels (128; at least 8)",
    )
    report.add_argument(
        "--format", choices=("png", "jpeg"), default="png", help="picture format (png)"
    )
    report.add_argument(
        "--quality", metavar="Q", type=_int_in(1, 100), default=90, help="JPEG quality (90)"
    )
    report.add_argument(
        "--page-size", metavar="N", type=_positive_int, default=60, help="cards per page (60)"
    )
    report.add_argument(
        "--alpha", metavar="A", type=_unit_float, default=0.4, help="overlay opacity (0.4)"
    )
    report.set_defaults(run=_run_report)
    return parser


def _fail(message: str, status: int, debug: bool) -> int:
    """Prints `tf-gradcam: <message>` as one line on stderr, after the traceback if `debug`.

    Must be called while the exception is being handled.

    Returns:
        `status`.
    """
    if debug:
        traceback.print_exc()
    print(f"tf-gradcam: {' '.join(message.split())}", file=sys.stderr)
    return status


def _internal_error(error: Exception, debug: bool) -> str:
    """The message of an unexpected exception: its type and the first line of its text."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__
    return f"internal error: {text}" + ("" if debug else " (run with --debug for the traceback)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tf-gradcam` console script.

    Args:
        argv: command-line arguments without the program name (default `sys.argv[1:]`).

    Returns:
        The process exit status, after one line on stderr unless 0: 0 on success, 2 on
        a user error, 1 on an internal error (an unexpected exception), 130 when
        interrupted. `--debug` prints the traceback before that line.

    Raises:
        SystemExit: from argparse, for `--help`, `--version` (status 0) and usage
            errors (status 2, one line on stderr).

    Example:
        >>> main(["demo", "--out", "/tmp/demo", "--overwrite"])
        0
    """
    args = _parser().parse_args(argv)
    try:
        with _command_diagnostics():
            return args.run(args)
    except (CommandError, GradCAMError) as error:
        return _fail(str(error), 2, args.debug)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, args.debug)
    except Exception as error:
        return _fail(_internal_error(error, args.debug), 1, args.debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
