"""Optimizer and learning-rate schedule (docs/design/training.md#optimizer)."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def lr_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """MultiStepLR stepped per epoch: lr * gamma^(number of milestones passed), in steps."""
    boundaries = {int(m) * steps_per_epoch: cfg.lr_gamma for m in cfg.lr_milestones}
    return optax.piecewise_constant_schedule(cfg.optimizer.lr, boundaries)


def make_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int):
    """torch.optim.Adam (L2 weight decay added to the gradient, as torch does) under `lr_schedule`,
    with its first moment in `cfg.mu_dtype` ('float32' | 'bfloat16'; the second moment and the
    parameters stay float32).

    Args:
      cfg: the `train` config section.
      steps_per_epoch: optimizer steps per epoch (epoch_len // batch_size).
    Returns:
      (tx, schedule).
    """
    o = cfg.optimizer
    schedule = lr_schedule(cfg, steps_per_epoch)
    mu_dtype = cfg.get("mu_dtype", "float32")
    if mu_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"train.mu_dtype must be 'float32' or 'bfloat16', got {mu_dtype!r}")
    tx = optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                    mu_dtype=None if mu_dtype == "float32" else jnp.bfloat16)
    if o.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(o.weight_decay), tx)
    return tx, schedule
