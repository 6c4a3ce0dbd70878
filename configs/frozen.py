"""'+ Frozen Backbone' ablation: one DINOv2 tap feeds the EncoderStack, no fuse, no skips.

Argument (`--config configs/frozen.py:paper`): 'released' (default) feeds block 2, as the
released code does (docs/design/model.md#released-code-quirks), so converted released weights reproduce released results;
'paper' feeds block 11, as the paper describes.
Paper (README): GrabCut NoC@90 1.72, Avg. WSESeg NoC@90 11.951."""

from skipclick_jax import config_lib

SINGLE_TAP = {"released": (2,), "paper": (11,)}


def get_config(arg="released"):
    return config_lib.base_config(
        config_lib.model_config(taps=SINGLE_TAP[arg], skip_connections=False))
