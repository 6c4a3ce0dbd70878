"""RITM's MultiPointSampler with SkipClick's arguments and stuff handling (docs/design/training.md#multipointsampler, #data).

Objects are rows (layer_idx, local_id) of an int32 [K, 2] table with parents int32 [K] (-1 = root):
object k's mask is `layers[..., objects[k, 0]] == objects[k, 1]`. Points are float32 [2N, 3] rows
(row, col, order): positives in [0, N), negatives in [N, 2N), sampled points have order 100 and
unused rows are (-1, -1, -1). Draws are vectorised but follow the reference's sequential
semantics: every draw picks its mask (and strategy) independently, and a draw from an empty mask
adds nothing.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from skipclick_jax.defaults import MULTI_POINT_SAMPLER as _DEFAULTS

_KERNEL = np.ones((3, 3), np.uint8)
_ORDER = 100


def select_stuff(objects: np.ndarray, parents: np.ndarray, num_instance_masks: int,
                 stuff_prob: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """CocoLvis stuff handling: objects with index >= num_instance_masks are stuff regions.

    With probability stuff_prob they become extra roots; otherwise they are dropped, and
    `Augmenter` zeroes their pixels with every other label no kept object owns. (The reference
    zeroes them before augmenting; the layers' resize/flip/pad/crop only move pixels, so zeroing
    afterwards is identical.)

    Args:
      objects: int32 [K, 2] rows (layer_idx, local_id).
      parents: int32 [K] (-1 = root); instances never have stuff parents.
      num_instance_masks: number of leading instance objects.
      stuff_prob: probability of keeping stuff regions as objects.
      rng: source of randomness.

    Returns:
      (objects int32 [K', 2], parents int32 [K']).
    """
    objects = np.asarray(objects, np.int32).reshape(-1, 2)
    parents = np.asarray(parents, np.int32).reshape(-1)
    if not 0 <= num_instance_masks <= objects.shape[0]:
        raise ValueError(f'num_instance_masks must be in [0, {objects.shape[0]}], '
                         f'got {num_instance_masks}')
    if stuff_prob > 0 and rng.random() < stuff_prob:
        parents = parents.copy()
        parents[num_instance_masks:] = -1
        return objects, parents
    return objects[:num_instance_masks], parents[:num_instance_masks]


def _count_probs(n: int, gamma: float) -> np.ndarray:
    probs = gamma ** np.arange(n, dtype=np.float64)
    return probs / probs.sum()


def _draw(masks: list[np.ndarray], probs, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws, each picks masks[i] with probability probs[i] then a uniform pixel of it.

    Draws that hit an empty mask are skipped. masks: bool [H, W] each -> int64 [<=n, 2] (row, col).
    """
    which = rng.choice(len(masks), size=n, p=probs)
    flat = np.full(n, -1, np.int64)
    for i, mask in enumerate(masks):
        hits = np.flatnonzero(which == i)
        if len(hits) == 0:
            continue
        pixels = np.flatnonzero(mask)
        if len(pixels):
            flat[hits] = pixels[rng.integers(0, len(pixels), size=len(hits))]
    flat = flat[flat >= 0]
    return np.stack(np.divmod(flat, masks[0].shape[1]), axis=-1)


