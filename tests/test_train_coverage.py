"""What the README claims of the training step, on a real (toy-width) SkipClick at 56 px:
the frozen backbone has no gradient and no optimizer state; the trainable one (baseline.py at toy
size) trains; the click simulation uses eval-mode predictions, draws its number of clicks without
recompiling, and the image is encoded once per step."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from skipclick_jax import config_lib
from skipclick_jax.model import build_model
from skipclick_jax.model.skipclick import SkipClick
from skipclick_jax.train import optim, state as st, step as sp
from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("on_cpu")  # bit-exact / measured on CPU

CROP, BATCH = 56, 2


def toy(cfg_model):
    """A config's model section at test_tiny widths, 4 backbone blocks, crop 56."""
    tiny = config_lib.tiny_model_config()
    cfg_model.backbone.update(dim=96, heads=3, depth=4,
                              taps=tuple(min(t, 3) for t in cfg_model.backbone.taps))
    cfg_model.stack.update(dim=96, heads=3)
    cfg_model.neck.out_dims = tiny.neck.out_dims
    cfg_model.head.embed_dim = tiny.head.embed_dim
    cfg_model.crop_size = CROP
    return cfg_model


def batch(seed=0):
    rng = np.random.default_rng(seed)
    gt = np.zeros((BATCH, CROP, CROP), np.float32)
    gt[:, 10:40, 12:44] = 1.0
    points = np.full((BATCH, 48, 3), -1.0, np.float32)
    points[:, 0] = (25, 28, 100)
    image = rng.integers(0, 256, (BATCH, CROP, CROP, 3), dtype=np.uint8)
    return dict(image=jnp.asarray(image), points=jnp.asarray(points), gt=jnp.asarray(gt))


def setup(cfg_file, **train):
    cfg = config_lib.load_config_file(os.path.join(ROOT, "configs", cfg_file))
    cfg.model = toy(cfg.model)
    cfg.train.optimizer.update(lr=1e-3, **train)
    tx, schedule = optim.make_optimizer(cfg.train, steps_per_epoch=10)
    graphdef, params, frozen = st.split_model(build_model(cfg.model, seed=0), cfg.model.backbone.frozen)
    return cfg, tx, schedule, graphdef, params, frozen


def paths(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_frozen_backbone_has_no_gradient_and_no_optimizer_state():
    cfg, tx, schedule, graphdef, params, frozen = setup("skipclick.py")
    assert cfg.model.backbone.frozen
    assert "feature_extractor" not in params and set(frozen) == {"feature_extractor"}
    state = st.init_state(params, tx, seed=0)
    assert not [p for p in paths(state.opt_state) if "feature_extractor" in p]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert n_opt < 2 * n_params + 16  # Adam's mu and nu for the trainable parameters, a few counts
    frozen_before = jax.tree.map(np.array, frozen)
    step = jax.jit(sp.make_train_step(graphdef, tx, schedule))
    new, metrics = step(state, frozen, batch())
    assert np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen_before)
    still = {p for p, a, b in zip(paths(params), jax.tree.leaves(params), jax.tree.leaves(new.params))
             if np.array_equal(a, b)}
    # every trainable parameter moves, except the x2/x4 up-convs that the x1 head does not use
    assert still == {p for p in paths(params) if "up_conv1" in p or "up_conv2" in p}, sorted(still)


def test_trainable_backbone_trains():
    """baseline.py (backbone trained) at toy size: the backbone gets optimizer state and moves."""
    cfg, tx, schedule, graphdef, params, frozen = setup("baseline.py")
    assert not cfg.model.backbone.frozen and not frozen
    state = st.init_state(params, tx, seed=0)
    assert [p for p in paths(state.opt_state) if "feature_extractor" in p]
    before = jax.tree.map(np.array, params["feature_extractor"])
    step = jax.jit(sp.make_train_step(graphdef, tx, schedule))
    for k in range(2):
        state, metrics = step(state, frozen, batch(k))
    assert float(metrics["grad_norm"]) > 0
    still = {p for p, a, b in zip(paths(before), jax.tree.leaves(before),
                                  jax.tree.leaves(state.params["feature_extractor"]))
             if np.array_equal(a, b)}
    # everything up to the single tap (block 2) moves; block 3, the final norm (taps are taken
    # before it) and the unused mask token get no gradient
    assert cfg.model.backbone.taps == (2,)
    unused = {p for p in paths(before)
              if p.startswith("['blocks'][3]") or p.startswith("['norm']") or "mask_token" in p}
    assert still == unused and len(unused) == 17, sorted(still)


