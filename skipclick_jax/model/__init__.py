"""The SkipClick model in Flax NNX (docs/design/model.md)."""

from skipclick_jax.model.api import ModelFunctions, decode_fn, encode_fn, model_functions, param_counts
from skipclick_jax.model.skipclick import (
    Encoding, SkipClick, build_model, disk_maps, forward_stages,
)

__all__ = [
    "Encoding", "ModelFunctions", "SkipClick", "build_model", "decode_fn", "disk_maps", "encode_fn",
    "forward_stages", "model_functions", "param_counts",
]
