"""The CAM methods by name, and `explain()`, the one-call form.

The names are what `explain(method=)`, the CLI's `--method`,
`GradCAMCallback(method=)` and `explain_dataset(method=)` accept. They follow
pytorch-grad-cam's (`"gradcam++"`, `"scorecam"`...); case, `-`, `_` and
spaces are ignored, so `"Grad-CAM++"` and `"score_cam"` work too. Importing
this module imports neither TensorFlow nor Keras (`explain` does, when called).
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from tf_gradcam.errors import UnknownMethodError

if TYPE_CHECKING:  # the registry imports no TensorFlow: the CLI reads it before loading TF
    import keras

    from tf_gradcam.gradcam import Explanation
    from tf_gradcam.targets import Target

__all__ = ["METHODS", "TITLES", "explain", "get_method", "method_name"]

#: canonical name -> (module, class)
METHODS: dict[str, tuple[str, str]] = {
    "gradcam": ("gradcam", "GradCAM"),
    "gradcam++": ("cams", "GradCAMPlusPlus"),
    "xgradcam": ("cams", "XGradCAM"),
    "hirescam": ("cams", "HiResCAM"),
    "layercam": ("cams", "LayerCAM"),
    "scorecam": ("perturbation", "ScoreCAM"),
    "ablationcam": ("perturbation", "AblationCAM"),
    "eigencam": ("cams", "EigenCAM"),
}

#: canonical name -> the name shown in titles and captions
TITLES: dict[str, str] = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "scorecam": "Score-CAM",
    "ablationcam": "Ablation-CAM",
    "eigencam": "Eigen-CAM",
}

_ALIASES = {"gradcamplusplus": "gradcam++", "gradcampp": "gradcam++"}


def method_name(name: str) -> str:
    """The canonical name of a CAM method.

    Args:
        name: a method name in any case, with or without `-`, `_` or spaces.

    Returns:
        The key of `METHODS` it names.

    Raises:
        UnknownMethodError: `name` names no method; the message lists them.

    Example:
        >>> method_name("Grad-CAM++")
        'gradcam++'
    """
    if not isinstance(name, str):
        raise UnknownMethodError(
            f"`method` must be a method name, one of {sorted(METHODS)}. Received: method={name!r}."
        )
    key = name.lower().replace("-", "").replace("_", "").replace(" ", "")
    key = _ALIASES.get(key, key)
    if key not in METHODS:
        raise UnknownMethodError(
            f"Unknown CAM method {name!r}; the methods are {', '.join(sorted(METHODS))} "
            f"(case, '-' and '_' are ignored). Received: method={name!r}."
        )
    return key


def get_method(name: str) -> type:
    """The class implementing a CAM method.

    Args:
        name: a method name (see `method_name`).

    Returns:
        The class, e.g. `tf_gradcam.GradCAMPlusPlus` for `"gradcam++"`; build
        it as `cls(model, layer, **options)`.

    Raises:
        UnknownMethodError: `name` names no method.

    Example:
        >>> cam = get_method("scorecam")(model, batch_size=64)
    """
    module, attribute = METHODS[method_name(name)]
    return getattr(importlib.import_module(f"tf_gradcam.{module}"), attribute)


# explain()'s recently used explainers. A bounded LRU keyed by id(model), not a
# WeakKeyDictionary: the cached explainer holds its model, which would keep a
# weak key alive forever. At most _CACHE_SIZE models stay referenced.
_CACHE: OrderedDict[tuple, Any] = OrderedDict()
_CACHE_SIZE = 8


def _structure(model: keras.Model) -> tuple:
    """What a cached explainer depends on: the model's layers and variables, by identity.

    `Sequential.pop()` / `add()`, or a layer rebuilt with new variables, change it,
    so `explain` never serves a gradient graph of an earlier model.
    """
    return (
        tuple(id(layer) for layer in model.layers),
        tuple(id(variable) for variable in model.weights),
    )


def explain(
    model: keras.Model,
    images: Any,
    target: Target = None,
    layer: str | keras.layers.Layer | None = None,
    *,
    method: str = "gradcam",
    noise: float = 0.0,
    samples: int = 1,
    flips: bool = False,
    **options: Any,
) -> Explanation:
    """Any CAM method in one call: `get_method(method)(model, layer, **options)(images, target)`.

    The explainer is cached per model, layer, method and options, so repeated
    calls do not rebuild or retrace. `noise`, `samples` and `flips` average
    the explanation over noisy and mirrored copies (`tf_gradcam.Smoothed`).

    Args:
        model: a Functional or Sequential `keras.Model`.
        images: `(batch, height, width, channels)` array, or a list/dict for
            multi-input models.
        target: `None`, an int, one int per image, `TopK(k)`, or a callable.
        layer: name, path, `Layer` or `None` (automatic).
        method: `"gradcam"` (default), `"gradcam++"`, `"xgradcam"`,
            `"hirescam"`, `"layercam"`, `"scorecam"`, `"ablationcam"` or
            `"eigencam"` (see `METHODS`).
        noise: SmoothGrad noise level, a fraction of each image's value range.
        samples: number of noisy copies.
        flips: also explain each copy mirrored left–right.
        **options: keyword options of the method's class (e.g. `pooling="max"`
            for Grad-CAM, `batch_size=64` for Score-CAM).

    Returns:
        An `Explanation` of NumPy arrays.

    Raises:
        UnknownMethodError: `method` names no method; the message lists them.
        TypeError: an option the method does not take.
        The errors of the method's class and of its call.

    Example:
        >>> result = tf_gradcam.explain(model, images, target=3, method="gradcam++")
        >>> result.heatmaps.shape
        (8, 224, 224)
    """
    import keras

    from tf_gradcam.smoothing import Smoothed

    name = method_name(method)
    layer_key = id(layer) if isinstance(layer, keras.Operation) else layer
    try:
        key = (
            id(model),
            _structure(model),
            layer_key,
            name,
            tuple(sorted(options.items(), key=lambda kv: kv[0])),
        )
        hash(key)
    except TypeError:  # unhashable option values: no caching
        key = None
    cam = _CACHE.get(key) if key is not None else None
    if cam is None or cam.model is not model:
        cam = get_method(name)(model, layer, **options)
    if key is not None:
        _CACHE[key] = cam
        _CACHE.move_to_end(key)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    if noise or samples != 1 or flips:
        return Smoothed(cam, noise=noise, samples=samples, flips=flips)(images, target)
    return cam(images, target)
