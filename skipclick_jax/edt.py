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
`distanceTransform(np.pad(mask, 1), DIST_L2, 5)[1:-1, 1:-1]`, the 5x5 chamfer transform, bit for
bit as OpenCV's pip builds for x86 compute it (through Intel IPP), or as its portable 16.16
fixed-point code does (`arithmetic="fixed"`; see its docstring).
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
# knight moves; its portable code rounds them to 16.16 fixed point (65536, 91750, 143976).
_HV, _DIAG, _KNIGHT = 1.0, 1.4, 2.1969
_FIX_SHIFT = 16
_FIX_INF = 1 << 30  # "no path yet" in fixed point: above any distance, and + a weight fits in int32
CHAMFER_ARITHMETIC = ("ipp", "fixed")
_CHAMFER_UNROLL = 1
_LANES = 4  # forward-pass column group width (see `chamfer5`)


def _chamfer_weights(arithmetic: str):
    """(dtype, orthogonal, diagonal, knight weight, infinity) of a chamfer5 arithmetic."""
    if arithmetic == "fixed":  # CV_FLT_TO_FIX: cvRound(float32 weight * 2^16)
        fix = [int(np.rint(np.float32(w) * np.float32(1 << _FIX_SHIFT))) for w in (_HV, _DIAG, _KNIGHT)]
        return (np.int32, *(np.int32(f) for f in fix), np.int32(_FIX_INF))
    return (np.float32, *(np.float32(w) for w in (_HV, _DIAG, _KNIGHT)), np.float32(np.inf))


def _shifted_views(n: int, hp: int, reverse: bool, inf):
    """Padding and row slices of a carried wavefront: (pad, same row, one row back, two rows back).

    Carried wavefronts hold two +inf rows before row 0 (forward) or after row Hp-1 (backward), so
    the neighbours one and two image rows up (down) are plain slices.
    """
    ring = jnp.full((n, 2), inf)
    if reverse:
        return (lambda c: jnp.concatenate([c, ring], axis=1), slice(0, hp), slice(1, hp + 1), slice(2, hp + 2))
    return (lambda c: jnp.concatenate([ring, c], axis=1), slice(2, hp + 2), slice(1, hp + 1), slice(0, hp))


def _chamfer_forward(init: jax.Array, valid: jax.Array, lane: jax.Array, arithmetic: str) -> jax.Array:
    """The forward pass (see `chamfer5`) over wavefront columns t = 3i + j.

    init [T, N, Hp] (the arithmetic's dtype): 0 at zero pixels, infinity elsewhere; valid [T, Hp] bool
    marks real pixels; lane [T, Hp] int32: the pixel's position p in its column group (0 outside the
    groups). Returns the forward distances [T, N, Hp]. In fixed point every sum is exact, so the
    grouping gives OpenCV's plain raster scan.
    """
    n, hp = init.shape[1:]
    dtype, hv1, diag1, knight1, inf = _chamfer_weights(arithmetic)
    # Per in-group step k: the move weight plus k horizontal steps, one constant each.
    w_hv, w_diag, w_knight = ([dtype(w + dtype(k) * hv1) for k in range(_LANES)] for w in (hv1, diag1, knight1))
    pad, same, near, far = _shifted_views(n, hp, False, inf)

    def body(carry, x):
        (c1, c2, c3, c4, c5, c6, c7), (u1a, u2a, u2b, u3a, u3b, u3c) = carry
        col, ok, p = x
        hv = c3[:, near]  # (i-1, j)
        diag = jnp.minimum(c2[:, near], c4[:, near])  # (i-1, j+1), (i-1, j-1)
        knight = jnp.minimum(jnp.minimum(c1[:, near], c5[:, near]),  # (i-1, j+2), (i-1, j-2)
                             jnp.minimum(c5[:, far], c7[:, far]))  # (i-2, j+1), (i-2, j-1)
        # u[k]: candidates (1), (2) of `chamfer5` that enter the row here, for the pixel k columns right.
        u = [jnp.minimum(jnp.minimum(col + w_hv[k] - hv1, hv + w_hv[k]),
                         jnp.minimum(diag + w_diag[k], knight + w_knight[k])) for k in range(_LANES)]
        p = p[None, :]
        new = jnp.minimum(u[0], jnp.where(p >= 1, u1a, inf))
        new = jnp.minimum(new, jnp.where(p >= 2, u2b, inf))
        new = jnp.minimum(new, jnp.where(p >= 3, u3c, inf))
        # The pixel just before the group, p + 1 columns left, plus p + 1 steps.
        before = jnp.where(p == 0, c1[:, same],
                           jnp.where(p == 1, c2[:, same], jnp.where(p == 2, c3[:, same], c4[:, same])))
        new = jnp.minimum(new, before + (p + 1).astype(dtype) * hv1)
        new = jnp.where(ok[None, :], new, inf)
        return ((pad(new), c1, c2, c3, c4, c5, c6), (u[1], u[2], u2a, u[3], u3a, u3b)), new

    walls = tuple(jnp.full((n, hp + 2), inf) for _ in range(7))
    starts = tuple(jnp.full((n, hp), inf) for _ in range(6))
    _, out = lax.scan(body, (walls, starts), (init, valid, lane), unroll=_CHAMFER_UNROLL)
    return out


