"""The sharded train step equals the single-device step on 8 virtual CPU devices.

Same losses and updated parameters after 2 steps, for the data+fsdp mesh (4, 2) (default) and the
data-only mesh (8, 1) (slow: each mesh costs two compilations). The comparison runs in a
subprocess because XLA_FLAGS must be set before jax is imported.
"""

import os
import sys

import numpy as np
import pytest

from tests.helpers import FAST_COMPILE_XLA_FLAGS, ROOT, run_python

CROP, BATCH, STEPS = 56, 8, 2


def _run_child(meshes: list[tuple[int, int]]) -> None:
    import jax

    from skipclick_jax import config_lib
    from skipclick_jax.data.pipeline import make_global_batch
    from skipclick_jax.model import build_model
    from skipclick_jax.train import optim, sharding, state as st, step as sp

    assert jax.device_count() == 8, jax.devices()
    cfg = config_lib.base_config(config_lib.tiny_model_config())
    cfg.model.backbone.update(depth=4, taps=(0, 1, 2, 3))  # fewer blocks: faster compiles
    # A large Adam eps keeps the update a smooth function of the gradient (with 1e-8, parameters
    # whose gradient is ~0 move by +-lr on float32 noise), so the comparison can be tight.
    cfg.train.optimizer.update(lr=1e-3, eps=1e-3)
    tx, schedule = optim.make_optimizer(cfg.train, steps_per_epoch=10)
    graphdef, params, frozen = st.split_model(build_model(cfg.model, seed=0), frozen_backbone=True)
    train_step = sp.make_train_step(graphdef, tx, schedule, max_num_next_clicks=3)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(STEPS):
        gt = np.zeros((BATCH, CROP, CROP), np.float32)
        gt[:, 10:40, 12:44] = 1.0
        points = np.full((BATCH, 48, 3), -1.0, np.float32)
        points[:, 0] = (25, 28, 100)
        image = rng.integers(0, 256, (BATCH, CROP, CROP, 3), dtype=np.uint8)
        batches.append(dict(image=image, points=points, gt=gt))

    def run(mesh_shape):
        # a copy: device_put may alias the buffers that the donating step deletes
        state = st.init_state(jax.tree.map(np.array, params), tx, seed=0)
        if mesh_shape is None:
            step, f = jax.jit(train_step), frozen
        else:
            mesh = sharding.make_mesh(*mesh_shape)
            state_sh = sharding.state_shardings(mesh, state)
            frozen_sh = sharding.param_shardings(mesh, frozen)
            step = sharding.jit_step(train_step, mesh, state_sh, frozen_sh)
            state, f = jax.device_put((state, frozen), (state_sh, frozen_sh))
            if mesh_shape[1] > 1:  # fsdp really shards the parameters and Adam's moments
                specs = {x.sharding.spec for x in jax.tree.leaves(state.params)}
                assert any("fsdp" in s for s in specs), specs
                check_opt_sharding(state, mesh_shape[1])
        losses = []
        for b in batches:
            if mesh_shape is not None:
                b = make_global_batch(b, sharding.batch_sharding(mesh))
            state, metrics = step(state, f, b)
            losses.append(float(metrics["loss"]))
        if mesh_shape is not None and mesh_shape[1] > 1:  # the step keeps them sharded
            check_opt_sharding(state, mesh_shape[1])
        return losses, jax.device_get(state.params), int(metrics["num_clicks"])

    ref_losses, ref_params, _ = run(None)
    for shape in meshes:
        losses, p, _ = run(shape)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(shape))
        err = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_params)))
        assert err < 1e-5, (shape, err)
        print(f"mesh {shape}: losses {losses} max |dparam| {err:.2e}")


def check_opt_sharding(state, fsdp: int) -> None:
    """Adam's mu and nu have their parameter's fsdp sharding: each device holds 1/fsdp of them."""
    import jax
    import optax

    adam = next(s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState))
    params = jax.tree.leaves(state.params)
    sharded = 0
    for moments in (adam.mu, adam.nu):
        leaves = jax.tree.leaves(moments)
        assert len(leaves) == len(params)
        for p, m in zip(params, leaves):
            assert m.sharding.spec == p.sharding.spec, (m.sharding.spec, p.sharding.spec)
            if "fsdp" in m.sharding.spec:
                shard = m.addressable_shards[0].data
                assert shard.size * fsdp == m.size, (shard.shape, m.shape)
                sharded += m.size
    total = sum(p.size for p in params)
    assert sharded > 0.9 * 2 * total, (sharded, total)  # nearly every moment is split


def _check(mesh: str) -> None:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_XLA_FLAGS}",
               JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = run_python(__file__, mesh, env=env, timeout=900)
    assert "mesh (" in proc.stdout, proc.stdout


def test_data_fsdp_mesh_matches_single_device():
    _check("4x2")


@pytest.mark.slow
def test_data_only_mesh_matches_single_device():
    _check("8x1")


if __name__ == "__main__":
    _run_child([tuple(map(int, m.split("x"))) for m in sys.argv[1].split(",")])
