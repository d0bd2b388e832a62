"""Every CAM method of the package side by side on the demo model.

Explains the predicted class of generated scenes with each method of
`tf_gradcam.methods.METHODS` (Grad-CAM, Grad-CAM++, XGrad-CAM, HiResCAM,
LayerCAM, Score-CAM, Ablation-CAM, Eigen-CAM) and with Grad-CAM smoothed over
noisy and mirrored copies, at the demo model's last convolution and at the one
before it; prints how often each map peaks on the object (pointing game) and
the time per image, and saves a figure: one row per scene, one overlay per
method at the last layer.

Run:
    python examples/methods.py --out examples/out
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import tf_gradcam
from tf_gradcam import metrics
from tf_gradcam.demo_model import DEMO_CLASS_NAMES, load_demo_model
from tf_gradcam.methods import METHODS as REGISTRY
from tf_gradcam.methods import TITLES, get_method
from tf_gradcam.scenes import make_scenes

METHODS = {TITLES[name]: get_method(name) for name in REGISTRY}
METHODS["Grad-CAM, smoothed"] = lambda model, layer: tf_gradcam.Smoothed(
    tf_gradcam.GradCAM(model, layer), noise=0.1, samples=8, flips=True
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/out", help="folder for the figure")
    parser.add_argument("--scenes", type=int, default=200, help="scenes for the pointing game")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    started = time.perf_counter()

    model = load_demo_model()
    scenes = make_scenes(args.scenes, seed=args.seed)
    layers = [p for p in tf_gradcam.layer_paths(model, spatial_only=True) if "conv" in p][-2:]
    print(f"pointing game on {args.scenes} scenes (map maximum on the object):")
    print(f"  {'method':<19}" + "".join(f"{layer:>11}{'ms/image':>10}" for layer in layers))
    results = {}
    for name, method in METHODS.items():
        row = []
        for layer in layers:
            explainer = method(model, layer)
            explainer(scenes.images[:2])  # compile first: time the calls, not the tracing
            begin = time.perf_counter()
            result = explainer(scenes.images)
            per_image = (time.perf_counter() - begin) / len(scenes.images) * 1e3
            hits = metrics.pointing_game(result.heatmaps, scenes.masks[:, 0])
            row.append(f"{metrics.pointing_accuracy(hits):11.1%}{per_image:10.2f}")
            results[name, layer] = result
        print(f"  {name:<19}" + "".join(row))

    shown = 3
    figure, axes = plt.subplots(shown, len(METHODS), figsize=(1.6 * len(METHODS), 1.8 * shown))
    for column, name in enumerate(METHODS):
        result = results[name, layers[-1]]
        pictures = tf_gradcam.overlay(scenes.images[:shown], result.heatmaps[:shown])
        for row in range(shown):
            axis = axes[row, column]
            axis.imshow(pictures[row])
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name.replace(", ", ",\n"), fontsize=8)
            if column == 0:
                axis.set_ylabel(DEMO_CLASS_NAMES[result.classes[row]], fontsize=8)
    figure.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "methods.png")
    figure.savefig(path, dpi=72)
    print(f"figure: {path} (layer {layers[-1]}); total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
