"""The Grad-CAM engine: tape → gradients → channel weights → weighted sum → ReLU.

Follows Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", §3 (eqs. 1–2), §3.3 (counterfactuals) and the
ablations of Appendix B.2. Every method shares this engine; a variant
overrides one step (`channel_weights`), as in pytorch-grad-cam.
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_gradcam.errors import (
    BackendError,
    GradCAMError,
    InputError,
    NoGradientError,
    TargetError,
)
from tf_gradcam.image import normalize_maps, upsample_maps
from tf_gradcam.keras_adapter import first_layer_input_shape, input_rank
from tf_gradcam.relu_rules import ReluOverride
from tf_gradcam.submodel import CallOverride, GradientModel, build_gradient_model
from tf_gradcam.targets import Target, TargetSpec, _select_output, resolve_target

__all__ = ["Explanation", "GradCAM", "explain"]

_POOLINGS = ("mean", "max")
# Compiled steps kept per explainer (target kinds × callables × input signatures).
_MAX_COMPILED_STEPS = 32


@dataclass(frozen=True)
class Explanation:
    """What one Grad-CAM call returns.

    Per-image arrays have the batch axis first; with `TopK(k)` targets they gain
    a `k` axis right after it. `GradCAM.__call__` returns NumPy arrays,
    `GradCAM.compute` returns `tf.Tensor`s (for graph mode and differentiation).

    Attributes:
        heatmaps: `(batch, height, width)` float32 in [0, 1]: `maps` bilinearly
            upsampled to the input size, then divided by each map's maximum
            (min-max scaled when `relu=False`). An all-zero map stays zero.
        maps: `(batch, h, w)` map at the layer's resolution, after the ReLU of
            eq. 2 (equal to `raw_maps` when `relu=False`), unnormalised.
        raw_maps: `(batch, h, w)` signed map `Σ_k α_k A^k` before the ReLU.
        weights: `(batch, channels)` neuron importances α_k^c (eq. 1).
        scores: `(batch,)` target scores y^c.
        classes: `(batch,)` int class indices of the targets, or `None` when the
            target is a callable.
        degenerate: `(batch,)` bool, `True` where the map is all zero (or
            constant, or non-finite before cleaning).
        layer: path of the explained layer, e.g. `"resnet50/conv5_block3_out"`.
    """

    heatmaps: Any
    maps: Any
    raw_maps: Any
    weights: Any
    scores: Any
    classes: Any
    degenerate: Any
    layer: str

    def numpy(self) -> Explanation:
        """Return a copy whose tensor fields are NumPy arrays."""
        converted = {}
        for f in fields(self):
            value = getattr(self, f.name)
            converted[f.name] = value.numpy() if isinstance(value, tf.Tensor) else value
        return replace(self, **converted)


def _check_backend() -> None:
    if keras.backend.backend() != "tensorflow":
        raise BackendError(
            f"tf_gradcam needs Keras on the TensorFlow backend; Keras is using "
            f"{keras.backend.backend()!r}. Set the environment variable "
            "KERAS_BACKEND=tensorflow before importing keras."
        )


class GradCAM:
    """Grad-CAM for a Keras model and one of its convolutional layers.

    Implements Selvaraju et al. (ICCV 2017 / IJCV 2019), §3: for a target
    score y^c taken *before* the softmax, the neuron importances are the
    spatial mean of the gradients, `α_k^c = 1/Z Σ_ij ∂y^c/∂A^k_ij` (eq. 1),
    computed per image, and the map is `ReLU(Σ_k α_k^c A^k)` (eq. 2).

    Build it once per model and layer and call it many times: the gradient step
    is compiled with `tf.function` and is not retraced for batches of the same
    image size and dtype. The user's model is never modified; it runs in
    inference mode (Dropout off, BatchNorm with moving statistics).

    Departures from the paper, all optional: `pooling="max"` (Appendix B.2.2),
    `relu=False` (B.2.1), `absolute_gradients=True` (Table 3),
    `counterfactual=True` (§3.3, eq. 12). A trailing sigmoid is removed like a
    softmax (multi-label heads), which the paper does not discuss.

    Args:
        model: a Functional or Sequential `keras.Model` (nested models are fine).
        layer: the convolutional layer to explain: a name, an `"outer/inner"`
            path through nested models, a `Layer` (or bare operation) object, or
            `None` for the last layer with a 4-D output before the global pooling
            (trailing max/average pooling skipped: VGG16's `block5_conv3`, not
            `block5_pool`).
        pooling: `"mean"` (eq. 1) or `"max"` pooling of the gradients.
        relu: apply the ReLU of eq. 2.
        counterfactual: negate the gradients (§3.3): regions whose removal would
            raise the score.
        absolute_gradients: pool `|∂y^c/∂A|` instead of the gradients.
        logits: explain the score before a trailing softmax/sigmoid (paper
            default). `False` explains the model's outputs as they are.
        output: for multi-output models, which output class targets index (int
            position or output name); default the first.
        call_override: advanced: replaces layer calls in the gradient graph.
        relu_gradients: `"guided"` or `"deconv"` to backpropagate through every
            ReLU with the guided or deconvolution rule (the ablation of
            Appendix B.2.3, `tf_gradcam.relu_rules.ReluOverride`); `None` (default)
            uses the true gradients.
        jit_compile: compile the step with XLA. Off by default: on CPU it was
            no faster for ResNet50 and about 10x slower for MobileNetV2's
            depthwise convolutions (docs/performance.md); try it on a GPU.

    Raises:
        BackendError: Keras runs on another backend than TensorFlow.
        UnsupportedModelError: the model is subclassed.
        LayerNotFoundError: `layer` matches no layer; the message lists the closest.
        NotSpatialError: the layer's output is not 4-D.
        ValueError: an unknown option value.

    Example:
        >>> cam = tf_gradcam.GradCAM(model, layer="conv5_block3_out")
        >>> result = cam(images)                 # predicted classes
        >>> result.heatmaps.shape                # (batch, height, width)
        >>> cam(images, target=281).heatmaps     # 'tabby cat' for every image
    """

    def __init__(
        self,
        model: keras.Model,
        layer: str | keras.layers.Layer | None = None,
        *,
        pooling: str = "mean",
        relu: bool = True,
        counterfactual: bool = False,
        absolute_gradients: bool = False,
        logits: bool = True,
        output: int | str | None = None,
        call_override: CallOverride | None = None,
        relu_gradients: str | None = None,
        jit_compile: bool = False,
    ) -> None:
        _check_backend()
        if relu_gradients is not None:
            if call_override is not None:
                raise ValueError(
                    "`relu_gradients` and `call_override` both replace layer calls; pass "
                    f"one of them. Received: relu_gradients={relu_gradients!r} and "
                    f"call_override={call_override!r}."
                )
            call_override = ReluOverride(model, relu_gradients)
        if pooling not in _POOLINGS:
            raise ValueError(
                f"`pooling` must be one of {_POOLINGS}. Received: pooling={pooling!r}."
            )
        if counterfactual and absolute_gradients:
            raise ValueError(
                "`counterfactual=True` with `absolute_gradients=True` makes every weight "
                "negative and every map zero; choose one of them."
            )
        self.model = model
        self.pooling = pooling
        self.relu = relu
        self.counterfactual = counterfactual
        self.absolute_gradients = absolute_gradients
        self.logits = logits
        self.output = output
        self._layer_argument = layer
        self._call_override = call_override
        self.jit_compile = jit_compile
        self._functions: dict[Any, Any] = {}
        self._concrete: dict[Any, Any] = {}
        self._warned_degenerate = False
        self._warned_churn = False
        self._gradient_model: GradientModel | None = None
        try:
            has_inputs = model.input is not None
        except (AttributeError, ValueError):
            has_inputs = False
        if has_inputs or not isinstance(model, keras.Sequential):
            self._gradient_model = self._build(None)
            self._selected_output(self._gradient_model.output_structure)  # fail early

    # ------------------------------------------------------------------ build

    def _build_gradient_model(self, sample_shape: tuple[int, ...] | None) -> GradientModel:
        return build_gradient_model(
            self.model,
            self._layer_argument,
            logits=self.logits,
            call_override=self._call_override,
            sample_shape=sample_shape,
        )

    @property
    def gradient_model(self) -> GradientModel:
        """The functional model exposing `(activations, outputs)` (built on first use)."""
        if self._gradient_model is None:
            raise InputError(
                "This GradCAM has not seen images yet and the model has no defined "
                "inputs; call it on a batch first."
            )
        return self._gradient_model

    def _image_index(self) -> int | None:
        return getattr(self._gradient_model, "image_index", None)

    @property
    def layer(self) -> str:
        """Path of the explained layer."""
        return self.gradient_model.layer_path

    @property
    def trace_count(self) -> int:
        """How many times the compiled step has been traced (for retrace checks)."""
        return sum(f.experimental_get_tracing_count() for f in self._functions.values())

    # ------------------------------------------------------------- the steps

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

    def gradients(
        self, inputs: Any, classes: tf.Tensor, spec: TargetSpec
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """One forward pass, then ∂y^c/∂A for each of the k targets.

        Returns:
            `(activations, gradients, scores, classes)`; activations are
            `(batch, h, w, channels)` float32, gradients `(batch, k, h, w, channels)`.
        """
        gradient_model = self.gradient_model
        with tf.GradientTape(persistent=spec.k > 1) as tape:
            activations, outputs = gradient_model(inputs)
            tape.watch(activations)
            scores, resolved = self.target_scores(outputs, classes, spec)
            # per-target slices are taken under the tape so they are differentiable
            columns = [scores] if spec.k == 1 else [scores[:, j] for j in range(spec.k)]
        grads = [tape.gradient(column, activations) for column in columns]
        del tape
        if any(g is None for g in grads):
            raise NoGradientError(
                f"The target score does not depend on layer {gradient_model.layer_path!r} "
                "(no gradient path). Choose a layer the scored output is computed from, "
                "or another output/target."
            )
        activations = tf.cast(activations, tf.float32)
        grads = tf.stack([tf.cast(g, tf.float32) for g in grads], axis=1)
        if gradient_model.channels_first:
            activations = tf.transpose(activations, [0, 2, 3, 1])
            grads = tf.transpose(grads, [0, 1, 3, 4, 2])
        if spec.kind != "top_k":
            scores = scores[:, None]
            resolved = resolved[:, None]
        return activations, grads, tf.cast(scores, tf.float32), resolved

    def channel_weights(self, activations: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
        """Neuron importances α `(batch, k, channels)` from the gradients (eq. 1).

        Subclasses override this one step to define other CAM variants.
        """
        if self.absolute_gradients:
            gradients = tf.abs(gradients)
        if self.counterfactual:
            gradients = -gradients
        if self.pooling == "max":
            return tf.reduce_max(gradients, axis=[2, 3])
        return tf.reduce_mean(gradients, axis=[2, 3])

    def _explain_batch(self, inputs: Any, classes: tf.Tensor, spec: TargetSpec) -> dict:
        activations, grads, scores, resolved = self.gradients(inputs, classes, spec)
        return self.maps_from_gradients(inputs, activations, grads, scores, resolved)

    def maps_from_gradients(
        self,
        inputs: Any,
        activations: tf.Tensor,
        grads: tf.Tensor,
        scores: tf.Tensor,
        resolved: tf.Tensor,
        *,
        size: tf.Tensor | None = None,
    ) -> dict:
        """Channel weights → weighted sum → ReLU → heatmaps at the input size.

        The steps after `gradients`, on what it returns; `tf_gradcam.layerwise`
        runs them once per layer after one shared forward and backward pass.
        `size` is the heatmaps' `(height, width)`; by default that of the image
        input the explained layer is computed from.

        Returns:
            The fields of an `Explanation` (without `layer`), `k` axis kept.
        """
        weights = self.channel_weights(activations, grads)
        raw = tf.einsum("nhwc,nkc->nkhw", activations, weights)
        maps = tf.nn.relu(raw) if self.relu else raw
        if size is None:
            size = self.gradient_model.image_size(inputs)
        heatmaps, degenerate = normalize_maps(upsample_maps(maps, size), signed=not self.relu)
        finite = tf.reduce_all(tf.math.is_finite(raw), axis=[2, 3])
        clean = tf.where(tf.math.is_finite(raw), raw, 0.0)
        return {
            "heatmaps": heatmaps,
            "maps": tf.nn.relu(clean) if self.relu else clean,
            "raw_maps": clean,
            "weights": tf.where(tf.math.is_finite(weights), weights, 0.0),
            "scores": scores,
            "classes": resolved,
            "degenerate": tf.logical_or(degenerate, tf.logical_not(finite)),
        }

    # --------------------------------------------------------------- calling

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
        vocabularies = getattr(self._gradient_model, "vocabularies", {})
        prepared = [
            _prepare_leaf(
                value,
                spec,
                channels_axis=image_axis if i == self._image_index() else -1,
                vocabulary=vocabularies.get(i),
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
                        f"GradCAM has compiled {_MAX_COMPILED_STEPS} different steps; the "
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

    def compute(self, images: Any, target: Target = None) -> Explanation:
        """Like calling the object, but returns `tf.Tensor` fields.

        Use it inside a `tf.function` or under a `tf.GradientTape` (the maps are
        differentiable with respect to the inputs).

        Args:
            images: `(batch, height, width, channels)` array or tensor; a list/dict
                of arrays for multi-input models.
            target: what to explain; see `tf_gradcam.targets`.

        Returns:
            An `Explanation` with `tf.Tensor` fields.

        Raises:
            InputError: wrong rank, shape, channels or non-finite values.
            TargetError: class out of range or unsupported target.
            NoGradientError: the target does not depend on the layer.

        Example:
            >>> with tf.GradientTape() as tape:
            ...     tape.watch(x)
            ...     heat = cam.compute(x, target=3).heatmaps
        """
        result, spec = self._run(images, target)
        return self._explanation(result, spec)

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
        result = self._function(inputs, spec)(inputs, classes)
        return result, spec

    def _explanation(self, result: dict, spec: TargetSpec) -> Explanation:
        """The `Explanation` of one `_run` result; warns once about all-zero maps."""
        classes = None if spec.kind == "callable" else result["classes"]
        if (
            tf.executing_eagerly()
            and not self._warned_degenerate
            and result["degenerate"].numpy().any()  # a host read, no eager op
        ):
            self._warned_degenerate = True
            count = int(np.count_nonzero(result["degenerate"].numpy()))
            warnings.warn(
                f"{count} Grad-CAM map(s) at layer {self.layer!r} are all zero: no region "
                "has a positive influence on the target (see `Explanation.degenerate`). "
                "Try an earlier layer, another class, or `counterfactual=True`. "
                "This warning is shown once.",
                RuntimeWarning,
                stacklevel=4,
            )
        return Explanation(
            heatmaps=result["heatmaps"],
            maps=result["maps"],
            raw_maps=result["raw_maps"],
            weights=result["weights"],
            scores=result["scores"],
            classes=classes,
            degenerate=result["degenerate"],
            layer=self.layer,
        )

    def __call__(self, images: Any, target: Target = None) -> Explanation:
        """Explain a batch of images.

        Args:
            images: `(batch, height, width, channels)` array (a single
                `(height, width, channels)` image is treated as a batch of one);
                a list/dict of arrays for multi-input models.
            target: `None` (predicted class), an int, one int per image,
                `TopK(k)`, or a callable `outputs -> (batch,)` score.

        Returns:
            An `Explanation` of NumPy arrays.

        Raises:
            InputError: wrong rank, shape, channels or non-finite values.
            TargetError: class out of range or unsupported target.
            NoGradientError: the target does not depend on the layer.

        Example:
            >>> cam(images, target=TopK(5)).heatmaps.shape  # (batch, 5, H, W)
        """
        return self.compute(images, target).numpy()


def _step(cam: GradCAM, spec: TargetSpec, inputs: Any, classes: tf.Tensor) -> dict:
    result = cam._explain_batch(inputs, classes, spec)
    if spec.kind != "top_k":  # drop the k axis in the graph: no eager slicing per call
        result = tf.nest.map_structure(lambda value: value[:, 0], result)
    return result


def _signature_key(signature: Any) -> tuple:
    return tuple((tuple(s.shape.as_list()), s.dtype.name) for s in keras.tree.flatten(signature))


def _prepare_leaf(
    value: Any, spec: Any, *, channels_axis: int = -1, vocabulary: int | None = None
) -> tf.Tensor:
    """Check one input array against its `keras.Input` and convert it.

    `channels_axis` is 1 for a channels-first image input, else -1;
    `vocabulary` the size of the `Embedding` reading this input, if any.
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
    channels = expected[channels_axis] if len(expected) == 4 else None
    if channels is not None and array.shape[channels_axis] != channels:
        first = channels_axis == 1
        raise InputError(
            f"The model expects {channels} channels on axis {channels_axis % 4} "
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
    _check_integer_cast(array, spec)
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


def _check_integer_cast(array: np.ndarray, spec: Any) -> None:
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


# explain()'s recently used explainers. A bounded LRU keyed by id(model), not a
# WeakKeyDictionary: the cached GradCAM holds its model, which would keep a weak
# key alive forever. At most _CACHE_SIZE models stay referenced.
_CACHE: OrderedDict[tuple, GradCAM] = OrderedDict()
_CACHE_SIZE = 8


def _structure(model: keras.Model) -> tuple:
    """What a cached explainer depends on: the model's layers and variables, by identity.

    `Sequential.pop()` / `add()`, or a layer rebuilt with new variables, change it,
    so `explain` never serves a gradient graph of an earlier model.
    """
    return (
        tuple(id(layer) for layer in model.layers),
        tuple(id(variable) for variable in model.weights),
    )


def explain(
    model: keras.Model,
    images: Any,
    target: Target = None,
    layer: str | keras.layers.Layer | None = None,
    **options: Any,
) -> Explanation:
    """Grad-CAM in one call: `GradCAM(model, layer, **options)(images, target)`.

    The `GradCAM` object is cached per model, layer and options, so repeated
    calls do not rebuild or retrace.

    Args:
        model: a Functional or Sequential `keras.Model`.
        images: `(batch, height, width, channels)` array, or a list/dict for
            multi-input models.
        target: `None`, an int, one int per image, `TopK(k)`, or a callable.
        layer: name, path, `Layer` or `None` (automatic).
        **options: keyword options of `GradCAM`.

    Returns:
        An `Explanation` of NumPy arrays.

    Raises:
        The errors of `GradCAM` and `GradCAM.__call__`.

    Example:
        >>> result = tf_gradcam.explain(model, images, target=3)
        >>> result.heatmaps.shape
        (8, 224, 224)
    """
    layer_key = id(layer) if isinstance(layer, keras.Operation) else layer
    try:
        key = (
            id(model),
            _structure(model),
            layer_key,
            tuple(sorted(options.items(), key=lambda kv: kv[0])),
        )
        hash(key)
    except TypeError:  # unhashable option values: no caching
        key = None
    cam = _CACHE.get(key) if key is not None else None
    if cam is None or cam.model is not model:
        cam = GradCAM(model, layer, **options)
    if key is not None:
        _CACHE[key] = cam
        _CACHE.move_to_end(key)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return cam(images, target)
