"""The jitted, batched NoC loop against a per-sample NumPy loop in the original's style."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from skipclick_jax import metrics, resize
from skipclick_jax.evaluation.protocol import Protocol, make_runner
from skipclick_jax.evaluation.scheduler import bucket_dim, default_batch_size, make_batch, run_samples
from skipclick_jax.model.api import ModelFunctions

pytestmark = pytest.mark.usefixtures("on_cpu")  # bit-exact / measured on CPU

RADIUS = 3.0


def oracle_encode(params, images):
    """The 'encoder' keeps the image; channel 0 hides the ground truth, channel 1 is noise."""
    return {"image": images}


def oracle_decode(params, enc, prev, points, point_denom):
    """Logits from the hidden gt, noise, the previous probability and click disks (exact float32)."""
    image = enc["image"]
    n, s = image.shape[:2]
    grid = jnp.arange(s, dtype=jnp.float32)
    den_y, den_x = point_denom[:, 0, None, None], point_denom[:, 1, None, None]
    dy = (grid[None, None, :] * den_y - points[..., 0, None]) / den_y
    dx = (grid[None, None, :] * den_x - points[..., 1, None]) / den_x
    d2 = (dy * dy)[..., :, None] + (dx * dx)[..., None, :]  # [N, 2P, S, S]
    d2 = jnp.where((jnp.maximum(points[..., 0], points[..., 1]) < 0)[..., None, None], 1e6, d2)
    pos, neg = (d2.reshape(n, 2, -1, s, s).min(axis=2) <= RADIUS**2).astype(jnp.float32).transpose(1, 0, 2, 3)
    return (params["a"] * (image[..., 0] - 0.5) + params["b"] * (image[..., 1] - 0.5)
            + 2.0 * (prev - 0.5) + 4.0 * pos - 4.0 * neg)


PREDICTOR = ModelFunctions(oracle_encode, oracle_decode, {"a": jnp.float32(3.0), "b": jnp.float32(2.5)})


def make_sample(rng, h, w, i):
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    gt = ((yy - cy) / (0.3 * h)) ** 2 + ((xx - cx) / (0.25 * w)) ** 2 < 1
    gt = gt.astype(np.int32)
    gt[ndimage.binary_dilation(gt == 1) & (gt == 0) & (rng.random((h, w)) < 0.5)] = -1  # ignore band
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = 255 * (gt == 1)
    image[..., 1] = rng.integers(0, 256, (h, w))
    image[..., 2] = 128
    return {"id": f"img{i}#1", "image": image, "gt": gt}


def reference_clicker_click(gt, pred, not_clicked):
    """docs/design/evaluation.md#clicker re-stated with scipy's EDT on the zero-padded masks."""
    def dt(mask):
        return ndimage.distance_transform_edt(np.pad(mask, 1)).astype(np.float32)[1:-1, 1:-1] * not_clicked

    fn = dt((gt == 1) & ~pred & (gt != -1))
    fp = dt((gt != 1) & pred & (gt != -1))
    is_pos = fn.max() > fp.max()
    d = fn if is_pos else fp
    ys, xs = np.where(d == d.max())
    not_clicked[ys[0], xs[0]] = False
    return int(ys[0]), int(xs[0]), bool(is_pos)


def reference_loop(sample, protocol, predictor):
    """One sample, the original's way: the whole network per click, P = max(#pos, #neg, 1)."""
    s = protocol.size
    gt = sample["gt"]
    h, w = gt.shape
    image = resize.bilinear_ac(jnp.asarray(sample["image"].astype(np.float32) / np.float32(255))[None], (s, s))
    prob = jnp.zeros((1, h, w), jnp.float32)
    pred = np.zeros((h, w), bool)
    not_clicked = np.ones((h, w), bool)
    clicks, ious = [], []
    flip = lambda x: x[:, :, ::-1]  # noqa: E731
    for _ in range(protocol.max_clicks):
        clicks.append(reference_clicker_click(gt, pred, not_clicked))
        pos = [(s * r, s * c, i) for i, (r, c, q) in enumerate(clicks) if q]
        neg = [(s * r, s * c, i) for i, (r, c, q) in enumerate(clicks) if not q]
        num = max(len(pos), len(neg), 1)
        empty = [(-1, -1, -1)]
        pts = np.array(pos + empty * (num - len(pos)) + neg + empty * (num - len(neg)), np.float32)[None]
        den = np.array([[h, w]], np.float32)
        prev = resize.bilinear_ac(prob, (s, s), channels_last=False)
        if protocol.flip:
            pts_f = pts.copy()
            pts_f[..., 1] = np.where(pts[..., 0] < 0, -1, (s - 1) * w - pts[..., 1])
            enc = predictor.encode(predictor.params, jnp.concatenate([image, flip(image)]))
            both = predictor.decode(predictor.params, enc, jnp.concatenate([prev, flip(prev)]),
                                    jnp.asarray(np.concatenate([pts, pts_f])), jnp.asarray(np.concatenate([den, den])))
            logits = 0.5 * (both[:1] + flip(both[1:]))
        else:
            enc = predictor.encode(predictor.params, image)
            logits = predictor.decode(predictor.params, enc, prev, jnp.asarray(pts), jnp.asarray(den))
        prob = resize.bilinear_ac(jax.nn.sigmoid(logits), (h, w), channels_last=False)
        pred = np.asarray(prob[0]) > protocol.thresh
        ious.append(metrics.iou(gt, pred))
        if ious[-1] >= protocol.target_iou:
            break
    return [list(c) for c in clicks], ious


