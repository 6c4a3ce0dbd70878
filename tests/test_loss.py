"""The normalised focal loss against a transcription of RITM's PyTorch code (docs/design/training.md#loss)."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from skipclick_jax.train.loss import binary_iou, normalized_focal_loss

torch = pytest.importorskip("torch")


def _torch_nfl(pred, label, **kw):
    """isegm/model/losses.py NormalizedFocalLossSigmoid.forward (detach_delimeter, size_average),
    as restated for the training-parity reference (convert_weights/torch_train.py)."""
    from convert_weights.torch_train import normalized_focal_loss as torch_nfl

    return torch_nfl(pred, label, **kw).mean()


def _data(seed=0, b=3, s=16):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(b, s, s)) * 4).astype(np.float32)
    labels = (rng.random((b, s, s)) > 0.6).astype(np.float32)
    labels[0, :4, :] = -1  # ignored band
    labels[2] = 0.0  # background-only sample
    return logits, labels


def test_matches_torch_value_and_grad():
    logits, labels = _data()
    tl = torch.tensor(logits[:, None], requires_grad=True)
    ref = _torch_nfl(tl, torch.tensor(labels[:, None]))
    ref.backward()

    def f(z):
        return normalized_focal_loss(z, jnp.asarray(labels)).mean()

    val, grad = jax.value_and_grad(f)(jnp.asarray(logits))
    np.testing.assert_allclose(val, ref.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, tl.grad.numpy()[:, 0], rtol=1e-4, atol=1e-9)


def test_ignored_pixels_do_not_matter():
    logits, labels = _data(1)
    other = logits.copy()
    other[0, :4, :] = 123.0  # logits under the ignore band
    a = normalized_focal_loss(jnp.asarray(logits), jnp.asarray(labels))
    b = normalized_focal_loss(jnp.asarray(other), jnp.asarray(labels))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    g = jax.grad(lambda z: normalized_focal_loss(z, jnp.asarray(labels)).sum())(jnp.asarray(logits))
    assert np.all(np.asarray(g)[0, :4] == 0)


def test_perfect_prediction_is_near_zero_and_finite():
    _, labels = _data(2)
    labels = np.clip(labels, 0, 1)
    logits = np.where(labels > 0.5, 30.0, -30.0).astype(np.float32)
    loss = normalized_focal_loss(jnp.asarray(logits), jnp.asarray(labels))
    assert np.all(np.isfinite(loss)) and np.all(np.asarray(loss) < 1e-6)


def test_binary_iou():
    gt = jnp.array([[[1.0, 1.0], [0.0, -1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    prob = jnp.array([[[0.9, 0.1], [0.5, 0.9]], [[0.0, 0.0], [0.0, 0.0]]])
    np.testing.assert_allclose(binary_iou(prob, gt), [1 / 3, 1.0])
