"""Every CAM method of the package on the project's evaluation, as one markdown table.

Runs each method of `tf_gradcam.methods.METHODS` (the CAM family: Grad-CAM and
its successors) on the shipped demo CNN (`tf_gradcam.demo_model`, layer
`last_conv`) over generated scenes with exact boxes and masks
(`tf_gradcam.scenes`), and scores the maps with `tf_gradcam.metrics`:

- pointing game (§4.3, Zhang et al.): does the map's maximum lie on the object;
- top-1 localisation error (§4.1): box around the largest segment of the map
  binarised at 15% of its maximum; an error when the top-1 class is wrong or
  the box's IoU with the object's box is below 0.5;
- faithfulness (§5.3): Spearman rank correlation with an occlusion map;
- deletion and insertion AUC (Petsiuk et al., RISE);
- seconds per image of the method's call.

Reference rows a method has to beat: a random map (uniform noise at the
layer's 16×16 resolution, upsampled like a CAM) and a centred Gaussian; and,
as a ceiling, the object's ground-truth mask used as a map.

A method that fails to import, build or run (e.g. one not written yet) gets a
row "n/a (reason)" and the others carry on, so the table picks new methods up
as they land in the registry.

Deterministic: fixed scene seed and random seeds, so two runs print the same
table except for the timing column. Under a minute on 2 CPU cores with the
eight methods of the registry; Score-CAM is by far the slowest.

Run from the repository root:

    python benchmarks/methods_table.py                      # 256 scenes, 64 for faithfulness
    python benchmarks/methods_table.py --quick              # tiny, for tests
    python benchmarks/methods_table.py --methods gradcam,layercam --out /tmp/methods.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tf_gradcam

import keras
import numpy as np
import tensorflow as tf

from tf_gradcam import metrics
from tf_gradcam.demo_model import DEMO_LAYER_NAME, load_demo_model
from tf_gradcam.image import upsample_maps
from tf_gradcam.methods import METHODS, get_method, method_name
from tf_gradcam.scenes import make_scenes

#: `make_scenes` seed of the evaluation scenes: the demo model's held-out test
#: seed (`scripts/train_demo_model.py` trains on seed 0 and validates on 1).
SCENE_SEED = 2
#: Seed of the random-map baseline (and of Keras, for methods that draw numbers).
RANDOM_SEED = 0
#: §4.1: binarise each map at this fraction of its maximum.
BOX_THRESHOLD = 0.15
#: §4.1 / ILSVRC: a box with IoU below this is a localisation error.
IOU_THRESHOLD = 0.5
#: Occlusion (§5.3): patch side and stride.
OCCLUSION_PATCH, OCCLUSION_STRIDE = 16, 8
#: The scenes' noisy background: uniform i.i.d. per pixel and channel in this
#: range (`tf_gradcam.scenes`). Occluded, deleted and not-yet-inserted pixels
#: are drawn from it, so perturbed images stay in the model's training
#: distribution. A constant grey does not: the demo model classifies shapes on
#: a plain grey background at chance with ~100% confidence, and a grey patch
#: *raises* its "square" logit wherever it lands.
NOISE_RANGE = (0.25, 0.75)
#: Options passed to a method's constructor, by registry name (none needed so far).
METHOD_OPTIONS: dict[str, dict] = {}

FULL = {"images": 256, "faithful": 64, "steps": 32, "batch": 64, "repeats": 3}
QUICK = {"images": 16, "faithful": 8, "steps": 8, "batch": 16, "repeats": 1}

REFERENCE_ROWS = ("random", "centre Gaussian", "ground-truth mask")


# ------------------------------------------------------------------ the setup


@dataclasses.dataclass(frozen=True)
class Setup:
    """The evaluation data, shared by every method.

    Attributes:
        model: the demo CNN (softmax outputs).
        layer: the explained layer.
        images: `(n, H, W, 3)` scenes.
        labels: `(n,)` ground-truth class of each scene's object.
        predicted: `(n,)` the model's top-1 class.
        masks: `(n, H, W)` bool, the object's exact pixels.
        boxes: `(n, 4)` the object's box.
        faithful: how many of the first images the faithfulness columns use.
        occlusion: `(faithful, H, W)` occlusion maps of the ground-truth class.
        canvas: `(faithful, H, W, 3)` background noise: what deleted pixels
            become, and the canvas insertion starts from.
        steps: steps of the deletion and insertion curves.
        batch: images per method call.
        tolerance: pointing-game tolerance in pixels.
        repeats: timed passes over the images; the fastest is reported.
    """

    model: keras.Model
    layer: str
    images: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    faithful: int
    occlusion: np.ndarray
    canvas: np.ndarray
    steps: int
    batch: int
    tolerance: float
    repeats: int = 1


def logit_scores(model: keras.Model) -> Callable[[np.ndarray], np.ndarray]:
    """The class scores before the model's final softmax: images -> `(batch, classes)`.

    The demo model ends in `Dense(3, activation="softmax")`; the logits are its
    input times its kernel plus its bias.
    """
    head = model.layers[-1]
    features = keras.Model(model.input, head.input)
    kernel, bias = (np.asarray(w, np.float64) for w in head.get_weights())

    def scores(images: np.ndarray) -> np.ndarray:
        return np.asarray(features(images, training=False), np.float64) @ kernel + bias

    return scores


def prepare(
    images: int,
    *,
    faithful: int,
    steps: int,
    batch: int,
    tolerance: float = 0.0,
    repeats: int = 1,
) -> Setup:
    """Loads the demo model, generates the scenes and computes the occlusion maps."""
    model = load_demo_model()
    scenes = make_scenes(images, seed=SCENE_SEED)
    pixels = np.array(scenes.images)
    predicted = np.concatenate(
        [
            np.asarray(model(pixels[i : i + batch], training=False)).argmax(axis=1)
            for i in range(0, len(pixels), batch)
        ]
    )
    faithful = min(faithful, images)
    noise = np.random.default_rng([RANDOM_SEED, 1])  # not the random map's draws
    patch = noise.uniform(*NOISE_RANGE, (OCCLUSION_PATCH, OCCLUSION_PATCH, 3))
    canvas = noise.uniform(*NOISE_RANGE, pixels[:faithful].shape)
    occlusion = metrics.occlusion_map(
        logit_scores(model),
        pixels[:faithful],
        scenes.labels[:faithful],
        patch_size=OCCLUSION_PATCH,
        stride=OCCLUSION_STRIDE,
        fill_value=patch.astype(np.float32),
        batch_size=256,
    )
    return Setup(
        model=model,
        layer=DEMO_LAYER_NAME,
        images=pixels,
        labels=np.array(scenes.labels),
        predicted=predicted.astype(np.int64),
        masks=np.array(scenes.masks[:, 0]),
        boxes=np.array(scenes.boxes[:, 0]),
        faithful=faithful,
        occlusion=occlusion,
        canvas=canvas.astype(np.float32),
        steps=steps,
        batch=batch,
        tolerance=tolerance,
        repeats=repeats,
    )


# ----------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class Scores:
    """One row's measurements.

    Attributes:
        pointing: pointing-game accuracy in [0, 1] over all images (↑).
        loc_error: top-1 localisation error rate in [0, 1] over all images (↓).
        rank: `(faithful,)` rank correlation with occlusion, each in [-1, 1] (↑).
        deletion: `(faithful,)` deletion AUCs, each in [0, 1] (↓).
        insertion: `(faithful,)` insertion AUCs, each in [0, 1] (↑).
        all_zero: number of maps (of the ground-truth class) that are all zero.
    """

    pointing: float
    loc_error: float
    rank: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    all_zero: int


def evaluate(setup: Setup, truth_maps: np.ndarray, top1_maps: np.ndarray) -> Scores:
    """Scores maps with the paper's metrics; the same code for methods and references.

    Args:
        setup: the evaluation data.
        truth_maps: `(n, H, W)` maps of each image's ground-truth class: the
            pointing game and the faithfulness columns (first `setup.faithful`).
        top1_maps: `(n, H, W)` maps of each image's top-1 predicted class
            (`setup.predicted`): the localisation error.

    Returns:
        The row's `Scores`.
    """
    truth_maps = np.asarray(truth_maps, np.float64)
    top1_maps = np.asarray(top1_maps, np.float64)
    hits = metrics.pointing_game(truth_maps, setup.masks, tolerance=setup.tolerance)
    boxes = metrics.box_from_heatmap(top1_maps, threshold=BOX_THRESHOLD)
    errors = metrics.localization_error(
        setup.predicted[:, None],
        boxes[:, None],
        setup.labels,
        setup.boxes,
        top_k=1,
        iou_threshold=IOU_THRESHOLD,
    )
    m = setup.faithful
    curve_args = (setup.model, setup.images[:m], setup.labels[:m], truth_maps[:m])
    curve_options = {"steps": setup.steps, "baseline": setup.canvas, "batch_size": 256}
    return Scores(
        pointing=metrics.pointing_accuracy(hits),
        loc_error=float(errors.mean()),
        rank=metrics.rank_correlation(truth_maps[:m], setup.occlusion),
        deletion=metrics.deletion_curve(*curve_args, **curve_options).auc,
        insertion=metrics.insertion_curve(*curve_args, **curve_options).auc,
        all_zero=int(np.count_nonzero(truth_maps.max(axis=(1, 2)) <= 0)),
    )


def explain(setup: Setup, name: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Runs one registered method: maps of the true and of the predicted class.

    Returns:
        `(truth_maps, top1_maps, seconds_per_image)`; the time is that of the
        ground-truth-class calls over all images in batches of `setup.batch`,
        the fastest of `setup.repeats` passes, after a warm-up call on the
        first batch (tracing, first allocations).

    Raises:
        Whatever importing, building or calling the method raises.
    """
    cam = get_method(name)(setup.model, setup.layer, **METHOD_OPTIONS.get(name, {}))

    def heatmaps(images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        maps = [
            np.asarray(
                cam(images[i : i + setup.batch], target=classes[i : i + setup.batch]).heatmaps
            )
            for i in range(0, len(images), setup.batch)
        ]
        result = np.concatenate(maps)
        expected = (len(images), *setup.images.shape[1:3])
        if result.shape != expected:
            raise ValueError(f"heatmaps of shape {result.shape}, expected {expected}")
        return result

    heatmaps(setup.images[: setup.batch], setup.labels[: setup.batch])  # warm-up
    timings = []
    for _ in range(setup.repeats):
        started = time.perf_counter()
        truth_maps = heatmaps(setup.images, setup.labels)
        timings.append((time.perf_counter() - started) / len(setup.images))
    seconds = min(timings)
    top1_maps = truth_maps.copy()
    wrong = np.flatnonzero(setup.predicted != setup.labels)
    if wrong.size:
        top1_maps[wrong] = heatmaps(setup.images[wrong], setup.predicted[wrong])
    return truth_maps, top1_maps, seconds


def reference_maps(setup: Setup, kind: str) -> np.ndarray:
    """The map of a reference row, for every image (the same for any class)."""
    n, height, width = setup.masks.shape
    if kind == "random":
        noise = np.random.default_rng([RANDOM_SEED, 2]).random((n, height // 4, width // 4))
        maps = np.asarray(upsample_maps(noise, (height, width)), np.float64)
        return maps / maps.max(axis=(1, 2), keepdims=True)
    if kind == "centre Gaussian":
        rows = np.arange(height)[:, None] - (height - 1) / 2
        cols = np.arange(width)[None, :] - (width - 1) / 2
        sigma = width / 4
        gaussian = np.exp(-(rows**2 + cols**2) / (2 * sigma**2))
        return np.broadcast_to(gaussian, (n, height, width)).copy()
    if kind == "ground-truth mask":
        return setup.masks.astype(np.float64)
    raise ValueError(f"unknown reference row {kind!r}")


# -------------------------------------------------------------------- the rows


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table.

    Attributes:
        name: the registry name (`"gradcam"`) or the reference row's name.
        reference: `True` for the baseline and ceiling rows.
        scores: the measurements, or `None` when the method is not available.
        seconds: seconds per image of the method's call (`None` for references).
        reason: why the method is not available (`None` when it ran).
    """

    name: str
    reference: bool
    scores: Scores | None
    seconds: float | None
    reason: str | None


def short_error(error: BaseException) -> str:
    """`Type: first line of the message`, at most ~100 characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 100 else text[:97] + "..."


def method_row(setup: Setup, name: str) -> Row:
    """The row of one registered method; `n/a (reason)` if it cannot be run."""
    keras.utils.set_random_seed(RANDOM_SEED)  # the same draws whatever ran before
    try:
        truth_maps, top1_maps, seconds = explain(setup, name)
        scores = evaluate(setup, truth_maps, top1_maps)
    except Exception as error:  # not written yet, or broken: report and carry on
        return Row(name, False, None, None, short_error(error))
    return Row(name, False, scores, seconds, None)


def reference_row(setup: Setup, kind: str) -> Row:
    maps = reference_maps(setup, kind)
    return Row(kind, True, evaluate(setup, maps, maps), None, None)


# -------------------------------------------------------------------- printing


COLUMNS = (
    "method",
    "pointing % ↑",
    "loc. error % ↓",
    "occlusion ρ ↑",
    "deletion AUC ↓",
    "insertion AUC ↑",
    "ms / image ↓",
)


def _mean_se(values: np.ndarray, digits: int = 3) -> str:
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{values.mean():.{digits}f} ± {se:.{digits}f}"


def table(rows: list[Row]) -> str:
    """The markdown table of the rows."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|",
    ]
    for row in rows:
        name = f"*{row.name}*" if row.reference else f"`{row.name}`"
        if row.scores is None:
            reason = (row.reason or "").replace("|", "\\|").replace("\n", " ")
            cells = [f"n/a ({reason})"] + ["—"] * (len(COLUMNS) - 2)
        else:
            s = row.scores
            cells = [
                f"{100 * s.pointing:.1f}",
                f"{100 * s.loc_error:.1f}",
                _mean_se(s.rank),
                _mean_se(s.deletion),
                _mean_se(s.insertion),
                "—" if row.seconds is None else f"{1000 * row.seconds:.2f}",
            ]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def legend(setup: Setup) -> str:
    """What the table measures, column by column, with each column's direction."""
    n, m = len(setup.images), setup.faithful
    height, width = setup.images.shape[1:3]
    accuracy = 100 * np.mean(setup.predicted == setup.labels)
    return "\n".join(
        [
            f"Demo CNN (`tf_gradcam.demo_model`), layer `{setup.layer}` (16×16), {n} generated "
            f"scenes (`make_scenes({n}, seed={SCENE_SEED})`, {height}×{width}, one shape on "
            f"noise; the model's held-out seed), classification accuracy {accuracy:.1f}%. "
            "Maps of the ground-truth class unless said otherwise. ↑: higher is better, "
            "↓: lower is better.",
            "",
            f"- **pointing % ↑** (§4.3, Zhang et al.): maps whose maximum lies on the object "
            f"(tolerance {setup.tolerance:g} px), over the {n} scenes.",
            f"- **loc. error % ↓** (§4.1, Table 1): top-1 localisation error over the {n} "
            "scenes: the map of the top-1 *predicted* class, binarised at "
            f"{BOX_THRESHOLD:.0%} of its maximum, box around the largest segment; an error "
            f"when the class is wrong or IoU < {IOU_THRESHOLD} with the object's box.",
            f"- **occlusion ρ ↑** (§5.3, faithfulness): Spearman rank correlation with the "
            f"occlusion map (drop of the class logit under a {OCCLUSION_PATCH} px patch of "
            f"background noise, stride {OCCLUSION_STRIDE}); mean ± standard error over the "
            f"first {m} scenes (the methods are scored on the same scenes, so differences "
            "between rows are less noisy than the ± suggest).",
            "- **deletion AUC ↓** (Petsiuk et al.): area under the class's softmax "
            "probability as pixels are replaced by background noise (uniform in "
            f"[{NOISE_RANGE[0]}, {NOISE_RANGE[1]}], like the scenes'), most salient first, in "
            f"{setup.steps} steps; mean ± s.e. over the first {m} scenes.",
            "- **insertion AUC ↑**: the same, restoring pixels onto a canvas of background noise.",
            f"- **ms / image ↓**: wall time of the method's call, batches of {setup.batch}, "
            f"fastest of {setup.repeats} pass(es) after a warm-up call; the only column that "
            "changes from run to run.",
            "- Reference rows: *random* is uniform noise at 16×16 upsampled like a CAM, "
            f"*centre Gaussian* a Gaussian of σ = {width // 4} px at the centre (a method must "
            "beat both); *ground-truth mask* is the object's binary mask, the best possible "
            "pointing and localisation (its loc. error is the classification error) but no "
            "ceiling for the faithfulness columns, which reward a graded map.",
        ]
    )


#: Each metric's name in the notes, its `Scores` field and whether higher is better.
METRICS = (
    ("pointing", "pointing", True),
    ("loc. error", "loc_error", False),
    ("occlusion ρ", "rank", True),
    ("deletion AUC", "deletion", False),
    ("insertion AUC", "insertion", True),
)


def notes(rows: list[Row]) -> list[str]:
    """Oddities worth a line under the table: all-zero maps, baselines not beaten."""
    lines = []
    baselines = [r for r in rows if r.name in ("random", "centre Gaussian") and r.scores]
    for row in rows:
        if row.reference or row.scores is None:
            continue
        if row.scores.all_zero:
            lines.append(
                f"- `{row.name}`: {row.scores.all_zero} all-zero map(s) (no positive evidence); "
                "they miss the pointing game and count as localisation errors."
            )
        for label, field, higher in METRICS:
            ours = float(np.mean(getattr(row.scores, field)))
            for baseline in baselines:
                theirs = float(np.mean(getattr(baseline.scores, field)))
                if (ours <= theirs) if higher else (ours >= theirs):
                    lines.append(
                        f"- `{row.name}` does not beat the *{baseline.name}* map on {label}."
                    )
    return lines


def machine() -> str:
    """The CPU, core and GPU count, and the library versions (as `benchmarks/speed.py`)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpus = len(tf.config.list_physical_devices("GPU"))
    return (
        f"{cpu}, {os.cpu_count()} CPU cores, {gpus} GPU(s); TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}, Python {platform.python_version()}"
    )


# ------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, for tests")
    parser.add_argument("--images", type=int, help=f"scenes (default {FULL['images']})")
    parser.add_argument(
        "--faithful",
        type=int,
        help=f"first scenes for occlusion/deletion/insertion (default {FULL['faithful']})",
    )
    parser.add_argument("--steps", type=int, help=f"deletion/insertion steps ({FULL['steps']})")
    parser.add_argument("--batch", type=int, help=f"images per method call ({FULL['batch']})")
    parser.add_argument(
        "--repeats", type=int, help=f"timed passes, fastest kept ({FULL['repeats']})"
    )
    parser.add_argument("--tolerance", type=float, default=0.0, help="pointing tolerance, px")
    parser.add_argument("--methods", help="comma-separated registry names (default: all)")
    parser.add_argument("--out", help="also write the markdown to this file")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():  # explicit options win
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("images", "faithful", "steps", "batch", "repeats"):
        if getattr(args, key) < 1 or (key == "faithful" and args.faithful < 2):
            parser.error(f"--{key} must be at least {2 if key == 'faithful' else 1}")
    if args.methods:
        try:
            args.methods = [method_name(name.strip()) for name in args.methods.split(",")]
        except Exception as error:
            parser.error(str(error))
    else:
        args.methods = list(METHODS)
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    """Prints the markdown (and writes it to `--out`); returns the rows."""
    args = parse_args(argv)
    started = time.perf_counter()
    keras.utils.set_random_seed(RANDOM_SEED)
    setup = prepare(
        args.images,
        faithful=args.faithful,
        steps=args.steps,
        batch=args.batch,
        tolerance=args.tolerance,
        repeats=args.repeats,
    )
    with warnings.catch_warnings():
        # all-zero maps are expected now and then; they are counted in the notes
        warnings.filterwarnings("ignore", message=".*all zero", category=RuntimeWarning)
        rows = [method_row(setup, name) for name in args.methods]
    rows += [reference_row(setup, kind) for kind in REFERENCE_ROWS]

    oddities = notes(rows)
    text = "\n".join(
        [
            f"Machine: {machine()}",
            "",
            legend(setup),
            "",
            table(rows),
            *(["", *oddities] if oddities else []),
        ]
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(f"\ntotal time: {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
