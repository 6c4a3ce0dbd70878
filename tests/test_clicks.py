"""The JAX click rules against a NumPy re-statement of the original clickers (docs/design/evaluation.md#clicker, docs/design/training.md#click-simulation)."""

import jax
import jax.numpy as jnp
import cv2
import numpy as np
import pytest
from scipy import ndimage

from skipclick_jax.clicks import eval_next_click, train_next_points

pytestmark = pytest.mark.usefixtures("on_cpu")  # bit-exact / measured on CPU


def padded_dt(mask):
    return ndimage.distance_transform_edt(np.pad(mask, 1)).astype(np.float32)[1:-1, 1:-1]


class ReferenceClicker:
    """The original evaluation Clicker: exact EDT of the zero-padded fn/fp, first row-major maximum."""

    def __init__(self, gt):
        self.gt_mask = gt == 1
        self.not_ignore = gt != -1
        self.not_clicked = np.ones(gt.shape, bool)

    def click(self, pred):
        fn = self.gt_mask & ~pred & self.not_ignore
        fp = ~self.gt_mask & pred & self.not_ignore
        dt_fn = padded_dt(fn) * self.not_clicked
        dt_fp = padded_dt(fp) * self.not_clicked
        is_pos = dt_fn.max() > dt_fp.max()
        dt = dt_fn if is_pos else dt_fp
        ys, xs = np.where(dt == dt.max())
        self.not_clicked[ys[0], xs[0]] = False
        return int(ys[0]), int(xs[0]), bool(is_pos)


def random_case(rng, h, w):
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, max(h, w) / 2)
    gt = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.int32)
    gt[rng.random((h, w)) < 0.05] = -1
    return gt


def test_eval_clicker_matches_reference_over_a_click_sequence():
    rng = np.random.default_rng(0)
    hb, wb, n = 37, 45, 4
    sizes = [(37, 45), (20, 33), (31, 12), (8, 8)]
    gts = np.full((n, hb, wb), -1, np.int32)
    valid = np.zeros((n, hb, wb), bool)
    for i, (h, w) in enumerate(sizes):
        gts[i, :h, :w] = random_case(rng, h, w)
        valid[i, :h, :w] = True
    refs = [ReferenceClicker(gts[i, :h, :w]) for i, (h, w) in enumerate(sizes)]
    not_clicked = np.ones((n, hb, wb), bool)
    step = jax.jit(eval_next_click)
    for _ in range(6):
        # Predictions: random blobs plus garbage in the padding (must not matter).
        preds = rng.random((n, hb, wb)) < 0.5
        preds = ndimage.binary_opening(preds, iterations=1, structure=np.ones((1, 3, 3)))
        rows, cols, pos = map(np.asarray, step(*map(jnp.asarray, (gts, preds, not_clicked, valid))))
        for i, (h, w) in enumerate(sizes):
            assert (rows[i], cols[i], pos[i]) == refs[i].click(preds[i, :h, :w]), i
            not_clicked[i, rows[i], cols[i]] = False


def test_eval_clicker_ties_and_perfect_prediction():
    gt = np.zeros((2, 6, 8), np.int32)
    gt[:, 1:5, 1:7] = 1
    pred = np.zeros_like(gt, bool)
    pred[0] = gt[0] == 1  # perfect: all-zero maps, a negative click at (0, 0)
    pred[1, 1:5, 1:4] = True  # fn max 1.0 == fp max? no fp: positive click in the fn rectangle
    not_clicked = np.ones_like(pred)
    rows, cols, pos = map(np.asarray, eval_next_click(jnp.asarray(gt), jnp.asarray(pred), jnp.asarray(not_clicked)))
    assert (rows[0], cols[0], pos[0]) == (0, 0, False)
    assert (rows[1], cols[1], pos[1]) == ReferenceClicker(gt[1]).click(pred[1])
    # Tie between fn and fp maxima gives a negative click.
    gt = np.zeros((1, 3, 7), np.int32)
    gt[0, 1, 1] = 1
    pred = np.zeros((1, 3, 7), bool)
    pred[0, 1, 5] = True
    rows, cols, pos = eval_next_click(jnp.asarray(gt), jnp.asarray(pred), jnp.ones_like(jnp.asarray(pred)))
    assert (int(rows[0]), int(cols[0]), bool(pos[0])) == (1, 5, False)


def padded_chamfer(mask):
    return cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]


def reference_train_click(pred, gt, thresh=0.49, distance="chamfer5"):
    """is_positive and the inner region of the original get_next_points (OpenCV's 5x5 chamfer
    distance, or with distance='exact' the exact EDT)."""
    fg = gt > 0.5
    dist = padded_chamfer if distance == "chamfer5" else padded_dt
    dt_fn = dist(fg & (pred < thresh))
    dt_fp = dist(~fg & (pred > thresh))
    is_pos = dt_fn.max() > dt_fp.max()
    dt = dt_fn if is_pos else dt_fp
    return is_pos, dt > max(dt_fn.max(), dt_fp.max()) / 2.0


def test_train_click_lies_in_inner_region_and_fills_the_right_slot():
    rng = np.random.default_rng(3)
    b, h, w, num = 6, 24, 30, 24
    gt = np.stack([random_case(rng, h, w).clip(0) for _ in range(b)]).astype(np.float32)
    pred = rng.random((b, h, w)).astype(np.float32)
    pred[0] = gt[0]  # perfect prediction: nothing is added
    points = np.full((b, 2 * num, 3), -1.0, np.float32)
    points[:, 0] = (3.0, 4.0, 0.0)
    fn = jax.jit(train_next_points, static_argnames=("click_index", "distance"))
    seen = set()
    for k, distance in ((1, "chamfer5"), (2, "exact"), (3, "chamfer5")):
        out = np.asarray(fn(jax.random.key(k), jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(points),
                            click_index=k, distance=distance))
        for i in range(b):
            is_pos, inner = reference_train_click(pred[i], gt[i], distance=distance)
            slot = num - k if is_pos else 2 * num - k
            if not inner.any():
                np.testing.assert_array_equal(out[i], points[i])
                continue
            row, col, idx = out[i, slot]
            assert idx == k and inner[int(row), int(col)]
            seen.add((i, int(row), int(col)))
            changed = np.flatnonzero((out[i] != points[i]).any(axis=1))
            assert changed.tolist() == [slot]
        points = out
    np.testing.assert_array_equal(out[0], np.asarray(points)[0])
    assert len(seen) > 3 * (b - 1) // 2  # the pixel is random, not a fixed argmax


def test_train_click_is_uniform_over_inner():
    gt = np.zeros((1, 5, 9), np.float32)
    gt[0, 1:4, 1:8] = 1  # an all-fn 3x7 block: inner = its middle row (dt 2 > 2/2)
    pred = np.zeros_like(gt)
    is_pos, inner = reference_train_click(pred[0], gt[0])
    assert is_pos
    points = jnp.full((1, 4, 3), -1.0)
    keys = jax.random.split(jax.random.key(0), 400)
    outs = jax.vmap(lambda key: train_next_points(key, jnp.asarray(pred), jnp.asarray(gt), points, 1))(keys)
    hits = np.zeros(inner.shape, int)
    for row, col, _ in np.asarray(outs)[:, 0, 1]:
        hits[int(row), int(col)] += 1
    assert (hits[~inner] == 0).all() and (hits[inner] > 0).all()
