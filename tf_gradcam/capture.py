"""Grad-CAM for subclassed models: capture a layer's output during the model's own call.

A subclassed `keras.Model` hides its graph in Python code (`call`), so it
cannot be re-run layer by layer as `tf_gradcam.submodel` does for functional
and Sequential models. Instead the model is run as it is, and the chosen
layer's output is *captured* on the way:

- `capturing(layer)` installs, for as long as any capture is open in the
  process (refcounted under a lock), a thin wrapper on the `__call__` of the
  class that defines it for the layer (Keras' base `Layer` class). The wrapper
  calls the original and then looks the called layer up in a
  `contextvars.ContextVar`: only calls made in the context that opened the
  capture are recorded. Other threads have their own contexts: they run
  through the wrapper, which changes nothing for them. The original function
  object is put back when the last capture ends, in a `finally`, also when
  the forward pass raises.
- Nothing is ever set on the user's model or layers.
- When the capture has a `tf.GradientTape` (`watching(tape)` around the
  forward pass), the captured output is watched *as it is produced*, so that
  gradients reach it even when nothing upstream of it is a variable.

`SubclassedGradientModel` runs the model under a capture and offers the
interface the engine uses (`inputs`, `__call__ -> (activations, outputs)`,
...). With `logits=True`, an output produced by a softmax/sigmoid op is
replaced by that op's input in the traced graph (`pre_activation`), so the
scores are the paper's pre-softmax y^c although `call` is not changed (a
softmax written out by hand, `exp(x) / sum(exp(x))`, is not recognised). With a
ReLU override (`GuidedBackprop`, `GuidedGradCAM`, `relu_gradients=`), the
forward pass runs inside `relu_rules.relu_functions_replaced`.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any

import keras
import tensorflow as tf

from tf_gradcam.errors import (
    InputError,
    LayerNotFoundError,
    NotSpatialError,
    UnsupportedModelError,
)
from tf_gradcam.image import spatial_size
from tf_gradcam.keras_adapter import call_owner, is_functional, is_legacy_keras
from tf_gradcam.tokens import CustomLayout, token_layout

__all__ = [
    "Capture",
    "SubclassedGradientModel",
    "build_subclassed_gradient_model",
    "capturing",
    "layer_candidates",
    "resolve_layer",
    "watching",
]


class Capture:
    """What one `capturing` block recorded: `value` (the layer's output) and `calls`."""

    def __init__(self, layer: keras.Operation, tape: tf.GradientTape | None = None) -> None:
        self.layer = layer
        self.tape = tape
        self.value: Any = None
        self.calls = 0


#: id(layer) → Capture, for the captures open in the *current* context only.
_CAPTURES: contextvars.ContextVar[dict[int, Capture] | None] = contextvars.ContextVar(
    "tf_gradcam_captures", default=None
)
#: The tape `GradCAM.gradients` records the forward pass on (see `watching`).
_TAPE: contextvars.ContextVar[tf.GradientTape | None] = contextvars.ContextVar(
    "tf_gradcam_tape", default=None
)

_LOCK = threading.Lock()
#: class whose `__dict__` holds the patched `__call__` → [original function, open captures].
_INSTALLED: dict[type, list[Any]] = {}


def _make_wrapper(original: Any) -> Any:
    @tf.autograph.experimental.do_not_convert
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        outputs = original(self, *args, **kwargs)
        captures = _CAPTURES.get()
        if captures:
            capture = captures.get(id(self))
            if capture is not None and capture.layer is self:
                _record(capture, outputs)
        return outputs

    __call__.__wrapped__ = original  # type: ignore[attr-defined]
    __call__.__doc__ = getattr(original, "__doc__", None)
    return __call__


def _record(capture: Capture, outputs: Any) -> None:
    capture.calls += 1
    if capture.calls > 1:
        raise LayerNotFoundError(
            f"Layer {capture.layer.name!r} is called {capture.calls} times in one forward "
            "pass of the model (a shared layer), so its activations are ambiguous. Choose "
            "a layer that is called once."
        )
    capture.value = outputs
    if capture.tape is not None:
        for tensor in keras.tree.flatten(outputs):
            capture.tape.watch(tensor)


def _install(owner: type) -> None:
    with _LOCK:
        entry = _INSTALLED.get(owner)
        if entry is None:
            original = owner.__dict__["__call__"]
            owner.__call__ = _make_wrapper(original)
            _INSTALLED[owner] = [original, 1]
        else:
            entry[1] += 1


def _uninstall(owner: type) -> None:
    with _LOCK:
        entry = _INSTALLED[owner]
        entry[1] -= 1
        if entry[1] == 0:
            owner.__call__ = entry[0]
            del _INSTALLED[owner]


@contextlib.contextmanager
def capturing(layer: keras.Operation, *, tape: tf.GradientTape | None = None) -> Iterator[Capture]:
    """Record `layer`'s output while the block runs, in this context only.

    Args:
        layer: the layer whose output to record.
        tape: a tape to watch the output on, as it is produced.

    Yields:
        A `Capture`; its `value` is the layer's output once the forward pass ran
        (`None` if the layer was not called).

    Raises:
        LayerNotFoundError: the layer is called more than once in the block.

    Example:
        >>> with capturing(model.blocks[1]) as capture:
        ...     model(x)
        >>> capture.value.shape
    """
    owner = call_owner(layer)
    capture = Capture(layer, tape)
    _install(owner)
    try:
        captures = dict(_CAPTURES.get() or {})
        captures[id(layer)] = capture
        token = _CAPTURES.set(captures)
        try:
            yield capture
        finally:
            _CAPTURES.reset(token)
    finally:
        _uninstall(owner)


def watch(tensor: tf.Tensor) -> None:
    """Watch `tensor` on the tape opened by `watching`, if any (for forward passes that
    compute the explained layer's output themselves)."""
    tape = _TAPE.get()
    if tape is not None:
        tape.watch(tensor)


@contextlib.contextmanager
def watching(tape: tf.GradientTape) -> Iterator[tf.GradientTape]:
    """Make captures opened inside the block watch their output on `tape`."""
    token = _TAPE.set(tape)
    try:
        yield tape
    finally:
        _TAPE.reset(token)


# ------------------------------------------------------------------ layer paths


def _children(node: Any) -> list[tuple[str, Any]]:
    """(segment, value) of the layers and containers of layers a node holds."""
    if isinstance(node, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(node)]
    if isinstance(node, dict):
        return [(str(k), v) for k, v in node.items()]
    if isinstance(node, keras.Operation):
        found = [
            (name, value)
            for name, value in vars(node).items()
            if not name.startswith("_") and isinstance(value, (keras.Operation, list, tuple, dict))
        ]
        seen = {id(v) for _, v in found}
        for sub in getattr(node, "layers", None) or []:  # Model.layers, Sequential
            if id(sub) not in seen:
                found.append((sub.name, sub))
        return found
    return []


def layer_candidates(model: keras.Model) -> list[tuple[str, keras.Operation]]:
    """Every layer reachable from the model's attributes, with its path, depth first."""
    result: list[tuple[str, keras.Operation]] = []
    seen: set[int] = {id(model)}

    def walk(node: Any, prefix: str) -> None:
        for segment, value in _children(node):
            if id(value) in seen:
                continue
            seen.add(id(value))
            path = f"{prefix}{segment}"
            if isinstance(value, keras.Operation):
                result.append((path, value))
            walk(value, f"{path}/")

    walk(model, "")
    return result


def _spatial_looking(layer: Any) -> bool:
    return any(
        word in type(layer).__name__
        for word in ("Conv", "Pool", "BatchNormalization", "Activation", "ReLU", "Add")
    ) and not type(layer).__name__.startswith("Global")


def _candidates_hint(model: keras.Model) -> str:
    candidates = layer_candidates(model)
    spatial = [p for p, layer in candidates if _spatial_looking(layer)][-8:]
    listed = spatial or [p for p, _ in candidates][-8:]
    return f"Layers of subclassed model {model.name!r} (paths of attributes), last ones: {listed}."


def resolve_layer(model: keras.Model, layer: Any) -> tuple[str, keras.Operation]:
    """The `(path, layer)` a subclassed model's `layer` argument stands for.

    A `Layer` must be reachable from the model's attributes; a path such as
    `"encoder/blocks/3/conv"` walks attributes, list/tuple indices, dict keys
    and, failing those, sublayer names.

    Raises:
        LayerNotFoundError: `None`, an unknown path or a foreign layer; the message
            lists candidate paths.
    """
    if layer is None:
        raise LayerNotFoundError(
            f"Model {model.name!r} is a subclassed keras.Model: its call() hides its graph, "
            "so the layer to explain cannot be chosen automatically. Pass `layer=` (a path "
            f"of attributes such as 'blocks/1', or the Layer object). {_candidates_hint(model)}"
        )
    if is_legacy_keras(layer):
        raise _mixed(model, layer)
    if isinstance(layer, keras.Operation):
        for path, candidate in layer_candidates(model):
            if candidate is layer:
                return path, layer
        raise LayerNotFoundError(
            f"Layer {layer.name!r} is not part of model {model.name!r}. Received: "
            f"layer={layer!r}. {_candidates_hint(model)}"
        )
    if not isinstance(layer, str):
        raise LayerNotFoundError(
            f"`layer` must be a path 'blocks/1', a keras Layer or None. "
            f"Received: layer={layer!r} of type {type(layer).__name__}."
        )
    node: Any = model
    for segment in layer.strip("/").split("/"):
        node = _step(node, segment)
        if node is None:
            raise LayerNotFoundError(
                f"No layer {layer!r} in subclassed model {model.name!r} (no {segment!r} "
                f"there). {_candidates_hint(model)}"
            )
    if is_legacy_keras(node):
        raise _mixed(model, node)
    if not isinstance(node, keras.Operation):
        raise LayerNotFoundError(
            f"{layer!r} in model {model.name!r} is a {type(node).__name__}, not a layer. "
            f"{_candidates_hint(model)}"
        )
    return layer.strip("/"), node


def _mixed(model: keras.Model, layer: Any) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"Model {model.name!r} is a Keras 3 model holding the tf.keras 2 layer "
        f"{getattr(layer, 'name', layer)!r} ({type(layer).__module__}.{type(layer).__name__}): "
        "tf.keras and Keras 3 layers cannot be mixed in one explained model. Build the "
        "layer with Keras 3 (`import keras`), or explain the tf.keras model on its own."
    )


