"""The serving export: SavedModel signatures, TFLite and ONNX CAM models, bad input.

References: `GradCAM` (and its sibling methods) called in Python on the same
images, and, for heads where CAM equals Grad-CAM (global average pooling →
Dense, paper §3.1), an independent NumPy/OpenCV CAM: `ReLU(Σ_k w_kc A^k)`
from the layer's activations and the Dense kernel, resized with
`cv2.resize(INTER_LINEAR)` and divided by its maximum; scores from the pooled
features times the kernel plus the bias.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_cnn
from keras import layers

import tf_gradcam
from tf_gradcam import (
    GradCAM,
    InputError,
    TargetError,
    TopK,
    UnknownMethodError,
    UnsupportedModelError,
)
from tf_gradcam.cam_export import cam_kernel
from tf_gradcam.demo_model import load_demo_model
from tf_gradcam.methods import get_method
from tf_gradcam.scenes import make_scenes

pytestmark = pytest.mark.filterwarnings("ignore:.*are all zero:RuntimeWarning")

WORKERS = Path(__file__).resolve().parent / "export_workers"


def _seeded_cnn(**kwargs) -> keras.Model:
    keras.utils.set_random_seed(1234)
    return make_cnn(**kwargs)


def _images(count: int = 4, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, size, size, 3), dtype=np.float32)


def _numpy_cam(model: keras.Model, layer: str, dense: str, images: np.ndarray, classes):
    """CAM from the layer's activations and the Dense kernel: heatmaps, layer maps, logits.

    Heatmaps and maps are those of `classes`, `(batch, k)`; logits `(batch, classes)`.
    """
    features = keras.Model(model.input, model.get_layer(layer).output)(images).numpy()
    head = model.get_layer(dense)
    kernel, bias = head.kernel.numpy().astype(np.float64), head.bias.numpy().astype(np.float64)
    logits = features.astype(np.float64).mean(axis=(1, 2)) @ kernel + bias
    maps = np.maximum(np.einsum("nhwc,ck->nkhw", features.astype(np.float64), kernel), 0.0)
    maps = np.take_along_axis(maps, np.asarray(classes)[:, :, None, None], axis=1)
    height, width = images.shape[1:3]
    heatmaps = np.zeros((*maps.shape[:2], height, width), np.float32)
    for index in np.ndindex(*maps.shape[:2]):
        up = cv2.resize(maps[index].astype(np.float32), (width, height), cv2.INTER_LINEAR)
        heatmaps[index] = up / up.max() if up.max() > 0 else 0.0
    return heatmaps, maps, logits


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def assert_outputs_equal_gradcam(outputs: dict, cam, images, target, model, atol=1e-6) -> None:
    """The signature's outputs equal the explainer's Python results and the model's outputs."""
    reference = cam(images, target=target)
    np.testing.assert_allclose(np.asarray(outputs["heatmaps"]), reference.heatmaps, atol=atol)
    np.testing.assert_allclose(
        np.asarray(outputs["scores"]), reference.scores, rtol=atol, atol=atol
    )
    np.testing.assert_array_equal(np.asarray(outputs["classes"]), reference.classes)
    np.testing.assert_allclose(
        np.asarray(outputs["predictions"]), model(images).numpy(), rtol=atol, atol=atol
    )


def _run(signature, **inputs) -> dict:
    return {key: value.numpy() for key, value in signature(**inputs).items()}


# ------------------------------------------------------------ the SavedModel


@pytest.fixture(scope="module")
def cnn_export(tmp_path_factory):
    """make_cnn (softmax head) exported with top_k=2, loaded in this process."""
    model = _seeded_cnn()
    path = tmp_path_factory.mktemp("cnn") / "model"
    written = tf_gradcam.export(model, path, top_k=2)
    return model, written, tf.saved_model.load(written)


