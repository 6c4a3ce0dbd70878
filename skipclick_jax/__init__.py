"""skipclick-jax: SkipClick click-based interactive segmentation in JAX/Flax."""

from skipclick_jax.config_lib import model_config, tiny_model_config
from skipclick_jax.model import SkipClick, build_model, forward_stages

__all__ = ["SkipClick", "build_model", "forward_stages", "load", "model_config", "tiny_model_config"]
__version__ = "0.1.0"


def load(source, config=None, **kwargs):
    """(model, config) from any supported checkpoint; see `skipclick_jax.checkpoint.load`."""
    from skipclick_jax.checkpoint import load as _load

    return _load(source, config, **kwargs)
