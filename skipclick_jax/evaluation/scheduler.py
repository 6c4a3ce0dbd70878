"""The host side of the NoC evaluation: samples -> padded shape buckets -> pools of slots on the
devices, clicked with `evaluation.protocol`'s jitted functions (continuous batching).

Each image (and its flip) is encoded once, when it enters a slot of a fixed pool (`admit`; further
instances of the same image copy that encoding, `admit_shared`); `step` then runs only the
per-click path for the pool (`step_rows` for its live part when it is partly empty), and slots
whose sample reached the target IoU or `max_clicks` are refilled with the next samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np

from skipclick_jax import resize
from skipclick_jax.evaluation.protocol import Protocol, jitted_functions
from skipclick_jax.images import as_float_image
from skipclick_jax.model.api import ModelFunctions


def _host_taps(n_in: int, n_out: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """align_corners=True taps n_in -> n_out, zero-padded to `length` output rows."""
    idx, wts = resize.linear_taps(n_in, n_out, True)
    pad = ((0, length - n_out), (0, 0))
    return np.pad(idx, pad), np.pad(wts, pad)


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

    def __init__(self, model: ModelFunctions, protocol: Protocol, shape: tuple[int, int], size: int):
        self.model, self.protocol, self.shape = model, protocol, shape
        self.fns = jitted_functions(jax.local_device_count())
        self.items: list[_Item | None] = [None] * size
        self.encoded: list[tuple[str | None, np.ndarray] | None] = [None] * size
        self.state = self.fns["empty_pool"](protocol, model.encode, model.params,
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
            self.state = self.fns["admit"](self.protocol, self.model.encode, self.model.params,
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
            self.state = self.fns["step"](p, self.model.decode, self.model.params, self.state)
        else:
            rows = np.array(live + free[:n - len(live)], np.int32)
            self.state = self.fns["step_rows"](p, self.model.decode, self.model.params, self.state, rows)
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
    model: ModelFunctions,
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
        return idle.pop(shape) if shape in idle else _Pool(model, protocol, shape, batch_size)

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
