"""Pure-function views of a SkipClick model for `jax.jit` (no `nnx.jit` on hot paths)."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx


def encode_fn(graphdef: nnx.GraphDef):
    """-> encode(state, images) -> encoding; jit it with `jax.jit`."""

    def encode(state, images):
        return nnx.merge(graphdef, state).encode_image(images)

    return encode


def decode_fn(graphdef: nnx.GraphDef):
    """-> decode(state, encoding, prev_mask, points, point_denom=None, dropout_rng=None) -> logits."""

    def decode(state, encoding, prev_mask, points, point_denom=None, dropout_rng=None):
        return nnx.merge(graphdef, state).decode_clicks(
            encoding, prev_mask, points, point_denom=point_denom, dropout_rng=dropout_rng)

    return decode


@dataclasses.dataclass(frozen=True)
class ModelFunctions:
    """A click model as pure functions of a parameter pytree (passed to jit as an argument).

    encode(params, images [N,S,S,3] float32 in [0,1]) -> encoding (pytree with leading dim N);
    decode(params, encoding, prev_prob [N,S,S], points [N,2P,3], point_denom [N,2]) -> logits [N,S,S].
    """

    encode: Callable[..., Any]
    decode: Callable[..., jax.Array]
    params: Any


def model_functions(model, dtype: str | None = None, attention: str | None = None, *,
                    jit: bool = False) -> ModelFunctions:
    """An `nnx` SkipClick model -> its `ModelFunctions` (dropout off), computing in `dtype` with
    `attention` (None: the model's own settings; see `SkipClick.set_precision`; `model` itself is
    left unchanged). `jit`: encode and decode each wrapped in `jax.jit` (for callers that run them
    directly rather than inside their own jitted function)."""
    if dtype or attention:
        model = nnx.clone(model)
        model.set_precision(dtype or None, attention or None)
    graphdef, state = nnx.split(model)
    encode, decode = encode_fn(graphdef), decode_fn(graphdef)
    if jit:
        encode, decode = jax.jit(encode), jax.jit(decode)
    return ModelFunctions(encode, decode, state)


def param_counts(model, depth: int = 1) -> dict[str, int]:
    """Number of parameters per module path prefix of `depth` components (and 'total')."""
    counts = collections.Counter()
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        n = int(np.prod(leaf.shape))
        counts[".".join(names[:depth])] += n
        counts["total"] += n
    return dict(counts)
