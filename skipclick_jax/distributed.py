"""Several JAX processes (multi-host): start-up, failure timeouts, process-0 helpers.

One process per host (GPU node, TPU host), or several on one machine for testing. Every process
runs the same program; `jax.distributed.initialize` joins them into one runtime whose devices form
the global mesh. Call `initialize` before anything else touches JAX (it must precede the backend).

Failure: the coordination service (hosted by process 0) expects a heartbeat from every process
every `heartbeat_timeout / 2` seconds; when one stops (process killed, host lost), the service
declares it dead after `heartbeat_timeout` seconds and every other process is terminated with an
error naming the distributed service, instead of waiting forever in a collective. The verdict is
made inside process 0: if process 0 itself stalls (a starved, overloaded host) for more than about
`heartbeat_timeout / 2` seconds, the heartbeats that arrive meanwhile are recorded late and a
healthy peer is declared dead; so `heartbeat_timeout` must be at least twice the longest stall a
healthy process 0 can have (compiling alone does not stall it: its service answers within
milliseconds). A process that cannot reach the others at start-up gives up after `init_timeout`
seconds.

On CPU, several processes compile their programs without the persistent compilation cache (see
`initialize`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import pickle
import sys
import traceback
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT_S = 30  # a dead peer is detected (and the others stopped) within this time
INIT_TIMEOUT_S = 300  # all processes must have joined within this time
SHUTDOWN_TIMEOUT_S = 60  # a clean shutdown waits this long for the other processes
WAIT_TIMEOUT_S = 24 * 3600  # barriers and gathers wait this long for a live but slower peer


_settings = dict(heartbeat_timeout=HEARTBEAT_TIMEOUT_S)


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the others (all None / False: a single process).

    coordinator: 'host:port' of process 0's coordination service; with num_processes and
      process_id it starts the runtime explicitly (one machine, or any launcher). Without them,
      `auto=True` lets `jax.distributed.initialize()` read the cluster (SLURM, Open MPI, TPU pod,
      or the JAX_COORDINATOR_ADDRESS environment).
    bind: the address process 0's service listens on (default: all interfaces at the
      coordinator's port; use 127.0.0.1:PORT on one machine).
    cpu_devices: virtual CPU devices per process (testing on CPU).
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    bind: str | None = None
    auto: bool = False
    cpu_devices: int | None = None
    heartbeat_timeout: int = HEARTBEAT_TIMEOUT_S
    init_timeout: int = INIT_TIMEOUT_S

    @property
    def multi(self) -> bool:
        return self.auto or self.coordinator is not None or (self.num_processes or 1) > 1


def initialize(launch: Launch) -> None:
    """Sets the CPU device count and joins the other processes (if `launch.multi`).

    Must run before any JAX computation. Idempotent: a second call with the runtime already up
    does nothing.
    """
    if launch.cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(launch.cpu_devices))
    if not launch.multi or is_initialized():
        return
    explicit = (launch.coordinator, launch.num_processes, launch.process_id)
    if not launch.auto and None in explicit:
        raise ValueError("several processes need --coordinator, --num-processes and --process-id "
                         f"together (got {explicit}), or auto-detection (train.distributed=True / "
                         "--distributed) on a cluster")
    _settings["heartbeat_timeout"] = launch.heartbeat_timeout
    jax.distributed.initialize(
        coordinator_address=launch.coordinator, num_processes=launch.num_processes,
        process_id=launch.process_id, coordinator_bind_address=launch.bind,
        initialization_timeout=launch.init_timeout,
        heartbeat_timeout_seconds=launch.heartbeat_timeout,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # Every process compiles its programs itself: none reads the persistent compilation
        # cache. jax writes that cache from process 0 only, under keys the other processes do
        # not compute, so with a warm cache process 0 ran the executable it read back while the
        # others ran their own compile, and on jax 0.12 the two kinds deadlocked in their first
        # all-to-all between processes (gloo; the two-process (4, 2) training step hung at step 1).
        jax.config.update("jax_enable_compilation_cache", False)
    log.info("process %d of %d joined (%d local / %d global devices)", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def is_initialized() -> bool:
    return jax.distributed.is_initialized()


def shutdown() -> None:
    """Leaves the runtime cleanly (a barrier with the other processes); no-op for one process."""
    if is_initialized():
        jax.distributed.shutdown()


def is_main() -> bool:
    """Whether this process writes the run's shared files (logs, TensorBoard, metrics, eval)."""
    return jax.process_index() == 0


