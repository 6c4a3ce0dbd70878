"""Training loss (docs/design/training.md#loss) and the logging-only IoU metric."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from skipclick_jax.defaults import MASK_THRESHOLD


def normalized_focal_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 0.5,
    gamma: float = 2.0,
    eps: float = 1e-12,
    ignore_label: float = -1.0,
) -> jax.Array:
    """RITM's NormalizedFocalLossSigmoid (detached normaliser, no max_mult clamp), per sample.

    Args:
      logits: [B, H, W] float32 pre-sigmoid scores.
      labels: [B, H, W] float32 in {0, 1}, `ignore_label` where unlabelled.
    Returns:
      [B] float32: the focal loss summed over valid pixels divided by their count; the trainer
      takes the batch mean.
    """
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.float32)
    p = jax.nn.sigmoid(logits)
    valid = (labels != ignore_label).astype(jnp.float32)
    weight = jnp.where(labels > 0.5, alpha, 1.0 - alpha) * valid
    pt = jnp.where(valid > 0, 1.0 - jnp.abs(labels - p), 1.0)
    beta = (1.0 - pt) ** gamma
    mult = jax.lax.stop_gradient(
        valid.sum((-2, -1), keepdims=True) / (beta.sum((-2, -1), keepdims=True) + eps)
    )
    loss = -weight * (beta * mult) * jnp.log(jnp.minimum(pt + eps, 1.0)) * valid
    return loss.sum((-2, -1)) / (valid.sum((-2, -1)) + eps)


def binary_iou(prob: jax.Array, gt: jax.Array, thresh: float = MASK_THRESHOLD) -> jax.Array:
    """IoU of `prob > thresh` against `gt > 0.5` ([B, H, W] each) ignoring gt == -1 -> [B].

    An empty union counts as IoU 1.
    """
    valid = gt != -1
    pred = (prob > thresh) & valid
    true = (gt > 0.5) & valid
    inter = (pred & true).sum((-2, -1))
    union = (pred | true).sum((-2, -1))
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0).astype(jnp.float32)
