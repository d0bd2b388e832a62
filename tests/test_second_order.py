"""Gradients *through* Grad-CAM, checked against an independent float64 NumPy model.

`GradCAM.compute` returns tensors that users differentiate (explanation losses,
attacks on explanations). The maps depend on ∂y/∂A, so their gradient holds
second derivatives of the model. Each gradient below, with respect to the input
and to a convolution kernel, for `heatmaps`, `maps` and `raw_maps`, must equal
central finite differences of a NumPy re-implementation of the whole pipeline
(model, eq. 1, eq. 2, bilinear upsampling, normalisation) in float64.

The checks run with several intra-op threads and repeat, because a oneDNN
batched-matmul bug once made these gradients differ from run to run (or crash
the process) only when two threads shared the work (docs/known-issues.md). They
run in a subprocess that fixes the thread count before TensorFlow starts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

THREADS = 4
REPEATS = 5
CLASS = 1


def _build_model():
    """x (16×16×2) → 2×2/2 conv, tanh (the explained layer) → 1×1 conv, tanh → GAP → Dense."""
    import keras
    from keras import layers

    inputs = keras.Input((16, 16, 2))
    features = layers.Conv2D(4, 2, strides=2, activation="tanh", name="features")(inputs)
    hidden = layers.Conv2D(3, 1, activation="tanh", name="hidden")(features)
    pooled = layers.GlobalAveragePooling2D()(hidden)
    outputs = layers.Dense(2, name="head")(pooled)
    return keras.Model(inputs, outputs)


def _interpolation(size_in: int, size_out: int) -> np.ndarray:
    """Half-pixel bilinear weights (out, in), written from the definition."""
    matrix = np.zeros((size_out, size_in))
    for o in range(size_out):
        s = (o + 0.5) * size_in / size_out - 0.5
        f = np.floor(s)
        low, high = max(int(f), 0), min(int(np.ceil(s)), size_in - 1)
        matrix[o, low] += 1.0 - (s - f)
        matrix[o, high] += s - f
    return matrix


def _numpy_gradcam(x: np.ndarray, weights: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The model and Grad-CAM in float64 NumPy, derivatives of the head by hand."""
    k1, b1, k2, b2, wd, _ = weights
    n = x.shape[0]
    patches = x.reshape(n, 8, 2, 8, 2, 2).transpose(0, 1, 3, 2, 4, 5)
    a = np.tanh(np.einsum("nijabc,abck->nijk", patches, k1) + b1)
    b = np.tanh(a @ k2[0, 0] + b2)
    z = a.shape[1] * a.shape[2]
    # y = mean_ij(B) · wd[:, c]: ∂y/∂A_ijk = Σ_m (1 − B²_ijm) K2[k, m] wd[m, c] / Z
    dy_da = ((1.0 - b**2) * wd[:, CLASS]) @ k2[0, 0].T / z
    alpha = dy_da.mean(axis=(1, 2))  # eq. 1
    raw = np.einsum("nijk,nk->nij", a, alpha)
    maps = np.maximum(raw, 0.0)  # eq. 2
    up = _interpolation(8, 16)
    upsampled = np.einsum("Hh,nhw,Ww->nHW", up, maps, up)
    heatmaps = upsampled / upsampled.max(axis=(1, 2), keepdims=True)
    return {"heatmaps": heatmaps, "maps": maps, "raw_maps": raw}


def _finite_differences(fn, value: np.ndarray, step: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(value)
    for index in np.ndindex(value.shape):
        plus, minus = value.copy(), value.copy()
        plus[index] += step
        minus[index] -= step
        grad[index] = (fn(plus) - fn(minus)) / (2 * step)
    return grad


def check_second_order_gradients(repeats: int) -> list[str]:
    """Compare the tape's gradients with the NumPy references; return the failures."""
    import keras
    import tensorflow as tf

    import tf_gradcam

    keras.utils.set_random_seed(7)
    model = _build_model()
    rng = np.random.default_rng(7)
    x = rng.random((3, 16, 16, 2), dtype=np.float32)
    weights = [w.astype(np.float64) for w in model.get_weights()]
    x64 = x.astype(np.float64)
    cam = tf_gradcam.GradCAM(model, "features")
    kernel = model.get_layer("features").kernel
    failures = []
    for field, shape in (("heatmaps", (3, 16, 16)), ("maps", (3, 8, 8)), ("raw_maps", (3, 8, 8))):
        g = rng.standard_normal(shape)  # L = Σ g ⊙ field: every element's gradient counts

        def loss_of_x(value, g=g, field=field):
            return float(np.sum(g * _numpy_gradcam(value, weights)[field]))

        def loss_of_kernel(value, g=g, field=field):
            return float(np.sum(g * _numpy_gradcam(x64, [value, *weights[1:]])[field]))

        references = {
            "input": _finite_differences(loss_of_x, x64),
            "kernel": _finite_differences(loss_of_kernel, weights[0]),
        }
        for repeat in range(repeats):
            inputs = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                value = getattr(cam.compute(inputs, target=CLASS), field)
                loss = tf.reduce_sum(tf.constant(g, tf.float32) * value)
            grads = dict(zip(references, tape.gradient(loss, [inputs, kernel]), strict=True))
            for name, reference in references.items():
                got = grads[name].numpy()
                tolerance = 1e-4 * np.abs(reference).max()
                error = np.abs(got - reference).max()
                if not np.all(np.isfinite(got)) or error > tolerance:
                    failures.append(
                        f"d{field}/d{name}, repeat {repeat}: max error {error:.3g} over "
                        f"tolerance {tolerance:.3g} (|reference| max {np.abs(reference).max():.3g})"
                    )
    return failures


def test_numpy_reference_matches_the_model():
    """The NumPy forward equals the Keras model and Grad-CAM's maps (the reference is right)."""
    import tf_gradcam

    model = _build_model()
    x = np.random.default_rng(3).random((2, 16, 16, 2), dtype=np.float32)
    weights = [w.astype(np.float64) for w in model.get_weights()]
    expected = _numpy_gradcam(x.astype(np.float64), weights)
    result = tf_gradcam.GradCAM(model, "features")(x, target=CLASS)
    for field, value in expected.items():
        np.testing.assert_allclose(getattr(result, field), value, rtol=1e-5, atol=1e-6)


def test_gradients_through_compute_with_several_threads():
    """First and second-order gradients equal float64 finite differences, run after run.

    Runs in a subprocess that sets 4 intra-op threads before TensorFlow starts, so
    the check does not depend on the CI machine's core count; a crash there is a
    failure too.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run(
        [sys.executable, __file__],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    output = f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    assert completed.returncode == 0, f"exit status {completed.returncode}\n{output}"
    assert "all gradients match" in completed.stdout, completed.stdout


if __name__ == "__main__":
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    problems = check_second_order_gradients(REPEATS)
    if problems:
        print("\n".join(problems))
        sys.exit(1)
    print(f"all gradients match ({REPEATS} repeats, {THREADS} intra-op threads)")
