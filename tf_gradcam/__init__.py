"""tf_gradcam: Grad-CAM for any Keras 3 / TensorFlow 2 model."""

__version__ = "0.1.0"
