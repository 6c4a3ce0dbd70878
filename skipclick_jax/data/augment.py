"""Training augmentation and object filtering (docs/design/training.md#augmentation).

The geometric and photometric chain is RITM's albumentations `Compose`, re-implemented with
cv2/NumPy so that uint8 results match albumentations for the same random parameters:

  1. UniformRandomResize(0.75, 1.40): size round(H·s) × round(W·s); image INTER_LINEAR, layers
     INTER_NEAREST.
  2. HorizontalFlip, p=0.5.
  3. PadIfNeeded(S, S), constant 0, centred (top = floor(pad / 2)).
  4. RandomCrop(S, S): offset int((H_pad - S + 1)·u), u ~ U[0, 1).
  5. RandomBrightnessContrast(brightness (-0.25, 0.25), contrast (-0.15, 0.4), p=0.75):
     LUT = uint8(clip(float32(x)·(1 + c) + b·255, 0, 255))  (truncation, brightness_by_max).
  6. RGBShift(10, 10, 10, p=0.75): LUT_ch = uint8(clip(float32(x) + shift_ch, 0, 255)).

Steps 2-4 are fused into one copy of the (mirrored) crop window followed by a flip of the crop,
and steps 5-6 into one composed per-channel LUT; both fusions are exact. All randomness comes from
the `np.random.Generator` passed in.

Objects are rows (layer_idx, local_id) of an int32 [K, 2] table with a parent index per object
(-1 for roots): object k's mask is `layers[..., objects[k, 0]] == objects[k, 1]`.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

_U8 = 256


def brightness_contrast_lut(alpha: float, beta: float) -> np.ndarray:
    """albumentations' uint8 brightness/contrast LUT [256] uint8 for x·alpha + beta·255."""
    lut = np.arange(_U8, dtype=np.float32)
    if alpha != 1:
        lut *= np.float32(alpha)
    if beta != 0:
        lut += np.float32(beta * 255)
    return np.clip(lut, 0, 255).astype(np.uint8)


def rgb_shift_lut(shifts: np.ndarray) -> np.ndarray:
    """albumentations' uint8 RGBShift LUTs [256, 3] uint8 for per-channel shifts [3]."""
    lut = np.arange(_U8, dtype=np.float32)[:, None] + np.asarray(shifts, np.float32)
    return np.clip(lut, 0, 255).astype(np.uint8)


def _pad_crop(x: np.ndarray, size: int, top: int, left: int, flip: bool) -> np.ndarray:
    """Window [top, top+size) × [left, left+size) of x [H, W, C], zero outside, optionally
    mirrored left-right -> [size, size, C]."""
    h, w = x.shape[:2]
    out = np.zeros((size, size) + x.shape[2:], x.dtype)
    r0, r1 = max(top, 0), min(top + size, h)
    c0, c1 = max(left, 0), min(left + size, w)
    out[r0 - top:r1 - top, c0 - left:c1 - left] = x[r0:r1, c0:c1]
    return cv2.flip(out, 1).reshape(out.shape) if flip else out


def _resize(x: np.ndarray, height: int, width: int, interpolation: int) -> np.ndarray:
    """cv2.resize of x [H, W, C] to [height, width, C] (keeps a trailing axis of size 1)."""
    if x.shape[:2] == (height, width):
        return x
    return cv2.resize(x, (width, height), interpolation=interpolation).reshape(
        height, width, x.shape[2])


