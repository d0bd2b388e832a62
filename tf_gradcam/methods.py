"""The CAM methods by name: what `explain(method=)`, the CLI, the callback and
`explain_dataset` accept.

Names follow pytorch-grad-cam's (`"gradcam++"`, `"scorecam"`...); case, `-`,
`_` and spaces are ignored, so `"Grad-CAM++"` and `"score_cam"` work too.
"""

from __future__ import annotations

import importlib

from tf_gradcam.errors import UnknownMethodError

__all__ = ["METHODS", "get_method", "method_name"]

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
