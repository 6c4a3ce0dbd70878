"""skipclick-jax: SkipClick click-based interactive segmentation in JAX/Flax."""

from skipclick_jax.config_lib import model_config, tiny_model_config
from skipclick_jax.model import SkipClick, build_model, forward_stages

__all__ = ["SkipClick", "build_model", "forward_stages", "model_config", "tiny_model_config"]
__version__ = "0.1.0"
