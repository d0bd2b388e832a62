"""The engine every method shares: inputs, targets, the compiled step, the run.

A method is a small subclass of `Engine` that defines one thing, its compiled
step `_explain_batch(inputs, classes, spec) -> dict` (Grad-CAM: one forward
pass, ∂y^c/∂A, channel weights, the weighted sum; the pixel methods: ∂y^c/∂x
through modified ReLUs), and passes the engine a function that builds its
gradient model. The engine does the rest, the same way for every method:

- checks the images against the model's inputs and converts them (typed
  `InputError`s that name the fix);
- resolves the target (`tf_gradcam.targets`) and selects the scored output
  (`output=`), taking scores before a trailing softmax/sigmoid;
- compiles one step per target kind and input signature with a free batch
  axis, keeps a bounded number of them, and runs them.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_gradcam.errors import (
    BackendError,
    GradCAMError,
    InputError,
    TargetError,
    UnsupportedModelError,
)
from tf_gradcam.keras_adapter import first_layer_input_shape, input_rank, is_expandable
from tf_gradcam.submodel import GradientModel
from tf_gradcam.targets import Target, TargetSpec, _select_output, resolve_target

__all__ = ["Engine", "check_integer_cast", "score_columns"]

# Compiled steps kept per explainer (target kinds × callables × input signatures).
_MAX_COMPILED_STEPS = 32


def _check_backend() -> None:
    if keras.backend.backend() != "tensorflow":
        raise BackendError(
            f"tf_gradcam needs Keras on the TensorFlow backend; Keras is using "
            f"{keras.backend.backend()!r}. Set the environment variable "
            "KERAS_BACKEND=tensorflow before importing keras."
        )


class Engine:
    """Inputs, targets, the compiled-step cache and the run, for every method.

    Not used directly: methods subclass it and define `_explain_batch`.

    Args:
        model: the user's `keras.Model` (only read).
        build: `sample_shape -> gradient model`: builds the re-run graph the
            step differentiates (`tf_gradcam.submodel.build_gradient_model`
            or a method's own). Called at construction for models with
            defined inputs, else with the first batch's shape.
        output: for multi-output models, which output class targets index (a
            position or an output name); default the first.
        jit_compile: compile the step with XLA.

    Raises:
        BackendError: Keras runs on another backend than TensorFlow.
        TargetError: `output` names no output of the model.
        The errors of `build` (unknown layer, subclassed model...).
    """

    def __init__(
        self,
        model: keras.Model,
        build: Callable[[tuple[int, ...] | None], Any],
        *,
        output: int | str | None = None,
        jit_compile: bool = False,
    ) -> None:
        _check_backend()
        self.model = model
        self.output = output
        self.jit_compile = jit_compile
        self._build_gradient_model = build
        self._functions: dict[Any, Any] = {}
        self._concrete: dict[Any, Any] = {}
        self._warned_degenerate = False
        self._warned_churn = False
        self._gradient_model: GradientModel | None = None
        try:
            has_inputs = model.input is not None
        except (AttributeError, ValueError):
            has_inputs = False
        # Sequential models without inputs and subclassed models (no graph, no inputs)
        # are built from the first batch's shape.
        subclassed = isinstance(model, keras.Model) and not is_expandable(model)
        if (has_inputs or not isinstance(model, keras.Sequential)) and not subclassed:
            self._gradient_model = self._build(None)
            self._selected_output(self._gradient_model.output_structure)  # fail early

    def _explain_batch(self, inputs: Any, classes: tf.Tensor, spec: TargetSpec) -> Any:
        """The method's compiled step: a dict of `(batch, k, ...)` tensors."""
        raise NotImplementedError

    # -------------------------------------------- for code building on the engine

    @property
    def built(self) -> bool:
        """Whether the gradient model exists (see `build` for models without inputs)."""
        return self._gradient_model is not None

    def build(self, images: Any) -> None:
        """Build the gradient model from a sample batch, if it is not built yet.

        Args:
            images: a batch shaped like those to explain (checked as in a call).

        Raises:
            InputError: the images do not fit the model.
        """
        if not self.built:
            self._prepare(images)

    @property
    def num_classes(self) -> int | None:
        """Size of the class axis of the scored output, or `None` if it has none."""
        return self._num_classes() if self.built else None

    def input_signature(self) -> Any:
        """`tf.TensorSpec`s of the model's inputs with a free batch axis, in their structure."""
        return keras.tree.map_structure(
            lambda t: tf.TensorSpec((None, *t.shape[1:]), t.dtype), self.gradient_model.inputs
        )

    def compiled_step(self, signature: Any, spec: TargetSpec) -> Callable:
        """The compiled step `(inputs, classes) -> results` for an input signature and target.

        `classes` is an int32 `(batch,)` tensor (used by class targets); the
        results are the method's `(batch, ...)` tensors, with a `k` axis only for
        `TopK`. Steps are cached (see `trace_count`).
        """
        return self._function(signature, spec)

    def resolve_classes(self, images: Any, target: Target = None) -> np.ndarray | None:
        """The class indices a target stands for on these images, from one forward pass.

        Code that explains altered copies of the images (smoothing, flips)
        resolves the target once on the originals, so every copy explains the
        same class.

        Args:
            images: a batch, checked as in a call.
            target: any accepted target.

        Returns:
            int32 `(batch,)` classes, `(batch, k)` for `TopK(k)`, or `None`
            for a callable target (scored on each copy's own outputs).

        Raises:
            InputError: the images do not fit the model.
            TargetError: the target does not fit the model's output.
        """
        inputs = self._prepare(images)
        batch = int(keras.tree.flatten(inputs)[0].shape[0])
        spec = resolve_target(target, batch, self._num_classes())
        if spec.kind == "callable":
            return None
        if spec.kind == "classes":
            return np.broadcast_to(spec.classes, (batch,)).astype(np.int32)
        _, outputs = self.gradient_model(inputs)
        scored = self._scored_output(outputs)
        if spec.kind == "top_k":
            return tf.math.top_k(scored, k=spec.k).indices.numpy().astype(np.int32)
        return tf.argmax(scored, axis=-1).numpy().astype(np.int32)

    @property
    def gradient_model(self) -> GradientModel:
        """The functional model exposing `(activations, outputs)` (built on first use)."""
        if self._gradient_model is None:
            raise InputError(
                f"This {type(self).__name__} has not seen images yet and the model has no "
                "defined inputs; call it on a batch first."
            )
        return self._gradient_model

    def _image_index(self) -> int | None:
        return self._gradient_model.image_index if self._gradient_model is not None else None

    @property
    def trace_count(self) -> int:
        """How many times the compiled step has been traced (for retrace checks)."""
        return sum(f.experimental_get_tracing_count() for f in self._functions.values())

    def _output_names(self) -> list[str] | None:
        try:
            names = self.model.output_names
        except (AttributeError, ValueError):  # a Sequential model without inputs yet
            return None
        return list(names) if names else None

    def _selected_output(self, outputs: Any) -> Any:
        """The output class targets index: `output=` by position or name, else the first."""
        output = self.output
        if isinstance(outputs, (list, tuple)) and isinstance(output, str):
            names = self._output_names() or []
            if output not in names:
                raise TargetError(
                    f"`output={output!r}` names no output of model {self.model.name!r}; its "
                    f"outputs are {names} (or pass a position, 0 to {len(outputs) - 1})."
                )
            output = names.index(output)
        elif not isinstance(outputs, (list, tuple, dict)) and isinstance(output, str):
            names = self._output_names() or []
            if output not in names:
                raise TargetError(
                    f"`output={output!r}` names no output of model {self.model.name!r}, which "
                    f"has one output{f' named {names[0]!r}' if names else ''}; leave "
                    "`output` unset."
                )
            output = None
        return _select_output(outputs, output, "GradCAM")

    def _scored_output(self, outputs: Any) -> tf.Tensor:
        """The (batch, classes) output that class targets index."""
        scored = self._selected_output(outputs)
        if len(scored.shape) != 2:
            raise TargetError(
                f"Class targets need an output of shape (batch, classes); the scored "
                f"output has shape {tuple(scored.shape)}. Pass a callable target that "
                "returns one score per image, e.g. target=lambda out: out[:, 0, 3]."
            )
        return scored

    def _num_classes(self) -> int | None:
        outputs = self.gradient_model.output_structure
        try:
            return self._scored_output(outputs).shape[-1]
        except TargetError:
            return None

    def target_scores(
        self, outputs: Any, classes: tf.Tensor, spec: TargetSpec
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Scores y^c `(batch,)` or `(batch, k)` and their class indices."""
        if spec.kind == "callable":
            try:
                scores = spec.fn(outputs)
            except NotImplementedError as error:
                if "numpy" not in str(error).lower():
                    raise
                raise TargetError(
                    "The callable target converts a tensor to NumPy, but it runs inside a "
                    "compiled step where tensors are symbolic. Use keras.ops or tf functions "
                    "(keras.ops.take, tf.gather, x[:, 3]) instead of np.* in the target. "
                    f"Received: target={spec.fn!r}."
                ) from error
            if scores is None:
                raise TargetError(
                    "The callable target returned None; it must return one score per image, "
                    f"shape (batch,), e.g. target=lambda out: out[:, 3]. Received: "
                    f"target={spec.fn!r}."
                )
            scores = tf.convert_to_tensor(scores)
            if len(scores.shape) != 1:
                raise TargetError(
                    "A callable target must return one score per image, shape (batch,); "
                    f"it returned shape {tuple(scores.shape)}."
                )
            return scores, tf.fill(tf.shape(scores), -1)
        scored = self._scored_output(outputs)
        if spec.kind == "top_k":
            scores, top = tf.math.top_k(scored, k=spec.k)
            return scores, tf.cast(top, tf.int32)
        if spec.kind == "predicted":
            classes = tf.cast(tf.argmax(scored, axis=-1), tf.int32)
        scores = tf.gather(scored, classes, axis=1, batch_dims=1)
        return scores, classes

    def _prepare(self, images: Any) -> Any:
        """Validate images against the model's inputs; return float tensors."""
        if self._gradient_model is None:
            self._gradient_model = self._build(self._sample_shape(images))
            self._selected_output(self._gradient_model.output_structure)
        specs = self._gradient_model.inputs
        leaves = keras.tree.flatten(specs)
        if isinstance(images, dict):
            given = self._inputs_from_dict(images, specs)
        elif isinstance(images, (list, tuple)) and len(leaves) > 1:
            given = list(images)
        else:
            given = [images]
        if len(given) != len(leaves):
            raise InputError(
                f"The model takes {len(leaves)} inputs; received {len(given)}. Pass a list "
                "(or dict) with one array per input, e.g. [images, questions]."
            )
        image_axis = 1 if self._gradient_model.image_channels_first else -1
        vocabularies = self._gradient_model.vocabularies
        prepared = [
            _prepare_leaf(
                value,
                spec,
                channels_axis=image_axis if i == self._image_index() else -1,
                vocabulary=vocabularies.get(i),
                explained=i == self._image_index(),
            )
            for i, (value, spec) in enumerate(zip(given, leaves, strict=True))
        ]
        batch = {int(p.shape[0]) for p in prepared if p.shape[0] is not None}
        if len(batch) > 1:
            raise InputError(f"The inputs have different batch sizes: {sorted(batch)}.")
        return keras.tree.pack_sequence_as(specs, prepared)

    def _sample_shape(self, images: Any) -> tuple[int | None, ...]:
        """The input shape of a Sequential model without `keras.Input`, from its first layer.

        A model built by an earlier call knows it (`layers[0].input`); otherwise
        it is the images' shape, with a batch axis added to a single image when
        the first layer's input spec asks for one more axis.
        """
        if isinstance(self.model, keras.Model) and not is_expandable(self.model):
            # A subclassed model: the images' own shape, a batch as given.
            several = isinstance(images, dict) or (
                isinstance(images, (list, tuple))
                and len(images) > 1
                and len({np.ndim(v) for v in images}) == 1
                and np.ndim(images[0]) >= 4
            )
            if several:
                raise UnsupportedModelError(
                    f"Model {self.model.name!r} is a subclassed keras.Model; tf_gradcam "
                    "explains subclassed models with one image input only. Received "
                    f"{type(images).__name__} of {len(images)} inputs."
                )
            array = _as_array(images)
            if array.ndim < 3:
                raise InputError(
                    f"`images` must be a batch (batch, height, width, channels). Received "
                    f"shape {array.shape}."
                )
            return (None, *array.shape[1:])
        known = first_layer_input_shape(self.model)
        if known is not None:
            return (None, *known[1:])
        array = _as_array(images)
        rank = input_rank(self.model.layers[0]) if self.model.layers else None
        if rank is not None and array.ndim == rank - 1:
            array = array[None]
        if array.ndim < 2:
            raise InputError(
                f"`images` must be a batch (batch, height, width, channels). Received "
                f"shape {array.shape}."
            )
        return (None, *array.shape[1:])

    def _build(self, sample_shape: tuple[int, ...] | None) -> GradientModel:
        try:
            return self._build_gradient_model(sample_shape)
        except (ValueError, TypeError) as error:
            if sample_shape is None or isinstance(error, GradCAMError):
                raise
            reason = str(error).strip().splitlines()[-1][:300]
            raise InputError(
                f"Model {self.model.name!r} (a Sequential model without `keras.Input`) cannot "
                f"run on images shaped {sample_shape[1:]}: {reason} Pass images of the shape "
                "it was built for, or declare keras.Input(shape) as its first layer."
            ) from error

    def _inputs_from_dict(self, images: dict, specs: Any) -> list:
        """One array per input from a dict keyed by the inputs' names (as Keras accepts)."""
        if isinstance(specs, dict):
            names = list(specs)
        else:
            try:
                names = [x.name for x in keras.tree.flatten(self.model.input)]
            except (AttributeError, ValueError):
                names = []
            if len(names) != len(keras.tree.flatten(specs)) or len(set(names)) != len(names):
                raise InputError(
                    "`images` is a dict, but the model's inputs have no distinct names to "
                    f"match its keys {sorted(images)}. Pass a list with one array per input."
                )
        missing = [name for name in names if name not in images]
        if missing:
            unknown = sorted(set(images) - set(names))
            raise InputError(
                f"`images` has no entry for the model input(s) {missing}; the model's inputs "
                f"are {names}. Received keys: {sorted(images)}"
                + (f" ({unknown} match no input)." if unknown else ".")
            )
        return [images[name] for name in names]

    def _function(self, inputs: Any, spec: TargetSpec) -> Callable:
        signature = keras.tree.map_structure(
            lambda t: tf.TensorSpec((None, *t.shape[1:]), t.dtype), inputs
        )
        key = (spec.kind, spec.k, spec.fn, _signature_key(signature))
        concrete = self._concrete.get(key)
        if concrete is None:
            step_spec = replace(spec, classes=np.zeros((0,), np.int32))
            # A partial (not a closure) keeps TensorFlow's "frequent retracing"
            # detector from pooling the traces of different GradCAM objects.
            function = tf.function(
                functools.partial(_step, self, step_spec),
                input_signature=[signature, tf.TensorSpec((None,), tf.int32)],
                autograph=False,
                jit_compile=self.jit_compile or None,
            )
            if len(self._functions) >= _MAX_COMPILED_STEPS:
                oldest = next(iter(self._functions))  # oldest first
                self._functions.pop(oldest)
                self._concrete.pop(oldest)
                if not self._warned_churn:
                    self._warned_churn = True
                    warnings.warn(
                        f"{type(self).__name__} has compiled {_MAX_COMPILED_STEPS} different "
                        "steps; the "
                        "oldest are dropped and recompiled when needed. A new callable "
                        "target on every call (e.g. an inline lambda) forces a recompile: "
                        "define the target function once and reuse it.",
                        RuntimeWarning,
                        stacklevel=4,
                    )
            # The signature is fixed, so its one concrete function is called
            # directly: no per-call dispatch through the polymorphic function.
            concrete = function.get_concrete_function()
            self._functions[key] = function
            self._concrete[key] = concrete
        return concrete

    def _run(self, images: Any, target: Target) -> tuple[dict, TargetSpec]:
        """Prepare the images, resolve the target and run the compiled step.

        Shared with `tf_gradcam.guided`, whose methods return other keys. The
        `k` axis is dropped (inside the compiled step) unless the target is `TopK`.
        """
        inputs = self._prepare(images)
        first = keras.tree.flatten(inputs)[0]
        batch = first.shape[0]
        spec = resolve_target(target, batch, self._num_classes())
        classes = tf.constant(spec.classes)
        if batch is None:  # graph mode with an unknown batch size
            size = tf.shape(first)[:1]
            if spec.kind == "classes" and spec.classes.size > 1:
                check = tf.debugging.assert_equal(
                    size[0],
                    spec.classes.size,
                    message=f"`target` gives {spec.classes.size} classes but the batch has a "
                    "different number of images; give one class per image or a single int",
                )
                with tf.control_dependencies([check]):
                    classes = tf.identity(classes)
            else:
                classes = tf.broadcast_to(classes, size)
        try:
            result = self._function(inputs, spec)(inputs, classes)
        except tf.errors.InvalidArgumentError as error:
            # A target object's own check, run inside the compiled step as an
            # assertion (a box no raw prediction matches): its typed error.
            marker = f"{type(target).__name__}: "
            if callable(target) and marker in error.message:
                text = error.message[error.message.index(marker) :]
                raise TargetError(text.split("\n")[0].split(" [[")[0].strip()) from None
            raise
        return result, spec


def score_columns(scores: tf.Tensor, spec: TargetSpec) -> list[tf.Tensor]:
    """The score columns to differentiate one at a time: `[scores]`, or one per top-k rank.

    Take them under the tape: slices taken after it are not differentiable.
    """
    return [scores] if spec.k == 1 else [scores[:, j] for j in range(spec.k)]


def _step(engine: Engine, spec: TargetSpec, inputs: Any, classes: tf.Tensor) -> dict:
    result = engine._explain_batch(inputs, classes, spec)
    if spec.kind != "top_k":  # drop the k axis in the graph: no eager slicing per call
        result = tf.nest.map_structure(lambda value: value[:, 0], result)
    return result


def _signature_key(signature: Any) -> tuple:
    return tuple((tuple(s.shape.as_list()), s.dtype.name) for s in keras.tree.flatten(signature))


def _prepare_leaf(
    value: Any,
    spec: Any,
    *,
    channels_axis: int = -1,
    vocabulary: int | None = None,
    explained: bool = False,
) -> tf.Tensor:
    """Check one input array against its `keras.Input` and convert it.

    `channels_axis` is 1 for a channels-first image input, else -1;
    `vocabulary` the size of the `Embedding` reading this input, if any;
    `explained` whether the maps are sized after this input (its channels are
    checked also when it is a 1-D signal or a 3-D volume).
    """
    expected = tuple(spec.shape)
    if isinstance(value, tf.Tensor) and not tf.executing_eagerly():
        return tf.cast(value, spec.dtype)  # graph mode: static checks only
    array = _as_array(value)
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise InputError(
            f"Images must be numeric arrays. Received dtype {array.dtype} with shape {array.shape}."
        )
    added_batch = array.ndim == len(expected) - 1
    if added_batch:
        array = array[None]
    if array.ndim != len(expected):
        raise InputError(
            f"Expected a batch of rank {len(expected)} shaped like {expected}; received "
            f"an array of shape {array.shape} (rank {array.ndim})."
        )
    if array.shape[0] == 0:
        raise InputError("Received an empty batch (0 images).")
    checked = len(expected) == 4 or (explained and len(expected) in (3, 5))
    channels = expected[channels_axis] if checked else None
    if channels is not None and array.shape[channels_axis] != channels:
        first = channels_axis == 1
        raise InputError(
            f"The model expects {channels} channels on axis {channels_axis % len(expected)} "
            f"({'channels_first' if first else 'channels_last'}); the images have "
            f"{array.shape[channels_axis]} (shape {array.shape}). Convert them, e.g. "
            f"grayscale→RGB with np.repeat(images, 3, axis={channels_axis})"
            + (
                "; a (batch, height, width) grayscale batch needs a channel axis: "
                f"add a channel axis with {'images[:, None]' if first else 'images[..., None]'}."
                if added_batch
                else "."
            )
        )
    for axis, (want, got) in enumerate(zip(expected[1:], array.shape[1:], strict=True), start=1):
        if want is not None and want != got:
            raise InputError(
                f"Input axis {axis} has size {got} but the model expects {want}: "
                f"expected shape {expected}, received {array.shape}. Resize the images "
                "to the model's input size."
            )
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise InputError(
            f"The images contain {bad} non-finite value(s) (NaN or inf); Grad-CAM needs "
            "finite inputs."
        )
    check_integer_cast(array, spec)
    if vocabulary is not None and array.size and (array.min() < 0 or array.max() >= vocabulary):
        bad = array.max() if array.max() >= vocabulary else array.min()
        raise InputError(
            f"Token id {bad} is outside the vocabulary of the Embedding reading this input "
            f"(ids 0..{vocabulary - 1}, input shape {tuple(spec.shape)}). Map unknown words "
            "to an out-of-vocabulary id the model was trained with."
        )
    if isinstance(value, tf.Tensor) and value.shape.rank == len(expected):
        return tf.cast(value, spec.dtype)  # keep the tensor: differentiable inputs
    return tf.convert_to_tensor(array, dtype=spec.dtype)


def _as_array(value: Any) -> np.ndarray:
    """A NumPy view of images; images of different shapes are an `InputError`."""
    if isinstance(value, tf.Tensor):
        return value.numpy()
    try:
        return np.asarray(value)
    except ValueError as error:  # a ragged list: NumPy cannot stack it
        shapes = sorted({np.shape(v) for v in value}) if isinstance(value, (list, tuple)) else []
        raise InputError(
            "The images have different shapes and cannot form one batch"
            + (f" (shapes {shapes[:4]})" if shapes else "")
            + ". Resize them to the model's input size first, e.g. with "
            "tf.image.resize, then stack them."
        ) from error


def check_integer_cast(array: np.ndarray, spec: Any) -> None:
    """Refuse values an integer input would silently change (floats in [0, 1] → zeros)."""
    dtype = tf.as_dtype(spec.dtype)
    if not dtype.is_integer or array.size == 0:
        return
    low, high = dtype.min, dtype.max
    whole = array.dtype.kind in "iub" or bool(np.all(np.round(array) == array))
    inside = bool(array.min() >= low and array.max() <= high)
    if not (whole and inside):
        raise InputError(
            f"The model's input is {dtype.name}; the images are {array.dtype} with values in "
            f"[{array.min():.4g}, {array.max():.4g}], which a cast to {dtype.name} would change"
            + (" (fractions are cut: floats in [0, 1] become zeros)" if not whole else "")
            + f". Pass {dtype.name} images in [{low}, {high}], e.g. "
            f"(images * 255).round().astype('{dtype.name}') for [0, 1] floats."
        )
