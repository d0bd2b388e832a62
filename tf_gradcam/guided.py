"""Guided Backpropagation, Deconvolution and Guided Grad-CAM (paper §3.2, Appendix B.2.3).

Pixel-space gradient visualisations change only the backward pass of the
ReLUs: *Guided Backpropagation* (Springenberg et al.) passes a gradient only
where the forward input was positive **and** the incoming gradient is
positive; *Deconvolution* (Zeiler & Fergus) passes every positive incoming
gradient, whatever the forward input. Selvaraju et al. §3.2 multiply the
guided-backprop image by the bilinearly upsampled Grad-CAM map to get *Guided
Grad-CAM*, which is both high-resolution and class-discriminative; Table 2
compares it with Deconvolution Grad-CAM; Appendix B.2.3 computes Grad-CAM
itself with these backward rules (`GradCAM(..., relu_gradients="guided")`).

The ReLUs are replaced in the engine's gradient graph only (see
`tf_gradcam.submodel`): the user's layers run with their own weights, the
user's model is never cloned or edited. `ReluOverride` finds every ReLU,
ReLU6, leaky or thresholded ReLU: `activation="relu"`/`"relu6"`/`"leaky_relu"`
on any layer (Dense, Conv*, Activation), `keras.layers.ReLU` and `LeakyReLU`
layers, `keras.ops.relu`/`relu6`/`leaky_relu` applied as bare operations in a
functional graph, at every depth of nested Functional and Sequential models.

The rules themselves (`guided_relu`, `deconv_relu`, `GuidedReLU`,
`DeconvReLU`, `ReluOverride`) live in `tf_gradcam.relu_rules` and are
re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import keras
import tensorflow as tf

from tf_gradcam.engine import Engine, score_columns
from tf_gradcam.errors import NoGradientError
from tf_gradcam.gradcam import Explanation, GradCAM
from tf_gradcam.relu_rules import (
    DeconvReLU,
    GuidedReLU,
    ReluOverride,
    deconv_relu,
    guided_relu,
    true_relu_gradients,
)
from tf_gradcam.submodel import CallOverride, build_gradient_model
from tf_gradcam.targets import Target, TargetSpec

__all__ = [
    "DeconvReLU",
    "Deconvolution",
    "DeconvolutionGradCAM",
    "GuidedBackprop",
    "GuidedGradCAM",
    "GuidedReLU",
    "PixelExplanation",
    "ReluOverride",
    "deconv_relu",
    "guided_relu",
]


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class PixelExplanation:
    """What a pixel-space method returns.

    Per-image arrays have the batch axis first; with `TopK(k)` targets they
    gain a `k` axis right after it. `__call__` returns NumPy arrays, `compute`
    returns `tf.Tensor`s.

    Attributes:
        gradients: `(batch, height, width, channels)` float32, the
            visualisation: guided backprop / deconvolution gradients of the
            target score with respect to the image input, multiplied by the
            Grad-CAM heatmap for the fused methods. Display it with
            `tf_gradcam.image.normalize_gradients`.
        backprop: `(batch, height, width, channels)` the guided or deconv
            gradients alone (equal to `gradients` for `GuidedBackprop` and
            `Deconvolution`).
        cam: the Grad-CAM `Explanation` the fused methods multiplied by, else `None`.
        scores: `(batch,)` target scores y^c.
        classes: `(batch,)` class indices, or `None` for a callable target.
    """

    gradients: Any
    backprop: Any
    cam: Explanation | None
    scores: Any
    classes: Any

    def numpy(self) -> PixelExplanation:
        """Return a copy whose tensor fields are NumPy arrays."""
        converted = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tf.Tensor):
                value = value.numpy()
            elif isinstance(value, Explanation):
                value = value.numpy()
            converted[f.name] = value
        return replace(self, **converted)

    def _repr_png_(self) -> bytes | None:
        """Jupyter display: the normalised gradients of each image (and rank), PNG."""
        from tf_gradcam.display import render_png

        return render_png(self)

    def _repr_html_(self) -> str | None:
        """Jupyter display: a summary line, the gradient panels and a score table."""
        from tf_gradcam.display import render_html

        return render_html(self)


# ------------------------------------------------------------ the engines


def _input_gradients(tape: tf.GradientTape, columns: list, image: tf.Tensor) -> tf.Tensor:
    """`(batch, k, height, width, channels)` gradients of each score column."""
    grads = [tape.gradient(column, image) for column in columns]
    if any(g is None for g in grads):
        raise NoGradientError(
            "The target score does not depend on the image input (no gradient path), "
            f"or the input is not a float tensor (dtype {image.dtype.name})."
        )
    return tf.stack([tf.cast(g, tf.float32) for g in grads], axis=1)


class _InputGradients(Engine):
    """∂y^c/∂x with respect to the image input, through the model's (modified) ReLUs.

    A method over the shared engine (input checks, targets, compiled steps);
    its gradient model exposes no layer.
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        logits: bool = True,
        output: int | str | None = None,
        call_override: CallOverride | None = None,
    ) -> None:
        super().__init__(
            model,
            lambda sample_shape: build_gradient_model(
                model,
                None,
                logits=logits,
                expose_layer=False,
                call_override=call_override,
                sample_shape=sample_shape,
            ),
            output=output,
        )

    def _explain_batch(self, inputs: Any, classes: tf.Tensor, spec: TargetSpec) -> dict:
        image = self.gradient_model.image(inputs)
        with tf.GradientTape(persistent=spec.k > 1) as tape:
            tape.watch(image)
            _, outputs = self.gradient_model(inputs)
            scores, resolved = self.target_scores(outputs, classes, spec)
            columns = score_columns(scores, spec)
        gradients = _input_gradients(tape, columns, image)
        del tape
        if spec.kind != "top_k":
            scores, resolved = scores[:, None], resolved[:, None]
        return {
            "gradients": gradients,
            "scores": tf.cast(scores, tf.float32),
            "classes": resolved,
        }