def object_areas(layers: np.ndarray, objects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer label histogram int64 [L, 256] and object areas int64 [K] of layers [H, W, L].

    cv2.calcHist counts in float32, exact below 2^24 pixels per label.
    """
    hist = np.stack([cv2.calcHist([layers], [l], None, [_U8], [0, _U8]).ravel()
                     for l in range(layers.shape[2])]).astype(np.int64)
    return hist, hist[objects[:, 0], objects[:, 1]]


def clear_unowned_labels(layers: np.ndarray, objects: np.ndarray,
                         hist: np.ndarray) -> np.ndarray:
    """Zero every nonzero label of layers [H, W, L] that no row of objects [K, 2] owns.

    As RITM's `DSample._compute_objects_areas` does; hist is `object_areas(layers, objects)[0]`.
    """
    owned = np.zeros(hist.shape, bool)
    owned[:, 0] = True
    owned[objects[:, 0], objects[:, 1]] = True
    if not hist[~owned].any():
        return layers
    lut = np.where(owned, np.arange(_U8, dtype=np.uint8), np.uint8(0)).T
    return cv2.LUT(layers, np.ascontiguousarray(lut[:, None])).reshape(layers.shape)


def drop_objects(objects: np.ndarray, parents: np.ndarray,
                 keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove objects with keep == False, re-parenting children to their nearest kept ancestor.

    objects int32 [K, 2], parents int32 [K] (-1 = root), keep bool [K]
    -> (objects [K', 2], parents [K'] indexing the kept objects).
    """
    new_index = np.cumsum(keep) - 1
    new_parents = []
    for k in np.flatnonzero(keep):
        p = parents[k]
        while p >= 0 and not keep[p]:
            p = parents[p]
        new_parents.append(new_index[p] if p >= 0 else -1)
    return objects[keep], np.asarray(new_parents, np.int32).reshape(-1)


@dataclasses.dataclass(frozen=True)
class Augmenter:
    """The augmentation of docs/design/training.md#augmentation, with RITM's keep-background retry loop and small-object filter.

    Attributes:
      crop_size: S, the output side (448 for SkipClick).
      min_object_area: objects below this many pixels are removed after augmentation.
      keep_background_prob: probability of keeping an augmentation that leaves no object (> 0).
    """

    crop_size: int = 448
    scale_range: tuple[float, float] = (0.75, 1.40)
    flip_prob: float = 0.5
    brightness_limit: tuple[float, float] = (-0.25, 0.25)
    contrast_limit: tuple[float, float] = (-0.15, 0.4)
    brightness_contrast_prob: float = 0.75
    rgb_shift_limit: float = 10.0
    rgb_shift_prob: float = 0.75
    min_object_area: int = 1000
    keep_background_prob: float = 0.05

    def __post_init__(self):
        if self.crop_size < 1:
            raise ValueError(f'crop_size must be positive, got {self.crop_size}')
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f'scale_range must satisfy 0 < low <= high, got {self.scale_range}')
        if not 0 < self.keep_background_prob <= 1:
            raise ValueError('keep_background_prob must be in (0, 1] (0 can retry forever), '
                             f'got {self.keep_background_prob}')

    def transform(self, image: np.ndarray, layers: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Steps 1-6: image uint8 [H, W, 3], layers uint8 [H, W, L] -> [S, S, 3], [S, S, L]."""
        h, w = image.shape[:2]
        scale = rng.uniform(*self.scale_range)
        h, w = round(h * scale), round(w * scale)
        image = _resize(image, h, w, cv2.INTER_LINEAR)
        layers = _resize(layers, h, w, cv2.INTER_NEAREST)
        flip = rng.random() < self.flip_prob
        size = self.crop_size
        hp, wp = max(h, size), max(w, size)
        top = int((hp - size + 1) * rng.random()) - (hp - h) // 2
        left = int((wp - size + 1) * rng.random()) - (wp - w) // 2
        if flip:
            left = w - size - left
        image = _pad_crop(image, size, top, left, flip)
        layers = _pad_crop(layers, size, top, left, flip)
        lut = np.broadcast_to(np.arange(_U8, dtype=np.uint8)[:, None], (_U8, 3))
        if rng.random() < self.brightness_contrast_prob:
            alpha = 1.0 + rng.uniform(*self.contrast_limit)
            beta = rng.uniform(*self.brightness_limit)
            lut = brightness_contrast_lut(alpha, beta)[lut]
        if rng.random() < self.rgb_shift_prob:
            shifts = rng.uniform(-self.rgb_shift_limit, self.rgb_shift_limit, size=3)
            lut = np.take_along_axis(rgb_shift_lut(shifts), lut.astype(np.intp), axis=0)
        image = cv2.LUT(image, np.ascontiguousarray(lut).reshape(_U8, 1, 3))
        return image, layers

    def __call__(self, image: np.ndarray, layers: np.ndarray, objects: np.ndarray,
                 parents: np.ndarray, rng: np.random.Generator):
        """`augment` without ignore regions: (image, layers, objects, parents)."""
        return self.augment(image, layers, objects, parents, rng)[:4]

    def augment(self, image: np.ndarray, layers: np.ndarray, objects: np.ndarray,
                parents: np.ndarray, rng: np.random.Generator, ignore: np.ndarray | None = None):
        """Augment a sample and filter its objects.

        Repeats `transform` from the original until an object keeps >= 1 px, or, with probability
        keep_background_prob, accepts an object-less result; only then drops objects below
        min_object_area (so background-only samples also arise from tiny objects, docs/design/training.md#augmentation).
        Layer labels not owned by an input object are zeroed (this is how unselected stuff
        regions leave the layers); dropped objects stay in the layers.

        Args:
          image: uint8 [H, W, 3] RGB.
          layers: uint8 [H, W, L] instance-label layers.
          objects: int32 [K, 2] rows (layer_idx, local_id).
          parents: int32 [K], -1 for roots, else the parent's row in objects.
          rng: source of all randomness.
          ignore: optional bool [H, W] ignore regions, moved with the layers (same random draws
            as without it).

        Returns:
          (image uint8 [S, S, 3], layers uint8 [S, S, L], objects int32 [K', 2],
          parents int32 [K'], ignore bool [S, S] or None).
        """
        objects = np.asarray(objects, np.int32).reshape(-1, 2)
        parents = np.asarray(parents, np.int32).reshape(-1)
        if layers.ndim != 3 or layers.shape[:2] != image.shape[:2]:
            raise ValueError(f'layers must be [H, W, L] matching image {image.shape}, '
                             f'got {layers.shape}')
        if parents.shape[0] != objects.shape[0]:
            raise ValueError(f'parents must have one entry per object ({objects.shape[0]}), '
                             f'got {parents.shape[0]}')
        num_layers = layers.shape[2]
        if ignore is not None:
            if ignore.shape != image.shape[:2]:
                raise ValueError(f'ignore must be [H, W] matching image {image.shape}, got {ignore.shape}')
            layers = np.concatenate([layers, ignore.astype(np.uint8)[:, :, None]], axis=2)
        while True:
            aug_image, aug_layers = self.transform(image, layers, rng)
            aug_ignore = None
            if ignore is not None:
                aug_ignore = aug_layers[:, :, num_layers].astype(bool)
                aug_layers = np.ascontiguousarray(aug_layers[:, :, :num_layers])
            hist, areas = object_areas(aug_layers, objects)
            visible = areas >= 1
            if visible.any() or rng.random() < self.keep_background_prob:
                break
        aug_layers = clear_unowned_labels(aug_layers, objects, hist)
        kept, kept_parents = drop_objects(objects, parents, visible)
        large = areas[visible] >= self.min_object_area
        kept, kept_parents = drop_objects(kept, kept_parents, large)
        return aug_image, aug_layers, kept, kept_parents, aug_ignore
