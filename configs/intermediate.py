"""'+ Intermediate Features' ablation: taps 2/5/8/11 fused, no skip connections.
Paper (README): GrabCut NoC@90 1.40, Avg. WSESeg NoC@90 10.344."""

from skipclick_jax import config_lib


def get_config():
    return config_lib.base_config(config_lib.model_config(skip_connections=False))
