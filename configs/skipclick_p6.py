"""SkipClick with a 6-block EncoderStack (post-depth ablation, docs/design/model.md#configurations)."""

from skipclick_jax import config_lib


def get_config():
    return config_lib.base_config(config_lib.model_config(stack_depth=6))
