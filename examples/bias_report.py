"""An HTML audit report of a biased model: sorted by Grad-CAM mass on the cue, shortcuts on top.

The scenes and CNN of `examples/bias_detection.py` (the paper's §6.3 in
miniature), with one change: the coloured corner patch is in half of the
images only (`--patch`), and where it is, it agrees with the shape's class
in 95% of the training images. The model must learn the shapes for the
images without a patch, and it does: its test accuracy is high. But on some
images it still takes the shortcut. Its Grad-CAM maps over a test set
(patch in half of the images, its colour a coin flip) are written to shards
with `explain_dataset`, and `report` turns them into one HTML page
with the mass on the patch ("cue") and on the object per image. Sorted by
mass on the cue, the page opens on the shortcut images: heat in the corner,
and the prediction wrong where the patch contradicts the shape.

(With the patch in every image, as in bias_detection.py, the model reads
only the patch: every card has about the same mass on the cue, and the
whole report is the shortcut.)

Run:
    python examples/bias_report.py --out examples/out
    # open examples/out/bias_report.html; "Sort by: mass on cue, high → low"
    python examples/bias_report.py --out examples/out --screenshot docs/images/report_bias.png
    # 10,000 images: file size, writing time, and load/sort/filter/page times in Chromium
    python examples/bias_report.py --out /tmp/report10k --test 10000 --measure

The screenshot and `--measure` need the `playwright` package and a Chromium
(`--chromium`, `/usr/bin/chromium` by default; Playwright's own download is
not used).

Outputs in --out: `bias_shards/` (the shards) and `bias_report.html`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bias_detection, beside this file
from bias_detection import CLASS_NAMES, CUE, make_model, make_scenes

try:
    import tf_gradcam
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tf_gradcam

CHROMIUM_FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
#: the view the screenshot shows: sorted by mass on the cue (region 0), highest first
SCREENSHOT_VIEW = "#sort=mass%3A0%3Adesc&pageSize=30"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="examples/out", help="output folder")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30, help="batches of 32 per epoch")
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--test", type=int, default=1000, help="images in the report")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--patch", type=float, default=0.5, help="fraction of the images with a patch (0.5)"
    )
    parser.add_argument("--screenshot", metavar="PNG", help="save a screenshot of the report")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    parser.add_argument("--format", choices=("png", "jpeg"), default="png", help="card pictures")
    parser.add_argument(
        "--measure", action="store_true", help="time loading, sorting and paging in Chromium"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    rng = np.random.default_rng(args.seed)
    x, y, _, _ = make_scenes(args.train, cue_agreement=0.95, rng=rng)
    x, _ = drop_patches(x, args.patch, rng)
    test_images, test_labels, cue_boxes, object_boxes = make_scenes(args.test, 0.5, rng)
    test_images, patched = drop_patches(test_images, args.patch, rng)
    model = make_model(args.seed)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=args.seed)
    model.fit(batches.repeat().batch(32), epochs=args.epochs, steps_per_epoch=args.steps, verbose=0)
    trained = time.perf_counter()

    shards = out / "bias_shards"
    tf_gradcam.explain_dataset(
        model,
        (test_images, test_labels),
        layer="last_conv",
        batch_size=250,
        output_dir=shards,
        overwrite=True,
        verbose=0,
    )
    summary = tf_gradcam.report(
        shards,
        test_images,
        out=out / "bias_report.html",
        class_names=CLASS_NAMES,
        regions={"cue": cue_boxes, "object": object_boxes},
        title="Disk or square? A CNN trained with a colour cue (95% of the patches agree)",
        image_format=args.format,
        overwrite=True,
    )
    print(
        f"trained in {trained - start:.0f} s; wrote {summary.path} ({summary.cards} images, "
        f"{summary.bytes / 1e6:.1f} MB) in {summary.seconds:.1f} s"
    )
    describe(shards, test_images, test_labels, patched)
    if args.screenshot:
        screenshot(Path(summary.path), Path(args.screenshot), args.chromium)
        print(f"screenshot of the report sorted by mass on the cue: {args.screenshot}")
    if args.measure:
        measure(Path(summary.path), args.chromium)


def drop_patches(
    images: np.ndarray, keep: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The images with the patch painted over by background noise in a `1 - keep` fraction.

    Returns:
        `(images, patched)`: a copy of the images, and a bool per image, True where the
        patch is left.
    """
    patched = rng.random(len(images)) < keep
    x0, y0, x1, y1 = CUE
    noise = rng.uniform(0.25, 0.45, ((~patched).sum(), y1 - y0, x1 - x0, 1)).astype(np.float32)
    images = images.copy()
    images[~patched, y0:y1, x0:x1] = noise  # grey, like make_scenes' background
    return images, patched


