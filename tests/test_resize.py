"""Resampling kernels against the formulas of docs/design/model.md#resampling and against PyTorch itself."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipclick_jax import resize

pytestmark = pytest.mark.usefixtures("on_cpu")  # bit-exact / measured on CPU

SIZES = [(128, 128, 448, 448), (37, 37, 32, 32), (37, 37, 13, 19), (500, 375, 448, 448), (16, 16, 48, 64)]


def _keys(x, a):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def _matrix_spec(kind, n_in, n_out):
    """Float64 weight matrices written straight from docs/design/model.md#resampling."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        if kind in ("ac", "lin"):
            s = i * (n_in - 1) / (n_out - 1) if kind == "ac" else max(0.0, (i + 0.5) * n_in / n_out - 0.5)
            i0 = min(int(np.floor(s)), n_in - 1)
            lam = s - i0
            w[i, i0] += 1 - lam
            w[i, min(i0 + 1, n_in - 1)] += lam
        elif kind == "cub":
            s = (i + 0.5) * n_in / n_out - 0.5
            f = int(np.floor(s))
            t = s - f
            for k, wk in zip(range(f - 1, f + 3), _keys(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
                w[i, min(max(k, 0), n_in - 1)] += wk
        else:  # antialiased bicubic
            scale = n_in / n_out
            support = 2 * max(scale, 1.0)
            centre = scale * (i + 0.5)
            lo, hi = max(0, int(centre - support + 0.5)), min(n_in, int(centre + support + 0.5))
            js = np.arange(lo, hi)
            ws = _keys((js - centre + 0.5) / max(scale, 1.0), -0.5)
            w[i, lo:hi] = ws / ws.sum()
    return w


FNS = {"ac": resize.bilinear_ac, "lin": resize.bilinear, "cub": resize.bicubic, "aa": resize.bicubic_antialias}


@pytest.mark.parametrize("kind", sorted(FNS))
@pytest.mark.parametrize("hi,wi,ho,wo", SIZES)
def test_against_spec_formulas(kind, hi, wi, ho, wo):
    x = np.random.default_rng(0).standard_normal((2, hi, wi, 3))
    want = np.einsum("oh,bhwc,pw->bopc", _matrix_spec(kind, hi, ho), x, _matrix_spec(kind, wi, wo),
                     optimize=True)
    got = jax.jit(functools.partial(FNS[kind], size=(ho, wo)))(jnp.asarray(x, jnp.float32))
    # Like torch, source positions are computed in float32: a position error of up to about
    # n·2^-24 px (n <= 500 here) times neighbour differences of up to ~6 for N(0, 1) data gives
    # <= 3e-4. torch does the same; `test_against_torch` is the tight check.
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-4)


def test_antialiased_cubic_is_jax_cubic():
    x = np.random.default_rng(1).standard_normal((1, 37, 37, 8)).astype(np.float32)
    got = resize.bicubic_antialias(jnp.asarray(x), (32, 32))
    want = jax.image.resize(jnp.asarray(x), (1, 32, 32, 8), method="cubic", antialias=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("hi,wi,ho,wo", SIZES)
def test_against_torch(hi, wi, ho, wo):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = np.random.default_rng(2).standard_normal((2, 3, hi, wi)).astype(np.float32)
    modes = {"ac": dict(mode="bilinear", align_corners=True), "lin": dict(mode="bilinear", align_corners=False),
             "cub": dict(mode="bicubic", align_corners=False), "aa": dict(mode="bicubic", antialias=True)}
    for kind, kw in modes.items():
        want = F.interpolate(torch.from_numpy(x), size=(ho, wo), **kw).numpy()
        got = jax.jit(functools.partial(FNS[kind], size=(ho, wo), channels_last=False))(jnp.asarray(x))
        # Same taps, weights and accumulation order as torch's CPU kernel; what remains is
        # fused-multiply-add placement: at most a few float32 ulps of values of magnitude ~3.
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-6, err_msg=kind)
        if kind == "ac" and ho >= 128:
            np.testing.assert_array_equal(got, want)  # bit-exact for the evaluation resizes


def test_identity_when_size_unchanged():
    x = jnp.arange(24.0).reshape(1, 2, 4, 3)
    for fn in FNS.values():
        assert fn(x, (2, 4)) is x
