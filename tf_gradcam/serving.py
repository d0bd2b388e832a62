"""Serving export: a SavedModel that returns predictions and CAM heatmaps together.

`export(model, path)` writes a TensorFlow SavedModel (through Keras' own
`keras.export.ExportArchive`) whose signatures take a batch of images and
return, from one forward pass and one partial backward pass (the gradients
stop at the explained layer), the model's predictions, the explained classes
and their scores, and the heatmaps. The graph is the one the method's
compiled step traces in Python (`Engine.compiled_step`), so the outputs are
what `GradCAM(model)(images, target=...)` returns; only TensorFlow ops are
saved, and the SavedModel loads with `tf.saved_model.load`, `saved_model_cli`
or TensorFlow Serving where tf_gradcam is not installed.

Signatures (`serving_default` is `explain`):

- `explain(images)`: the `top_k` highest-scoring classes of each image, as
  `cam(images, target=TopK(top_k))`: `predictions (batch, classes)`,
  `classes (batch, k)` int32, `scores (batch, k)` float32 (before the
  softmax), `heatmaps (batch, k, height, width)`.
- `explain_classes(images, classes)`: one given class per image, as
  `cam(images, target=classes)`: `classes (batch,)`, `scores (batch,)`,
  `heatmaps (batch, height, width)`.

`format="tflite"` and `format="onnx"` write the forward-only CAM model of
`tf_gradcam.cam_export` instead (models whose head is global average pooling
→ Dense, where CAM equals Grad-CAM, the paper's §3.1).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_gradcam.cam_export import forward_cam, write_onnx, write_tflite
from tf_gradcam.errors import (
    InputError,
    TargetError,
    UnknownMethodError,
    UnsupportedModelError,
)
from tf_gradcam.image import normalize_maps
from tf_gradcam.methods import get_method, method_name
from tf_gradcam.targets import TargetSpec

__all__ = ["FORMATS", "SERVING_METHODS", "export"]

#: Methods whose whole explanation is one forward pass and at most one backward pass.
SERVING_METHODS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam")

#: `format=` values: the SavedModel of the method's step, or the forward-only CAM model.
FORMATS = ("tf_saved_model", "tflite", "onnx")

#: Why the other methods are not exported as one signature.
_MULTI_PASS = {
    "scorecam": "Score-CAM runs one extra forward pass per channel of the layer (the images "
    "masked by each upsampled channel)",
    "ablationcam": "Ablation-CAM runs one extra forward pass per channel of the layer (the "
    "layer's output with that channel zeroed)",
}
_GUIDED = (
    "guided backpropagation and deconvolution need a second backward pass, through modified "
    "ReLUs down to the input"
)

_HEATMAP_DTYPES = ("float32", "uint8")
_HEATMAP_SIZES = ("input", "layer")


def export(
    model: keras.Model,
    path: str | os.PathLike,
    layer: str | keras.layers.Layer | None = None,
    *,
    method: str = "gradcam",
    top_k: int = 1,
    heatmap_dtype: str = "float32",
    heatmap_size: str = "input",
    format: str = "tf_saved_model",
    output: int | str | None = None,
    input_shape: tuple[int | None, ...] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> str:
    """Write a SavedModel whose signatures return predictions and heatmaps in one call.

    The serving graph runs the model once, takes the gradients of the target
    scores (before a trailing softmax/sigmoid, as the paper's y^c) down to the
    explained layer only, and computes the method's maps, bilinear upsampling
    and normalisation as `GradCAM` does in Python. The batch axis is free.
    Everything is written to a temporary folder beside `path` and moved into
    place at the end: a failed export leaves nothing at `path`.

    Signatures of the SavedModel (`serving_default` is `explain`):

    - `explain(images)` → `predictions (batch, classes)` (the model's outputs),
      `classes (batch, k)` int32 (the `top_k` highest scores), `scores (batch, k)`,
      `heatmaps (batch, k, height, width)`: `cam(images, target=TopK(top_k))`.
    - `explain_classes(images, classes)` with int32 `classes (batch,)` →
      `predictions`, `classes (batch,)`, `scores (batch,)`,
      `heatmaps (batch, height, width)`: `cam(images, target=classes)`.

    With `format="tflite"` or `"onnx"`, the forward-only CAM model of
    `tf_gradcam.cam_export` is written instead, one signature like `explain`
    (a `.tflite` flatbuffer or a `.onnx` file at `path`).

    Args:
        model: a Functional or Sequential `keras.Model` with one input (a
            subclassed model works where `GradCAM` does, with `layer=` and
            `input_shape=`).
        path: the SavedModel folder to create (TensorFlow Serving reads
            `MODELS/NAME/VERSION`, e.g. `"models/demo/1"`), or the file for
            `format="tflite"`/`"onnx"`.
        layer: the layer to explain, as for `GradCAM` (`None`: the last feature map).
        method: one of `SERVING_METHODS`: `"gradcam"` (default), `"gradcam++"`,
            `"xgradcam"`, `"hirescam"`, `"layercam"`, `"eigencam"`.
        top_k: how many classes `explain` explains per image.
        heatmap_dtype: `"float32"` (maps in [0, 1]) or `"uint8"`
            (`round(255 * heatmap)`, a quarter of the bytes on the wire).
        heatmap_size: `"input"` (upsampled to the images' size, as
            `Explanation.heatmaps`) or `"layer"` (the layer's resolution:
            `Explanation.maps` scaled into [0, 1] in the same way).
        format: `"tf_saved_model"` (default), `"tflite"` or `"onnx"`.
        output: for multi-output models, which output class targets index.
        input_shape: the shape of one image, for models without defined
            inputs (subclassed, or Sequential without `keras.Input`); ignored otherwise.
        overwrite: replace what is at `path`; by default an existing path is refused.
        **options: keyword options of the method's class (e.g. `pooling="max"`,
            `counterfactual=True` for Grad-CAM), compiled into the graph.

    Returns:
        The absolute path written.

    Raises:
        FileExistsError: `path` exists and `overwrite=False`.
        UnknownMethodError: `method` names no method, or one that needs more
            than one forward and one backward pass (the message says why).
        UnsupportedModelError: several inputs, or (`"tflite"`/`"onnx"`) a head
            that is not global average pooling → Dense.
        TargetError: `top_k` is not in 1..classes, or the scored output is not
            `(batch, classes)`.
        InputError: a model without defined inputs and no `input_shape`.
        ValueError: an unknown `heatmap_dtype`, `heatmap_size` or `format`.
        The errors of the method's class (unknown layer, ...).

    Example:
        >>> tf_gradcam.export(model, "models/demo/1", top_k=3)
        >>> served = tf.saved_model.load("models/demo/1")   # no tf_gradcam needed
        >>> out = served.signatures["explain"](images=tf.constant(images))
        >>> out["heatmaps"].shape                           # (batch, 3, height, width)
    """
    name = _exportable_method(method)
    _check_options(top_k, heatmap_dtype, heatmap_size, format, name, options)
    target = _free_path(path, overwrite)
    forward_only = format != "tf_saved_model"
    cls = get_method(name) if forward_only else _serving_class(get_method(name))
    explainer = cls(model, layer, output=output, **options)
    signature = _input_signature(explainer, model, input_shape)
    num_classes = explainer.num_classes
    if num_classes is None:
        raise TargetError(
            "An exported signature explains classes: the scored output must be "
            f"(batch, classes). Model {model.name!r} has none; choose it with `output=`."
        )
    if top_k > num_classes:
        raise TargetError(
            f"`top_k` asks for more classes than the model's output has ({num_classes}). "
            f"Received: top_k={top_k}."
        )
    squash = _prediction_function(explainer, model, signature)
    finish = _outputs_function(explainer, squash, heatmap_dtype, heatmap_size)
    if forward_only:
        function = forward_cam(explainer, signature, top_k=top_k, finish=finish)
        write = write_tflite if format == "tflite" else write_onnx
        return _write_atomically(target, overwrite, lambda staged: write(function, staged))
    archive = _archive(explainer, model, signature, top_k, num_classes, finish)
    return _write_atomically(
        target, overwrite, lambda staged: archive.write_out(staged, verbose=False)
    )


# ------------------------------------------------------------------- checks


def _exportable_method(method: str) -> str:
    """The canonical name of an exportable method; a typed error naming why others are not."""
    if isinstance(method, str):
        key = method.lower().replace("-", "").replace("_", "").replace(" ", "")
        if key.startswith(("guided", "deconv")):
            raise UnknownMethodError(
                f"{method!r} cannot be exported as one serving signature: {_GUIDED}. "
                f"Exportable methods: {', '.join(SERVING_METHODS)}. Received: method={method!r}."
            )
    name = method_name(method)
    if name in _MULTI_PASS:
        raise UnknownMethodError(
            f"{method!r} cannot be exported as one serving signature: {_MULTI_PASS[name]}, "
            "not one forward and one backward pass. Exportable methods: "
            f"{', '.join(SERVING_METHODS)}. Received: method={method!r}."
        )
    return name


def _check_options(
    top_k: Any, heatmap_dtype: str, heatmap_size: str, format: str, name: str, options: dict
) -> None:
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1:
        raise TargetError(f"`top_k` must be a positive integer. Received: top_k={top_k!r}.")
    if heatmap_dtype not in _HEATMAP_DTYPES:
        raise ValueError(
            f"`heatmap_dtype` must be one of {_HEATMAP_DTYPES}. "
            f"Received: heatmap_dtype={heatmap_dtype!r}."
        )
    if heatmap_size not in _HEATMAP_SIZES:
        raise ValueError(
            f"`heatmap_size` must be one of {_HEATMAP_SIZES}. "
            f"Received: heatmap_size={heatmap_size!r}."
        )
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}. Received: format={format!r}.")
    if format != "tf_saved_model" and (name != "gradcam" or options):
        raise UnknownMethodError(
            f"format={format!r} writes the forward-only CAM model, which equals Grad-CAM with "
            "its default options (no gradients are computed, paper §3.1); export other "
            "methods or options with format='tf_saved_model'. Received: "
            f"method={name!r}" + (f", options {sorted(options)}." if options else ".")
        )


def _free_path(path: str | os.PathLike, overwrite: bool) -> str:
    """The absolute target path; `FileExistsError` if it exists and `overwrite` is off."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike. Received: path={path!r}.")
    target = os.path.abspath(os.fspath(path))
    if os.path.lexists(target) and not overwrite:
        raise FileExistsError(
            f"{target!r} already exists; export refuses to replace it. Pass "
            f"overwrite=True, or choose another path. Received: path={os.fspath(path)!r}."
        )
    return target


