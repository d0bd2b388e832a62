"""The `tf-gradcam` command: `demo` and `explain`. The only module that touches image files.

    tf-gradcam demo [--out DIR] [--count N]
    tf-gradcam explain MODEL IMAGE... [--layer NAME] [--class INDEX] [--top-k K]
                       [--method gradcam|counterfactual|guided_backprop|guided_gradcam] [--out DIR]

`explain` loads a `.keras` model with Keras' safe mode on (`--trust-model`
turns it off, for models whose Lambda layers you trust), reads PNG/JPEG
images, resizes them to the model's input, and writes colour overlays and the
raw maps (`.npy`) into the output folder and nowhere else.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]

_PREPROCESS = {
    "unit": (1.0 / 255.0, 0.0),  # [0, 1]
    "raw": (1.0, 0.0),  # [0, 255]
    "symmetric": (2.0 / 255.0, -1.0),  # [-1, 1]
}


def _safe_stem(path: str, taken: set[str]) -> str:
    """A file-name stem from an input path that cannot leave the output folder."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem).lstrip(".") or "image"
    candidate, n = stem, 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}_{n}"
    taken.add(candidate)
    return candidate


def _write_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"Could not write {path}.")


def _read_rgb(path: str) -> np.ndarray:
    import cv2

    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f"tf-gradcam: cannot read image {path!r} (not a PNG/JPEG file?).")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _run_demo(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tf_gradcam import GradCAM, overlay
    from tf_gradcam.demo_model import DEMO_CLASS_NAMES, DEMO_LAYER_NAME, load_demo_model
    from tf_gradcam.metrics import pointing_game
    from tf_gradcam.scenes import make_scenes

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_demo_model()
    scenes = make_scenes(args.count, seed=args.seed)
    cam = GradCAM(model, DEMO_LAYER_NAME)
    result = cam(scenes.images)
    overlays = overlay(scenes.images, result.heatmaps)
    hits = pointing_game(result.heatmaps, scenes.masks[:, 0])
    written = []
    for i in range(len(scenes)):
        path = out / f"scene_{i:02d}_{DEMO_CLASS_NAMES[result.classes[i]]}.png"
        _write_png(path, overlays[i])
        written.append(path)
    np.save(out / "maps.npy", result.maps)

    columns = len(scenes)
    figure, axes = plt.subplots(2, columns, figsize=(2.0 * columns, 4.3))
    axes = np.asarray(axes).reshape(2, columns)
    for i in range(columns):
        truth = DEMO_CLASS_NAMES[scenes.labels[i]]
        guess = DEMO_CLASS_NAMES[result.classes[i]]
        axes[0, i].imshow(scenes.images[i])
        axes[0, i].set_title(f"true: {truth}", fontsize=9)
        axes[1, i].imshow(overlays[i])
        axes[1, i].set_title(f"Grad-CAM: {guess}", fontsize=9)
        for ax in axes[:, i]:
            ax.axis("off")
    figure.suptitle(f"tf_gradcam demo — layer {result.layer!r}", fontsize=10)
    figure.tight_layout()
    grid = out / "demo_grid.png"
    figure.savefig(grid, dpi=100)
    plt.close(figure)

    accuracy = float(np.mean(result.classes == scenes.labels))
    print(f"tf_gradcam demo: explained {len(scenes)} generated scenes with the shipped model")
    print(f"  layer: {result.layer}   predicted correctly: {accuracy:.0%}")
    print(f"  map maximum on the object (pointing game): {hits.mean():.0%}")
    print(f"  overview:  {grid.resolve()}")
    print(f"  overlays:  {len(written)} PNGs in {out.resolve()}")
    print(f"  raw maps:  {(out / 'maps.npy').resolve()}  shape {result.maps.shape}")
    return 0


def _run_explain(args: argparse.Namespace) -> int:
    import cv2
    import keras

    from tf_gradcam import TopK, overlay
    from tf_gradcam.image import normalize_gradients

    model_path = Path(args.model)
    if model_path.suffix != ".keras":
        raise SystemExit(
            f"tf-gradcam: {args.model!r} is not a .keras file. Save the model with "
            "model.save('model.keras'); legacy .h5 files are not loaded (their Lambda "
            "layers bypass Keras' safe mode)."
        )
    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=not args.trust_model)
    except ValueError as error:
        if "safe_mode" in str(error) or "unsafe" in str(error).lower():
            raise SystemExit(
                f"tf-gradcam: Keras safe mode refused {args.model!r}: {error}\n"
                "Pass --trust-model only if you trust where this model comes from."
            ) from error
        raise
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[1] is None or shape[2] is None:
        raise SystemExit(
            f"tf-gradcam: the CLI needs a model with one fixed-size image input; this "
            f"model's input shape is {shape}. Use the Python API for other models."
        )
    height, width, channels = shape[1], shape[2], shape[3]
    scale, shift = _PREPROCESS[args.preprocess]
    originals = [_read_rgb(p) for p in args.images]
    batch = []
    for rgb in originals:
        resized = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
        if channels == 1:
            resized = cv2.cvtColor(resized, cv2.COLOR_RGB2GRAY)[..., None]
        batch.append(resized.astype(np.float32) * scale + shift)
    images = np.stack(batch)
    target = TopK(args.top_k) if args.top_k else args.class_index
    result, pixels = _explain_with_method(model, images, target, args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    method = args.method.replace("_", "-")
    for i, (path, rgb) in enumerate(zip(args.images, originals, strict=True)):
        stem = _safe_stem(path, taken)
        classes = np.atleast_1d(result.classes[i])
        heat = result.heatmaps[i].reshape(len(classes), height, width)
        maps = result.maps[i].reshape(len(classes), *result.maps.shape[-2:])
        for j, c in enumerate(classes):
            name = f"{stem}_class{int(c)}_{method}" if args.top_k else f"{stem}_{method}"
            if pixels is None:
                big = cv2.resize(
                    heat[j], (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR
                )
                _write_png(out / f"{name}.png", overlay(rgb, big, alpha=args.alpha))
                np.save(out / f"{name}.npy", maps[j])
            else:
                grads = pixels[i].reshape(len(classes), height, width, -1)[j]
                picture = normalize_gradients(grads[None])[0]
                picture = np.repeat(picture, 3, axis=-1) if picture.shape[-1] == 1 else picture
                _write_png(out / f"{name}.png", np.round(picture[..., :3] * 255).astype(np.uint8))
                np.save(out / f"{name}.npy", grads)
        scores = np.atleast_1d(result.scores[i])
        label = ", ".join(f"{int(c)} (score {s:.3g})" for c, s in zip(classes, scores, strict=True))
        print(f"{path}: class {label} -> {out / stem}*_{method}.png")
    print(f"layer: {result.layer}; wrote {len(args.images)} image(s) into {out.resolve()}")
    return 0


def _explain_with_method(
    model: Any, images: np.ndarray, target: Any, args: argparse.Namespace
) -> tuple[Any, np.ndarray | None]:
    """Run the chosen method: (Grad-CAM explanation, pixel gradients or None)."""
    from tf_gradcam import GradCAM, GuidedBackprop, GuidedGradCAM

    if args.method == "gradcam":
        return GradCAM(model, args.layer)(images, target=target), None
    if args.method == "counterfactual":
        return GradCAM(model, args.layer, counterfactual=True)(images, target=target), None
    fused = GuidedGradCAM(model, args.layer)(images, target=target)
    if args.method == "guided_gradcam":
        return fused.cam, fused.gradients
    backprop = GuidedBackprop(model)(images, target=target)
    return fused.cam, backprop.gradients


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tf-gradcam", description="Grad-CAM explanations for Keras models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="explain generated scenes with the shipped demo model")
    demo.add_argument("--out", default="tf_gradcam_demo", help="output folder")
    demo.add_argument("--count", type=int, default=6, help="number of scenes (default 6)")
    demo.add_argument("--seed", type=int, default=2026, help="scene generator seed")
    demo.set_defaults(run=_run_demo)

    explain = sub.add_parser("explain", help="explain images with a saved .keras model")
    explain.add_argument("model", help="path to a .keras model file")
    explain.add_argument("images", nargs="+", help="PNG/JPEG image files")
    explain.add_argument("--layer", default=None, help="layer name or 'outer/inner' path")
    explain.add_argument(
        "--class", dest="class_index", type=int, default=None, help="class index to explain"
    )
    explain.add_argument("--top-k", type=int, default=0, help="explain the top-k classes")
    explain.add_argument("--out", default="gradcam_out", help="output folder")
    explain.add_argument(
        "--preprocess",
        choices=sorted(_PREPROCESS),
        default="unit",
        help="pixel scaling the model expects: unit [0,1], raw [0,255], symmetric [-1,1]",
    )
    explain.add_argument(
        "--method",
        choices=("gradcam", "counterfactual", "guided_backprop", "guided_gradcam"),
        default="gradcam",
        help="what to draw: Grad-CAM overlay (default), counterfactual Grad-CAM (§3.3), "
        "guided backprop or Guided Grad-CAM gradients (§3.2)",
    )
    explain.add_argument("--alpha", type=float, default=0.4, help="overlay opacity")
    explain.add_argument(
        "--trust-model",
        action="store_true",
        help="load with Keras safe mode off (only for models from a trusted source)",
    )
    explain.set_defaults(run=_run_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tf-gradcam` console script.

    Args:
        argv: command-line arguments without the program name (default `sys.argv[1:]`).

    Returns:
        The process exit status (0 on success).

    Raises:
        SystemExit: on bad arguments or unreadable files, with a message.

    Example:
        >>> main(["demo", "--out", "/tmp/demo"])
        0
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = _parser().parse_args(argv)
    from tf_gradcam.errors import GradCAMError

    try:
        return args.run(args)
    except GradCAMError as error:
        print(f"tf-gradcam: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