class _FusedGradCAM(GradCAM):
    """Grad-CAM and the modified-ReLU input gradients from one forward pass.

    The gradient model already runs the modified ReLUs (their forward is the
    plain one). Grad-CAM's gradients are taken with the true ReLU backward
    (`true_relu_gradients`), the input gradients, from an outer tape over the
    same forward pass, with the guided/deconv backward.
    """

    def _explain_batch(self, inputs: Any, classes: tf.Tensor, spec: TargetSpec) -> dict:
        image = self.gradient_model.image(inputs)
        with tf.GradientTape(persistent=spec.k > 1) as tape:
            tape.watch(image)
            with true_relu_gradients():
                result = super()._explain_batch(inputs, classes, spec)
            columns = [result["scores"][:, j] for j in range(spec.k)]
        backprop = _input_gradients(tape, columns, image)
        del tape
        result["backprop"] = backprop
        # heatmaps (batch, k, *spatial) broadcast over the image's channel axis
        channel_axis = 2 if self.gradient_model.image_channels_first else -1
        result["gradients"] = backprop * tf.expand_dims(result["heatmaps"], channel_axis)
        return result


# ------------------------------------------------------------ public classes


class _OverriddenMethod:
    """What the public modified-backprop methods share: the ReLU override and the engine."""

    relu_override: ReluOverride
    _engine: GradCAM

    @property
    def replaced(self) -> tuple[str, ...]:
        """Names of the layers whose ReLU backward pass was replaced."""
        return self.relu_override.replaced

    @property
    def trace_count(self) -> int:
        """How many times the compiled step has been traced (for retrace checks)."""
        return self._engine.trace_count


