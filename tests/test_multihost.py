"""Several JAX processes on one machine (loopback): train.py and eval.py as 2 processes x 4 CPU
devices against one process x 8 devices.

Each configuration is run once by a module fixture and checked by several tests. The reference is
one process with 8 devices joined to its own coordination service (`--num-processes 1`), so that
its collectives, like those of 2 processes, go through gloo: with the same reduction order the runs
are bit-identical. (The default in-process CPU collectives sum the 8 partial losses and gradients
in another order: losses then differ by 1 ulp at step 1.) Every launch has a hard timeout; a hung
process is killed and its log shown.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import FAST_COMPILE_XLA_FLAGS, ROOT

STEPS, EVERY = 6, 2
LAUNCH_TIMEOUT_S = 480  # hard limit per launch (all its processes)
# The coordination service (inside process 0) declares a peer dead when its last recorded
# heartbeat is older than this; peers send one every HEARTBEAT_S / 2, so a stall of process 0 (a
# starved, loaded machine) longer than about HEARTBEAT_S / 2 already reads as a dead, healthy
# peer: with 10 s, 6-9 s of starvation aborted both processes (docs/training.md).
HEARTBEAT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(workdir: pathlib.Path, tfds: pathlib.Path, fsdp: int) -> list[str]:
    return [str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny_synthetic.py"),
            "--workdir", str(workdir), f"--config.train.num_steps={STEPS}",
            f"--config.train.checkpoint_every_steps={EVERY}", "--config.train.keep_checkpoints=10",
            "--config.train.log_every_steps=1", f"--config.train.image_summary_every_steps={STEPS}",
            "--config.train.eval_untrained=False", f"--config.train.mesh.fsdp={fsdp}",
            "--config.model.backbone.depth=4", "--config.model.backbone.taps=(0,1,2,3)",
            "--config.data.synthetic.num_val=2", f"--config.data.data_dir={tfds}",
            "--log-batch-hashes"]


class Launch:
    """`nproc` processes of one command (`python args...`), each with 8 // nproc CPU devices,
    joined over 127.0.0.1 (always through a coordination service, even for one process)."""

    def __init__(self, args: list[str], nproc: int, logs: pathlib.Path, heartbeat: int = HEARTBEAT_S):
        port = _free_port()
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                   XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAGS}")
        self.logs = [logs.with_name(f"{logs.name}.p{i}.log") for i in range(nproc)]
        self.procs = []
        for i, log in enumerate(self.logs):
            cmd = [sys.executable, *args, "--cpu-devices", str(8 // nproc),
                   "--coordinator", f"127.0.0.1:{port}", "--coordinator-bind", f"127.0.0.1:{port}",
                   "--num-processes", str(nproc), "--process-id", str(i),
                   "--heartbeat-timeout", str(heartbeat)]
            with log.open("w") as f:
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                                   start_new_session=True))
        self.start = time.monotonic()

    def wait(self, timeout: float = LAUNCH_TIMEOUT_S) -> list[int]:
        """Return codes; kills everything and fails after `timeout` seconds."""
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(1.0, self.start + timeout - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"launch did not finish within {timeout} s:\n{self.tail()}")
        return codes

    def kill(self, *which: int) -> None:
        for i in which or range(len(self.procs)):
            if self.procs[i].poll() is None:
                os.killpg(self.procs[i].pid, signal.SIGKILL)
                self.procs[i].wait()

    def text(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def tail(self, n: int = 4000) -> str:
        return "\n".join(f"--- process {i}:\n{self.text(i)[-n:]}" for i in range(len(self.procs)))

    def check(self) -> None:
        codes = self.wait()
        assert codes == [0] * len(codes), f"return codes {codes}\n{self.tail()}"


def _wait_for(cond, launch: Launch, what: str, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end or any(p.poll() is not None for p in launch.procs):
            launch.kill()
            pytest.fail(f"never saw {what}:\n{launch.tail()}")
        time.sleep(0.005)


def _complete_steps(workdir: pathlib.Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _metrics(workdir: pathlib.Path) -> dict[int, dict]:
    """step -> the last logged metrics of that step (a resumed run logs its steps again)."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def _batch_rows(workdir: pathlib.Path, nproc: int) -> dict[int, list[str]]:
    """step -> row hashes of the global batch, process 0's rows first (the last record per step)."""
    rows: dict[int, list[str]] = {}
    for i in range(nproc):
        per_step = {}
        for line in (workdir / "batches" / f"process_{i}-of-{nproc}.jsonl").read_text().splitlines():
            r = json.loads(line)
            per_step[r["step"]] = r["rows"]
        for step, r in per_step.items():
            rows.setdefault(step, []).extend(r)
    return rows


