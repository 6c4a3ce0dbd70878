"""The NoC click protocol as pure functions under `jax.jit` (docs/design/evaluation.md#protocol), on padded batches of
images of different sizes. The host side that fills these batches is `evaluation.scheduler`.

Images are zero-padded at the bottom/right into shape buckets; each sample carries its real size
(h, w), from which the validity mask and per-sample resize taps are made. Padding never changes a
resize (its taps have weight 0), a distance (`edt` treats it as the original's zero border), a click
or an IoU (it is ignored). A pool of samples is encoded when its rows are filled (`admit`; rows
whose image is already encoded copy that encoding, `admit_shared`); `step` then runs only the
per-click path for the pool (`step_rows` for a subset of its rows). `run_batch` is the same click
on one batch under a while loop, until all are done.

The per-click protocol of the original (BasePredictor + NoBRS, `--suppress-zoom`):
  clicker at the original resolution -> prev probability resized to S×S (bilinear,
  align_corners=True) -> clicks (S·r/H, S·c/W), flipped (S·r/H, S - S·c/W - 1), passed exactly as
  integer numerators over `point_denom` -> logits of both copies averaged (0.5·(l + flip(l_f)))
  -> sigmoid -> resized back to H×W (align_corners=True) -> mask = prob > thresh -> IoU.
Clicks are kept in P fixed slots per polarity (positives 0..P-1, negatives P..2P-1, in click
order, value (row, col, global click index), empty = -1); the original's P = max(#pos, #neg, 1)
only adds or removes empty slots, which change nothing.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from skipclick_jax.clicks import eval_next_click
from skipclick_jax.defaults import MASK_THRESHOLD
from skipclick_jax.defaults.evaluation import size_for
from skipclick_jax.model.api import ModelFunctions

Taps = tuple[jax.Array, jax.Array]  # (indices int32 [B, n_out, 2], weights float32 [B, n_out, 2])


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Static settings of the click loop (defaults: the original's NoC protocol)."""

    size: int = 448
    max_clicks: int = 20
    target_iou: float = 0.95
    thresh: float = MASK_THRESHOLD
    flip: bool = True
    points_per_polarity: int = 20

    def __post_init__(self):
        if self.max_clicks > self.points_per_polarity:
            raise ValueError(
                f"max_clicks={self.max_clicks} exceeds points_per_polarity={self.points_per_polarity}"
            )
        self.target_fraction()

    def target_fraction(self) -> tuple[int, int]:
        """target_iou as p/q with q <= 100, so IoU >= target is the exact test q·I >= p·U.

        For IoU = I/U this equals the original's float64 test `I / U >= target_iou`.
        """
        frac = fractions.Fraction(self.target_iou).limit_denominator(100)
        if not math.isclose(float(frac), self.target_iou, rel_tol=0, abs_tol=1e-12):
            raise ValueError(f"target_iou={self.target_iou} is not a fraction with denominator <= 100")
        return frac.numerator, frac.denominator

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, dataset: str) -> Protocol:
        """The protocol of the `eval` config section for `dataset` (its size S from `cfg.sizes`)."""
        return cls(
            size=size_for(cfg, dataset),
            max_clicks=int(cfg.max_clicks),
            target_iou=float(cfg.target_iou),
            thresh=float(cfg.thresh),
            flip=bool(cfg.flip),
            points_per_polarity=int(cfg.points_per_polarity),
        )


# ----------------------------------------------------------------------------- resizing
def _resize(x: jax.Array, taps_h: Taps, taps_w: Taps) -> jax.Array:
    """x [B,H,W,...] -> [B,h',w',...] with per-sample taps, in `skipclick_jax.resize`'s order."""

    def along(y, idx, wts, t, axis):
        shape = [idx.shape[0]] + [1] * (y.ndim - 1)
        shape[axis] = idx.shape[1]
        return jnp.take_along_axis(y, idx[..., t].reshape(shape), axis=axis), wts[..., t].reshape(shape)

    def width(rows):
        out = None
        for t in range(taps_w[0].shape[-1]):
            y, wt = along(rows, *taps_w, t, 2)
            out = y * wt if out is None else out + y * wt
        return out

    out = None
    for t in range(taps_h[0].shape[-1]):
        rows, wt = along(x, *taps_h, t, 1)
        term = width(rows) * wt
        out = term if out is None else out + term
    return out


