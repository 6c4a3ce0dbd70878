"""Device mesh ('data', 'fsdp') and the shardings of the batch and the training state."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)  # the leading (batch) dimension is split over both axes


def make_mesh(data: int = -1, fsdp: int = 1) -> jax.sharding.Mesh:
    """A ('data', 'fsdp') mesh over all devices; one size may be -1 (all remaining devices)."""
    n = jax.device_count()
    if data == -1 and fsdp == -1:
        raise ValueError("train.mesh: only one of data, fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n or data < 1 or fsdp < 1:
        raise ValueError(f"train.mesh: data={data} x fsdp={fsdp} does not tile {n} devices")
    return jax.make_mesh((data, fsdp), AXES, axis_types=(AxisType.Auto,) * 2)


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Replicated, or (fsdp > 1) split along the largest dimension divisible by `fsdp`."""
    if fsdp > 1:
        for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[d] % fsdp == 0:
                return P(*[("fsdp" if i == d else None) for i in range(len(shape))])
    return P()


def param_shardings(mesh: jax.sharding.Mesh, tree: Any) -> Any:
    """NamedShardings for a pytree of arrays (params or optimizer state) by `param_spec`."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)), tree)


def state_shardings(mesh: jax.sharding.Mesh, state: Any) -> Any:
    """Shardings of a TrainState: params and opt_state by `param_spec`, step and rng replicated."""
    replicated = NamedSharding(mesh, P())
    return state.replace(
        step=replicated,
        params=param_shardings(mesh, state.params),
        opt_state=param_shardings(mesh, state.opt_state),
        rng=replicated,
    )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def with_shardings(tree: Any, shardings: Any) -> Any:
    """Abstract arrays (jax.ShapeDtypeStruct) of `tree` placed on `shardings` (restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def jit_step(step_fn, mesh: jax.sharding.Mesh, state_sharding: Any, frozen_sharding: Any):
    """jax.jit of step_fn(state, frozen, batch) -> (state, metrics) with explicit shardings: the
    batch split over ('data', 'fsdp'), metrics replicated, the state donated."""
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, frozen_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, NamedSharding(mesh, P())),
        donate_argnums=0,
    )
