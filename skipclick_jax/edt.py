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

`chamfer5(mask)` is the original training clicker's distance instead: OpenCV's
`distanceTransform(np.pad(mask, 1), DIST_L2, 5)[1:-1, 1:-1]`, the 5x5 chamfer transform, value for
value up to rare one-ulp differences (see its docstring).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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


# OpenCV's DIST_L2 / maskSize 5 weights (float32: 1, 1.4f, 2.1969f) for the orthogonal, diagonal and
# knight moves.
_HV, _DIAG, _KNIGHT = 1.0, 1.4, 2.1969
_CHAMFER_UNROLL = 1


def _chamfer_pass(cols: jax.Array, valid: jax.Array, sources: jax.Array | None, reverse: bool) -> jax.Array:
    """One raster pass of the 5x5 chamfer transform over wavefront columns (see `chamfer5`).

    cols [T, N, Hp] float32: the pass's initial values (0 at zero pixels, +inf elsewhere for the
    forward pass; the forward result for the backward pass); valid [T, Hp] bool marks real pixels;
    sources [T, N, Hp] bool (forward only) marks zero pixels, which stay 0.
    """
    n, hp = cols.shape[1:]
    inf = jnp.float32(jnp.inf)
    w_hv, w_diag, w_knight = (jnp.float32(w) for w in (_HV, _DIAG, _KNIGHT))
    # Carried wavefronts hold two +inf rows before row 0 (forward) or after row Hp-1 (backward),
    # so the neighbours one and two image rows up (down) are plain slices.
    ring = jnp.full((n, 2), inf, jnp.float32)
    if reverse:
        pad, same, near, far = (lambda c: jnp.concatenate([c, ring], axis=1),
                                slice(0, hp), slice(1, hp + 1), slice(2, hp + 2))
    else:
        pad, same, near, far = (lambda c: jnp.concatenate([ring, c], axis=1),
                                slice(2, hp + 2), slice(1, hp + 1), slice(0, hp))

    def body(carry, x):
        c1, c2, c3, c4, c5, c6, c7 = carry  # the 7 previous wavefronts, nearest first
        col, ok = x[0], x[1]
        new = jnp.minimum(c1[:, same] + w_hv, c1[:, near] + w_knight)
        new = jnp.minimum(new, c2[:, near] + w_diag)
        new = jnp.minimum(new, c3[:, near] + w_hv)
        new = jnp.minimum(new, c4[:, near] + w_diag)
        new = jnp.minimum(new, c5[:, near] + w_knight)
        new = jnp.minimum(new, c5[:, far] + w_knight)
        new = jnp.minimum(new, c7[:, far] + w_knight)
        new = jnp.where(ok[None, :], jnp.minimum(col, new), inf)
        if sources is not None:
            new = jnp.where(x[2], 0.0, new)
        return (pad(new), c1, c2, c3, c4, c5, c6), new

    init = tuple(jnp.full((n, hp + 2), inf, jnp.float32) for _ in range(7))
    xs = (cols, valid) if sources is None else (cols, valid, sources)
    _, out = lax.scan(body, init, xs, reverse=reverse, unroll=_CHAMFER_UNROLL)
    return out


def chamfer5(mask: jax.Array) -> jax.Array:
    """OpenCV's 5x5 chamfer distance of the zero-padded mask: bool [B, H, W] -> float32 [B, H, W].

    Equal value for value to `cv2.distanceTransform(np.pad(m, 1).astype(np.uint8), cv2.DIST_L2, 5)
    [1:-1, 1:-1]` per image (the original training clicker's distance). OpenCV's pip builds run
    this transform through Intel IPP, which sums the float32 weights 1, 1.4f and 2.1969f (orthogonal,
    diagonal, knight move) in float32 along two raster passes: forward, each pixel takes the minimum
    of (neighbour + weight) over its 8 earlier neighbours (rows i-2..i, in raster order); backward,
    the minimum of its own value and the 8 later neighbours. Out-of-image neighbours never count.
    Float32 rounding makes a value depend on the order in which the weights were added, so the
    passes are reproduced exactly: pixel (i, j) is visited on wavefront t = 3i + j, on which none of
    its forward neighbours lies (they are all on t-1..t-7), so a pass is a `lax.scan` over
    3(H+1) + W + 2 wavefronts, each a vector of H + 2 pixels (rows) per image.

    Known gap: where a float32 sum `x + 1` along a row is exactly half-way between two floats,
    IPP sometimes keeps the larger neighbour (depending on the column's position in its vector
    lanes), so about 4e-4 of the pixels of large masks (distances > ~30) differ by one ulp; the
    deep-error region `dt > max / 2` was unchanged in all measured cases (docs/training-parity.md).
    """
    mask = jnp.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"chamfer5: mask must be [B, H, W], got shape {mask.shape}")
    b, h, w = mask.shape
    if mask.size == 0:
        return jnp.zeros(mask.shape, jnp.float32)
    hp, wp = h + 2, w + 2
    fg = jnp.pad(mask.astype(bool), ((0, 0), (1, 1), (1, 1)))
    # Wavefront layout: column t of row i holds pixel (i, t - 3i).
    t_len = 3 * (hp - 1) + wp
    rows = np.arange(hp)[:, None]
    src_col = np.arange(t_len)[None, :] - 3 * rows  # [Hp, T]
    valid = (src_col >= 0) & (src_col < wp)
    skew = jnp.take_along_axis(fg, jnp.asarray(np.clip(src_col, 0, wp - 1))[None], axis=2)
    skew = jnp.where(jnp.asarray(valid)[None], skew, True)  # [B, Hp, T]
    zeros = jnp.transpose(~skew, (2, 0, 1))  # [T, B, Hp]
    valid_t = jnp.asarray(valid.T)
    init = jnp.where(zeros, 0.0, jnp.inf).astype(jnp.float32)
    fwd = _chamfer_pass(init, valid_t, zeros, reverse=False)
    dist = _chamfer_pass(fwd, valid_t, None, reverse=True)  # [T, B, Hp]
    dist = jnp.transpose(dist, (1, 2, 0))  # [B, Hp, T]
    back = jnp.asarray((np.arange(wp)[None, :] + 3 * rows))  # [Hp, Wp]: wavefront of pixel (i, j)
    out = jnp.take_along_axis(dist, back[None], axis=2)
    return out[:, 1:-1, 1:-1]
