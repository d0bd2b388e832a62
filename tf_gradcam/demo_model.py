"""The small demo CNN shipped with tf_gradcam, for examples, docs and tests.

It classifies the shape of one coloured object on a noisy 64x64 background
(scenes from `tf_gradcam.scenes.make_scenes(n)` with the default options),
and was trained by `scripts/train_demo_model.py`. Architecture: input in
[0, 1] rescaled to [-1, 1], four 3x3 Conv2D+ReLU layers and two max-poolings,
the last convolution `"last_conv"` with a `(16, 16, 32)` output, global
average pooling and `Dense(3, activation="softmax")`. The head ends in a
softmax on purpose: Grad-CAM scores the pre-softmax logits.
"""

from __future__ import annotations

import importlib.resources

import keras

__all__ = ["DEMO_CLASS_NAMES", "DEMO_LAYER_NAME", "load_demo_model"]

#: Class names of the demo model's outputs, in output order.
DEMO_CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle")

#: Name of the demo model's last convolutional layer, output `(batch, 16, 16, 32)`.
DEMO_LAYER_NAME = "last_conv"

_ASSET = "demo_model.keras"


def load_demo_model() -> keras.Model:
    """Loads the shipped demo CNN with `safe_mode=True`, uncompiled.

    Each call returns a fresh model, so callers may modify it freely.

    Returns:
        A functional `keras.Model` mapping images `(batch, 64, 64, 3)` in
        [0, 1] to softmax probabilities `(batch, 3)` over `DEMO_CLASS_NAMES`.

    Raises:
        FileNotFoundError: if the package was installed without its asset.

    Example:

    >>> from tf_gradcam.scenes import make_scenes
    >>> model = load_demo_model()
    >>> scenes = make_scenes(4, seed=123)
    >>> model.predict(scenes.images, verbose=0).shape
    (4, 3)
    """
    asset = importlib.resources.files("tf_gradcam") / "assets" / _ASSET
    if not asset.is_file():
        raise FileNotFoundError(
            f"The demo model asset is missing. Expected: tf_gradcam/assets/{_ASSET}; "
            "reinstall tf_gradcam or regenerate it with `python scripts/train_demo_model.py`."
        )
    with importlib.resources.as_file(asset) as path:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
