"""Real-browser check: serve GradCAMCallback logs with TensorBoard, screenshot its image panel.

Starts a real `tensorboard` server on the logs of `examples/bias_detection.py`,
asks its HTTP API which image tags and steps it parsed (so the check fails if
TensorBoard cannot read the callback's events), then opens the image panel in
headless Chromium and saves a screenshot, and one of the scalar panel's
`gradcam/*_mass` curves beside it (`<out>_scalars.png`). Uses only the standard library; the
`tensorboard` package and Chromium are needed here, not for training.

Without a browser (`--no-browser`), it saves instead a sheet of the PNGs the
server serves for the last step of each run's first `--max-images` image tags,
each shown at twice its size as TensorBoard's image cards show it (needs
Matplotlib, e.g. in the project's environment, which has `tensorboard`).

Setup (once; tensorboard in its own environment, TensorFlow not needed):
    python -m venv /tmp/tbvenv && /tmp/tbvenv/bin/pip install tensorboard
    apt-get update && apt-get install -y chromium
    python examples/bias_detection.py --out examples/out

Run:
    python scripts/tensorboard_screenshot.py --tensorboard /tmp/tbvenv/bin/tensorboard \\
        --logdir examples/out/logs --out examples/out/tensorboard_images.png
    python scripts/tensorboard_screenshot.py --no-browser \\
        --logdir examples/out/logs --out docs/images/callback_tensorboard_panels.png
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def png_size(url: str) -> tuple[int, int]:
    """(width, height) from the IHDR chunk of the PNG TensorBoard serves."""
    with urllib.request.urlopen(url, timeout=10) as response:
        head = response.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"TensorBoard served no PNG at {url}")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def wait_for_image_tags(base: str, server: subprocess.Popen, timeout: float) -> dict:
    """Poll the image plugin until it lists the callback's tags; return {run: {tag: info}}."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"tensorboard exited with status {server.returncode}")
        try:
            tags = get_json(f"{base}/data/plugin/images/tags")
        except OSError:
            tags = None
        if tags and any("gradcam/image_0" in by_tag for by_tag in tags.values()):
            return tags
        time.sleep(1.0)
    raise TimeoutError(f"TensorBoard listed no gradcam/image_* tag within {timeout:.0f} s")


def fetch_png(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def save_served_panels(
    base: str, tags: dict, out: Path, max_images: int, zoom: int = 2
) -> list[str]:
    """Save a sheet of the PNGs TensorBoard serves: one row per run, one column per image tag.

    Returns one line per panel: run, tag, step and the served PNG's size.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image
    import matplotlib.pyplot as plt

    runs = sorted(run for run, by_tag in tags.items() if "gradcam/image_0" in by_tag)
    columns = sorted(t for t in tags[runs[0]] if t.startswith("gradcam/image_"))[:max_images]
    cells, lines = {}, []
    for run in runs:
        for tag in columns:
            query = urllib.parse.urlencode({"run": run, "tag": tag, "sample": 0})
            steps = get_json(f"{base}/data/plugin/images/images?{query}")
            png = fetch_png(f"{base}/data/plugin/images/individualImage?{steps[-1]['query']}")
            picture = matplotlib.image.imread(io.BytesIO(png), format="png")
            cells[run, tag] = (steps[-1]["step"], picture)
            height, width = picture.shape[:2]
            lines.append(f"{run:20s} {tag:24s} step {steps[-1]['step']}: {width}x{height} PNG")
    height = max(p.shape[0] for _, p in cells.values())
    width = max(p.shape[1] for _, p in cells.values())
    dpi, title = 100, 40  # pixels of title above each panel
    figure = plt.figure(
        figsize=(
            len(columns) * (width * zoom + 20) / dpi,
            len(runs) * (height * zoom + title) / dpi,
        ),
        dpi=dpi,
    )
    for row, run in enumerate(runs):
        for col, tag in enumerate(columns):
            step, picture = cells[run, tag]
            axes = figure.add_subplot(len(runs), len(columns), row * len(columns) + col + 1)
            axes.imshow(picture, interpolation="nearest")
            axes.set_title(f"{run}\n{tag}, step {step}", fontsize=9)
            axes.axis("off")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=dpi)
    plt.close(figure)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", default="examples/out/logs")
    parser.add_argument("--out", default="examples/out/tensorboard_images.png")
    parser.add_argument("--tensorboard", default="tensorboard", help="tensorboard executable")
    parser.add_argument("--chromium", default="chromium", help="chromium executable")
    parser.add_argument("--size", default="1400,1000", help="window width,height")
    parser.add_argument("--timeout", type=float, default=90.0)
    parser.add_argument(
        "--no-browser",
        action="store_true",
        help="save a sheet of the served PNGs to --out instead of Chromium screenshots",
    )
    parser.add_argument("--max-images", type=int, default=3, help="image tags per run (sheet)")
    args = parser.parse_args()

    logdir = Path(args.logdir)
    if not any(logdir.glob("**/gradcam/events.out.tfevents.*")):
        print(f"no GradCAMCallback events under {logdir}; run examples/bias_detection.py first")
        return 1
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [args.tensorboard, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        tags = wait_for_image_tags(base, server, args.timeout)
        for run, by_tag in sorted(tags.items()):
            for tag in sorted(t for t in by_tag if t.startswith("gradcam")):
                query = urllib.parse.urlencode({"run": run, "tag": tag, "sample": 0})
                steps = get_json(f"{base}/data/plugin/images/images?{query}")
                size = png_size(f"{base}/data/plugin/images/individualImage?{steps[-1]['query']}")
                print(f"{run:20s} {tag:24s} {len(steps):3d} steps, last {size[0]}x{size[1]} PNG")
        out = Path(args.out).resolve()
        if args.no_browser:
            for line in save_served_panels(base, tags, out, args.max_images):
                print(line)
            print(f"sheet of the served panels saved to {out} ({out.stat().st_size // 1024} KiB)")
            return 0
        out.parent.mkdir(parents=True, exist_ok=True)
        shots = {
            out: ("images", "^gradcam/image"),
            out.with_name(out.stem + "_scalars" + out.suffix): ("scalars", "_mass$"),
        }
        for path, (panel, tag_filter) in shots.items():
            url = f"{base}/?darkMode=false#{panel}&tagFilter=" + urllib.parse.quote(tag_filter)
            screenshot(args.chromium, url, path, args.size, args.timeout)
            if not path.exists() or path.stat().st_size < 10_000:
                print(f"the screenshot {path} is missing or nearly empty")
                return 1
            print(f"screenshot of {url} saved to {path} ({path.stat().st_size // 1024} KiB)")
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


def screenshot(chromium: str, url: str, path: Path, size: str, timeout: float) -> None:
    """Load `url` in headless Chromium, let its scripts run, save a PNG screenshot."""
    subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--window-size={size}",
            "--virtual-time-budget=20000",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        timeout=timeout,
        capture_output=True,
    )


if __name__ == "__main__":
    sys.exit(main())
