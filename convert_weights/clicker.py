"""The original's Clicker in NumPy/SciPy (docs/design/evaluation.md), without torch: used by `torch_noc`'s NoC
loop and by the per-sample loop of `bench/eval_speed.py`."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def next_click(gt: np.ndarray, pred: np.ndarray, not_clicked: np.ndarray) -> tuple[int, int, bool]:
    """The Clicker: gt [H,W] in {0, 1, -1}, pred and not_clicked [H,W] bool -> (row, col, positive).
    Marks the clicked pixel in `not_clicked`."""
    def dt(mask):
        return ndimage.distance_transform_edt(np.pad(mask, 1)).astype(np.float32)[1:-1, 1:-1] * not_clicked

    not_ignore = gt != -1
    fn = dt((gt == 1) & ~pred & not_ignore)
    fp = dt((gt != 1) & pred & not_ignore)
    positive = bool(fn.max() > fp.max())
    d = fn if positive else fp
    rows, cols = np.where(d == d.max())
    not_clicked[rows[0], cols[0]] = False
    return int(rows[0]), int(cols[0]), positive
