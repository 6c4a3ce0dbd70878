"""The original's NoC evaluation of one sample (docs/design/evaluation.md), restated in PyTorch and NumPy.

`evaluate_model.py NoBRS --eval-mode=cvpr --suppress-zoom` one click at a time: the Clicker
(exact EDT of the 1-px zero-padded error masks, never the same pixel twice, first maximum in
row-major order, positive only if max fn > max fp), then BasePredictor: the image and the previous
probability resized to S×S together (bilinear, align_corners=True), clicks mapped to (S·r/H, S·c/W)
in float64 and flipped to (r', S - c' - 1), the points tensor [2, 2P, 3] float64 with
P = max(#pos, #neg, 1), the whole network on [x, flip(x)], logits averaged, sigmoid, resized back
(align_corners=True), thresholded at 0.49. The reference for `tests/test_eval_parity.py` and the
PyTorch baseline of `bench/eval_speed.py`. The Clicker itself is `convert_weights/clicker.py`
(NumPy/SciPy only).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from convert_weights.clicker import next_click
from skipclick_jax.defaults import MASK_THRESHOLD


def points_nd(clicks: list[tuple[int, int, bool]], size: int, height: int, width: int,
              flip: bool = True) -> torch.Tensor:
    """`get_points_nd` after ZoomIn and AddHorizontalFlip -> float64 [1 or 2, 2P, 3]."""
    mapped = [(size * r / height, size * c / width, i, q) for i, (r, c, q) in enumerate(clicks)]
    views = [mapped] + ([[(r, size - c - 1, i, q) for r, c, i, q in mapped]] if flip else [])
    num = max(1, max(sum(q for *_, q in clicks), sum(not q for *_, q in clicks)))
    out = []
    for view in views:
        pos = [(r, c, i) for r, c, i, q in view if q]
        neg = [(r, c, i) for r, c, i, q in view if not q]
        out.append(pos + [(-1, -1, -1)] * (num - len(pos)) + neg + [(-1, -1, -1)] * (num - len(neg)))
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def predict(model, image: torch.Tensor, prev: torch.Tensor, clicks, size: int, flip: bool = True) -> torch.Tensor:
    """One click of BasePredictor: image [1,3,H,W], prev probability [1,1,H,W] -> probability [1,1,H,W]."""
    h, w = image.shape[2:]
    x = F.interpolate(torch.cat([image, prev], dim=1), size=(size, size), mode="bilinear", align_corners=True)
    if flip:
        x = torch.cat([x, torch.flip(x, dims=[3])])
    logits = model(x, points_nd(clicks, size, h, w, flip))["instances"]
    if flip:
        logits = 0.5 * (logits[:1] + torch.flip(logits[1:], dims=[3]))
    return F.interpolate(torch.sigmoid(logits), size=(h, w), mode="bilinear", align_corners=True)


def noc_loop(model, image: np.ndarray, gt: np.ndarray, size: int = 448, max_clicks: int = 20,
             target_iou: float = 0.95, thresh: float = MASK_THRESHOLD, flip: bool = True
             ) -> tuple[list[list], list[float]]:
    """One sample: image [H,W,3] uint8 (or float in [0,1]), gt [H,W] {0, 1, -1} -> (clicks
    [[row, col, is_positive], ...], IoU after each click)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    tensor = tensor.float() / 255 if tensor.dtype == torch.uint8 else tensor.float()
    prev = torch.zeros((1, 1) + gt.shape)
    pred = np.zeros(gt.shape, bool)
    not_clicked = np.ones(gt.shape, bool)
    counted = gt != -1
    clicks, ious = [], []
    for _ in range(max_clicks):
        clicks.append(next_click(gt, pred, not_clicked))
        prev = predict(model, tensor, prev, clicks, size, flip)
        pred = prev[0, 0].numpy() > thresh
        ious.append(np.sum(pred & (gt == 1) & counted) / np.sum((pred | (gt == 1)) & counted))
        if ious[-1] >= target_iou:
            break
    return [list(c) for c in clicks], ious