def test_explain_is_gradcam_top_k_and_cam(cnn_export):
    """`explain` = GradCAM(TopK(2)) to 1e-6, = NumPy CAM (§3.1), predictions = model(x)."""
    model, written, served = cnn_export
    images = _images()
    assert written == os.path.abspath(written) and sorted(served.signatures) == [
        "explain",
        "explain_classes",
        "serving_default",
    ]
    outputs = _run(served.signatures["explain"], images=tf.constant(images))
    assert outputs["heatmaps"].dtype == np.float32 and outputs["heatmaps"].shape == (4, 2, 16, 16)
    assert_outputs_equal_gradcam(outputs, GradCAM(model), images, TopK(2), model)
    heatmaps, _, logits = _numpy_cam(model, "last_conv", "head", images, outputs["classes"])
    np.testing.assert_array_equal(outputs["classes"], np.argsort(-logits, axis=1)[:, :2])
    np.testing.assert_allclose(outputs["scores"], np.sort(logits, axis=1)[:, ::-1][:, :2], 1e-5)
    np.testing.assert_allclose(outputs["heatmaps"], heatmaps, atol=1e-5)
    np.testing.assert_allclose(outputs["predictions"], _softmax(logits), atol=1e-6)
    default = _run(served.signatures["serving_default"], images=tf.constant(images))
    np.testing.assert_array_equal(default["heatmaps"], outputs["heatmaps"])


def test_explain_classes_is_gradcam_with_those_classes(cnn_export):
    """`explain_classes` = GradCAM(target=classes), one map per image, any batch size."""
    model, _, served = cnn_export
    images = _images(5, seed=1)
    classes = np.array([2, 0, 1, 1, 0], np.int32)
    outputs = _run(served.signatures["explain_classes"], images=images, classes=classes)
    assert outputs["heatmaps"].shape == (5, 16, 16)
    assert_outputs_equal_gradcam(outputs, GradCAM(model), images, classes, model)
    heatmaps, _, _ = _numpy_cam(model, "last_conv", "head", images, classes[:, None])
    np.testing.assert_allclose(outputs["heatmaps"], heatmaps[:, 0], atol=1e-5)
    single = _run(served.signatures["explain_classes"], images=images[:1], classes=classes[:1])
    np.testing.assert_allclose(single["heatmaps"], outputs["heatmaps"][:1], atol=1e-6)


