"""Pin of a TensorFlow/oneDNN kernel bug: convolutions of an empty batch.

Runs with oneDNN as the environment leaves it (on by default on AVX512_VNNI/BF16/AMX
CPUs) and reports whether it is active. A correct Conv2D of 0 images of 16×16×3 by
a 3×3×3×6 kernel ("VALID") returns shape (0, 14, 14, 6); the oneDNN kernels
return a tensor shaped like their input, (0, 16, 16, 3), so the next layer
fails with "input depth must be evenly divisible by filter depth". Prints one
JSON line with the shapes and whether TensorFlow was built with oneDNN.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf

try:
    from tensorflow.python.util import _pywrap_util_port

    onednn = bool(_pywrap_util_port.IsMklEnabled())
except (ImportError, AttributeError):
    onednn = None

x = tf.zeros([0, 16, 16, 3])
kernel = tf.ones([3, 3, 3, 6])
depthwise = tf.ones([3, 3, 3, 2])
bias = tf.zeros([6])
fused = tf.function(lambda x: tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "VALID"), bias)))
shapes = {
    "conv2d": tf.nn.conv2d(x, kernel, strides=1, padding="VALID").shape,
    "depthwise_conv2d": tf.nn.depthwise_conv2d(x, depthwise, [1, 1, 1, 1], "VALID").shape,
    "fused_conv2d_bias_relu": fused(x).shape,
}
print(
    json.dumps(
        {
            "onednn": onednn,
            "tensorflow": tf.__version__,
            "shapes": {k: v.as_list() for k, v in shapes.items()},
        }
    ),
    flush=True,
)
