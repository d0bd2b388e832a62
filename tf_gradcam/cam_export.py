"""The forward-only CAM model: Grad-CAM without gradients, for TFLite and ONNX.

For a classifier whose explained feature map `A` is read by global average
pooling and then a `Dense` layer (the head of CAM, Zhou et al. 2016),
`y^c = Σ_k w_kc (1/Z) Σ_ij A^k_ij + b_c`, so `∂y^c/∂A^k_ij = w_kc / Z` at every
position and Grad-CAM's weights are `α_k^c = w_kc / Z` (the paper's §3.1,
eqs. 3–11). The map `ReLU(Σ_k α_k^c A^k)` is then CAM's `Σ_k w_kc A^k`
divided by `Z` and rectified, and after the upsampling and the normalisation
by each map's maximum the `1/Z` cancels: the heatmaps are Grad-CAM's. This
module computes them from one forward pass, with the `Dense` kernel as the
weights, through the same `weighted_sum` and `finish_maps` steps as `GradCAM`,
so the graph has no gradient ops and converts to TFLite and to ONNX.

The head is recognised on the gradient model's graph (nested models opened):
the scores must be a `Dense` layer (its softmax/sigmoid removed, or a
`Softmax` layer after it), over `Dropout`/`Flatten` layers that change no
value, over `GlobalAveragePooling2D` (channels-last) of the explained layer's
output. Any other head is refused with an `UnsupportedModelError` naming what
was found instead.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_gradcam.errors import UnsupportedModelError
from tf_gradcam.submodel import is_squashing_head
from tf_gradcam.targets import TargetSpec

__all__ = ["cam_kernel", "forward_cam", "write_onnx", "write_tflite"]

#: Layers between the pooling and the `Dense` layer that change no value at inference
#: (a `Flatten` only of pooled features, `(batch, 1, 1, channels)`).
_PASS_THROUGH = (keras.layers.Dropout, keras.layers.Flatten, keras.layers.Identity)

#: The ONNX operator set of the `.onnx` files written.
ONNX_OPSET = 17


def cam_kernel(explainer: Any) -> tf.Variable:
    """The `Dense` kernel `(channels, classes)` of a GAP → Dense head over the explained layer.

    Args:
        explainer: a built `GradCAM` of a Functional or Sequential model.

    Returns:
        The kernel variable `w` of eq. 5 (`y^c = Σ_k w_kc F^k`).

    Raises:
        UnsupportedModelError: the model is not a re-wired graph (subclassed or
            tf.keras), the layer is not a channels-last feature map, or the
            scores are not `Dense(GlobalAveragePooling2D(layer output))`; the
            message names what the head is instead.

    Example:
        >>> kernel = cam_kernel(tf_gradcam.GradCAM(model))
        >>> kernel.shape                   # (channels, classes)
    """
    gradient_model = explainer.gradient_model
    graph = gradient_model.keras_model
    where = f"the forward-only CAM model of {explainer.model.name!r} at layer {explainer.layer!r}"
    if graph is None or gradient_model.layout is not None or gradient_model.channels_first:
        raise UnsupportedModelError(
            f"Cannot build {where}: it needs a Functional or Sequential Keras 3 model whose "
            "layer is a channels-last feature map (batch, height, width, channels). Export "
            "this model with format='tf_saved_model' (gradients) instead."
        )
    activations = graph.outputs[0]
    if len(activations.shape) != 4:
        raise UnsupportedModelError(
            f"Cannot build {where}: the layer's output has shape {tuple(activations.shape)}, "
            "not (batch, height, width, channels). Use format='tf_saved_model'."
        )
    outputs = keras.tree.pack_sequence_as(gradient_model.output_structure, graph.outputs[1:])
    tensor = explainer._scored_output(outputs)
    call = _producer(graph, tensor)
    layer = getattr(call, "wrapped", call)
    if is_squashing_head(layer) and not isinstance(layer, keras.layers.Dense):
        tensor = call.input  # a Softmax layer or op: the identity in the scores' graph
        call = _producer(graph, tensor)
        layer = getattr(call, "wrapped", call)
    activation = getattr(getattr(layer, "activation", None), "__name__", None)
    if not isinstance(layer, keras.layers.Dense) or activation not in (
        "linear",
        "softmax",
        "sigmoid",
    ):
        raise UnsupportedModelError(
            f"Cannot build {where}: the scores come from {_describe(layer)}, not from a Dense "
            "layer with a linear, softmax or sigmoid activation over global average "
            "pooling. Use format='tf_saved_model'."
        )
    dense, tensor = layer, call.input
    call = _producer(graph, tensor)
    layer = getattr(call, "wrapped", call)
    while isinstance(layer, _PASS_THROUGH) and _pooled(call.input):
        tensor = call.input
        call = _producer(graph, tensor)
        layer = getattr(call, "wrapped", call)
    if isinstance(layer, keras.layers.Flatten):
        reason = f"the Dense layer {dense.name!r} reads a Flatten of a feature map"
    elif not isinstance(layer, keras.layers.GlobalAveragePooling2D):
        reason = f"the Dense layer {dense.name!r} reads {_describe(layer)}"
    elif layer.data_format != "channels_last":
        reason = f"the global average pooling {layer.name!r} is channels-first"
    elif call.input is not activations:
        feeding = getattr(_producer(graph, call.input), "wrapped", None)
        reason = (
            f"the global average pooling {layer.name!r} reads {_describe(feeding)}, not the "
            f"explained layer; export with layer={getattr(feeding, 'name', None)!r}"
        )
    else:
        reason = None
    if reason is not None:
        raise UnsupportedModelError(
            f"Cannot build {where}: {reason}, not global average pooling of the explained "
            "layer (CAM = Grad-CAM holds for feature map → global average pooling → Dense "
            "only, paper §3.1). Use format='tf_saved_model'."
        )
    return dense.kernel


def forward_cam(
    explainer: Any,
    signature: tf.TensorSpec,
    *,
    top_k: int,
    finish: Callable[[dict, tf.Tensor], dict],
) -> tf.types.experimental.PolymorphicFunction:
    """The `tf.function` `images -> outputs` of the forward-only CAM model.

    One forward pass gives the explained layer's activations and the scores;
    the `top_k` classes' weights are `kernel[:, c] / Z`, and Grad-CAM's
    `weighted_sum` and `finish_maps` give the maps and heatmaps.

    Args:
        explainer: a built `GradCAM` with default options.
        signature: the `TensorSpec` of the images, batch axis free.
        top_k: how many classes to explain per image.
        finish: `(results, scores) -> outputs`, as for the serving signature.

    Returns:
        The function, with `signature` as its input signature.

    Raises:
        UnsupportedModelError: the head is not global average pooling → Dense
            (see `cam_kernel`).

    Example:
        >>> function = forward_cam(cam, tf.TensorSpec((None, 64, 64, 3)), top_k=1,
        ...                        finish=lambda result, scores: result)
    """
    kernel = cam_kernel(explainer)
    spec = TargetSpec("top_k", np.zeros((1,), np.int32), k=top_k)
    explain = functools.partial(_forward, explainer, kernel, spec, finish)
    return tf.function(explain, input_signature=[signature], autograph=False)


def _forward(
    explainer: Any,
    kernel: tf.Variable,
    spec: TargetSpec,
    finish: Callable[[dict, tf.Tensor], dict],
    images: tf.Tensor,
) -> dict:
    """One forward pass → scores, top-k classes, CAM weights `w_kc / Z` → Grad-CAM's maps."""
    activations, outputs = explainer.gradient_model(images)
    activations = tf.cast(activations, tf.float32)
    positions = tf.cast(tf.reduce_prod(tf.shape(activations)[1:3]), tf.float32)  # Z
    scored = explainer._scored_output(outputs)
    scores, classes = explainer.target_scores(outputs, tf.zeros([0], tf.int32), spec)
    weights = tf.gather(tf.transpose(tf.cast(kernel, tf.float32)), classes) / positions
    raw = explainer.weighted_sum(activations, None, weights)
    result = explainer.finish_maps(images, raw, weights, tf.cast(scores, tf.float32), classes)
    return finish(result, scored)


