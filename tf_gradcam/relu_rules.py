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
import functools
import inspect
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import keras
import tensorflow as tf

from tf_gradcam.errors import UnsupportedActivationError
from tf_gradcam.keras_adapter import is_expandable, is_operation, operation_relu_parameters
from tf_gradcam.submodel import call_with_activation

__all__ = [
    "DeconvReLU",
    "GuidedReLU",
    "ReluOverride",
    "deconv_relu",
    "guided_relu",
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
        undefined = []
        layers = _nested_layers(model) if is_expandable(model) else iter(())
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
        """Names of the layers whose ReLU the gradient graph replaced (once each)."""
        return tuple(self._replaced.values())

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