def _step(node: Any, segment: str) -> Any:
    """One segment of a path: an index, a dict key, an attribute, else a sublayer's name."""
    if isinstance(node, (list, tuple)):
        if segment.lstrip("-").isdigit() and -len(node) <= int(segment) < len(node):
            return node[int(segment)]
    elif isinstance(node, dict):
        if segment in node:
            return node[segment]
    elif isinstance(node, keras.Operation):
        if not segment.startswith("_") and segment in vars(node):
            return vars(node)[segment]
    named = [
        v
        for _, v in _children(node)
        if isinstance(v, keras.Operation) and getattr(v, "name", None) == segment
    ]
    return named[0] if len(named) == 1 else None


# ------------------------------------------------------------- gradient model


def _squashing_op(tensor: Any) -> Any:
    """The `Softmax`/`Sigmoid` graph op producing `tensor` (through identities), or `None`."""
    try:
        op = tensor.op
    except AttributeError:  # an eager tensor, a Python number
        return None
    while op.type == "Identity" and op.inputs:
        op = op.inputs[0].op
    return op if op.type in ("Softmax", "Sigmoid") else None


def pre_activation(tensor: Any) -> Any:
    """The scores a traced output's final softmax/sigmoid was applied to, else the output.

    A model run as it is (subclassed, tf.keras) keeps its softmax; in a traced
    forward pass the softmax is a graph op whose input is the logits tensor,
    recorded on the same tape, so the paper's pre-softmax y^c is still there.
    """
    op = _squashing_op(tensor)
    return tensor if op is None else op.inputs[0]


