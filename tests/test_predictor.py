"""The interactive Predictor (docs/design/evaluation.md#quick-response-split): mapping, feedback of the previous probability, undo."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipclick_jax import resize
from skipclick_jax.predictor import Predictor

pytestmark = pytest.mark.usefixtures("on_cpu")  # bit-exact / measured on CPU


@pytest.fixture(scope="module")
def predictor(tiny_model):
    return Predictor(tiny_model)


def _manual(model, image, clicks, prev):
    """The demo glue written out: resize to S, clicks S·r/H, prev prob to S, sigmoid, resize back."""
    s = 224
    h, w = image.shape[:2]
    img = resize.bilinear_ac(jnp.asarray(image, jnp.float32)[None] / 255.0, (s, s))
    pos = [(s * r / h, s * c / w, i) for i, (r, c, p) in enumerate(clicks) if p]
    neg = [(s * r / h, s * c / w, i) for i, (r, c, p) in enumerate(clicks) if not p]
    p = max(len(pos), len(neg), 1)
    pts = -np.ones((1, 2 * p, 3), np.float32)
    for offset, group in ((0, pos), (p, neg)):
        for k, row in enumerate(group):
            pts[0, offset + k] = row
    prev_s = resize.bilinear_ac(jnp.asarray(prev)[None], (s, s), channels_last=False)
    logits = model(img, prev_s, jnp.asarray(pts))
    return np.asarray(resize.bilinear_ac(jax.nn.sigmoid(logits), (h, w), channels_last=False)[0])


def test_clicks_undo_reset(predictor, tiny_model):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)  # any size: resized once to 224
    predictor.set_image(image)
    assert predictor.probability.shape == (150, 200) and not predictor.probability.any()
    p1 = predictor.add_click(40, 60, True)
    assert p1.shape == (150, 200) and p1.dtype == np.float32 and 0 <= p1.min() and p1.max() <= 1
    # Clicks at pixels whose mapped position is fractional: no integer rounding happens.
    np.testing.assert_allclose(p1, _manual(tiny_model, image, [(40, 60, True)], np.zeros((150, 200))),
                               atol=2e-5)
    p2 = predictor.add_click(100, 150, False)
    want = _manual(tiny_model, image, [(40, 60, True), (100, 150, False)], p1)
    np.testing.assert_allclose(p2, want, atol=2e-5)  # the previous probability is fed back
    assert predictor.clicks == [(40, 60, True), (100, 150, False)]
    np.testing.assert_array_equal(predictor.undo(), p1)
    assert predictor.clicks == [(40, 60, True)]
    predictor.reset()
    assert predictor.clicks == [] and not predictor.probability.any()


def test_bad_inputs(predictor):
    predictor.set_image(np.zeros((30, 40, 3), np.uint8))
    with pytest.raises(ValueError, match=r"click \(30, 5\) lies outside the 30x40 image"):
        predictor.add_click(30, 5)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        predictor.set_image(np.zeros((30, 40), np.uint8))


def test_requires_an_image(tiny_model):
    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(tiny_model).add_click(1, 1)
