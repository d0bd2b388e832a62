"""`tf-gradcam explain` on Conv1D signals and Conv3D volumes read from .npy/.npz files.

In-process `main([...])` calls, as in test_cli.py. Every expected number is computed here
without the library: the maps from a `tf.GradientTape` over a sub-model that returns the
explained layer's activations with the scores (α_k = the mean gradient over the positions,
map = ReLU(Σ_k α_k A^k)), the heatmaps by NumPy's linear interpolation along each axis at
half-sample centres, divided by the maximum. The pictures are then compared with what
`tf_gradcam.pictures` draws from those independent heatmaps.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import tf_gradcam
from tf_gradcam.cli import main
from tf_gradcam.pictures import orthogonal_slices, signal_picture, volume_montage

HEAD_INIT = keras.initializers.RandomUniform(-0.5, 1.0)  # every class has supporting features


def _signal_model(length: int | None = 40, channels: int = 2, classes: int = 3) -> keras.Model:
    """Conv1D(stride 2, relu, 'features') -> GAP -> Dense(classes, 'head') on signals."""
    inputs = keras.Input((length, channels))
    x = layers.Conv1D(4, 5, strides=2, padding="same", activation="relu", name="features")(inputs)
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, layers.Dense(classes, kernel_initializer=HEAD_INIT, name="head")(x))


def _volume_model() -> keras.Model:
    """Conv3D(stride 2, relu, 'features') -> GAP -> Dense(2, 'head') on 8x10x6x1 volumes."""
    inputs = keras.Input((8, 10, 6, 1))
    x = layers.Conv3D(4, 3, strides=2, padding="same", activation="relu", name="features")(inputs)
    x = layers.GlobalAveragePooling3D()(x)
    return keras.Model(inputs, layers.Dense(2, kernel_initializer=HEAD_INIT, name="head")(x))


def _image_model() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    return keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling2D()(x)))


def _saved(model: keras.Model, tmp_path: Path) -> str:
    path = tmp_path / "m.keras"
    model.save(path)
    return str(path)


def _tape_cam(model: keras.Model, x: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(maps ReLU(Σ_k α_k A^k) at the layer's resolution, scores y^c), float64, by a tape."""
    probe = keras.Model(model.input, [model.get_layer("features").output, model.output])
    with tf.GradientTape() as tape:
        activations, scores = probe(tf.constant(x, tf.float32))
        score = scores[:, c]
    gradients = tape.gradient(score, activations).numpy().astype(np.float64)
    a = activations.numpy().astype(np.float64)
    alpha = gradients.mean(axis=tuple(range(1, gradients.ndim - 1)))  # eq. 1: (batch, k)
    maps = np.maximum(np.einsum("n...k,nk->n...", a, alpha), 0.0)  # eq. 2
    return maps, score.numpy().astype(np.float64)


