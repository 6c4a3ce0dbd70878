"""skipclick-jax: SkipClick click-based interactive segmentation in JAX/Flax.

The names below load on first use, so `skipclick_jax.predictor.OnnxPredictor` (and other
framework-free parts) can be imported without JAX.
"""

import importlib

__all__ = ["SkipClick", "build_model", "forward_stages", "load", "model_config", "tiny_model_config"]
__version__ = "0.1.0"

_LAZY = {
    "SkipClick": "skipclick_jax.model",
    "build_model": "skipclick_jax.model",
    "forward_stages": "skipclick_jax.model",
    "model_config": "skipclick_jax.config_lib",
    "tiny_model_config": "skipclick_jax.config_lib",
}


def load(source, config=None, **kwargs):
    """(model, config) from any supported checkpoint; see `skipclick_jax.checkpoint.load`."""
    from skipclick_jax.checkpoint import load as _load

    return _load(source, config, **kwargs)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'skipclick_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
