"""The NoC click loop under `jax.jit` (spec §5.2-5.4), batched over images of different sizes.

Images are zero-padded at the bottom/right into shape buckets; each sample carries its real size
(h, w), from which the validity mask and per-sample resize taps are made. Padding never changes a
resize (its taps have weight 0), a distance (`edt` treats it as the original's zero border), a click
or an IoU (it is ignored). Per batch, the images (and their flips) are encoded once; the while loop
then runs only the per-click path until every sample reached the target IoU or `max_clicks`.

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


def skipclick_predictor(model) -> Predictor:
    """The SkipClick adapter: an `nnx` SkipClick model -> Predictor (dropout off)."""
    from flax import nnx

    from skipclick_jax.model import decode_fn, encode_fn

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


# ----------------------------------------------------------------------------- the jitted loop
def run_batch(protocol: Protocol, encode, decode, params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The whole click loop for one padded batch (pure; jit with `protocol`, `encode`, `decode` bound).

    batch: images [B,Hb,Wb,3] float32, gt [B,Hb,Wb] int32 {0,1,-1}, hw [B,2] int32 real sizes,
    active [B] bool (False = filler sample), and taps down_h/down_w [B,S,2] and up_h [B,Hb,2],
    up_w [B,Wb,2] (`*_idx` int32, `*_wts` float32).
    Returns clicks [B,M,3] int32 (row, col, is_positive; -1 if not run), inter/union [B,M] int32
    pixel counts, num_clicks [B] int32, mask [B,Hb,Wb] bool (final prediction).
    """
    s, m, p = protocol.size, protocol.max_clicks, protocol.points_per_polarity
    gt = batch["gt"]
    b, hb, wb = gt.shape
    h, w = batch["hw"][:, 0], batch["hw"][:, 1]
    taps = {k: (batch[f"{k}_idx"], batch[f"{k}_wts"]) for k in ("down_h", "down_w", "up_h", "up_w")}
    rows = jax.lax.broadcasted_iota(jnp.int32, (b, hb, wb), 1)
    cols = jax.lax.broadcasted_iota(jnp.int32, (b, hb, wb), 2)
    valid = (rows < h[:, None, None]) & (cols < w[:, None, None])
    fg = gt == 1
    counted = (gt != -1) & valid
    iou_num, iou_den = protocol.target_fraction()

    image = _resize(batch["images"], taps["down_h"], taps["down_w"])
    flip = lambda x: x[:, :, ::-1]  # noqa: E731
    enc = encode(params, jnp.concatenate([image, flip(image)]) if protocol.flip else image)
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

    def cond(c):
        return (c["k"] < m) & ~jnp.all(c["done"])

    def body(c):
        k, live = c["k"], ~c["done"]
        row, col, pos = eval_next_click(gt, c["prob"] > protocol.thresh, c["not_clicked"], valid)
        hit = (rows == row[:, None, None]) & (cols == col[:, None, None]) & live[:, None, None]
        slot = jnp.where(pos, c["n_pos"], p + c["n_neg"])
        write = (jnp.arange(2 * p)[None, :] == slot[:, None]) & live[:, None]
        click = jnp.stack([row, col, jnp.broadcast_to(k, (b,))], axis=1)
        points = jnp.where(write[..., None], click[:, None, :], c["points"])
        prob = jnp.where(live[:, None, None], predict(c["prob"], points), c["prob"])
        mask = prob > protocol.thresh
        inter = jnp.sum(mask & fg & counted, axis=(1, 2), dtype=jnp.int32)
        union = jnp.sum((mask | fg) & counted, axis=(1, 2), dtype=jnp.int32)
        record = jnp.stack([row, col, pos.astype(jnp.int32)], axis=1)
        reached = (union > 0) & _at_least(inter, union, iou_num, iou_den)
        return dict(
            k=k + 1,
            prob=prob,
            not_clicked=c["not_clicked"] & ~hit,
            points=points,
            n_pos=c["n_pos"] + (pos & live),
            n_neg=c["n_neg"] + (~pos & live),
            done=c["done"] | (live & reached),
            num_clicks=c["num_clicks"] + live,
            clicks=c["clicks"].at[:, k].set(jnp.where(live[:, None], record, -1)),
            inter=c["inter"].at[:, k].set(jnp.where(live, inter, 0)),
            union=c["union"].at[:, k].set(jnp.where(live, union, 0)),
        )

    zeros_b = jnp.zeros((b,), jnp.int32)
    init = dict(
        k=jnp.int32(0),
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
    out = jax.lax.while_loop(cond, body, init)
    return dict(clicks=out["clicks"], inter=out["inter"], union=out["union"],
                num_clicks=out["num_clicks"], mask=out["prob"] > protocol.thresh)


def _at_least(inter: jax.Array, union: jax.Array, p: int, q: int) -> jax.Array:
    """inter / union >= p / q exactly in int32 without overflow (union = q·a + r, r < q)."""
    d = jnp.clip(inter - p * (union // q), -1, p)
    return q * d >= p * (union % q)


@functools.cache
def _jitted_run_batch(num_devices: int):
    """`run_batch` jitted (protocol, encode, decode static); batch split over a 'data' mesh if > 1."""
    if num_devices == 1:
        return jax.jit(run_batch, static_argnums=(0, 1, 2))
    mesh = jax.make_mesh((num_devices,), ("data",))
    data = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(run_batch, static_argnums=(0, 1, 2), in_shardings=(replicated, data), out_shardings=data)


def make_runner(predictor: Predictor, protocol: Protocol) -> Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]:
    """batch -> outputs of `run_batch`, jitted over all devices (compiled once per bucket shape)."""
    jitted = _jitted_run_batch(jax.device_count())
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
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255)  # ToTensor
    return image.astype(np.float32)


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


def run_samples(
    predictor: Predictor,
    samples: Iterable[dict],
    protocol: Protocol,
    *,
    batch_size: int = 8,
    bucket: int = 64,
    keep_masks: int = 0,
    on_done: Callable[[int], None] | None = None,
) -> list[dict]:
    """Evaluates every sample; returns per-sample results in input order.

    Samples are grouped by padded shape (`bucket_dim` of height and width) into batches of
    `batch_size` (rounded up to a multiple of the device count); the partly filled buckets left
    at the end are merged into as few batches as possible.

    Each result: {'id', 'height', 'width', 'clicks': [[row, col, is_positive], ...],
    'inter': [...], 'union': [...]} (pixel counts per click run), plus 'mask' (final prediction,
    bool [H,W]) for the first `keep_masks` samples. `on_done(n)` reports n finished samples.
    """
    runner = make_runner(predictor, protocol)
    batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
    results: dict[int, dict] = {}
    queues: dict[tuple[int, int], list[tuple[int, dict]]] = {}

    def run(items, shape):
        out = jax.device_get(runner(make_batch([x for _, x in items], protocol, shape, batch_size)))
        for j, (index, sample) in enumerate(items):
            n = int(out["num_clicks"][j])
            h, w = np.shape(sample["gt"])
            res = dict(
                id=sample["id"], height=h, width=w,
                clicks=[[int(r), int(c), bool(q)] for r, c, q in out["clicks"][j, :n]],
                inter=out["inter"][j, :n].tolist(), union=out["union"][j, :n].tolist(),
            )
            if index < keep_masks:
                res["mask"] = out["mask"][j, :h, :w]
            results[index] = res
        if on_done is not None:
            on_done(len(items))

    count = 0
    for count, sample in enumerate(_with_ids(samples), start=1):
        h, w = np.shape(sample["gt"])
        shape = (bucket_dim(h, bucket), bucket_dim(w, bucket))
        queues.setdefault(shape, []).append((count - 1, sample))
        if len(queues[shape]) == batch_size:
            run(queues.pop(shape), shape)
    # Leftovers of all buckets share batches (smallest first), padded to the batch's largest bucket.
    leftovers = [(shape, item) for shape in sorted(queues, key=lambda hw: hw[0] * hw[1]) for item in queues[shape]]
    for start in range(0, len(leftovers), batch_size):
        chunk = leftovers[start:start + batch_size]
        shape = tuple(max(hw[d] for hw, _ in chunk) for d in (0, 1))
        run([item for _, item in chunk], shape)
    return [results[i] for i in range(count)]


def _with_ids(samples: Iterable[dict]) -> Iterator[dict]:
    for i, sample in enumerate(samples):
        if "gt" not in sample or "image" not in sample:
            raise KeyError(f"sample {i} lacks 'image' or 'gt' (keys: {sorted(sample)})")
        yield sample if "id" in sample else {**sample, "id": str(i)}
