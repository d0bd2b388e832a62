"""Grad-CAM at every convolutional layer of the demo model (Selvaraju et al., Fig. 13).

Explains the predicted class of a few generated scenes at every layer with a
4-D output, from one forward and one backward pass (`explain_layers`), prints
how often each layer's map peaks on the object (pointing game), and saves the
Fig. 13-style figure: one row per image, one overlay per layer. The paper
finds that "localization becomes progressively worse as we move to earlier
convolutional layers" (Appendix B.1).

Run:
    python examples/layers.py --out examples/out
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tf_gradcam
from tf_gradcam import metrics
from tf_gradcam.demo_model import DEMO_CLASS_NAMES, load_demo_model
from tf_gradcam.scenes import make_scenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/out", help="folder for the figure")
    parser.add_argument("--scenes", type=int, default=200, help="scenes for the pointing game")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    started = time.perf_counter()

    model = load_demo_model()
    scenes = make_scenes(args.scenes, seed=args.seed)
    cams = tf_gradcam.MultiLayerGradCAM(model)  # every layer with a 4-D output
    results = cams(scenes.images)  # predicted classes

    print(f"pointing game on {args.scenes} scenes (map maximum on the object), by layer:")
    for path, result in results.items():
        hits = metrics.pointing_game(result.heatmaps, scenes.masks[:, 0])
        print(
            f"  {path:<10} {result.maps.shape[1]:>2}×{result.maps.shape[2]:<2}"
            f" {metrics.pointing_accuracy(hits):6.1%}"
        )

    shown = 3
    titles = [
        f"{scenes.color_names[c]} {DEMO_CLASS_NAMES[k]}"
        for c, k in zip(
            scenes.object_colors[:shown, 0], results["last_conv"].classes[:shown], strict=True
        )
    ]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "layers.png")
    images = scenes.images[:shown]
    tf_gradcam.plot_layers(images, cams(images), path, image_titles=titles, dpi=72)
    print(f"figure: {path}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
