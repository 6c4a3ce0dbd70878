"""The NoC click loop under `jax.jit` (docs/design/evaluation.md#protocol), batched over images of different sizes.

Images are zero-padded at the bottom/right into shape buckets; each sample carries its real size
(h, w), from which the validity mask and per-sample resize taps are made. Padding never changes a
resize (its taps have weight 0), a distance (`edt` treats it as the original's zero border), a click
or an IoU (it is ignored). Each image (and its flip) is encoded once, when it enters a slot of a
fixed pool (`admit`; further instances of the same image copy that encoding, `admit_shared`);
`step` then runs only the per-click path for the pool (`step_rows` for its live part when it is
partly empty), and slots whose sample reached the target IoU or `max_clicks` are refilled with
the next samples (continuous batching). `run_batch` is the same click on one batch under a while
loop, until all are done.

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
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from skipclick_jax import resize
from skipclick_jax.clicks import eval_next_click
from skipclick_jax.evaluation.defaults import size_for
from skipclick_jax.images import as_float_image

Taps = tuple[jax.Array, jax.Array]  # (indices int32 [B, n_out, 2], weights float32 [B, n_out, 2])


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A click model as pure functions of a parameter pytree (passed to jit as an argument).

    encode(params, images [N,S,S,3] float32 in [0,1]) -> encoding (pytree with leading dim N);
    decode(params, encoding, prev_prob [N,S,S], points [N,2P,3], point_denom [N,2]) -> logits [N,S,S].
    """

    encode: Callable[..., Any]
    decode: Callable[..., jax.Array]
    params: Any


