"""`test_tiny` SkipClick trained from scratch on the Synthetic shapes dataset: the CPU smoke run.

  python train.py --config configs/tiny_synthetic.py --workdir runs/tiny

Trains 300 steps of batch 8 at crop 112, then prints the NoC table on the Synthetic val split
(79 objects) for the untrained and the trained weights: NoC@80/85/90 20.00 -> 12.37 / 15.39 /
18.34, mIoU@5 0.08 -> 0.66 (other CPUs differ by float rounding; time, machine and versions in
docs/performance.md#main-job-cpu-smoke-run). Without pretrained DINOv2 weights the backbone is
random (and frozen), so the lr is raised from the paper's 5e-5.
"""

from skipclick_jax import config_lib

CROP = 112


def get_config():
    cfg = config_lib.base_config(config_lib.tiny_model_config())
    cfg.model.crop_size = CROP

    cfg.train.update(batch_size=8, num_steps=300, eval_untrained=True, max_num_next_clicks=3,
                     checkpoint_every_steps=100, keep_checkpoints=2, log_every_steps=10,
                     image_summary_every_steps=100, lr_milestones=(8,))
    cfg.train.optimizer.lr = 1e-3

    cfg.data.update(name="Synthetic", epoch_len=256, num_workers=0,
                    min_object_area=50, eval_datasets=("Synthetic",))
    cfg.data.synthetic = dict(image_size=(CROP, CROP), num_train=256, num_val=24)

    cfg.eval.update(default_size=CROP, bucket=CROP // 4)
    return cfg
