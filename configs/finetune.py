r"""`finetune`: SkipClick fine-tuned on your own data (COCO JSON or an ImageMasks folder).

  python train.py --config configs/finetune.py --workdir runs/mydata \
      --init-from skipclick.pth \
      --config.data.name=COCO --config.data.root=/data/mine/train.json \
      --config.data.eval_roots.COCO=/data/mine/val.json

  (ImageMasks: --config.data.name=ImageMasks --config.data.root=/data/mine/train
   --config.data.eval_roots.ImageMasks=/data/mine/val; add --config.data.mask_mode=instances for
   instance-label PNGs, --config.data.ignore_value=255 for an ignore value.)

`--init-from` is the released SkipClick `.pth` as downloaded (or a project checkpoint / train.py
run directory); without it the model starts from random weights, which is not a fine-tune. The
backbone stays frozen; the paper's optimiser (Adam, lr 5e-5, x0.1 near the end) runs a short
schedule: 10 epochs of 3200 samples at batch 32 (1000 steps, lr x0.1 after epoch 8). The NoC
table on the validation split is printed for the initial weights ('untrained') and after
training, as the main job does (an eval root left empty is skipped with a warning).

Expected result: NoC@85/90 on your validation split below the initial model's. Only the tiny
variant was measured here (no released weights or GPU run): `configs/finetune.py:tiny` (test_tiny
model at crop 112, random initial weights, 60 steps of batch 8, no flip TTA) on the generated
ImageMasks folder of tests/test_finetune.py (40 train / 6 val images of bright shapes on a dark
background, 7 val objects): NoC@85 20.00 -> 4.29, NoC@90 20.00 -> 9.57, mIoU@1 0.06 -> 0.77
(CPU, 2 shared cores, 2026-12-06; the whole test incl. two train.py starts and eval.py: 1:42).
Compute: the full model wants a GPU (about 1000 steps x 32 samples; the input pipeline needs
several hundred samples/s, see bench/input_speed.py and data.num_workers).
"""

from skipclick_jax import config_lib

TINY_CROP = 112


def get_config(arg: str | None = None):
    """arg None: the SkipClick model (ViT-B/14, crop 448); 'tiny': the test_tiny model at crop 112."""
    if arg not in (None, "", "tiny"):
        raise ValueError(f"configs/finetune.py: unknown argument {arg!r}; expected nothing or 'tiny'")
    tiny = arg == "tiny"
    cfg = config_lib.base_config(config_lib.tiny_model_config() if tiny else config_lib.model_config())
    cfg.model.backbone.frozen = True

    cfg.train.update(batch_size=32, num_epochs=10, lr_milestones=(8,), eval_untrained=True,
                     checkpoint_every_steps=200, keep_checkpoints=2, log_every_steps=20,
                     image_summary_every_steps=200)
    cfg.train.optimizer.lr = 5e-5

    cfg.data.update(name="ImageMasks", root="", epoch_len=3200, num_workers=4,
                    eval_datasets=("COCO", "ImageMasks"))

    if tiny:
        cfg.model.crop_size = TINY_CROP
        cfg.train.update(batch_size=8, num_steps=60, lr_milestones=(1000,),
                         checkpoint_every_steps=30, log_every_steps=10, image_summary_every_steps=0)
        cfg.train.optimizer.lr = 1e-3  # the tiny backbone is random: the head learns from scratch
        cfg.data.update(epoch_len=256, num_workers=0, min_object_area=50)
        cfg.eval.update(default_size=TINY_CROP, bucket=TINY_CROP // 4, flip=False)
    return cfg