def write_tflite(function: tf.types.experimental.PolymorphicFunction, path: str) -> None:
    """Convert the forward-only CAM function to a TFLite flatbuffer at `path` (builtin ops only).

    The function is written as a SavedModel by `keras.export.ExportArchive`
    into a folder beside `path` and converted with
    `tf.lite.TFLiteConverter.from_saved_model`, the path Keras' own LiteRT
    export takes; the signature is named `explain`.
    """
    folder = f"{path}.saved_model"
    _saved_model(function, folder)
    converter = tf.lite.TFLiteConverter.from_saved_model(folder, signature_keys=["explain"])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    flatbuffer = converter.convert()
    with open(path, "wb") as file:
        file.write(flatbuffer)


def write_onnx(function: tf.types.experimental.PolymorphicFunction, path: str) -> None:
    """Convert the forward-only CAM function to an ONNX model at `path` with tf2onnx.

    Raises:
        ImportError: tf2onnx is not installed (`pip install "tf_gradcam[export]"`).
    """
    try:
        import tf2onnx
    except ImportError as error:
        raise ImportError(
            'format="onnx" needs tf2onnx: pip install "tf_gradcam[export]" (tf2onnx, onnxruntime).'
        ) from error
    tf2onnx.convert.from_function(
        function,
        input_signature=function.input_signature,
        opset=ONNX_OPSET,
        output_path=os.fspath(path),
    )


def _saved_model(function: tf.types.experimental.PolymorphicFunction, folder: str) -> None:
    archive = keras.export.ExportArchive()
    archive.add_endpoint("explain", function, input_signature=function.input_signature)
    archive.write_out(folder, verbose=False)


def _producer(graph: keras.Model, tensor: Any) -> Any:
    """The layer of a functional graph whose output is `tensor` (each is called once)."""
    for layer in graph.layers:
        if any(out is tensor for out in keras.tree.flatten(layer.output)):
            return layer
    return None


def _pooled(tensor: Any) -> bool:
    """Whether a tensor has no spatial extent: `(batch, channels)` or `(batch, 1, 1, channels)`."""
    return all(size == 1 for size in tuple(tensor.shape)[1:-1])


def _describe(layer: Any) -> str:
    if layer is None:
        return "an input of the model"
    return f"{type(layer).__name__} {layer.name!r}"
