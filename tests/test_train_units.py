"""Fast unit checks of the training pieces: recipe, schedule, Adam parity, sharding rule,
click-simulation slots, previews."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from skipclick_jax import config_lib
from skipclick_jax.train import optim, sharding, step as sp
from skipclick_jax.defaults.train import data_defaults, train_defaults
from skipclick_jax.train.summary import preview_image

pytestmark = pytest.mark.usefixtures("on_cpu")  # bit-exact / measured on CPU


def test_recipe_and_schedule():
    t, d = train_defaults(), data_defaults()
    assert (t.batch_size, t.num_epochs, d.epoch_len) == (32, 55, 30000)
    assert config_lib.model_config().crop_size == 448  # the training crop is the model's crop size
    steps_per_epoch = d.epoch_len // t.batch_size
    assert steps_per_epoch == 937
    _, schedule = optim.make_optimizer(t, steps_per_epoch)
    np.testing.assert_allclose(
        [schedule(0), schedule(50 * 937 - 1), schedule(50 * 937), schedule(55 * 937 - 1)],
        [5e-5, 5e-5, 5e-6, 5e-6], rtol=1e-6)


def test_adam_matches_torch():
    torch = pytest.importorskip("torch")
    t = train_defaults()
    tx, _ = optim.make_optimizer(t, 937)
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) * 10 ** -i for i in range(4)]
    w, opt_state = jnp.asarray(w0), tx.init(jnp.asarray(w0))
    tw = torch.tensor(w0, requires_grad=True)
    topt = torch.optim.Adam([tw], lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    for g in grads:
        updates, opt_state = tx.update(jnp.asarray(g), opt_state, w)
        w = w + updates
        tw.grad = torch.tensor(g)
        topt.step()
    np.testing.assert_allclose(w, tw.detach().numpy(), rtol=0, atol=1e-7)


def test_param_spec():
    assert sharding.param_spec((96, 384), 1) == P()
    assert sharding.param_spec((96, 384), 2) == P(None, "fsdp")
    assert sharding.param_spec((384, 96, 3), 4) == P("fsdp", None, None)
    assert sharding.param_spec((7, 3), 2) == P()
    assert sharding.param_spec((), 2) == P()


class _Background(nnx.Module):
    """Stand-in decoder that always predicts background (so every simulated click is positive)."""

    def __init__(self):
        self.w = nnx.Param(jnp.zeros(()))

    def decode_clicks(self, enc, prev, points, dropout_rng=None):
        return jnp.full(prev.shape, -10.0) + self.w


def test_simulated_clicks_fill_slots_from_the_end():
    graphdef, params = nnx.split(_Background())
    gt = jnp.zeros((2, 20, 20)).at[:, 5:15, 5:15].set(1.0)
    points = jnp.full((2, 48, 3), -1.0).at[:, 0].set(jnp.array([9.0, 9.0, 100.0]))
    batch = dict(gt=gt, points=points)
    for n in range(4):
        prev, pts = jax.jit(sp.simulate_clicks, static_argnums=(0, 7))(
            graphdef, params, {}, None, batch, jnp.int32(n), jax.random.key(0), 0.49)
        pts = np.asarray(pts)
        filled = sorted(np.flatnonzero(pts[0, :, 0] >= 0).tolist())
        assert filled == [0] + list(range(24 - n, 24)), (n, filled)
        for k in range(1, n + 1):  # positive click k in slot 24 - k, index k, inside the object
            r, c, idx = pts[0, 24 - k]
            assert idx == k and 5 <= r < 15 and 5 <= c < 15
        expected_prev = 0.0 if n == 0 else float(jax.nn.sigmoid(-10.0))
        np.testing.assert_allclose(prev, expected_prev, rtol=1e-6)


def test_preview_image():
    image = np.zeros((2, 16, 16, 3), np.uint8)
    points = np.full((2, 4, 3), -1.0)
    points[0, 0] = (8, 8, 1)
    points[1, 2] = (3, 3, 1)
    gt = np.zeros((2, 16, 16))
    gt[0, 0, 0] = -1
    out = preview_image(image, points, np.ones((2, 16, 16)) * 0.5, gt)
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8
    assert tuple(out[8, 8]) == (0, 230, 0) and tuple(out[16 + 3, 3]) == (230, 0, 0)
    assert out[0, 32, 0] == 128 and out[0, 16, 0] == 127
