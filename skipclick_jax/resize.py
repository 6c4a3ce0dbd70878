"""PyTorch's resampling kernels, exactly (docs/design/model.md#resampling).

A separable resize gathers T source taps per output index along each axis and accumulates
`out = Σ_t x[idx_t] · w_t` in tap order, width first, then height, exactly as torch's CPU kernel
(`cpu_upsample_generic`) does. Tap indices and weights are computed in NumPy float32 with torch's
operation order, so results match torch's float32 outputs to the last bit in the common case.
  * bilinear, align_corners=True   (final logits, evaluation resizes)            -> `bilinear_ac`
  * bilinear, align_corners=False  (SegFormer head upsampling)                    -> `bilinear`
  * bicubic, antialias=False, a=-0.75, clamped borders (EncoderStack pos-embed) -> `bicubic`
  * bicubic, antialias=True (DINOv2 pos-embed; mathematically `jax.image.resize` cubic with
    antialias, but with torch's float32 weights)                                 -> `bicubic_antialias`
Cost is O(output · T), so resizing multi-megapixel evaluation images is cheap.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import jax

_F32 = np.float32


def _source_scale(n_in: int, n_out: int, align_corners: bool) -> np.float32:
    if align_corners:
        return _F32(n_in - 1) / _F32(n_out - 1) if n_out > 1 else _F32(0)
    return _F32(n_in) / _F32(n_out)


@functools.lru_cache(maxsize=512)
def linear_taps(n_in: int, n_out: int, align_corners: bool) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps: (indices int32 [n_out, 2], weights float32 [n_out, 2])."""
    scale = _source_scale(n_in, n_out, align_corners)
    idx = np.zeros((n_out, 2), np.int32)
    wts = np.zeros((n_out, 2), np.float32)
    for i in range(n_out):
        if align_corners:
            s = scale * _F32(i)
        else:
            s = max(_F32(0), _F32(np.float64(scale) * (i + 0.5) - 0.5))
        i0 = min(int(np.floor(s)), n_in - 1)
        lam = min(max(s - _F32(i0), _F32(0)), _F32(1))
        idx[i] = (i0, min(i0 + 1, n_in - 1))
        wts[i] = (_F32(1) - lam, lam)
    return idx, wts


@functools.lru_cache(maxsize=512)
def cubic_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Bicubic (antialias=False, align_corners=False) taps f-1..f+2, Keys a=-0.75, clamped."""
    a = _F32(-0.75)
    one = _F32(1)

    def near(x):  # |x| <= 1
        return ((a + _F32(2)) * x - (a + _F32(3))) * x * x + one

    def far(x):  # 1 < |x| < 2
        return ((a * x - _F32(5) * a) * x + _F32(8) * a) * x - _F32(4) * a

    scale = _source_scale(n_in, n_out, False)
    idx = np.zeros((n_out, 4), np.int32)
    wts = np.zeros((n_out, 4), np.float32)
    for i in range(n_out):
        s = _F32(np.float64(scale) * (i + 0.5) - 0.5)
        f = int(np.floor(s))
        t = s - _F32(f)
        idx[i] = [min(max(k, 0), n_in - 1) for k in range(f - 1, f + 3)]
        wts[i] = [far(t + one), near(t), near(one - t), far((one - t) + one)]
    return idx, wts


@functools.lru_cache(maxsize=512)
def cubic_aa_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Antialiased bicubic taps (PIL-style, Keys a=-0.5, support scaled by max(scale, 1),
    weights renormalised), as torch's `_compute_weights_aa`; unused taps have weight 0."""
    a = _F32(-0.5)
    one = _F32(1)

    def filt(x):
        x = abs(x)
        if x < one:
            return ((a + _F32(2)) * x - (a + _F32(3))) * x * x + one
        if x < _F32(2):
            return ((a * x - _F32(5) * a) * x + _F32(8) * a) * x - _F32(4) * a
        return _F32(0)

    scale = _F32(n_in) / _F32(n_out)
    support = _F32(2) * scale if scale >= 1 else _F32(2)
    invscale = _F32(1.0 / np.float64(scale)) if scale >= 1 else one
    rows = []
    for i in range(n_out):
        center = _F32(np.float64(scale) * (i + 0.5))
        xmin = max(int(np.float64(center) - np.float64(support) + 0.5), 0)
        xmax = min(int(np.float64(center) + np.float64(support) + 0.5), n_in)
        w = [filt(_F32(((j - np.float64(center)) + 0.5) * np.float64(invscale))) for j in range(xmin, xmax)]
        total = _F32(0)
        for wj in w:
            total = total + wj
        rows.append([(j, wj / total if total != 0 else wj) for j, wj in zip(range(xmin, xmax), w)])
    width = max(len(r) for r in rows)
    idx = np.zeros((n_out, width), np.int32)
    wts = np.zeros((n_out, width), np.float32)
    for i, r in enumerate(rows):
        for t, (j, wj) in enumerate(r):
            idx[i, t], wts[i, t] = j, wj
    return idx, wts


