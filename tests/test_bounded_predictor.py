"""Bounded memory of the interactive Predictor (issue #27): host-side resizes equal to the
two-step float32 ones bit for bit, argument validation, and RSS flat over many image sizes."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from skipclick_jax import resize
from skipclick_jax.predictor import Predictor, check_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("shape", [(150, 200), (224, 224), (224, 97), (1, 5), (6000, 37), (3, 2000)])
def test_roundtrip_equals_two_resizes_bitwise(shape):
    rng = np.random.default_rng(0)
    p = rng.random((224, 224), np.float32)
    want = resize.bilinear_ac_numpy(resize.bilinear_ac_numpy(p[None], shape, False), (224, 224), False)[0]
    np.testing.assert_array_equal(resize.bilinear_ac_roundtrip_numpy(p, shape), want)
    full = resize.bilinear_ac_numpy(p[None], shape, False)[0]
    np.testing.assert_array_equal(resize.bilinear_ac_threshold_numpy(p, shape, 0.5, chunk_rows=7), full > 0.5)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_chunked_image_resize_bitwise(dtype):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (300, 170, 3)).astype(dtype)
    convert = (lambda b: b.astype(np.float32) / np.float32(255)) if dtype == np.uint8 else (lambda b: b)
    want = resize.bilinear_ac_numpy(convert(image), (224, 224))
    np.testing.assert_array_equal(resize.bilinear_ac_image_numpy(image, (224, 224), convert, chunk_rows=64), want)


def test_probability_matches_jax_resizes(tiny_model):
    """The NumPy host path gives what the former jitted resizes gave (same kernels)."""
    import jax.numpy as jnp

    p = Predictor(tiny_model)
    image = np.random.default_rng(2).integers(0, 256, (97, 131, 3), dtype=np.uint8)
    p.set_image(image)
    p.add_click(10, 20, True)
    prob = p.add_click(50, 100, False)
    step_s = p.network_probability
    want = np.asarray(resize.bilinear_ac(jnp.asarray(step_s)[None], (97, 131), channels_last=False)[0])
    np.testing.assert_allclose(prob, want, atol=1e-6)
    assert p.history_nbytes == 2 * 224 * 224 * 4  # two clicks, S×S float32 each: nothing H×W
    np.testing.assert_array_equal(p.mask(), prob > 0.5)


def test_argument_validation(tiny_model):
    p = Predictor(tiny_model)
    p.set_image(np.zeros((30, 40, 3), np.uint8))
    with pytest.raises(TypeError, match="row must be an integer.*str '10'"):
        p.add_click("10", 5)
    with pytest.raises(TypeError, match="col must be an integer.*float"):
        p.add_click(1, 2.0)
    with pytest.raises(TypeError, match="row must be an integer.*bool"):
        p.add_click(True, 2)
    with pytest.raises(TypeError, match="positive must be True or False.*'no'"):
        p.add_click(1, 2, positive="no")
    p.add_click(np.int64(1), np.int32(2), positive=np.bool_(False))
    assert p.clicks == [(1, 2, False)]
    for bad in (0, -14, 15, 14.0, True):
        with pytest.raises(ValueError, match="positive multiple of the patch size 14"):
            Predictor(tiny_model, size=bad)
    with pytest.raises(ValueError, match="size 14 does not fit this model"):
        Predictor(tiny_model, size=14)
    assert check_size(28, 14) == 28


def test_float_image_hint(tiny_model):
    from skipclick_jax.images import as_float_image

    with pytest.raises(ValueError, match="rescale or clip it to 0..1") as e:
        as_float_image(np.full((4, 4, 3), 1.01, np.float32))
    assert "0..255" not in str(e.value)
    with pytest.raises(ValueError, match="looks like 0..255"):
        as_float_image(np.full((4, 4, 3), 200.0, np.float32))


RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from skipclick_jax import config_lib
    from skipclick_jax.model import build_model
    from skipclick_jax.predictor import Predictor

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    model = build_model(config_lib.tiny_model_config(), seed=0)
    p = Predictor(model)
    rng = np.random.default_rng(0)
    def one(h, w):
        p.set_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        p.add_click(h // 2, w // 2, True)
        p.add_click(h // 3, w // 3, False)
        p.undo()
    sizes = [(100 + 3 * i, 420 - 2 * i) for i in range(int(sys.argv[1]))]
    for h, w in sizes[:10]:  # warm-up: compiles, allocator arenas, tap caches
        one(h, w)
    before = rss_mb()
    for h, w in sizes[10:]:
        one(h, w)
    print(json.dumps(dict(before=before, after=rss_mb(), sizes=len(sizes))))
""")


def test_rss_flat_over_many_image_sizes(tmp_path):
    """200 distinct image sizes (the issue's measurement: about +10 MB per new size before).

    Bound: 40 MB growth over the last 190 sizes. Nothing size-dependent is compiled any more; what
    remains per size is the resize taps cache (`linear_taps`, lru 512 entries of at most
    16 bytes per output index: < 3 KB each here, < 2 MB in all) and allocator noise; the former
    per-shape executables would add ~1.9 GB over 190 sizes, so the bound separates the two by
    ~50x."""
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(script), "200"], env=env, capture_output=True,
                         text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print(m)
    assert m["sizes"] == 200
    assert m["after"] - m["before"] < 40, m
