"""`test_tiny`: every structural feature of SkipClick at toy widths (DINOv2 dim 96, depth 12,
3 heads, 4 registers, 37x37 grid; EncoderStack dim 96, depth 2, 16x16 grid at crop 224; neck
[32, 64, 128, 256]; head 64, x1). Used by the tests across the project."""

from skipclick_jax import config_lib


def get_config():
    return config_lib.base_config(config_lib.tiny_model_config())
