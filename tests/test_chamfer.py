"""edt.chamfer5 against OpenCV's 5x5 chamfer transform, and the training clicker against a NumPy +
OpenCV re-statement of the original `get_next_points` (every pixel it can pick, and only those)."""

import contextlib

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from skipclick_jax.clicks import train_next_points
from skipclick_jax.config_lib import ConfigError, validate_config
from skipclick_jax.edt import chamfer5

pytestmark = pytest.mark.usefixtures("on_cpu")  # bit-exact on CPU

_chamfer5 = jax.jit(chamfer5)


@contextlib.contextmanager
def opencv_ipp(enabled: bool):
    """OpenCV with its Intel IPP path (pip wheels on x86) or its portable fixed-point code."""
    before = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(enabled)
    try:
        assert cv2.ipp.useIPP() == enabled, "this OpenCV build cannot switch its IPP path"
        yield
    finally:
        cv2.ipp.setUseIPP(before)


def reference(mask):
    """The original training clicker's distance: pad 1 px of zeros, OpenCV DIST_L2 mask 5, crop."""
    return cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]


def check(masks):
    masks = np.asarray(masks, bool)
    out = np.asarray(_chamfer5(jnp.asarray(masks)))
    assert out.dtype == np.float32 and out.shape == masks.shape
    with opencv_ipp(True):
        np.testing.assert_array_equal(out, np.stack([reference(m) for m in masks]))


