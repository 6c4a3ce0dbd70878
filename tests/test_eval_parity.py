"""eval.py's engine against the original evaluation loop restated in PyTorch (`torch_noc`).

The same random tiny SkipClick runs as the PyTorch reference (per sample, whole network per click,
float64 clicks, torch's resizes, scipy clicker) and as the converted JAX model in the batched,
jitted engine. Both must produce the same click sequences and the same IoU after every click.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from convert_weights import torch_noc, verify  # noqa: E402
from convert_weights.torch_reference import build_reference  # noqa: E402
from skipclick_jax import metrics  # noqa: E402
from skipclick_jax.config_lib import tiny_model_config  # noqa: E402
from skipclick_jax.evaluation.protocol import Protocol  # noqa: E402
from skipclick_jax.evaluation.scheduler import run_samples  # noqa: E402
from skipclick_jax.model.api import model_functions  # noqa: E402

pytestmark = pytest.mark.usefixtures("on_cpu")  # bit-exact / measured on CPU

SIZES = [(45, 61), (70, 52), (33, 47), (58, 58)]


def make_samples():
    """Smooth images with an elliptical object (and an ignore band on two of them)."""
    rng = np.random.default_rng(3)
    samples = []
    for i, (h, w) in enumerate(SIZES):
        yy, xx = np.mgrid[:h, :w]
        cy, cx = rng.uniform(0.35, 0.65, 2) * (h, w)
        inside = ((yy - cy) / (0.3 * h)) ** 2 + ((xx - cx) / (0.35 * w)) ** 2
        gt = (inside < 1).astype(np.int32)
        if i % 2:
            gt[(inside >= 1) & (inside < 1.3)] = -1
        base = rng.uniform(40, 200, 3) + 30 * np.sin(yy[..., None] / rng.uniform(3, 9) + np.arange(3))
        image = np.clip(base + 60 * (inside < 1)[..., None] + rng.normal(0, 8, (h, w, 3)), 0, 255)
        samples.append({"id": f"s{i}#1", "image": image.astype(np.uint8), "gt": gt})
    return samples


def with_instances(samples):
    """Two more instances of the first image (ids '<image>#k', as the SBD/WSESeg/SHSeg loaders
    make them): other objects on the same picture, so they share its encoding in the engine."""
    first = samples[0]
    h, w = first["gt"].shape
    yy, xx = np.mgrid[:h, :w]
    extra = []
    for k, (cy, cx, ry, rx) in enumerate([(0.3, 0.3, 0.2, 0.25), (0.7, 0.6, 0.25, 0.3)], start=2):
        gt = (((yy - cy * h) / (ry * h)) ** 2 + ((xx - cx * w) / (rx * w)) ** 2 < 1).astype(np.int32)
        extra.append({"id": f"s0#{k}", "image": first["image"], "gt": gt})
    return samples[:1] + extra + samples[1:]


@pytest.fixture(scope="module")
def models():
    """A random tiny model made to react: clicks and the previous mask weigh 5x in the click
    embedding, and the classifier is scaled and shifted so that about half the pixels are
    foreground (random weights alone give near-constant logits just below the threshold)."""
    cfg = tiny_model_config()
    ref = build_reference(cfg, seed=1)
    with torch.no_grad():
        ref.patch_embed_coords.proj.weight.mul_(5.0)
        ref.head.conv_seg.weight.mul_(10.0)
        ref.head.conv_seg.bias.mul_(10.0).add_(4.5)
    return ref, verify.model_from_reference(ref, cfg)


@pytest.mark.parametrize("flip,batch_size,bucket", [(True, 2, 32), (False, None, 80)],
                         ids=["flip_two_buckets_batch2", "no_flip_one_bucket"])
def test_engine_reproduces_the_original_loop(models, flip, batch_size, bucket):
    """Several image sizes in one run. With flip: buckets of 32 make two pool shapes (64x64 and
    96x64), 2 slots per pool refilled as samples finish (continuous batching), and three
    instances of one image share its encoding; without: one bucket, the default pool size."""
    ref, model = models
    protocol = Protocol(size=56, max_clicks=6, flip=flip)
    samples = with_instances(make_samples()) if flip else make_samples()
    results = run_samples(model_functions(model), samples, protocol, batch_size=batch_size,
                          bucket=bucket)
    assert [r["id"] for r in results] == [s["id"] for s in samples]
    all_ious, polarities = [], set()
    for sample, res in zip(samples, results):
        clicks, ious = torch_noc.noc_loop(ref, sample["image"], sample["gt"], size=protocol.size,
                                          max_clicks=protocol.max_clicks, flip=flip)
        assert res["clicks"] == clicks, sample["id"]
        np.testing.assert_array_equal(metrics.ious_from_counts(res["inter"], res["union"]), ious)
        all_ious += ious
        polarities |= {q for *_, q in clicks}
    # Not degenerate: clicks of both kinds, and the IoU moves with the clicks.
    assert polarities == {True, False} and len(set(np.round(all_ious, 6))) > 2 * len(samples)

