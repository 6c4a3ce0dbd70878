"""Orbax checkpoints of a training run: async save, keep last N, resume from the newest step that
verifies, an exclusive lock on the run directory.

Layout under `<workdir>/checkpoints/`:
  config.json                 the experiment config (config_lib.read_config_json reads it)
  <step>/params/              full model state (trainable + frozen) as nnx.to_pure_dict, StandardSave
  <step>/train/               {'step', 'opt_state', 'rng'} (StandardSave)
  <step>/dataset/             grain iterator state, process_<i>-of-<n>.json
  <step>/SHA256SUMS.json      size and SHA-256 of every file of the step (orbax's commit
                              bookkeeping `_CHECKPOINT_METADATA`, `commit_success.txt` aside)
`<workdir>/train.lock` is held (flock; on gs:// a create-only object, `object_lock`) by the
process-0 trainer while it runs. The workdir may be local or gs:// (`skipclick_jax.storage`).

A step is sealed before it is committed: once every process has written its files, process 0
records the digests inside orbax's temporary directory (`<step>.orbax-checkpoint-tmp`, orbax's
post-finalization hook), and only then does orbax rename it to `<step>`. So a step directory either
carries its digests or is recognisably unfinished (orbax's temporary name, ignored on resume and
replaced when that step is saved again); there is no moment at which a finished step lacks them.
On gs:// (no renames) orbax writes the step in place and marks it with commit_success.txt; the
digests are written there by the same hook.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pathlib
import socket
import time
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path.atomicity_types import TMP_DIR_SUFFIX

from skipclick_jax import config_lib, storage
from skipclick_jax.checkpoint import DIGESTS, CorruptCheckpointError, verify_digests, write_digests
from skipclick_jax.train.state import TrainState, merge_dicts, pick

log = logging.getLogger(__name__)

# Keys that may change when a run is resumed (logged): how long it runs, its learning rate, how it
# logs, where it evaluates. Any other difference to the run's config.json (the model, the data,
# the batch, the seed, the loss) is refused: it would silently mix two experiments.
RESUMABLE_KEYS = (
    "train.num_steps", "train.num_epochs", "train.checkpoint_every_steps", "train.keep_checkpoints",
    "train.log_every_steps", "train.image_summary_every_steps", "train.num_image_summaries",
    "train.eval_untrained", "train.distributed", "train.profile_steps", "train.mesh.", "train.optimizer.",
    "train.lr_milestones", "train.lr_gamma", "data.num_workers", "data.data_dir",
    "data.eval_datasets", "data.eval_roots.", "eval.",
)
LOCK_FILE = "train.lock"
# Files orbax rewrites while committing a step (after the digests are written): not digested.
ORBAX_COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")


class WorkdirError(RuntimeError):
    """The run directory cannot be used as asked (in use, another config, unreadable)."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed; the earlier checkpoints are untouched."""


class _IteratorSnapshot:
    """The data iterator's state taken at save time (the async save writes it later)."""

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state(), indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