def describe(shards: Path, images: np.ndarray, labels: np.ndarray, patched: np.ndarray) -> None:
    """Print what the first page of the cue-mass order holds, against the whole test set."""
    parts = list(tf_gradcam.iter_shards(shards))
    index = np.concatenate([p["index"] for p in parts])
    order = np.argsort(index)
    heatmaps = np.concatenate([p["heatmaps"] for p in parts])[order]
    classes = np.concatenate([p["classes"] for p in parts])[order]
    x0, y0, x1, y1 = CUE
    total = np.maximum(heatmaps.sum(axis=(1, 2)), 1e-12)
    cue = heatmaps[:, y0:y1, x0:x1].sum(axis=(1, 2)) / total
    red = images[:, 0, 0, 0] > 0.5  # the patch says "disk"
    conflict = patched & (np.where(red, 0, 1) != labels)
    wrong = classes != labels
    top = np.argsort(-cue, kind="stable")[:30]
    print(
        f"accuracy {1 - wrong.mean():.1%} ({wrong.sum()} wrong of {len(wrong)}); on the "
        f"{conflict.sum()} images whose patch contradicts the shape "
        f"{1 - wrong[conflict].mean():.1%}"
    )
    print(
        f"mean mass on the cue: {cue[patched].mean():.2f} with a patch, "
        f"{cue[~patched].mean():.2f} without, {cue[wrong].mean():.2f} on the wrong predictions"
    )
    print(
        f"first page sorted by mass on the cue (30 cards): mass {cue[top].min():.2f}-"
        f"{cue[top].max():.2f}, patch contradicts the shape on {conflict[top].mean():.0%}, "
        f"wrong on {wrong[top].mean():.0%}"
    )


#: one timed step in the page: change a control, then wait for the next frame to be drawn
_TIMED = """async ([selector, value]) => {
  const start = performance.now();
  const control = document.querySelector(selector);
  if (value === null) control.click();
  else {
    control.value = value;
    control.dispatchEvent(new Event(control.type === "number" ? "input" : "change"));
  }
  await new Promise((done) => requestAnimationFrame(() => setTimeout(done, 0)));
  return performance.now() - start;
}"""


def measure(report: Path, chromium: str, repeats: int = 5) -> None:
    """Print load, sort, filter and page-switch times of the report in headless Chromium.

    Each time is the median of `repeats` fresh page loads; a step's time runs from the
    control's change to the next frame drawn after it (the new cards included).
    """
    from playwright.sync_api import sync_playwright

    steps = {
        "sort by mass on cue": ("#sort", "mass:0:desc"),
        "filter one class": ("#class", "1"),
        "next page": ("#next", None),
        "page size 240": ("#page-size", "240"),
    }
    times: dict[str, list[float]] = {"load (to first page shown)": []} | {k: [] for k in steps}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=list(CHROMIUM_FLAGS)
        )
        try:
            for _ in range(repeats):
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                begin = time.perf_counter()
                page.goto(report.resolve().as_uri())
                page.wait_for_selector("html[data-ready='1']")
                times["load (to first page shown)"].append(1000 * (time.perf_counter() - begin))
                for name, (selector, value) in steps.items():
                    times[name].append(page.evaluate(_TIMED, [selector, value]))
                images = page.eval_on_selector_all("img", "i => i.length")
                heap = page.evaluate("performance.memory ? performance.memory.usedJSHeapSize : 0")
                page.close()
        finally:
            browser.close()
    size = report.stat().st_size / 1e6
    print(f"{report.name}: {size:.1f} MB; Chromium, median of {repeats} page loads:")
    for name, values in times.items():
        print(f"  {name:28s} {np.median(values):7.0f} ms")
    print(f"  <img> elements at the end: {images}; JavaScript heap {heap / 1e6:.0f} MB")


def screenshot(report: Path, png: Path, chromium: str) -> None:
    """Open the report in headless Chromium sorted by mass on the cue and save the view."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=list(CHROMIUM_FLAGS)
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(report.resolve().as_uri() + SCREENSHOT_VIEW)
            page.wait_for_selector("html[data-ready='1']")
            if errors:
                raise RuntimeError(f"the report logged errors: {errors}")
            png.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(png))
        finally:
            browser.close()


if __name__ == "__main__":
    main()
