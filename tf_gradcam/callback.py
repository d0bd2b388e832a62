"""Training-time explanations: a Keras callback that writes Grad-CAM to TensorBoard.

During `model.fit`, `GradCAMCallback` explains a fixed sample of images with
the model's current weights and writes colour overlays to TensorBoard's image
panel. Given masks or boxes of named regions, it also measures the share of
Grad-CAM mass inside each region, the signal the paper uses in §6.3 to catch
a model that learned a dataset bias, and puts it in `logs` so other callbacks
can act on it.

The summaries are written with `tf.summary.write` in the formats of
TensorBoard's image, scalar and text plugins, so training needs no
`tensorboard` package; it is needed only to view the logs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import reprlib
import unicodedata
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import keras
import numpy as np
import tensorflow as tf

from tf_gradcam.engine import check_integer_cast
from tf_gradcam.errors import InputError, UnknownMethodError
from tf_gradcam.guided import GuidedGradCAM
from tf_gradcam.image import normalize_gradients, overlay
from tf_gradcam.keras_adapter import LegacyCallbackHooks
from tf_gradcam.methods import METHODS, TITLES, get_method, method_name
from tf_gradcam.pictures import orthogonal_slices, signal_picture
from tf_gradcam.targets import LABELS, TopK, classes_from_labels, labels_target

__all__ = ["GradCAMCallback", "caption_strip", "compose_panel"]

#: Subdirectory of `log_dir` holding this callback's event files (a TensorBoard run).
RUN_NAME = "gradcam"
#: Consecutive failures after which the callback stops trying for the rest of a `fit`.
MAX_FAILURES = 3
_EPOCH_PREFIX = "gradcam"
_BATCH_PREFIX = "gradcam_batch"
_REGION_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
#: A logged panel shows the picture upscaled by an integer factor (nearest neighbour) until
#: its shorter side reaches `PANEL_MIN_SIZE` pixels, as long as its longer side stays within
#: `PANEL_MAX_SIZE`.
PANEL_MIN_SIZE = 128
PANEL_MAX_SIZE = 1024
#: Colormap of the overlays and of the panel's colour bar (the paper's).
COLORMAP = "jet"


class GradCAMCallback(LegacyCallbackHooks, keras.callbacks.Callback):
    """Logs Grad-CAM maps of a fixed image sample to TensorBoard during training.

    Implements the training-time use of Grad-CAM (Selvaraju et al., §6.3,
    "Identifying bias in dataset"): after every `freq` epochs (and optionally
    every `update_freq` batches) the callback explains the same images with
    the current weights, writes their overlays to TensorBoard's image panel
    and, if `regions` are given, the fraction of Grad-CAM mass inside each
    region. The paper inspects the maps of a trained model by eye; measuring
    the mass inside annotated regions, per epoch, is this library's addition
    so that attention drifting onto a spurious cue can be plotted, alerted on
    or used to stop training.

    The explainer (`tf_gradcam.GradCAM`) is built once per model and shares
    its weights, so it is traced once and sees the current weights at every
    call. The callback never changes training: it runs the model in
    inference mode, draws no random numbers (NumPy's, Python's, TensorFlow's
    and Keras' global generators are left as they were), and turns any
    exception of its own into a warning (see `strict`).

    Event files go to `log_dir/gradcam` (a TensorBoard run of its own, next
    to the `train` and `validation` runs of `keras.callbacks.TensorBoard`).
    Epoch summaries use the epoch as step; batch summaries use the number of
    optimizer steps taken. Tags:

    - `gradcam/image_<i>`: a panel for sample image `i` (`max_images` of
      them): the overlay, upscaled by an integer factor (nearest neighbour)
      to at least `PANEL_MIN_SIZE` pixels; at its right, for every CAM
      method (not `"guided_gradcam"`), a colour bar of the jet colormap from 1 (top) to
      0 (bottom); below, the explained class (its name from `class_names`,
      else `class <index>`) and its pre-softmax score. With
      `annotate=False`, the bare overlay at the input size.
    - `gradcam/targets`: a text table of the explained class (and name) and
      score per image.
    - `gradcam/<region>_mass`: scalar, mean fraction of Grad-CAM mass inside
      `<region>`; also added to the epoch `logs` under the same key.
    - `gradcam_batch/...`: the same, every `update_freq` batches.

    Viewing in TensorBoard: TensorBoard keeps only 10 images per tag by
    default (reservoir sampling; text too with `--load_fast=false`, scalars
    1000), so after more than 10 logs its step slider silently skips some
    epochs, the first ones included; start it with
    `tensorboard --logdir logs --samples_per_plugin images=100,text=100` to
    keep up to 100. Training needs no `tensorboard` package (`pip install
    "tf_gradcam[tensorboard]"` installs it to view the logs), but
    `keras.callbacks.TensorBoard` does: sharing `log_dir` with it makes
    `fit` fail where `tensorboard` is missing. Because the masses are in
    `logs`, a `keras.callbacks.TensorBoard` listed *after* this callback
    also plots them, as it does every metric, under
    `epoch_gradcam/<region>_mass` in its `train` run; list it *before* this
    callback to keep one copy (callbacks after this one still see the
    masses in `logs`).

    Args:
        images: the images to explain, fixed at construction: a
            `(batch, height, width, channels)` array (for Conv1D / Conv3D
            models, signals `(batch, length, channels)` or volumes `(batch,
            depth, height, width, channels)`), a tuple `(images, labels)`, or a
            `tf.data.Dataset` yielding images, signals or volumes, or `(x,)`,
            `(x, labels)` or `(x, labels, sample_weights)` of them, batched or
            not, from which the first `max_images` are taken. A dataset's
            elements of rank 3 are images, and also batches of signals when
            the element_spec gives their length and channels; of rank 4
            batches of images, and also volumes when the element_spec gives
            their whole shape; each such element is then read both ways at
            construction and the model's input rank picks the reading when a
            fit starts (images until then, and for a model whose inputs are
            unknown). Labels are class indices or one-hot rows. Images are
            shown as given: floats in [0, 1] or values in [0, 255].
        log_dir: directory of the TensorBoard logs, as for
            `keras.callbacks.TensorBoard`.
        target: which class to explain: `None` (the predicted class, chosen
            again at each log), `"labels"` (the labels given with `images`;
            `"true"`, its former name, is deprecated), an int (that class for
            every image), one int per image, or a
            callable `outputs -> (batch,)` score (see `tf_gradcam.targets`).
        layer: the convolutional layer to explain (name, `"outer/inner"`
            path, `Layer` or `None` for the last 4-D layer).
        method: a CAM method by name (`tf_gradcam.methods.METHODS`:
            `"gradcam"`, the default, `"gradcam++"`, `"scorecam"`,
            `"eigencam"`...; overlays of its heatmaps, and region masses of
            them), or `"guided_gradcam"` (Guided Grad-CAM gradients,
            display-normalised; their panels have no colour bar, the picture
            being no colour-mapped heatmap; region masses use the Grad-CAM
            heatmaps).
        freq: log every `freq` epochs (epochs 0, freq, 2·freq, ... as
            `histogram_freq` of `keras.callbacks.TensorBoard`); 0 turns epoch
            logging off.
        update_freq: `"epoch"` (no batch-level logging), `"batch"` (same as
            1) or an int N: also log after every N optimizer steps, under
            `gradcam_batch/`.
        max_images: how many overlays are written per log. Without
            `regions`, only the first `max_images` images are kept; with
            `regions`, every image is explained for the region masses.
        regions: optional `{name: masks}` of regions whose Grad-CAM mass is
            measured. Each value is per-image masks `(batch, height, width)`
            (bool or weights in [0, 1]), per-image boxes `(batch, 4)`, one mask
            `(height, width)` or one box `(4,)` for all images. Boxes are
            `(x0, y0, x1, y1)` in pixels, ends exclusive — the convention of
            `tf_gradcam.scenes` and `tf_gradcam.metrics`.
        class_names: optional names of the classes, indexed by class: shown
            on the panels and in the targets table. Drawn in ASCII (accents
            are dropped, other characters become `?`); too long a name is
            cut with `...`. A class index without a name shows as
            `class <index>`.
        annotate: `True` (default) writes the captioned panels described
            above; `False` writes the bare overlays (or Guided Grad-CAM
            pictures) at the input size.
        strict: re-raise exceptions raised inside the callback instead of
            warning. By default an error becomes a `RuntimeWarning` naming its
            cause, and after `MAX_FAILURES` consecutive errors the callback
            disables itself until the next `fit`. With `strict=True`, images
            the model cannot take raise an `InputError` in `on_train_begin`,
            and a lost event file an `OSError`.

    Raises:
        InputError: (a `ValueError`) `images` that no model could explain or
            no panel show: not numbers (strings, objects), NaN or infinite
            values in the images kept, not of rank 3, 4 or 5 (a dataset:
            elements not of rank 2 to 5), no image, a zero height, width or
            channel count, 2 channels (images and volumes), or images of
            different shapes (a ragged list or dataset). For a dataset read
            two ways (see `images`), when both readings are refused.
        ValueError: an argument of the wrong form or value, regions that do
            not match the images, `target="labels"` without labels, a `TopK`
            target (log one class per image), or `class_names` that are not
            non-empty strings or name fewer classes than `target` or the
            labels use.

    Images the model cannot take (other channels, another size, a model of
    several inputs, floats for an integer input, a dataset's reading of the
    model's rank that was refused at construction) are found at the start of
    each `fit`: one `UserWarning` names the problem and the callback stays
    disabled for that `fit`; training goes on. If the event file stops
    taking writes (its folder or the file deleted or replaced, a full disk;
    TensorFlow's writer reports only the last), one `RuntimeWarning` names
    the folder and the reason, and the callback writes nothing more to
    TensorBoard in that `fit`; region masses still reach `logs`.

    Example:
        >>> cam_logger = tf_gradcam.GradCAMCallback(
        ...     (x_val[:64], y_val[:64]), log_dir="logs", target="labels",
        ...     class_names=["doctor", "nurse"],
        ...     regions={"cue": cue_masks, "object": object_boxes})
        >>> stop = keras.callbacks.EarlyStopping(
        ...     monitor="gradcam/cue_mass", mode="min", patience=2)
        >>> model.fit(x, y, epochs=10, callbacks=[cam_logger, stop])
        >>> model.history.history["gradcam/cue_mass"]   # one value per epoch
    """

    def __init__(
        self,
        images: Any,
        *,
        log_dir: str | os.PathLike = "logs",
        target: Any = None,
        layer: str | keras.layers.Layer | None = None,
        method: str = "gradcam",
        freq: int = 1,
        update_freq: str | int = "epoch",
        max_images: int = 4,
        regions: dict[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
        annotate: bool = True,
        strict: bool = False,
    ) -> None:
        super().__init__()
        _check_options(method, freq, update_freq, max_images)
        if not isinstance(annotate, (bool, np.bool_)):
            raise ValueError(f"`annotate` must be True or False. Received: annotate={annotate!r}.")
        readings = _take_samples(images, max_images)
        target = labels_target(target)
        readings.apply(
            functools.partial(
                _prepare_sample,
                target=target,
                class_names=class_names,
                regions=regions,
                method=method,
                max_images=max_images,
            )
        )
        # Each way of reading a dataset's elements (images, or signals / volumes) gives a
        # sample; the model's input rank picks one when a fit starts (`_check_model_inputs`).
        self._samples = readings
        self._from_dataset = isinstance(images, tf.data.Dataset)
        self._use(readings.first())
        self.log_dir = str(log_dir)
        self.layer = layer
        self.method = method if method == "guided_gradcam" else method_name(method)
        self.freq = freq
        self.update_freq = 1 if update_freq == "batch" else update_freq
        self.max_images = max_images
        self.annotate = bool(annotate)
        self.strict = strict
        if self.update_freq != "epoch":
            # Defined per instance so that, without batch logging, Keras still
            # sees the default hook and keeps dispatching batch ends asynchronously.
            self.on_train_batch_end = self._on_train_batch_end

        self._explainer: Any = None
        self._explained_model: keras.Model | None = None
        self._writer: Any = None
        self._writer_lost = False
        self._event_suffix = ""
        self._event_file: str | None = None
        self._event_size = 0
        self._failures = 0
        self._disabled = False
        self._step = 0
        self._epoch_start_step = 0

    # ------------------------------------------------------------ Keras hooks

    def set_model(self, model: keras.Model) -> None:
        """Sets the model and resets the writer (a new `fit` gets a new event file)."""
        super().set_model(model)
        self._guarded("set_model", self._close_writer)  # left open if a fit was interrupted

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._failures = 0
        self._disabled = False
        self._writer_lost = False
        self._step = self._guarded("on_train_begin", self._optimizer_steps) or 0
        self._guarded("on_train_begin", self._check_model_inputs)
        self._guarded("on_train_begin", self._check_class_count)

    def on_train_end(self, logs: dict | None = None) -> None:
        self._disabled = False  # release the writer even after repeated failures
        self._guarded("on_train_end", self._close_writer)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start_step = self._step

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.freq and epoch % self.freq == 0:
            self._guarded(f"epoch {epoch}", self._log, _EPOCH_PREFIX, epoch, logs)

    def _on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        previous, self._step = self._step, self._epoch_start_step + batch + 1
        if self._step // self.update_freq > previous // self.update_freq:
            self._guarded(f"step {self._step}", self._log, _BATCH_PREFIX, self._step, None)

    # --------------------------------------------------------------- helpers

    def _guarded(self, where: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn`; unless `strict`, turn an exception into a warning."""
        if self._disabled:
            return None
        try:
            result = fn(*args)
        except Exception as error:
            if self.strict:
                raise
            self._failures += 1
            warnings.warn(
                f"GradCAMCallback failed at {where} and skipped it; training continues. "
                f"Cause: {type(error).__name__}: {error}",
                RuntimeWarning,
                stacklevel=2,
            )
            if self._failures >= MAX_FAILURES:
                self._disabled = True
                warnings.warn(
                    f"GradCAMCallback disabled itself for the rest of this fit after "
                    f"{self._failures} consecutive failures. Pass strict=True to see the "
                    "full traceback.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return None
        self._failures = 0
        return result

    def _use(self, sample: _Sample) -> None:
        """Make `sample` the one explained: its images, labels, target, names and regions."""
        self.images = sample.images
        self.labels = sample.labels
        self.target = sample.target
        self.class_names = sample.class_names
        self.regions = sample.regions

    def _check_model_inputs(self) -> None:
        """Pick the sample of the model's input rank (a dataset's elements may be read as
        images or as signals / volumes); then disable the callback for this fit (or raise,
        if `strict`) when the model cannot take its images: that reading of the dataset
        was refused, wrong channels, size, number of inputs or integer dtype."""
        refused = None
        rank = _input_rank(self.model)
        sample = self._samples.found.get(rank)
        if isinstance(sample, _Sample):
            self._use(sample)
        elif sample is not None:
            refused = sample
        if refused is not None:
            problem = (
                f"model {getattr(self.model, 'name', 'model')!r} takes {_KINDS[rank]}, and the "
                f"dataset's elements read as {self._samples.names[rank]} are refused: {refused}"
            )
        else:
            problem = _input_mismatch(self.model, self.images, dataset=self._from_dataset)
        if problem is None:
            return
        if self.strict:
            raise (InputError if refused is None else type(refused))(problem) from refused
        self._disabled = True
        warnings.warn(
            f"GradCAMCallback is disabled for this fit: {problem} Training continues without "
            "Grad-CAM logs.",
            UserWarning,
            stacklevel=2,
        )

    def _check_class_count(self) -> None:
        """Warn when `class_names` does not name every class of a single-output model."""
        outputs = getattr(self.model, "outputs", None)
        if self.class_names is None or not outputs or len(outputs) != 1:
            return
        shape = outputs[0].shape
        classes = shape[-1] if len(shape) == 2 else None
        if isinstance(classes, int) and classes != len(self.class_names):
            warnings.warn(
                f"GradCAMCallback got {len(self.class_names)} class_names for a model with "
                f"{classes} output classes; classes without a name show as 'class <index>'.",
                UserWarning,
                stacklevel=2,
            )

    def _optimizer_steps(self) -> int:
        iterations = getattr(getattr(self.model, "optimizer", None), "iterations", None)
        return 0 if iterations is None else int(iterations.numpy())

    @property
    def explainer(self) -> Any:
        """The explainer for the current model, built on first use and then reused."""
        if self._explainer is None or self._explained_model is not self.model:
            self._explainer = _EXPLAINERS[self.method](self.model, self.layer)
            self._explained_model = self.model
        return self._explainer

    @property
    def run_dir(self) -> str:
        """The folder of this callback's event files: `log_dir/gradcam`."""
        return os.path.join(self.log_dir, RUN_NAME)

    @property
    def writer(self) -> Any:
        """The summary writer of `log_dir/gradcam`, created on first use.

        Its event file's name ends with a suffix of its own, so that the file it
        writes can be found and watched (see `_event_file_problem`).
        """
        if self._writer is None:
            suffix = f".{uuid.uuid4().hex[:12]}.v2"
            self._writer = tf.summary.create_file_writer(self.run_dir, filename_suffix=suffix)
            self._event_suffix, self._event_file, self._event_size = suffix, None, 0
            try:
                self._event_file_problem()  # records the new file and its header's size
            except (tf.errors.OpError, OSError):
                pass
        return self._writer

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _event_file_problem(self) -> str | None:
        """Why the writer's event file did not take the last flush, or None if it did.

        TensorFlow's writer reports no error when its folder or file is deleted or
        replaced: it keeps writing to a file no name leads to, or to nothing. So,
        after each flush, the event file must still be in the folder and larger
        than before.
        """
        run_dir = self.run_dir
        if not tf.io.gfile.exists(run_dir):
            return "the folder no longer exists (deleted?)"
        if not tf.io.gfile.isdir(run_dir):
            return "the path is no longer a folder"
        names = sorted(n for n in tf.io.gfile.listdir(run_dir) if n.endswith(self._event_suffix))
        if not names:
            if self._event_file is None:
                return f"the event file (*{self._event_suffix}) was never created"
            return f"its event file {os.path.basename(self._event_file)!r} was deleted"
        path = os.path.join(run_dir, names[-1])
        size = tf.io.gfile.stat(path).length
        if path == self._event_file and size <= self._event_size:
            return (
                f"its event file {names[-1]!r} did not grow after a flush ({size} bytes; "
                "replaced, or the disk is full?)"
            )
        self._event_file, self._event_size = path, size
        return None

    def _stop_writing(self, reason: str, error: BaseException | None = None) -> None:
        """Give up the writer for the rest of this fit, with one warning (or raise, if strict)."""
        self._writer_lost = True
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # the writer is broken already; its state does not matter
                pass
        kept = ", and the region masses still reach `logs`" if self.regions else ""
        message = (
            f"GradCAMCallback could not write TensorBoard events to {self.run_dir!r}: "
            f"{reason}. Its TensorBoard logging stopped for the rest of this fit (the next fit "
            f"opens a new event file); training continues{kept}."
        )
        if self.strict:
            raise OSError(message) from error
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _resolved_target(self) -> Any:
        return self.labels if isinstance(self.target, str) else self.target

    def _log(self, prefix: str, step: int, logs: dict | None) -> None:
        """Explain the sample, write its summaries and add the masses to `logs`.

        Once the event file is lost (`_stop_writing`), only the masses for `logs` are
        computed.
        """
        if self._writer_lost and (logs is None or not self.regions):
            return
        heatmaps, pictures, classes, scores = self.explainer(self.images, self._resolved_target())
        masses = {
            f"{_EPOCH_PREFIX}/{name}_mass": _region_mass(heatmaps, mask)
            for name, mask in self.regions.items()
        }
        if not self._writer_lost:
            self._write(prefix, step, pictures, classes, scores, masses)
        if logs is not None:
            logs.update(masses)

    def _write(
        self,
        prefix: str,
        step: int,
        pictures: np.ndarray,
        classes: Any,
        scores: np.ndarray,
        masses: dict[str, float],
    ) -> None:
        """Write one log's panels, table and masses; then check that they reached the file."""
        shown = min(self.max_images, len(pictures))
        width = len(str(shown - 1))
        layer = self.explainer.layer
        name = "Guided Grad-CAM" if self.method == "guided_gradcam" else TITLES[self.method]
        colorbar = self.method != "guided_gradcam"
        if self.annotate:
            scale = " with its colour scale (jet, 0 to 1)" if colorbar else ""
            about = f"{name} of sample image {{i}} at layer `{layer}`{scale}, the explained "
            about += "class and its pre-softmax score."
        else:
            about = f"{name} of sample image {{i}} at layer `{layer}`."
        panels = []
        for i in range(shown):
            picture = pictures[i]
            if self.annotate:
                lines = _caption(classes, scores, i, self.class_names)
                picture = compose_panel(picture, lines, colorbar=colorbar)
            panels.append(picture)
        table = _targets_table(classes, scores, shown, self.class_names)
        try:
            writer = self.writer
            with writer.as_default():
                for i, picture in enumerate(panels):
                    _write_image(f"{prefix}/image_{i:0{width}d}", picture, step, about.format(i=i))
                _write_text(f"{prefix}/targets", table, step)
                for key, value in masses.items():
                    _write_scalar(prefix + key[len(_EPOCH_PREFIX) :], value, step)
            writer.flush()
            problem = self._event_file_problem()
        except (tf.errors.OpError, OSError) as error:
            self._stop_writing(_error_reason(error), error)
            return
        if problem is not None:
            self._stop_writing(problem)


# ------------------------------------------------------------------ explainers


class _CAMExplainer:
    """A CAM method's heatmaps and their colour overlays for the callback.

    `explainer(images, target)` returns `(heatmaps, pictures, classes,
    scores)`: the heatmaps for the region masses, uint8 RGB pictures to show.
    """

    def __init__(self, model: keras.Model, layer: Any, method: str = "gradcam") -> None:
        self.cam = get_method(method)(model, layer)

    @property
    def layer(self) -> str:
        return self.cam.layer

    @property
    def trace_count(self) -> int:
        return self.cam.trace_count

    def __call__(self, images: np.ndarray, target: Any) -> tuple[np.ndarray, ...]:
        """Returns `(heatmaps, pictures, classes, scores)` for the images."""
        result = self.cam(images, target)
        return result.heatmaps, _pictures(images, result.heatmaps), result.classes, result.scores


class _GuidedGradCAMExplainer(_CAMExplainer):
    """Guided Grad-CAM pictures (§3.2); the masses still use the Grad-CAM heatmaps."""

    def __init__(self, model: keras.Model, layer: Any) -> None:
        self.cam = GuidedGradCAM(model, layer)

    def __call__(self, images: np.ndarray, target: Any) -> tuple[np.ndarray, ...]:
        result = self.cam(images, target)
        pictures = normalize_gradients(result.gradients)
        if pictures.shape[-1] == 1:
            pictures = np.repeat(pictures, 3, axis=-1)
        pictures = np.round(pictures[..., :3] * 255.0).astype(np.uint8)
        return result.cam.heatmaps, pictures, result.classes, result.scores


def _pictures(images: np.ndarray, heatmaps: np.ndarray) -> np.ndarray | list[np.ndarray]:
    """One uint8 RGB picture per image: the overlay of an image, a signal above its
    heat band (`pictures.signal_picture`), a volume's three orthogonal slices through
    the heatmap's maximum (`pictures.orthogonal_slices`)."""
    if images.ndim == 4:
        return overlay(images, heatmaps)
    if images.ndim == 3:
        return [signal_picture(x, h) for x, h in zip(images, heatmaps, strict=True)]
    return [orthogonal_slices(x, h) for x, h in zip(images, heatmaps, strict=True)]


#: How each `method` builds its explainer: `(model, layer) -> explainer`, where
#: `explainer(images, target)` returns `(heatmaps, pictures, classes, scores)`
#: and the explainer has `layer` and `trace_count` properties.
_EXPLAINERS: dict[str, Callable[[keras.Model, Any], Any]] = {
    **{name: functools.partial(_CAMExplainer, method=name) for name in METHODS},
    "guided_gradcam": _GuidedGradCAMExplainer,
}


# ------------------------------------------------------------------ arguments


def _check_options(method: str, freq: int, update_freq: str | int, max_images: int) -> None:
    if method != "guided_gradcam":
        try:
            method_name(method)
        except UnknownMethodError:
            raise UnknownMethodError(
                f"`method` must be a CAM method ({', '.join(sorted(METHODS))}) or "
                f"'guided_gradcam'. Received: method={method!r}."
            ) from None
    if not _is_count(freq, minimum=0):
        raise ValueError(f"`freq` must be an int >= 0 (epochs). Received: freq={freq!r}.")
    if update_freq not in ("epoch", "batch") and not _is_count(update_freq, minimum=1):
        raise ValueError(
            "`update_freq` must be 'epoch', 'batch' or an int >= 1 (optimizer steps). Received: "
            f"update_freq={update_freq!r}."
        )
    if freq == 0 and update_freq == "epoch":
        raise ValueError(
            "With freq=0 and update_freq='epoch' nothing would be logged. Received: "
            "freq=0, update_freq='epoch'. Set freq >= 1 or update_freq to an int."
        )
    if not _is_count(max_images, minimum=1):
        raise ValueError(f"`max_images` must be an int >= 1. Received: max_images={max_images!r}.")


def _is_count(value: Any, *, minimum: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def _is_per_image(target: Any) -> bool:
    return isinstance(target, (Sequence, np.ndarray)) and not isinstance(target, str)


def _check_target(target: Any, labels: np.ndarray | None, count: int) -> None:
    if isinstance(target, TopK):
        raise ValueError(
            "The callback logs one map per image; TopK gives k. Received: "
            f"target={target!r}. Log one class with an int, or several callbacks."
        )
    if isinstance(target, str):
        if target != LABELS:
            raise ValueError(
                "`target` must be None, 'labels', an int, one int per image or a callable. "
                f"Received: target={target!r}."
            )
        if labels is None:
            raise ValueError(
                "target='labels' needs labels: pass `images` as a tuple (images, labels) or "
                "a tf.data.Dataset yielding (images, labels). Received images without labels."
            )
    elif _is_per_image(target) and len(target) != count:
        raise ValueError(
            f"`target` gives {len(target)} classes for {count} images; give one per image "
            "or a single int."
        )


def _check_class_names(
    class_names: Any, target: Any, labels: np.ndarray | None
) -> tuple[str, ...] | None:
    """`class_names` as a tuple of strings, checked against the classes already known."""
    if class_names is None:
        return None
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, (Sequence, np.ndarray)):
        raise ValueError(
            "`class_names` must be a list or tuple of strings, one per class index. Received: "
            f"class_names={class_names!r}."
        )
    names = tuple(class_names)
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if not names or bad:
        raise ValueError(
            "`class_names` must be a non-empty list of non-empty strings. Received: "
            f"class_names={class_names!r}."
        )
    used: list[int] = []
    if isinstance(target, str) and labels is not None:
        used, source = labels.tolist(), "The labels give"
    elif _is_count(target, minimum=0):
        used, source = [int(target)], "`target` gives"
    elif _is_per_image(target) and all(_is_count(t, minimum=0) for t in target):
        used, source = [int(t) for t in target], "`target` gives"
    if used and max(used) >= len(names):
        raise ValueError(
            f"{source} class {max(used)}, but `class_names` names classes 0 to "
            f"{len(names) - 1} only. Received: class_names={class_names!r}. Give one name per "
            "class of the model."
        )
    return names


#: What a sample of each rank is, in messages.
_KINDS = {
    3: "signals (batch, length, channels)",
    4: "images (batch, height, width, channels)",
    5: "volumes (batch, depth, height, width, channels)",
}
#: What one item of a dataset's element is, by the item's rank.
_ITEMS = {
    2: ("signal", "(length, channels)"),
    3: ("image", "(height, width, channels)"),
    4: ("volume", "(depth, height, width, channels)"),
}


@dataclasses.dataclass(frozen=True)
class _Sample:
    """One checked reading of `images`: what the callback explains and logs."""

    images: np.ndarray
    labels: np.ndarray | None
    target: Any
    class_names: tuple[str, ...] | None
    regions: dict[str, np.ndarray]


@dataclasses.dataclass
class _Readings:
    """The samples `images` gives, keyed by the sample's rank (3 signals, 4 images, 5
    volumes), each a value or the `ValueError` that refused that reading.

    An array or a tuple has one reading. A dataset whose elements are of rank 3 (an
    image, or a batch of signals) or 4 (a batch of images, or a volume) may have two,
    images first; the model's input rank picks one when a fit starts.
    """

    found: dict[int, Any]
    #: How the elements were read for each rank, in messages.
    names: dict[int, str] = dataclasses.field(default_factory=dict)
    #: Why a dataset's elements were not also read as signals or volumes ("" if they were).
    note: str = ""

    def apply(self, fn: Callable[..., Any]) -> None:
        """Replace each reading `value` by `fn(*value)` (or the `ValueError` it raises);
        raise if every reading is refused."""
        for rank, value in self.found.items():
            if not isinstance(value, ValueError):
                try:
                    self.found[rank] = fn(*value)
                except ValueError as error:
                    self.found[rank] = error
        self._raise_if_refused()

    def first(self) -> Any:
        """The first reading that was not refused (images before signals or volumes)."""
        return next(v for v in self.found.values() if not isinstance(v, ValueError))

    def _raise_if_refused(self) -> None:
        errors = list(self.found.values())
        if not all(isinstance(e, ValueError) for e in errors):
            return
        first = errors[0]
        if len(errors) == 1 or len({str(e) for e in errors}) == 1:
            if not self.note:
                raise first
            raise type(first)(f"{first} {self.note}") from first
        kind = type(first) if all(type(e) is type(first) for e in errors) else InputError
        names = list(self.names.values())
        reasons = " ".join(
            f"Read as {self.names[rank]}: {error}" for rank, error in self.found.items()
        )
        raise kind(
            f"The dataset's elements can be read as {names[0]} or as {names[1]}; neither "
            f"reading gives a sample the callback can explain. {reasons}"
        ) from first


def _take_samples(images: Any, max_images: int) -> _Readings:
    """The fixed sample's readings: `(images, labels or None)` as NumPy arrays, checked
    (`_check_images`, labels as class indices); raises if every reading is refused."""
    if isinstance(images, tf.data.Dataset):
        readings = _sample_dataset(images, max_images)
    elif isinstance(images, tuple):
        if len(images) not in (2, 3):
            raise InputError(
                "A tuple `images` must be (images, labels) or (images, labels, weights). "
                f"Received: images=a tuple of length {len(images)}."
            )
        array, labels = _as_images(images[0]), np.asarray(images[1])
        readings = _Readings({array.ndim: (array, labels)})
    elif isinstance(images, (np.ndarray, tf.Tensor, list)):
        array = _as_images(images)
        readings = _Readings({array.ndim: (array, None)})
    else:
        raise InputError(
            "`images` must be an array (batch, height, width, channels), a tuple "
            f"(images, labels) or a tf.data.Dataset. Received: images={reprlib.repr(images)} "
            f"of type {type(images).__name__}."
        )
    readings.apply(_checked_sample)
    readings.note = ""  # the later checks do not depend on how the elements are read
    return readings


def _checked_sample(array: np.ndarray, labels: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """`(array, class indices or None)`, once `_check_images` accepts the array."""
    _check_images(array)
    if labels is not None:
        labels = _class_indices(labels, len(array))
    return array, labels


def _prepare_sample(
    sample: np.ndarray,
    labels: np.ndarray | None,
    *,
    target: Any,
    class_names: Any,
    regions: dict[str, Any] | None,
    method: str,
    max_images: int,
) -> _Sample:
    """The sample the callback keeps, with its target, class names and region masks."""
    _check_target(target, labels, len(sample))
    names = _check_class_names(class_names, target, labels)
    if regions is None:
        sample = sample[:max_images]
        labels = None if labels is None else labels[:max_images]
        if _is_per_image(target):
            target = np.asarray(target)[:max_images]
    _check_finite(sample)
    if sample.ndim != 4 and (regions is not None or method == "guided_gradcam"):
        raise InputError(
            "`regions` and method='guided_gradcam' need images (batch, height, width, "
            f"channels); the sample is of rank {sample.ndim} (signals or volumes). Leave "
            "them out: the callback logs the maps of any CAM method for signals and volumes."
        )
    return _Sample(sample, labels, target, names, _region_masks(regions, sample.shape[:3]))


def _describe(array: np.ndarray) -> str:
    """`<dtype> array of shape <shape>`: how error messages show the images received."""
    return f"{array.dtype} array of shape {array.shape}"


def _as_images(value: Any) -> np.ndarray:
    """`value` as one NumPy array; images of different shapes are an `InputError`."""
    if isinstance(value, tf.Tensor):
        return value.numpy()
    try:
        return np.asarray(value)
    except ValueError as error:  # NumPy cannot stack a ragged list
        raise InputError(
            "`images` must be one batch of images of the same shape. Received: images=a list "
            f"of {len(value)} items of shapes {_shapes(value)}. Resize them to one size "
            "(e.g. the model's input size, with tf.image.resize) and stack them."
        ) from error


def _shapes(items: Sequence[Any], limit: int = 4) -> str:
    """The distinct shapes of `items`, at most `limit` of them, in order of appearance."""
    shapes: list[str] = []
    for item in items:
        try:
            shape = str(tuple(np.shape(item)))
        except ValueError:  # an item that is ragged itself
            shape = "ragged"
        if shape not in shapes:
            shapes.append(shape)
    more = ", ..." if len(shapes) > limit else ""
    return "[" + ", ".join(shapes[:limit]) + more + "]"


def _check_images(images: np.ndarray) -> None:
    """Refuse, at construction, images no model could explain or no panel could show.

    Numbers (bool, integer or float), rank 4 (images; or rank 3 for a batch of
    signals `(batch, length, channels)` and rank 5 for volumes `(batch, depth,
    height, width, channels)`, whose panels are `tf_gradcam.pictures`' signal
    picture and orthogonal slices), at least one image, height, width and
    channels of at least 1, and for images and volumes 1 channel or 3 and
    more (an overlay shows the first 3 as RGB; 2 channels cannot be shown).
    Non-finite values are checked by `_check_finite`, on the images kept.
    """
    if images.dtype.kind not in "biuf":
        raise InputError(
            "`images` must hold numbers (float, integer or bool pixel values). Received: "
            f"images={_describe(images)}. Convert them, e.g. with "
            "np.asarray(images, dtype='float32')."
        )
    if images.ndim not in (3, 4, 5):
        hints = {
            2: " For one grayscale image, use images[None, ..., None]; for a batch of "
            "one-channel signals (batch, length), images[..., None].",
        }
        raise InputError(
            "`images` must be a batch of images (batch, height, width, channels), of rank 4 "
            "(or of signals (batch, length, channels), rank 3, or volumes (batch, depth, "
            "height, width, channels), rank 5, for Conv1D / Conv3D models). Received: "
            f"images={_describe(images)}, of rank {images.ndim}." + hints.get(images.ndim, "")
        )
    if images.shape[0] == 0:
        raise InputError(
            f"`images` must hold at least one image. Received: images={_describe(images)}."
        )
    if 0 in images.shape[1:]:
        raise InputError(
            "`images` must have a height, width and number of channels of at least 1. "
            f"Received: images={_describe(images)}."
        )
    if images.shape[-1] == 2 and images.ndim != 3:
        raise InputError(
            "`images` must have 1 channel (grayscale) or 3 and more (the first 3 are shown as "
            f"RGB); 2 channels cannot be shown. Received: images={_describe(images)}."
        )


def _check_finite(images: np.ndarray) -> None:
    """Refuse images with NaN or infinite values (the images the callback keeps)."""
    if images.dtype.kind != "f":
        return
    finite = np.isfinite(images)
    if finite.all():
        return
    nan = int(np.isnan(images).sum())
    inf = int(images.size - finite.sum()) - nan
    bad = np.flatnonzero(~finite.reshape(len(images), -1).all(axis=1))
    which = ", ".join(str(i) for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
    raise InputError(
        "`images` must have finite values: Grad-CAM and the overlays need them. Received: "
        f"images={_describe(images)} with {nan} NaN and {inf} infinite value(s), in image(s) "
        f"{which}. Replace them (e.g. np.nan_to_num) or leave those images out."
    )


def _input_rank(model: Any) -> int | None:
    """The rank of the model's one input, or None (several inputs, or unknown ones)."""
    try:
        inputs = list(model.inputs or [])
    except (AttributeError, ValueError):
        return None
    return len(inputs[0].shape) if len(inputs) == 1 else None


def _input_mismatch(model: Any, images: np.ndarray, *, dataset: bool = False) -> str | None:
    """Why `model` cannot take `images` (inputs, channels, size, integer dtype), or None.

    None too when the model's inputs are unknown (a Sequential model without
    `keras.Input`, a subclassed model): the engine checks the images then. `dataset`:
    the images come from a `tf.data.Dataset` (the hints say how to fix the dataset).
    """
    try:
        inputs = list(model.inputs or [])
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    name = getattr(model, "name", "model")
    received = f"Received: images={_describe(images)}"
    if len(inputs) != 1:
        shapes = [tuple(x.shape) for x in inputs]
        return (
            f"model {name!r} takes {len(inputs)} inputs {shapes}; the callback explains "
            f"models with one image input. {received}."
        )
    expected = tuple(inputs[0].shape)
    if len(expected) != images.ndim:
        hints = {
            (4, 3): " For one image (height, width, channels), add a batch axis: images[None].",
            (4, 5): " Merge the batch axes, e.g. images.reshape(-1, *images.shape[-3:]).",
        }
        if dataset:
            axes = {3: "length channels", 5: "depth height width channels"}
            names = axes.get(len(expected), " ".join(["axis"] * (len(expected) - 1))).split()
            item = ", ".join(
                str(n) if n is not None else f"<{axis}>"
                for n, axis in zip(expected[1:], names, strict=True)
            )
            hints = {
                (4, 3): " For grayscale images (height, width), add a channel axis, e.g. "
                "dataset.map(lambda x, *rest: (x[..., None], *rest)).",
                (4, 5): " The dataset yields batches of batches: unbatch it once.",
                (3, 4): " The dataset's elements were read as images: for them to be read as "
                "batches of signals, give their length and channels in the element_spec, e.g. "
                f"dataset.map(lambda x, *rest: (tf.ensure_shape(x, (None, {item})), *rest)).",
                (5, 4): " The dataset's elements were read as batches of images: for them to "
                "be read as volumes, give their whole shape in the element_spec, e.g. "
                f"dataset.map(lambda x, *rest: (tf.ensure_shape(x, ({item})), *rest)).",
            }
        hint = hints.get((len(expected), images.ndim), "")
        return (
            f"model {name!r} takes inputs of shape {expected}, not "
            f"{_KINDS.get(images.ndim, 'these arrays')}. {received}.{hint}"
        )
    if expected[-1] is not None and expected[-1] != images.shape[-1]:
        return (
            f"model {name!r} expects {expected[-1]} channels (input shape {expected}), the "
            f"images have {images.shape[-1]}. {received}. Pass images with the model's channels."
        )
    size = zip(expected[1:-1], images.shape[1:-1], strict=True)
    if any(want is not None and want != got for want, got in size):
        wanted = "x".join(str(n) for n in expected[1:-1])
        what = f"images of {wanted} pixels" if images.ndim == 4 else f"inputs of size {wanted}"
        return (
            f"model {name!r} expects {what} (input shape {expected}). {received}. Resize "
            "them to the model's input size."
        )
    try:
        check_integer_cast(images, inputs[0])
    except InputError as error:
        return f"model {name!r}: {error} {received}."
    return None


def _error_reason(error: BaseException) -> str:
    """`<type>: <first line of its message>`, without TensorFlow's `{{function_node ...}}`."""
    message = getattr(error, "message", None) or str(error)
    message = re.sub(r"\{\{[^}]*\}\}\s*", "", message).strip()
    first = message.splitlines()[0].strip() if message else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _sample_dataset(dataset: tf.data.Dataset, count: int) -> _Readings:
    """The first `count` items of a dataset, under each reading of its elements.

    Elements (an array, or a tuple `(x,)`, `(x, labels)` or `(x, labels, weights)`) of
    rank 2 are signals, of rank 5 batches of volumes. Rank 3 is an image, and also a batch
    of signals when the element_spec gives their length and channels; rank 4 a batch of
    images, and also a volume when the element_spec gives its whole shape (a batch's
    size is seldom known, a signal's or volume's shape usually is). The elements are read
    once, as many as the readings need.
    """
    spec = dataset.element_spec
    wrong = (
        "A dataset must yield images, signals or volumes, or tuples (x,), (x, labels) or "
        "(x, labels, weights) of them. Received: images=a tf.data.Dataset with "
        f"element_spec={spec}."
    )
    if isinstance(spec, tuple):
        if len(spec) not in (1, 2, 3) or not isinstance(spec[0], tf.TensorSpec):
            raise InputError(wrong)
        shape = spec[0].shape
    elif isinstance(spec, tf.TensorSpec):
        shape = spec.shape
    else:
        raise InputError(wrong)
    rank = shape.rank
    if rank not in (2, 3, 4, 5):
        hints = {
            1: " For one-channel signals (length,), add a channel axis, e.g. "
            "dataset.map(lambda x, *rest: (x[..., None], *rest)).",
            None: " Give it with tf.ensure_shape in a dataset.map.",
        }
        raise InputError(
            "The dataset's elements must be signals (length, channels), images (height, "
            "width, channels) or volumes (depth, height, width, channels), of rank 2, 3 or 4, "
            "or batches of them, of rank 3, 4 or 5. Received: images=a tf.data.Dataset whose "
            f"elements are of {'unknown rank' if rank is None else f'rank {rank}'} "
            f"(element_spec={spec})." + hints.get(rank, "")
        )
    batched = [rank in (4, 5)]  # the first reading: signals, images, images, volumes
    note = ""
    if rank == 3:
        if shape[1:].is_fully_defined():
            batched.append(True)
        else:
            note = (
                "(If the elements are batches of signals (batch, length, channels), give their "
                "length and channels in the element_spec, e.g. with tf.ensure_shape in a "
                "dataset.map, to have them read as such.)"
            )
    elif rank == 4:
        if shape.is_fully_defined():
            batched.append(False)
        else:
            note = (
                "(If the elements are single volumes (depth, height, width, channels), give "
                "their whole shape in the element_spec, e.g. with tf.ensure_shape in a "
                "dataset.map, to have them read as such.)"
            )
    elements: list[Any] = []
    items = 0
    for element in dataset.as_numpy_iterator():
        elements.append(element)
        items += len(element[0] if isinstance(spec, tuple) else element)
        # Enough single items for an unbatched reading, and enough batched items for a
        # batched first reading (a batched second reading of rank-3 elements gets at least
        # `count` items from `count` non-empty batches).
        if (False not in batched or len(elements) >= count) and (not batched[0] or items >= count):
            break
    if not elements:
        raise InputError(
            "`images` must hold at least one image. Received: images=an empty tf.data.Dataset "
            f"with element_spec={spec}."
        )
    readings = _Readings({}, note=note)
    for is_batch in batched:
        item_rank = rank - 1 if is_batch else rank
        noun, axes = _ITEMS[item_rank]
        name = f"batches of {noun}s (batch, {axes[1:]}" if is_batch else f"{noun}s {axes}"
        readings.names[item_rank + 1] = name
        try:
            readings.found[item_rank + 1] = _read_elements(elements, is_batch, count, spec, noun)
        except ValueError as error:
            readings.found[item_rank + 1] = error
    return readings


def _read_elements(
    elements: list[Any], batched: bool, count: int, spec: Any, noun: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """The first `count` items of the elements and their labels (None without labels)."""
    labelled = isinstance(spec, tuple) and len(spec) > 1
    items: list[np.ndarray] = []
    labels: list[Any] = []
    for index, element in enumerate(elements):
        x = element[0] if isinstance(spec, tuple) else element
        y = element[1] if labelled else None
        if not batched:
            items.append(x)
            labels.append(y)
            continue
        if labelled and (np.ndim(y) == 0 or len(y) != len(x)):
            raise InputError(
                f"A batch's labels must hold one label per {noun}: element {index} of the "
                f"dataset holds {len(x)} {noun}s and labels of shape {np.shape(y)}. Received: "
                f"images=a tf.data.Dataset with element_spec={spec}."
            )
        items.extend(x)
        labels.extend(y if labelled else [None] * len(x))
    items, labels = items[:count], labels[:count]
    if not items:
        raise InputError(
            f"`images` must hold at least one {noun}. Received: images=a tf.data.Dataset of "
            f"empty batches, with element_spec={spec}."
        )
    try:
        array = np.stack(items)
    except ValueError as error:
        raise InputError(
            f"`images` must be one batch of {noun}s of the same shape. Received: images=a "
            f"tf.data.Dataset whose first {len(items)} {noun}s have shapes {_shapes(items)}. "
            f"Resize them to one size in the dataset (e.g. with tf.image.resize)."
        ) from error
    return array, (np.stack(labels) if labelled else None)


def _class_indices(labels: np.ndarray, count: int) -> np.ndarray:
    """Class indices `(batch,)` from labels (`tf_gradcam.targets.classes_from_labels`)."""
    classes = classes_from_labels(labels)
    if classes.shape != (count,):
        raise ValueError(
            f"Labels must give one class per image ({count} images). Received labels of "
            f"shape {np.shape(labels)}."
        )
    return classes


def _region_masks(regions: dict[str, Any] | None, shape: tuple[int, ...]) -> dict:
    """`{name: (batch or 1, height, width) float32 mask}` from masks or boxes."""
    if regions is None:
        return {}
    if not isinstance(regions, dict) or not regions:
        raise ValueError(
            "`regions` must be a non-empty dict {name: masks or boxes}. Received: "
            f"regions of type {type(regions).__name__}."
        )
    count, height, width = shape
    masks = {}
    for name, value in regions.items():
        if not isinstance(name, str) or not _REGION_NAME.match(name):
            raise ValueError(
                "Region names must be non-empty strings of letters, digits, '_', '.' or "
                f"'-' (they become TensorBoard tags). Received: {name!r}."
            )
        array = np.asarray(value)
        is_boxes = array.shape in ((4,), (count, 4))
        is_mask = array.shape in ((height, width), (count, height, width))
        if is_boxes and is_mask:
            raise ValueError(
                f"Region {name!r} of shape {array.shape} could be boxes or a mask; pass "
                f"per-image masks of shape {(count, height, width)}."
            )
        if is_boxes:
            masks[name] = _boxes_to_masks(array.reshape(-1, 4), height, width)
        elif is_mask:
            masks[name] = array.reshape(-1, height, width).astype(np.float32)
        else:
            raise ValueError(
                f"Region {name!r} must be masks {(count, height, width)} or "
                f"{(height, width)}, or boxes {(count, 4)} or (4,) matching the "
                f"{count} images of size {height}x{width}. Received shape {array.shape}."
            )
    return masks


def _boxes_to_masks(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = np.arange(height)[None, :, None]
    cols = np.arange(width)[None, None, :]
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    return ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)).astype(np.float32)


# ---------------------------------------------------------------- the metric


def _region_mass(heatmaps: np.ndarray, mask: np.ndarray) -> float:
    """Mean over images of `Σ heatmap·mask / Σ heatmap`; all-zero maps are skipped.

    Returns NaN when every map is all zero.
    """
    total = heatmaps.sum(axis=(1, 2), dtype=np.float64)
    inside = (heatmaps * mask).sum(axis=(1, 2), dtype=np.float64)
    valid = total > 0
    if not valid.any():
        return float("nan")
    return float(np.mean(inside[valid] / total[valid]))


# ------------------------------------------------------------------ summaries
# TensorBoard's plugin formats, written with tf.summary.write so that training
# does not need the tensorboard package (tf.summary.image/scalar/text do).


def _metadata(plugin: str, data_class: str, description: str = "") -> Any:
    return tf.compat.v1.SummaryMetadata(
        summary_description=description,
        plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name=plugin, content=b""),
        data_class=data_class,
    )


def _write_image(tag: str, picture: np.ndarray, step: int, description: str) -> None:
    """One uint8 `(height, width, 3)` picture in the image plugin's format."""
    height, width = picture.shape[:2]
    # OpenCV's encoder (BGR order) takes about a third of tf.image.encode_png's time here.
    encoded, png = cv2.imencode(".png", np.ascontiguousarray(picture[..., ::-1]))
    if not encoded:
        raise RuntimeError(f"OpenCV could not encode a {picture.shape} picture as PNG.")
    tensor = tf.constant([str(width).encode(), str(height).encode(), png.tobytes()])
    metadata = _metadata("images", "DATA_CLASS_BLOB_SEQUENCE", description)
    tf.summary.write(tag, tensor, step=step, metadata=metadata)


def _write_scalar(tag: str, value: float, step: int) -> None:
    tf.summary.write(
        tag,
        tf.constant(value, tf.float32),
        step=step,
        metadata=_metadata("scalars", "DATA_CLASS_SCALAR"),
    )


def _write_text(tag: str, text: str, step: int) -> None:
    tf.summary.write(
        tag, tf.constant(text), step=step, metadata=_metadata("text", "DATA_CLASS_TENSOR")
    )


def _class_name(classes: Any, i: int, class_names: Sequence[str] | None) -> str:
    """What the panel and the table call the class explained for image `i`."""
    if classes is None:
        return "custom target"
    index = int(classes[i])
    if class_names is not None and 0 <= index < len(class_names):
        return class_names[index]
    return f"class {index}"


def _targets_table(
    classes: Any, scores: np.ndarray, count: int, class_names: Sequence[str] | None = None
) -> str:
    """A Markdown table: image, class index, class name (given `class_names`), score (.4g)."""
    named = class_names is not None
    rows = ["| image | class | name | score |", "|---|---|---|---|"] if named else []
    rows = rows or ["| image | class | score |", "|---|---|---|"]
    for i in range(count):
        label = "—" if classes is None else str(int(classes[i]))
        name = f" {_class_name(classes, i, class_names).replace('|', '/')} |" if named else ""
        rows.append(f"| {i} | {label} |{name} {float(scores[i]):.4g} |")
    return "\n".join(rows)


# ------------------------------------------------------------------- panels
# Captions are drawn with OpenCV's Hershey font (ASCII only): composing a panel of a 32×32
# overlay (155 pixels wide, 172 high) takes about 0.1 ms, encoding it as PNG about 0.3 ms.

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_SCALE = 0.45  # cap height 12 px at zoom 1
_BAR_GAP = 4  # px between the picture and the colour bar, at zoom 1
_BAR_WIDTH = 8  # px of the colour bar, at zoom 1
_WHITE = 255


def _caption(
    classes: Any, scores: np.ndarray, i: int, class_names: Sequence[str] | None
) -> tuple[str, str]:
    """The two caption lines of image `i`: the class, then `score <pre-softmax score, .3g>`."""
    return _class_name(classes, i, class_names), f"score {float(scores[i]):.3g}"


def _panel_scale(height: int, width: int) -> int:
    """The integer upscaling factor of a `(height, width)` picture (see `PANEL_MIN_SIZE`)."""
    wanted = -(-PANEL_MIN_SIZE // min(height, width))  # ceil
    return max(1, min(wanted, PANEL_MAX_SIZE // max(height, width)))


def _zoom(width: int) -> int:
    """Text and colour-bar zoom: 1 up to 383 px wide pictures, then one more per 192 px."""
    return max(1, width // 192)


def _ascii(text: str) -> str:
    """`text` in the ASCII the Hershey font draws: accents dropped, other characters `?`."""
    decomposed = unicodedata.normalize("NFKD", str(text))
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return plain.encode("ascii", "replace").decode("ascii")


def _fit_text(text: str, width: int, scale: float, thickness: int) -> str:
    """`text`, cut with `...` until it is at most `width` pixels wide."""
    text = _ascii(text)
    if cv2.getTextSize(text, _FONT, scale, thickness)[0][0] <= width:
        return text
    while text and cv2.getTextSize(text + "...", _FONT, scale, thickness)[0][0] > width:
        text = text[:-1]
    return text + "..."


def _text_metrics(zoom: int) -> tuple[float, int, int, int]:
    """`(font scale, thickness, cap height, descent)` of the caption font at `zoom`."""
    scale, thickness = _FONT_SCALE * zoom, zoom
    (_, cap), descent = cv2.getTextSize("Mg", _FONT, scale, thickness)
    return scale, thickness, cap, descent


def caption_strip(lines: Sequence[str], width: int, *, zoom: int = 1) -> np.ndarray:
    """A white strip with `lines` of black text, one under the other, left-aligned.

    Args:
        lines: the text lines; each is drawn in ASCII and cut with `...` to fit.
        width: the strip's width in pixels.
        zoom: integer magnification of the font (1: cap height of 12 pixels).

    Returns:
        uint8 RGB array `(height, width, 3)`, `height` = `zoom · 4` plus one
        line height (cap height, descent and `zoom · 5` pixels) per line.

    Example:
        >>> caption_strip(["square", "score 3.21"], 140).shape
        (44, 140, 3)
    """
    scale, thickness, cap, descent = _text_metrics(zoom)
    line_height = cap + descent + 5 * zoom
    margin = 2 * zoom
    strip = np.full((2 * margin + line_height * len(lines), width, 3), _WHITE, np.uint8)
    for row, line in enumerate(lines):
        text = _fit_text(line, width - 2 * margin, scale, thickness)
        baseline = margin + row * line_height + 3 * zoom + cap
        cv2.putText(
            strip, text, (margin, baseline), _FONT, scale, (0, 0, 0), thickness, cv2.LINE_AA
        )
    return strip


@functools.lru_cache(maxsize=8)
def _colorbar(height: int, zoom: int) -> np.ndarray:
    """The panel's right column: gap, jet colour bar from 1 (top) to 0 (bottom), tick labels."""
    from matplotlib import colormaps

    scale, thickness = 0.8 * _FONT_SCALE * zoom, zoom
    label_width = max(cv2.getTextSize(t, _FONT, scale, thickness)[0][0] for t in "01")
    gap, bar = _BAR_GAP * zoom, _BAR_WIDTH * zoom
    column = np.full((height, gap + bar + gap + label_width + gap, 3), _WHITE, np.uint8)
    values = 1.0 - np.arange(height) / max(height - 1, 1)
    colours = np.round(colormaps[COLORMAP](values)[:, :3] * 255.0).astype(np.uint8)
    column[:, gap : gap + bar] = colours[:, None, :]
    left = 2 * gap + bar
    cap = cv2.getTextSize("1", _FONT, scale, thickness)[0][1]
    top, bottom = (cap + 1, height - 1) if height > 2 * cap + 2 else (height, height)
    for text, y in (("1", top), ("0", bottom)):
        cv2.putText(column, text, (left, y), _FONT, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    column.setflags(write=False)
    return column


def compose_panel(
    picture: np.ndarray, lines: Sequence[str] = (), *, colorbar: bool = True
) -> np.ndarray:
    """The picture the callback logs: upscaled overlay, colour bar and caption.

    Layout: the picture at the top left, upscaled by the integer factor that
    brings its shorter side to `PANEL_MIN_SIZE` pixels (its longer side to at
    most `PANEL_MAX_SIZE`; never downscaled), each pixel repeated (nearest
    neighbour, so the overlay's pixels are kept exactly); at its right, if
    `colorbar`, a vertical bar of the jet colormap, row `r` of `h` showing
    `jet(1 - r / (h - 1))` (1 at the top, 0 at the bottom, labelled); below,
    `caption_strip(lines)` across the whole width. Text and bar grow by one
    zoom step per 192 pixels of the upscaled picture's width.

    Args:
        picture: uint8 RGB `(height, width, 3)` picture, e.g. one of
            `tf_gradcam.overlay`'s.
        lines: caption lines (the callback gives the class and the score).
        colorbar: draw the jet colour bar (right for Grad-CAM overlays).

    Returns:
        uint8 RGB array `(height', width', 3)`.

    Raises:
        ValueError: `picture` is not a uint8 `(height, width, 3)` array.

    Example:
        >>> overlays = tf_gradcam.overlay(images, cam(images).heatmaps)   # (n, 32, 32, 3)
        >>> compose_panel(overlays[0], ["cat", "score 9.1"]).shape
        (172, 155, 3)
    """
    picture = np.asarray(picture)
    if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[-1] != 3:
        raise ValueError(
            "`picture` must be a uint8 RGB array (height, width, 3). Received: picture with "
            f"dtype {picture.dtype} and shape {picture.shape}."
        )
    factor = _panel_scale(*picture.shape[:2])
    big = np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1)
    height, width = big.shape[:2]
    zoom = _zoom(width)
    columns = [big, _colorbar(height, zoom)] if colorbar else [big]
    top = np.concatenate(columns, axis=1)
    if not lines:
        return top
    return np.concatenate([top, caption_strip(lines, top.shape[1], zoom=zoom)], axis=0)