def test_bad_requests_fail_in_the_graph(cnn_export):
    """Out-of-range or miscounted classes and NaN images are refused by the served graph."""
    _, _, served = cnn_export
    images = _images(2)
    given = served.signatures["explain_classes"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be < 3"):
        given(images=images, classes=np.array([0, 3], np.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=">= 0"):
        given(images=images, classes=np.array([0, -1], np.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="one class per image"):
        given(images=images, classes=np.array([0], np.int32))
    images[1, 3, 3, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or inf"):
        served.signatures["explain"](images=images)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("gradcam++", {}),
        ("xgradcam", {}),
        ("hirescam", {}),
        ("layercam", {}),
        ("eigencam", {}),
        ("gradcam", {"counterfactual": True, "pooling": "max"}),
    ],
)
def test_every_exportable_method_equals_its_class(tmp_path, method, options):
    """Each one-pass method (and Grad-CAM's options) exports the maps its class computes."""
    model = _seeded_cnn(activation=None)
    written = tf_gradcam.export(model, tmp_path / "m", method=method, top_k=2, **options)
    outputs = _run(tf.saved_model.load(written).signatures["explain"], images=_images())
    cam = get_method(method)(model, **options)
    assert_outputs_equal_gradcam(outputs, cam, _images(), TopK(2), model)


def test_uint8_heatmaps_at_the_layer_size(tmp_path):
    """uint8 maps at the layer's 12x12 = round(255 · ReLU(CAM) / max), and = GradCAM's maps."""
    model = _seeded_cnn()
    written = tf_gradcam.export(
        model, tmp_path / "m", heatmap_dtype="uint8", heatmap_size="layer", top_k=3
    )
    images = _images()
    served = tf.saved_model.load(written)
    outputs = _run(served.signatures["explain"], images=images)
    assert outputs["heatmaps"].dtype == np.uint8 and outputs["heatmaps"].shape == (4, 3, 12, 12)
    _, maps, _ = _numpy_cam(model, "last_conv", "head", images, outputs["classes"])
    peak = maps.max(axis=(2, 3), keepdims=True)
    expected = np.round(255 * np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0))
    difference = np.abs(outputs["heatmaps"].astype(int) - expected)
    assert difference.max() <= 1 and np.mean(difference == 0) > 0.99  # .5 ties may round apart
    python = GradCAM(model)(images, target=TopK(3)).maps
    peak = python.max(axis=(2, 3), keepdims=True)
    scaled = np.divide(python, peak, out=np.zeros_like(python), where=peak > 0)
    assert np.abs(outputs["heatmaps"] - np.round(255 * scaled)).max() <= 1
    classes = np.array([1, 1, 0, 2], np.int32)
    given = _run(served.signatures["explain_classes"], images=images, classes=classes)
    assert given["heatmaps"].shape == (4, 12, 12) and given["heatmaps"].dtype == np.uint8


def test_nested_sequential_and_subclassed_models(tmp_path):
    """A Sequential around a model with a Softmax layer, and a subclassed model, export exactly."""
    from test_subclassed import Net

    inner = _seeded_cnn(activation=None, name="inner")
    nested = keras.Sequential([keras.Input((16, 16, 3)), inner, layers.Softmax()])
    images = _images(3)
    written = tf_gradcam.export(nested, tmp_path / "nested")
    outputs = _run(tf.saved_model.load(written).signatures["explain"], images=images)
    assert_outputs_equal_gradcam(outputs, GradCAM(nested), images, TopK(1), nested)
    net = Net(head="softmax")
    net(images)
    with pytest.raises(InputError, match="input_shape="):
        tf_gradcam.export(net, tmp_path / "net", layer="blocks/1")
    written = tf_gradcam.export(net, tmp_path / "net", layer="blocks/1", input_shape=(16, 16, 3))
    outputs = _run(tf.saved_model.load(written).signatures["explain"], images=images)
    assert_outputs_equal_gradcam(outputs, GradCAM(net, "blocks/1"), images, TopK(1), net)


# --------------------------------------- outside Python: a fresh process, the CLI, protos


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    """The shipped demo model exported with its defaults, and three scenes."""
    model = load_demo_model()
    written = tf_gradcam.export(model, tmp_path_factory.mktemp("demo") / "demo" / "1")
    return model, written, make_scenes(3, seed=5).images.astype(np.float32)


def _environment() -> dict:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "3"}


def test_a_process_without_tf_gradcam_serves_the_same_maps(demo_export, tmp_path):
    """Where tf_gradcam cannot be imported, the loaded SavedModel serves GradCAM's outputs."""
    model, written, images = demo_export
    classes = np.array([2, 0, 1], np.int32)
    np.savez(tmp_path / "inputs.npz", images=images, classes=classes)
    done = subprocess.run(
        [
            sys.executable,
            str(WORKERS / "load_without_package.py"),
            written,
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "out.npz"),
        ],
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["blocked"] and report["tf_gradcam_modules"] == []
    assert report["inputs"]["explain"] == ["images"]
    assert report["inputs"]["explain_classes"] == ["classes", "images"]
    cam = GradCAM(model)
    with np.load(tmp_path / "out.npz") as out:
        for batch in (3, 1):
            outputs = {key: out[f"explain_{batch}_{key}"] for key in ("heatmaps", "scores")}
            outputs |= {key: out[f"explain_{batch}_{key}"] for key in ("classes", "predictions")}
            assert_outputs_equal_gradcam(outputs, cam, images[:batch], TopK(1), model)
        outputs = {key: out[f"explain_classes_3_{key}"] for key in ("heatmaps", "scores")}
        outputs |= {key: out[f"explain_classes_3_{key}"] for key in ("classes", "predictions")}
    assert_outputs_equal_gradcam(outputs, cam, images, classes, model)


