"""Export time, file sizes and per-click latency: OnnxPredictor (onnxruntime) vs Predictor (JAX).

  cd <repo> && PYTHONPATH=. python bench/export_speed.py [--config configs/test_tiny.py]
      [--checkpoint C] [--size S] [--clicks 20] [--formats onnx,stablehlo]

Exports the model (random weights unless --checkpoint) to a temporary directory, then runs the
same click sequence on the bundled example (336x448) through both predictors in one process:
one warm-up pass (compiles), then --clicks timed clicks each; prints medians. Each click is
the whole per-click call (host resizes, decoder, sigmoid, resize back to 336x448).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from skipclick_jax import config_lib, export
from skipclick_jax.predictor import OnnxPredictor, Predictor

ROOT = pathlib.Path(__file__).parents[1]


def _clicks(n: int, h: int, w: int):
    rng = np.random.default_rng(0)
    return [(int(rng.integers(h)), int(rng.integers(w)), bool(k % 3 != 1)) for k in range(n)]


def _time(predictor, image, clicks) -> tuple[float, list[float]]:
    predictor.set_image(image)  # warm-up
    for c in clicks:
        predictor.add_click(*c)
    t0 = time.perf_counter()
    predictor.set_image(image)
    encode = time.perf_counter() - t0
    times = []
    for c in clicks:
        t0 = time.perf_counter()
        predictor.add_click(*c)
        times.append(time.perf_counter() - t0)
    return encode, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "test_tiny.py"))
    parser.add_argument("--checkpoint")
    parser.add_argument("--size", type=int)
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--formats", default="onnx,stablehlo")
    args = parser.parse_args()
    if args.checkpoint:
        from skipclick_jax.checkpoint import load

        model, cfg = load(args.checkpoint)
    else:
        from skipclick_jax.model import build_model

        cfg = config_lib.load_config_file(args.config)
        model = build_model(cfg.model)
    image = np.asarray(Image.open(ROOT / "skipclick_jax" / "assets" / "demo.png").convert("RGB"))
    clicks = _clicks(args.clicks, *image.shape[:2])  # 7 positive / 3 negative per 10; P stays 8 up to 12
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            t0 = time.perf_counter()
            meta = export.export(model, cfg.model, pathlib.Path(tmp) / fmt, size=args.size, fmt=fmt)
            sizes = ", ".join(f"{n} {g['bytes'] / 2**20:.1f} MiB ({g['export_seconds']:.1f} s)"
                              for n, g in meta["graphs"].items())
            print(f"export {fmt}: {time.perf_counter() - t0:.1f} s in all; {sizes}")
        results = {}
        if "onnx" in args.formats:
            results["onnxruntime"] = _time(OnnxPredictor(pathlib.Path(tmp) / "onnx"), image, clicks)
        results["jax"] = _time(Predictor(model, size=args.size), image, clicks)
    for name, (encode, times) in results.items():
        print(f"{name:12s} S={meta['size']}: encode {1e3 * encode:.1f} ms, per click median "
              f"{1e3 * statistics.median(times):.1f} ms (min {1e3 * min(times):.1f})")
    if "onnxruntime" in results:
        ratio = statistics.median(results["onnxruntime"][1]) / statistics.median(results["jax"][1])
        print(f"per-click onnxruntime / jax: {ratio:.2f}")


if __name__ == "__main__":
    main()
