"""SkipClick (the full model, docs/design/model.md#configurations): frozen DINOv2 ViT-B/14-reg4, taps 2/5/8/11 fused,
4-block EncoderStack, SimpleFPN with skip connections, SegFormer head (x1).

Train: python train.py --config configs/skipclick.py --workdir runs/skipclick \
         --config.data.root=/data/cocolvis --init-from dinov2_vitb14_reg4_pretrain.pth
Paper (README): GrabCut 1.44, Berkeley 2.45, SBD 6.18, DAVIS 4.94, HQSeg-44k 6.00 NoC@90.
"""

from skipclick_jax import config_lib


def get_config():
    return config_lib.base_config(config_lib.model_config())
