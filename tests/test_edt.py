"""skipclick_jax.edt against scipy.ndimage.distance_transform_edt on the zero-padded mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from skipclick_jax.edt import edt, edt_squared

pytestmark = pytest.mark.usefixtures("on_cpu")  # bit-exact / measured on CPU

_edt = jax.jit(edt)


def reference(mask):
    """The original clicker's distance: pad 1 px of zeros, exact EDT, crop (float32 like OpenCV)."""
    return ndimage.distance_transform_edt(np.pad(mask, 1)).astype(np.float32)[1:-1, 1:-1]


def check(masks):
    out = np.asarray(_edt(jnp.asarray(masks)))
    np.testing.assert_array_equal(out, np.stack([reference(m) for m in masks]))


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 1), (13, 17), (40, 29)])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 0.97, 1.0])
def test_random_masks(shape, density):
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    check(rng.random((3, *shape)) < density)


def test_adversarial_masks():
    h, w = 33, 48
    masks = np.ones((8, h, w), bool)
    masks[1, h // 2, w // 2] = False  # one zero: a cone, many ties
    masks[2, :, 10] = False  # a zero column
    masks[3] = False
    masks[3, 5, 7] = True  # one foreground pixel
    masks[4, ::7, ::5] = False  # a lattice of zeros: many equidistant ties
    yy, xx = np.mgrid[:h, :w]
    masks[5] = (yy - 16) ** 2 + (xx - 20) ** 2 > 90  # zero disk
    masks[6] = xx > yy  # a diagonal edge
    masks[7, 0, :] = False  # zeros on the border only
    check(masks)


def test_valid_mask_is_the_original_padding():
    """A mask padded into a larger bucket with `valid` gives the distances of the unpadded mask."""
    rng = np.random.default_rng(1)
    hb, wb = 40, 56
    refs = []
    valid = np.zeros((3, hb, wb), bool)
    masks = rng.random((3, hb, wb)) < 0.97  # padding is foreground: must not matter
    for i, (h, w) in enumerate([(40, 56), (23, 31), (9, 50)]):
        valid[i, :h, :w] = True
        refs.append(np.pad(reference(masks[i, :h, :w]), ((0, hb - h), (0, wb - w))))
    out = np.asarray(jax.jit(edt)(jnp.asarray(masks), jnp.asarray(valid))) * valid
    np.testing.assert_array_equal(out, np.stack(refs))


def test_large_full_mask_is_exact():
    mask = np.ones((1, 300, 451), bool)
    mask[0, 100, 200] = False
    d2 = np.asarray(jax.jit(edt_squared)(mask))
    ref = ndimage.distance_transform_edt(np.pad(mask[0], 1), return_distances=True)[1:-1, 1:-1]
    np.testing.assert_array_equal(d2[0], np.rint(ref.astype(np.float64) ** 2).astype(np.int64))


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="valid shape"):
        edt(jnp.ones((2, 4, 4)), jnp.ones((2, 4, 5), bool))
    with pytest.raises(ValueError, match=r"\[..., H, W\]"):
        edt(jnp.ones((4,)))
