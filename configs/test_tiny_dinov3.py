"""`test_tiny_dinov3`: the DINOv3 twin of `test_tiny` (DINOv3 dim 96, depth 12, 3 heads, patch 16,
4 storage tokens, other settings as dinov3_vitb16; EncoderStack dim 96, depth 2, 3 heads, 14x14
grid at crop 224; neck [32, 64, 128, 256]; head 64, x1; taps 2/5/8/11; skips). Used by tests."""

from skipclick_jax import config_lib


def get_config():
    return config_lib.base_config(config_lib.tiny_model_config("dinov3"))