def skipclick_predictor(model, dtype: str | None = None, attention: str | None = None) -> Predictor:
    """The SkipClick adapter: an `nnx` SkipClick model -> Predictor (dropout off), computing in
    `dtype` with `attention` (None: the model's own settings; see `SkipClick.set_precision`)."""
    from flax import nnx

    from skipclick_jax.model import decode_fn, encode_fn

    if dtype or attention:
        model = nnx.clone(model)
        model.set_precision(dtype or None, attention or None)
    graphdef, state = nnx.split(model)
    return Predictor(encode_fn(graphdef), decode_fn(graphdef), state)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Static settings of the click loop (defaults: the original's NoC protocol)."""

    size: int = 448
    max_clicks: int = 20
    target_iou: float = 0.95
    thresh: float = 0.49
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


def _host_taps(n_in: int, n_out: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """align_corners=True taps n_in -> n_out, zero-padded to `length` output rows."""
    idx, wts = resize.linear_taps(n_in, n_out, True)
    pad = ((0, length - n_out), (0, 0))
    return np.pad(idx, pad), np.pad(wts, pad)


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
def _jitted(num_devices: int) -> dict[str, Callable]:
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


def make_runner(predictor: Predictor, protocol: Protocol) -> Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]:
    """batch -> outputs of `run_batch`, jitted over all devices (compiled once per bucket shape)."""
    jitted = _jitted(jax.local_device_count())["run_batch"]
    return lambda batch: jitted(protocol, predictor.encode, predictor.decode, predictor.params, batch)


# ----------------------------------------------------------------------------- host side
def bucket_dim(n: int, bucket: int) -> int:
    """Padded size of a dimension n: a multiple of `bucket` up to 8·bucket, then of coarser
    power-of-two multiples (at most 8 buckets per octave, so few shapes get compiled)."""
    if n < 1 or bucket < 1:
        raise ValueError(f"bucket_dim: need n >= 1 and bucket >= 1, got n={n}, bucket={bucket}")
    step = bucket * 2 ** max(0, math.ceil(math.log2(n / (8 * bucket))))
    return -(-n // step) * step


def _as_float_image(image: np.ndarray, sample_id: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"sample {sample_id!r}: image must be [H,W,3], got shape {image.shape}")
    return as_float_image(image, f"sample {sample_id!r}: image")  # uint8: ToTensor


def make_batch(samples: list[dict], protocol: Protocol, shape: tuple[int, int],
               batch_size: int) -> dict[str, np.ndarray]:
    """Pads `samples` ({'id', 'image' [H,W,3], 'gt' [H,W]}) into one bucket `shape`; fills up to
    `batch_size` with inactive samples. Returns the numpy batch of `run_batch`."""
    hb, wb = shape
    s = protocol.size
    out = dict(
        images=np.zeros((batch_size, hb, wb, 3), np.float32),
        gt=np.full((batch_size, hb, wb), -1, np.int32),
        hw=np.ones((batch_size, 2), np.int32),
        active=np.zeros((batch_size,), bool),
    )
    sizes = [(1, 1)] * batch_size
    for i, sample in enumerate(samples):
        gt = np.asarray(sample["gt"])
        image = _as_float_image(sample["image"], sample["id"])
        if gt.shape != image.shape[:2]:
            raise ValueError(f"sample {sample['id']!r}: gt shape {gt.shape} != image shape {image.shape[:2]}")
        h, w = gt.shape
        if h > hb or w > wb:
            raise ValueError(f"sample {sample['id']!r}: size {h}x{w} exceeds the bucket {hb}x{wb}")
        out["images"][i, :h, :w] = image
        out["gt"][i, :h, :w] = gt
        out["hw"][i] = (h, w)
        out["active"][i] = True
        sizes[i] = (h, w)
    plans = dict(down_h=lambda h, w: (h, s, s), down_w=lambda h, w: (w, s, s),
                 up_h=lambda h, w: (s, h, hb), up_w=lambda h, w: (s, w, wb))
    for name, plan in plans.items():
        taps = [_host_taps(*plan(h, w)) for h, w in sizes]
        out[f"{name}_idx"] = np.stack([t[0] for t in taps])
        out[f"{name}_wts"] = np.stack([t[1] for t in taps])
    return out


_Item = tuple[int, dict]  # (input index, sample)
_MAX_IDLE_POOLS = 2


def _padded(n: int, size: int) -> int:
    """A batch for n of a pool's `size` slots: d·2^k >= n (d = device count) or `size`, so that
    few batch sizes get compiled."""
    d = jax.local_device_count()
    return min(size, d * 2 ** max(0, math.ceil(math.log2(n / d))))


def _image_key(sample: dict) -> str | None:
    """Samples with equal keys and equal images share one encoding: `image_key` if given, else the
    id up to its last '#' ('<image stem>#<instance>'), else None (never shared)."""
    if "image_key" in sample:
        return sample["image_key"]
    return sample["id"].rsplit("#", 1)[0] if "#" in sample["id"] else None


def _same_image(a: tuple[str | None, np.ndarray] | None, b: tuple[str | None, np.ndarray]) -> bool:
    """Whether two (image key, image) pairs name one image (a key of None matches nothing)."""
    return a is not None and a[0] is not None and a[0] == b[0] and np.array_equal(a[1], b[1])


class _Pool:
    """`size` slots of one bucket `shape` on the devices (a `step` state), the item in each slot
    and, per slot, the (key, image) whose encoding its `enc` rows hold (kept after the item ends)."""

    def __init__(self, predictor: Predictor, protocol: Protocol, shape: tuple[int, int], size: int):
        self.predictor, self.protocol, self.shape = predictor, protocol, shape
        self.fns = _jitted(jax.local_device_count())
        self.items: list[_Item | None] = [None] * size
        self.encoded: list[tuple[str | None, np.ndarray] | None] = [None] * size
        self.state = self.fns["empty_pool"](protocol, predictor.encode, predictor.params,
                                            make_batch([], protocol, shape, size))

    @property
    def free(self) -> list[int]:
        return [j for j, item in enumerate(self.items) if item is None]

    @property
    def live(self) -> int:
        return len(self.items) - len(self.free)

    def admit(self, items: list[_Item]) -> None:
        """Puts `items` (at most `len(self.free)`) into free slots. An image already encoded in a
        row of the pool, or earlier in `items`, is not encoded again: its encoding is copied."""
        if not items:
            return
        images = [(_image_key(sample), sample["image"]) for _, sample in items]
        src = [next((j for j, enc in enumerate(self.encoded) if _same_image(enc, im)), None) for im in images]
        free = self.free
        slots = [None] * len(items)
        for i, row in enumerate(src):  # the first item wanting a free row's encoding takes that row
            if row in free and row not in slots:
                slots[i] = row
        spare = iter(j for j in free if j not in src)
        slots = [j if j is not None else next(spare) for j in slots]
        for i, image in enumerate(images):  # an image first seen in this call: copy from its first row
            if src[i] is None:
                src[i] = next((slots[j] for j in range(i) if src[j] is None and _same_image(images[j], image)), None)
        for slot, item, image in zip(slots, items, images):
            self.items[slot], self.encoded[slot] = item, image
        fresh = [i for i, row in enumerate(src) if row is None]
        shared = [i for i, row in enumerate(src) if row is not None]
        if fresh:  # never writes a row a shared item reads from: those rows stay with their sharers
            rows, batch = self._batch([items[i] for i in fresh], [slots[i] for i in fresh])
            self.state = self.fns["admit"](self.protocol, self.predictor.encode, self.predictor.params,
                                           self.state, batch, rows)
        if shared:
            rows, batch = self._batch([items[i] for i in shared], [slots[i] for i in shared])
            from_rows = np.zeros_like(rows)
            from_rows[:len(shared)] = [src[i] for i in shared]
            self.state = self.fns["admit_shared"](self.protocol, self.state, batch, rows, from_rows)

    def _batch(self, items: list[_Item], slots: list[int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Slots (padded with the dropped row `size`) and the `_padded` batch of `items`."""
        size = len(self.items)
        n = _padded(len(items), size)
        padded = np.full((n,), size, np.int32)
        padded[:len(items)] = slots
        return padded, make_batch([sample for _, sample in items], self.protocol, self.shape, n)

    def step(self, keep_masks: int) -> list[tuple[int, dict]]:
        """One click for every live slot (on a `_padded` subset of the pool); empties the slots
        that finished -> [(index, result)]."""
        p, free = self.protocol, self.free
        live = [j for j, item in enumerate(self.items) if item is not None]
        n = _padded(len(live), len(self.items))
        if n == len(self.items):
            self.state = self.fns["step"](p, self.predictor.decode, self.predictor.params, self.state)
        else:
            rows = np.array(live + free[:n - len(live)], np.int32)
            self.state = self.fns["step_rows"](p, self.predictor.decode, self.predictor.params, self.state, rows)
        done = jax.device_get(self.state["done"])
        finished = [j for j, item in enumerate(self.items) if item is not None and done[j]]
        if not finished:
            return []
        out = jax.device_get({k: self.state[k] for k in ("clicks", "inter", "union", "num_clicks")})
        results = []
        for j in finished:
            (index, sample), k = self.items[j], int(out["num_clicks"][j])
            h, w = np.shape(sample["gt"])
            res = dict(id=sample["id"], height=h, width=w,
                       clicks=[[int(r), int(c), bool(q)] for r, c, q in out["clicks"][j, :k]],
                       inter=out["inter"][j, :k].tolist(), union=out["union"][j, :k].tolist())
            if index < keep_masks:
                res["mask"] = np.asarray(self.state["prob"][j, :h, :w] > p.thresh)
            results.append((index, res))
            self.items[j] = None
        return results


def default_batch_size() -> int:
    """Slots per pool when none are asked for: 1 per device on CPU, 8 per device elsewhere.

    On CPU a larger batch only adds cache misses (docs/performance.md#evaluation-engine),
    while accelerators need the batch to fill their cores.
    """
    return jax.local_device_count() * (1 if jax.default_backend() == "cpu" else 8)


def run_samples(
    predictor: Predictor,
    samples: Iterable[dict],
    protocol: Protocol,
    *,
    batch_size: int | None = None,
    bucket: int = 64,
    keep_masks: int = 0,
    on_done: Callable[[int], None] | None = None,
) -> list[dict]:
    """Evaluates every sample with continuous batching; returns per-sample results in input order.

    Samples are queued by padded shape (`bucket_dim` of height and width). Each shape has a pool
    of `batch_size` slots (None: `default_batch_size()`; rounded up to a multiple of the device
    count); `step` runs one click for all slots, and every slot whose sample finished is refilled
    at once with the next queued sample of that shape (`admit` encodes only the new images). A
    pool runs while all its slots can be kept busy, else waits (keeping its live slots) while the
    input is read on. At the end, the leftovers go into free slots of pools they fit in (smallest
    leftovers first) or into one new pool padded to their largest size, and partly empty pools
    click only their live slots.

    Instances of one image (same `image_key`, by default the id up to its last '#', and equal
    image arrays) share its encoding when they meet in a pool (the last emptied pools are kept
    for this), so a dataset with k instances per image encodes each image once, not k times.

    Each result: {'id', 'height', 'width', 'clicks': [[row, col, is_positive], ...],
    'inter': [...], 'union': [...]} (pixel counts per click run), plus 'mask' (final prediction,
    bool [H,W]) for the first `keep_masks` samples. `on_done(n)` reports n finished samples.
    """
    if batch_size is None:
        batch_size = default_batch_size()
    if batch_size < 1:
        raise ValueError(f"run_samples: batch_size must be >= 1 or None, got {batch_size}")
    batch_size = -(-batch_size // jax.local_device_count()) * jax.local_device_count()
    results: dict[int, dict] = {}
    queues: dict[tuple[int, int], list[_Item]] = {}
    pools: dict[tuple[int, int], _Pool] = {}
    idle: dict[tuple[int, int], _Pool] = {}  # emptied pools, most recent last: their encodings may serve again

    def get_pool(shape):
        return idle.pop(shape) if shape in idle else _Pool(predictor, protocol, shape, batch_size)

    def step(shape):
        finished = pools[shape].step(keep_masks)
        results.update(finished)
        if finished and on_done is not None:
            on_done(len(finished))
        if not pools[shape].live:
            idle[shape] = pools.pop(shape)
            while len(idle) > _MAX_IDLE_POOLS:
                del idle[next(iter(idle))]

    def ready():
        """A shape whose pool can keep every slot busy, else None."""
        for shape, queue in queues.items():
            if len(queue) + (pools[shape].live if shape in pools else 0) >= batch_size:
                return shape
        return None

    count = 0
    stream = enumerate(_with_ids(samples))
    while True:
        if (shape := ready()) is not None:
            if shape not in pools:
                pools[shape] = get_pool(shape)
            free = len(pools[shape].free)
            pools[shape].admit(queues[shape][:free])
            del queues[shape][:free]
            step(shape)
        elif (item := next(stream, None)) is not None:
            count += 1
            h, w = np.shape(item[1]["gt"])
            queues.setdefault((bucket_dim(h, bucket), bucket_dim(w, bucket)), []).append(item)
        else:
            break

    def fits(shape, pool_shape):
        return shape[0] <= pool_shape[0] and shape[1] <= pool_shape[1]

    leftovers = [(shape, item) for shape in sorted(queues, key=lambda hw: hw[0] * hw[1]) for item in queues[shape]]
    while leftovers or pools:
        if any(not any(fits(shape, p) for p in pools) for shape, _ in leftovers):
            big = tuple(max(hw[d] for hw, _ in leftovers) for d in (0, 1))
            pools[big] = get_pool(big)
        for pool_shape, pool in sorted(pools.items(), key=lambda kv: kv[0][0] * kv[0][1]):
            take = [i for i, (shape, _) in enumerate(leftovers) if fits(shape, pool_shape)][:len(pool.free)]
            pool.admit([leftovers[i][1] for i in take])
            leftovers = [x for i, x in enumerate(leftovers) if i not in take]
        for shape in list(pools):
            step(shape)
    return [results[i] for i in range(count)]


def _with_ids(samples: Iterable[dict]) -> Iterator[dict]:
    for i, sample in enumerate(samples):
        if "gt" not in sample or "image" not in sample:
            raise KeyError(f"sample {i} lacks 'image' or 'gt' (keys: {sorted(sample)})")
        yield sample if "id" in sample else {**sample, "id": str(i)}
