"""Clicks per second of the batched, jitted NoC engine vs a per-sample loop in the original's style.

The per-sample loop is what `evaluate_model.py NoBRS` does: per click, the NumPy/SciPy clicker at
the original resolution, then the whole network (encoder included) on the image and its flip,
with the resizes jitted per image size. Both paths run the same model on the same images; the
script asserts identical clicks, IoUs and NoC, times a second (warm, compiled) pass of each and
prints a table.

  python bench/eval_speed.py [--model tiny|full] [--images 8] [--size 112] [--clicks 20] [--batch 8]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from skipclick_jax import config_lib, metrics, resize
from skipclick_jax.evaluation.engine import Protocol, run_samples, skipclick_predictor
from skipclick_jax.model import build_model


def make_samples(n: int, seed: int = 0) -> list[dict]:
    """n images of assorted sizes (about 0.6-1.4x of 96x128) with one elliptical object each."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        h, w = int(rng.integers(60, 130)), int(rng.integers(80, 180))
        yy, xx = np.mgrid[:h, :w]
        cy, cx = rng.uniform(0.3, 0.7, 2) * (h, w)
        gt = ((yy - cy) / (0.25 * h)) ** 2 + ((xx - cx) / (0.3 * w)) ** 2 < 1
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
        image = np.clip(ndimage.zoom(small, (h / small.shape[0], w / small.shape[1], 1), order=1)[:h, :w]
                        + 60 * gt[..., None], 0, 255).astype(np.uint8)
        samples.append({"id": f"bench{i}#0", "image": image, "gt": gt.astype(np.int32)})
    return samples


def _clicker_click(gt, pred, not_clicked):
    def dt(mask):
        return ndimage.distance_transform_edt(np.pad(mask, 1)).astype(np.float32)[1:-1, 1:-1] * not_clicked

    fn, fp = dt((gt == 1) & ~pred & (gt != -1)), dt((gt != 1) & pred & (gt != -1))
    is_pos = fn.max() > fp.max()
    d = fn if is_pos else fp
    ys, xs = np.where(d == d.max())
    not_clicked[ys[0], xs[0]] = False
    return int(ys[0]), int(xs[0]), bool(is_pos)


@jax.jit
def _resize_to(x, like):
    """bilinear_ac of x [1,H,W] to the spatial size of `like` [1,H',W'] (jitted per size pair)."""
    return resize.bilinear_ac(x, like.shape[1:], channels_last=False)


@jax.jit
def _resize_image(image, like):
    return resize.bilinear_ac(image, like.shape[1:])


def _network(encode, decode, s, params, image, prev, points, denom):
    """Whole network on the image and its flip -> averaged-logit probability [1,S,S]."""
    flip = lambda x: x[:, :, ::-1]  # noqa: E731
    enc = encode(params, jnp.concatenate([image, flip(image)]))
    pts_flip = points.at[..., 1].set(jnp.where(points[..., 0] < 0, -1.0, (s - 1) * denom[:, 1:] - points[..., 1]))
    both = decode(params, enc, jnp.concatenate([prev, flip(prev)]),
                  jnp.concatenate([points, pts_flip]), jnp.concatenate([denom, denom]))
    return jax.nn.sigmoid(0.5 * (both[:1] + flip(both[1:])))


_network_jit = jax.jit(_network, static_argnums=(0, 1, 2))


def per_sample_loop(predictor, samples, protocol: Protocol) -> list[tuple[list, list]]:
    """The original's evaluation loop, one sample and one full forward (with flip) per click.

    Clicks sit in P = points_per_polarity fixed slots (so the forward compiles once) instead of
    the original's P = max(#pos, #neg, 1); empty slots change nothing.
    """
    s, p = protocol.size, protocol.points_per_polarity
    square = jnp.zeros((1, s, s))
    out = []
    for sample in samples:
        gt = sample["gt"]
        h, w = gt.shape
        image = _resize_image(jnp.asarray(sample["image"].astype(np.float32) / np.float32(255))[None], square)
        prob = jnp.zeros((1, h, w), jnp.float32)
        pred = np.zeros((h, w), bool)
        not_clicked = np.ones((h, w), bool)
        clicks, ious = [], []
        for _ in range(protocol.max_clicks):
            clicks.append(_clicker_click(gt, pred, not_clicked))
            pts = np.full((1, 2 * p, 3), -1, np.float32)
            for base, polarity in ((0, True), (p, False)):
                rows = [(s * r, s * c, i) for i, (r, c, q) in enumerate(clicks) if q == polarity]
                pts[0, base:base + len(rows)] = np.array(rows, np.float32).reshape(-1, 3)
            denom = np.array([[h, w]], np.float32)
            probs = _network_jit(predictor.encode, predictor.decode, s, predictor.params, image,
                                 _resize_to(prob, square), pts, denom)
            prob = _resize_to(probs, prob)
            pred = np.asarray(prob[0]) > protocol.thresh
            ious.append(metrics.iou(gt, pred))
            if ious[-1] >= protocol.target_iou:
                break
        out.append(([list(c) for c in clicks], ious))
    return out

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=112, help="network input size S (multiple of 14)")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    cfg = config_lib.tiny_model_config() if args.model == "tiny" else config_lib.model_config()
    predictor = skipclick_predictor(build_model(cfg, seed=0))
    protocol = Protocol(size=args.size, max_clicks=args.clicks)
    samples = make_samples(args.images)

    rows = []
    for name, run in (
        ("batched jit engine", lambda: run_samples(predictor, samples, protocol, batch_size=args.batch)),
        ("per-sample loop", lambda: per_sample_loop(predictor, samples, protocol)),
    ):
        run()  # compile
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
        if name.startswith("batched"):
            result = [(r["clicks"], list(metrics.ious_from_counts(r["inter"], r["union"]))) for r in result]
        rows.append((name, seconds, sum(len(c) for c, _ in result), result))

    (_, _, _, engine), (_, _, _, loop) = rows
    assert [c for c, _ in engine] == [c for c, _ in loop], "click sequences differ"
    np.testing.assert_array_equal(np.concatenate([i for _, i in engine]), np.concatenate([i for _, i in loop]))
    noc_engine, _ = metrics.noc([i for _, i in engine], max_clicks=args.clicks)
    noc_loop, _ = metrics.noc([i for _, i in loop], max_clicks=args.clicks)
    assert noc_engine.tolist() == noc_loop.tolist(), (noc_engine, noc_loop)

    print(f"model={args.model} S={args.size} images={args.images} batch={args.batch} "
          f"devices={jax.device_count()} ({jax.devices()[0].platform}); NoC@80..95 = {noc_engine.tolist()}")
    print(f"| {'method':<20} | {'clicks':>6} | {'seconds':>8} | {'clicks/s':>8} |")
    print(f"|{'-' * 22}|{'-' * 8}|{'-' * 10}|{'-' * 10}|")
    for name, seconds, clicks, _ in rows:
        print(f"| {name:<20} | {clicks:>6} | {seconds:>8.2f} | {clicks / seconds:>8.2f} |")
    print(f"speed-up: {rows[1][1] / rows[0][1] * rows[0][2] / rows[1][2]:.1f}x")


if __name__ == "__main__":
    main()
