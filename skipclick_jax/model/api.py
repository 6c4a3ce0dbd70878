"""Pure-function views of a SkipClick model for `jax.jit` (no `nnx.jit` on hot paths)."""

from __future__ import annotations

import collections

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


def param_counts(model, depth: int = 1) -> dict[str, int]:
    """Number of parameters per module path prefix of `depth` components (and 'total')."""
    counts = collections.Counter()
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        n = int(np.prod(leaf.shape))
        counts[".".join(names[:depth])] += n
        counts["total"] += n
    return dict(counts)
