"""Evaluation protocol settings (docs/design/evaluation.md): the `eval` section of an experiment config."""

from __future__ import annotations

import ml_collections

from skipclick_jax.defaults import MASK_THRESHOLD


def eval_defaults() -> ml_collections.ConfigDict:
    """The original NoC protocol (`evaluate_model.py NoBRS --eval-mode=cvpr --suppress-zoom`).

    `sizes` maps a dataset name to its square network input size S; names starting with a key
    ending in `*` match by prefix, anything else uses `default_size`. `bucket` is the granularity
    (pixels) to which image heights/widths are padded so that a batch shares one shape;
    `batch_size` 0 picks `scheduler.default_batch_size()` (1 per device on CPU, 8 on accelerators).
    `dtype` ('float32' | 'bfloat16') and `attention` ('xla' | 'cudnn') override the model's
    compute settings for the evaluation ("" keeps the model's own `model.dtype` / `model.attention`).
    """
    return ml_collections.ConfigDict(
        dict(
            max_clicks=20,
            target_iou=0.95,
            thresh=MASK_THRESHOLD,
            flip=True,
            default_size=448,
            sizes={"DAVIS": 672, "HQSeg44k": 896, "SHSeg": 896, "WSESeg_*": 896},
            noc_thresholds=(0.8, 0.85, 0.9, 0.95),
            points_per_polarity=20,
            batch_size=0,
            bucket=64,
            overlays=0,
            dtype="",
            attention="",
        )
    )


def size_for(cfg: ml_collections.ConfigDict, dataset: str) -> int:
    """Network input size S for `dataset` under the eval config `cfg` (exact name, then prefix)."""
    sizes = dict(cfg.sizes)
    if dataset in sizes:
        return int(sizes[dataset])
    for key, size in sizes.items():
        if key.endswith("*") and dataset.startswith(key[:-1]):
            return int(size)
    return int(cfg.default_size)