def _input_signature(
    explainer: Any, model: keras.Model, input_shape: tuple[int | None, ...] | None
) -> tf.TensorSpec:
    """The one image input's `TensorSpec`, batch axis free, named `"images"`."""
    if not explainer.built:
        if input_shape is None:
            input_shape = _declared_shape(model)
        if input_shape is None:
            raise InputError(
                f"Model {model.name!r} has no defined inputs (a subclassed model, or a "
                "Sequential model without keras.Input); pass the shape of one image, e.g. "
                "input_shape=(224, 224, 3)."
            )
        explainer.build(np.zeros((1, *input_shape), np.float32))
    leaves = keras.tree.flatten(explainer.input_signature())
    if len(leaves) != 1:
        raise UnsupportedModelError(
            f"Model {model.name!r} has {len(leaves)} inputs; an exported signature takes one "
            "batch of images. Wrap the model so that it takes one input."
        )
    spec = leaves[0]
    return tf.TensorSpec(spec.shape, spec.dtype, name="images")


def _declared_shape(model: keras.Model) -> tuple[int, ...] | None:
    """One image's shape from a model's declared `keras.Input`, if it has exactly one."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs or len(inputs) != 1 or None in tuple(inputs[0].shape[1:]):
        return None
    return tuple(inputs[0].shape[1:])


# ------------------------------------------------------------ the serving graph


def _serving_class(cls: type) -> type:
    """`cls` whose compiled step also returns the scored output of its forward pass.

    The engine sees the model's outputs in `target_scores`, inside the step;
    the subclass keeps them for that trace and adds them to the results
    (under `"logits"`, with the `k` axis the engine drops for one target),
    so the predictions come from the forward pass the maps come from.
    """

    class Serving(cls):
        def target_scores(self, outputs: Any, classes: tf.Tensor, spec: TargetSpec) -> Any:
            self._traced_outputs = outputs
            return super().target_scores(outputs, classes, spec)

        def _explain_batch(self, inputs: Any, classes: tf.Tensor, spec: TargetSpec) -> dict:
            result = super()._explain_batch(inputs, classes, spec)
            scored = self._scored_output(self._traced_outputs)
            self._traced_outputs = None
            return {**result, "logits": scored[:, None]}

    Serving.__name__ = Serving.__qualname__ = f"Serving{cls.__name__}"
    return Serving


def _prediction_function(
    explainer: Any, model: keras.Model, signature: tf.TensorSpec
) -> Callable[[tf.Tensor], tf.Tensor]:
    """How the model's outputs follow from the scores: identity, softmax or sigmoid.

    The scores are taken before a trailing softmax/sigmoid; the predictions are
    the model's own outputs. Which of the three the model applies is checked
    on a probe batch against `model(probe)`, so that no second forward pass
    is needed in the serving graph.

    Raises:
        UnsupportedModelError: the outputs are none of the three functions of the scores.
    """
    shape = [2, *[64 if size is None else size for size in signature.shape[1:]]]
    rng = np.random.default_rng(0)
    if signature.dtype.is_floating:
        probe = rng.random(shape).astype(signature.dtype.as_numpy_dtype)
    else:
        high = min(int(signature.dtype.max), 255)
        probe = rng.integers(0, high + 1, shape).astype(signature.dtype.as_numpy_dtype)
    # Traced as the serving step is: a subclassed model's softmax is removed in graphs only.
    traced = tf.function(functools.partial(_scores, explainer), autograph=False)
    scores = traced(tf.constant(probe))
    wanted = explainer._scored_output(model(tf.constant(probe), training=False))
    for function in (tf.identity, keras.activations.softmax, keras.activations.sigmoid):
        got = tf.cast(function(scores), tf.float32).numpy()
        if got.shape == tuple(wanted.shape) and np.allclose(
            got, tf.cast(wanted, tf.float32).numpy(), rtol=1e-4, atol=1e-5
        ):
            return function
    raise UnsupportedModelError(
        f"The outputs of model {model.name!r} are neither its scores nor their softmax or "
        "sigmoid, so the exported signature cannot return them from the explained forward "
        "pass. Export a model whose last step is one of those."
    )


def _outputs_function(
    explainer: Any,
    squash: Callable[[tf.Tensor], tf.Tensor],
    heatmap_dtype: str,
    heatmap_size: str,
) -> Callable[[dict, tf.Tensor], dict]:
    """`(step results, logits) -> the signature's outputs`, named and typed for serving."""
    signed = not getattr(explainer, "relu", True)

    def finish(result: dict, logits: tf.Tensor) -> dict:
        heatmaps = result["heatmaps"]
        if heatmap_size == "layer":
            maps = result["maps"]
            heatmaps, _ = normalize_maps(
                maps, signed=signed, axes=maps.shape.rank - result["scores"].shape.rank
            )
        if heatmap_dtype == "uint8":
            heatmaps = tf.cast(tf.round(heatmaps * 255.0), tf.uint8)
        return {
            "predictions": squash(logits),
            "classes": tf.cast(result["classes"], tf.int32),
            "scores": tf.cast(result["scores"], tf.float32),
            "heatmaps": heatmaps,
        }

    return finish


def checked_images(images: tf.Tensor) -> tf.Tensor:
    """`images`, after a graph assertion that float images are finite (as `GradCAM` requires)."""
    if not images.dtype.is_floating:
        return images
    return tf.debugging.assert_all_finite(
        images, "The images contain NaN or inf; Grad-CAM needs finite inputs."
    )


def _archive(
    explainer: Any,
    model: keras.Model,
    signature: tf.TensorSpec,
    top_k: int,
    num_classes: int,
    finish: Callable[[dict, tf.Tensor], dict],
) -> keras.export.ExportArchive:
    """The `ExportArchive` with the `explain` and `explain_classes` endpoints."""
    no_classes = np.zeros((1,), np.int32)
    top = explainer.compiled_step(signature, TargetSpec("top_k", no_classes, k=top_k))
    given = explainer.compiled_step(signature, TargetSpec("classes", no_classes))
    classes_spec = tf.TensorSpec((None,), tf.int32, name="classes")

    archive = keras.export.ExportArchive()
    archive.track(model)
    # Partials, not closures: TensorFlow's retracing detector would pool closures
    # of different exports and warn about "frequent retracing".
    archive.add_endpoint("explain", functools.partial(_explain, top, finish), [signature])
    archive.add_endpoint(
        "explain_classes",
        functools.partial(_explain_classes, given, finish, num_classes),
        [signature, classes_spec],
    )
    return archive


def _explain(step: Callable, finish: Callable, images: tf.Tensor) -> dict:
    """The `explain` signature: the top-k classes of each image."""
    images = checked_images(images)
    result = step(images, tf.zeros(tf.shape(images)[:1], tf.int32))
    return finish(result, result["logits"][:, 0])


def _explain_classes(
    step: Callable, finish: Callable, num_classes: int, images: tf.Tensor, classes: tf.Tensor
) -> dict:
    """The `explain_classes` signature: one given class per image, checked in the graph."""
    images = checked_images(images)
    checks = [
        tf.debugging.assert_equal(
            tf.shape(classes)[0],
            tf.shape(images)[0],
            message="`classes` must give one class per image",
        ),
        tf.debugging.assert_non_negative(classes, message="class indices must be >= 0"),
        tf.debugging.assert_less(
            classes,
            num_classes,
            message=f"class indices must be < {num_classes}, the model's number of classes",
        ),
    ]
    with tf.control_dependencies(checks):
        classes = tf.identity(classes)
    result = step(images, classes)
    return finish(result, result["logits"])


def _scores(explainer: Any, images: tf.Tensor) -> tf.Tensor:
    return explainer._scored_output(explainer.gradient_model(images)[1])


# ------------------------------------------------------------------ writing


def _write_atomically(target: str, overwrite: bool, write: Callable[[str], Any]) -> str:
    """Run `write(staged)` in a temporary folder beside `target`, then move it into place.

    Folders created for `target`'s parent are removed again if the export fails;
    with `overwrite`, the old `target` is moved aside first and put back if
    the move fails.
    """
    parent = os.path.dirname(target)
    created = _missing_ancestor(parent)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".partial", dir=parent)
    done = False
    try:
        staged = os.path.join(work, "artifact")
        write(staged)
        if not os.path.lexists(staged):
            raise RuntimeError(f"The export wrote nothing at {staged!r}.")
        if os.path.lexists(target):
            if not overwrite:  # appeared while exporting
                raise FileExistsError(f"{target!r} appeared during the export; not replaced.")
            previous = os.path.join(work, "previous")
            os.replace(target, previous)
            try:
                os.replace(staged, target)
            except BaseException:
                os.replace(previous, target)
                raise
        else:
            os.replace(staged, target)
        done = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not done and created is not None:
            _remove_empty(parent, created)
    return target


def _missing_ancestor(folder: str) -> str | None:
    """The highest ancestor of `folder` (itself included) that does not exist yet."""
    missing = None
    while not os.path.exists(folder):
        missing = folder
        upper = os.path.dirname(folder)
        if upper == folder:
            break
        folder = upper
    return missing


def _remove_empty(folder: str, top: str) -> None:
    """Remove `folder` and its ancestors up to `top` while they are empty."""
    while True:
        try:
            os.rmdir(folder)
        except OSError:
            return
        if folder == top:
            return
        folder = os.path.dirname(folder)
