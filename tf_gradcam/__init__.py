"""tf_gradcam: Grad-CAM (Selvaraju et al.) for any Keras 3 / TensorFlow 2 model.

Example:
    >>> import tf_gradcam
    >>> cam = tf_gradcam.GradCAM(model)          # built once per model and layer
    >>> result = cam(images)                     # maps for the predicted classes
    >>> result.heatmaps.shape                    # (batch, height, width), in [0, 1]

The public names load on first use (PEP 562): `import tf_gradcam` itself does
not import TensorFlow, so the `tf-gradcam` command answers `--help` at once.
`from tf_gradcam import GradCAM`, `tf_gradcam.GradCAM` and
`import tf_gradcam.gradcam` work as with eager imports. The first public name
used (other than the error classes) also imports `tf_gradcam.relu_rules`,
which registers the Keras layers `GuidedReLU` and `DeconvReLU` for loading
saved models; to load a saved model holding them before using any name,
import `tf_gradcam.relu_rules` first.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_SOURCES: dict[str, str] = {
    "GradCAMCallback": "callback",
    "AttentionExplanation": "attention",
    "AttentionRollout": "attention",
    "DatasetSummary": "dataset",
    "DetectionTarget": "detection",
    "ExplainedBatch": "dataset",
    "explain_dataset": "dataset",
    "iter_shards": "dataset",
    "BackendError": "errors",
    "GradCAMError": "errors",
    "InputError": "errors",
    "LayerNotFoundError": "errors",
    "NoGradientError": "errors",
    "NotSpatialError": "errors",
    "TargetError": "errors",
    "UnsupportedActivationError": "errors",
    "UnknownMethodError": "errors",
    "UnsupportedLayerError": "errors",
    "UnsupportedModelError": "errors",
    "AblationCAM": "perturbation",
    "ScoreCAM": "perturbation",
    "EigenCAM": "cams",
    "GradCAMPlusPlus": "cams",
    "HiResCAM": "cams",
    "LayerCAM": "cams",
    "XGradCAM": "cams",
    "plot_fig1": "figures",
    "Explanation": "gradcam",
    "GradCAM": "gradcam",
    "explain": "methods",
    "export": "serving",
    "Deconvolution": "guided",
    "DeconvolutionGradCAM": "guided",
    "DeconvReLU": "relu_rules",
    "GuidedBackprop": "guided",
    "GuidedGradCAM": "guided",
    "GuidedReLU": "relu_rules",
    "PixelExplanation": "guided",
    "deconv_relu": "relu_rules",
    "guided_relu": "relu_rules",
    "normalize_gradients": "image",
    "overlay": "image",
    "LayerExplanations": "layerwise",
    "MultiLayerGradCAM": "layerwise",
    "explain_layers": "layerwise",
    "plot_layers": "layerwise",
    "layer_paths": "submodel",
    "ReportSummary": "html_report",
    "report": "html_report",
    "SimilarityTarget": "similarity",
    "Smoothed": "smoothing",
    "show": "display",
    "AnswerScore": "targets",
    "CaptionLogProb": "targets",
    "SegmentationTarget": "targets",
    "TopK": "targets",
    "WordLogProb": "targets",
    "ExplanationLoss": "explanation_losses",
    "GradCAMMassLoss": "explanation_losses",
    "HINTLoss": "explanation_losses",
    "NO_MASK": "explanation_losses",
    "RRRLoss": "explanation_losses",
    "ExplanationGuidedModel": "training",
    "NonFiniteLossError": "errors",
}

__all__ = [
    "NO_MASK",
    "AblationCAM",
    "AnswerScore",
    "AttentionExplanation",
    "AttentionRollout",
    "BackendError",
    "CaptionLogProb",
    "DatasetSummary",
    "DeconvReLU",
    "Deconvolution",
    "DeconvolutionGradCAM",
    "DetectionTarget",
    "EigenCAM",
    "ExplainedBatch",
    "Explanation",
    "ExplanationGuidedModel",
    "ExplanationLoss",
    "GradCAM",
    "GradCAMCallback",
    "GradCAMError",
    "GradCAMMassLoss",
    "GradCAMPlusPlus",
    "GuidedBackprop",
    "GuidedGradCAM",
    "GuidedReLU",
    "HINTLoss",
    "HiResCAM",
    "InputError",
    "LayerCAM",
    "LayerExplanations",
    "LayerNotFoundError",
    "MultiLayerGradCAM",
    "NoGradientError",
    "NonFiniteLossError",
    "NotSpatialError",
    "PixelExplanation",
    "RRRLoss",
    "ReportSummary",
    "ScoreCAM",
    "SegmentationTarget",
    "SimilarityTarget",
    "Smoothed",
    "TargetError",
    "TopK",
    "UnknownMethodError",
    "UnsupportedActivationError",
    "UnsupportedLayerError",
    "UnsupportedModelError",
    "WordLogProb",
    "XGradCAM",
    "__version__",
    "deconv_relu",
    "explain",
    "explain_dataset",
    "explain_layers",
    "export",
    "guided_relu",
    "iter_shards",
    "layer_paths",
    "normalize_gradients",
    "overlay",
    "plot_fig1",
    "plot_layers",
    "report",
    "show",
]

if TYPE_CHECKING:
    from tf_gradcam.attention import AttentionExplanation, AttentionRollout
    from tf_gradcam.callback import GradCAMCallback
    from tf_gradcam.cams import EigenCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
    from tf_gradcam.dataset import DatasetSummary, ExplainedBatch, explain_dataset, iter_shards
    from tf_gradcam.detection import DetectionTarget
    from tf_gradcam.display import show
    from tf_gradcam.errors import (
        BackendError,
        GradCAMError,
        InputError,
        LayerNotFoundError,
        NoGradientError,
        NonFiniteLossError,
        NotSpatialError,
        TargetError,
        UnknownMethodError,
        UnsupportedActivationError,
        UnsupportedLayerError,
        UnsupportedModelError,
    )
    from tf_gradcam.explanation_losses import (
        NO_MASK,
        ExplanationLoss,
        GradCAMMassLoss,
        HINTLoss,
        RRRLoss,
    )
    from tf_gradcam.figures import plot_fig1
    from tf_gradcam.gradcam import Explanation, GradCAM
    from tf_gradcam.guided import (
        Deconvolution,
        DeconvolutionGradCAM,
        GuidedBackprop,
        GuidedGradCAM,
        PixelExplanation,
    )
    from tf_gradcam.html_report import ReportSummary, report
    from tf_gradcam.image import normalize_gradients, overlay
    from tf_gradcam.layerwise import (
        LayerExplanations,
        MultiLayerGradCAM,
        explain_layers,
        plot_layers,
    )
    from tf_gradcam.methods import explain
    from tf_gradcam.perturbation import AblationCAM, ScoreCAM
    from tf_gradcam.relu_rules import DeconvReLU, GuidedReLU, deconv_relu, guided_relu
    from tf_gradcam.serving import export
    from tf_gradcam.similarity import SimilarityTarget
    from tf_gradcam.smoothing import Smoothed
    from tf_gradcam.submodel import layer_paths
    from tf_gradcam.targets import (
        AnswerScore,
        CaptionLogProb,
        SegmentationTarget,
        TopK,
        WordLogProb,
    )
    from tf_gradcam.training import ExplanationGuidedModel


def __getattr__(name: str) -> Any:
    """Imports a public name's submodule on first access (PEP 562).

    Args:
        name: a name from `__all__`, or the name of a submodule such as `"gradcam"`.

    Returns:
        The object, cached in the package namespace so later lookups skip this hook.

    Raises:
        AttributeError: if `name` is neither a public name nor a submodule.
    """
    source = _SOURCES.get(name)
    if source is not None:
        if source != "errors":  # registers GuidedReLU/DeconvReLU for keras.saving
            importlib.import_module(f"{__name__}.relu_rules")
        value = getattr(importlib.import_module(f"{__name__}.{source}"), name)
        globals()[name] = value
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's attributes and its public names, loaded or not."""
    return sorted({*globals(), *__all__})