# ----------------------------------------------------------------------------- the jitted click
def init_state(protocol: Protocol, encode, params, batch: dict[str, jax.Array]) -> dict[str, Any]:
    """Encodes a padded batch and makes its fresh click state (pure; jit with `protocol`, `encode` bound).

    batch: images [B,Hb,Wb,3] float32, gt [B,Hb,Wb] int32 {0,1,-1}, hw [B,2] int32 real sizes,
    active [B] bool (False = filler sample), and taps down_h/down_w [B,S,2] and up_h [B,Hb,2],
    up_w [B,Wb,2] (`*_idx` int32, `*_wts` float32).
    The state holds the batch (minus images and active), `enc` (the encoding, leading dim 2B with
    flip: originals then flips), prob [B,Hb,Wb] float32, not_clicked [B,Hb,Wb] bool, points
    [B,2P,3], n_pos/n_neg/num_clicks [B] int32, done [B] bool, clicks [B,M,3], inter/union [B,M].
    """
    m, p = protocol.max_clicks, protocol.points_per_polarity
    b, hb, wb = batch["gt"].shape
    image = _resize(batch["images"], (batch["down_h_idx"], batch["down_h_wts"]),
                    (batch["down_w_idx"], batch["down_w_wts"]))
    zeros_b = jnp.zeros((b,), jnp.int32)
    return dict(
        {k: v for k, v in batch.items() if k not in ("images", "active")},
        enc=encode(params, jnp.concatenate([image, image[:, :, ::-1]]) if protocol.flip else image),
        prob=jnp.zeros((b, hb, wb), jnp.float32),
        not_clicked=jnp.ones((b, hb, wb), bool),
        points=jnp.full((b, 2 * p, 3), -1, jnp.int32),
        n_pos=zeros_b,
        n_neg=zeros_b,
        done=~batch["active"],
        num_clicks=zeros_b,
        clicks=jnp.full((b, m, 3), -1, jnp.int32),
        inter=jnp.zeros((b, m), jnp.int32),
        union=jnp.zeros((b, m), jnp.int32),
    )