@dataclasses.dataclass(frozen=True)
class MultiPointSampler:
    """Picks the target object(s) of a sample and draws its initial clicks.

    Attributes:
      max_num_points: N, points per polarity (the output has 2N rows).
      prob_gamma: P(n_pos = k) ∝ gamma^(k-1), k = 1..N; P(n_neg = k) ∝ gamma^k, k = 0..N.
      merge_objects_prob: probability of merging several roots into one target.
      max_num_merged_objects: most roots merged.
      expand_ratio: border band width = ceil(expand_ratio · sqrt(area(gt))) dilations.
      positive_erode_prob, positive_erode_iters: 3x3 erosion of the positive regions, kept only if
        more than 10 px remain.
      negative_probs: probabilities of the (background, other objects, border) strategies.
    """

    max_num_points: int = _DEFAULTS["max_num_points"]
    prob_gamma: float = _DEFAULTS["prob_gamma"]
    merge_objects_prob: float = _DEFAULTS["merge_objects_prob"]
    max_num_merged_objects: int = _DEFAULTS["max_num_merged_objects"]
    expand_ratio: float = _DEFAULTS["expand_ratio"]
    positive_erode_prob: float = _DEFAULTS["positive_erode_prob"]
    positive_erode_iters: int = _DEFAULTS["positive_erode_iters"]
    negative_probs: tuple[float, float, float] = _DEFAULTS["negative_probs"]

    def __post_init__(self):
        if self.max_num_points < 1:
            raise ValueError(f'max_num_points must be positive, got {self.max_num_points}')
        if self.max_num_merged_objects < 2:
            raise ValueError(
                f'max_num_merged_objects must be >= 2, got {self.max_num_merged_objects}')
        if len(self.negative_probs) != 3 or not math.isclose(sum(self.negative_probs), 1.0):
            raise ValueError(f'negative_probs must be 3 probabilities summing to 1, '
                             f'got {self.negative_probs}')

    def _num_positive(self, rng: np.random.Generator) -> int:
        return 1 + rng.choice(self.max_num_points, p=_count_probs(self.max_num_points,
                                                                  self.prob_gamma))

    def _num_negative(self, rng: np.random.Generator) -> int:
        return rng.choice(self.max_num_points + 1, p=_count_probs(self.max_num_points + 1,
                                                                  self.prob_gamma))

    def _erode(self, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() > self.positive_erode_prob:
            return mask
        eroded = cv2.erode(mask.view(np.uint8), _KERNEL, iterations=self.positive_erode_iters)
        return eroded.view(bool) if np.count_nonzero(eroded) > 10 else mask

    def _border(self, gt: np.ndarray) -> np.ndarray:
        radius = int(np.ceil(self.expand_ratio * np.sqrt(np.count_nonzero(gt))))
        expanded = cv2.dilate(gt.view(np.uint8), _KERNEL, iterations=radius)
        return expanded.view(bool) & ~gt

    def _positives(self, masks: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """Positive points int64 [<=N, 2] from the per-object regions (all non-empty)."""
        if len(masks) == 1:
            return _draw(masks, [1.0], self._num_positive(rng), rng)
        first = np.concatenate([_draw([m], [1.0], 1, rng) for m in masks])
        union = _draw(masks, np.full(len(masks), 1 / len(masks)), self._num_negative(rng), rng)
        room = self.max_num_points - len(first)
        if len(union) > room:
            union = union[rng.choice(len(union), size=room, replace=False)]
        return np.concatenate([first, union])

    def __call__(self, layers: np.ndarray, objects: np.ndarray, parents: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Sample a target and its clicks.

        Args:
          layers: uint8 [H, W, L] label layers (may still hold removed objects).
          objects: int32 [K, 2] rows (layer_idx, local_id) of non-empty objects.
          parents: int32 [K], -1 for roots; only roots are targets.
          rng: source of all randomness.

        Returns:
          (points float32 [2N, 3], gt float32 [H, W] in {0, 1}). Without objects gt is zero, all
          positives are padding and negatives come from the pixels where every layer is 0.
        """
        objects = np.asarray(objects, np.int32).reshape(-1, 2)
        parents = np.asarray(parents, np.int32).reshape(-1)
        if parents.shape[0] != objects.shape[0]:
            raise ValueError(f'parents must have one entry per object ({objects.shape[0]}), '
                             f'got {parents.shape[0]}')
        background = layers[..., 0] == 0
        for layer in range(1, layers.shape[2]):
            background &= layers[..., layer] == 0
        if len(objects) == 0:
            gt = np.zeros(layers.shape[:2], bool)
            positives = np.zeros((0, 2), np.int64)
            negative_masks = [background] * 3
        else:
            roots = np.flatnonzero(parents < 0)
            if len(roots) == 0:
                raise ValueError('parents must contain at least one root (-1)')
            if len(roots) > 1 and rng.random() < self.merge_objects_prob:
                count = rng.integers(2, min(len(roots), self.max_num_merged_objects) + 1)
                chosen = rng.choice(roots, size=count, replace=False)
            else:
                chosen = [rng.choice(roots)]
            masks = [layers[..., objects[k, 0]] == objects[k, 1] for k in chosen]
            gt = np.logical_or.reduce(masks)
            positives = self._positives([self._erode(m, rng) for m in masks], rng)
            not_gt = ~gt
            other = not_gt if len(objects) <= len(chosen) else not_gt & ~background
            negative_masks = [not_gt, other, self._border(gt)]
        negatives = _draw(negative_masks, self.negative_probs, self._num_negative(rng), rng)
        n = self.max_num_points
        points = np.full((2 * n, 3), -1, np.float32)
        points[:len(positives), :2] = positives
        points[:len(positives), 2] = _ORDER
        points[n:n + len(negatives), :2] = negatives
        points[n:n + len(negatives), 2] = _ORDER
        return points, gt.astype(np.float32)
