"""Training recipe (docs/design/training.md): the `train` and `data` sections of an experiment config."""

from __future__ import annotations

import ml_collections

from skipclick_jax.defaults import MASK_THRESHOLD, MULTI_POINT_SAMPLER

DEFAULT_EVAL_DATASETS = ("GrabCut", "Berkeley", "SBD", "DAVIS", "HQSeg44k")
"""The datasets evaluated after training by default (`data.eval_datasets`); every name the
evaluation knows is in `data.eval_datasets.EVAL_DATASETS`."""


def train_defaults() -> ml_collections.ConfigDict:
    """The paper's recipe: Adam 5e-5, x0.1 after epochs 50 and 55 (the original's MultiStepLR; 55
    is not reached), 55 epochs of 30000 // 32 = 937 steps.

    `num_steps` < 0 means `num_epochs * (data.epoch_len // batch_size)` (drop_last). Mesh axes
    of size -1 take all remaining devices. `*_every_steps` <= 0 disables that action.
    `remat` ('none' | 'blocks' | 'decoder') and `remat_policy` (a `jax.checkpoint_policies` name)
    trade compute for memory (`SkipClick.set_remat`); `mu_dtype` 'bfloat16' keeps Adam's first
    moment in bfloat16. The compute dtype is `model.dtype`. `profile_steps` 'A:B' writes a
    jax.profiler trace of steps A .. B-1 to `<workdir>/tensorboard/plugins/profile/` ('' = none).
    """
    return ml_collections.ConfigDict(
        dict(
            seed=0,
            batch_size=32,
            num_epochs=55,
            num_steps=-1,
            optimizer=dict(lr=5e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0),
            lr_milestones=(50, 55),  # epochs after which lr *= lr_gamma (the original's MultiStepLR)
            lr_gamma=0.1,
            loss=dict(alpha=0.5, gamma=2.0, eps=1e-12),
            mu_dtype="float32",
            remat="none",
            remat_policy="nothing_saveable",
            max_num_next_clicks=3,  # simulated clicks per batch ~ U{0..max}
            pred_thresh=MASK_THRESHOLD,
            # Training clicker's distance: "chamfer5" (OpenCV's 5x5 chamfer, as the original) or
            # "exact" (Euclidean); evaluation always uses the exact transform.
            click_distance="chamfer5",
            mesh=dict(data=-1, fsdp=1),
            distributed=False,  # call jax.distributed.initialize() (multi-host)
            checkpoint_every_steps=937,
            keep_checkpoints=3,
            log_every_steps=50,
            image_summary_every_steps=1000,
            num_image_summaries=4,
            eval_untrained=False,  # also evaluate the initial model before training
            # Run the frozen backbone in training mode for the loss forward, as the original trainer
            # does (DINOv3: RoPE coordinate rescale per block; DINOv2 has no train/eval difference).
            backbone_train_mode=True,
            profile_steps="",
        )
    )


def profile_range(spec: str) -> tuple[int, int] | None:
    """train.profile_steps 'A:B' (integers, 1 <= A < B) -> (A, B); '' -> None; else ValueError."""
    if spec == "":
        return None
    parts = spec.split(":") if isinstance(spec, str) else ()
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"expected '' or 'A:B' (steps A .. B-1), got {spec!r}")
    a, b = int(parts[0]), int(parts[1])
    if not 1 <= a < b:
        raise ValueError(f"expected 1 <= A < B in 'A:B', got {spec!r}")
    return a, b


def data_defaults() -> ml_collections.ConfigDict:
    """COCO+LVIS with RITM's augmentation and MultiPointSampler (docs/design/training.md#data).

    `name`/`root`/`split` go to data.train_datasets.load_train_source, `points` to
    data.points_sampler.MultiPointSampler and `synthetic` to data.synthetic.SyntheticConfig (used by
    the 'Synthetic' train and eval sets). `eval_datasets` are evaluated (NoC) after training;
    `eval_roots` maps each of them (except 'Synthetic') to its folder; one without a folder is
    skipped with a warning (set e.g. --config.data.eval_roots.GrabCut=/data/GrabCut).
    `mask_mode`, `ignore_value`, `categories` and `min_annotation_area` say how the user's own
    'COCO' (root: an instances JSON) and 'ImageMasks' (root: a folder) datasets are read
    (data.custom_datasets.CustomOptions); their eval roots are `eval_roots.COCO` / `.ImageMasks`
    (evaluated after training once set, whether or not `eval_datasets` names them).
    """
    return ml_collections.ConfigDict(
        dict(
            name="COCO+LVIS",
            root="",
            data_dir="",  # TFDS / cache directory ("" = the loader's default)
            split="train",
            epoch_len=30000,
            num_workers=4,
            stuff_prob=0.3,
            min_object_area=1000,
            keep_background_prob=0.05,
            points=dict(MULTI_POINT_SAMPLER),
            synthetic={},
            mask_mode="binary",  # ImageMasks <stem>.png: 'binary' (one object) or 'instances'
            ignore_value=-1,  # ImageMasks mask value marking ignore regions (-1: none)
            categories=(),  # COCO category names or ids to keep (empty: all)
            min_annotation_area=0,  # COCO / ImageMasks objects with fewer pixels are skipped
            eval_datasets=DEFAULT_EVAL_DATASETS,
            eval_roots={name: "" for name in (*DEFAULT_EVAL_DATASETS, "COCO", "ImageMasks")},
        )
    )
