"""Device mesh ('data', 'fsdp') and the shardings of the batch and the training state."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from skipclick_jax import distributed

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


def process_rows(sharding: NamedSharding, batch_size: int) -> range:
    """The rows of a global batch that this process's devices hold under `sharding`: its
    contiguous share [p·B/P, (p+1)·B/P), which is what the input pipeline reads (each process
    reads only its own rows). Raises if the mesh gives a process other rows."""
    p, count = jax.process_index(), jax.process_count()
    rows = range(p * batch_size // count, (p + 1) * batch_size // count)
    held = {i for index in sharding.addressable_devices_indices_map((batch_size,)).values()
            for i in range(batch_size)[index[0]]}
    if held != set(rows):
        raise ValueError(f"process {p}: the mesh puts batch rows {sorted(held)} on its devices, "
                         f"not its contiguous share {rows.start}..{rows.stop - 1}; order the mesh's "
                         f"devices by process")
    return rows


def with_shardings(tree: Any, shardings: Any) -> Any:
    """Abstract arrays (jax.ShapeDtypeStruct) of `tree` placed on `shardings` (restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def jit_step(step_fn, mesh: jax.sharding.Mesh, state_sharding: Any, frozen_sharding: Any):
    """jax.jit of step_fn(state, frozen, batch) -> (state, metrics) with explicit shardings: the
    batch split over ('data', 'fsdp'), metrics replicated, the state donated (compiled, then the
    processes synchronised, before its first run: distributed.SyncedJit)."""
    return distributed.SyncedJit(jax.jit(
        step_fn,
        in_shardings=(state_sharding, frozen_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, NamedSharding(mesh, P())),
        donate_argnums=0,
    ), "train_step")