def _separable(x: jax.Array, taps_h, taps_w, h_axis: int, xp=None) -> jax.Array:
    if xp is None:
        import jax.numpy as xp
    w_axis = h_axis + 1
    trailing = (1,) * (-w_axis - 1)  # broadcast weights over trailing (channel) axes

    def along(y, taps, axis, shape):
        idx, wts = taps
        out = None
        for t in range(idx.shape[1]):
            term = xp.take(y, xp.asarray(idx[:, t]), axis=axis) * xp.asarray(wts[:, t]).reshape(shape)
            out = term if out is None else out + term
        return out

    # Width pass on every row, then the height taps: each output is the same sums in the same
    # order as gathering rows first (the width pass treats rows independently), with
    # taps_h + taps_w gathers instead of taps_h · taps_w.
    rows = along(x, taps_w, w_axis, (-1, *trailing))
    return along(rows, taps_h, h_axis, (-1, 1, *trailing))


def _resize(x, size, taps_fn, channels_last, xp=None):
    h_axis = -3 if channels_last else -2
    n_h, n_w = x.shape[h_axis], x.shape[h_axis + 1]
    if (n_h, n_w) == tuple(size):
        return x
    return _separable(x, taps_fn(n_h, size[0]), taps_fn(n_w, size[1]), h_axis, xp)


def bilinear_ac(x: jax.Array, size: tuple[int, int], channels_last: bool = True) -> jax.Array:
    """torch bilinear, align_corners=True, of [..., H, W, C] (or [..., H, W]) to `size`."""
    return _resize(x, size, functools.partial(linear_taps, align_corners=True), channels_last)


def bilinear_ac_numpy(x: np.ndarray, size: tuple[int, int], channels_last: bool = True) -> np.ndarray:
    """`bilinear_ac` in NumPy float32 (same taps, same order; no JAX import): host-side resizes."""
    x = np.asarray(x, np.float32)
    return _resize(x, size, functools.partial(linear_taps, align_corners=True), channels_last, np)


def bilinear(x: jax.Array, size: tuple[int, int], channels_last: bool = True) -> jax.Array:
    """torch bilinear, align_corners=False, no antialias."""
    return _resize(x, size, functools.partial(linear_taps, align_corners=False), channels_last)


def bicubic(x: jax.Array, size: tuple[int, int], channels_last: bool = True) -> jax.Array:
    """torch bicubic, antialias=False (a=-0.75, clamped borders)."""
    return _resize(x, size, cubic_taps, channels_last)


def bicubic_antialias(x: jax.Array, size: tuple[int, int], channels_last: bool = True) -> jax.Array:
    """torch bicubic, antialias=True (equal to jax cubic+antialias up to float32 weight rounding)."""
    return _resize(x, size, cubic_aa_taps, channels_last)


