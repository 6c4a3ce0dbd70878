"""Overlays of masks and clicks for people to look at (PNG outputs, TensorBoard images)."""

from __future__ import annotations

import numpy as np

POSITIVE = np.array([40, 220, 60], np.uint8)
NEGATIVE = np.array([230, 40, 40], np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray | None = None, clicks=(), gt: np.ndarray | None = None,
            alpha: float = 0.45, radius: int = 5) -> np.ndarray:
    """[H,W,3] uint8 (or float in [0,1]) image with the mask tinted blue, the ground-truth
    boundary in yellow and clicks (row, col, is_positive) as green/red dots -> [H,W,3] uint8."""
    img = np.asarray(image)
    img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.dtype != np.uint8 else img.copy()
    out = img.astype(np.float32)
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        out[m] = (1 - alpha) * out[m] + alpha * np.array([30, 120, 255], np.float32)
    if gt is not None:
        g = np.asarray(gt) == 1
        edge = g & ~(np.roll(g, 1, 0) & np.roll(g, -1, 0) & np.roll(g, 1, 1) & np.roll(g, -1, 1))
        out[edge] = (255, 220, 0)
    out = out.astype(np.uint8)
    h, w = out.shape[:2]
    yy, xx = np.ogrid[:h, :w]
    for row, col, positive in clicks:
        disk = (yy - row) ** 2 + (xx - col) ** 2 <= radius**2
        ring = disk & ((yy - row) ** 2 + (xx - col) ** 2 > (radius - 2) ** 2)
        out[disk] = POSITIVE if positive else NEGATIVE
        out[ring] = 255
    return out
