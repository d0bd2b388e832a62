"""Grad-CAM for tf.keras 2 models (the `tf_keras` package, `TF_USE_LEGACY_KERAS=1`).

A tf.keras 2 functional or Sequential model is not a Keras 3 model, so the
rewiring of `tf_gradcam.submodel` does not apply. Its graph is open through
tf.keras' own public API instead: `Model(model.inputs, [layer.output,
*model.outputs])`, built with the model's own Keras package, returns the
layer's activations together with the outputs in one forward pass, sharing
the model's layers and weights (the model itself is not changed). The rest is
what `tf_gradcam.capture` does for models run as they are: the scores are
taken before a traced softmax/sigmoid (`capture.pre_activation`), and the
guided / deconvolution ReLU rules replace the `tf.nn` ReLU functions for the
duration of the call (`relu_rules.relu_functions_replaced`), which tf.keras'
ReLUs end in as Keras 3's do.
"""

from __future__ import annotations

from typing import Any

import keras

from tf_gradcam.capture import SubclassedGradientModel
from tf_gradcam.errors import LayerNotFoundError, NotSpatialError, UnsupportedModelError
from tf_gradcam.keras_adapter import is_legacy_keras, legacy_keras_package

__all__ = ["LegacyGradientModel", "build_legacy_gradient_model"]

_POOLING = ("MaxPooling", "AveragePooling")


def _rank(tensor: Any) -> int | None:
    shape = getattr(tensor, "shape", None)
    return None if shape is None else len(shape)


def _is_spatial(layer: Any, input_rank: int) -> bool:
    rank = _rank(getattr(layer, "output", None)) if not isinstance(layer.output, list) else None
    return rank == 4 or (rank in (3, 5) and rank == input_rank)


def _spatial_layers(model: Any, input_rank: int) -> list[Any]:
    return [
        layer
        for layer in model.layers
        if type(layer).__name__ != "InputLayer" and _is_spatial(layer, input_rank)
    ]


def _hint(model: Any, input_rank: int) -> str:
    names = [layer.name for layer in _spatial_layers(model, input_rank)][-6:]
    return f"Feature-map layers of tf.keras model {model.name!r}, last ones: {names}."


def resolve_legacy_layer(model: Any, layer: Any, input_rank: int) -> Any:
    """The tf.keras layer `layer` stands for: a name, a layer object, or `None` (the default).

    `None` is the last top-level layer with a feature-map output (4-D, or 3-D /
    5-D in a network on signals / volumes), trailing max/average pooling
    stepped over (VGG16: `block5_conv3`, not `block5_pool`).

    Raises:
        LayerNotFoundError: unknown name, foreign layer, no feature map at all.
    """
    if layer is None:
        spatial = _spatial_layers(model, input_rank)
        while len(spatial) > 1 and type(spatial[-1]).__name__.startswith(_POOLING):
            spatial.pop()
        if not spatial:
            raise NotSpatialError(
                f"tf.keras model {model.name!r} has no layer with a feature-map output "
                "(4-D (batch, height, width, channels), or 3-D / 5-D in a network on "
                "signals / volumes). Grad-CAM explains a convolutional layer."
            )
        return spatial[-1]
    if isinstance(layer, str):
        names = [candidate.name for candidate in model.layers]
        if layer not in names:
            raise LayerNotFoundError(
                f"No layer {layer!r} in tf.keras model {model.name!r} (its top-level layers "
                f"are searched; a layer inside a nested model is explained through the "
                f"nested model's own output). {_hint(model, input_rank)}"
            )
        return model.get_layer(layer)
    if any(candidate is layer for candidate in model.layers):
        return layer
    raise LayerNotFoundError(
        f"Layer {getattr(layer, 'name', layer)!r} is not a top-level layer of tf.keras model "
        f"{model.name!r}. Received: layer={layer!r}. {_hint(model, input_rank)}"
    )