def step(protocol: Protocol, decode, params, state: dict[str, Any]) -> dict[str, Any]:
    """One click for every live (not done) sample of an `init_state` state (pure; jit with
    `protocol`, `decode` bound). A sample is done once its IoU reaches the target or after M clicks;
    its click k (= num_clicks before the step) is recorded at clicks/inter/union[:, k]."""
    s, m, p = protocol.size, protocol.max_clicks, protocol.points_per_polarity
    gt, enc = state["gt"], state["enc"]
    b, hb, wb = gt.shape
    h, w = state["hw"][:, 0], state["hw"][:, 1]
    taps = {k: (state[f"{k}_idx"], state[f"{k}_wts"]) for k in ("down_h", "down_w", "up_h", "up_w")}
    rows = jax.lax.broadcasted_iota(jnp.int32, (b, hb, wb), 1)
    cols = jax.lax.broadcasted_iota(jnp.int32, (b, hb, wb), 2)
    valid = (rows < h[:, None, None]) & (cols < w[:, None, None])
    fg = gt == 1
    counted = (gt != -1) & valid
    iou_num, iou_den = protocol.target_fraction()
    flip = lambda x: x[:, :, ::-1]  # noqa: E731
    denom = jnp.stack([h, w], axis=1).astype(jnp.float32)

    def predict(prob, points):
        prev = _resize(prob[..., None], taps["down_h"], taps["down_w"])[..., 0]
        empty = points[..., 0] < 0
        r = jnp.where(empty, -1, s * points[..., 0])
        c = jnp.where(empty, -1, s * points[..., 1])
        pts = jnp.stack([r, c, points[..., 2]], axis=-1).astype(jnp.float32)
        if protocol.flip:
            c_flip = jnp.where(empty, -1, (s - 1) * w[:, None] - s * points[..., 1])
            pts_flip = jnp.stack([r, c_flip, points[..., 2]], axis=-1).astype(jnp.float32)
            both = decode(params, enc, jnp.concatenate([prev, flip(prev)]),
                          jnp.concatenate([pts, pts_flip]), jnp.concatenate([denom, denom]))
            logits = 0.5 * (both[:b] + flip(both[b:]))
        else:
            logits = decode(params, enc, prev, pts, denom)
        return _resize(jax.nn.sigmoid(logits)[..., None], taps["up_h"], taps["up_w"])[..., 0]

    k, live = state["num_clicks"], ~state["done"]
    row, col, pos = eval_next_click(gt, state["prob"] > protocol.thresh, state["not_clicked"], valid)
    hit = (rows == row[:, None, None]) & (cols == col[:, None, None]) & live[:, None, None]
    slot = jnp.where(pos, state["n_pos"], p + state["n_neg"])
    write = (jnp.arange(2 * p)[None, :] == slot[:, None]) & live[:, None]
    points = jnp.where(write[..., None], jnp.stack([row, col, k], axis=1)[:, None, :], state["points"])
    prob = jnp.where(live[:, None, None], predict(state["prob"], points), state["prob"])
    mask = prob > protocol.thresh
    inter = jnp.sum(mask & fg & counted, axis=(1, 2), dtype=jnp.int32)
    union = jnp.sum((mask | fg) & counted, axis=(1, 2), dtype=jnp.int32)
    record = jnp.stack([row, col, pos.astype(jnp.int32)], axis=1)
    reached = (union > 0) & _at_least(inter, union, iou_num, iou_den)
    at_k = (jnp.arange(m)[None, :] == k[:, None]) & live[:, None]
    return dict(
        state,
        prob=prob,
        not_clicked=state["not_clicked"] & ~hit,
        points=points,
        n_pos=state["n_pos"] + (pos & live),
        n_neg=state["n_neg"] + (~pos & live),
        done=state["done"] | (live & (reached | (k + 1 >= m))),
        num_clicks=k + live,
        clicks=jnp.where(at_k[..., None], record[:, None, :], state["clicks"]),
        inter=jnp.where(at_k, inter[:, None], state["inter"]),
        union=jnp.where(at_k, union[:, None], state["union"]),
    )


def admit(protocol: Protocol, encode, params, state: dict[str, Any], batch: dict[str, jax.Array],
          slots: jax.Array) -> dict[str, Any]:
    """Encodes a new batch of N samples and puts their fresh state into pool rows `slots` [N] int32
    (a slot >= the pool's B drops that sample, e.g. a filler). state: an `init_state` state of B rows."""
    return _put(protocol, state, init_state(protocol, encode, params, batch), slots)


def admit_shared(protocol: Protocol, state: dict[str, Any], batch: dict[str, jax.Array], slots: jax.Array,
                 src: jax.Array) -> dict[str, Any]:
    """`admit` for samples whose image is already encoded in pool rows `src` [N] int32: the
    encodings are copied (read before any row is written), nothing is encoded."""
    enc = jax.tree.map(lambda x: x[_enc_rows(protocol, src, state["gt"].shape[0])], state["enc"])
    return _put(protocol, state, init_state(protocol, lambda params, images: enc, None, batch), slots)


def step_rows(protocol: Protocol, decode, params, state: dict[str, Any], rows: jax.Array) -> dict[str, Any]:
    """`step` on the pool rows `rows` [N] int32 (distinct, < B) only; the other rows are left as
    they are. Lets a partly live pool pay for N slots instead of B."""
    def take(path, x):
        return x[_enc_rows(protocol, rows, state["gt"].shape[0]) if path[0].key == "enc" else rows]

    return _put(protocol, state, step(protocol, decode, params, jax.tree_util.tree_map_with_path(take, state)), rows)


def _enc_rows(protocol: Protocol, rows: jax.Array, b: int) -> jax.Array:
    """Rows [N] of a B-row state -> their rows in `enc` (originals, then flips at B + row)."""
    return jnp.concatenate([rows, rows + b]) if protocol.flip else rows


