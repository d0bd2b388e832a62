"""The demo model served with its explanations: a SavedModel, a TFLite and an ONNX CAM model.

Exports the shipped demo CNN three ways with `tf_gradcam.export`: a SavedModel
whose `explain` signature returns predictions, top-2 classes, scores and
heatmaps (loaded back with `tf.saved_model.load` alone, as TensorFlow
Serving would), and the forward-only CAM model as a `.tflite` file (run by
the LiteRT interpreter) and as a `.onnx` file (run by onnxruntime). Prints the
largest difference of each runtime's heatmaps from `GradCAM` in Python, the
request body TensorFlow Serving's REST API takes, and saves a figure: one row
per scene, the scene, then the top class's heatmap from each runtime.

Run:
    python examples/serving.py --out examples/out        # needs tf_gradcam[export]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

import tf_gradcam
from tf_gradcam.demo_model import DEMO_CLASS_NAMES, load_demo_model
from tf_gradcam.scenes import make_scenes


def tflite_explain(path: str):
    """The `explain` signature of a .tflite file, through LiteRT (or TensorFlow's interpreter)."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=path)
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # deprecated in favour of LiteRT
            interpreter = tf.lite.Interpreter(model_path=path)
    return interpreter.get_signature_runner("explain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/out", help="folder for the figure")
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="0: circle, triangle, square")
    args = parser.parse_args()
    import onnxruntime

    model = load_demo_model()
    images = make_scenes(args.scenes, seed=args.seed).images.astype(np.float32)
    python = tf_gradcam.GradCAM(model)(images, target=tf_gradcam.TopK(2))
    folder = tempfile.mkdtemp()

    saved_model = tf_gradcam.export(model, os.path.join(folder, "demo", "1"), top_k=2)
    served = tf.saved_model.load(saved_model).signatures["explain"]
    runtimes = {"SavedModel": {k: v.numpy() for k, v in served(images=images).items()}}

    tflite = tf_gradcam.export(model, os.path.join(folder, "demo.tflite"), format="tflite", top_k=2)
    runtimes["TFLite (LiteRT)"] = tflite_explain(tflite)(images=images)

    onnx = tf_gradcam.export(model, os.path.join(folder, "demo.onnx"), format="onnx", top_k=2)
    onnx_model = onnxruntime.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    names = [output.name for output in onnx_model.get_outputs()]
    runtimes["ONNX Runtime"] = dict(
        zip(names, onnx_model.run(None, {"images": images}), strict=True)
    )

    for name, outputs in runtimes.items():
        gap = np.abs(outputs["heatmaps"] - python.heatmaps).max()
        same = np.array_equal(outputs["classes"], python.classes)
        print(f"{name:<16} max |heatmap - GradCAM| = {gap:.1e}, same classes: {same}")
    body = {"signature_name": "explain", "instances": images[:1].astype(float).round(3).tolist()}
    print(f"TF Serving REST body (POST /v1/models/demo:predict): {json.dumps(body)[:88]}...")

    columns = ["scene", *runtimes]
    figure, axes = plt.subplots(
        args.scenes, len(columns), figsize=(1.9 * len(columns), 1.9 * args.scenes)
    )
    for row in range(args.scenes):
        axes[row, 0].imshow(images[row])
        for column, outputs in enumerate(runtimes.values(), start=1):
            picture = tf_gradcam.overlay(images[row], outputs["heatmaps"][row, 0])
            axes[row, column].imshow(picture)
            label = DEMO_CLASS_NAMES[outputs["classes"][row, 0]]
            axes[row, column].set_xlabel(f"{label} {outputs['predictions'][row].max():.2f}")
        for column, title in enumerate(columns):
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
            if row == 0:
                axes[row, column].set_title(title, fontsize=9)
    figure.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "serving_runtimes.png")
    figure.savefig(path, dpi=72)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
