"""tf_gradcam: Grad-CAM (Selvaraju et al.) for any Keras 3 / TensorFlow 2 model.

Example:
    >>> import tf_gradcam
    >>> cam = tf_gradcam.GradCAM(model)          # built once per model and layer
    >>> result = cam(images)                     # maps for the predicted classes
    >>> result.heatmaps.shape                    # (batch, height, width), in [0, 1]
"""

from tf_gradcam.callback import GradCAMCallback
from tf_gradcam.dataset import DatasetSummary, ExplainedBatch, explain_dataset, iter_shards
from tf_gradcam.errors import (
    BackendError,
    GradCAMError,
    InputError,
    LayerNotFoundError,
    NoGradientError,
    NotSpatialError,
    TargetError,
    UnsupportedActivationError,
    UnsupportedModelError,
)
from tf_gradcam.figures import plot_fig1
from tf_gradcam.gradcam import Explanation, GradCAM, explain
from tf_gradcam.guided import (
    Deconvolution,
    DeconvolutionGradCAM,
    DeconvReLU,
    GuidedBackprop,
    GuidedGradCAM,
    GuidedReLU,
    PixelExplanation,
    deconv_relu,
    guided_relu,
)
from tf_gradcam.image import normalize_gradients, overlay
from tf_gradcam.layerwise import MultiLayerGradCAM, explain_layers, plot_layers
from tf_gradcam.submodel import layer_paths
from tf_gradcam.targets import AnswerScore, CaptionLogProb, TopK, WordLogProb

__version__ = "0.1.0"

__all__ = [
    "AnswerScore",
    "BackendError",
    "CaptionLogProb",
    "DatasetSummary",
    "DeconvReLU",
    "Deconvolution",
    "DeconvolutionGradCAM",
    "ExplainedBatch",
    "Explanation",
    "GradCAM",
    "GradCAMCallback",
    "GradCAMError",
    "GuidedBackprop",
    "GuidedGradCAM",
    "GuidedReLU",
    "InputError",
    "LayerNotFoundError",
    "MultiLayerGradCAM",
    "NoGradientError",
    "NotSpatialError",
    "PixelExplanation",
    "TargetError",
    "TopK",
    "UnsupportedActivationError",
    "UnsupportedModelError",
    "WordLogProb",
    "__version__",
    "deconv_relu",
    "explain",
    "explain_dataset",
    "explain_layers",
    "guided_relu",
    "iter_shards",
    "layer_paths",
    "normalize_gradients",
    "overlay",
    "plot_fig1",
    "plot_layers",
]
