"""Smoothing for any CAM method: noisy copies (SmoothGrad) and horizontal flips.

SmoothGrad (Smilkov et al., 2017) averages an explanation over copies of the
image with Gaussian noise added; test-time augmentation averages over
transformed copies, each copy's map transformed back first. `Smoothed` wraps
any explainer of the CAM family (`GradCAM`, `GradCAMPlusPlus`, `ScoreCAM`...)
and does both. The target is resolved once, on the original images, so every
copy explains the same class even where the noise changes the prediction.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import keras
import numpy as np

from tf_gradcam.gradcam import Explanation
from tf_gradcam.image import normalize_maps
from tf_gradcam.targets import Target

__all__ = ["Smoothed"]


class Smoothed:
    """Average a CAM method's explanations over noisy and flipped copies of the images.

    For each of `samples` copies, Gaussian noise of standard deviation
    `noise × (max − min)` of each image is added to the image input (SmoothGrad's
    noise level, as a fraction of the image's value range); with `flips=True`
    each copy is also explained mirrored left–right, and its maps are mirrored
    back before averaging. `heatmaps` are the mean of the copies' heatmaps,
    scaled again into [0, 1] (an all-zero mean stays zero); `maps`,
    `raw_maps` and `weights` are the copies' means; `scores` are the mean of
    the copies' target scores. Mirroring back at the layer's resolution is exact
    when the layer's grid is symmetric under the mirror (same padding on both
    sides), and otherwise off by at most one cell.

    Noise comes from `numpy.random.default_rng(seed)`, restarted on every call:
    the same images give the same result every time.

    Args:
        explainer: a CAM-family explainer (returns `Explanation`).
        noise: noise level, a fraction of each image's value range (0 for none).
        samples: number of noisy copies (1 when `noise=0`).
        flips: also explain each copy mirrored left–right.
        seed: seed of the noise.

    Raises:
        ValueError: `samples < 1`, `noise < 0`, several identical copies
            (`samples > 1` with `noise=0`), or an explainer that is not of
            the CAM family.

    Example:
        >>> smooth = Smoothed(tf_gradcam.GradCAM(model), noise=0.1, samples=8, flips=True)
        >>> smooth(images, target=3).heatmaps
    """

    def __init__(
        self,
        explainer: Any,
        *,
        noise: float = 0.0,
        samples: int = 1,
        flips: bool = False,
        seed: int = 0,
    ) -> None:
        if not hasattr(explainer, "resolve_classes") or not hasattr(explainer, "gradient_model"):
            raise ValueError(
                "`Smoothed` wraps a CAM-family explainer (GradCAM, GradCAMPlusPlus, "
                f"ScoreCAM...). Received: explainer={explainer!r}."
            )
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
            raise ValueError(f"`samples` must be an integer >= 1. Received: samples={samples!r}.")
        if not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
            raise ValueError(
                f"`noise` must be a finite number >= 0 (a fraction of the image's value "
                f"range, e.g. 0.1). Received: noise={noise!r}."
            )
        if noise == 0 and samples > 1:
            raise ValueError(
                f"`samples={samples}` with `noise=0` explains {samples} identical copies; "
                "set `noise` > 0 (e.g. 0.1) or `samples=1`."
            )
        self.explainer = explainer
        self.noise = float(noise)
        self.samples = int(samples)
        self.flips = bool(flips)
        self.seed = seed

    @property
    def layer(self) -> str:
        """Path of the explained layer."""
        return self.explainer.layer

    def __call__(self, images: Any, target: Target = None) -> Explanation:
        """Explain a batch of images, averaged over the copies.

        Args:
            images: as for the wrapped explainer.
            target: as for the wrapped explainer; resolved on the original images.

        Returns:
            An `Explanation` of NumPy arrays.

        Raises:
            The errors of the wrapped explainer.

        Example:
            >>> Smoothed(cam, noise=0.1, samples=4)(images).heatmaps.shape
        """
        classes = self.explainer.resolve_classes(images, target)
        model = self.explainer.gradient_model
        leaves = _leaves(images)
        index = model.image_index if model.image_index is not None else 0
        image = leaves[index]
        if image.ndim == len(keras.tree.flatten(model.inputs)[index].shape) - 1:
            image = image[None]  # a single image: a batch of one
            leaves[index] = image
        # the last spatial axis: an image's width, a signal's time, a volume's width
        width_axis = image.ndim - 1 if model.image_channels_first else image.ndim - 2
        rng = np.random.default_rng(self.seed)
        results = []
        for _ in range(self.samples):
            noisy = self._add_noise(image, rng)
            for flipped in (False, True) if self.flips else (False,):
                copy = np.flip(noisy, axis=width_axis) if flipped else noisy
                copy_leaves = list(leaves)
                copy_leaves[index] = copy
                result = self._explain(_pack(images, copy_leaves), target, classes)
                results.append(_unflip(result) if flipped else result)
        return _average(results, signed=not getattr(self.explainer, "relu", True))

    def _add_noise(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.noise == 0:
            return image
        axes = tuple(range(1, image.ndim))
        span = image.max(axis=axes, keepdims=True) - image.min(axis=axes, keepdims=True)
        noisy = image + rng.normal(size=image.shape) * self.noise * span
        if image.dtype.kind in "iu":  # integer images stay integers in their range
            info = np.iinfo(image.dtype)
            return np.clip(np.round(noisy), info.min, info.max).astype(image.dtype)
        return noisy.astype(image.dtype)

    def _explain(self, inputs: Any, target: Target, classes: np.ndarray | None) -> Explanation:
        if classes is None:  # a callable target scores each copy's own outputs
            return self.explainer(inputs, target=target)
        if classes.ndim == 1:
            return self.explainer(inputs, target=classes)
        ranks = [self.explainer(inputs, target=classes[:, j]) for j in range(classes.shape[1])]
        return Explanation(
            **{
                name: np.stack([getattr(r, name) for r in ranks], axis=1)
                for name in (*_ARRAYS, "classes", "degenerate")
            },
            layer=ranks[0].layer,
        )


_ARRAYS = ("heatmaps", "maps", "raw_maps", "weights", "scores")


def _leaves(images: Any) -> list[np.ndarray]:
    leaves = images if isinstance(images, (list, tuple, dict)) else [images]
    return [np.asarray(leaf) for leaf in keras.tree.flatten(leaves)]


def _pack(images: Any, leaves: list[np.ndarray]) -> Any:
    if isinstance(images, (list, tuple, dict)):
        return keras.tree.pack_sequence_as(images, leaves)
    return leaves[0]


def _unflip(result: Explanation) -> Explanation:
    return replace(
        result,
        heatmaps=np.flip(result.heatmaps, axis=-1),
        maps=np.flip(result.maps, axis=-1),
        raw_maps=np.flip(result.raw_maps, axis=-1),
    )


def _average(results: list[Explanation], *, signed: bool) -> Explanation:
    first = results[0]
    means = {name: np.mean([getattr(r, name) for r in results], axis=0) for name in _ARRAYS}
    heatmaps, degenerate = normalize_maps(means["heatmaps"], signed=signed)
    return Explanation(
        heatmaps=heatmaps.numpy(),
        maps=means["maps"].astype(np.float32),
        raw_maps=means["raw_maps"].astype(np.float32),
        weights=means["weights"].astype(np.float32),
        scores=means["scores"].astype(np.float32),
        classes=first.classes,
        degenerate=degenerate.numpy(),
        layer=first.layer,
    )