def _heatmap(layer_map: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """One map interpolated linearly along each axis (half-sample centres), over its maximum."""
    heat = layer_map
    for axis, n_out in enumerate(size):
        n = heat.shape[axis]
        positions = np.clip((np.arange(n_out) + 0.5) * n / n_out - 0.5, 0, n - 1)
        rows = np.moveaxis(heat, axis, -1)
        resized = np.stack([np.interp(positions, np.arange(n), v) for v in rows.reshape(-1, n)])
        heat = np.moveaxis(resized.reshape(*rows.shape[:-1], n_out), -1, axis)
    return heat / heat.max()


def _png(path: Path) -> np.ndarray:
    picture = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert picture is not None, f"{path} is not a PNG"
    return cv2.cvtColor(picture, cv2.COLOR_BGR2RGB)


def _assert_same_picture(written: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to a neighbouring colormap entry where float32 rounding crosses a bin edge."""
    assert written.shape == expected.shape
    difference = np.abs(written.astype(int) - expected.astype(int))
    assert difference.max() <= 8
    assert (difference.max(axis=-1) == 0).mean() > 0.99


def _table_row(printed: str, name: str) -> list[str]:
    return next(line for line in printed.splitlines() if line.endswith(name)).split()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("tf-gradcam: ")
    return lines[0]


# ------------------------------------------------------------------ signals


def test_signal_maps_equal_a_tape_and_the_picture_draws_the_interpolated_heatmap(tmp_path, capsys):
    """Conv1D: the .npy is the tape's map, the PNG signal_picture of the signal and its heat."""
    keras.utils.set_random_seed(1)
    model = _signal_model()
    signals = np.random.default_rng(0).normal(size=(2, 40, 2))
    paths = []
    for i, signal in enumerate(signals):
        paths.append(str(tmp_path / f"s{i}.npy"))
        np.save(paths[-1], signal)
    out = tmp_path / "out"
    assert (
        main(["explain", _saved(model, tmp_path), *paths, "--class", "1", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out

    maps, scores = _tape_cam(model, signals, 1)
    assert maps.shape == (2, 20) and (maps.max(axis=1) > 0).all()
    for i in range(2):
        written = np.load(out / f"s{i}_gradcam.npy")
        np.testing.assert_allclose(written, maps[i], rtol=0, atol=1e-5)
        heat = _heatmap(maps[i], (40,))
        picture = _png(out / f"s{i}_gradcam.png")
        assert picture.shape == (160, 256, 3)  # signal_picture's default for 40 samples
        _assert_same_picture(picture, signal_picture(signals[i], heat))
        row = _table_row(printed, f"s{i}_gradcam.png")
        assert row[0] == paths[i] and row[1] == "1"
        assert float(row[2]) == pytest.approx(scores[i], rel=1e-3)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"s{i}_gradcam.{s}" for i in range(2) for s in ("npy", "png")
    )


def test_one_channel_signals_without_channel_axis_npz_top_k_and_labels(tmp_path, capsys):
    """(length,) .npy and (length, 1) .npz: --top-k's classes, maps and captions from a tape."""
    keras.utils.set_random_seed(2)
    model = _signal_model(length=48, channels=1)
    signal = np.random.default_rng(1).normal(size=48).astype(np.float32)
    np.save(tmp_path / "flat.npy", signal)
    np.savez(tmp_path / "packed.npz", signal=signal[:, None])
    labels = tmp_path / "labels.txt"
    labels.write_text("low\nmid\nhigh\n")
    out = tmp_path / "out"
    args = [str(tmp_path / "flat.npy"), str(tmp_path / "packed.npz"), "--top-k", "2"]
    assert (
        main(
            ["explain", _saved(model, tmp_path), *args, "--labels", str(labels), "--out", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out

    logits = model(signal[None, :, None]).numpy()[0]
    top = np.argsort(-logits)[:2]
    names = ["low", "mid", "high"]
    for stem in ("flat", "packed"):
        for c in top:
            maps, scores = _tape_cam(model, signal[None, :, None], int(c))
            assert maps[0].max() > 0
            name = f"{stem}_{names[c]}_gradcam"
            np.testing.assert_allclose(np.load(out / f"{name}.npy"), maps[0], rtol=0, atol=1e-5)
            row = _table_row(printed, f"{name}.png")
            assert row[1:3] == [str(c), names[c]]
            assert float(row[3]) == pytest.approx(scores[0], rel=1e-3)
            picture = _png(out / f"{name}.png")
            assert picture.shape[1] == 256 and picture.shape[0] > 160  # caption strip below
            _assert_same_picture(picture[:160], signal_picture(signal, _heatmap(maps[0], (48,))))
    assert len(list(out.glob("*.npy"))) == 4


def test_a_model_of_any_length_explains_signals_of_different_lengths(tmp_path):
    """Input (None, 2): a 30- and a 50-sample signal, each map equal to the tape's alone."""
    keras.utils.set_random_seed(3)
    model = _signal_model(length=None)
    rng = np.random.default_rng(2)
    signals = [rng.normal(size=(30, 2)), rng.normal(size=(50, 2))]
    for i, signal in enumerate(signals):
        np.save(tmp_path / f"s{i}.npy", signal)
    out = tmp_path / "out"
    inputs = [str(tmp_path / "s0.npy"), str(tmp_path / "s1.npy")]
    assert (
        main(["explain", _saved(model, tmp_path), *inputs, "--class", "0", "--out", str(out)]) == 0
    )
    for i, signal in enumerate(signals):
        maps, _ = _tape_cam(model, signal[None], 0)
        assert maps.shape == (1, len(signal) // 2) and maps.max() > 0
        np.testing.assert_allclose(np.load(out / f"s{i}_gradcam.npy"), maps[0], rtol=0, atol=1e-5)
        heat = _heatmap(maps[0], (len(signal),))
        _assert_same_picture(_png(out / f"s{i}_gradcam.png"), signal_picture(signal, heat))


def test_guided_backprop_of_a_relu_free_signal_model_saves_the_tape_gradient(tmp_path):
    """No ReLU to guide: the .npy is ∂y^c/∂x, the band its size max_k |g| over its maximum."""
    inputs = keras.Input((30, 3))
    x = layers.Conv1D(4, 5, padding="same", activation="tanh", name="features")(inputs)
    model = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)))
    signal = np.random.default_rng(5).normal(size=(30, 3)).astype(np.float32)
    np.save(tmp_path / "g.npy", signal)
    out = tmp_path / "out"
    method = ["--method", "guided_backprop", "--class", "1"]
    assert (
        main(
            [
                "explain",
                _saved(model, tmp_path),
                str(tmp_path / "g.npy"),
                *method,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    tensor = tf.constant(signal[None])
    with tf.GradientTape() as tape:
        tape.watch(tensor)
        score = model(tensor)[:, 1]
    gradient = tape.gradient(score, tensor).numpy()[0].astype(np.float64)
    np.testing.assert_allclose(np.load(out / "g_guided-backprop.npy"), gradient, rtol=0, atol=1e-5)
    size = np.abs(gradient).max(axis=1)
    picture = _png(out / "g_guided-backprop.png")
    _assert_same_picture(picture, signal_picture(signal, size / size.max()))


# ------------------------------------------------------------------ volumes


def test_volume_map_montage_and_slices_follow_the_tape(tmp_path, capsys):
    """Conv3D, a (depth, height, width) .npy: the map, montage and orthogonal slices from a tape."""
    keras.utils.set_random_seed(4)
    model = _volume_model()
    volume = np.random.default_rng(3).normal(size=(8, 10, 6)).astype(np.float32)
    np.save(tmp_path / "v.npy", volume)
    out = tmp_path / "out"
    flags = ["--class", "0", "--alpha", "0.5", "--out", str(out)]
    assert main(["explain", _saved(model, tmp_path), str(tmp_path / "v.npy"), *flags]) == 0
    printed = capsys.readouterr().out

    maps, scores = _tape_cam(model, volume[None, ..., None], 0)
    assert maps.shape == (1, 4, 5, 3) and maps.max() > 0
    np.testing.assert_allclose(np.load(out / "v_gradcam.npy"), maps[0], rtol=0, atol=1e-5)
    heat = _heatmap(maps[0], (8, 10, 6))
    zoom = math.ceil(128 / 10)  # cells enlarged to about 128 pixels on the largest side
    montage = _png(out / "v_gradcam_montage.png")
    _assert_same_picture(montage, volume_montage(volume, heat, zoom=zoom, alpha=0.5))
    assert montage.shape == (3 * (10 * zoom + 2) - 2, 3 * (6 * zoom + 2) - 2, 3)  # 8 slices, 3x3
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    slices = _png(out / "v_gradcam_slices.png")
    _assert_same_picture(slices, orthogonal_slices(volume, heat, center=peak, zoom=zoom, alpha=0.5))
    row = _table_row(printed, "v_gradcam_montage.png")
    assert row[:2] == [str(tmp_path / "v.npy"), "0"]
    assert float(row[2]) == pytest.approx(scores[0], rel=1e-3)
    assert sorted(p.name for p in out.iterdir()) == [
        "v_gradcam.npy",
        "v_gradcam_montage.png",
        "v_gradcam_slices.png",
    ]


@pytest.mark.parametrize(
    ("flags", "existing"),
    [([], "v_gradcam_slices.png"), (["--top-k", "1"], "v_class1_gradcam_montage.png")],
)
def test_existing_volume_outputs_are_refused_before_computing(
    tmp_path, capsys, monkeypatch, flags, existing
):
    """A volume's _slices/_montage names, exact or class-dependent, are checked up front."""

    def computed(*args, **kwargs):
        pytest.fail("Grad-CAM was computed before the outputs were checked")

    model = _saved(_volume_model(), tmp_path)
    monkeypatch.setattr(tf_gradcam.GradCAM, "__call__", computed)
    np.save(tmp_path / "v.npy", np.zeros((8, 10, 6, 1), np.float32))
    out = tmp_path / "out"
    out.mkdir()
    (out / existing).write_bytes(b"earlier run")
    assert main(["explain", model, str(tmp_path / "v.npy"), *flags, "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert repr(str(out / existing)) in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == [existing]


# ------------------------------------------------------------------ refused inputs


def _refused_case(tmp_path: Path, case: str) -> tuple[list[str], list[str]]:
    """Arguments of a refused call, and the parts its error line must hold."""
    signal_model = tmp_path / "signal.keras"
    _signal_model().save(signal_model)
    path = tmp_path / f"{case}.npy"
    rng = np.random.default_rng(6)
    if case == "wrong-channels":
        np.save(path, rng.normal(size=(40, 3)))
        return [str(signal_model), str(path)], ["(40, 3)", "(length, channels) = (40, 2)"]
    if case == "transposed":
        np.save(path, rng.normal(size=(2, 40)))
        return [str(signal_model), str(path)], ["(2, 40)", "(40, 2)", "another order"]
    if case == "batch":
        np.save(path, rng.normal(size=(3, 40, 2)))
        return [str(signal_model), str(path)], ["(3, 40, 2)", "(40, 2)", "batch of 3"]
    if case == "volume-for-signal-model":
        np.save(path, rng.normal(size=(8, 10, 6, 1)))
        return [str(signal_model), str(path)], ["(8, 10, 6, 1)", "one signal", "(40, 2)"]
    if case == "signal-for-volume-model":
        volume_model = tmp_path / "volume.keras"
        _volume_model().save(volume_model)
        np.save(path, rng.normal(size=(40, 2)))
        return [str(volume_model), str(path)], [
            "(40, 2)",
            "(depth, height, width, channels) = (8, 10, 6, 1)",
            "(8, 10, 6) for one channel",
        ]
    if case == "image-for-signal-model":
        image = tmp_path / "photo.png"
        cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
        return [str(signal_model), str(image)], ["not a .npy/.npz", "takes signals", "(40, 2)"]
    if case == "array-for-image-model":
        image_model = tmp_path / "image.keras"
        _image_model().save(image_model)
        np.save(path, rng.random((8, 8, 3)))
        return [str(image_model), str(path)], ["is an array file", "takes images", "PNG/JPEG"]
    if case == "npz-with-two-arrays":
        path = tmp_path / "two.npz"
        np.savez(path, a=rng.normal(size=(40, 2)), b=rng.normal(size=(40, 2)))
        return [str(signal_model), str(path)], ["holds 2 arrays", "exactly one"]
    if case == "non-finite":
        signal = rng.normal(size=(40, 2))
        signal[3, 1] = np.nan
        np.save(path, signal)
        return [str(signal_model), str(path)], ["NaN or infinite"]
    if case == "scalar":
        np.save(path, np.float32(1.5))
        return [str(signal_model), str(path)], ["shape ()", "(length, channels) = (40, 2)"]
    if case == "empty":
        np.save(path, np.zeros((0, 2)))
        return [str(signal_model), str(path)], ["empty array", "(0, 2)"]
    if case == "pickled":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        return [str(signal_model), str(path)], ["cannot read array", "pickled object array"]
    assert case == "preprocess"
    np.save(path, rng.normal(size=(40, 2)))
    return [str(signal_model), str(path), "--preprocess", "raw"], ["--preprocess", "as stored"]


@pytest.mark.parametrize(
    "case",
    [
        "wrong-channels",
        "transposed",
        "batch",
        "volume-for-signal-model",
        "signal-for-volume-model",
        "image-for-signal-model",
        "array-for-image-model",
        "npz-with-two-arrays",
        "non-finite",
        "scalar",
        "empty",
        "pickled",
        "preprocess",
    ],
)
def test_unsuitable_inputs_are_one_line_naming_the_file_and_shapes(tmp_path, capsys, case):
    """Wrong shapes, ranks and kinds of input file: exit 2, one line saying what to give."""
    args, parts = _refused_case(tmp_path, case)
    out = tmp_path / "out"
    assert main(["explain", *args, "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    if case != "preprocess":  # a flag, not a file, is wrong there
        assert repr(args[1]) in line
    for part in parts:
        assert part in line, line
    assert not out.exists()  # nothing written, the folder it created removed