class _ModifiedBackprop(_OverriddenMethod):
    """Gradients of the target score w.r.t. the image through modified ReLUs."""

    _mode = "guided"

    def __init__(
        self,
        model: keras.Model,
        *,
        logits: bool = True,
        output: int | str | None = None,
        strict: bool = False,
    ) -> None:
        self.model = model
        self.relu_override = ReluOverride(model, self._mode, strict=strict)
        self._engine = _InputGradients(
            model, logits=logits, output=output, call_override=self.relu_override
        )

    def compute(self, images: Any, target: Target = None) -> PixelExplanation:
        """Like calling the object, but returns `tf.Tensor` fields.

        Args:
            images: `(batch, height, width, channels)` array or tensor; a
                list/dict of arrays for multi-input models (gradients are taken
                with respect to the first 4-D input).
            target: what to explain; see `tf_gradcam.targets`.

        Returns:
            A `PixelExplanation` with `tf.Tensor` fields and `cam=None`.

        Raises:
            InputError: wrong rank, shape, channels or non-finite values.
            TargetError: class out of range or unsupported target.
            NoGradientError: the target does not depend on the image input.

        Example:
            >>> gradients = method.compute(images, target=3).gradients
        """
        result, spec = self._engine._run(images, target)
        return PixelExplanation(
            gradients=result["gradients"],
            backprop=result["gradients"],
            cam=None,
            scores=result["scores"],
            classes=None if spec.kind == "callable" else result["classes"],
        )

    def __call__(self, images: Any, target: Target = None) -> PixelExplanation:
        """Explain a batch of images.

        Args:
            images: `(batch, height, width, channels)` array (a single image is
                treated as a batch of one); a list/dict of arrays for
                multi-input models.
            target: `None` (predicted class), an int, one int per image,
                `TopK(k)`, or a callable `outputs -> (batch,)` score.

        Returns:
            A `PixelExplanation` of NumPy arrays; `.gradients` is
            `(batch, height, width, channels)` float32.

        Raises:
            InputError: wrong rank, shape, channels or non-finite values.
            TargetError: class out of range or unsupported target.
            NoGradientError: the target does not depend on the image input.

        Example:
            >>> method(images, target=[3, 5]).gradients.shape   # (2, H, W, C)
        """
        return self.compute(images, target).numpy()


class GuidedBackprop(_ModifiedBackprop):
    """Guided Backpropagation (Springenberg et al.; paper §3.2, Fig. 1b).

    The gradient of the target score y^c (before the softmax, as in Grad-CAM)
    with respect to the input pixels, where every ReLU passes a gradient only
    where its forward input was positive and the incoming gradient is positive.
    High-resolution but, the paper notes, hardly class-discriminative.

    The ReLUs are replaced only in this object's gradient graph (nested
    models and ReLU6 included); the user's model is not modified. Batched and
    compiled once per target kind and image shape.

    Args:
        model: a Functional or Sequential `keras.Model`.
        logits: explain the score before a trailing softmax/sigmoid (default).
        output: for multi-output models, which output class targets index.
        strict: refuse models with activations guided backprop does not define
            (swish, GELU…) instead of warning once.

    Raises:
        UnsupportedModelError: subclassed model.
        UnsupportedActivationError: `strict=True` and such activations exist.

    Example:
        >>> gb = tf_gradcam.GuidedBackprop(model)
        >>> gb(images, target=281).gradients.shape      # (batch, H, W, 3)
    """

    _mode = "guided"


class Deconvolution(_ModifiedBackprop):
    """Deconvolution (Zeiler & Fergus), the paper's Table 2 baseline.

    Like `GuidedBackprop`, but every ReLU passes all positive incoming
    gradients, whatever its forward input.

    Args:
        model: a Functional or Sequential `keras.Model`.
        logits: explain the score before a trailing softmax/sigmoid (default).
        output: for multi-output models, which output class targets index.
        strict: refuse models with activations deconvolution does not define.

    Raises:
        UnsupportedModelError: subclassed model.
        UnsupportedActivationError: `strict=True` and such activations exist.

    Example:
        >>> tf_gradcam.Deconvolution(model)(images).gradients.shape  # (batch, H, W, C)
    """

    _mode = "deconv"