SIZES = [(30, 41), (17, 23), (41, 30), (9, 12)]  # buckets of 48: one shape; of 16: four shapes
FLIP = Protocol(size=28, max_clicks=8, target_iou=0.95)
NOFLIP_ALL = Protocol(size=21, max_clicks=5, target_iou=1.01, flip=False)


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(0)
    return [make_sample(rng, h, w, i) for i, (h, w) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def flip_results(samples):
    """Four buckets, none full: merged into batches padded to 48x32 (3 samples) and 32x48 (1)."""
    return run_samples(PREDICTOR, samples, FLIP, batch_size=3, bucket=16)


def check_against_reference(samples, results, protocol):
    assert [r["id"] for r in results] == [s["id"] for s in samples]
    lengths = set()
    for sample, res in zip(samples, results):
        clicks, ious = reference_loop(sample, protocol, PREDICTOR)
        assert res["clicks"] == clicks, sample["id"]
        np.testing.assert_array_equal(metrics.ious_from_counts(res["inter"], res["union"]), ious)
        lengths.add(len(ious))
    return lengths


def test_engine_matches_reference_loop(samples, flip_results):
    lengths = check_against_reference(samples, flip_results, FLIP)
    assert len(lengths) > 1  # samples stopped at different clicks


def test_engine_without_flip_runs_all_clicks(samples):
    results = run_samples(PREDICTOR, samples, NOFLIP_ALL, batch_size=3, bucket=48)
    assert check_against_reference(samples, results, NOFLIP_ALL) == {NOFLIP_ALL.max_clicks}


def test_sharded_engine_equals_single_device(flip_results):
    script = textwrap.dedent("""
        import json, numpy as np, jax
        assert jax.device_count() == 8
        from tests.test_eval_engine import FLIP, MIXED, PREDICTOR, SIZES, make_sample, mixed_samples
        from skipclick_jax.evaluation.scheduler import run_samples
        rng = np.random.default_rng(0)
        samples = [make_sample(rng, h, w, i) for i, (h, w) in enumerate(SIZES)]
        res = run_samples(PREDICTOR, samples, FLIP, batch_size=3, bucket=48)  # one batch of 8
        mixed = run_samples(PREDICTOR, mixed_samples(), MIXED, batch_size=16, bucket=16)  # partial steps
        print(json.dumps([[[r["clicks"], r["inter"], r["union"]] for r in x] for x in (res, mixed)]))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)),
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got, mixed = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == [[r["clicks"], r["inter"], r["union"]] for r in flip_results]
    expected = run_samples(PREDICTOR, mixed_samples(), MIXED, batch_size=3, bucket=16)
    assert mixed == [[r["clicks"], r["inter"], r["union"]] for r in expected]


MIXED = Protocol(size=28, max_clicks=10, target_iou=0.95)


def mixed_samples():
    """12 samples in 4 buckets of 16 that stop after 2, 3, 5 or MIXED.max_clicks clicks."""
    rng = np.random.default_rng(1)
    sizes = [(30, 41), (17, 23), (41, 30), (20, 25), (33, 40), (30, 44), (18, 21), (45, 31), (25, 30), (36, 36),
             (40, 28), (22, 19)]
    samples = []
    for i, (h, w) in enumerate(sizes):
        sample = make_sample(rng, h, w, i)
        contrast = 127 * (i % 4) // 3  # 0: the gt is hidden, 127: plain to see
        sample["image"][..., 0] = np.where(sample["gt"] == 1, 128 + contrast, 128 - contrast)
        samples.append(sample)
    return samples


def test_refill_engine_equals_whole_batch_loop():
    """Slots refilled as samples finish (3 slots for 12 samples) give the clicks, counts and masks
    of one whole-batch `run_batch`."""
    protocol, samples, reported = MIXED, mixed_samples(), []
    results = run_samples(PREDICTOR, samples, protocol, batch_size=3, bucket=16, keep_masks=len(samples),
                          on_done=reported.append)
    out = make_runner(PREDICTOR, protocol)(make_batch(samples, protocol, (48, 48), len(samples)))
    assert sum(reported) == len(samples) and [r["id"] for r in results] == [s["id"] for s in samples]
    assert {len(r["clicks"]) for r in results} >= {2, 3, 5, protocol.max_clicks}
    for j, (sample, res) in enumerate(zip(samples, results)):
        n, (h, w) = int(out["num_clicks"][j]), sample["gt"].shape
        assert [[r, c, int(q)] for r, c, q in res["clicks"]] == np.asarray(out["clicks"][j, :n]).tolist()
        assert res["inter"] == np.asarray(out["inter"][j, :n]).tolist()
        assert res["union"] == np.asarray(out["union"][j, :n]).tolist()
        np.testing.assert_array_equal(res["mask"], np.asarray(out["mask"][j, :h, :w]))


def test_default_batch_size():
    """One slot per device on CPU (8 elsewhere); the pool size never changes a click or a count."""
    per_device = 1 if jax.default_backend() == "cpu" else 8
    assert default_batch_size() == per_device * jax.device_count()
    samples = mixed_samples()
    auto = run_samples(PREDICTOR, samples, MIXED, bucket=16)
    explicit = run_samples(PREDICTOR, samples, MIXED, batch_size=3, bucket=16)
    assert [(r["clicks"], r["inter"], r["union"]) for r in auto] == [
        (r["clicks"], r["inter"], r["union"]) for r in explicit]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run_samples(PREDICTOR, samples, MIXED, batch_size=0)


def multi_instance_samples():
    """3 images with 3 instances each (ids '<image>#k', as the SBD/WSESeg/SHSeg loaders make them),
    then an image reusing the key 'im0' with one pixel changed, which must be encoded anew."""
    rng = np.random.default_rng(5)
    samples = []
    for i, (h, w) in enumerate([(30, 41), (25, 30), (36, 36)]):
        base = make_sample(rng, h, w, i)
        for k in range(3):
            other = make_sample(np.random.default_rng(10 * i + k), h, w, i)
            samples.append({"id": f"im{i}#{k}", "image": base["image"], "gt": other["gt"]})
    changed = samples[0]["image"].copy()
    changed[0, 0, 2] += 1
    return samples + [{"id": "im0#3", "image": changed, "gt": samples[0]["gt"]}]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_instances_of_one_image_share_its_encoding(batch_size):
    """Each distinct image is encoded once however its instances meet the pool (one after the
    other, or admitted together), and the clicks and IoUs stay those of the per-sample loop."""
    encoded = []

    def counting_encode(params, images):
        jax.debug.callback(lambda n: encoded.append(int(n)), images.shape[0])
        return oracle_encode(params, images)

    predictor = ModelFunctions(counting_encode, oracle_decode, PREDICTOR.params)
    samples = multi_instance_samples()
    results = run_samples(predictor, samples, MIXED, batch_size=batch_size, bucket=48)
    jax.effects_barrier()
    assert sum(encoded) == 2 * 4  # 4 distinct images, each with its flip
    check_against_reference(samples, results, MIXED)


def test_bucket_dim():
    sizes = (1, 64, 65, 512, 513, 1024, 1025, 3000)
    assert [bucket_dim(n, 64) for n in sizes] == [64, 64, 128, 512, 640, 1024, 1280, 3072]


def test_protocol_errors():
    with pytest.raises(ValueError, match="points_per_polarity"):
        Protocol(max_clicks=21)
    with pytest.raises(ValueError, match="target_iou"):
        Protocol(target_iou=0.123456789)


@pytest.mark.slow
def test_skipclick_adapter_matches_reference_loop(samples, tiny_model):
    from skipclick_jax.model.api import model_functions

    predictor = model_functions(tiny_model)
    protocol = Protocol(size=28, max_clicks=3)
    results = run_samples(predictor, samples[:2], protocol, batch_size=2, bucket=48)
    for sample, res in zip(samples[:2], results):
        clicks, ious = reference_loop(sample, protocol, predictor)
        assert res["clicks"] == clicks
        np.testing.assert_array_equal(metrics.ious_from_counts(res["inter"], res["union"]), ious)


def test_iou_target_test_is_exact_without_overflow():
    from skipclick_jax.evaluation.protocol import _at_least

    rng = np.random.default_rng(0)
    union = np.concatenate([rng.integers(1, 10**9, 5000), rng.integers(1, 300, 5000)])
    for p, q in [(19, 20), (101, 100), (17, 20), (1, 1)]:
        inter = np.minimum(union, union * p // q + rng.integers(-3, 4, union.size)).clip(0)
        got = np.asarray(_at_least(jnp.asarray(inter, jnp.int32), jnp.asarray(union, jnp.int32), p, q))
        np.testing.assert_array_equal(got, q * inter >= p * union)
        assert (got == (inter / union >= p / q)).all()  # the original's float64 test
