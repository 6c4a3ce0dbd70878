"""Orbax checkpoints of a training run: async save, keep last N, resume from the latest good step.

Layout under `<workdir>/checkpoints/`:
  config.json                 the experiment config (config_lib.config_from_json reads it)
  <step>/params/              full model state (trainable + frozen) as nnx.to_pure_dict, StandardSave
  <step>/train/               {'step', 'opt_state', 'rng'} (StandardSave)
  <step>/dataset/             grain iterator state, process_<i>-of-<n>.json
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from skipclick_jax import config_lib
from skipclick_jax.train.state import TrainState, merge_dicts, pick

log = logging.getLogger(__name__)


class _IteratorSnapshot:
    """The data iterator's state taken at save time (the async save writes it later)."""

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state(), indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    """Saves/restores (TrainState, frozen params, data iterator) under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str | pathlib.Path, *, keep: int, config: ml_collections.ConfigDict):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("params", "train", "dataset"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )
        if jax.process_index() == 0:
            (self.directory / "config.json").write_text(config_lib.config_to_json(config))

    def save(self, state: TrainState, frozen: dict[str, Any], iterator) -> None:
        """Starts an async save of step `state.step` (returns before the files are written)."""
        train = dict(step=state.step, opt_state=state.opt_state, rng=state.rng)
        self.manager.save(
            int(state.step),
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(merge_dicts(state.params, frozen)),
                train=ocp.args.StandardSave(train),
                dataset=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator)),
            ),
        )

    def restore_latest(
        self, state: TrainState, frozen: dict[str, Any], iterator
    ) -> tuple[TrainState, dict[str, Any]] | None:
        """Loads the newest readable step; None if there is none.

        `state`/`frozen` are the targets: jax.ShapeDtypeStructs (or arrays) whose shardings the
        restored arrays get.

        Model/optimizer arrays are read first into new arrays; only when they are complete is the
        iterator state applied, so a broken step never leaves anything half loaded. Broken steps
        are logged, renamed to `corrupt_<step>` and skipped in favour of older ones.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self._restore(step, state, frozen, iterator)
            except Exception as e:  # noqa: BLE001 - any unreadable step is skipped, never used
                log.warning("checkpoint %s/%d is unreadable (%s: %s); skipping it",
                            self.directory, step, type(e).__name__, e)
                self._quarantine(step)
        return None

    def _restore(self, step, state, frozen, iterator):
        train_like = dict(step=state.step, opt_state=state.opt_state, rng=state.rng)
        full = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(merge_dicts(state.params, frozen)),
                train=ocp.args.StandardRestore(train_like),
            ),
        )
        if int(full.train["step"]) != step:
            raise ValueError(f"train/step is {int(full.train['step'])}, expected {step}")
        self.manager.restore(
            step, args=ocp.args.Composite(dataset=grain.checkpoint.CheckpointRestore(iterator))
        )
        new = TrainState(
            step=full.train["step"],
            params=pick(full.params, state.params),
            opt_state=full.train["opt_state"],
            rng=full.train["rng"],
        )
        return new, pick(full.params, frozen)

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            path = self.directory / str(step)
            if path.exists():
                path.rename(self.directory / f"corrupt_{step}_{int(time.time())}")
        self.manager.reload()

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
