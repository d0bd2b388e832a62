"""Gradient-free CAM methods: Score-CAM and Ablation-CAM.

Both weigh the channels of a layer's activations `A` (batch, h, w, C) by extra
forward passes instead of gradients, then end like Grad-CAM:
`ReLU(Σ_k w_k A^k)`, upsampled and normalised (`_GradCAMSteps.finish_maps`).

- `ScoreCAM` masks the *input image* with each channel's upsampled, min-max
  normalised map and scores the masked images.
- `AblationCAM` zeroes each channel of the *activations* and scores what the
  rest of the model (its "head", the graph from the layer to the outputs)
  makes of them.

One explanation costs `batch × C` such passes. They run inside the compiled
step, `batch_size` images at a time, in a `tf.while_loop` whose iterations run
one after the other, so memory grows with `batch_size`, not with `batch × C`;
the targets (`None`, ints, `TopK(k)`, callables) are those of every method,
and one set of passes scores all `k` classes of `TopK(k)` at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_gradcam.errors import UnsupportedModelError
from tf_gradcam.gradcam import GradCAM
from tf_gradcam.image import upsample_maps
from tf_gradcam.targets import TargetSpec

__all__ = ["AblationCAM", "ScoreCAM"]


def _check_batch_size(batch_size: Any, *, name: str = "batch_size") -> int:
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        what = (
            "how many masked or ablated images one forward pass scores (memory grows with "
            "it), e.g. batch_size=32"
            if name == "batch_size"
            else "how many channels of each image to score, e.g. max_channels=128"
        )
        raise ValueError(
            f"`{name}` must be a positive integer: {what}. Received: {name}={batch_size!r}."
        )
    return int(batch_size)


def _channel_count(activations: tf.Tensor) -> Any:
    """The channels of `(batch, h, w, C)` activations: static when known."""
    static = activations.shape[-1]
    return static if static is not None else tf.shape(activations)[-1]


class _PerturbationCAM(GradCAM):
    """A CAM whose channel weights come from extra forward passes, run in chunks.

    Grad-CAM's ending (ReLU → upsampling → normalisation, `Explanation`) and
    engine (inputs, targets, compiled steps), without its gradient options.

    Args:
        model: a Functional or Sequential `keras.Model`.
        layer: the layer to explain, as in `GradCAM`.
        batch_size: images per extra forward pass (memory grows with it).
        relu: apply the ReLU to `Σ_k w_k A^k`.
        logits: read the target scores before a trailing softmax/sigmoid.
        output: for multi-output models, which output class targets index.
        jit_compile: compile the step with XLA.

    Raises:
        ValueError: `batch_size` is not a positive integer.
        The errors of `GradCAM`.
    """

    def __init__(
        self,
        model: keras.Model,
        layer: str | keras.layers.Layer | None = None,
        *,
        batch_size: int = 32,
        relu: bool = True,
        logits: bool = True,
        output: int | str | None = None,
        jit_compile: bool = False,
    ) -> None:
        self.batch_size = _check_batch_size(batch_size)
        super().__init__(
            model, layer, relu=relu, logits=logits, output=output, jit_compile=jit_compile
        )

    def _in_chunks(self, count: Any, scores: Callable[[tf.Tensor], tf.Tensor], k: int) -> tf.Tensor:
        """`scores(index)` over `index = 0 .. count-1`, `batch_size` at a time: `(count, k)`.

        Every chunk has the same size, `min(batch_size, count)`, so the loop body
        has one shape (XLA needs it); the last chunk repeats the last index where
        it runs past `count`, and those rows are dropped. The iterations run one
        after the other (`parallel_iterations=1`): one chunk's tensors at a time.
        """
        count = tf.cast(count, tf.int32)
        chunk = tf.maximum(tf.minimum(self.batch_size, count), 1)
        steps = (count + chunk - 1) // chunk
        results = tf.TensorArray(
            tf.float32, size=steps, element_shape=tf.TensorShape([None, k]), infer_shape=False
        )

        def body(step: tf.Tensor, results: tf.TensorArray) -> tuple:
            index = tf.minimum(step * chunk + tf.range(chunk), count - 1)
            return step + 1, results.write(step, tf.cast(scores(index), tf.float32))

        _, results = tf.while_loop(
            lambda step, _: step < steps,
            body,
            (tf.constant(0), results),
            parallel_iterations=1,
        )
        return results.concat()[:count]

    def _class_scores(
        self, outputs: Any, classes: tf.Tensor, spec: TargetSpec, *, probabilities: bool
    ) -> tf.Tensor:
        """Scores `(n, k)` of each row's own classes `(n, k)` in `outputs` (or a callable's).

        The classes are those resolved on the unperturbed images (a `TopK` target
        keeps them), never re-chosen on the perturbed ones. `probabilities` takes a
        softmax over the scored output's classes first; a callable's score is used
        as it is.
        """
        if spec.kind == "callable":
            scores, _ = self.target_scores(outputs, classes[:, 0], spec)
            return tf.cast(scores, tf.float32)[:, None]
        scored = tf.cast(self._scored_output(outputs), tf.float32)
        if probabilities:
            scored = tf.nn.softmax(scored, axis=-1)
        return tf.gather(scored, classes, axis=1, batch_dims=1)

    def _gathered(self, inputs: Any, owner: tf.Tensor) -> list:
        """The flattened inputs of the images `owner` (one row per index)."""
        return [tf.gather(leaf, owner) for leaf in keras.tree.flatten(inputs)]

    def _finish(
        self,
        inputs: Any,
        activations: tf.Tensor,
        weights: tf.Tensor,
        scores: tf.Tensor,
        resolved: tf.Tensor,
    ) -> dict:
        raw = self.weighted_sum(activations, None, weights)
        return self.finish_maps(inputs, raw, weights, scores, resolved)


class ScoreCAM(_PerturbationCAM):
    """Score-CAM (Wang et al., CVPR-W 2020): channels weighted by the score of the masked input.

    For each channel k of the layer's activations A (per image):
    `H^k = s(Up(A^k))` (eq. 7), the map bilinearly upsampled to the image size
    (half-pixel centres, as `Explanation.heatmaps`), then min-max normalised
    to [0, 1] (eq. 8; a constant map gives the all-zero mask, never NaN); the
    channel-wise increase of confidence (Def. 4, eq. 6)
    `C(A^k) = f^c(X ∘ H^k) − f^c(X_b)`, with `X ∘ H^k` the image multiplied by
    the mask and `X_b` the baseline; Algorithm 1's weights
    `α_k = exp(C(A^k)) / Σ_j exp(C(A^j))` (`channel_softmax=True`, so that
    `Σ_k α_k = 1`; the baseline term then cancels, and its pass is skipped) or
    `α_k = C(A^k)` (eq. 10, `channel_softmax=False`); and the map
    `ReLU(Σ_k α_k A^k)` (eq. 9) at the layer's resolution.

    `f^c` is the probability of class c (§3.2, Fig. 5: "post-softmax"): a softmax
    over the classes of the scored output, taken on the scores before the
    model's softmax (`logits=True`). Algorithm 1's comment calls `f^c` "the
    logit of class c" instead: `probabilities=False` uses the pre-softmax score.
    Probabilities lie in [0, 1], so under the channel softmax every α_k stays
    within a factor e of the others: with many channels the weights are close
    to uniform (the map is then close to the channels' mean, reweighted by
    small differences); `probabilities=False` or `channel_softmax=False`
    spread them more. A sigmoid (multi-label) head is treated like a softmax
    head: `f^c` is a softmax over the classes of the sigmoid's inputs, so the
    classes compete, as they do for the paper; for the independent probability
    of one label use a callable target, e.g.
    `target=lambda out: tf.sigmoid(out[:, c])` (a callable's score is used as
    it is, never passed through a softmax).
    Only the image input is masked (the one the layer is computed from, in its
    own layout); other inputs of a multi-input model are passed unchanged.
    `Explanation.weights` holds α and `Explanation.scores` the unmasked target
    scores y^c (before the softmax when `logits=True`).

    Peers differ (read at the commits named):

    - the authors' code (haofanwang/Score-CAM, `cam/scorecam.py` @80326cb,
      `cam/scorecam_batch.py` @af83b03) weighs each channel by the softmax
      probability of the masked image itself: no baseline, no softmax over
      channels (`probabilities=True, channel_softmax=False, baseline=None`,
      `logits=True` here); it skips constant channels (weight 0) and sums the
      *upsampled* activations, applying the ReLU at the image's resolution;
    - pytorch-grad-cam (`score_cam.py` @00711a2) takes a softmax over channels
      of the target's score of each masked image, by default
      (`ClassifierOutputTarget`) the raw logit: `probabilities=False` here (the
      baseline cancels). It upsamples with `UpsamplingBilinear2d`
      (`align_corners=True`, not half-pixel centres) and divides by
      `max − min + 1e-8`;
    - tf-keras-vis (`tf_keras_vis/scorecam.py` @cf84899) scores
      `score(softmax(model(masked)))` with no baseline and no channel softmax
      (the softmax is applied to the model's outputs as they are: a second one
      on a model that still ends in a softmax), upsamples with
      `scipy.ndimage.zoom(order=1)`, masks *every* input of a multi-input
      model, divides by `max − min + 1e-7`, and optionally keeps only the
      `max_N` channels of largest standard deviation (Faster Score-CAM).

    Args:
        model: a Functional or Sequential `keras.Model`.
        layer: the layer to explain, as in `GradCAM`.
        batch_size: masked images per forward pass; memory grows with it, not
            with `batch × channels`. An explanation costs `batch × channels`
            passes (`TopK(k)` no more than one class).
        channel_softmax: normalise the increases with a softmax over channels
            (Algorithm 1); `False` uses the increases themselves (eq. 10).
        probabilities: `f^c` is the class probability (§3.2); `False` uses the
            score before the softmax (Algorithm 1's comment, pytorch-grad-cam).
        max_channels: score only each image's `max_channels` channels of largest
            spatial standard deviation; the others weigh 0 (and are left out of
            the channel softmax). `None` (default) scores every channel, as the
            paper. Faster Score-CAM's selection (tf-keras-vis `max_N`): the cost
            drops to `batch × max_channels` passes.
        baseline: `X_b`, a number or an array broadcastable to the image batch
            (in the image's layout); `None` drops the `f^c(X_b)` term, as the
            authors' code. No effect with `channel_softmax=True`.
        relu: apply the ReLU of eq. 9.
        logits: read the scores before a trailing softmax/sigmoid (default);
            `False` reads the model's outputs as they are and then needs
            `probabilities=False` (a softmax head would be applied twice).
        output: for multi-output models, which output class targets index.
        jit_compile: compile the step with XLA.

    Raises:
        ValueError: `batch_size` not a positive integer, a non-finite
            `baseline`, or `logits=False` with `probabilities=True`.
        The errors of `GradCAM`; calls raise `InputError` when no input is a
        4-D image.

    Example:
        >>> cam = tf_gradcam.ScoreCAM(model, "conv5_block3_out", batch_size=64)
        >>> result = cam(images, target=281)
        >>> result.weights.shape                    # (batch, channels), summing to 1
    """

    def __init__(
        self,
        model: keras.Model,
        layer: str | keras.layers.Layer | None = None,
        *,
        batch_size: int = 32,
        channel_softmax: bool = True,
        probabilities: bool = True,
        max_channels: int | None = None,
        baseline: float | np.ndarray | None = 0.0,
        relu: bool = True,
        logits: bool = True,
        output: int | str | None = None,
        jit_compile: bool = False,
    ) -> None:
        if probabilities and not logits:
            raise ValueError(
                "`probabilities=True` takes a softmax of the scores before the model's "
                "softmax; with `logits=False` a softmax head would be applied twice. Keep "
                "logits=True (the default), or pass probabilities=False to use the model's "
                "outputs as they are. Received: logits=False, probabilities=True."
            )
        if baseline is not None:
            array = np.asarray(baseline, np.float32)
            if not np.all(np.isfinite(array)):
                raise ValueError(
                    "`baseline` must be finite numbers (or None for no baseline term). "
                    f"Received: baseline with shape {array.shape}."
                )
            baseline = array
        if max_channels is not None:
            max_channels = _check_batch_size(max_channels, name="max_channels")
        self.max_channels = max_channels
        self.channel_softmax = bool(channel_softmax)
        self.probabilities = bool(probabilities)
        self.baseline = baseline
        super().__init__(
            model,
            layer,
            batch_size=batch_size,
            relu=relu,
            logits=logits,
            output=output,
            jit_compile=jit_compile,
        )

    def _explain_batch(self, inputs: Any, classes: tf.Tensor, spec: TargetSpec) -> dict:
        activations, _, scores, resolved = self.forward(inputs, classes, spec)
        selected = self.selected_channels(activations)  # (n, N) or None
        confidence = self.masked_scores(inputs, activations, resolved, spec, selected)
        if self.channel_softmax:
            weights = tf.nn.softmax(confidence, axis=-1)  # f^c(X_b) cancels
        else:
            weights = confidence
            if self.baseline is not None:
                weights -= self.baseline_scores(inputs, resolved, spec)[..., None]
        if selected is not None:  # the other channels weigh 0
            weights = _scatter_channels(weights, selected, _channel_count(activations))
        return self._finish(inputs, activations, weights, scores, resolved)

    def selected_channels(self, activations: tf.Tensor) -> tf.Tensor | None:
        """With `max_channels`, each image's channels of largest spatial standard deviation.

        Returns:
            int32 `(batch, max_channels)` channel indices, in decreasing order of
            standard deviation, or `None` when every channel is used.
        """
        channels = activations.shape[-1]
        if self.max_channels is None or (channels is not None and self.max_channels >= channels):
            return None
        spread = tf.math.reduce_std(activations, axis=list(range(1, activations.shape.rank - 1)))
        return tf.math.top_k(spread, k=self.max_channels).indices

    def masked_scores(
        self,
        inputs: Any,
        activations: tf.Tensor,
        resolved: tf.Tensor,
        spec: TargetSpec,
        selected: tf.Tensor | None = None,
    ) -> tf.Tensor:
        """`f^c(X ∘ H^k)` for every image, target and channel: `(batch, k, channels)`.

        Args:
            inputs: the prepared inputs (the structure of the model's inputs).
            activations: `(batch, h, w, channels)` float32, channels-last.
            resolved: `(batch, k)` int32 classes of the targets.
            spec: the target.
            selected: `(batch, N)` channels to score (`selected_channels`), or
                `None` for all; the result then has `N` columns, in that order.
        """
        gradient_model = self.gradient_model
        position = gradient_model.image_index
        gradient_model.image(inputs)  # InputError when no input is an image
        first = gradient_model.image_channels_first
        size = gradient_model.image_size(inputs)
        channels = _channel_count(activations)
        shape = tf.shape(activations)
        rank = activations.shape.rank
        # (batch·C, h, w): row i·C + k is channel k of image i (any number of spatial axes)
        maps = tf.reshape(
            tf.transpose(activations, [0, rank - 1, *range(1, rank - 1)]),
            tf.concat([[-1], shape[1:-1]], axis=0),
        )

        scored = channels if selected is None else tf.shape(selected)[1]

        def scores(index: tf.Tensor) -> tf.Tensor:
            owner = index // scored
            if selected is None:
                rows = index
            else:  # the (index % N)-th selected channel of image `owner`
                rows = owner * channels + tf.gather_nd(
                    selected, tf.stack([owner, index % scored], axis=1)
                )
            masks = upsample_maps(tf.gather(maps, rows), size)  # (chunk, H, W)
            masks = _min_max(masks, axes=rank - 2)
            leaves = self._gathered(inputs, owner)
            leaves[position] = _masked(
                leaves[position], masks[:, None] if first else masks[..., None]
            )
            _, outputs = gradient_model(keras.tree.pack_sequence_as(gradient_model.inputs, leaves))
            return self._class_scores(
                outputs, tf.gather(resolved, owner), spec, probabilities=self.probabilities
            )

        k = resolved.shape[1]
        flat = self._in_chunks(shape[0] * scored, scores, k)  # (batch·C, k)
        return tf.transpose(tf.reshape(flat, [shape[0], scored, k]), [0, 2, 1])

    def baseline_scores(self, inputs: Any, resolved: tf.Tensor, spec: TargetSpec) -> tf.Tensor:
        """`f^c(X_b)` `(batch, k)`: the image replaced by the baseline, other inputs kept."""
        gradient_model = self.gradient_model
        leaves = keras.tree.flatten(inputs)
        image = gradient_model.image(inputs)
        baseline = tf.broadcast_to(tf.constant(self.baseline, tf.float32), tf.shape(image))
        leaves[gradient_model.image_index] = _cast_like(baseline, image)
        _, outputs = gradient_model(keras.tree.pack_sequence_as(gradient_model.inputs, leaves))
        return self._class_scores(outputs, resolved, spec, probabilities=self.probabilities)


class AblationCAM(_PerturbationCAM):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020): channels weighted by the drop when removed.

    `w_k = (y^c − y^c_k) / y^c`, where y^c is the target score (before the
    softmax with `logits=True`) and y^c_k the score with channel k of the
    layer's activations set to zero and everything else unchanged: the rest of
    the model runs on the ablated activations, while branches that bypass the
    layer (skip connections from the inputs or from earlier layers, other
    inputs of a multi-input model) see the original values. The map is
    `ReLU(Σ_k w_k A^k)` at the layer's resolution: w_k is the fraction of the
    score lost without channel k.

    y^c = 0 gives every channel weight 0 (an all-zero map), never NaN. For a
    negative y^c the formula is used as it is, so the signs flip: a channel
    whose removal lowers the score (y^c_k < y^c) gets a *negative* weight and
    one that raises it a positive weight; for a negative target score the map
    shows where removing the features would raise the score. pytorch-grad-cam
    (`ablation_cam.py` @0bb5d5a) divides by y^c the same way, with no guard for
    y^c = 0 (the weights become inf or NaN); its `AblationLayer`
    (`ablation_layer.py` @099c8fe) sets the channel to zero only when the
    activations' minimum is 0, and to `min − 1e7` otherwise (e.g. after a
    BatchNorm without ReLU); this class always uses zero, as in the paper.

    `Explanation.weights` holds w and `Explanation.scores` y^c.

    Args:
        model: a Functional or Sequential `keras.Model`.
        layer: the layer to explain, as in `GradCAM`.
        batch_size: ablated activations per forward pass of the model's head;
            memory grows with it, not with `batch × channels`. An explanation
            costs `batch × channels` passes of the part of the model after the
            layer (`TopK(k)` no more than one class).
        relu: apply the ReLU to `Σ_k w_k A^k`.
        logits: y^c before a trailing softmax/sigmoid (default); `False` uses
            the model's outputs (probabilities) as they are.
        output: for multi-output models, which output class targets index.
        jit_compile: compile the step with XLA.

    Raises:
        ValueError: `batch_size` is not a positive integer.
        The errors of `GradCAM`.

    Example:
        >>> cam = tf_gradcam.AblationCAM(model, "conv5_block3_out")
        >>> cam(images, target=tf_gradcam.TopK(3)).heatmaps.shape  # (batch, 3, H, W)
    """

    _head: keras.Model | None = None
    _head_of: Any = None

    def head_model(self) -> keras.Model:
        """The model after the layer: `[*flat inputs, activations] -> flat outputs`.

        Built once from the gradient model's own graph (its activations output
        becomes an input), so it shares the user's layers and weights and never
        modifies the user's model. Its outputs are the gradient model's (before
        a trailing softmax when `logits=True`).
        """
        gradient_model = self.gradient_model
        if self._head_of is not gradient_model:
            graph = gradient_model.keras_model
            if gradient_model.layout is not None:
                raise UnsupportedModelError(
                    f"Ablation-CAM re-runs the layers after {self.layer!r} on ablated "
                    "activations, and that layer outputs transformer tokens laid on a grid "
                    "(the ablated grid is not put back into tokens). Use GradCAM, EigenCAM "
                    "or ScoreCAM on token layers."
                )
            if graph is None:
                raise UnsupportedModelError(
                    f"Ablation-CAM re-runs the layers after {self.layer!r} on ablated "
                    f"activations, which needs a Keras 3 functional graph; model "
                    f"{self.model.name!r} is run as it is (a subclassed keras.Model, whose "
                    "call() cannot be entered midway, or a tf.keras 2 model). Use GradCAM, "
                    "EigenCAM or ScoreCAM, or rebuild it as a Keras 3 functional model."
                )
            with tf.init_scope():
                self._head = keras.Model(
                    [*graph.inputs, graph.outputs[0]],
                    list(graph.outputs[1:]),
                    name=f"{self.model.name}_ablation_head",
                )
            self._head_of = gradient_model
        return self._head

    def _explain_batch(self, inputs: Any, classes: tf.Tensor, spec: TargetSpec) -> dict:
        activations, _, scores, resolved = self.forward(inputs, classes, spec)
        ablated = self.ablated_scores(inputs, activations, resolved, spec)  # (n, k, C)
        weights = tf.math.divide_no_nan(scores[..., None] - ablated, scores[..., None])
        return self._finish(inputs, activations, weights, scores, resolved)

    def ablated_scores(
        self, inputs: Any, activations: tf.Tensor, resolved: tf.Tensor, spec: TargetSpec
    ) -> tf.Tensor:
        """y^c_k for every image, target and channel: `(batch, k, channels)`.

        Args:
            inputs: the prepared inputs (the structure of the model's inputs).
            activations: `(batch, h, w, channels)` float32, channels-last.
            resolved: `(batch, k)` int32 classes of the targets.
            spec: the target.
        """
        gradient_model = self.gradient_model
        head = self.head_model()
        first = gradient_model.channels_first
        channels = _channel_count(activations)
        rank = activations.shape.rank
        native = (
            tf.transpose(activations, [0, rank - 1, *range(1, rank - 1)]) if first else activations
        )
        native = tf.cast(native, head.inputs[-1].dtype)  # exact: float32 came from it

        def scores(index: tf.Tensor) -> tf.Tensor:
            owner = index // channels
            keep = tf.not_equal(tf.range(channels)[None], (index % channels)[:, None])  # (chunk, C)
            spatial = (None,) * (rank - 2)
            keep = (
                keep[(slice(None), slice(None), *spatial)]
                if first
                else keep[(slice(None), *spatial, slice(None))]
            )
            kept = tf.gather(native, owner)
            values = head(
                [*self._gathered(inputs, owner), kept * tf.cast(keep, kept.dtype)],
                training=False,
            )
            flat = list(values) if isinstance(values, (list, tuple)) else [values]
            outputs = keras.tree.pack_sequence_as(gradient_model.output_structure, flat)
            return self._class_scores(
                outputs, tf.gather(resolved, owner), spec, probabilities=False
            )

        shape = tf.shape(activations)
        k = resolved.shape[1]
        flat = self._in_chunks(shape[0] * channels, scores, k)  # (batch·C, k)
        return tf.transpose(tf.reshape(flat, [shape[0], channels, k]), [0, 2, 1])


def _min_max(masks: tf.Tensor, *, axes: int = 2) -> tf.Tensor:
    """Each `(h, w)` map (`axes` trailing axes) scaled to [0, 1]; a constant map becomes all zeros
    (eq. 8)."""
    spatial = list(range(-axes, 0))
    low = tf.reduce_min(masks, axis=spatial, keepdims=True)
    span = tf.reduce_max(masks, axis=spatial, keepdims=True) - low
    ok = span > 0
    return tf.where(ok, (masks - low) / tf.where(ok, span, tf.ones_like(span)), 0.0)


def _cast_like(values: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """float32 `values` in `like`'s dtype (rounded first for integer images)."""
    if like.dtype.is_integer:
        values = tf.round(values)
    return tf.cast(values, like.dtype)


def _masked(image: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """`image ∘ mask`, computed in float32 and returned in the image's dtype."""
    return _cast_like(tf.cast(image, tf.float32) * mask, image)


def _scatter_channels(weights: tf.Tensor, selected: tf.Tensor, channels: Any) -> tf.Tensor:
    """`(n, k, N)` weights of the `selected` `(n, N)` channels as `(n, k, C)`, 0 elsewhere."""
    one_hot = tf.one_hot(selected, channels, dtype=weights.dtype)  # (n, N, C)
    return tf.reduce_sum(weights[..., None] * one_hot[:, None], axis=2)
