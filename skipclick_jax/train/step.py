"""The jitted training step: iterative click simulation (docs/design/training.md#click-simulation), NFL loss (#loss), Adam update."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from skipclick_jax.clicks import train_next_points
from skipclick_jax.defaults import CLICK_DISTANCES, MASK_THRESHOLD
from skipclick_jax.model.skipclick import check_remat
from skipclick_jax.train.loss import binary_iou, normalized_focal_loss
from skipclick_jax.train.state import TrainState

Batch = dict[str, jax.Array]  # image uint8 [B,S,S,3], points float32 [B,2P,3], gt float32 [B,S,S]


def check_click_distance(click_distance: str) -> None:
    """Refuses an unknown training-clicker distance, naming it and the choices."""
    if click_distance not in CLICK_DISTANCES:
        raise ValueError(f"click_distance must be one of {CLICK_DISTANCES}, got {click_distance!r}")


def step_keys(state: TrainState) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(num_clicks key, click-sampling key, dropout key, training-mode backbone key) of the step."""
    key = jax.random.fold_in(state.rng, state.step)
    return tuple(jax.random.split(key, 4))


def simulate_clicks(
    graphdef: nnx.GraphDef,
    params: dict[str, Any],
    frozen: dict[str, Any],
    enc: Any,
    batch: Batch,
    num_clicks: jax.Array,
    key: jax.Array,
    thresh: float,
    click_distance: str = "chamfer5",
) -> tuple[jax.Array, jax.Array]:
    """`num_clicks` (traced, 0..max) eval-mode rounds of predict -> sigmoid -> next training click.

    `click_distance` is the training clicker's distance transform (`defaults.CLICK_DISTANCES`, see
    `clicks.train_next_points`). No gradient flows through the simulation. Returns (prev_mask float32 [B,S,S], points [B,2P,3]).
    """
    params, frozen, enc = jax.lax.stop_gradient((params, frozen, enc))

    def round_(i, carry):
        prev, points = carry
        model = nnx.merge(graphdef, params, frozen)
        prev = jax.nn.sigmoid(model.decode_clicks(enc, prev, points, dropout_rng=None))
        points = train_next_points(
            jax.random.fold_in(key, i), prev, batch["gt"], points, i + 1, thresh, click_distance
        )
        return prev, points

    prev = jnp.zeros(batch["gt"].shape, jnp.float32)
    return jax.lax.fori_loop(0, num_clicks, round_, (prev, batch["points"]))


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    max_num_next_clicks: int = 3,
    pred_thresh: float = MASK_THRESHOLD,
    click_distance: str = "chamfer5",
    alpha: float = 0.5,
    gamma: float = 2.0,
    eps: float = 1e-12,
    backbone_train_mode: bool = True,
    remat: str = "none",
    remat_policy: str = "nothing_saveable",
    dropout: bool = True,
    with_grads: bool = False,
) -> Callable[[TrainState, dict[str, Any], Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns the pure step (state, frozen, batch) -> (state, metrics) to be wrapped in jax.jit.

    The image is encoded once per step (with gradients, so an unfrozen backbone trains); the
    simulation reuses it under stop_gradient, then a train-mode forward (Dropout2d) gives the loss,
    with `remat` ('none' | 'blocks' | 'decoder', see `SkipClick.set_remat`). The compute dtype is
    the model's (`model.dtype`); parameters, gradients, optimizer state and the loss are float32.
    With `backbone_train_mode`, a backbone whose training mode differs (DINOv3: RoPE coordinate
    rescale) is run again in training mode for the loss forward, as the original trainer does;
    the click simulation stays eval-mode. `click_distance` picks the training clicker's distance
    (`defaults.CLICK_DISTANCES`; 'chamfer5' is the original's).
    metrics: float32 scalars loss, iou (prediction at `pred_thresh`), grad_norm, lr, num_clicks.
    For parity checks (`convert_weights.train_parity`): a batch entry `num_clicks` (int32 []) sets
    the simulated clicks instead of drawing them, `dropout=False` switches the head's Dropout2d off,
    and `with_grads=True` adds the gradient tree as metrics['grads'] and the click points of the loss
    forward (after the simulated clicks, [B,2P,3]) as metrics['points'].
    """
    check_remat(remat, remat_policy)
    check_click_distance(click_distance)

    def train_step(state: TrainState, frozen: dict[str, Any], batch: Batch):
        k_num, k_click, k_drop, k_backbone = step_keys(state)
        if "num_clicks" in batch:
            num_clicks = jnp.asarray(batch["num_clicks"], jnp.int32)
        else:
            num_clicks = jax.random.randint(k_num, (), 0, max_num_next_clicks + 1)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, frozen)
            model.set_remat(remat, remat_policy)
            enc = model.encode_image(batch["image"])
            prev, points = simulate_clicks(
                graphdef, params, frozen, enc, batch, num_clicks, k_click, pred_thresh, click_distance
            )
            if backbone_train_mode and model.feature_extractor.stochastic_in_training:
                enc = model.encode_image(batch["image"], rng=k_backbone)
            logits = model.decode_clicks(enc, prev, points, dropout_rng=k_drop if dropout else None)
            loss = normalized_focal_loss(logits, batch["gt"], alpha=alpha, gamma=gamma, eps=eps)
            return loss.mean(), (logits, points)

        (loss, (logits, points)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(
            loss=loss,
            iou=binary_iou(jax.nn.sigmoid(logits), batch["gt"], pred_thresh).mean(),
            grad_norm=optax.tree.norm(grads),
            lr=jnp.asarray(schedule(state.step), jnp.float32),
            num_clicks=num_clicks.astype(jnp.float32),
        )
        if with_grads:
            metrics["grads"] = grads
            metrics["points"] = points
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_preview_fn(
    graphdef: nnx.GraphDef,
    *,
    num: int,
    max_num_next_clicks: int = 3,
    pred_thresh: float = MASK_THRESHOLD,
    click_distance: str = "chamfer5",
) -> Callable[[TrainState, dict[str, Any], Batch], dict[str, jax.Array]]:
    """(state, frozen, batch) -> the first `num` samples' {image, gt, points [num,2P,3] after the
    simulated clicks, prob [num,S,S] eval-mode prediction}, for image summaries. It draws the
    step's keys exactly as `make_train_step` does for the same `state.step`."""
    check_click_distance(click_distance)

    def preview(state: TrainState, frozen: dict[str, Any], batch: Batch):
        batch = jax.tree.map(lambda x: x[:num], batch)
        k_num, k_click, _, _ = step_keys(state)
        num_clicks = jax.random.randint(k_num, (), 0, max_num_next_clicks + 1)
        model = nnx.merge(graphdef, state.params, frozen)
        enc = model.encode_image(batch["image"])
        prev, points = simulate_clicks(
            graphdef, state.params, frozen, enc, batch, num_clicks, k_click, pred_thresh, click_distance
        )
        prob = jax.nn.sigmoid(model.decode_clicks(enc, prev, points, dropout_rng=None))
        return dict(image=batch["image"], gt=batch["gt"], points=points, prob=prob)

    return preview