class _ModifiedGradCAM(_OverriddenMethod):
    """Modified-backprop gradients times the upsampled Grad-CAM map."""

    _mode = "guided"

    def __init__(
        self,
        model: keras.Model,
        layer: str | keras.layers.Layer | None = None,
        *,
        pooling: str = "mean",
        counterfactual: bool = False,
        absolute_gradients: bool = False,
        logits: bool = True,
        output: int | str | None = None,
        strict: bool = False,
    ) -> None:
        self.model = model
        self.relu_override = ReluOverride(model, self._mode, strict=strict)
        self._engine = _FusedGradCAM(
            model,
            layer,
            pooling=pooling,
            counterfactual=counterfactual,
            absolute_gradients=absolute_gradients,
            logits=logits,
            output=output,
            call_override=self.relu_override,
        )

    @property
    def layer(self) -> str:
        """Path of the layer Grad-CAM explains."""
        return self._engine.layer

    def compute(self, images: Any, target: Target = None) -> PixelExplanation:
        """Like calling the object, but returns `tf.Tensor` fields.

        Args:
            images: `(batch, height, width, channels)` array or tensor; a
                list/dict for multi-input models.
            target: what to explain; see `tf_gradcam.targets`.

        Returns:
            A `PixelExplanation` with `tf.Tensor` fields.

        Raises:
            InputError: wrong rank, shape, channels or non-finite values.
            TargetError: class out of range or unsupported target.
            NoGradientError: the target does not depend on the layer or image.

        Example:
            >>> fused = method.compute(images, target=3).gradients
        """
        result, spec = self._engine._run(images, target)
        cam = self._engine.to_explanation(result, spec)
        return PixelExplanation(
            gradients=result["gradients"],
            backprop=result["backprop"],
            cam=cam,
            scores=cam.scores,
            classes=cam.classes,
        )

    def __call__(self, images: Any, target: Target = None) -> PixelExplanation:
        """Explain a batch of images.

        Args:
            images: `(batch, height, width, channels)` array (a single image is
                a batch of one); a list/dict of arrays for multi-input models.
            target: `None` (predicted class), an int, one int per image,
                `TopK(k)`, or a callable `outputs -> (batch,)` score.

        Returns:
            A `PixelExplanation` of NumPy arrays: `.gradients` the fused
            `(batch, height, width, channels)` float32 image, `.backprop` and
            `.cam` its two factors.

        Raises:
            InputError: wrong rank, shape, channels or non-finite values.
            TargetError: class out of range or unsupported target.
            NoGradientError: the target does not depend on the layer or image.

        Example:
            >>> result = method(images, target=[281, 242])
            >>> result.gradients.shape                     # (2, H, W, 3)
        """
        return self.compute(images, target).numpy()


class GuidedGradCAM(_ModifiedGradCAM):
    """Guided Grad-CAM: Guided Backpropagation ⊙ upsampled Grad-CAM (paper §3.2, Fig. 1d).

    High-resolution *and* class-discriminative. One forward pass serves both
    factors: Grad-CAM's gradients are taken with the true ReLU backward pass,
    the pixel gradients with the guided one.

    Departure from the paper: the guided-backprop image is multiplied by the
    Grad-CAM map bilinearly upsampled **and divided by its maximum**
    (`Explanation.heatmaps`, in [0, 1]) rather than by the raw upsampled L^c.
    The two differ by one positive factor per image, so the picture after
    `normalize_gradients` and any mass ratio are the same; the values stay in
    the range of the guided gradients. An all-zero Grad-CAM map gives an
    all-zero result.

    Args:
        model: a Functional or Sequential `keras.Model`.
        layer: the convolutional layer Grad-CAM explains (name, path, `Layer`
            or `None` for the last 4-D one).
        pooling: Grad-CAM's gradient pooling, `"mean"` (eq. 1) or `"max"`.
        counterfactual: counterfactual Grad-CAM map (§3.3) as the factor.
        absolute_gradients: Grad-CAM with `|∂y^c/∂A|` (Table 3).
        logits: explain the score before a trailing softmax/sigmoid (default).
        output: for multi-output models, which output class targets index.
        strict: refuse models with activations guided backprop does not define.

    Raises:
        The errors of `GradCAM`; UnsupportedActivationError with `strict=True`.

    Example:
        >>> ggc = tf_gradcam.GuidedGradCAM(model, layer="block5_conv3")
        >>> result = ggc(images, target=[281, 242])
        >>> result.gradients.shape, result.cam.heatmaps.shape  # (2, H, W, 3), (2, H, W)
    """

    _mode = "guided"


class DeconvolutionGradCAM(_ModifiedGradCAM):
    """Deconvolution Grad-CAM: Deconvolution ⊙ upsampled Grad-CAM (Table 2 baseline).

    As `GuidedGradCAM` (same normalised-heatmap factor), with deconvolution's
    backward rule for the pixel gradients.

    Args:
        model: a Functional or Sequential `keras.Model`.
        layer: the convolutional layer Grad-CAM explains.
        pooling: Grad-CAM's gradient pooling.
        counterfactual: counterfactual Grad-CAM map (§3.3) as the factor.
        absolute_gradients: Grad-CAM with `|∂y^c/∂A|`.
        logits: explain the score before a trailing softmax/sigmoid (default).
        output: for multi-output models, which output class targets index.
        strict: refuse models with activations deconvolution does not define.

    Raises:
        The errors of `GradCAM`; UnsupportedActivationError with `strict=True`.

    Example:
        >>> tf_gradcam.DeconvolutionGradCAM(model)(images, target=3).gradients
    """

    _mode = "deconv"
