"""The frozen image encoder shared by the captioning and VQA examples.

Not an example itself: `captioning.py` and `vqa.py` import it (run them as
`python examples/<name>.py`, which puts this folder on the import path).
"""

from __future__ import annotations

import keras
from keras import layers

from tf_gradcam.demo_model import load_demo_model


def frozen_encoder() -> keras.Model:
    """The demo CNN's `last_conv` (scaled down to the colours' range) and 4×4-pooled colours."""
    demo = load_demo_model()
    demo.trainable = False
    shapes = layers.Rescaling(0.1, name="scale")(demo.get_layer("last_conv").output)
    colours = layers.AveragePooling2D(4, name="colours")(demo.input)
    features = layers.Concatenate(name="features")([shapes, colours])
    return keras.Model(demo.input, features, name="encoder")
