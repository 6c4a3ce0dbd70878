"""grain training pipeline: random record choice, augmentation, click sampling (docs/design/training.md#data).

As in RITM's `ISDataset` with `epoch_len > 0`, a sample ignores its position and draws a record
uniformly with replacement. Here every random choice of global sample `i` (record, stuff,
augmentation, clicks) comes from `np.random.default_rng([seed, i])`, so the stream depends only on
the seed: not on worker count, threads, or the number of processes (shard_count) that split each
global batch.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any

import grain
import jax
from absl import flags
import numpy as np

from skipclick_jax.data.augment import Augmenter
from skipclick_jax.data.points_sampler import MultiPointSampler, select_stuff


@dataclasses.dataclass(frozen=True)
class TrainSample:
    """Maps a global sample index to a training example (picklable).

    Returns {'image': uint8 [S, S, 3], 'points': float32 [2N, 3], 'gt': float32 [S, S]}; gt is
    -1 on a record's ignore regions (its optional 'ignore' bool [H, W]) outside the target.
    """

    source: Any
    seed: int
    augmenter: Augmenter = Augmenter()
    sampler: MultiPointSampler = MultiPointSampler()
    stuff_prob: float = 0.30

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        record = self.source[int(rng.integers(len(self.source)))]
        objects, parents = select_stuff(record['objects'], record['parents'],
                                        record['num_instance_masks'], self.stuff_prob, rng)
        image, layers, objects, parents, ignore = self.augmenter.augment(
            record['image'], record['layers'], objects, parents, rng, ignore=record.get('ignore'))
        points, gt = self.sampler(layers, objects, parents, rng)
        if ignore is not None:
            gt[ignore & (gt == 0)] = -1
        return {'image': image, 'points': points, 'gt': gt}


@dataclasses.dataclass(frozen=True)
class _ShardSample:
    """This process's sample `position` -> TrainSample of its global index, where global batch t
    is the concatenation of every shard's batch t."""

    sample: TrainSample
    batch_size: int
    shard_index: int
    shard_count: int

    def __call__(self, position: int, _) -> dict[str, np.ndarray]:
        step, offset = divmod(position, self.batch_size)
        return self.sample((step * self.shard_count + self.shard_index) * self.batch_size + offset)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: signal 0 only tells existence
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _watch_parent(main_pid: int, parent: int, poll_s: float) -> None:
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent or not _alive(main_pid):
            os._exit(1)  # no cleanup to wait for: the process that reads our output is gone


@dataclasses.dataclass(frozen=True)
class ExitWithParent:
    """grain `worker_init_fn`: the worker ends within `poll_s` of the training process (`main_pid`)
    or its own parent ending, whatever ends it (SIGKILL and SIGTERM run no cleanup in the parent,
    and grain's workers would otherwise live on, holding the resource tracker alive too; that
    exits by itself once every process holding its pipe is gone). A daemon thread polls
    getppid() and /proc/<main_pid>: no signal handler or thread semantics of PR_SET_PDEATHSIG
    (which fires when the creating *thread* ends) are involved."""

    main_pid: int
    poll_s: float = 0.5

    def __call__(self, worker_index: int, worker_count: int) -> None:
        threading.Thread(target=_watch_parent, args=(self.main_pid, os.getppid(), self.poll_s),
                         daemon=True, name="exit-with-parent").start()


def train_dataset(source, *, crop_size: int, batch_size: int, seed: int, num_workers: int = 0,
                  epoch_len: int = 30000, num_epochs: int | None = None,
                  min_object_area: int = 1000, keep_background_prob: float = 0.05,
                  stuff_prob: float = 0.30, sampler: MultiPointSampler = MultiPointSampler(),
                  shard_index: int = 0, shard_count: int = 1,
                  read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """Batches {'image': uint8 [B,S,S,3], 'points': float32 [B,2N,3], 'gt': float32 [B,S,S]}.

    An epoch is epoch_len // (batch_size · shard_count) global batches (drop_remainder, as
    RITM's 30000 // 32 = 937). This process yields rows [shard_index·B, (shard_index+1)·B) of each
    global batch. The iterator's get_state()/set_state() resume the exact stream.

    Args:
      source: random-access records (len, __getitem__, picklable) as produced by
        `load_train_source`: {'image', 'layers', 'objects', 'parents', 'num_instance_masks', ...}.
      crop_size: S.
      batch_size: B, per-process batch size.
      seed: stream seed.
      num_workers: grain worker processes (0 = in-process).
      epoch_len: samples per epoch before dropping the remainder.
      num_epochs: epochs to yield; None repeats forever.
      min_object_area, keep_background_prob, stuff_prob: docs/design/training.md#data.
      sampler: the click sampler (docs/design/training.md#multipointsampler defaults).
      shard_index, shard_count: this process's slice of each global batch, normally
        jax.process_index() and jax.process_count() (see `make_global_batch`).
      read_options: in-process reading threads/buffer; default 1 thread, 2 batches buffered.
    """
    if len(source) == 0:
        raise ValueError('source must contain at least one record')
    if seed < 0:
        raise ValueError(f'seed must be non-negative, got {seed}')
    if batch_size < 1:
        raise ValueError(f'batch_size must be positive, got {batch_size}')
    if not 0 <= shard_index < shard_count:
        raise ValueError(f'shard_index must be in [0, shard_count={shard_count}), '
                         f'got {shard_index}')
    if num_workers < 0:
        raise ValueError(f'num_workers must be >= 0, got {num_workers}')
    steps = epoch_len // (batch_size * shard_count)
    if steps < 1:
        raise ValueError(f'epoch_len={epoch_len} is smaller than one global batch '
                         f'({batch_size}·{shard_count})')
    sample = TrainSample(
        source=source, seed=seed, sampler=sampler, stuff_prob=stuff_prob,
        augmenter=Augmenter(crop_size=crop_size, min_object_area=min_object_area,
                            keep_background_prob=keep_background_prob))
    ds = (grain.MapDataset.range(steps * batch_size)
          .repeat(num_epochs)
          .map_with_index(_ShardSample(sample, batch_size, shard_index, shard_count))
          .batch(batch_size, drop_remainder=True)
          .to_iter_dataset(read_options or grain.ReadOptions(num_threads=1,
                                                              prefetch_buffer_size=2)))
    if num_workers:
        # grain's worker start-up reads an absl flag (worker profiling, enabled by jaxlib's profiler
        # hooks); outside absl.app nothing parses flags, so accept their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                            worker_init_fn=ExitWithParent(os.getpid()))
    return ds


def make_global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding):
    """Assemble this process's batch rows into global jax.Arrays laid out by sharding.

    Every leaf is this process's contiguous slice of the global batch along axis 0 (what
    `train_dataset(..., shard_index=jax.process_index(), shard_count=jax.process_count())` yields
    for a data-parallel sharding over a mesh whose processes own consecutive batch rows).
    """
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
