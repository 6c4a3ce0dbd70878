"""The train step, `encode_image` and `decode_clicks` lower for CUDA and TPU (`jax.export` with
platforms=..., on the CPU): a platform-specific lowering failure shows before anyone has a device.
Also the numeric compute-capability comparison of `layers.check_attention`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from skipclick_jax import config_lib
from skipclick_jax.model import build_model
from skipclick_jax.model.layers import compute_capability
from skipclick_jax.train import optim, state as state_lib, step as step_lib

PLATFORMS = ("cuda", "tpu")
CROP, BATCH = 56, 2


@pytest.fixture(scope="module")
def tiny():
    cfg = config_lib.base_config(config_lib.tiny_model_config())
    cfg.model.backbone.update(depth=2, taps=(0, 1, 1, 1))
    cfg.model.crop_size = CROP
    return cfg, build_model(cfg.model, seed=0)


def _spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _batch():
    return dict(image=_spec((BATCH, CROP, CROP, 3), jnp.uint8), points=_spec((BATCH, 48, 3)),
                gt=_spec((BATCH, CROP, CROP)))


def _lowers(fn, *args) -> set[str]:
    exported = export.export(jax.jit(fn), platforms=PLATFORMS)(*args)
    text = exported.mlir_module()
    assert "stablehlo" in text and len(text) > 1000
    return set(exported.platforms)


def test_train_step_lowers_for_cuda_and_tpu(tiny):
    cfg, model = tiny
    graphdef, params, frozen = state_lib.split_model(model, frozen_backbone=True)
    tx, schedule = optim.make_optimizer(cfg.train, steps_per_epoch=10)
    train_step = step_lib.make_train_step(graphdef, tx, schedule, max_num_next_clicks=2)
    state = jax.eval_shape(lambda p: state_lib.init_state(p, tx, 0), params)
    frozen = jax.tree.map(lambda x: _spec(x.shape, x.dtype), frozen)
    assert _lowers(train_step, state, frozen, _batch()) == set(PLATFORMS)


def test_encode_and_decode_lower_for_cuda_and_tpu(tiny):
    _, model = tiny
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: _spec(x.shape, x.dtype), state)

    def encode(s, images):
        return nnx.merge(graphdef, s).encode_image(images)

    def decode(s, encoding, prev, points):
        return nnx.merge(graphdef, s).decode_clicks(encoding, prev, points)

    images = _spec((1, CROP, CROP, 3))
    assert _lowers(encode, state, images) == set(PLATFORMS)
    encoding = jax.eval_shape(encode, state, images)
    assert _lowers(decode, state, encoding, _spec((1, CROP, CROP)), _spec((1, 48, 3))) == set(PLATFORMS)


@pytest.mark.parametrize("value, expected", [("9.0", (9, 0)), ("10.0", (10, 0)), ("12.1", (12, 1)),
                                             (8.6, (8, 6)), ("8", (8, 0)), ("", (0, 0)), ("x", (0, 0))])
def test_compute_capability_is_compared_as_numbers(value, expected):
    assert compute_capability(value) == expected
    assert (compute_capability("10.0") >= (9, 0)) and not (compute_capability("8.9") >= (9, 0))
    assert np.all([compute_capability(v) >= (9, 0) for v in ("9.0", "10.0", "12.0")])
