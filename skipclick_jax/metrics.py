"""NoC metrics of the original evaluation (docs/design/evaluation.md#metrics), in float64 NumPy on the host."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NOC_THRESHOLDS = np.arange(0.8, 0.951, 0.05)  # [0.8, 0.8500000000000001, 0.9000000000000001, 0.9500000000000002]


def iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """|pred ∧ gt==1 ∧ gt≠-1| / |(pred ∨ gt==1) ∧ gt≠-1| for gt [H,W] in {0,1,-1}, pred [H,W] bool."""
    if np.shape(gt) != np.shape(pred):
        raise ValueError(f"iou: gt shape {np.shape(gt)} != pred shape {np.shape(pred)}")
    keep = gt != -1
    fg = gt == 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.float64((pred & fg & keep).sum()) / ((pred | fg) & keep).sum()


def ious_from_counts(inter: Sequence[int], union: Sequence[int]) -> np.ndarray:
    """Per-click IoUs (float64, as the original's int / int) from intersection/union pixel counts."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(inter, np.float64) / np.asarray(union, np.float64)


def noc(all_ious: Sequence[Sequence[float]], thresholds=NOC_THRESHOLDS, max_clicks: int = 20):
    """NoC@t and NoF@t: (noc float64 [T], nof int [T]).

    An instance's NoC@t is the 1-based index of its first IoU >= t, or `max_clicks` if none;
    NoF counts instances with NoC == max_clicks (including those first reaching t at that click).
    """
    def first_hit(ious, t):
        hits = np.flatnonzero(np.asarray(ious) >= t)
        return hits[0] + 1 if hits.size else max_clicks

    nocs = np.array([[first_hit(ious, t) for ious in all_ious] for t in thresholds], np.int64)
    nocs = nocs.reshape(len(thresholds), len(all_ious))
    return nocs.mean(axis=1), (nocs == max_clicks).sum(axis=1)


def miou_curve(all_ious: Sequence[Sequence[float]], max_clicks: int = 20) -> np.ndarray:
    """mIoU@k for k = 1..max_clicks (float64 [max_clicks]).

    An instance that stopped early keeps its last IoU (its mask no longer changes); with
    target_iou > 1 all clicks run and this is exactly the original's mIoU@k.
    """
    if not all_ious:
        return np.full((max_clicks,), np.nan)
    rows = []
    for ious in all_ious:
        ious = np.asarray(ious, np.float64)[:max_clicks]
        if ious.size == 0:
            raise ValueError("miou_curve: an instance has no IoU (no click was run)")
        rows.append(np.concatenate([ious, np.full(max_clicks - ious.size, ious[-1])]))
    return np.mean(rows, axis=0)