def _along_numpy(y: np.ndarray, idx: np.ndarray, wts: np.ndarray, axis: int,
                 trailing: tuple = ()) -> np.ndarray:
    """One pass of `_separable` in NumPy: Σ_t y[idx_t] · w_t along `axis` (0 = height, 1 = width)
    of y [H, W, *C]; `trailing` is (1,) * len(C)."""
    shape = (-1, *trailing) if axis == 1 else (-1, 1, *trailing)
    out = None
    for t in range(idx.shape[1]):
        term = np.take(y, idx[:, t], axis=axis) * wts[:, t].reshape(shape)
        out = term if out is None else out + term
    return out


def bilinear_ac_roundtrip_numpy(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """x [S, S'] -> `bilinear_ac_numpy(bilinear_ac_numpy(x, size), x.shape)` without the full
    `size` intermediate: bit for bit the same float32 sums, computed only for the rows and columns
    of the intermediate that the way back reads (at most 2·S of each), so memory is O(S·S').

    This is how the Predictor feeds an H×W probability back at network size S×S' without keeping
    (or allocating) anything H×W.
    """
    x = np.asarray(x, np.float32)
    s_h, s_w = x.shape
    if (s_h, s_w) == tuple(size):
        return x
    taps = functools.partial(linear_taps, align_corners=True)
    (up_hi, up_hw), (up_wi, up_ww) = taps(s_h, size[0]), taps(s_w, size[1])
    (dn_hi, dn_hw), (dn_wi, dn_ww) = taps(size[0], s_h), taps(size[1], s_w)
    rows, cols = np.unique(dn_hi), np.unique(dn_wi)  # the intermediate pixels read on the way back
    y = _along_numpy(x, up_wi[cols], up_ww[cols], axis=1)       # width up: [S, |cols|]
    y = _along_numpy(y, up_hi[rows], up_hw[rows], axis=0)       # height up: [|rows|, |cols|]
    y = _along_numpy(y, np.searchsorted(cols, dn_wi).astype(np.int32), dn_ww, axis=1)  # [|rows|, S']
    return _along_numpy(y, np.searchsorted(rows, dn_hi).astype(np.int32), dn_hw, axis=0)


def bilinear_ac_threshold_numpy(x: np.ndarray, size: tuple[int, int], threshold: float,
                                chunk_rows: int = 512) -> np.ndarray:
    """`bilinear_ac_numpy(x, size, channels_last=False) > threshold` for x [S, S'] -> bool [H, W],
    with the float32 result made `chunk_rows` output rows at a time (the same sums): the float
    H×W map never exists whole."""
    x = np.asarray(x, np.float32)
    if x.shape == tuple(size):
        return x > threshold
    taps = functools.partial(linear_taps, align_corners=True)
    (hi, hw), (wi, ww) = taps(x.shape[0], size[0]), taps(x.shape[1], size[1])
    rows = _along_numpy(x, wi, ww, axis=1)  # width pass: [S, W]
    out = np.empty(tuple(size), bool)
    for r0 in range(0, size[0], chunk_rows):
        r1 = min(r0 + chunk_rows, size[0])
        out[r0:r1] = _along_numpy(rows, hi[r0:r1], hw[r0:r1], axis=0) > threshold
    return out


def bilinear_ac_image_numpy(image: np.ndarray, size: tuple[int, int], convert,
                            chunk_rows: int = 512) -> np.ndarray:
    """`bilinear_ac_numpy(convert(image), size)` for an [H, W, C] image, converting and
    width-resizing `chunk_rows` input rows at a time (the width pass treats rows independently:
    the same sums), so no float copy of the full image is made. `convert` maps a row block to
    float32 (e.g. uint8 / 255)."""
    h, w = image.shape[:2]
    if (h, w) == tuple(size):
        return np.asarray(convert(image), np.float32)
    taps = functools.partial(linear_taps, align_corners=True)
    (hi, hw), (wi, ww) = taps(h, size[0]), taps(w, size[1])
    trailing = (1,) * (image.ndim - 2)
    rows = np.concatenate([
        _along_numpy(np.asarray(convert(image[r0:r0 + chunk_rows]), np.float32), wi, ww, 1, trailing)
        for r0 in range(0, h, chunk_rows)])
    return _along_numpy(rows, hi, hw, 0, trailing)

