"""Every use of Keras internals in one place.

The engine re-runs a user's graph, recognises bare Keras operations by their
class names, reads the parameters Keras stores on them, and runs shallow twins
of layers. None of that is public Keras API, so it lives here, and
`check_internals()` (run by `tests/test_keras_adapter.py`) tests each
assumption against the installed Keras: after a Keras upgrade, that test says
which assumption broke and names the version, and this file is the only one to
read.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import keras

__all__ = [
    "RELU_OPERATIONS",
    "SQUASHING_OPERATIONS",
    "UNDEFINED_OPERATIONS",
    "call_owner",
    "check_internals",
    "first_layer_input_shape",
    "input_rank",
    "is_expandable",
    "is_functional",
    "is_operation",
    "operation_relu_parameters",
    "run_functional_graph",
    "twin",
]

#: Bare operations (class names) that are a softmax or sigmoid head.
SQUASHING_OPERATIONS = ("Softmax", "Sigmoid")
#: Bare ReLU operations with fixed parameters (`keras.ops.relu`, `keras.ops.relu6`).
RELU_OPERATIONS: dict[str, dict[str, float]] = {"Relu": {}, "Relu6": {"max_value": 6.0}}
#: Bare rectifier-like operations guided backprop does not define.
UNDEFINED_OPERATIONS = frozenset(
    {"Celu", "Elu", "Gelu", "Glu", "HardSilu", "Selu", "Silu", "Softplus", "Squareplus"}
)


def is_functional(layer: Any) -> bool:
    """Whether the layer is a functional model (`keras.Model(inputs, outputs)` or a subclass).

    Keras exposes no public `Functional` class: the check reads the class names
    of the model's type.
    """
    return isinstance(layer, keras.Model) and any(
        cls.__name__ == "Functional" for cls in type(layer).__mro__
    )


def is_expandable(layer: Any) -> bool:
    """Whether the layer is a model whose inner graph can be re-run (Sequential or functional)."""
    return isinstance(layer, keras.Sequential) or is_functional(layer)


def is_operation(node: Any) -> bool:
    """Whether a graph node is a bare Keras operation, not a layer.

    Functional models hold such nodes where operations were applied to symbolic
    tensors: `x + 3.0`, `keras.ops.relu(x)`, `keras.activations.relu(x)`
    (MobileNetV3's hard swish, ConvNeXt's residual additions).
    """
    return isinstance(node, keras.Operation) and not isinstance(node, keras.layers.Layer)


def operation_relu_parameters(operation: Any) -> tuple[str, dict[str, Any] | None]:
    """Classify a bare operation as a ReLU (with its parameters), undefined, or neither.

    Returns:
        `("relu", parameters)`, `("undefined", {"activation": name})` or `("none", None)`.
    """
    name = type(operation).__name__
    if name in RELU_OPERATIONS:
        return "relu", dict(RELU_OPERATIONS[name])
    if name == "LeakyRelu":
        return "relu", {"negative_slope": operation.negative_slope}
    if name == "ReLU" and hasattr(operation, "max_value"):  # keras.activations.relu(x, ...)
        return "relu", {
            "negative_slope": operation.negative_slope,
            "max_value": operation.max_value,
            "threshold": operation.threshold,
        }
    if name in UNDEFINED_OPERATIONS:
        return "undefined", {"activation": f"keras.ops.{name.lower()}"}
    return "none", None


def run_functional_graph(model: keras.Model, inputs: Any, call_fn: Callable[..., Any]) -> Any:
    """Run a functional model's graph on `inputs`, calling `call_fn(node, *args, **kwargs)`.

    `_run_through_graph` is what `Functional.call` itself runs; unlike
    `keras.models.clone_model` it also accepts tensors of an enclosing graph,
    which nested models need.

    Raises:
        RuntimeError: this Keras version has no such method (see `check_internals`).
    """
    run_graph = getattr(model, "_run_through_graph", None)
    if run_graph is None:  # pragma: no cover - guards a future Keras change
        raise RuntimeError(
            f"Keras {keras.__version__} does not expose the graph of functional model "
            f"{model.name!r} (Functional._run_through_graph); tf_gradcam supports Keras >= 3.14."
        )
    return run_graph(inputs, operation_fn=lambda node: node, call_fn=call_fn)


def twin(layer: keras.layers.Layer, **replaced: Any) -> keras.layers.Layer:
    """A shallow copy of `layer` with some attributes replaced; the layer is not touched.

    The copy shares every attribute value (variables, configuration, dtype
    policy), so it computes what the layer computes except for the replaced
    attributes. `copy.copy` is not used: Keras layers pickle themselves
    through the saving format in `__reduce__`. `Layer.__setattr__` is
    bypassed so attribute tracking never records the replacement.
    """
    copy = object.__new__(type(layer))
    copy.__dict__.update(layer.__dict__)
    for name, value in replaced.items():
        object.__setattr__(copy, name, value)
    return copy


def call_owner(layer: Any) -> type:
    """The class whose `__dict__` defines the `__call__` a layer's calls go through.

    The first class of the layer's MRO that defines it: Keras' base `Layer`
    for every built-in layer (`tf_gradcam.capture` wraps it for a while).
    """
    return next(cls for cls in type(layer).__mro__ if "__call__" in cls.__dict__)


def first_layer_input_shape(model: keras.Model) -> tuple | None:
    """The input shape a Sequential model without `keras.Input` was built for, if it was called."""
    first = model.layers[0] if model.layers else None
    try:
        return tuple(first.input.shape)
    except (AttributeError, ValueError):
        return None


def input_rank(layer: Any) -> int | None:
    """The rank a layer's input spec asks for (`ndim`, else `min_ndim`), if it states one."""
    spec = getattr(layer, "input_spec", None)
    spec = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return getattr(spec, "ndim", None) or getattr(spec, "min_ndim", None)