def blobs(rng, b, h, w, holes=True):
    """Random unions of discs and rectangles, optionally with holes: non-convex, border-touching."""
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((b, h, w), bool)
    for i in range(b):
        for _ in range(rng.integers(1, 5)):
            cy, cx, r = rng.uniform(-0.1 * h, 1.1 * h), rng.uniform(-0.1 * w, 1.1 * w), rng.uniform(1, max(h, w) / 2)
            out[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            out[i, y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] ^= rng.random() < 0.5
        if holes:
            out[i] &= ~(rng.random((h, w)) < rng.uniform(0, 0.02))
    return out


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 1), (2, 2), (13, 17), (40, 29), (64, 3)])
def test_random_masks(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    densities = np.repeat([0.0, 0.03, 0.5, 0.9, 0.99, 1.0], 3)[:, None, None]
    check(rng.random((len(densities), *shape)) < densities)


def test_non_convex_masks_with_holes():
    rng = np.random.default_rng(0)
    for h, w in [(31, 47), (64, 64), (90, 57)]:
        check(blobs(rng, 6, h, w))


def test_special_masks():
    h, w = 33, 48
    masks = np.ones((8, h, w), bool)
    masks[1, h // 2, w // 2] = False  # one zero
    masks[2, :, 10] = False  # a zero column
    masks[3] = False
    masks[3, 5, 7] = True  # one foreground pixel
    masks[4, ::7, ::5] = False  # a lattice of zeros
    masks[5, 0, :] = False  # zeros on the border only
    masks[6] = False
    masks[6, :, 0] = True  # a foreground column on the border
    masks[7, -1, -1] = False
    check(masks)


def test_large_masks():
    """896 x 896 (full: distances up to 448) and non-convex, holey shapes at large sizes."""
    rng = np.random.default_rng(1)
    full = np.ones((1, 896, 896), bool)
    check(full)
    check(blobs(rng, 2, 896, 896))
    check(blobs(rng, 2, 601, 333))
    check(blobs(rng, 2, 480, 640))


def test_shapes_and_errors():
    assert chamfer5(jnp.zeros((2, 0, 5), bool)).shape == (2, 0, 5)
    assert chamfer5(jnp.zeros((0, 4, 5), bool)).shape == (0, 4, 5)
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        chamfer5(jnp.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="arithmetic must be one of"):
        chamfer5(jnp.zeros((1, 4, 5), bool), arithmetic="float64")


def test_fixed_point_arithmetic_equals_opencv_without_ipp():
    """arithmetic="fixed" equals OpenCV's portable 16.16 fixed-point code (builds without IPP) bit
    for bit, on masks where it differs from the IPP result in most pixels."""
    rng = np.random.default_rng(7)
    masks = [rng.random((1, h, w)) < d for (h, w), d in
             [((1, 1), 1.0), ((5, 9), 0.5), ((64, 48), 0.99), ((130, 97), 0.999), ((200, 301), 1.0)]]
    masks += [blobs(rng, 3, 120, 140), np.ones((1, 96, 96), bool)]
    masks[-1][0, 40, 50] = False
    fixed = jax.jit(lambda m: chamfer5(m, arithmetic="fixed"))
    differs = 0
    for m in masks:
        out = np.asarray(fixed(jnp.asarray(m)))
        assert out.dtype == np.float32 and out.shape == m.shape
        with opencv_ipp(False):
            np.testing.assert_array_equal(out, np.stack([reference(x) for x in m]))
        differs += (out != np.asarray(_chamfer5(jnp.asarray(m)))).sum()
    assert differs > 1000


def plain_raster(mask):
    """The textbook float32 two-pass chamfer transform of the zero-padded mask (each pixel takes the
    minimum of neighbour + weight, one neighbour at a time): what IPP's column groups differ from."""
    p = np.pad(mask, 1)
    h, w = p.shape
    a, b, c = np.float32(1), np.float32(1.4), np.float32(2.1969)
    d = np.full((h + 4, w + 4), np.inf, np.float32)
    d[2:-2, 2:-2] = np.where(p, np.inf, 0).astype(np.float32)
    for rows, s in ((range(2, h + 2), 1), (range(h + 1, 1, -1), -1)):
        for i in rows:
            r1, r2 = d[i - s], d[i - 2 * s]
            cand = np.minimum.reduce([d[i, 2:-2], r1[2:-2] + a, r1[1:-3] + b, r1[3:-1] + b, r1[:-4] + c,
                                      r1[4:] + c, r2[1:-3] + c, r2[3:-1] + c])
            for j in range(2, w + 2)[::s]:
                d[i, j] = min(cand[j - 2], d[i, j - s] + a)
    return d[3:-3, 3:-3]


def test_float32_rounding_follows_ipp_column_groups():
    """Masks whose large distances expose float32 rounding: the textbook raster transform (the
    neighbour to the left added one pixel at a time) differs from OpenCV here, chamfer5 does not."""
    masks = np.ones((6, 160, 160), bool)
    for i, (r, c) in enumerate([(33, 20), (10, 5), (120, 140), (35, 3), (28, 2), (150, 80)]):
        masks[i, r, c] = False
    masks[4, 42, 43] = False
    ref = np.stack([reference(m) for m in masks])
    assert sum((plain_raster(m) != r).sum() for m, r in zip(masks[:2], ref[:2])) > 0
    check(masks)


def test_thin_lines_and_borders():
    """Zero lines of every slope, a foreground line, masks that are foreground up to the border."""
    rng = np.random.default_rng(3)
    h, w = 97, 130
    masks = np.ones((6, h, w), bool)
    for m in masks[:4]:
        for _ in range(3):
            y0, y1, x0, x1 = rng.integers(0, h, 2).tolist() + rng.integers(0, w, 2).tolist()
            n = max(abs(y1 - y0), abs(x1 - x0)) + 1
            m[np.linspace(y0, y1, n).round().astype(int), np.linspace(x0, x1, n).round().astype(int)] = False
    masks[3] = ~masks[3]  # foreground lines on a zero background
    masks[4, :, 0] = False  # only the left column is zero: distances grow along every row
    masks[5, -1, :] = False  # only the bottom row
    check(masks)


@pytest.mark.parametrize("w", [121, 122, 123, 124])
def test_all_widths_modulo_the_column_group(w):
    """IPP's forward pass works in groups of 4 columns with a one-by-one tail: every width class."""
    rng = np.random.default_rng(w)
    masks = blobs(rng, 3, 70, w)
    masks[0] = True
    masks[0, rng.integers(0, 70), rng.integers(0, w)] = False
    check(masks)


@pytest.mark.slow
def test_many_random_shapes_and_sizes():
    rng = np.random.default_rng(2)
    for _ in range(12):
        h, w = rng.integers(1, 897, 2)
        check(blobs(rng, 2, h, w, holes=rng.random() < 0.5))
        check(rng.random((1, h, w)) < rng.uniform(0.5, 1.0))


# ---- the training clicker --------------------------------------------------------------------


def reference_get_next_points(pred, gt, points, click_index, thresh=0.49):
    """The original rule for one sample: (is_positive, inner [H,W] bool, slot or None)."""
    gt = gt > 0.5
    fn = np.pad(gt & (pred < thresh), 1).astype(np.uint8)
    fp = np.pad(~gt & (pred > thresh), 1).astype(np.uint8)
    dt_fn = cv2.distanceTransform(fn, cv2.DIST_L2, 5)[1:-1, 1:-1]
    dt_fp = cv2.distanceTransform(fp, cv2.DIST_L2, 5)[1:-1, 1:-1]
    fn_max, fp_max = np.max(dt_fn), np.max(dt_fp)
    is_positive = fn_max > fp_max
    dt = dt_fn if is_positive else dt_fp
    inner = dt > max(fn_max, fp_max) / 2.0
    num = points.shape[0] // 2
    slot = (num - click_index if is_positive else 2 * num - click_index) if inner.any() else None
    return is_positive, inner, slot


def random_pair(rng, h, w):
    """A prediction that is a perturbed version of a blob ground truth (with -1 ignore pixels)."""
    gt = blobs(rng, 1, h, w, holes=False)[0].astype(np.float32)
    gt[rng.random((h, w)) < 0.03] = -1
    kind = rng.integers(0, 4)
    if kind == 0:
        pred = rng.random((h, w))
    elif kind == 1:
        pred = ndimage.binary_dilation(gt > 0.5, iterations=int(rng.integers(1, 3))) * rng.uniform(0.5, 1)
    elif kind == 2:
        pred = blobs(rng, 1, h, w)[0] * rng.uniform(0, 1, (h, w))
    else:
        pred = (gt > 0.5) * 0.49 + 0.0  # exactly at/below the threshold: everything fn
    return pred.astype(np.float32), gt


@pytest.mark.parametrize("seed,distance", [(0, "chamfer5"), (1, "chamfer5"), (2, "chamfer5"),
                                           (3, "chamfer5"), (4, "chamfer5_fixed"), (5, "chamfer5_fixed")])
def test_train_clicker_candidates_equal_the_original_rule(seed, distance):
    """Every pixel the JAX clicker picks is in the original's `inner`, and over many keys every
    pixel of `inner` is picked; is_positive (the slot) and the untouched slots agree. 'chamfer5' is
    checked against OpenCV with IPP, 'chamfer5_fixed' against OpenCV without."""
    rng = np.random.default_rng(seed)
    h, w, num, copies, n_pairs = 11, 14, 3, 128, 6
    pairs = [random_pair(rng, h, w) for _ in range(n_pairs)]
    pred = np.repeat(np.stack([p for p, _ in pairs]), copies, axis=0)
    gt = np.repeat(np.stack([g for _, g in pairs]), copies, axis=0)
    points = np.full((len(pred), 2 * num, 3), -1.0, np.float32)
    points[:, 0] = (1.0, 2.0, 0.0)
    points[:, num] = (3.0, 4.0, 0.0)
    fn = jax.jit(train_next_points, static_argnames=("click_index", "distance"))
    with opencv_ipp(distance == "chamfer5"):
        for k in (1, 2, 3):
            ref = [reference_get_next_points(p, g, points[0], k) for p, g in pairs]
            picked = [np.zeros((h, w), bool) for _ in range(n_pairs)]
            for key in range(12):  # more keys until every candidate was drawn (deterministic)
                out = np.asarray(fn(jax.random.key(100 * k + key), jnp.asarray(pred), jnp.asarray(gt),
                                    jnp.asarray(points), click_index=k, distance=distance))
                for n, (is_pos, inner, slot) in enumerate(ref):
                    for c in range(n * copies, (n + 1) * copies):
                        changed = np.flatnonzero((out[c] != points[c]).any(axis=1)).tolist()
                        if slot is None:
                            assert changed == [], (n, k)
                            continue
                        assert changed == [slot], (n, k, is_pos)
                        row, col, idx = out[c, slot]
                        assert idx == k and row == int(row) and col == int(col)
                        assert inner[int(row), int(col)], (n, k, row, col)
                        picked[n][int(row), int(col)] = True
                if all((p == r[1]).all() for p, r in zip(picked, ref)):
                    break
            for n, (_, inner, _) in enumerate(ref):
                np.testing.assert_array_equal(picked[n], inner, err_msg=f"pair {n} click {k}")


def test_click_distance_config_is_validated():
    from configs.test_tiny import get_config

    cfg = get_config()
    assert cfg.train.click_distance == "chamfer5"
    for name in ("exact", "chamfer5_fixed"):
        cfg.train.click_distance = name
        validate_config(cfg)
    cfg.train.click_distance = "chamfer3"
    with pytest.raises(ConfigError, match="train.click_distance='chamfer3'"):
        validate_config(cfg)
    with pytest.raises(ValueError, match="distance must be one of"):
        train_next_points(jax.random.key(0), jnp.zeros((1, 4, 4)), jnp.zeros((1, 4, 4)),
                          jnp.zeros((1, 4, 3)), 1, distance="euclid")