class WorkdirLock:
    """Exclusive `flock` on `<workdir>/train.lock`, holding {pid, host, started} while held.

    The kernel drops the lock when its process dies, so a lock file with content but no holder is
    a stale lock of a run that did not exit cleanly: it is reported (warning) and taken over.
    A gs:// workdir gets an `object_lock.ObjectLock` instead (same errors and warnings).
    """

    def __init__(self, workdir: str | pathlib.Path):
        self._fd = self._object = None
        if storage.is_remote(workdir):
            from skipclick_jax.train.object_lock import LockHeldError, ObjectLock

            self.path = storage.as_path(workdir) / LOCK_FILE
            try:
                self._object = ObjectLock(str(self.path))
            except LockHeldError as e:
                raise WorkdirError(
                    f"{self.path.parent} is in use by another train.py run ({e}); wait for it to "
                    "finish or pass another --workdir") from None
            return
        self.path = pathlib.Path(workdir).absolute() / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._read()
            os.close(self._fd)
            raise WorkdirError(
                f"{self.path.parent} is in use by another train.py run ({holder}); wait for it to "
                "finish or pass another --workdir") from None
        stale = self._read()
        if stale != "no holder recorded":
            log.warning("stale lock %s found (%s): that run did not exit cleanly; taking it over",
                        self.path, stale)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                                            started=time.strftime("%Y-%m-%d %H:%M:%S"))).encode(), 0)

    def _read(self) -> str:
        try:
            info = json.loads(os.pread(self._fd, 4096, 0).decode() or "null")
            return (f"pid {info['pid']} on {info['host']}, started {info['started']}" if info
                    else "no holder recorded")
        except (ValueError, KeyError, TypeError):
            return "unreadable lock file"

    def release(self) -> None:
        if self._object is not None:
            self._object.release()
            self._object = None
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Checkpointer:
    """Saves/restores (TrainState, frozen params, data iterator) under `<workdir>/checkpoints`.

    Construction locks the workdir (process 0) and refuses a config that differs from the run's
    config.json in anything but `RESUMABLE_KEYS`, before anything is written; `write_config`
    records the config once the caller accepts the run. Use it as a context manager (or call
    `close`) to release the lock.
    """

    def __init__(self, workdir: str | pathlib.Path, *, keep: int, config: ml_collections.ConfigDict):
        if keep < 1:
            raise config_lib.ConfigError(f"config value train.keep_checkpoints={keep!r} is invalid: "
                                         "expected an integer >= 1")
        workdir = storage.as_path(workdir)
        self.directory = workdir / "checkpoints"
        self._main = jax.process_index() == 0
        self._lock = WorkdirLock(workdir) if self._main else None
        self._pending: int | None = None
        self._saving: int | None = None  # the step whose write is under way (for the seal hook)
        self._closed = False
        try:
            self._check_config(config)
            if self._main:
                self.directory.mkdir(exist_ok=True)
                probe = self.directory / f".write_probe_{os.getpid()}"
                try:
                    probe.write_text("")
                    probe.unlink()
                except OSError as e:
                    raise CheckpointSaveError(f"checkpoint directory {self.directory} is not "
                                              f"writable ({e}); nothing was trained") from None
            self.manager = ocp.CheckpointManager(
                self.directory,
                item_names=("params", "train", "dataset"),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep, create=True,
                    # A failing directory creation (read-only, full disk) raises in save() at once
                    # instead of in a background thread that others wait on for minutes.
                    async_options=ocp.options.AsyncOptions(
                        create_directories_asynchronously=False,
                        post_finalization_callback=self._seal_before_commit)),
            )
            self._config = config
        except BaseException:
            self._release()
            raise

    def write_config(self) -> None:
        """Writes the run's config.json (once the run is accepted, before its first save)."""
        if self._main:
            path = self.directory / "config.json"
            text = config_lib.config_to_json(self._config)
            if not path.is_file() or path.read_text() != text:
                storage.write_atomic(path, text)

    def _step_dirs(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())

    def _check_config(self, config: ml_collections.ConfigDict) -> None:
        steps = self._step_dirs()
        if not steps:
            return
        path = self.directory / "config.json"
        hint = ("To start a new run, pass another --workdir; to continue this one, use its config "
                f"(python train.py --config {path} --workdir {self.directory.parent}).")
        if not path.is_file():
            raise WorkdirError(f"{path} is missing, but {self.directory} holds checkpoints "
                               f"(steps {steps}): cannot tell which config they belong to. {hint}")
        try:
            stored = config_lib.read_config_json(path)
        except config_lib.ConfigError as e:
            raise WorkdirError(f"{e}; {self.directory} holds checkpoints (steps {steps}) of that "
                               f"config. {hint}") from None
        fresh = config_lib.config_from_json(config_lib.config_to_json(config))  # same JSON round trip
        diff, allowed = [], []
        for k, a, b in config_lib.config_diff(stored, fresh):
            ok = any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_KEYS)
            (allowed if ok else diff).append((k, a, b))
        if allowed and not diff:
            log.warning("resuming %s with changed %s", self.directory.parent,
                        "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in allowed))
        if diff:
            lines = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, a, b in diff[:12])
            more = f" (and {len(diff) - 12} more)" if len(diff) > 12 else ""
            raise WorkdirError(
                f"{self.directory.parent} holds a run (checkpoint steps {steps}) with another config: "
                f"{lines}{more}. Nothing was changed. {hint}")

    def save(self, state: TrainState, frozen: dict[str, Any], iterator) -> None:
        """Starts an async save of step `state.step` (returns before the files are written; the
        previous save is completed first). The step is sealed with its digests before orbax
        commits it (`_seal_before_commit`)."""
        self._seal()
        step = int(state.step)
        train = dict(step=state.step, opt_state=state.opt_state, rng=state.rng)
        self._saving = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(merge_dicts(state.params, frozen)),
                    train=ocp.args.StandardSave(train),
                    dataset=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator)),
                ),
            )
        except Exception as e:  # noqa: BLE001 - any failure: stop, keep the older steps
            raise CheckpointSaveError(
                f"saving checkpoint step {step} in {self.directory} failed ({type(e).__name__}: {e}); "
                f"training stopped; the earlier checkpoints (steps {self._step_dirs()}) are kept") from e
        self._pending = step

    def _seal_before_commit(self) -> None:
        """orbax's post-finalization hook: runs on process 0 in orbax's background thread once
        every process's files of the step are written and finalized, before the step directory is
        committed (renamed from its temporary name). Records the digests inside it; an error here
        leaves the step uncommitted (and surfaces in `_seal`)."""
        step = self._saving
        unfinished = [p for p in self.directory.iterdir()
                      if p.name.startswith(f"{step}{TMP_DIR_SUFFIX}") and p.is_dir()]
        if len(unfinished) > 1:
            raise CheckpointSaveError(f"step {step}: several unfinished directories "
                                      f"{sorted(p.name for p in unfinished)} in {self.directory}")
        # A storage without renames (commit_success.txt) writes the step in place.
        write_digests(unfinished[0] if unfinished else self.directory / str(step),
                      exclude=ORBAX_COMMIT_FILES)

    def _seal(self) -> None:
        """Waits for the pending save (sealed and committed by then) and checks it is."""
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
            if self._main and not (self.directory / str(step) / DIGESTS).is_file():
                raise CorruptCheckpointError(f"step {step} was not committed with its digests")
        except Exception as e:  # noqa: BLE001
            raise CheckpointSaveError(
                f"saving checkpoint step {step} in {self.directory} failed ({type(e).__name__}: {e}); "
                f"the earlier checkpoints are kept") from e

    def restore_latest(
        self, state: TrainState, frozen: dict[str, Any], iterator
    ) -> tuple[TrainState, dict[str, Any]] | None:
        """Loads the newest step whose files match their digests; None if there are no steps.

        `state`/`frozen` are the targets: jax.ShapeDtypeStructs (or arrays) whose shardings the
        restored arrays get.

        Steps that fail verification (corrupted, truncated, deleted or unsealed files) are logged
        and renamed `corrupt_<step>_<time>` (nothing is deleted) once an older step verifies; if
        none does, a WorkdirError is raised and nothing is renamed. Model/optimizer arrays are
        read first into new arrays; only when they are complete is the iterator state applied.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        bad = []
        for step in steps:
            try:
                verify_digests(self.directory / str(step))
            except CorruptCheckpointError as e:
                log.warning("checkpoint %s/%d is unreadable (%s); skipping it", self.directory, step, e)
                bad.append((step, str(e)))
                continue
            for b, _ in bad:
                self._quarantine(b)
            return self._restore(step, state, frozen, iterator)
        if bad:
            problems = "; ".join(f"step {s}: {m}" for s, m in bad)
            raise WorkdirError(
                f"no checkpoint in {self.directory} verifies ({problems}). Nothing was changed; move "
                f"{self.directory.parent} away or pass another --workdir to start a new run")
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
            raise CorruptCheckpointError(f"{self.directory}/{step}: train/step is "
                                         f"{int(full.train['step'])}, expected {step}")
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
        if self._main:
            path = self.directory / str(step)
            if path.exists():
                target = self.directory / f"corrupt_{step}_{int(time.time())}"
                storage.move_tree(path, target)
                log.warning("checkpoint %s failed verification; moved to %s (kept for inspection)",
                            path, target)
        self.manager.reload()

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def wait(self) -> None:
        self._seal()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        """Completes the pending save, closes the manager and releases the workdir lock."""
        if self._closed:
            return
        self._closed = True
        try:
            if hasattr(self, "manager"):
                self._seal()
                self.manager.close()
        finally:
            self._release()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Drops the rows of metrics.jsonl after `step` (those of a run that stopped after its last
    checkpoint, which the resumed run logs again); rewritten beside, then renamed (gs://: one
    object rewritten)."""
    path = storage.as_path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut off by a kill
        if row_step <= step:
            keep.append(line + "\n")
    storage.write_atomic(path, "".join(keep))