def test_saved_model_cli_runs_the_signature(demo_export, tmp_path):
    """TensorFlow's own `saved_model_cli run` writes GradCAM's outputs for explain_classes."""
    model, written, images = demo_export
    classes = np.array([1, 1, 2], np.int32)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "classes.npy", classes)
    cli = Path(sys.executable).with_name("saved_model_cli")
    done = subprocess.run(
        [
            str(cli),
            "run",
            "--dir",
            written,
            "--tag_set",
            "serve",
            "--signature_def",
            "explain_classes",
            "--inputs",
            f"images={tmp_path / 'images.npy'};classes={tmp_path / 'classes.npy'}",
            "--outdir",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = {key: np.load(tmp_path / "out" / f"{key}.npy") for key in ("heatmaps", "scores")}
    outputs |= {key: np.load(tmp_path / "out" / f"{key}.npy") for key in ("classes", "predictions")}
    assert_outputs_equal_gradcam(outputs, GradCAM(model), images, classes, model)


def test_tensorflow_serving_requests_fit_the_signature_def(demo_export):
    """A PredictRequest keyed by the signature's inputs matches the SignatureDef read from disk."""
    predict_pb2 = pytest.importorskip("tensorflow_serving.apis.predict_pb2")
    from tensorflow.core.protobuf import saved_model_pb2

    model, written, images = demo_export
    graph = saved_model_pb2.SavedModel.FromString(Path(written, "saved_model.pb").read_bytes())
    definition = graph.meta_graphs[0].signature_def["explain_classes"]
    classes = np.array([0, 2, 2], np.int32)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "demo"
    request.model_spec.signature_name = "explain_classes"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    request.inputs["classes"].CopyFrom(tf.make_tensor_proto(classes))
    request = predict_pb2.PredictRequest.FromString(request.SerializeToString())  # the wire
    assert set(request.inputs) == set(definition.inputs) == {"images", "classes"}
    for key, tensor in request.inputs.items():
        expected = definition.inputs[key]
        assert tensor.dtype == expected.dtype
        wanted = [d.size for d in expected.tensor_shape.dim]
        got = [d.size for d in tensor.tensor_shape.dim]
        assert wanted[0] == -1 and len(got) == len(wanted) and got[1:] == wanted[1:]
    assert set(definition.outputs) == {"predictions", "classes", "scores", "heatmaps"}
    assert definition.outputs["heatmaps"].tensor_shape.dim[0].size == -1
    served = tf.saved_model.load(written).signatures["explain_classes"]
    outputs = _run(served, **{k: tf.make_ndarray(v) for k, v in request.inputs.items()})
    assert_outputs_equal_gradcam(outputs, GradCAM(model), images, classes, model)


# ------------------------------------------------------- the forward-only CAM model


def _tflite_runner(path: str):
    try:
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=path)
    except ImportError:  # TensorFlow's own interpreter, deprecated in favour of LiteRT's
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            interpreter = tf.lite.Interpreter(model_path=path)
    return interpreter.get_signature_runner("explain")


def _assert_cam_runtime(outputs: dict, model: keras.Model, images: np.ndarray) -> None:
    """A converted CAM model's outputs: GradCAM(TopK(2)) and the NumPy CAM within 1e-5."""
    assert_outputs_equal_gradcam(outputs, GradCAM(model), images, TopK(2), model, atol=1e-5)
    heatmaps, _, _ = _numpy_cam(model, "last_conv", "predictions", images, outputs["classes"])
    np.testing.assert_allclose(outputs["heatmaps"], heatmaps, atol=1e-5)


def test_tflite_cam_equals_gradcam(tmp_path):
    """The TFLite CAM model (builtin ops only) gives GradCAM's maps at batch sizes 3 and 1."""
    model = load_demo_model()
    written = tf_gradcam.export(model, tmp_path / "demo.tflite", format="tflite", top_k=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.tflite"]
    runner = _tflite_runner(written)
    images = make_scenes(3, seed=2).images.astype(np.float32)
    for batch in (3, 1):
        _assert_cam_runtime(runner(images=images[:batch]), model, images[:batch])


def test_onnx_cam_equals_gradcam(tmp_path):
    """The ONNX CAM model (tf2onnx) in onnxruntime gives GradCAM's maps at batch sizes 3 and 1."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    model = load_demo_model()
    written = tf_gradcam.export(model, tmp_path / "demo.onnx", format="onnx", top_k=2)
    onnx_model = onnxruntime.InferenceSession(written, providers=["CPUExecutionProvider"])
    (entry,) = onnx_model.get_inputs()
    assert entry.name == "images" and not isinstance(entry.shape[0], int)  # a free batch axis
    names = [output.name for output in onnx_model.get_outputs()]
    assert sorted(names) == ["classes", "heatmaps", "predictions", "scores"]
    images = make_scenes(3, seed=3).images.astype(np.float32)
    for batch in (3, 1):
        outputs = dict(zip(names, onnx_model.run(None, {"images": images[:batch]}), strict=True))
        _assert_cam_runtime(outputs, model, images[:batch])


def _head(kind: str) -> keras.Model:
    """A CNN whose head after `last_conv` is `kind`."""
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3, activation="relu", name="conv1")(inputs)
    x = layers.Conv2D(5, 3, activation="relu", name="last_conv")(x)
    if kind == "flatten":
        x = layers.Flatten(name="flat")(x)
    elif kind == "max":
        x = layers.GlobalMaxPooling2D(name="gmp")(x)
    elif kind == "mlp":
        x = layers.Dense(8, activation="relu", name="fc")(layers.GlobalAveragePooling2D()(x))
    else:  # accepted: pooling kept as a 1x1 map, flattened, dropout
        x = layers.GlobalAveragePooling2D(keepdims=True, name="gap")(x)
        x = layers.Dropout(0.5)(layers.Flatten()(x))
    outputs = layers.Dense(3, name="head")(x)
    if kind != "flatten":
        outputs = layers.Activation("softmax")(outputs)
    return keras.Model(inputs, outputs)


def test_the_cam_head_is_found_through_nesting_dropout_and_softmax_layers():
    """GAP(keepdims) → Flatten → Dropout → Dense → Activation; a nested Softmax head: the kernel."""
    model = _head("accepted")
    assert cam_kernel(GradCAM(model)) is model.get_layer("head").kernel
    inner = _seeded_cnn(activation=None, name="inner")
    nested = keras.Sequential([keras.Input((16, 16, 3)), inner, layers.Softmax()])
    cam = GradCAM(nested)
    cam(_images(1))
    assert cam_kernel(cam) is inner.get_layer("head").kernel


@pytest.mark.parametrize(
    ("kind", "layer", "reason"),
    [
        ("flatten", None, "reads a Flatten of a feature map"),
        ("max", None, "reads GlobalMaxPooling2D 'gmp'"),
        ("mlp", None, "reads Dense 'fc'"),
        ("accepted", "conv1", "reads Conv2D 'last_conv', not the explained layer; export with "),
    ],
)
def test_other_heads_are_refused_with_the_reason(tmp_path, kind, layer, reason):
    """Heads that are not GAP → Dense of the layer: UnsupportedModelError naming what they are."""
    with pytest.raises(UnsupportedModelError, match=reason):
        tf_gradcam.export(_head(kind), tmp_path / "m.tflite", layer, format="tflite")
    assert list(tmp_path.iterdir()) == []


def test_the_forward_only_form_refuses_other_methods_and_models(tmp_path, images):
    """Other methods, options, subclassed models: typed errors before anything is written."""
    from test_subclassed import Net

    model = _seeded_cnn()
    with pytest.raises(UnknownMethodError, match="forward-only CAM model"):
        tf_gradcam.export(model, tmp_path / "m.onnx", method="gradcam++", format="onnx")
    with pytest.raises(UnknownMethodError, match=r"options \['counterfactual'\]"):
        tf_gradcam.export(model, tmp_path / "m.onnx", format="onnx", counterfactual=True)
    net = Net()
    net(images)
    with pytest.raises(UnsupportedModelError, match="Functional or Sequential"):
        tf_gradcam.export(
            net, tmp_path / "m.tflite", "blocks/1", format="tflite", input_shape=(16, 16, 3)
        )
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"method": "scorecam"}, UnknownMethodError, "one extra forward pass per channel"),
        ({"method": "Ablation-CAM"}, UnknownMethodError, "with that channel zeroed"),
        ({"method": "guided gradcam"}, UnknownMethodError, "second backward pass"),
        ({"method": "nope"}, UnknownMethodError, "Unknown CAM method 'nope'"),
        ({"top_k": 0}, TargetError, "positive integer"),
        ({"top_k": 4}, TargetError, r"more classes than the model's output has \(3\)"),
        ({"heatmap_dtype": "float16"}, ValueError, "heatmap_dtype="),
        ({"heatmap_size": "image"}, ValueError, "heatmap_size="),
        ({"format": "coreml"}, ValueError, "format='coreml'"),
    ],
)
def test_bad_arguments_raise_typed_errors_and_write_nothing(tmp_path, arguments, error, match):
    """Unsupported methods, k, dtypes, sizes and formats: typed errors, the folder stays empty."""
    with pytest.raises(error, match=match):
        tf_gradcam.export(_seeded_cnn(), tmp_path / "m", **arguments)
    assert list(tmp_path.iterdir()) == []


def test_a_model_with_two_inputs_is_refused(tmp_path):
    """An exported signature takes one batch of images: two inputs are an UnsupportedModelError."""
    first, second = keras.Input((16, 16, 3)), keras.Input((4,))
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(3, 3)(first))
    model = keras.Model([first, second], layers.Dense(2)(layers.Concatenate()([x, second])))
    with pytest.raises(UnsupportedModelError, match="has 2 inputs"):
        tf_gradcam.export(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_path_is_refused_unless_overwrite(tmp_path, cnn_export):
    """An existing path: FileExistsError, untouched; overwrite=True replaces it whole."""
    model, _, _ = cnn_export
    target = tmp_path / "m"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tf_gradcam.export(model, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    tf_gradcam.export(model, target, top_k=3, overwrite=True)
    assert not (target / "keep.txt").exists()
    outputs = _run(tf.saved_model.load(str(target)).signatures["explain"], images=_images(2))
    assert outputs["heatmaps"].shape == (2, 3, 16, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left


def test_a_failure_mid_export_leaves_nothing_behind(tmp_path, cnn_export, monkeypatch):
    """A write that fails halfway: no path, no temporary folder, the old export untouched."""
    model, _, _ = cnn_export
    real_save = tf.saved_model.save

    def half_written(obj, export_dir, *args, **kwargs):
        os.makedirs(export_dir)
        Path(export_dir, "saved_model.pb").write_bytes(b"\x08\x01")  # a truncated file
        raise OSError("No space left on device")

    monkeypatch.setattr(tf.saved_model, "save", half_written)
    with pytest.raises(OSError, match="No space left"):
        tf_gradcam.export(model, tmp_path / "new" / "parents" / "m")
    assert list(tmp_path.iterdir()) == []  # the parent folders made for it are gone too
    monkeypatch.setattr(tf.saved_model, "save", real_save)
    old = tf_gradcam.export(model, tmp_path / "m")
    before = {p.relative_to(old): p.read_bytes() for p in Path(old).rglob("*") if p.is_file()}
    monkeypatch.setattr(tf.saved_model, "save", half_written)
    with pytest.raises(OSError, match="No space left"):
        tf_gradcam.export(model, old, top_k=3, overwrite=True)
    after = {p.relative_to(old): p.read_bytes() for p in Path(old).rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    monkeypatch.setattr(tf.saved_model, "save", real_save)
    with pytest.raises(FileExistsError):
        tf_gradcam.export(model, old)