def check_internals() -> list[str]:
    """Test every assumption this module makes about Keras; return the broken ones.

    Returns:
        One message per broken assumption, naming the Keras version; empty when
        all hold.
    """
    problems: list[str] = []
    try:
        _probe(problems)
    except Exception as error:  # a probe that cannot even run is a broken assumption too
        problems.append(f"Keras {keras.__version__}: {type(error).__name__}: {error}")
    return problems


def _probe(problems: list[str]) -> None:
    def expect(condition: bool, what: str) -> None:
        if not condition:
            problems.append(f"Keras {keras.__version__}: {what}")

    x = keras.Input((4, 4, 3))
    model = keras.Model(x, keras.layers.Dense(2)(x))
    expect(is_functional(model), "keras.Model(inputs, outputs) has no class named 'Functional'")
    run_graph = getattr(model, "_run_through_graph", None)
    expect(run_graph is not None, "Functional._run_through_graph is gone")
    if run_graph is not None:
        parameters = inspect.signature(run_graph).parameters
        expect(
            {"operation_fn", "call_fn"} <= set(parameters),
            "Functional._run_through_graph no longer takes operation_fn and call_fn",
        )

    def node_of(tensor: Any) -> Any:
        return keras.Model(x, tensor).operations[-1]

    for name, make in (
        ("Relu", keras.ops.relu),
        ("Relu6", keras.ops.relu6),
        ("Softmax", keras.ops.softmax),
        ("Sigmoid", keras.ops.sigmoid),
        ("Silu", keras.ops.silu),
        ("Gelu", keras.ops.gelu),
    ):
        node = node_of(make(x))
        expect(is_operation(node), f"keras.ops.{name.lower()}(x) is not a bare operation")
        expect(type(node).__name__ == name, f"keras.ops.{name.lower()}(x) is not named {name!r}")
    leaky = node_of(keras.ops.leaky_relu(x, negative_slope=0.3))
    expect(
        type(leaky).__name__ == "LeakyRelu" and getattr(leaky, "negative_slope", None) == 0.3,
        "keras.ops.leaky_relu is not a 'LeakyRelu' operation holding negative_slope",
    )
    relu = node_of(keras.activations.relu(x, max_value=4.0, threshold=0.5))
    expect(
        type(relu).__name__ == "ReLU"
        and (relu.max_value, relu.threshold, relu.negative_slope) == (4.0, 0.5, 0.0),
        "keras.activations.relu(x, ...) is not a 'ReLU' operation holding its parameters",
    )
    dense = keras.layers.Dense(2, activation="softmax")
    dense.build((None, 3))
    copy = twin(dense, activation=keras.activations.linear)
    value = keras.ops.ones((1, 3))
    linear = keras.ops.convert_to_numpy(keras.ops.matmul(value, dense.kernel) + dense.bias)
    expect(
        dense.activation is keras.activations.softmax
        and bool((abs(keras.ops.convert_to_numpy(copy(value)) - linear) < 1e-6).all()),
        "a shallow twin of a layer does not compute with its own activation",
    )
    conv = keras.layers.Conv2D(2, 3)
    expect(
        call_owner(conv) is keras.layers.Layer and call_owner(keras.Model()) is keras.layers.Layer,
        "Conv2D's and Model's calls do not go through keras.layers.Layer.__call__",
    )
    sequential = keras.Sequential([conv])
    expect(input_rank(sequential.layers[0]) == 4, "Conv2D's input spec does not state rank 4")
    sequential(keras.ops.ones((1, 5, 5, 3)))
    expect(
        first_layer_input_shape(sequential) == (1, 5, 5, 3),
        "a Sequential built by a call does not expose its first layer's input",
    )


