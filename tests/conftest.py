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