def _put(protocol: Protocol, state: dict[str, Any], new: dict[str, Any], rows: jax.Array) -> dict[str, Any]:
    """state with rows `rows` [N] replaced by the N rows of `new` (rows >= B are dropped)."""
    b = state["gt"].shape[0]
    rows = jnp.where(rows < b, rows, 2 * b)

    def put(path, pool, fresh):
        return pool.at[_enc_rows(protocol, rows, b) if path[0].key == "enc" else rows].set(fresh, mode="drop")

    return jax.tree_util.tree_map_with_path(put, state, new)


def run_batch(protocol: Protocol, encode, decode, params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The whole click loop for one padded batch (pure; jit with `protocol`, `encode`, `decode` bound):
    `init_state`, then `step` until every sample is done. batch as in `init_state`.
    Returns clicks [B,M,3] int32 (row, col, is_positive; -1 if not run), inter/union [B,M] int32
    pixel counts, num_clicks [B] int32, mask [B,Hb,Wb] bool (final prediction).
    """
    out = jax.lax.while_loop(lambda c: ~jnp.all(c["done"]), functools.partial(step, protocol, decode, params),
                             init_state(protocol, encode, params, batch))
    return dict(clicks=out["clicks"], inter=out["inter"], union=out["union"],
                num_clicks=out["num_clicks"], mask=out["prob"] > protocol.thresh)


def _at_least(inter: jax.Array, union: jax.Array, p: int, q: int) -> jax.Array:
    """inter / union >= p / q exactly in int32 without overflow (union = q·a + r, r < q)."""
    d = jnp.clip(inter - p * (union // q), -1, p)
    return q * d >= p * (union % q)


@functools.cache
def jitted_functions(num_devices: int) -> dict[str, Callable]:
    """`run_batch`, `step`, `step_rows`, `admit`, `admit_shared` and `_empty_pool` jitted (protocol
    and model functions static; the pool is donated); the batch axis is split over a 'data' mesh if
    > 1 device."""
    if num_devices == 1:
        shard = lambda n, params=True: {}  # noqa: E731
    else:
        mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.local_devices())
        data, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
        shard = lambda n, params=True: dict(  # noqa: E731
            in_shardings=(replicated,) * params + (data,) * n, out_shardings=data)
    fns = dict(
        run_batch=jax.jit(run_batch, static_argnums=(0, 1, 2), **shard(1)),
        step=jax.jit(step, static_argnums=(0, 1), donate_argnums=3, **shard(1)),
        step_rows=jax.jit(step_rows, static_argnums=(0, 1), donate_argnums=3, **shard(2)),
        admit=jax.jit(admit, static_argnums=(0, 1), donate_argnums=3, **shard(3)),
        admit_shared=jax.jit(admit_shared, static_argnums=0, donate_argnums=1, **shard(4, params=False)),
        empty_pool=jax.jit(_empty_pool, static_argnums=(0, 1), **shard(1)),
    )
    if num_devices > 1 and jax.process_count() > 1:
        fns = {name: functools.partial(_host_inputs_on_device, fn) for name, fn in fns.items()}
    return fns


def _host_inputs_on_device(jitted, *args):
    """jitted(*args) with numpy inputs moved to a local device first: with several processes, jit
    takes no numpy input for a sharded parameter (each process runs its own samples here)."""
    return jitted(*jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else x, args))


def _empty_pool(protocol: Protocol, encode, params, batch: dict[str, jax.Array]) -> dict[str, Any]:
    """A pool of inactive slots shaped like `init_state(batch)`, made without encoding."""
    struct = jax.eval_shape(functools.partial(init_state, protocol, encode), params, batch)
    pool = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), struct)
    return dict(pool, hw=jnp.ones_like(pool["hw"]), done=jnp.ones_like(pool["done"]))


def make_runner(model: ModelFunctions, protocol: Protocol) -> Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]:
    """batch -> outputs of `run_batch`, jitted over all devices (compiled once per bucket shape)."""
    jitted = jitted_functions(jax.local_device_count())["run_batch"]
    return lambda batch: jitted(protocol, model.encode, model.decode, model.params, batch)
