"""The training state pytree and the trainable/frozen split of the model."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

FROZEN_PREFIX = "feature_extractor"  # the DINOv2 backbone (docs/design/model.md#dinov2-backbone)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (donated to the jitted step).

    step: int32 [] optimizer steps taken; params: pure dict of the trainable parameters;
    opt_state: optax state over `params`; rng: uint32 [2] base key (step keys are fold_in(rng, step)).
    """

    step: jax.Array
    params: dict[str, Any]
    opt_state: optax.OptState
    rng: jax.Array


def trainable_filter(frozen_backbone: bool) -> nnx.filterlib.Filter:
    """Parameters that receive gradients: all nnx.Params, minus the backbone when it is frozen."""
    if frozen_backbone:
        return nnx.All(nnx.Param, nnx.Not(nnx.PathContains(FROZEN_PREFIX)))
    return nnx.Param


def split_model(model: nnx.Module, frozen_backbone: bool):
    """model -> (graphdef, trainable pure dict, frozen pure dict); nnx.merge(graphdef, t, f) rebuilds it."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(frozen_backbone), ...)
    return graphdef, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)


def init_state(params: dict[str, Any], tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh TrainState at step 0 (optimizer state only for `params`)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def merge_dicts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Deep union of two nested dicts with disjoint leaves (trainable + frozen = full state)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_dicts(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def pick(tree: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """The subtree of nested dict `tree` with the keys of `like` (full state -> trainable / frozen)."""
    return {k: pick(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}
