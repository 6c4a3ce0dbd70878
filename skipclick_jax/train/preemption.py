"""Stopping a run on SIGTERM / SIGINT at a step boundary, with that step saved.

One process: a Python handler records the first SIGTERM or SIGINT; the trainer finishes the step
under way, saves and seals it, and raises `Preempted` (exit status 128 + signal number). A second
SIGINT raises KeyboardInterrupt at once (nothing more is saved).

Several processes (`jax.distributed` initialised): a scheduler may signal one process, or all of
them at slightly different steps, yet all must save the same step. JAX's preemption service
(a SIGTERM notifier in every process, agreed through the coordination service) picks that step:
`reached_preemption_sync_point(step)`, called by every process at every step, is True on all of
them at the same step. SIGTERM is left to JAX's notifier; SIGINT is recorded and turned into a
SIGTERM of this process, so that it goes through the same agreement.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax

log = logging.getLogger(__name__)


class Preempted(Exception):
    """The run stopped on a signal after saving `step` (exit status `exit_code`); re-running the
    same command resumes it."""

    def __init__(self, signum: int, step: int, directory: str):
        self.signum, self.step, self.directory = signum, step, directory
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved in "
                         f"{directory}/{step}.")


def _sync_manager():
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    return state.preemption_sync_manager if state.client is not None else None


class StopSignals:
    """Records SIGTERM/SIGINT while installed (a context manager; the previous handlers come back
    on exit). `should_stop(step)` is called by every process after every step."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._synced = jax.process_count() > 1 and _sync_manager() is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        signums = (signal.SIGINT,) if self._synced else (signal.SIGINT, signal.SIGTERM)
        for s in signums:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop at once
            return
        self.signum = signum
        log.warning("%s received: finishing the current step, then saving it (Ctrl-C again to "
                    "stop at once, unsaved)", signal.Signals(signum).name)
        if self._synced:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier: all processes agree on a step

    def should_stop(self, step: int) -> bool:
        """Whether to save `step` and stop (the same answer on every process)."""
        if self._synced:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                if self.signum is None:
                    self.signum = signal.SIGTERM  # seen by JAX's notifier, here or on a peer
                return True
            return False
        return self.signum is not None
