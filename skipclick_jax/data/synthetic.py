"""A deterministic synthetic segmentation dataset for smoke training and tests.

Each image is a smooth colour-noise background with 2-5 textured shapes (rotated ellipses,
polygons, Fourier blobs) painted in order, so later shapes occlude earlier ones. The visible part
of every shape is one object; all objects live in a single label layer (ids 1..K). Samples are
addressed by (split, index) and depend only on (seed, split, index), never on iteration order.
Generation is numpy only; `png_bytes` encodes an image for the TFDS records.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Size and content of the synthetic dataset.

    `image_size` is (H, W). Shapes whose visible area is below `min_visible_fraction` of the
    image are dropped; an image is redrawn until at least `min_objects` shapes remain.
    """

    image_size: tuple[int, int] = (224, 224)
    num_train: int = 256
    num_val: int = 24
    min_objects: int = 2
    max_objects: int = 5
    min_visible_fraction: float = 0.01
    seed: int = 0

    def __post_init__(self):
        h, w = self.image_size
        if h < 32 or w < 32:
            raise ValueError(f"SyntheticConfig.image_size must be at least 32x32, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 255:
            raise ValueError(
                f"SyntheticConfig needs 1 <= min_objects <= max_objects <= 255, "
                f"got {self.min_objects}, {self.max_objects}"
            )

    def num_images(self, split: str) -> int:
        """Number of images in `split` ('train' or 'val')."""
        _check_split(split)
        return self.num_train if split == "train" else self.num_val


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Synthetic: unknown split {split!r}, expected one of {SPLITS}")


def synthetic_sample(cfg: SyntheticConfig, split: str, index: int) -> dict:
    """Image `index` of `split`, in the decoded train-record layout.

    Returns {'id': '<split>_<index:05d>', 'image': uint8 [H,W,3], 'layers': uint8 [H,W,1],
    'objects': int32 [K,2] rows (0, k+1), 'parents': int32 [K] all -1, 'num_instance_masks': K}.
    """
    n = cfg.num_images(split)
    if not 0 <= index < n:
        raise IndexError(f"Synthetic {split}: index {index} out of range [0, {n})")
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    h, w = cfg.image_size
    for _ in range(100):
        image, label = _draw_image(rng, h, w, cfg)
        k = int(label.max())
        if k >= cfg.min_objects:
            break
    return {
        "id": f"{split}_{index:05d}",
        "image": image,
        "layers": label[:, :, None],
        "objects": np.stack([np.zeros(k, np.int32), np.arange(1, k + 1, dtype=np.int32)], axis=1),
        "parents": np.full((k,), -1, np.int32),
        "num_instance_masks": k,
    }


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG encoding of a uint8 [H,W,3] RGB image."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _draw_image(rng: np.random.Generator, h: int, w: int, cfg: SyntheticConfig):
    """One attempt: (uint8 [H,W,3] image, uint8 [H,W] label map with ids 1..K in paint order).

    A shape that would leave itself or an earlier shape with less than the minimum visible
    area is not painted, so every painted shape is a labelled object.
    """
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5,
                         indexing="ij")
    bg_colour = rng.uniform(0.15, 0.85, size=3).astype(np.float32)
    image = bg_colour + 0.3 * (_smooth_noise(rng, h, w, int(rng.integers(2, 6))) - 0.5)
    image += rng.normal(0.0, 0.02, size=(h, w, 3)).astype(np.float32)
    label = np.zeros((h, w), np.uint8)
    min_area = cfg.min_visible_fraction * h * w
    num_shapes = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    k = 0
    for _ in range(4 * num_shapes):
        if k == num_shapes:
            break
        mask = _shape_mask(rng, yy, xx, min(h, w))
        areas = np.bincount(np.where(mask, k + 1, label).ravel(), minlength=k + 2)[1:]
        if areas.min() < min_area:
            continue
        k += 1
        image[mask] = _texture(rng, yy, xx, bg_colour, h, w)[mask]
        label[mask] = k
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8), label


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a random (cells+1)^2 x 3 grid, smoothstep-interpolated to [H,W,3]."""
    grid = rng.uniform(size=(cells + 1, cells + 1, 3)).astype(np.float32)
    rows = np.tensordot(_interp_matrix(h, cells), grid, axes=1)  # [H, cells+1, 3]
    return np.matmul(_interp_matrix(w, cells), rows)  # [H, W, 3]


def _interp_matrix(n: int, cells: int) -> np.ndarray:
    """[n, cells+1] weights of smoothstep interpolation between grid nodes."""
    pos = (np.arange(n, dtype=np.float32) + 0.5) * cells / n
    i0 = np.minimum(np.floor(pos).astype(np.int64), cells - 1)
    t = pos - i0
    s = t * t * (3.0 - 2.0 * t)
    m = np.zeros((n, cells + 1), np.float32)
    m[np.arange(n), i0] = 1.0 - s
    m[np.arange(n), i0 + 1] = s
    return m


def _shape_mask(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, side: int) -> np.ndarray:
    """bool [H,W] mask of a random ellipse, polygon or blob."""
    h, w = yy.shape
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    radius = rng.uniform(0.12, 0.28) * side
    dy, dx = yy - cy, xx - cx
    kind = int(rng.integers(3))
    if kind == 0:
        angle = rng.uniform(0.0, np.pi)
        a, b = radius, radius * rng.uniform(0.45, 1.0)
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == 1:
        n = int(rng.integers(3, 9))
        jitter = rng.uniform(-0.35, 0.35, size=n)
        angles = rng.uniform(0.0, 2.0 * np.pi) + 2.0 * np.pi * (np.arange(n) + jitter) / n
        radii = radius * rng.uniform(0.6, 1.0, size=n)
        return _polygon_mask(cy + radii * np.sin(angles), cx + radii * np.cos(angles), yy, xx)
    phi = np.arctan2(dy, dx)
    r = np.full_like(phi, radius)
    for m in range(2, 5):
        r += radius * rng.uniform(-0.15, 0.15) * np.cos(m * phi + rng.uniform(0.0, 2.0 * np.pi))
    return dy * dy + dx * dx <= r * r


def _polygon_mask(vy: np.ndarray, vx: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test of pixel centres against the closed polygon (vy, vx)."""
    inside = np.zeros(yy.shape, bool)
    for y0, x0, y1, x1 in zip(vy, vx, np.roll(vy, 1), np.roll(vx, 1)):
        crosses = (y0 > yy) != (y1 > yy)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0 + (yy - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xx < x_cross)
    return inside


def _texture(rng, yy, xx, bg_colour, h, w) -> np.ndarray:
    """float32 [H,W,3] texture whose mean colour is at least 0.35 (L2) away from `bg_colour`."""
    colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
    for _ in range(50):
        if np.linalg.norm(colour - bg_colour) >= 0.35:
            break
        colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
    amplitude = rng.uniform(0.04, 0.12)
    kind = int(rng.integers(4))
    if kind == 0:
        pattern = rng.normal(0.0, 0.5, size=(h, w, 1)).astype(np.float32)
    elif kind == 1:
        angle, period = rng.uniform(0.0, np.pi), rng.uniform(4.0, 16.0)
        pattern = np.sin(2.0 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)[..., None]
    elif kind == 2:
        period = rng.uniform(4.0, 14.0)
        pattern = np.sign(np.sin(np.pi * yy / period) * np.sin(np.pi * xx / period))[..., None]
    else:
        pattern = 2.0 * _smooth_noise(rng, h, w, int(rng.integers(4, 10))) - 1.0
    return (colour + amplitude * pattern).astype(np.float32)
