"""'Baseline' ablation: like frozen.py, but the DINOv2 backbone is trained too.

Argument: 'released' (default, block 2 feeds the stack, docs/design/model.md#released-code-quirks) or 'paper' (block 11).
Paper (README): GrabCut NoC@90 1.74, Avg. WSESeg NoC@90 12.031."""

from skipclick_jax import config_lib

SINGLE_TAP = {"released": (2,), "paper": (11,)}


def get_config(arg="released"):
    return config_lib.base_config(
        config_lib.model_config(taps=SINGLE_TAP[arg], skip_connections=False, frozen=False))
