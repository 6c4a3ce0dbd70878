"""Clicks per second of the jitted NoC engine (continuous batching) vs a per-sample loop in the
original's style, on images that stop after very different numbers of clicks.

The per-sample loop is what `evaluate_model.py NoBRS` does: per click, the NumPy/SciPy clicker at
the original resolution, then the whole network (encoder included) on the image and its flip,
with the resizes jitted per image size. The engine encodes each image once and refills a slot as
soon as its sample is done; the whole-batch loop (`run_batch`, one batch at a time until its
slowest sample is done) is timed too. All run the same model on the same images; the script
asserts identical clicks, IoUs and NoC, times a warm (compiled) pass of each and prints a table.

An untrained model never reaches the target IoU, so the network is guided by an oracle: each image
hides its ground truth in channel 0 at a contrast drawn per image, and the logits are the
oracle's, 2·#clicks·(c0 - 1/2) + (c1 - 1/2) with noise c1 in channel 1, plus 0.05 x the
network's. An image of contrast 1.1·255/(4·k) is about right after k clicks, one of contrast 0
never; the draw (CLICKS_NEEDED) makes most instances stop after 1-5 clicks and a few run long.
The cost per click is the network's.

The last line is the compute bound of the split: the per-sample loop pays the whole network (image
and flip) per click, T_full; the engine pays the decode per click and the encode once per image, so
with c clicks per image (summed over its instances) it cannot beat T_full / (T_dec + T_enc / c),
all three timed here on the same inputs at the engine's batch (network time only, no clicker or
resizes). `--instances K` puts K objects in each image, one sample each (as in SBD, WSESeg, SHSeg).

`--torch` also times the PyTorch reference (`convert_weights.torch_reference`, the original's
network) on the per-sample loop's click, to relate the JAX loop to the original code.

  python bench/eval_speed.py [--model tiny|full] [--images 24] [--size 224] [--clicks 20] [--batch B]
                             [--bucket 64] [--no-whole-batch] [--torch] [--all-clicks] [--instances K]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from convert_weights.clicker import next_click
from skipclick_jax import config_lib, metrics, resize
from skipclick_jax.evaluation.protocol import Protocol, make_runner
from skipclick_jax.evaluation.scheduler import bucket_dim, default_batch_size, make_batch, run_samples
from skipclick_jax.model.api import ModelFunctions, model_functions
from skipclick_jax.model import build_model
from skipclick_jax.runtime import versions_line

CLICKS_NEEDED = np.array([1, 2, 3, 4, 6, 9, 14, 0])  # 0: hopeless (contrast 0)
CLICKS_PROB = np.array([0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.1])


def make_samples(n: int, seed: int = 0, instances: int = 1) -> list[dict]:
    """n images of assorted sizes (about 0.6-1.4x of 96x128); channel 1 is noise.

    instances = 1: one elliptical object, shown in channel 0 at a contrast drawn from CLICKS_NEEDED
    (128 ± contrast inside/outside). instances = K > 1: K objects side by side, each with its own
    drawn contrast (128 + contrast inside, 128 outside) and its label in channel 2 (40·(k+1));
    one sample per object ('bench<i>#<k>'), all sharing the image (as SBD, WSESeg, SHSeg do).
    """
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        h, w = int(rng.integers(60, 130)), int(rng.integers(80, 180)) * instances
        yy, xx = np.mgrid[:h, :w]
        if instances == 1:
            cy, cx = rng.uniform(0.3, 0.7, 2) * (h, w)
            gt = ((yy - cy) / (0.25 * h)) ** 2 + ((xx - cx) / (0.3 * w)) ** 2 < 1
            k = rng.choice(CLICKS_NEEDED, p=CLICKS_PROB)
            contrast = int(np.ceil(1.1 * 255 / (4 * k))) if k else 0
            image = np.stack([np.where(gt, 128 + contrast, 128 - contrast), rng.integers(0, 256, (h, w)),
                              np.full((h, w), 128)], axis=-1).astype(np.uint8)
            samples.append({"id": f"bench{i}#0", "image": image, "gt": gt.astype(np.int32)})
            continue
        strip = w / instances
        labels = np.zeros((h, w), np.int32)
        level = np.full((h, w), 128)
        for j in range(instances):
            cy, cx = rng.uniform(0.3, 0.7) * h, (j + rng.uniform(0.3, 0.7)) * strip
            inside = ((yy - cy) / (0.25 * h)) ** 2 + ((xx - cx) / (0.3 * strip)) ** 2 < 1
            k = rng.choice(CLICKS_NEEDED, p=CLICKS_PROB)
            labels[inside] = j + 1
            level[inside] = 128 + (int(np.ceil(1.1 * 255 / (4 * k))) if k else 0)
        image = np.stack([level, rng.integers(0, 256, (h, w)), 40 * labels], axis=-1).astype(np.uint8)
        samples += [{"id": f"bench{i}#{j}", "image": image, "gt": (labels == j + 1).astype(np.int32)}
                    for j in range(instances)]
    return samples


def guided_predictor(net: ModelFunctions, instances: int = 1) -> ModelFunctions:
    """The network's encode/decode plus an oracle reading the gt hidden in the image (see
    `make_samples`). With several instances per image the oracle takes its target from the first
    click (always positive, inside the object): the label and contrast under it."""

    def encode(params, images):
        return {"net": net.encode(params, images), "image": images}

    def decode(params, enc, prev, points, point_denom):
        image = enc["image"]
        clicks = jnp.sum(points[..., 0] >= 0, axis=1, dtype=jnp.float32)[:, None, None]
        if instances == 1:
            oracle = 2.0 * clicks * (image[..., 0] - 0.5) + (image[..., 1] - 0.5)
        else:
            s = image.shape[1]
            at = jnp.clip(jnp.floor(points[:, 0, :2] / point_denom + 0.5), 0, s - 1).astype(jnp.int32)
            under = image[jnp.arange(image.shape[0]), at[:, 0], at[:, 1]]  # [N, 3]
            inside = jnp.abs(image[..., 2] - under[:, None, None, 2]) < 20 / 255
            contrast = under[:, None, None, 0] - 128 / 255
            oracle = 2.0 * clicks * contrast * jnp.where(inside, 1.0, -1.0) + (image[..., 1] - 0.5)
        return oracle + 0.05 * net.decode(params, enc["net"], prev, points, point_denom)

    return ModelFunctions(encode, decode, net.params)


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
            clicks.append(next_click(gt, pred, not_clicked))
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


def whole_batch_loop(predictor, samples, protocol: Protocol, batch: int, bucket: int = 64) -> list[dict]:
    """`run_batch` on consecutive batches of `batch` samples, each padded to its largest bucket."""
    runner, out = make_runner(predictor, protocol), []
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        shape = tuple(max(bucket_dim(np.shape(x["gt"])[d], bucket) for x in chunk) for d in (0, 1))
        res = jax.device_get(runner(make_batch(chunk, protocol, shape, batch)))
        out += [dict(clicks=[[r, c, bool(q)] for r, c, q in res["clicks"][j, :n].tolist()],
                     inter=res["inter"][j, :n], union=res["union"][j, :n])
                for j, n in enumerate(res["num_clicks"][:len(chunk)])]
    return out


def _median_s(fn, repeats: int = 5) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def network_times(predictor: ModelFunctions, s: int, batch: int, points_per_polarity: int) -> dict[str, float]:
    """Seconds per image: T_full (whole network on image + flip, the per-sample loop's click),
    T_enc (encode of image + flip) and T_dec (decode of both), the last two at the engine's batch."""
    images = jax.random.uniform(jax.random.key(0), (batch, s, s, 3))
    prev = jnp.zeros((2 * batch, s, s))
    points = jnp.full((2 * batch, 2 * points_per_polarity, 3), -1.0).at[:, 0].set(jnp.array([s / 2, s / 2, 0.0]))
    denom = jnp.ones((2 * batch, 2), jnp.float32)
    encode, decode = jax.jit(predictor.encode), jax.jit(predictor.decode)
    both = jnp.concatenate([images, images[:, :, ::-1]])
    enc = encode(predictor.params, both)
    full = _median_s(lambda: _network_jit(predictor.encode, predictor.decode, s, predictor.params, images[:1],
                                          prev[:1], points[:1], denom[:1]))
    return dict(full=full, enc=_median_s(lambda: encode(predictor.params, both)) / batch,
                dec=_median_s(lambda: decode(predictor.params, enc, prev, points, denom)) / batch)


def torch_full_time(cfg, s: int, points_per_polarity: int) -> float:
    """Seconds of the PyTorch reference's whole network on an image and its flip (one original click)."""
    import torch

    from convert_weights.torch_reference import build_reference

    ref = build_reference(cfg)
    x = torch.rand(2, 4, s, s)
    points = torch.full((2, 2 * points_per_polarity, 3), -1.0, dtype=torch.float64)
    points[:, 0] = torch.tensor([s / 2, s / 2, 0.0])
    with torch.no_grad():
        return _median_s(lambda: ref(x, points)["instances"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, default=224, help="network input size S (multiple of 14)")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--batch", type=int, default=None, help="engine slots (default: 1 per device on CPU)")
    parser.add_argument("--bucket", type=int, default=64, help="padded-shape bucket (fewer shapes compile faster)")
    parser.add_argument("--no-whole-batch", action="store_true", help="skip the (slow) whole-batch engine")
    parser.add_argument("--torch", action="store_true", help="also time the PyTorch reference network")
    parser.add_argument("--instances", type=int, default=1, help="objects per image (each a sample)")
    parser.add_argument("--all-clicks", action="store_true",
                        help="run every instance for all clicks (target IoU 1.01, as the original's --print-ious)")
    args = parser.parse_args()

    cfg = config_lib.tiny_model_config() if args.model == "tiny" else config_lib.model_config()
    predictor = guided_predictor(model_functions(build_model(cfg, seed=0)), args.instances)
    protocol = Protocol(size=args.size, max_clicks=args.clicks, target_iou=1.01 if args.all_clicks else 0.95)
    samples = make_samples(args.images, instances=args.instances)
    batch = args.batch or default_batch_size()

    def as_ious(results):
        return [(r["clicks"], list(metrics.ious_from_counts(r["inter"], r["union"]))) for r in results]

    methods = (
        ("refill engine", lambda p: as_ious(run_samples(predictor, samples, p, batch_size=batch,
                                                        bucket=args.bucket))),
        ("whole-batch engine", lambda p: as_ious(whole_batch_loop(predictor, samples, p, batch, args.bucket))),
        ("per-sample loop", lambda p: per_sample_loop(predictor, samples, p)),
    )
    rows = []
    for name, run in methods:
        if args.no_whole_batch and name.startswith("whole"):
            continue
        run(protocol if name.endswith("engine") else dataclasses.replace(protocol, max_clicks=1))  # compile
        start = time.perf_counter()
        result = run(protocol)
        seconds = time.perf_counter() - start
        rows.append((name, seconds, sum(len(c) for c, _ in result), result))

    loop = rows[-1][3]
    noc_loop, _ = metrics.noc([i for _, i in loop], max_clicks=args.clicks)
    for name, _, _, result in rows[:-1]:
        assert [c for c, _ in result] == [c for c, _ in loop], f"{name}: click sequences differ"
        np.testing.assert_array_equal(np.concatenate([i for _, i in result]), np.concatenate([i for _, i in loop]))
        noc, _ = metrics.noc([i for _, i in result], max_clicks=args.clicks)
        assert noc.tolist() == noc_loop.tolist(), (name, noc, noc_loop)

    counts = np.bincount([len(c) for c, _ in loop], minlength=args.clicks + 1)[1:]
    print(versions_line())
    print(f"model={args.model} S={args.size} images={args.images} instances={len(samples)} batch={batch} "
          f"devices={jax.device_count()} ({jax.devices()[0].platform}); NoC@80..95 = {noc_loop.tolist()}")
    print(f"instances per number of clicks 1..{args.clicks}: {counts.tolist()}")
    print(f"| {'method':<20} | {'clicks':>6} | {'seconds':>8} | {'clicks/s':>8} | {'speed-up':>8} |")
    print(f"|{'-' * 22}|{'-' * 8}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    base = rows[-1][2] / rows[-1][1]
    for name, seconds, clicks, _ in rows:
        rate = clicks / seconds
        print(f"| {name:<20} | {clicks:>6} | {seconds:>8.2f} | {rate:>8.2f} | {rate / base:>7.1f}x |")
    t = network_times(predictor, args.size, batch, protocol.points_per_polarity)
    per_image = rows[-1][2] / args.images  # the engine encodes each image once
    bound = t["full"] / (t["dec"] + t["enc"] / per_image)
    print(f"compute bound: T_full {1e3 * t['full']:.1f} ms / (T_dec {1e3 * t['dec']:.1f} ms + T_enc "
          f"{1e3 * t['enc']:.1f} ms / {per_image:.2f} clicks per image) = {bound:.2f}x; "
          f"the refill engine reaches {rows[0][2] / rows[0][1] / base / bound:.0%} of it")
    if args.torch:
        t_torch = torch_full_time(cfg, args.size, protocol.points_per_polarity)
        print(f"PyTorch reference, whole network on image + flip: {1e3 * t_torch:.1f} ms "
              f"({t_torch / t['full']:.2f}x the JAX T_full)")


if __name__ == "__main__":
    main()