_LEGACY_MODULES = ("tf_keras", "keras.src.engine", "tensorflow.python.keras")


def legacy_keras_package(obj: Any) -> Any:
    """The tf.keras 2 package an object's class (or a base class) comes from, else `None`."""
    for cls in type(obj).__mro__:
        module = cls.__module__
        if module.startswith("tensorflow.python.keras"):
            return importlib.import_module("tensorflow.python.keras")
        if module.startswith(_LEGACY_MODULES):
            return importlib.import_module(module.split(".")[0])
    return None


def is_legacy_keras(obj: Any) -> bool:
    """Whether `obj` comes from tf.keras 2: the `tf_keras` package, or Keras 2 inside TensorFlow."""
    # the class itself, or a base class (a user's subclass of tf_keras.Model)
    return any(cls.__module__.startswith(_LEGACY_MODULES) for cls in type(obj).__mro__)


def _overridden(callback: Any, *hooks: str) -> bool:
    # Keras marks its own do-nothing hooks with `_is_default` (as tf.keras 2 does).
    return any(not getattr(getattr(callback, hook), "_is_default", False) for hook in hooks)


class LegacyCallbackHooks:
    """What tf.keras 2's `fit` asks of a callback beyond Keras 3's `Callback` interface.

    tf.keras' `CallbackList` asks each callback whether it implements batch
    hooks (a private protocol) before training starts; a Keras 3 callback
    lacks those methods, so `tf_keras.Model.fit(callbacks=[...])` fails with
    an `AttributeError`. Mixed into `GradCAMCallback`, this answers them the
    way tf.keras' own base class does, so one callback serves both.
    """

    def _implements_train_batch_hooks(self) -> bool:
        return _overridden(
            self, "on_batch_begin", "on_batch_end", "on_train_batch_begin", "on_train_batch_end"
        )

    def _implements_test_batch_hooks(self) -> bool:
        return _overridden(self, "on_test_batch_begin", "on_test_batch_end")

    def _implements_predict_batch_hooks(self) -> bool:
        return _overridden(self, "on_predict_batch_begin", "on_predict_batch_end")