class SubclassedGradientModel:
    """The gradient model of a subclassed `keras.Model`: runs it, captures the layer.

    Same interface as `tf_gradcam.submodel.GradientModel`, except that
    `keras_model` is `None` (there is no functional graph: methods that need
    one refuse subclassed models); `layer` is `None` for input gradients only.

    Attributes:
        model: the user's model (only called, never modified).
        layer: the explained layer object; `layer_path` its path.
        inputs: a `keras.Input` shaped like the first batch, free batch axis.
        activation_spec: a `keras.KerasTensor` of the layer's output.
    """

    keras_model = None

    def __init__(
        self,
        model: keras.Model,
        layer: keras.Operation | None,
        *,
        layer_path: str | None,
        sample_shape: tuple[int | None, ...],
        dtype: str,
        logits: bool = True,
        call_override: Any = None,
        reshape: Any = None,
    ) -> None:
        self.model = model
        self.layer = layer
        self.layout: Any = None
        self.layer_path = layer_path
        self.logits = logits
        self.call_override = call_override
        self.vocabularies: dict[int, int] = {}
        self._input = keras.Input(shape=tuple(sample_shape[1:]), dtype=dtype)
        spec = tf.TensorSpec((None, *sample_shape[1:]), dtype)
        found: dict[str, Any] = {}

        def trace(x: tf.Tensor) -> Any:
            activations, outputs = self(x)
            found["activations"] = activations
            found["outputs"] = outputs
            return outputs

        tf.function(trace, autograph=False).get_concrete_function(spec)
        activation = found["activations"]
        as_spec = lambda t: keras.KerasTensor(tuple(t.shape), dtype=t.dtype.name)  # noqa: E731
        self.output_structure = keras.tree.map_structure(as_spec, found["outputs"])
        input_rank = len(sample_shape)
        self.image_channels_first = self._data_format() == "channels_first"
        if layer is None:  # input gradients only (guided backpropagation)
            self.activation_spec = None
            self.channels_first = False
            self.image_index = 0 if input_rank in (3, 4, 5) else None
            return
        rank = len(activation.shape) if hasattr(activation, "shape") else None
        if reshape is not None:
            self.layout = CustomLayout(reshape)
        elif rank == 3 and input_rank == 4:  # tokens computed from an image
            shape = tuple(sample_shape)
            size = shape[2:4] if self.image_channels_first else shape[1:3]
            self.layout = token_layout(
                activation.shape[1],
                size,
                layers=[candidate for _, candidate in layer_candidates(model)],
                where=f"Layer {layer_path!r} (output shape {tuple(activation.shape)})",
            )
        if self.layout is not None:
            self.activation_spec = as_spec(activation)
            self.channels_first = False
            self.image_index = 0 if input_rank == 4 else None
            return
        if rank != 4 and not (rank in (3, 5) and rank == input_rank):
            shape = getattr(activation, "shape", "several tensors")
            raise NotSpatialError(
                f"Layer {layer_path!r} has output shape {shape}; Grad-CAM needs a "
                "convolutional feature map: 4-D (batch, height, width, channels), or 3-D / "
                "5-D in a network on signals / volumes of that rank. Choose a convolutional "
                f"layer. {self._hint()}"
            )
        self.activation_spec = as_spec(activation)
        self.channels_first = getattr(layer, "data_format", None) == "channels_first"
        self.image_index = (
            0 if input_rank == 4 or (input_rank in (3, 5) and input_rank == rank) else None
        )

    @property
    def inputs(self) -> Any:
        return self._input

    def __call__(self, inputs: Any) -> tuple[Any, Any]:
        """One forward pass: `(the layer's activations or None, the scored outputs)`."""
        with contextlib.ExitStack() as stack:
            if self.call_override is not None:
                stack.enter_context(self.call_override.replacing_functions())
            activations, outputs = self._forward(inputs)
        if self.logits:
            outputs = keras.tree.map_structure(pre_activation, outputs)
        return activations, outputs

    def _forward(self, inputs: Any) -> tuple[Any, Any]:
        """The model's own call, the layer's output captured on the way."""
        if self.layer is None:
            return None, self.model(inputs, training=False)
        with capturing(self.layer, tape=_TAPE.get()) as capture:
            outputs = self.model(inputs, training=False)
        if capture.calls == 0:
            raise LayerNotFoundError(
                f"Layer {self.layer_path!r} is not called when model {self.model.name!r} runs "
                "on these inputs (a branch of its call() not taken, e.g. one for training "
                "only), so it has no activations to explain. Choose a layer the forward "
                "pass goes through."
            )
        return capture.value, outputs

    def _data_format(self) -> str:
        """The model's image data format: its first layer that states one, else Keras'."""
        return next(
            (
                getattr(candidate, "data_format", None)
                for _, candidate in layer_candidates(self.model)
                if getattr(candidate, "data_format", None) in ("channels_first", "channels_last")
            ),
            keras.config.image_data_format(),
        )

    def _hint(self) -> str:
        return _candidates_hint(self.model)

    def image(self, inputs: Any) -> Any:
        """The image input (as `submodel.image_of`, which this module cannot import)."""
        if self.image_index is None:
            raise InputError(
                "The subclassed model's input is not a 4-D (batch, height, width, channels) "
                "image (nor, for 1-D and 3-D feature maps, a signal or a volume of their "
                "rank); Grad-CAM heatmaps are sized after that input."
            )
        return keras.tree.flatten(inputs)[self.image_index]

    def image_size(self, inputs: Any) -> Any:
        """The image's spatial size as an int32 tensor (`image.spatial_size`)."""
        return spatial_size(self.image(inputs), self.image_channels_first)


