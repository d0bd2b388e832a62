"""Typed errors raised by tf_gradcam.

Every error says which argument was wrong, what was received and what to do
instead, in the pattern of Keras' own messages. All of them derive from
`GradCAMError`, itself a `ValueError`, so callers can catch either.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "GradCAMError",
    "InputError",
    "LayerNotFoundError",
    "NoGradientError",
    "NonFiniteLossError",
    "NotSpatialError",
    "TargetError",
    "UnknownMethodError",
    "UnsupportedActivationError",
    "UnsupportedLayerError",
    "UnsupportedModelError",
]


class GradCAMError(ValueError):
    """Base class of every error tf_gradcam raises on bad input."""

    # Exception's own constructor, so that AutoGraph re-raises these errors with
    # their type when they occur inside a user's `tf.function` (it only keeps
    # types whose `__init__` is `Exception.__init__`; others become StagingError).
    __init__ = Exception.__init__


class BackendError(GradCAMError):
    """Keras runs on a backend other than TensorFlow."""


class LayerNotFoundError(GradCAMError):
    """The `layer` argument names no layer of the model."""


class NotSpatialError(GradCAMError):
    """The chosen layer's output is not a 4-D (batch, height, width, channels) tensor."""


class TargetError(GradCAMError):
    """The `target` argument is out of range or of an unsupported form."""


class InputError(GradCAMError):
    """The images have the wrong rank, shape, channels, dtype or non-finite values."""


class NoGradientError(GradCAMError):
    """The target score does not depend on the chosen layer."""


class UnsupportedModelError(GradCAMError):
    """The model's structure cannot be opened up (e.g. a subclassed model)."""


class UnsupportedActivationError(GradCAMError):
    """The model has activations guided backprop does not define and `strict=True`."""


class UnknownMethodError(GradCAMError):
    """The `method` argument names no CAM method; the message lists the known ones."""


class UnsupportedLayerError(GradCAMError):
    """The chosen layer does not suit the method (e.g. Eigen-CAM on a one-channel layer)."""


class NonFiniteLossError(GradCAMError):
    """A training loss became NaN or infinite; the message names the step and the cause."""
