"""Grad-CAM at several layers of one model, from one forward and backward pass.

Selvaraju et al., Appendix B.1 and Fig. 13 (and §G, Fig. 22 for ResNets):
"localization becomes progressively worse as we move to earlier convolutional
layers", because later layers "better capture high-level semantic
information while retaining spatial information". `MultiLayerGradCAM` computes
the maps of every chosen layer for the same images and target, and
`plot_layers` draws them side by side, one row per image.

All layers share one forward pass and one backward pass: the gradient model
exposes every chosen layer's activations, and a single `tape.gradient` call
returns ∂y^c/∂A for all of them. The per-layer steps after the gradients
(channel weights, weighted sum, ReLU, upsampling) are the engine's own
(`GradCAM.maps_from_gradients`), so each layer's result equals
`GradCAM(model, layer)(images, target)`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_gradcam.engine import Engine, score_columns
from tf_gradcam.errors import (
    LayerNotFoundError,
    NoGradientError,
    NotSpatialError,
    UnknownMethodError,
)
from tf_gradcam.gradcam import Explanation, _GradCAMSteps, channels_last
from tf_gradcam.image import overlay, spatial_size, upsample_maps
from tf_gradcam.keras_adapter import is_expandable
from tf_gradcam.methods import get_method, method_name
from tf_gradcam.submodel import (
    _resolve_path,
    _rewire,
    image_of,
)
from tf_gradcam.targets import Target, TargetSpec

__all__ = ["LayerExplanations", "MultiLayerGradCAM", "explain_layers", "plot_layers"]

LayerArgument = str | keras.layers.Layer

#: Methods whose steps after the gradients apply per layer (their class overrides
#: only `channel_weights` and `weighted_sum`).
_GRADIENT_METHODS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam")


class LayerExplanations(dict):
    """`{layer path: Explanation}` in the model's call order, and their LayerCAM fusion.

    A `dict` (so `results["last_conv"]`, `.items()` and `plot_layers` work as
    for any mapping) of the same `Explanation`s every CAM method returns.
    """

    def fused(self, *, gamma: float = 2.0) -> np.ndarray:
        """The layers' maps fused as LayerCAM does (Jiang et al., IEEE TIP 2021, §III-C).

        Each layer's map `M` is scaled at its own resolution to
        `tanh(γ · M / max M)` (eq. 9, which lifts the weak but precise
        responses of shallow layers), upsampled bilinearly to the input size
        and fused by the element-wise maximum over layers (as torchcam's
        `LayerCAM.fuse_cams`). With `gamma=0` the scaling is left out
        (`M / max M`). Meant for `method="layercam"`; it applies to any
        rectified maps.

        Args:
            gamma: the scaling strength γ of eq. 9 (≥ 0; the paper uses 2).

        Returns:
            `(batch, height, width)` float32 in [0, 1] (a `k` axis after the
            batch axis for `TopK` targets); an all-zero map stays zero.

        Raises:
            ValueError: `gamma` is negative, or there are no layers.

        Example:
            >>> fused = MultiLayerGradCAM(model, layers, method="layercam")(images).fused()
        """
        if not isinstance(gamma, (int, float)) or not np.isfinite(gamma) or gamma < 0:
            raise ValueError(f"`gamma` must be a finite number >= 0. Received: gamma={gamma!r}.")
        if not self:
            raise ValueError("There are no layer explanations to fuse.")
        size = max((e.heatmaps.shape[-2:] for e in self.values()), key=lambda s: s[0] * s[1])
        fused = None
        for explanation in self.values():
            maps = tf.convert_to_tensor(explanation.maps, tf.float32)
            high = tf.reduce_max(maps, axis=[-2, -1], keepdims=True)
            scaled = tf.math.divide_no_nan(maps, high)
            if gamma > 0:
                scaled = tf.tanh(gamma * scaled)
            upsampled = tf.clip_by_value(upsample_maps(scaled, tf.constant(size)), 0.0, 1.0)
            fused = upsampled if fused is None else tf.maximum(fused, upsampled)
        return fused.numpy()

    def _repr_png_(self) -> bytes | None:
        """Jupyter display: one row of jet heatmap panels per layer, PNG."""
        from tf_gradcam.display import render_png

        return render_png(self)

    def _repr_html_(self) -> str | None:
        """Jupyter display: a summary line, the heatmap panels and a score table."""
        from tf_gradcam.display import render_html

        return render_html(self)


class _LayersModel:
    """The re-run graph of a model exposing the activations of several layers.

    Has the interface of `tf_gradcam.submodel.GradientModel` that the engine
    uses (`inputs`, `output_structure`, calling), with lists where the
    single-layer model has one value.
    """

    def __init__(
        self,
        model: keras.Model,
        layers: Sequence[LayerArgument] | None,
        *,
        logits: bool,
        call_override: Any,
        sample_shape: tuple[int, ...] | None,
    ) -> None:
        rewiring, inputs, outputs = _rewire(model, sample_shape, call_override)
        flat_outputs = keras.tree.flatten(outputs)
        if logits:
            flat_outputs = [rewiring.logits.get(id(t), t) for t in flat_outputs]
        if layers is None:
            paths = [
                p
                for p in rewiring.order
                if len(rewiring.outputs[p]) == 1
                and rewiring.is_spatial(rewiring.outputs[p][0])
                and not isinstance(rewiring.layers[p], keras.layers.InputLayer)
                and not is_expandable(rewiring.layers[p])
            ]
            if not paths:
                raise NotSpatialError(
                    f"Model {model.name!r} has no layer with a 4-D (batch, height, width, "
                    "channels) output, so there is no feature map to explain."
                )
        else:
            if isinstance(layers, (str, keras.layers.Layer)):
                layers = [layers]
            paths = [_resolve_path(model, layer, rewiring) for layer in layers]
            if not paths:
                raise LayerNotFoundError("`layers` is empty. Received: layers=[].")
        activations = [self._activation(model, rewiring, path) for path in paths]
        self.layer_paths = paths
        self.layer_path = paths[-1]
        self.channels_first = [rewiring.channels_first(a) for a in activations]
        #: per layer: (position of the image it is computed from, channels-first image)
        self.images = [rewiring.image_input(inputs, a) for a in activations]
        self.image_index, self.image_channels_first = self.images[-1]
        self.vocabularies = dict(rewiring.vocabularies)
        self.output_structure = outputs
        self.keras_model = keras.Model(
            inputs, activations + flat_outputs, name=f"{model.name}_layerwise"
        )

    @staticmethod
    def _activation(model: keras.Model, rewiring: Any, path: str) -> Any:
        calls = rewiring.outputs[path]
        if len(calls) > 1:
            raise LayerNotFoundError(
                f"Layer {path!r} is called {len(calls)} times in model {model.name!r} "
                "(a shared layer), so its activations are ambiguous. Choose layers that "
                "are called once."
            )
        if isinstance(calls[0], (list, tuple, dict)) or not rewiring.is_spatial(calls[0]):
            shape = getattr(calls[0], "shape", "several tensors")
            raise NotSpatialError(
                f"Layer {path!r} has output shape {shape}; Grad-CAM needs a 4-D "
                "(batch, height, width, channels) feature map. Received it in `layers`."
            )
        return calls[0]

    @property
    def inputs(self) -> Any:
        return self.keras_model.input

    def __call__(self, inputs: Any) -> tuple[list[Any], Any]:
        values = list(self.keras_model(inputs, training=False))
        count = len(self.layer_paths)
        outputs = keras.tree.pack_sequence_as(self.output_structure, values[count:])
        return values[:count], outputs


class MultiLayerGradCAM(_GradCAMSteps, Engine):
    """Grad-CAM for several layers of a model at once (Appendix B.1, Fig. 13).

    Every layer's map is exactly `GradCAM(model, layer, **options)`'s (or,
    with `method=`, that gradient method's), but all layers share one forward
    and one backward pass, compiled once per image size and target kind, as
    in `GradCAM`. A sibling of `GradCAM` over the same engine, with the same
    Grad-CAM steps and options. `method="layercam"` with
    `LayerExplanations.fused()` is LayerCAM's multi-layer fusion.

    Args:
        model: a Functional or Sequential `keras.Model` (nested models are fine).
        layers: the layers to explain, each a name, an `"outer/inner"` path or a
            `Layer`; `None` (the default) takes every layer with a 4-D output
            that is called once, in call order, without the input layers and
            without nested models themselves (their inner layers are listed).
        pooling: `"mean"` (eq. 1) or `"max"` pooling of the gradients.
        relu: apply the ReLU of eq. 2.
        counterfactual: negate the gradients (§3.3).
        absolute_gradients: pool `|∂y^c/∂A|` instead of the gradients.
        logits: explain the score before a trailing softmax/sigmoid.
        output: for multi-output models, which output class targets index.
        call_override: advanced: replaces layer calls in the gradient graph.
        relu_gradients: `"guided"` or `"deconv"` backward rule for every ReLU.
        jit_compile: compile the step with XLA.
        method: the gradient method applied at every layer: `"gradcam"`
            (default), `"gradcam++"`, `"xgradcam"`, `"hirescam"` or
            `"layercam"`; the pooling/counterfactual options are Grad-CAM's.

    Raises:
        UnknownMethodError: `method` is no gradient CAM method.
        ValueError: Grad-CAM's pooling/counterfactual options with another method.
        LayerNotFoundError: a layer is unknown, ambiguous or shared.
        NotSpatialError: a layer's output is not 4-D, or the model has none.
        The other errors of `GradCAM`.

    Example:
        >>> cams = MultiLayerGradCAM(model)                   # every spatial layer
        >>> results = cams(images, target=3)                  # {layer path: Explanation}
        >>> {path: r.maps.shape for path, r in results.items()}
        {'conv1': (1, 64, 64), 'pool1': (1, 32, 32), ..., 'last_conv': (1, 16, 16)}
    """

    def __init__(
        self,
        model: keras.Model,
        layers: Sequence[LayerArgument] | LayerArgument | None = None,
        *,
        pooling: str = "mean",
        relu: bool = True,
        counterfactual: bool = False,
        absolute_gradients: bool = False,
        logits: bool = True,
        output: int | str | None = None,
        call_override: Any = None,
        relu_gradients: str | None = None,
        jit_compile: bool = False,
        method: str = "gradcam",
    ) -> None:
        name = method_name(method)
        if name not in _GRADIENT_METHODS:
            raise UnknownMethodError(
                f"MultiLayerGradCAM applies a gradient method at every layer: one of "
                f"{', '.join(_GRADIENT_METHODS)}. Received: method={method!r}; explain "
                "other methods one layer at a time."
            )
        self._method = get_method(name)
        if name != "gradcam" and (pooling != "mean" or counterfactual or absolute_gradients):
            raise ValueError(
                "`pooling`, `counterfactual` and `absolute_gradients` are Grad-CAM's "
                f"options; method={method!r} does not take them."
            )
        call_override = self._set_options(
            model, pooling, relu, counterfactual, absolute_gradients, call_override, relu_gradients
        )
        self.logits = logits
        super().__init__(
            model,
            lambda sample_shape: _LayersModel(
                model, layers, logits=logits, call_override=call_override, sample_shape=sample_shape
            ),
            output=output,
            jit_compile=jit_compile,
        )

    def channel_weights(self, activations: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
        return self._method.channel_weights(self, activations, gradients)

    def weighted_sum(
        self, activations: tf.Tensor, gradients: tf.Tensor, weights: tf.Tensor
    ) -> tf.Tensor:
        return self._method.weighted_sum(self, activations, gradients, weights)

    @property
    def layers(self) -> list[str]:
        """Paths of the explained layers, in call order of the model."""
        return list(self.gradient_model.layer_paths)

    def _explain_batch(self, inputs: Any, classes: tf.Tensor, spec: TargetSpec) -> dict:
        gradient_model = self.gradient_model
        with tf.GradientTape(persistent=spec.k > 1) as tape:
            activations, outputs = gradient_model(inputs)
            tape.watch(activations)
            scores, resolved = self.target_scores(outputs, classes, spec)
            columns = score_columns(scores, spec)
        # one backward pass per target column, reaching every layer at once
        per_column = [tape.gradient(column, activations) for column in columns]
        del tape
        missing = [
            path
            for i, path in enumerate(gradient_model.layer_paths)
            if any(grads[i] is None for grads in per_column)
        ]
        if missing:
            raise NoGradientError(
                f"The target score does not depend on layer(s) {missing} (no gradient "
                "path). Leave them out of `layers`."
            )
        scores = tf.cast(scores, tf.float32)
        if spec.kind != "top_k":
            scores, resolved = scores[:, None], resolved[:, None]
        results = {}
        for i, path in enumerate(gradient_model.layer_paths):
            layer_activations = tf.cast(activations[i], tf.float32)
            grads = tf.stack([tf.cast(g[i], tf.float32) for g in per_column], axis=1)
            if gradient_model.channels_first[i]:
                layer_activations = channels_last(layer_activations)
                grads = channels_last(grads, batch_axes=2)
            index, channels_first = gradient_model.images[i]
            size = spatial_size(image_of(inputs, index), channels_first)
            results[path] = self.maps_from_gradients(
                inputs, layer_activations, grads, scores, resolved, size=size
            )
        return results

    def compute(self, images: Any, target: Target = None) -> LayerExplanations:
        """Like calling the object, but the explanations hold `tf.Tensor`s.

        Args:
            images: `(batch, height, width, channels)` array or tensor; a list/dict
                of arrays for multi-input models.
            target: what to explain, as for `GradCAM` (the same for every layer).

        Returns:
            `LayerExplanations`: `{layer path: Explanation}` in the model's
            call order.

        Raises:
            The errors of `GradCAM.compute`.

        Example:
            >>> heat = cams.compute(x, target=3)["last_conv"].heatmaps
        """
        per_layer, spec = self._run(images, target)
        explanations = LayerExplanations()
        for path, result in per_layer.items():  # the step already dropped the k axis
            explanations[path] = Explanation(
                heatmaps=result["heatmaps"],
                maps=result["maps"],
                raw_maps=result["raw_maps"],
                weights=result["weights"],
                scores=result["scores"],
                classes=None if spec.kind == "callable" else result["classes"],
                degenerate=result["degenerate"],
                layer=path,
            )
        self._warn_degenerate(explanations)
        return explanations

    def _warn_degenerate(self, explanations: dict[str, Explanation]) -> None:
        if self._warned_degenerate or not tf.executing_eagerly():
            return
        flat = [p for p, e in explanations.items() if bool(tf.reduce_any(e.degenerate))]
        if flat:
            self._warned_degenerate = True
            warnings.warn(
                f"Some Grad-CAM maps are all zero at layer(s) {flat}: no region has a "
                "positive influence on the target there (see `Explanation.degenerate`). "
                "This warning is shown once.",
                RuntimeWarning,
                stacklevel=4,  # the caller of __call__
            )

    def __call__(self, images: Any, target: Target = None) -> LayerExplanations:
        """Explain a batch of images at every chosen layer.

        Args:
            images: `(batch, height, width, channels)` array; a list/dict of
                arrays for multi-input models.
            target: `None` (predicted class), an int, one int per image,
                `TopK(k)`, or a callable `outputs -> (batch,)` score.

        Returns:
            `LayerExplanations`: `{layer path: Explanation}` of NumPy arrays,
            in the model's call order. Every heatmap is at the input size;
            `maps` keep each layer's own resolution.

        Raises:
            The errors of `GradCAM.__call__`.

        Example:
            >>> results = cams(images)
            >>> results["last_conv"].heatmaps.shape   # (batch, height, width)
        """
        return LayerExplanations(
            (path, e.numpy()) for path, e in self.compute(images, target).items()
        )


def explain_layers(
    model: keras.Model,
    images: Any,
    target: Target = None,
    layers: Sequence[LayerArgument] | LayerArgument | None = None,
    **options: Any,
) -> LayerExplanations:
    """Grad-CAM at several layers in one call: `MultiLayerGradCAM(model, layers)(images, target)`.

    Args:
        model: a Functional or Sequential `keras.Model`.
        images: `(batch, height, width, channels)` array, or a list/dict for
            multi-input models.
        target: `None`, an int, one int per image, `TopK(k)`, or a callable.
        layers: layer names, paths or `Layer`s; `None` for every layer with a
            4-D output (see `MultiLayerGradCAM`).
        **options: keyword options of `MultiLayerGradCAM` (`method=` too).

    Returns:
        `LayerExplanations` of NumPy arrays, in the model's call order.

    Raises:
        The errors of `MultiLayerGradCAM`.

    Example:
        >>> results = tf_gradcam.explain_layers(model, image[None], target=281)
        >>> tf_gradcam.plot_layers(image[None], results, "layers.png")
    """
    return MultiLayerGradCAM(model, layers, **options)(images, target)


def plot_layers(
    images: Any,
    explanations: dict[str, Explanation],
    path: str | os.PathLike | None = None,
    *,
    alpha: float = 0.5,
    colormap: str = "jet",
    image_titles: Sequence[str] | None = None,
    size: float = 1.8,
    dpi: int = 100,
) -> Any:
    """Draw each image next to its Grad-CAM overlay at every layer (Fig. 13).

    One row per image: the image, then one overlay per layer in the order of
    `explanations`, titled with the layer path and its map size. Uses
    Matplotlib's object API (no `pyplot`, no global state; Agg canvas).

    Args:
        images: `(batch, height, width, channels)` images in [0, 1] or uint8;
            a single `(height, width, channels)` image is a batch of one.
        explanations: `{layer path: Explanation}` for these images, as
            returned by `explain_layers` (one map per image: not `TopK`).
        path: where to save the figure as PNG, or `None` to only return it.
        alpha: weight of the heatmap colour in each overlay.
        colormap: a Matplotlib colormap name.
        image_titles: optional label of each row (e.g. the class explained).
        size: edge of one panel, in inches.
        dpi: resolution of the saved PNG, in dots per inch.

    Returns:
        The `matplotlib.figure.Figure`.

    Raises:
        ValueError: no explanations, `TopK` explanations, or a batch size that
            differs from the images'.

    Example:
        >>> fig = plot_layers(images, explain_layers(model, images), "layers.png")
    """
    from matplotlib.figure import Figure

    images = np.asarray(images)
    if images.ndim == 3 and images.shape[-1] in (1, 3, 4):
        images = images[None]
    if not explanations:
        raise ValueError("`explanations` is empty; pass the result of `explain_layers`.")
    for name, explanation in explanations.items():
        heatmaps = np.asarray(explanation.heatmaps)
        if heatmaps.ndim != 3 or heatmaps.shape[0] != images.shape[0]:
            raise ValueError(
                f"The heatmaps of layer {name!r} have shape {heatmaps.shape}; expected one "
                f"(height, width) map per image, (batch={images.shape[0]}, height, width). "
                "TopK explanations are not supported: plot one class at a time."
            )
    n, columns = images.shape[0], len(explanations) + 1
    figure = Figure(figsize=(size * columns, size * n + 0.4), layout="constrained")
    axes = figure.subplots(n, columns, squeeze=False)
    base = overlay(images, np.zeros(images.shape[:3], np.float32), alpha=0.0)
    for row in range(n):
        axes[row, 0].imshow(base[row])
        axes[row, 0].set_title(image_titles[row] if image_titles else "input", fontsize=8)
        for column, (name, explanation) in enumerate(explanations.items(), start=1):
            blended = overlay(
                images[row],
                np.asarray(explanation.heatmaps[row]),
                alpha=alpha,
                colormap=colormap,
            )
            axes[row, column].imshow(blended)
            h, w = np.asarray(explanation.maps).shape[-2:]
            axes[row, column].set_title(f"{name}\n{h}×{w}", fontsize=8)
    for axis in axes.ravel():
        axis.set_axis_off()
    if path is not None:
        figure.savefig(os.fspath(path), dpi=dpi)
    return figure
