"""The guided and deconvolution ReLU rules, and the override that applies them.

A leaf of the package: it needs only the gradient-model rewiring
(`tf_gradcam.submodel`) and the errors, so the engine (`tf_gradcam.gradcam`)
and the pixel methods (`tf_gradcam.guided`) can both import it without an
import cycle.

The backward rules, for `f(x) = keras.activations.relu(x, negative_slope,
max_value, threshold)` and an incoming gradient `g`:

- true gradient: `f'(x) · g`, with `f'` = 1 on `threshold < x < max_value`,
  0 above `max_value`, `negative_slope` below `threshold`.
- guided: `g` where `threshold < x < max_value` and `g > 0`, else 0. For the
  plain ReLU this is Springenberg's rule exactly. A saturated ReLU6 unit
  (`x >= max_value`) passes nothing, as its true gradient does: its output does
  not depend on its input there (Xplique passes the gradient there instead).
  The leaky part (`x <= threshold`) passes nothing: guided backprop keeps only
  units that fire, and a leaky unit below its threshold is "off".
- deconv: `max(g, 0)` everywhere, whatever `x` (Zeiler & Fergus).

Forward outputs are always exactly `keras.activations.relu`'s.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import keras
import tensorflow as tf

from tf_gradcam.capture import layer_candidates
from tf_gradcam.errors import UnsupportedActivationError
from tf_gradcam.keras_adapter import is_expandable, is_operation, operation_relu_parameters
from tf_gradcam.submodel import call_with_activation

__all__ = [
    "DeconvReLU",
    "GuidedReLU",
    "ReluOverride",
    "deconv_relu",
    "guided_relu",
    "relu_functions_replaced",
    "true_relu_gradients",
]

_MODES = ("guided", "deconv")

#: Activation functions (by `__name__`) that are ReLUs, with their parameters.
#: `leaky_relu`'s slope is Keras' (and `tf.nn.leaky_relu`'s) default.
_RELU_ACTIVATIONS: dict[str, dict[str, float]] = {
    "relu": {},
    "relu6": {"max_value": 6.0},
    "leaky_relu": {"negative_slope": 0.2},
}

#: Activations that are not rectifiers: guided backprop never changed them
#: (squashing heads, gates, linear), so they are left alone without a warning.
_NOT_RECTIFIERS = frozenset(
    {
        "linear",
        "softmax",
        "log_softmax",
        "sigmoid",
        "hard_sigmoid",
        "log_sigmoid",
        "tanh",
        "hard_tanh",
        "softsign",
        "exponential",
        "sparsemax",
    }
)

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# While set (per thread), modified ReLUs backpropagate their true gradient.
# Read when a gradient is *taken*, i.e. while the compiled step is traced: this
# lets Guided Grad-CAM take the true gradient for its Grad-CAM part and the
# guided one for its pixel part from one forward pass.
_TRUE_BACKWARD = threading.local()


@contextlib.contextmanager
def true_relu_gradients() -> Iterator[None]:
    """While active (in this thread), modified ReLUs backpropagate their true gradient."""
    previous = getattr(_TRUE_BACKWARD, "active", False)
    _TRUE_BACKWARD.active = True
    try:
        yield
    finally:
        _TRUE_BACKWARD.active = previous


def _check_mode(mode: Any) -> None:
    if mode not in _MODES:
        raise ValueError(
            f"The ReLU backward `mode` (GradCAM's `relu_gradients`) must be one of {_MODES}. "
            f"Received: mode={mode!r}."
        )


# ------------------------------------------------------------ the ReLU rules


@functools.cache
def _modified_relu(
    mode: str, negative_slope: float, max_value: float | None, threshold: float
) -> Callable[[Any], tf.Tensor]:
    """The `tf.custom_gradient` ReLU with one parameter set and one backward rule."""

    def forward(x: tf.Tensor) -> tf.Tensor:
        return keras.activations.relu(
            x, negative_slope=negative_slope, max_value=max_value, threshold=threshold
        )

    # Plain ReLU and ReLU6 (no slope, zero threshold) use TensorFlow's fused
    # gradient kernels: ReluGrad/Relu6Grad pass `gradients` where
    # 0 < features (< 6), so feeding them relu(upstream) is exactly the guided
    # rule in one op. `features` is the ReLU's *output*, as in TensorFlow's own
    # Relu gradient: 0 < relu(x) (< 6) holds on exactly the units where
    # 0 < x (< 6), and keeping only the output alive for the backward pass
    # lets the input be freed after the forward pass (MobileNetV2, batch 8:
    # Guided Grad-CAM 1.22 -> 1.08 x forward + backward, same run).
    fused = None
    if negative_slope == 0.0 and threshold == 0.0 and max_value in (None, 6.0):
        fused = tf.raw_ops.ReluGrad if max_value is None else tf.raw_ops.Relu6Grad

    @tf.custom_gradient
    def relu(x: tf.Tensor) -> tuple[tf.Tensor, Callable]:
        output = forward(x)

        def backward(upstream: tf.Tensor) -> tf.Tensor:
            true_backward = getattr(_TRUE_BACKWARD, "active", False)
            if fused is not None and (true_backward or mode == "guided"):
                gradients = upstream if true_backward else tf.nn.relu(upstream)
                return fused(gradients=gradients, features=output)
            if fused is not None:  # deconv: only the sign of the incoming gradient
                return tf.nn.relu(upstream)
            if true_backward:
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = forward(x)
                return tape.gradient(y, x, output_gradients=upstream)
            passes = upstream > 0
            if mode == "guided":
                passes = tf.logical_and(passes, x > threshold)
                if max_value is not None:
                    passes = tf.logical_and(passes, x < max_value)
            return tf.where(passes, upstream, tf.zeros_like(upstream))

        return output, backward

    return relu


def _rule(
    mode: str, negative_slope: float, max_value: float | None, threshold: float
) -> Callable[[Any], tf.Tensor]:
    return _modified_relu(
        mode,
        float(negative_slope),
        None if max_value is None else float(max_value),
        float(threshold),
    )


def guided_relu(
    x: Any, negative_slope: float = 0.0, max_value: float | None = None, threshold: float = 0.0
) -> tf.Tensor:
    """ReLU whose backward pass is Guided Backpropagation's.

    A drop-in substitute for `keras.activations.relu` (same arguments, same
    forward output, bit for bit). Backward: the incoming gradient `g` passes
    where `threshold < x < max_value` and `g > 0`; everywhere else the gradient
    is zero (see the module docstring for why saturated and leaky units pass
    nothing).

    Args:
        x: input tensor.
        negative_slope: slope below `threshold` in the forward pass (leaky ReLU).
        max_value: saturation value (6 for ReLU6), or `None`.
        threshold: values at or below it are "off".

    Returns:
        `keras.activations.relu(x, negative_slope, max_value, threshold)`.

    Example:
        >>> x = tf.constant([-1.0, 2.0, 3.0])
        >>> with tf.GradientTape() as tape:
        ...     tape.watch(x)
        ...     y = tf_gradcam.guided_relu(x)
        >>> tape.gradient(y, x, output_gradients=tf.constant([5.0, -4.0, 7.0]))
        <tf.Tensor: ..., numpy=array([0., 0., 7.], dtype=float32)>
    """
    return _rule("guided", negative_slope, max_value, threshold)(x)


def deconv_relu(
    x: Any, negative_slope: float = 0.0, max_value: float | None = None, threshold: float = 0.0
) -> tf.Tensor:
    """ReLU whose backward pass is Deconvolution's (Zeiler & Fergus).

    Same forward output as `keras.activations.relu`; backward: `max(g, 0)` for
    an incoming gradient `g`, whatever the forward input.

    Args:
        x: input tensor.
        negative_slope: slope below `threshold` in the forward pass.
        max_value: saturation value (6 for ReLU6), or `None`.
        threshold: the forward pass's threshold.

    Returns:
        `keras.activations.relu(x, negative_slope, max_value, threshold)`.

    Example:
        >>> x = tf.constant([-1.0, 2.0, 3.0])
        >>> with tf.GradientTape() as tape:
        ...     tape.watch(x)
        ...     y = tf_gradcam.deconv_relu(x)
        >>> tape.gradient(y, x, output_gradients=tf.constant([5.0, -4.0, 7.0]))
        <tf.Tensor: ..., numpy=array([5., 0., 7.], dtype=float32)>
    """
    return _rule("deconv", negative_slope, max_value, threshold)(x)


class _ModifiedReLULayer(keras.layers.ReLU):
    """`keras.layers.ReLU` whose backward pass follows `_mode`."""

    _mode = "guided"

    def call(self, inputs: Any) -> tf.Tensor:
        return _rule(self._mode, self.negative_slope, self.max_value, self.threshold)(inputs)


@keras.saving.register_keras_serializable(package="tf_gradcam")
class GuidedReLU(_ModifiedReLULayer):
    """`keras.layers.ReLU` with Guided Backpropagation's backward pass.

    Same arguments, validation and forward output as `keras.layers.ReLU`, so
    it can be swapped into a model you build yourself; `GuidedBackprop` does
    not need it (it replaces ReLUs in its own gradient graph).

    Args:
        max_value: saturation value (6 for ReLU6), or `None`.
        negative_slope: slope below `threshold` (forward pass only).
        threshold: values at or below it are "off".
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`...).

    Example:
        >>> x = keras.Input((8, 8, 3))
        >>> y = tf_gradcam.GuidedReLU(max_value=6.0)(keras.layers.Conv2D(4, 3)(x))
    """

    _mode = "guided"


@keras.saving.register_keras_serializable(package="tf_gradcam")
class DeconvReLU(_ModifiedReLULayer):
    """`keras.layers.ReLU` with Deconvolution's backward pass (positive gradients pass).

    Args:
        max_value: saturation value (6 for ReLU6), or `None`.
        negative_slope: slope below `threshold` (forward pass only).
        threshold: the forward pass's threshold.
        **kwargs: `keras.layers.Layer` arguments.

    Example:
        >>> y = tf_gradcam.DeconvReLU()(keras.layers.Conv2D(4, 3)(keras.Input((8, 8, 3))))
    """

    _mode = "deconv"


# ------------------------------------------------- finding the model's ReLUs


# ------------------------------------- the ReLU functions of models run as they are


#: The rule (mode) the ReLU functions of `tf.nn` take in the current context, and
#: the list recording each call replaced; `None` outside `relu_functions_replaced`.
_FUNCTION_RULE: contextvars.ContextVar[tuple[str, list[str]] | None] = contextvars.ContextVar(
    "tf_gradcam_relu_function_rule", default=None
)
_FUNCTION_LOCK = threading.Lock()
#: (module, name) → original function, and how many `relu_functions_replaced` blocks are open.
_FUNCTION_ORIGINALS: dict[tuple[Any, str], Any] = {}
_FUNCTION_USERS = [0]
#: The modules the functions are looked up on: Keras 3 calls `tf.nn`, tf.keras 2 calls
#: `tf.compat.v2.nn` (another module object holding the same functions).
_FUNCTION_MODULES = (tf.nn, tf.compat.v2.nn, tf.compat.v1.nn)


def _relu_function_parameters(name: str, args: tuple, kwargs: dict) -> tuple[float, float | None]:
    """`(negative_slope, max_value)` of a `tf.nn` ReLU function call."""
    if name == "relu6":
        return 0.0, 6.0
    if name == "leaky_relu":
        return float(args[0] if args else kwargs.get("alpha", 0.2)), None
    return 0.0, None


def _function_wrapper(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(features: Any, *args: Any, **kwargs: Any) -> Any:
        active = _FUNCTION_RULE.get()
        if active is None:
            return original(features, *args, **kwargs)
        mode, calls = active
        negative_slope, max_value = _relu_function_parameters(name, args, kwargs)
        calls.append(f"tf.nn.{name}")
        # the rule's own forward pass calls these functions again: unmodified
        token = _FUNCTION_RULE.set(None)
        try:
            return _rule(mode, negative_slope, max_value, 0.0)(tf.convert_to_tensor(features))
        finally:
            _FUNCTION_RULE.reset(token)

    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapper


@contextlib.contextmanager
def relu_functions_replaced(mode: str) -> Iterator[list[str]]:
    """While active, in this context only, the `tf.nn` ReLU functions take `mode`'s rule.

    Every ReLU of a Keras 3 or tf.keras model ends in `tf.nn.relu`, `relu6` or `leaky_relu`
    (ReLU layers, `activation="relu"`, `keras.ops.relu`,
    `keras.activations.relu`, direct `tf.nn` calls), so a model whose graph
    cannot be rewired (a subclassed model's `call`, a tf.keras model) gets the
    guided/deconv backward pass by running it inside this block. The functions
    are wrapped on the `tf.nn` modules (`tf.nn`, and `tf.compat.v2.nn` /
    `tf.compat.v1.nn`, which tf.keras calls) while any block is open (refcounted under
    a lock) and restored, the original objects, when the last one ends, also
    on errors; a call from any other context (another thread) runs the
    original function unchanged. Composite ReLUs computed from these functions
    (a leaky ReLU with a `max_value` or a `threshold`) are guided part by part,
    which is not exactly the layer-level rule.

    Args:
        mode: `"guided"` or `"deconv"`.

    Yields:
        A list to which each replaced call appends its function's name.

    Example:
        >>> with tf.GradientTape() as tape, relu_functions_replaced("guided"):
        ...     tape.watch(x)
        ...     y = model(x)
        >>> tape.gradient(y, x)  # guided backpropagation
    """
    _check_mode(mode)
    with _FUNCTION_LOCK:
        if _FUNCTION_USERS[0] == 0:
            for module in _FUNCTION_MODULES:
                for name in ("relu", "relu6", "leaky_relu"):
                    original = getattr(module, name)
                    _FUNCTION_ORIGINALS[module, name] = original
                    setattr(module, name, _function_wrapper(name, original))
        _FUNCTION_USERS[0] += 1
    calls: list[str] = []
    token = _FUNCTION_RULE.set((mode, calls))
    try:
        yield calls
    finally:
        _FUNCTION_RULE.reset(token)
        with _FUNCTION_LOCK:
            _FUNCTION_USERS[0] -= 1
            if _FUNCTION_USERS[0] == 0:
                for (module, name), original in _FUNCTION_ORIGINALS.items():
                    setattr(module, name, original)
                _FUNCTION_ORIGINALS.clear()


def _relu_parameters(layer: keras.layers.Layer) -> tuple[str, dict[str, Any] | None]:
    """Classify a layer.

    Returns:
        `("relu", parameters)` for a ReLU, `("undefined", {"activation": name})`
        for an activation without a guided rule, `("none", None)` otherwise.
    """
    if is_operation(layer):
        return operation_relu_parameters(layer)
    if isinstance(layer, keras.layers.ReLU):
        params = {
            "negative_slope": layer.negative_slope,
            "max_value": layer.max_value,
            "threshold": layer.threshold,
        }
        return "relu", params
    if isinstance(layer, keras.layers.LeakyReLU):
        return "relu", {"negative_slope": layer.negative_slope}
    if isinstance(layer, (keras.layers.ELU, keras.layers.PReLU)):
        return "undefined", {"activation": type(layer).__name__}
    if isinstance(layer, keras.Model) and not is_expandable(layer):
        return "undefined", {"activation": "subclassed model, its layers cannot be reached"}
    activation = getattr(layer, "activation", None)
    if activation is None or not callable(activation):
        return "none", None
    name = getattr(activation, "__name__", type(activation).__name__)
    if name in _RELU_ACTIVATIONS:
        return "relu", dict(_RELU_ACTIVATIONS[name])
    if name in _NOT_RECTIFIERS:
        return "none", None
    return "undefined", {"activation": name}


def _nested_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Every layer and bare operation of the model, nested models opened."""
    nodes = model.layers if isinstance(model, keras.Sequential) else model.operations
    for layer in nodes:
        if is_expandable(layer):
            yield from _nested_layers(layer)
        else:
            yield layer


def _user_stacklevel() -> int:
    """`stacklevel` of the first frame outside this package (the user's call)."""
    level, frame = 1, inspect.currentframe().f_back
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        level += 1
        frame = frame.f_back
    return level


class ReluOverride:
    """The engine `call_override` giving every ReLU of a model a modified backward pass.

    Built once per model: it lists the model's activations (nested models
    included) and warns **once**, naming them, about those guided backprop does
    not define (swish/SiLU, GELU, ELU, softplus, PReLU…), which keep their
    true gradient; with `strict=True` it raises instead. Non-rectifying
    activations (linear, sigmoid, softmax, tanh…) are left alone silently.

    Then the engine calls it for every layer of its gradient graph; for a ReLU
    it returns a call that runs the user's layer, with its own weights, with
    `guided_relu`/`deconv_relu` and the layer's `max_value`, `threshold` and
    `negative_slope` instead of its activation. ReLUs hidden inside a layer's
    own `call` (Lambda, custom layers, wrappers such as `TimeDistributed`)
    cannot be seen.

    Args:
        model: the user's model (only read).
        mode: `"guided"` or `"deconv"`.
        strict: raise instead of warning about undefined activations.

    Raises:
        ValueError: an unknown `mode`.
        UnsupportedActivationError: `strict=True` and the model has activations
            without a guided rule.

    Example:
        >>> override = ReluOverride(model, "guided")
        >>> cam = tf_gradcam.GradCAM(model, call_override=override)
        >>> len(override.replaced)      # ReLUs given the guided backward pass
        5
    """

    def __init__(self, model: keras.Model, mode: str = "guided", *, strict: bool = False) -> None:
        _check_mode(mode)
        self.mode = mode
        self._replaced: dict[int, str] = {}
        self._function_calls: tuple[str, ...] = ()
        undefined = []
        if is_expandable(model):
            layers: Any = _nested_layers(model)
        elif isinstance(model, keras.Model):  # subclassed: the layers its attributes hold
            layers = (
                layer for _, layer in layer_candidates(model) if not isinstance(layer, keras.Model)
            )
        else:  # a tf.keras model: its own layers
            layers = getattr(model, "layers", ())
        for layer in layers:
            kind, info = _relu_parameters(layer)
            if kind == "undefined":
                undefined.append(f"{layer.name!r} ({info['activation']})")
        #: `"layer (activation)"` for each activation without a guided rule.
        self.undefined: tuple[str, ...] = tuple(undefined)
        if undefined and strict:
            raise UnsupportedActivationError(
                f"`strict=True` refuses activations that {mode} backpropagation does not "
                f"define. Received: model {model.name!r} with {len(undefined)} such "
                f"activation(s): {', '.join(undefined)}. Expected only ReLU-family "
                "activations (relu, relu6, leaky_relu, ReLU/LeakyReLU layers) or "
                "non-rectifying ones (linear, sigmoid, softmax, tanh); pass strict=False "
                "to keep their true gradient."
            )
        if undefined:
            warnings.warn(
                f"{len(undefined)} activation(s) of model {model.name!r} have no {mode} "
                f"backward rule and keep their true gradient: {', '.join(undefined)}. "
                "The result is only partly guided; pass strict=True to refuse such models.",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )

    @property
    def replaced(self) -> tuple[str, ...]:
        """Names of the layers whose ReLU the gradient graph replaced (once each).

        For a model run as it is (subclassed, tf.keras), one `"tf.nn.relu"`
        (`relu6`, `leaky_relu`) entry per ReLU call of the traced forward pass.
        """
        return tuple(self._replaced.values()) + self._function_calls

    @contextlib.contextmanager
    def replacing_functions(self) -> Iterator[None]:
        """Give the ReLU functions this override's rule while a model runs as it is.

        For models whose graph cannot be rewired layer by layer (subclassed,
        tf.keras): see `relu_functions_replaced`.
        """
        with relu_functions_replaced(self.mode) as calls:
            yield
        if calls:
            self._function_calls = tuple(calls)

    def __call__(self, layer: keras.layers.Layer) -> Callable[..., Any] | None:
        """The call replacing `layer`'s in the gradient graph, or `None` to keep it."""
        kind, params = _relu_parameters(layer)
        if kind != "relu":
            return None
        rule = _rule(
            self.mode,
            params.get("negative_slope", 0.0),
            params.get("max_value"),
            params.get("threshold", 0.0),
        )
        self._replaced[id(layer)] = layer.name
        if isinstance(layer, (keras.layers.ReLU, keras.layers.LeakyReLU)):

            def run(inputs: Any, *args: Any, **kwargs: Any) -> tf.Tensor:
                return rule(keras.ops.cast(inputs, layer.compute_dtype))

            return run
        if is_operation(layer):  # keras.ops.relu(x, ...): its first argument
            return lambda inputs, *args, **kwargs: rule(inputs)
        return call_with_activation(layer, rule)
