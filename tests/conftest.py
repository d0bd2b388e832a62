"""Shared fixtures: tiny Keras models with known structure, built per test."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import pytest
from keras import layers


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)


@pytest.fixture
def images() -> np.ndarray:
    """Four random 16×16 RGB images in [0, 1]."""
    return np.random.default_rng(0).random((4, 16, 16, 3), dtype=np.float32)


def make_cnn(activation: str | None = "softmax", classes: int = 3, name: str = "cnn"):
    """Conv(relu) → Conv(relu, 'last_conv') → GAP → Dense(classes, activation)."""
    inputs = keras.Input((16, 16, 3), name="image")
    x = layers.Conv2D(6, 3, activation="relu", name="conv1")(inputs)
    x = layers.Conv2D(5, 3, activation="relu", name="last_conv")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    # mostly positive class weights: every class has some supporting region
    head_init = keras.initializers.RandomUniform(-0.5, 1.0)
    outputs = layers.Dense(
        classes, activation=activation, kernel_initializer=head_init, name="head"
    )(x)
    return keras.Model(inputs, outputs, name=name)


@pytest.fixture
def cnn():
    """A small functional CNN ending in a softmax Dense layer."""
    return make_cnn()


def make_deeplabv3(activation: str | None = None) -> keras.Model:
    """A keras-hub DeepLabV3 segmenter at 64x64, 3 classes, random weights (ResNet encoder)."""
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 64, 64],
        stackwise_num_blocks=[1, 1, 1],
        stackwise_num_strides=[1, 2, 2],
        block_type="basic_block",
        image_shape=(64, 64, 3),
    )
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=encoder,
        low_level_feature_key="P2",
        spatial_pyramid_pooling_key="P3",
        dilation_rates=[1, 2],
        upsampling_size=2,
    )
    return keras_hub.models.DeepLabV3ImageSegmenter(
        backbone=backbone, num_classes=3, activation=activation, preprocessor=None
    )


def make_segformer(levels: int = 1) -> keras.Model:
    """A keras-hub SegFormer (MiT encoder, `levels` stages) at 32x32, 3 classes, random weights."""
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    encoder = keras_hub.models.MiTBackbone(
        layerwise_depths=[1] * levels,
        num_layers=levels,
        layerwise_num_heads=[1, 2][:levels],
        layerwise_sr_ratios=[2, 1][:levels],
        max_drop_path_rate=0.0,
        layerwise_patch_sizes=[7, 3][:levels],
        layerwise_strides=[4, 2][:levels],
        image_shape=(32, 32, 3),
        hidden_dims=[8, 16][:levels],
    )
    backbone = keras_hub.models.SegFormerBackbone(image_encoder=encoder, projection_filters=8)
    return keras_hub.models.SegFormerImageSegmenter(
        backbone=backbone, num_classes=3, preprocessor=None
    )
