"""Defaults and named constants, below everything that reads them (config_lib, model, data,
train, evaluation): the constants here, the `train`/`data` config sections (`defaults.train`)
and the `eval` section (`defaults.evaluation`). Imports nothing of the package."""

MASK_THRESHOLD = 0.49
"""A probability p is foreground where p > MASK_THRESHOLD (the original's `pred_thr`, everywhere:
training's click simulation and IoU, the evaluation's mask, the parity checks)."""

UPSAMPLE_FACTOR = {"x1": 1, "x2": 2, "x4": 4}
"""The head's `upsample` mode -> its pixel-shuffle factor u (the classifier has embed_dim // u
channels; the logits come out at u x the head's resolution)."""

CLICK_DISTANCES = ("chamfer5", "chamfer5_fixed", "exact")
"""The training clicker's distance transforms (`train.click_distance`): OpenCV's 5x5 chamfer
distance as its Intel IPP path computes it (x86 pip wheels, the original's), as OpenCV's own 16.16
fixed-point code computes it (builds without IPP), or the exact Euclidean one (`edt.chamfer5`,
`edt.edt`)."""

MULTI_POINT_SAMPLER = dict(
    max_num_points=24,
    prob_gamma=0.80,
    merge_objects_prob=0.15,
    max_num_merged_objects=2,
    expand_ratio=0.1,
    positive_erode_prob=0.9,
    positive_erode_iters=3,
    negative_probs=(0.1, 0.4, 0.5),  # background, other objects, border
)
"""RITM's MultiPointSampler settings of the recipe (spec §4.4): `data.points_sampler.
MultiPointSampler`'s field defaults and the `data.points` config section."""