def _chamfer_backward(fwd: jax.Array, valid: jax.Array, arithmetic: str) -> jax.Array:
    """The backward pass (see `chamfer5`): fwd [T, N, Hp] forward distances -> final [T, N, Hp]."""
    n, hp = fwd.shape[1:]
    _, w_hv, w_diag, w_knight, inf = _chamfer_weights(arithmetic)
    pad, same, near, far = _shifted_views(n, hp, True, inf)

    def body(carry, x):
        c1, c2, c3, c4, c5, c6, c7 = carry  # the 7 later wavefronts, nearest first
        col, ok = x
        new = jnp.minimum(c1[:, same] + w_hv, c1[:, near] + w_knight)  # (i, j+1), (i+1, j-2)
        new = jnp.minimum(new, c2[:, near] + w_diag)  # (i+1, j-1)
        new = jnp.minimum(new, c3[:, near] + w_hv)  # (i+1, j)
        new = jnp.minimum(new, c4[:, near] + w_diag)  # (i+1, j+1)
        new = jnp.minimum(new, c5[:, near] + w_knight)  # (i+1, j+2)
        new = jnp.minimum(new, c5[:, far] + w_knight)  # (i+2, j-1)
        new = jnp.minimum(new, c7[:, far] + w_knight)  # (i+2, j+1)
        new = jnp.where(ok[None, :], jnp.minimum(col, new), inf)
        return (pad(new), c1, c2, c3, c4, c5, c6), new

    init = tuple(jnp.full((n, hp + 2), inf) for _ in range(7))
    _, out = lax.scan(body, init, (fwd, valid), reverse=True, unroll=_CHAMFER_UNROLL)
    return out


def chamfer5(mask: jax.Array, arithmetic: str = "ipp") -> jax.Array:
    """OpenCV's 5x5 chamfer distance of the zero-padded mask: bool [B, H, W] -> float32 [B, H, W].

    arithmetic="ipp" (the default): equal bit for bit to
    `cv2.distanceTransform(np.pad(m, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]` per image (the original training clicker's distance) as OpenCV's pip builds
    compute it: through Intel IPP, in float32, with the weights a = 1, b = 1.4f, c = 2.1969f
    (orthogonal, diagonal, knight move). Float32 rounding makes a value depend on how the sums were
    formed, so IPP's two raster passes over the padded image P (Hp x Wp) are reproduced exactly:

    - Forward (rows top to bottom). Columns j < J = 4 * floor((Wp - 2) / 4) form groups of 4
      (4g .. 4g+3); pixel (i, j) at position p = j - 4g in its group takes the minimum of
      (1) for every k = 0..p and every forward neighbour n of (i, j-k) in rows i-1, i-2 (move
      weight w): F(n) + float32(w + k), one rounding per path (the k steps along the row are folded
      into the constant); (2) k if (i, j-k) is a zero pixel; (3) F(i, 4g-1) + (p+1), the value just
      before the group plus the steps. Columns j >= J run one by one: F(i, j-1) + 1 and F(n) + w.
    - Backward (rows bottom to top, right to left, one pixel at a time): the minimum of the
      forward value, D(i, j+1) + 1 and D(n) + w over the later neighbours in rows i+1, i+2.

    Neighbours outside the padded image never count. Computation: pixel (i, j) is visited on
    wavefront t = 3i + j, on which none of its forward (backward) neighbours lies (they are all on
    t-1..t-7, resp. t+1..t+7), so a pass is a `lax.scan` over 3(Hp-1) + Wp wavefronts, each a vector
    of Hp pixels (rows) per image; the forward pass also carries each pixel's candidates (1) for
    k = 1..3 to the next 3 pixels of its row.

    arithmetic="fixed": as OpenCV's portable code computes it (builds without IPP, e.g. on ARM, or
    after `cv2.ipp.setUseIPP(False)`): the same passes in 16.16 fixed point, weights
    round(w * 2^16) = 65536, 91750, 143976, every sum exact, and the result converted to float32 and
    scaled by 2^-16 at the end (a diagonal step reads 1.3999939).
    """
    mask = jnp.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"chamfer5: mask must be [B, H, W], got shape {mask.shape}")
    if arithmetic not in CHAMFER_ARITHMETIC:
        raise ValueError(f"chamfer5: arithmetic must be one of {CHAMFER_ARITHMETIC}, got {arithmetic!r}")
    _, h, w = mask.shape
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
    dtype, *_, inf = _chamfer_weights(arithmetic)
    init = jnp.where(zeros, dtype(0), inf)
    # Position in the forward pass's column groups: columns below 4 * floor((Wp - 2) / 4) only.
    cols = np.where(valid, src_col, 0)
    lane = np.where(cols < _LANES * ((wp - 2) // _LANES), cols % _LANES, 0).astype(np.int32)
    fwd = _chamfer_forward(init, valid_t, jnp.asarray(lane.T), arithmetic)
    dist = _chamfer_backward(fwd, valid_t, arithmetic)  # [T, B, Hp]
    if arithmetic == "fixed":
        dist = dist.astype(jnp.float32) * jnp.float32(2.0 ** -_FIX_SHIFT)
    dist = jnp.transpose(dist, (1, 2, 0))  # [B, Hp, T]
    back = jnp.asarray(np.arange(wp)[None, :] + 3 * rows)  # [Hp, Wp]: wavefront of pixel (i, j)
    out = jnp.take_along_axis(dist, back[None], axis=2)
    return out[:, 1:-1, 1:-1]
