"""Quick-response demo: encode a bundled image once, apply a click sequence, save overlays.

    python -m skipclick_jax.demo [--checkpoint CKPT] [--config configs/test_tiny.py] [--out DIR]

Without --checkpoint it uses the main job's checkpoint (runs/tiny_synthetic of the README's
main command) if it exists, else random weights, and says so (the masks are then meaningless,
the timings are not). Prints the encode latency and the per-click latency of every click.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np
from PIL import Image

from skipclick_jax import config_lib, storage
from skipclick_jax.model import build_model
from skipclick_jax.predictor import Predictor
from skipclick_jax.runtime import enable_compilation_cache, reuse_large_buffers
from skipclick_jax.visualize import overlay

ASSET = pathlib.Path(__file__).parent / "assets" / "demo.png"
DEFAULT_CONFIG = pathlib.Path(__file__).parents[1] / "configs" / "test_tiny.py"
MAIN_JOB = pathlib.Path("runs") / "tiny_synthetic"  # the README's main command
DEMO_CLICKS = [(170, 150, True), (120, 320, False), (200, 120, True), (300, 350, False), (150, 200, True)]
DEMO_HW = (336, 448)  # the asset's size, for which DEMO_CLICKS are given


def demo_clicks(height: int, width: int) -> list[tuple[int, int, bool]]:
    """DEMO_CLICKS moved to the same relative positions in a height x width image."""
    return [(min(height - 1, r * height // DEMO_HW[0]), min(width - 1, c * width // DEMO_HW[1]), p)
            for r, c, p in DEMO_CLICKS]


def main_job_checkpoint() -> pathlib.Path | None:
    """runs/tiny_synthetic of the README's main command (current directory, then the repo root)."""
    for root in (pathlib.Path.cwd(), ASSET.parents[2]):
        steps = root / MAIN_JOB / "checkpoints"
        if (steps / "config.json").is_file() and any(p.name.isdigit() for p in steps.iterdir()):
            return root / MAIN_JOB
    return None


def load_model(checkpoint: str | None, config: str | None = None):
    """-> (model, description). Without `checkpoint`: the main job's, else random test_tiny."""
    from skipclick_jax.checkpoint import load

    checkpoint = checkpoint or main_job_checkpoint()
    if checkpoint:
        cfg = config_lib.load_config_file(config) if config else None
        model, _ = load(storage.as_path(checkpoint), cfg)  # orbax needs absolute paths; or gs://
        return model, f"checkpoint {checkpoint}"
    path = config or DEFAULT_CONFIG
    model = build_model(config_lib.load_config_file(path).model)
    return model, (f"RANDOM WEIGHTS ({pathlib.Path(path).name}; no --checkpoint and no "
                   f"{MAIN_JOB}): the masks are meaningless, train the main job first")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="anything skipclick_jax.checkpoint.load accepts "
                        f"(default: {MAIN_JOB} if it exists, else random weights)")
    parser.add_argument("--config", help=f"config of a checkpoint without one, or of the random model "
                        f"(default {DEFAULT_CONFIG.name})")
    parser.add_argument("--image", default=str(ASSET))
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args(argv)
    enable_compilation_cache()
    reuse_large_buffers()

    model, description = load_model(args.checkpoint, args.config)
    print(f"model: {description}")
    try:
        with Image.open(args.image) as im:
            image = np.asarray(im.convert("RGB"))
    except OSError as e:
        parser.error(f"--image {args.image}: cannot read it as an image ({e})")
    clicks = demo_clicks(*image.shape[:2])
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    predictor = Predictor(model)
    predictor.set_image(image)  # compiles
    predictor.add_click(*clicks[0])  # compiles the per-click path
    t0 = time.perf_counter()
    predictor.set_image(image)  # returns once the encoding is computed
    print(f"image {image.shape[1]}x{image.shape[0]} -> {predictor.size}x{predictor.size}: "
          f"encode {1e3 * (time.perf_counter() - t0):.1f} ms")
    for k, (row, col, positive) in enumerate(clicks, 1):
        t0 = time.perf_counter()
        prob = predictor.add_click(row, col, positive)
        ms = 1e3 * (time.perf_counter() - t0)
        path = out / f"click_{k:02d}.png"
        Image.fromarray(overlay(image, prob > 0.5, predictor.clicks)).save(path)
        print(f"click {k} ({'+' if positive else '-'} at {row},{col}): {ms:.1f} ms, "
              f"mask {100 * (prob > 0.5).mean():.1f}% of the image -> {path}")


if __name__ == "__main__":
    main()