def build_subclassed_gradient_model(
    model: keras.Model,
    layer: Any,
    *,
    logits: bool = True,
    expose_layer: bool = True,
    call_override: Any = None,
    sample_shape: tuple[int | None, ...] | None = None,
    reshape: Any = None,
    model_class: Callable[..., SubclassedGradientModel] | None = None,
) -> SubclassedGradientModel:
    """`build_gradient_model` for subclassed models (see `SubclassedGradientModel`).

    `model_class` builds the result instead of `SubclassedGradientModel` (with
    its arguments): a subclass with a faster forward pass of the same values
    (`tf_gradcam.class_token`).

    Raises:
        UnsupportedModelError: a `call_override` other than the ReLU rules'
            (`ReluOverride`), several inputs, or no sample batch yet.
        LayerNotFoundError, NotSpatialError: as `resolve_layer` and the trace.
    """
    kind = "subclassed keras.Model" if not is_functional(model) else "model run as it is"
    name = f"Model {model.name!r} is a {kind} ({type(model).__name__})"
    if call_override is not None and not hasattr(call_override, "replacing_functions"):
        raise UnsupportedModelError(
            f"{name}: its call() cannot be re-run with replaced layer calls, so a custom "
            "`call_override` cannot apply to it (the guided and deconvolution ReLU rules "
            "can: relu_gradients=, GuidedBackprop, GuidedGradCAM). Rebuild it as a "
            "functional model to use a custom override."
        )
    path, target = resolve_layer(model, layer) if expose_layer else (None, None)
    if sample_shape is None:
        raise UnsupportedModelError(
            f"{name}; its input shape is known from the first batch of images only."
        )
    if isinstance(sample_shape, (list, dict)) or (
        sample_shape and isinstance(sample_shape[0], (tuple, list))
    ):
        raise UnsupportedModelError(f"{name} with several inputs: not supported yet.")
    dtype = getattr(model, "input_dtype", None) or "float32"
    gradient_model = (model_class or SubclassedGradientModel)(
        model,
        target,
        layer_path=path,
        sample_shape=tuple(sample_shape),
        dtype=dtype,
        logits=logits,
        call_override=call_override,
        reshape=reshape,
    )
    return gradient_model