class LegacyGradientModel(SubclassedGradientModel):
    """The gradient model of a tf.keras 2 functional or Sequential model.

    Same interface as `capture.SubclassedGradientModel` (`keras_model` is
    `None`: methods that need a Keras 3 graph refuse these models); the
    forward pass is `Model(inputs, [layer.output, *outputs])` in the model's
    own Keras package.
    """

    def __init__(
        self,
        model: Any,
        layer: Any,
        *,
        sample_shape: tuple[int | None, ...],
        logits: bool = True,
        call_override: Any = None,
    ) -> None:
        package = legacy_keras_package(model)
        outputs = list(model.outputs)
        exposed = [layer.output] if layer is not None else []
        self._graph = package.Model(model.inputs, exposed + outputs, name=f"{model.name}_gradcam")
        self._single_output = len(outputs) == 1
        dtype = getattr(model.inputs[0], "dtype", None)
        super().__init__(
            model,
            layer,
            layer_path=None if layer is None else layer.name,
            sample_shape=sample_shape,
            dtype=getattr(dtype, "name", dtype) or "float32",
            logits=logits,
            call_override=call_override,
        )

    def _forward(self, inputs: Any) -> tuple[Any, Any]:
        results = self._graph(inputs, training=False)
        results = list(results) if isinstance(results, (list, tuple)) else [results]
        activation = results.pop(0) if self.layer is not None else None
        return activation, results[0] if self._single_output else results

    def _data_format(self) -> str:
        for layer in self.model.layers:
            if getattr(layer, "data_format", None) in ("channels_first", "channels_last"):
                return layer.data_format
        return keras.config.image_data_format()

    def _hint(self) -> str:
        return _hint(self.model, len(self._input.shape))


def build_legacy_gradient_model(
    model: Any,
    layer: Any,
    *,
    logits: bool = True,
    expose_layer: bool = True,
    call_override: Any = None,
) -> LegacyGradientModel:
    """`build_gradient_model` for tf.keras 2 models (see `LegacyGradientModel`).

    Raises:
        UnsupportedModelError: a subclassed or unbuilt tf.keras model, several
            inputs, Keras 3 layers inside it, or a custom `call_override`.
        LayerNotFoundError, NotSpatialError: as `resolve_legacy_layer`.
    """
    name = f"tf.keras (Keras 2) model {model.name!r} ({type(model).__name__})"
    if not is_legacy_keras(model):
        raise UnsupportedModelError(f"`model` is not a tf.keras model: {type(model).__name__}.")
    try:
        inputs = model.inputs
    except AttributeError:
        inputs = None
    if not inputs or not getattr(model, "_is_graph_network", True):
        raise UnsupportedModelError(
            f"{name} has no functional graph: a subclassed or never-built tf.keras model. "
            "Build it with tf.keras' functional API or a Sequential model with an Input "
            "(or call it once), or rebuild it with Keras 3 (`import keras`)."
        )
    if len(inputs) > 1:
        raise UnsupportedModelError(f"{name} with several inputs: not supported yet.")
    mixed = [layer.name for layer in model.layers if isinstance(layer, keras.Operation)]
    if mixed:
        raise UnsupportedModelError(
            f"{name} holds Keras 3 layers {mixed}: tf.keras and Keras 3 layers cannot be "
            "mixed in one model. Build the whole model with one of the two."
        )
    if call_override is not None and not hasattr(call_override, "replacing_functions"):
        raise UnsupportedModelError(
            f"{name}: a custom `call_override` cannot apply to it (the guided and "
            "deconvolution ReLU rules can: relu_gradients=, GuidedBackprop, GuidedGradCAM)."
        )
    sample_shape = tuple(inputs[0].shape)
    target = resolve_legacy_layer(model, layer, len(sample_shape)) if expose_layer else None
    return LegacyGradientModel(
        model,
        target,
        sample_shape=sample_shape,
        logits=logits,
        call_override=call_override,
    )
