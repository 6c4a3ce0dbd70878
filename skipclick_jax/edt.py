"""Exact Euclidean distance transform in pure JAX (jittable, batched).

`edt(mask)` equals `scipy.ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]` (and OpenCV's
`distanceTransform(DIST_L2, maskSize=0)` on the same padded mask, as used by the original clicker):
every pixel gets the distance to the nearest zero pixel, where the one-pixel ring around the array
and every pixel outside `valid` count as zeros. Pixels outside `valid` therefore behave exactly as
the original's zero padding around the real image (the nearest outside pixel of a point inside a
rectangle always lies on the ring around it), so a padded bucket never changes a distance.

Algorithm (separable, integer-exact): a column pass finds the vertical distance g to the nearest
zero with two cumulative scans; a row pass computes D(i, j) = min_k g(i, k)^2 + (j - k)^2 by
visiting offsets |j - k| = 1, 2, ... and stopping once (d + 1)^2 reaches max D, since no farther
column can then improve any pixel. Work is O(H * W * max distance), memory O(H * W).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_BIG = 1 << 30  # > any squared distance; BIG + W^2 still fits in int32.
_UNROLL = 4  # offsets per while-loop iteration


def edt_squared(mask: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Squared distance to the nearest zero: mask [..., H, W] (nonzero = foreground) -> int32 [..., H, W].

    `valid` (same shape, bool) marks real pixels; pixels outside it count as zeros.
    """
    mask = jnp.asarray(mask)
    if mask.ndim < 2:
        raise ValueError(f"edt: mask must be [..., H, W], got shape {mask.shape}")
    fg = mask.astype(bool)
    if valid is not None:
        if jnp.shape(valid) != mask.shape:
            raise ValueError(f"edt: valid shape {jnp.shape(valid)} != mask shape {mask.shape}")
        fg = fg & jnp.asarray(valid, bool)
    h, w = fg.shape[-2:]

    # Column pass: rows -1 and H are the zero ring.
    rows = lax.broadcasted_iota(jnp.int32, fg.shape, fg.ndim - 2)
    above = lax.cummax(jnp.where(fg, -1, rows), axis=fg.ndim - 2)
    below = lax.cummin(jnp.where(fg, h, rows), axis=fg.ndim - 2, reverse=True)
    g = jnp.minimum(rows - above, below - rows)
    f = g * g

    # Row pass: columns -1 and W are the zero ring; all D <= ((W + 1) / 2)^2, so offsets stay < pad.
    cols = lax.broadcasted_iota(jnp.int32, fg.shape, fg.ndim - 1)
    d0 = jnp.minimum(f, jnp.minimum((cols + 1) ** 2, (w - cols) ** 2))
    if fg.size == 0:
        return d0
    pad = w // 2 + _UNROLL + 1
    fpad = jnp.pad(f, [(0, 0)] * (fg.ndim - 1) + [(pad, pad)], constant_values=_BIG)
    zeros = (0,) * (fg.ndim - 1)

    def shifted(offset):
        return lax.dynamic_slice(fpad, zeros + (pad + offset,), fg.shape)

    def cond(carry):
        d, dist = carry
        return (d + 1) ** 2 < jnp.max(dist)

    def body(carry):
        d, dist = carry
        for u in range(1, _UNROLL + 1):
            off = d + u
            dist = jnp.minimum(dist, jnp.minimum(shifted(off), shifted(-off)) + off * off)
        return d + _UNROLL, dist

    _, dist = lax.while_loop(cond, body, (jnp.int32(0), d0))
    return dist


def edt(mask: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Distance to the nearest zero: mask [..., H, W] -> float32 [..., H, W] (see module docstring)."""
    return jnp.sqrt(edt_squared(mask, valid).astype(jnp.float32))