def _params(workdir: pathlib.Path) -> list[np.ndarray]:
    """The parameters of the latest checkpoint, as numpy arrays in a fixed order."""
    import jax
    from flax import nnx

    from skipclick_jax import checkpoint

    model, _ = checkpoint.load(workdir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def _eval_files(out: pathlib.Path) -> tuple[dict, list]:
    """summary.json without its timings, and clicks.json."""
    summary = json.loads((out / "summary.json").read_text())
    for s in summary.values():
        del s["seconds"], s["clicks_per_second"]
    return summary, json.loads((out / "Synthetic" / "clicks.json").read_text())


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def _runs(tmp: pathlib.Path, tfds: pathlib.Path, fsdp: int, kill: bool) -> dict:
    """Reference (1 x 8) and 2 x 4 runs of the same training. With `kill`, the 2-process run is
    killed (both processes, SIGKILL) once the step-2 checkpoint is complete, then re-run."""
    ref = tmp / "ref"
    Launch(_train_args(ref, tfds, fsdp), 1, tmp / "ref").check()

    multi, killed_at = tmp / "multi", None
    if kill:
        first = Launch(_train_args(multi, tfds, fsdp), 2, tmp / "multi_killed")
        _wait_for(lambda: EVERY in _complete_steps(multi), first, f"checkpoint {EVERY}")
        first.kill()
        killed_at = _complete_steps(multi)[-1]
    second = Launch(_train_args(multi, tfds, fsdp), 2, tmp / "multi")
    second.check()
    return dict(ref=ref, multi=multi, killed_at=killed_at, second=second, fsdp=fsdp)


# The default suite runs the (4, 2) mesh straight through; the data mesh 8 (slow) is also killed
# and resumed.
@pytest.fixture(scope="module", params=[pytest.param((2, False), id="mesh4x2"),
                                        pytest.param((1, True), id="mesh8-killed", marks=pytest.mark.slow)])
def runs(request, tmp_path_factory, tfds_dir):
    fsdp, kill = request.param
    return _runs(tmp_path_factory.mktemp(f"fsdp{fsdp}"), tfds_dir, fsdp, kill)


def test_multihost_training_matches_one_process(runs):
    ref, multi = runs["ref"], runs["multi"]
    # Each process read only its own rows, and together they are the reference's global batches.
    ref_rows, rows = _batch_rows(ref, 1), _batch_rows(multi, 2)
    assert rows == ref_rows and sorted(rows) == list(range(1, STEPS + 1))
    # Bit-identical losses and final parameters (same gloo reduction order, see the module doc).
    ref_m, m = _metrics(ref), _metrics(multi)
    assert [m[s]["loss"] for s in ref_m] == [ref_m[s]["loss"] for s in ref_m]
    assert [m[s]["grad_norm"] for s in ref_m] == [ref_m[s]["grad_norm"] for s in ref_m]
    for a, b in zip(_params(multi), _params(ref), strict=True):
        np.testing.assert_array_equal(a, b)


def test_multihost_resumes_after_both_processes_are_killed(runs):
    multi, k = runs["multi"], runs["killed_at"]
    if k is None:
        pytest.skip("this configuration runs straight through")
    assert EVERY <= k < STEPS, k
    out = runs["second"].text(0)
    assert f"resumed from {multi / 'checkpoints'}/{k}" in out, out[-3000:]
    # The resumed run logged (and reproduced, see the test above) every step after k.
    lines = [json.loads(x)["step"] for x in (multi / "metrics.jsonl").read_text().splitlines()]
    assert lines[-(STEPS - k):] == list(range(k + 1, STEPS + 1)), lines


def test_multihost_checkpoints_written_once_by_all_processes(runs):
    # (an interrupted write leaves only an orbax temporary directory, never read)
    ckpt = runs["multi"] / "checkpoints"
    names = sorted(p.name for p in ckpt.iterdir() if ".orbax-checkpoint-tmp" not in p.name)
    assert names == sorted(["config.json", *(str(s) for s in range(EVERY, STEPS + 1, EVERY))]), names
    for step in range(EVERY, STEPS + 1, EVERY):
        assert {"dataset", "params", "train"} <= {p.name for p in (ckpt / str(step)).iterdir()}
        assert sorted(p.name for p in (ckpt / str(step) / "dataset").glob("process_*")) == [
            "process_0-of-2.json", "process_1-of-2.json"]


def test_multihost_logs_written_by_process_0_only(runs):
    multi, second = runs["multi"], runs["second"]
    runs_made = 1 if runs["killed_at"] is None else 2  # a killed run and its resumption: one file each
    assert len(list((multi / "tensorboard").iterdir())) == runs_made
    assert [p.name for p in (multi / "images").iterdir()] == [f"train_preview_{STEPS:07d}.png"]
    out0, out1 = second.text(0), second.text(1)
    for text in ("mesh {", "train:", "NoC evaluation"):
        assert text in out0 and text not in out1, text


def test_multihost_end_of_training_eval_matches_one_process(runs):
    name = f"step_{STEPS}"
    assert _eval_files(runs["multi"] / "eval" / name) == _eval_files(runs["ref"] / "eval" / name)


def test_multihost_eval_cli_matches_one_process(runs, tfds_dir, tmp_path):
    out = tmp_path / "eval"
    Launch([str(ROOT / "eval.py"), "--checkpoint", str(runs["ref"]), "--dataset", "Synthetic=",
            "--out", str(out), "--data-dir", str(tfds_dir)], 2, tmp_path / "eval").check()
    assert _eval_files(out) == _eval_files(runs["ref"] / "eval" / f"step_{STEPS}")


_CACHE_PROBE = """import argparse, jax
from skipclick_jax import distributed
from skipclick_jax.runtime import enable_compilation_cache
parser = argparse.ArgumentParser()
distributed.add_arguments(parser)
distributed.initialize(distributed.launch_from_args(parser.parse_args()))
enable_compilation_cache()  # as train.py and eval.py do, after joining
print("persistent cache", jax.config.jax_enable_compilation_cache, "of", jax.process_count(), flush=True)
distributed.shutdown()
"""


@pytest.mark.parametrize("nproc", [1, 2])
def test_multihost_processes_compile_without_the_persistent_cache(nproc, tmp_path):
    """Several CPU processes never read the persistent compilation cache: jax writes it from process
    0 only, under keys the others do not compute, and process 0 running the executable it read back
    against the others' own compiles deadlocked the two-process (4, 2) training step on jax 0.12.
    One process keeps the cache."""
    launch = Launch(["-c", _CACHE_PROBE], nproc, tmp_path / "probe")
    launch.check()
    for i in range(nproc):
        assert f"persistent cache {nproc == 1} of {nproc}" in launch.text(i), launch.tail()


# ----------------------------------------------------------------------------- failures
FAILURE_BOUND_S = HEARTBEAT_S + 60  # a peer's death stops the others within this


def _stops_with_message(launch: Launch, survivor: int, killed_at: float) -> float:
    """Waits (bounded) for `survivor` to exit after its peer was killed; checks it failed loudly."""
    try:
        code = launch.procs[survivor].wait(timeout=FAILURE_BOUND_S)
    except subprocess.TimeoutExpired:
        launch.kill()
        pytest.fail(f"process {survivor} still running {FAILURE_BOUND_S} s after its peer died:\n"
                    f"{launch.tail()}")
    seconds = time.monotonic() - killed_at
    text = launch.text(survivor)
    assert code != 0, text[-3000:]
    assert "another task died" in text or f"process {survivor} of 2 failed" in text, text[-3000:]
    return seconds


@pytest.mark.slow
def test_multihost_peer_killed_while_saving_a_checkpoint(runs, tfds_dir, tmp_path):
    """SIGKILL process 1 while the step-4 checkpoint is being written: process 0 stops within the
    bound; the same command then resumes from the last complete step and reproduces the losses."""
    if runs["fsdp"] != 2:
        pytest.skip("run once, with the (4, 2) mesh")
    multi = tmp_path / "multi"
    args = _train_args(multi, tfds_dir, runs["fsdp"])
    first = Launch(args, 2, tmp_path / "killed")
    ckpt = multi / "checkpoints"
    _wait_for(lambda: ckpt.is_dir() and any(p.name.startswith(f"{2 * EVERY}.orbax-checkpoint-tmp")
                                            for p in ckpt.iterdir()), first, "the step-4 checkpoint write")
    first.kill(1)
    seconds = _stops_with_message(first, 0, time.monotonic())
    print(f"process 0 stopped {seconds:.1f} s after process 1 was killed")
    complete = _complete_steps(multi)
    assert complete and complete[-1] < STEPS, complete

    second = Launch(args, 2, tmp_path / "resumed")
    second.check()
    assert f"resumed from {ckpt}/{complete[-1]}" in second.text(0)
    ref_m, m = _metrics(runs["ref"]), _metrics(multi)
    assert [m[s]["loss"] for s in ref_m] == [ref_m[s]["loss"] for s in ref_m]


@pytest.mark.slow
def test_multihost_process_0_killed_stops_the_others(runs, tfds_dir, tmp_path):
    """SIGKILL process 0 (it hosts the coordination service) mid-training: process 1 stops."""
    if runs["fsdp"] != 2:
        pytest.skip("run once, with the (4, 2) mesh")
    multi = tmp_path / "multi"
    first = Launch(_train_args(multi, tfds_dir, runs["fsdp"]), 2, tmp_path / "killed")
    _wait_for(lambda: (multi / "metrics.jsonl").is_file() and (multi / "metrics.jsonl").read_text(),
              first, "the first step")
    first.kill(0)
    seconds = _stops_with_message(first, 1, time.monotonic())
    print(f"process 1 stopped {seconds:.1f} s after process 0 was killed")


def test_multihost_sigterm_to_one_process_saves_the_same_step_on_all(runs, tfds_dir, tmp_path):
    """A scheduler's SIGTERM reaches process 1 only: both processes finish the same step, save it
    (sealed), print it and exit 143; the same command resumes it and reproduces the losses."""
    if runs["fsdp"] != 2:
        pytest.skip("run once, with the (4, 2) mesh")
    multi = tmp_path / "run"
    args = _train_args(multi, tfds_dir, runs["fsdp"])
    first = Launch(args, 2, tmp_path / "stopped")
    _wait_for(lambda: (multi / "metrics.jsonl").is_file() and len(_metrics(multi)) >= 3, first, "step 3")
    os.kill(first.procs[1].pid, signal.SIGTERM)
    codes = first.wait()
    assert codes == [128 + signal.SIGTERM] * 2, f"{codes}\n{first.tail()}"
    steps = []
    for i in range(2):
        m = re.search(r"stopped by SIGTERM after step (\d+); saved in (\S+)/(\d+)", first.text(i))
        assert m, first.tail()
        steps.append(int(m.group(1)))
    step = steps[0]
    assert steps == [step, step] and 3 <= step < STEPS, steps
    assert _complete_steps(multi)[-1] == step
    assert (multi / "checkpoints" / str(step) / "SHA256SUMS.json").is_file()
    second = Launch(args, 2, tmp_path / "resumed")
    second.check()
    assert f"resumed from {multi / 'checkpoints'}/{step}" in second.text(0), second.tail()
    ref_m, m = _metrics(runs["multi"]), _metrics(multi)
    assert sorted(m) == sorted(ref_m)
    assert [m[s]["loss"] for s in ref_m] == [ref_m[s]["loss"] for s in ref_m]