@pytest.fixture(scope="module")
def tiny_train():
    cfg, tx, schedule, graphdef, params, frozen = setup("skipclick.py")
    return cfg, tx, schedule, graphdef, params, frozen


def test_click_simulation_uses_eval_mode_predictions(tiny_train):
    """The same weights with Dropout2d p=0.1 or p=0 simulate the same clicks and masks (the
    simulation never samples dropout), and the masks are the model's eval-mode predictions."""
    cfg, _, _, graphdef, params, frozen = tiny_train
    cfg0 = cfg.model.copy_and_resolve_references()
    cfg0.head.dropout = 0.0
    graphdef0, _, _ = st.split_model(nnx.eval_shape(lambda: build_model(cfg0)), True)
    b, key = batch(), jax.random.key(3)
    model = nnx.merge(graphdef, params, frozen)
    enc = jax.jit(lambda img: model.encode_image(img))(b["image"])
    sim = jax.jit(sp.simulate_clicks, static_argnums=(0, 7))
    prev, points = sim(graphdef, params, frozen, enc, b, jnp.int32(3), key, 0.49)
    prev0, points0 = sim(graphdef0, params, frozen, enc, b, jnp.int32(3), key, 0.49)
    np.testing.assert_array_equal(prev, prev0)
    np.testing.assert_array_equal(points, points0)
    assert int(np.sum(np.asarray(points)[..., 0] >= 0)) == BATCH * (1 + 3)
    # the mask after 3 clicks is the eval-mode prediction from the points of the first 2
    prev2, points2 = sim(graphdef, params, frozen, enc, b, jnp.int32(2), key, 0.49)
    decode = jax.jit(lambda e, p, q: jax.nn.sigmoid(model.decode_clicks(e, p, q)))
    np.testing.assert_allclose(prev, decode(enc, prev2, points2), rtol=0, atol=1e-6)
    dropped = jax.jit(lambda e, p, q, k: jax.nn.sigmoid(model.decode_clicks(e, p, q, dropout_rng=k)))
    assert np.abs(prev - dropped(enc, prev2, points2, jax.random.key(0))).max() > 1e-3


def test_drawn_clicks_vary_without_recompiling_and_encode_once(tiny_train, monkeypatch):
    cfg, tx, schedule, graphdef, params, frozen = tiny_train
    encodes, traces = [], []
    original = SkipClick.encode_image

    def counting_encode(self, images):
        encodes.append(images.shape)
        return original(self, images)

    monkeypatch.setattr(SkipClick, "encode_image", counting_encode)
    train_step = sp.make_train_step(graphdef, tx, schedule, max_num_next_clicks=3)

    def traced(state, frozen, b):
        traces.append(1)
        return train_step(state, frozen, b)

    step = jax.jit(traced)
    preview = jax.jit(sp.make_preview_fn(graphdef, num=BATCH, max_num_next_clicks=3))
    state = st.init_state(jax.tree.map(np.array, params), tx, seed=0)
    drawn = []
    for k in range(8):
        b = batch(k)
        filled = int(np.sum(np.asarray(preview(state, frozen, b)["points"])[0, :, 0] >= 0))
        state, metrics = step(state, frozen, b)
        drawn.append(int(metrics["num_clicks"]))
        assert filled == 1 + drawn[-1], (k, filled, drawn)  # the preview draws the step's keys
    assert len(set(drawn)) >= 3 and set(drawn) <= {0, 1, 2, 3}, drawn
    assert len(traces) == 1
    # one encode in the step's trace (plus one in the preview's): the image is encoded once per step
    assert len(encodes) == 2, encodes
