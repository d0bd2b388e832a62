"""tf_gradcam: Grad-CAM (Selvaraju et al.) for any Keras 3 / TensorFlow 2 model.

Example:
    >>> import tf_gradcam
    >>> cam = tf_gradcam.GradCAM(model)          # built once per model and layer
    >>> result = cam(images)                     # maps for the predicted classes
    >>> result.heatmaps.shape                    # (batch, height, width), in [0, 1]
"""

from tf_gradcam.callback import GradCAMCallback
from tf_gradcam.errors import (
    BackendError,
    GradCAMError,
    InputError,
    LayerNotFoundError,
    NoGradientError,
    NotSpatialError,
    TargetError,
    UnsupportedModelError,
)
from tf_gradcam.gradcam import Explanation, GradCAM, explain
from tf_gradcam.image import overlay
from tf_gradcam.submodel import layer_paths
from tf_gradcam.targets import TopK

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "Explanation",
    "GradCAM",
    "GradCAMCallback",
    "GradCAMError",
    "InputError",
    "LayerNotFoundError",
    "NoGradientError",
    "NotSpatialError",
    "TargetError",
    "TopK",
    "UnsupportedModelError",
    "__version__",
    "explain",
    "layer_paths",
    "overlay",
]
