"""Grad-CAM: tape → gradients → channel weights → weighted sum → ReLU.

Follows Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", §3 (eqs. 1–2), §3.3 (counterfactuals) and the
ablations of Appendix B.2. `GradCAM` is a method over the shared
`tf_gradcam.engine.Engine` (inputs, targets, the compiled step); a Grad-CAM
variant overrides one step, `channel_weights`, as in pytorch-grad-cam.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_gradcam.capture import resolve_layer, watching
from tf_gradcam.engine import Engine, score_columns
from tf_gradcam.errors import NoGradientError
from tf_gradcam.image import normalize_maps, upsample_maps
from tf_gradcam.keras_adapter import is_expandable
from tf_gradcam.preprocessing import attached_preprocessor, heatmaps_on_original
from tf_gradcam.relu_rules import ReluOverride
from tf_gradcam.submodel import CallOverride, build_gradient_model
from tf_gradcam.targets import Target, TargetSpec

__all__ = ["Explanation", "GradCAM"]

_POOLINGS = ("mean", "max")


@dataclass(frozen=True)
class Explanation:
    """What one Grad-CAM call returns.

    Per-image arrays have the batch axis first; with `TopK(k)` targets they gain
    a `k` axis right after it. `GradCAM.__call__` returns NumPy arrays,
    `GradCAM.compute` returns `tf.Tensor`s (for graph mode and differentiation).
    For Conv1D networks on signals the maps are `(batch, length)` and for
    Conv3D networks on volumes `(batch, depth, height, width)` wherever
    `(batch, height, width)` is written below (docs/models.md).

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
        layout: for a transformer's token layer, how its tokens were laid on the
            patch grid (`tf_gradcam.tokens.TokenLayout`: prefix tokens dropped,
            grid; or `CustomLayout` for `reshape=`); `None` for feature maps.
    """

    heatmaps: Any
    maps: Any
    raw_maps: Any
    weights: Any
    scores: Any
    classes: Any
    degenerate: Any
    layer: str
    layout: Any = None

    def numpy(self) -> Explanation:
        """Return a copy whose tensor fields are NumPy arrays."""
        converted = {}
        for f in fields(self):
            value = getattr(self, f.name)
            converted[f.name] = value.numpy() if isinstance(value, tf.Tensor) else value
        return replace(self, **converted)

    def _repr_png_(self) -> bytes | None:
        """Jupyter display: one jet heatmap panel per image (and top-k rank), PNG."""
        from tf_gradcam.display import render_png

        return render_png(self)

    def _repr_html_(self) -> str | None:
        """Jupyter display: a summary line, the heatmap panels and a score table."""
        from tf_gradcam.display import render_html

        return render_html(self)


def spatial_axes(tensor: tf.Tensor, *, batch_axes: int = 2) -> list[int]:
    """The spatial axes of a `(batch, [k,] *spatial, channels)` tensor: all but the first and last.

    Args:
        tensor: activations (`batch_axes=1`) or per-target gradients (`batch_axes=2`).
        batch_axes: how many leading axes are not spatial.

    Returns:
        The axis indices, `[2, 3]` for `(batch, k, h, w, channels)` gradients.
    """
    return list(range(batch_axes, tensor.shape.rank - 1))


def channels_last(tensor: tf.Tensor, *, batch_axes: int = 1) -> tf.Tensor:
    """`(batch, [k,] channels, *spatial)` → `(batch, [k,] *spatial, channels)`."""
    rank = tensor.shape.rank
    return tf.transpose(tensor, [*range(batch_axes), *range(batch_axes + 1, rank), batch_axes])


class _GradCAMSteps:
    """Grad-CAM's options and its steps after the gradients (eqs. 1–2).

    Shared by `GradCAM` and its sibling `tf_gradcam.layerwise.MultiLayerGradCAM`.
    """

    pooling: str
    relu: bool
    counterfactual: bool
    absolute_gradients: bool

    def _set_options(
        self,
        model: keras.Model,
        pooling: str,
        relu: bool,
        counterfactual: bool,
        absolute_gradients: bool,
        call_override: CallOverride | None,
        relu_gradients: str | None,
    ) -> CallOverride | None:
        """Check and store the options; return the call override to build with."""
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
        self.pooling = pooling
        self.relu = relu
        self.counterfactual = counterfactual
        self.absolute_gradients = absolute_gradients
        return call_override

    def channel_weights(self, activations: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
        """Neuron importances α `(batch, k, channels)` from the gradients (eq. 1).

        Subclasses override this one step to define other CAM variants.
        """
        if self.absolute_gradients:
            gradients = tf.abs(gradients)
        if self.counterfactual:
            gradients = -gradients
        if self.pooling == "max":
            return tf.reduce_max(gradients, axis=spatial_axes(gradients))
        return tf.reduce_mean(gradients, axis=spatial_axes(gradients))

    def weighted_sum(
        self, activations: tf.Tensor, gradients: tf.Tensor, weights: tf.Tensor
    ) -> tf.Tensor:
        """The signed map `Σ_k α_k A^k` `(batch, k, h, w)` (eq. 2 before the ReLU).

        Element-wise variants (HiResCAM, LayerCAM) override this step instead of
        `channel_weights`. For 1-D and 3-D feature maps the map has their
        spatial axes, `(batch, k, length)` or `(batch, k, d, h, w)`.
        """
        if activations.shape.rank == 4:
            return tf.einsum("nhwc,nkc->nkhw", activations, weights)
        shape = tf.shape(activations)
        rows = tf.reshape(activations, [shape[0], -1, shape[-1]])  # (batch, positions, C)
        flat = tf.einsum("npc,nkc->nkp", rows, weights)
        return tf.reshape(flat, tf.concat([shape[:1], tf.shape(weights)[1:2], shape[1:-1]], 0))

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
        raw = self.weighted_sum(activations, grads, weights)
        return self.finish_maps(inputs, raw, weights, scores, resolved, size=size)

    def finish_maps(
        self,
        inputs: Any,
        raw: tf.Tensor,
        weights: tf.Tensor,
        scores: tf.Tensor,
        resolved: tf.Tensor,
        *,
        size: tf.Tensor | None = None,
    ) -> dict:
        """ReLU → upsampling → normalisation of signed maps `raw` `(batch, k, h, w)`.

        The step every CAM method ends with, whatever gave its weights
        (gradients, extra forward passes, a principal component).

        Returns:
            The fields of an `Explanation` (without `layer`), `k` axis kept.
        """
        maps = tf.nn.relu(raw) if self.relu else raw
        if size is None:
            size = self.gradient_model.image_size(inputs)
        axes = raw.shape.rank - 2
        heatmaps, degenerate = normalize_maps(
            upsample_maps(maps, size), signed=not self.relu, axes=axes
        )
        finite = tf.reduce_all(tf.math.is_finite(raw), axis=list(range(2, 2 + axes)))
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


class GradCAM(_GradCAMSteps, Engine):
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
        model: a Functional or Sequential `keras.Model` (nested models are fine),
            or a subclassed `keras.Model` with one image input: its `call` is run as
            it is and the layer's output captured on the way (`tf_gradcam.capture`);
            `layer=` is then required (a path of attributes such as
            `"encoder/blocks/3"`, or the Layer object) and the gradient model is
            built on the first batch. tf.keras 2 functional and Sequential models
            are explained too (`tf_gradcam.legacy`).
        layer: the convolutional layer to explain: a name, an `"outer/inner"`
            path through nested models, a `Layer` (or bare operation) object, or
            `None` for the last feature map before the global pooling
            (trailing max/average pooling skipped: VGG16's `block5_conv3`, not
            `block5_pool`; a fully-convolutional classifier's class-score
            convolution stepped back from, to the layer feeding it; 3-D / 5-D
            maps in networks on signals / volumes). A layer inside another
            layer (a block of keras-hub's `ViTEncoder`) is named by a path of
            attributes, `"backbone/encoder/encoder_layers/1"`, and captured
            during the model's call. A `(batch, tokens, channels)` output of an
            image model is a transformer's tokens: explained on their patch
            grid (`Explanation.layout` says which).
        reshape: for token layers whose layout is not prefix tokens followed by a
            row-major patch grid: a function from `(batch, tokens, channels)` to
            `(batch, rows, columns, channels)` written with TensorFlow ops.
        pooling: `"mean"` (eq. 1) or `"max"` pooling of the gradients.
        relu: apply the ReLU of eq. 2.
        counterfactual: negate the gradients (§3.3): regions whose removal would
            raise the score.
        absolute_gradients: pool `|∂y^c/∂A|` instead of the gradients.
        logits: explain the score before a trailing softmax/sigmoid (paper
            default). `False` explains the model's outputs as they are. For a
            model run as it is (subclassed, tf.keras), the input of the traced
            softmax/sigmoid op that produces an output.
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
        UnsupportedModelError: a custom `call_override` or several inputs on a subclassed
            model.
        LayerNotFoundError: `layer` matches no layer; the message lists the closest.
        NotSpatialError: the layer's output is no feature map (nor tokens on a grid).
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
        reshape: Callable[[Any], Any] | None = None,
    ) -> None:
        call_override = self._set_options(
            model, pooling, relu, counterfactual, absolute_gradients, call_override, relu_gradients
        )
        self.logits = logits
        #: a keras-hub task's image preprocessor, applied as `model.predict` does
        #: (`None` when the model has none; set it to `None` to pass images the
        #: preprocessor has already seen).
        self.preprocessor = attached_preprocessor(model)
        if isinstance(model, keras.Model) and not is_expandable(model):
            resolve_layer(model, layer)  # fail early: subclassed models build on the first batch
        super().__init__(
            model,
            lambda sample_shape: build_gradient_model(
                model,
                layer,
                logits=logits,
                call_override=call_override,
                sample_shape=sample_shape,
                reshape=reshape,
            ),
            output=output,
            jit_compile=jit_compile,
        )

    @property
    def layer(self) -> str:
        """Path of the explained layer."""
        return self.gradient_model.layer_path

    # ------------------------------------------------------------- the steps

    def gradients(
        self, inputs: Any, classes: tf.Tensor, spec: TargetSpec
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """One forward pass, then ∂y^c/∂A for each of the k targets.

        Returns:
            `(activations, gradients, scores, classes)`; activations are
            `(batch, h, w, channels)` float32, gradients `(batch, k, h, w, channels)`.
        """
        gradient_model = self.gradient_model
        # `watching`: a subclassed model's captured layer output is watched as it is
        # produced (tf_gradcam.capture), so gradients reach it through variable-free ops.
        with tf.GradientTape(persistent=spec.k > 1) as tape, watching(tape):
            activations, outputs = gradient_model(inputs)
            tape.watch(activations)
            scores, resolved = self.target_scores(outputs, classes, spec)
            columns = score_columns(scores, spec)
        grads = [tape.gradient(column, activations) for column in columns]
        del tape
        if any(g is None for g in grads):
            raise NoGradientError(
                f"The target score does not depend on layer {gradient_model.layer_path!r} "
                "(no gradient path). Choose a layer the scored output is computed from, "
                "or another output/target, or a gradient-free method: "
                "method='scorecam', 'ablationcam' or 'eigencam'."
            )
        activations = tf.cast(activations, tf.float32)
        grads = tf.stack([tf.cast(g, tf.float32) for g in grads], axis=1)
        if gradient_model.layout is not None:  # tokens → (batch, rows, columns, channels)
            activations = gradient_model.layout.to_grid(activations)
            grads = gradient_model.layout.to_grid(grads, batch_axes=2)
        if gradient_model.channels_first:
            activations = channels_last(activations)
            grads = channels_last(grads, batch_axes=2)
        if spec.kind != "top_k":
            scores = scores[:, None]
            resolved = resolved[:, None]
        return activations, grads, tf.cast(scores, tf.float32), resolved

    def forward(
        self, inputs: Any, classes: tf.Tensor, spec: TargetSpec
    ) -> tuple[tf.Tensor, Any, tf.Tensor, tf.Tensor]:
        """One forward pass, no gradients: what gradient-free methods start from.

        Returns:
            `(activations, outputs, scores, classes)`: activations
            `(batch, h, w, channels)` float32 (channels-last whatever the
            layer's layout), the model's outputs (before a trailing softmax
            when `logits=True`), scores and classes `(batch, k)`.
        """
        activations, outputs = self.gradient_model(inputs)
        scores, resolved = self.target_scores(outputs, classes, spec)
        activations = tf.cast(activations, tf.float32)
        if self.gradient_model.layout is not None:
            activations = self.gradient_model.layout.to_grid(activations)
        if self.gradient_model.channels_first:
            activations = channels_last(activations)
        if spec.kind != "top_k":
            scores = scores[:, None]
            resolved = resolved[:, None]
        return activations, outputs, tf.cast(scores, tf.float32), resolved

    def _explain_batch(self, inputs: Any, classes: tf.Tensor, spec: TargetSpec) -> dict:
        activations, grads, scores, resolved = self.gradients(inputs, classes, spec)
        return self.maps_from_gradients(inputs, activations, grads, scores, resolved)

    # --------------------------------------------------------------- calling

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
        if self.preprocessor is None:
            result, spec = self._run(images, target)
            return self.to_explanation(result, spec)
        # A keras-hub task's own preprocessor, as `model.predict` applies it; the
        # heatmaps go back onto the caller's images (tf_gradcam.preprocessing).
        shape = tf.shape(images) if tf.is_tensor(images) else np.shape(images)
        height, width = int(shape[-3]), int(shape[-2])
        inputs = self.preprocessor(images)
        if isinstance(inputs, tuple):  # (x, y, sample_weight) preprocessors
            inputs = inputs[0]
        result, spec = self._run(inputs, target)
        explanation = self.to_explanation(result, spec)
        heatmaps = heatmaps_on_original(
            explanation.heatmaps, self.preprocessor.image_converter, height, width
        )
        return replace(explanation, heatmaps=heatmaps)

    def to_explanation(self, result: dict, spec: TargetSpec) -> Explanation:
        """The `Explanation` of one compiled step's results; warns once about all-zero maps.

        Args:
            result: what `compiled_step(signature, spec)(inputs, classes)` returned.
            spec: the target it was compiled for.

        Returns:
            An `Explanation` of the result's tensors.
        """
        classes = None if spec.kind == "callable" else result["classes"]
        if (
            tf.executing_eagerly()
            and not self._warned_degenerate
            and result["degenerate"].numpy().any()  # a host read, no eager op
        ):
            self._warned_degenerate = True
            count = int(np.count_nonzero(result["degenerate"].numpy()))
            remedy = "or `counterfactual=True`" if type(self) is GradCAM else "or another method"
            warnings.warn(
                f"{count} {type(self).__name__} map(s) at layer {self.layer!r} are all zero: "
                "no region has a positive influence on the target (see "
                f"`Explanation.degenerate`). Try an earlier layer, another class, {remedy}. "
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
            layout=self.gradient_model.layout,
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
