"""SkipClick with the head's 'x2' upsampling (up_conv stages before the classifier, docs/design/model.md#head)."""

from skipclick_jax import config_lib


def get_config():
    return config_lib.base_config(config_lib.model_config(upsample="x2"))
