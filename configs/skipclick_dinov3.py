"""SkipClick-DINOv3 (the original repository's best variant, docs/design/model.md#dinov3-backbone): frozen DINOv3
ViT-B/16 (4 storage tokens, RoPE), taps 2/5/8/11 through its final norm, fused; 4-block
EncoderStack on the 28x28 grid at crop 448; SimpleFPN with skip connections; SegFormer head (x1).

Train: python train.py --config configs/skipclick_dinov3.py --workdir runs/skipclick_dinov3 \
         --config.data.root=/data/cocolvis --init-from dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth
The loss forward runs the frozen DINOv3 in training mode (its RoPE coordinate rescale), as the
original trainer does; --config.train.backbone_train_mode=False switches that off.
Paper (README of the original): GrabCut 1.42, Berkeley 2.45, SBD 6.16, DAVIS 4.79,
HQSeg-44k 5.77 NoC@90.
"""

from skipclick_jax import config_lib


def get_config():
    return config_lib.base_config(config_lib.model_config(backbone="dinov3"))
