"""The run-directory lock on object storage (gs://), where there is no `flock`.

The lock is an object created only if absent (GCS `ifGenerationMatch=0`: of two runs that race,
the server lets exactly one create it). It records {pid, host, started, token, heartbeat}; the
holder rewrites `heartbeat` every `HEARTBEAT_S` seconds and deletes the object on release (only
the generation it last wrote). Nothing releases it when the holder dies, so a lock is stale, and
is reported (warning) and taken over as a local stale lock is, when its holder's process is gone
(same host) or its heartbeat is older than `STALE_AFTER_S`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from skipclick_jax import storage

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class LockHeldError(RuntimeError):
    """The lock is held by a live run (message: who holds it)."""


class ObjectLock:
    """Exclusive lock `path` (a gs:// object) held from construction until `release`."""

    def __init__(self, path: str):
        self.path = storage.as_path(path)
        self._token = uuid.uuid4().hex
        self._started = time.strftime("%Y-%m-%d %H:%M:%S")
        self._stop = threading.Event()
        self._gen = storage.create_only(self.path, self._payload())
        if self._gen is None:
            info, gen = self._read()
            stale = self._stale_reason(info)
            if stale is None:
                raise LockHeldError(_describe(info))
            log.warning("stale lock %s found (%s; %s): that run did not exit cleanly; taking it over",
                        self.path, _describe(info), stale)
            if gen is not None:
                storage.delete_if_generation(self.path, gen)
            self._gen = storage.create_only(self.path, self._payload())
            if self._gen is None:  # another run took it over first
                raise LockHeldError(_describe(self._read()[0]))
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()

    def _payload(self) -> bytes:
        return json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), started=self._started,
                               token=self._token, heartbeat=time.time())).encode()

    def _read(self) -> tuple[dict | None, int | None]:
        gen = storage.generation(self.path)
        try:
            info = json.loads(self.path.read_bytes().decode() or "null")
        except FileNotFoundError:
            return None, None
        except (ValueError, UnicodeDecodeError):
            return {}, gen
        return (info if isinstance(info, dict) else {}), gen

    @staticmethod
    def _stale_reason(info: dict | None) -> str | None:
        """Why the lock described by `info` has no live holder; None if it may have one."""
        if info is None:
            return "released meanwhile"
        host, pid = info.get("host"), info.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            return f"process {pid} is gone"
        beat = info.get("heartbeat")
        age = time.time() - beat if isinstance(beat, (int, float)) else None
        if age is None:
            return "unreadable lock object"
        if age > STALE_AFTER_S:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                info, _ = self._read()
                if not info or info.get("token") != self._token:
                    log.error("workdir lock %s was taken over by another run (%s)", self.path,
                              _describe(info))
                    return
                self.path.write_bytes(self._payload())
                self._gen = storage.generation(self.path)
            except Exception as e:  # noqa: BLE001 - a transient storage error; retried next beat
                log.warning("workdir lock heartbeat %s failed: %s", self.path, e)

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        info, gen = self._read()
        if info and info.get("token") == self._token and gen is not None:
            storage.delete_if_generation(self.path, gen)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(info: dict | None) -> str:
    if not info:
        return "no holder recorded"
    try:
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except KeyError:
        return "unreadable lock object"