def configure_logging(level: int = logging.INFO) -> None:
    """INFO logs from process 0; the others log only warnings and errors, tagged with their index."""
    tag = f"[process {jax.process_index()}/{jax.process_count()}] " if jax.process_count() > 1 else ""
    logging.basicConfig(level=level if is_main() else logging.WARNING, force=True,
                        format=f"%(asctime)s {tag}%(name)s: %(message)s")


def fail(error: BaseException) -> None:
    """Reports a failure of this process; with several processes, exits at once without the
    shutdown barrier (which would wait for peers that may be stuck in a collective), so that the
    coordination service stops the others within the heartbeat timeout."""
    if is_initialized() and jax.process_count() > 1:
        traceback.print_exception(error)
        print(f"process {jax.process_index()} of {jax.process_count()} failed "
              f"({type(error).__name__}); the others stop within {_settings['heartbeat_timeout']} s",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


# ----------------------------------------------------------------------------- command lines
_FLAGS = (  # name, type, help
    ("coordinator", str, "several processes: host:port of process 0's coordination service"),
    ("coordinator-bind", str, ("address process 0's service binds (default all interfaces; "
                               "127.0.0.1:PORT on one machine)")),
    ("num-processes", int, "several processes: how many (with --coordinator, --process-id)"),
    ("process-id", int, "several processes: this one's index, 0 .. num-processes - 1"),
    ("cpu-devices", int, "virtual CPU devices per process (testing on CPU)"),
    ("heartbeat-timeout", int, (f"seconds without a heartbeat before a process counts as dead "
                                f"and the others stop (default {HEARTBEAT_TIMEOUT_S})")),
)


def define_absl_flags() -> None:
    """The start-up flags (`_FLAGS`) as absl flags (train.py)."""
    from absl import flags

    for name, kind, text in _FLAGS:
        (flags.DEFINE_integer if kind is int else flags.DEFINE_string)(name, None, text)


def launch_from_absl_flags(auto: bool = False) -> Launch:
    from absl import flags

    return _launch({name: flags.FLAGS[name].value for name, _, _ in _FLAGS}, auto)


def add_arguments(parser) -> None:
    """The start-up flags (`_FLAGS`) plus --distributed (cluster auto-detection) on an argparse
    parser (eval.py)."""
    group = parser.add_argument_group("several processes (multi-host)")
    group.add_argument("--distributed", action="store_true",
                       help="join the other processes with jax.distributed.initialize() "
                            "auto-detection (SLURM, Open MPI, TPU pod)")
    for name, kind, text in _FLAGS:
        group.add_argument(f"--{name}", type=kind, default=None, help=text)


def launch_from_args(args) -> Launch:
    return _launch({name: getattr(args, name.replace("-", "_")) for name, _, _ in _FLAGS},
                   args.distributed)


def _launch(values: dict[str, Any], auto: bool) -> Launch:
    heartbeat = values["heartbeat-timeout"]
    return Launch(coordinator=values["coordinator"], bind=values["coordinator-bind"],
                  num_processes=values["num-processes"], process_id=values["process-id"],
                  cpu_devices=values["cpu-devices"], auto=auto,
                  heartbeat_timeout=HEARTBEAT_TIMEOUT_S if heartbeat is None else heartbeat)


# ----------------------------------------------------------------------------- sharing data
def shard_range(n: int) -> range:
    """This process's contiguous share of n items: [p·n/P, (p+1)·n/P)."""
    p, count = jax.process_index(), jax.process_count()
    return range(p * n // count, (p + 1) * n // count)


def barrier(name: str, timeout_s: int = WAIT_TIMEOUT_S) -> None:
    """All processes wait here for each other (through the coordination service, not the
    collectives, so a slow peer is waited for up to `timeout_s`; a dead one stops us sooner)."""
    if is_initialized() and jax.process_count() > 1:
        _client().wait_at_barrier(_unique(name), timeout_s * 1000)


@contextlib.contextmanager
def main_first(name: str):
    """Process 0 runs the block first, then the others (e.g. a dataset build that must happen once
    on a shared filesystem, which the others then read)."""
    if not is_main():
        barrier(name)
    yield
    if is_main():
        barrier(name)


def allgather_objects(obj: Any, name: str = "allgather") -> list[Any]:
    """Every process's `obj` (picklable), in process order, on every process. Goes through the
    coordination service's key-value store: processes may arrive up to WAIT_TIMEOUT_S apart (the
    CPU collectives give up after 30 s). All processes must call it in the same order."""
    if not is_initialized() or jax.process_count() == 1:
        return [obj]
    client, key = _client(), _unique(name)
    client.key_value_set_bytes(f"{key}/{jax.process_index()}", pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))
    parts = [pickle.loads(client.blocking_key_value_get_bytes(f"{key}/{i}", WAIT_TIMEOUT_S * 1000))
             for i in range(jax.process_count())]
    barrier(f"{key}/read")
    client.key_value_delete(f"{key}/{jax.process_index()}")
    return parts


class SyncedJit:
    """A jitted function compiled ahead of its first run per input signature, after which all
    processes meet at a `barrier`: the first run of its collectives then never waits for a peer's
    slower compile (CPU collectives (gloo) give up after 30 s; compiles may differ by more, e.g.
    when one process reads the persistent compilation cache and another compiles)."""

    def __init__(self, jitted, name: str):
        self._jitted, self._name, self._compiled = jitted, name, {}

    @staticmethod
    def _key(args):
        leaves, treedef = jax.tree.flatten(args)
        return (treedef, tuple((np.shape(x), np.result_type(x), getattr(x, "sharding", None))
                               for x in leaves))

    def compile(self, *args):
        """The compiled executable for `args`' signature (compiled now if new, then the processes
        meet); e.g. to time the compile apart from the first run, or for its cost_analysis()."""
        key = self._key(args)
        if key not in self._compiled:
            self._compiled[key] = self._jitted.lower(*args).compile()
            barrier(f"compiled {self._name}")
        return self._compiled[key]

    def __call__(self, *args):
        if not self._compiled and (not is_initialized() or jax.process_count() == 1):
            return self._jitted(*args)
        return self.compile(*args)(*args)


def _client():
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


_counts: dict[str, int] = {}


def _unique(name: str) -> str:
    """`name` numbered by how often it was used: the same sequence on every process."""
    _counts[name] = _counts.get(name, 0) + 1
    return f"skipclick/{name}/{_counts[name]}"


def fully_replicated(tree: Any) -> Any:
    """Global (possibly sharded) arrays -> numpy copies of their full values on every process
    (with several processes a collective)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    out = jax.tree.map(lambda x: NamedSharding(x.sharding.mesh, PartitionSpec()), tree)
    gathered = SyncedJit(jax.jit(lambda t: t, out_shardings=out), "fully_replicated")(tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), gathered)


class BatchLog:
    """Per-row SHA-256 of the input rows this process reads, one JSON line per step, in
    `<workdir>/batches/process_<i>-of-<n>.jsonl` (to audit the data sharding; off by default)."""

    def __init__(self, workdir: str | os.PathLike | None):
        self._file = None
        if workdir is not None:
            path = (pathlib.Path(workdir) / "batches"
                    / f"process_{jax.process_index()}-of-{jax.process_count()}.jsonl")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a")

    def record(self, step: int, batch: dict[str, np.ndarray]) -> None:
        if self._file is None:
            return
        n = len(next(iter(batch.values())))
        rows = []
        for i in range(n):
            h = hashlib.sha256()
            for key in sorted(batch):
                h.update(np.ascontiguousarray(batch[key][i]).tobytes())
            rows.append(h.hexdigest()[:16])
        self._file.write(json.dumps(dict(step=step, rows=rows)) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
