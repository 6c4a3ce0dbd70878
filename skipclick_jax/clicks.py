"""Next-click rules of the original, pure and batched (docs/design/evaluation.md#clicker, docs/design/training.md#click-simulation).

Both rules zero-pad the error masks by one pixel (here: `edt` / `chamfer5` count the ring, and `edt`
also pixels outside `valid`, as zeros). The evaluation clicker takes the exact Euclidean distance
transform; the training clicker OpenCV's 5x5 chamfer distance (or, optionally, the exact one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from skipclick_jax.defaults import CLICK_DISTANCES, MASK_THRESHOLD
from skipclick_jax.edt import chamfer5, edt

_TRANSFORMS = dict(chamfer5=chamfer5, chamfer5_fixed=lambda m: chamfer5(m, arithmetic="fixed"), exact=edt)


def eval_next_click(
    gt: jax.Array, pred: jax.Array, not_clicked: jax.Array, valid: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The evaluation clicker: the deepest error pixel, first in row-major order.

    gt [B,H,W] int in {0, 1, -1 = ignore}; pred, not_clicked, valid [B,H,W] bool.
    fn = gt==1 & ~pred, fp = gt∉{1,-1} & pred (ignored/invalid pixels are neither); dt = EDT * not_clicked;
    is_positive = max(dt_fn) > max(dt_fp) (ties are negative).
    Returns (row int32 [B], col int32 [B], is_positive bool [B]).
    """
    if gt.ndim != 3 or pred.shape != gt.shape or not_clicked.shape != gt.shape:
        raise ValueError(
            f"eval_next_click: gt, pred, not_clicked must share one [B,H,W] shape, got "
            f"{gt.shape}, {pred.shape}, {not_clicked.shape}"
        )
    fn = (gt == 1) & ~pred
    fp = (gt != 1) & (gt != -1) & pred
    both = edt(jnp.concatenate([fn, fp]), None if valid is None else jnp.concatenate([valid, valid]))
    both = both * jnp.concatenate([not_clicked, not_clicked]).astype(both.dtype)
    dt_fn, dt_fp = jnp.split(both, 2)
    is_positive = dt_fn.max(axis=(1, 2)) > dt_fp.max(axis=(1, 2))
    dt = jnp.where(is_positive[:, None, None], dt_fn, dt_fp)
    flat = jnp.argmax(dt.reshape(dt.shape[0], -1), axis=1).astype(jnp.int32)
    return flat // gt.shape[2], flat % gt.shape[2], is_positive


def train_next_points(
    key: jax.Array,
    pred: jax.Array,
    gt: jax.Array,
    points: jax.Array,
    click_index: int | jax.Array,
    thresh: float = MASK_THRESHOLD,
    distance: str = "chamfer5",
) -> jax.Array:
    """The training clicker (`get_next_points`): a random deep error pixel written to a fixed slot.

    key: PRNG key; pred [B,H,W] probabilities; gt [B,H,W] (foreground = gt > 0.5); points [B,2P,3]
    rows (row, col, index), positives in 0..P-1, negatives in P..2P-1; click_index k >= 1.
    fn = gt & pred < thresh, fp = ~gt & pred > thresh; dt = the distance of each to the nearest
    non-error pixel with a zero ring around the image: `distance` 'chamfer5' (the original's OpenCV
    5x5 chamfer transform as OpenCV's IPP path computes it, `edt.chamfer5`), 'chamfer5_fixed' (as
    OpenCV's fixed-point path does) or 'exact' (`edt.edt`). is_positive = max_fn > max_fp; the click
    is uniformly random in inner = dt > max(max_fn, max_fp) / 2 and goes to row P-k (positive) or
    2P-k (negative) as (row, col, k); nothing is written when inner is empty.
    Returns the updated points [B,2P,3] (same dtype).
    """
    if pred.ndim != 3 or gt.shape != pred.shape:
        raise ValueError(f"train_next_points: pred and gt must be [B,H,W], got {pred.shape}, {gt.shape}")
    if points.ndim != 3 or points.shape[0] != pred.shape[0] or points.shape[2] != 3 or points.shape[1] % 2:
        raise ValueError(f"train_next_points: points must be [B,2P,3] with B={pred.shape[0]}, got {points.shape}")
    if distance not in CLICK_DISTANCES:
        raise ValueError(f"train_next_points: distance must be one of {CLICK_DISTANCES}, got {distance!r}")
    b, h, w = pred.shape
    num = points.shape[1] // 2
    fg = gt > 0.5
    fn = fg & (pred < thresh)
    fp = ~fg & (pred > thresh)
    dt_fn, dt_fp = jnp.split(_TRANSFORMS[distance](jnp.concatenate([fn, fp])), 2)
    max_fn = dt_fn.max(axis=(1, 2))
    max_fp = dt_fp.max(axis=(1, 2))
    is_positive = max_fn > max_fp
    dt = jnp.where(is_positive[:, None, None], dt_fn, dt_fp)
    inner = dt > (jnp.maximum(max_fn, max_fp) / 2)[:, None, None]
    scores = jnp.where(inner, jax.random.uniform(key, (b, h, w)), -1.0).reshape(b, -1)
    flat = jnp.argmax(scores, axis=1)
    found = inner.reshape(b, -1).any(axis=1)
    k = jnp.asarray(click_index, jnp.int32)
    slot = jnp.where(is_positive, num - k, 2 * num - k)
    value = jnp.stack([flat // w, flat % w, jnp.broadcast_to(k, (b,))], axis=1).astype(points.dtype)
    onehot = (jnp.arange(2 * num)[None, :] == slot[:, None]) & found[:, None]
    return jnp.where(onehot[:, :, None], value[:, None, :], points)
