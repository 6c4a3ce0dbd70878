"""train.py killed (SIGKILL) at many moments of a short run, stopped by SIGTERM / SIGINT, and the
timing fields and profiler trace it logs; the two-process SIGTERM test is in test_multihost.py.

Every kill is followed by the same command again (no manual action): it must resume from the
newest step whose write completed (the newest `<step>` directory, sealed before orbax commits
it), finish, and log the same losses as the uninterrupted run, step for step (same CPU executable:
bit for bit). Kills in a chain: the run killed at one moment is re-run and killed at the next.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
LAUNCH_TIMEOUT_S = 480


def _args(workdir: pathlib.Path, steps: int, every: int, evaluate: bool = False,
          extra: tuple[str, ...] = ()) -> list[str]:
    return [str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny_synthetic.py"),
            "--workdir", str(workdir), f"--config.train.num_steps={steps}",
            f"--config.train.checkpoint_every_steps={every}", "--config.train.keep_checkpoints=100",
            "--config.train.log_every_steps=1", "--config.train.image_summary_every_steps=0",
            "--config.train.eval_untrained=False", "--config.model.backbone.depth=4",
            "--config.model.backbone.taps=(0,1,2,3)", "--config.data.synthetic.num_val=2",
            "--config.data.eval_datasets=('Synthetic',)" if evaluate else "--config.data.eval_datasets=()",
            *extra]


class Run:
    """One train.py process (its own session, so that signals reach only it)."""

    def __init__(self, args: list[str], log: pathlib.Path):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}")
        self.log = log
        with log.open("w") as f:
            self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.start, self.started_at = time.monotonic(), time.time()

    def compiled(self) -> bool:
        """Whether this run has compiled its train step (restored and truncated its metrics)."""
        return "train step compiled" in self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=max(1.0, self.start + LAUNCH_TIMEOUT_S - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"train.py did not finish within {LAUNCH_TIMEOUT_S} s:\n{self.text()[-4000:]}")

    def wait_for(self, cond, what: str) -> bool:
        """Polls `cond` every 2 ms; False if the run ended first."""
        while not cond():
            if self.proc.poll() is not None:
                return False
            if time.monotonic() > self.start + LAUNCH_TIMEOUT_S:
                self.proc.kill()
                pytest.fail(f"never saw {what}:\n{self.text()[-4000:]}")
            time.sleep(0.002)
        return True

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)


def _committed(workdir: pathlib.Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _unfinished(workdir: pathlib.Path) -> list[str]:
    d = workdir / "checkpoints"
    return sorted(p.name for p in d.iterdir() if ".orbax-checkpoint-tmp" in p.name) if d.is_dir() else []


def _metrics(workdir: pathlib.Path) -> dict[int, dict]:
    """step -> its last logged row (a resumed run logs its steps again)."""
    path = workdir / "metrics.jsonl"
    rows = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            r = json.loads(line)
        except ValueError:
            continue  # cut off by the kill
        rows[r["step"]] = r
    return rows


def _last_step(workdir: pathlib.Path) -> int:
    return max(_metrics(workdir), default=0)


def _resumed_from(text: str) -> int:
    m = re.search(r"resumed from \S+/(\d+)", text)
    return int(m.group(1)) if m else 0


# Moments: (name, condition on (run, workdir)), judged on what the current run did: a step
# already committed before it started counts once the run has compiled (its state is then the
# same: step k the newest complete).
def _new(path: pathlib.Path, run: Run) -> bool:
    try:
        return path.stat().st_ctime >= run.started_at
    except FileNotFoundError:
        return False


def _at_step(k):
    return f"step {k} logged", lambda r, w: r.compiled() and _last_step(w) >= k


def _during_save(k):
    def cond(r, w):
        tmp = [w / "checkpoints" / n for n in _unfinished(w) if n.startswith(f"{k}.orbax")]
        return r.compiled() and (any(_new(t, r) for t in tmp) or k in _committed(w))
    return f"during the save of step {k}", cond


def _after_commit(k):
    return f"right after step {k} is committed", lambda r, w: r.compiled() and k in _committed(w)


FIRST_STEP = ("during the first step (compiled)", lambda r, w: "train step compiled" in r.text())
START_UP = ("during start-up (0.5 s after launch)", lambda r, w: time.monotonic() - r.start > 0.5)
FINAL_EVAL = ("during the final evaluation", lambda r, w: (w / "eval").is_dir())


def _kill_chain(tmp: pathlib.Path, args: list[str], moments, reference: dict[int, dict]) -> list[dict]:
    """Runs `args` and SIGKILLs it at each moment in turn (re-running the same command each time),
    then lets it finish; checks each resume and the final losses. Returns one record per kill."""
    workdir = pathlib.Path(args[args.index("--workdir") + 1])
    records, prev = [], None
    for i, moment in enumerate([*moments, None]):
        name, cond = moment or (None, None)
        run = Run(args, tmp / f"run{i}.log")
        if prev is not None:  # the previous kill's resume
            prev["resumed_from"] = None
        if cond is None:
            code = run.wait()
            assert code == 0, f"final run failed ({code}):\n{run.text()[-4000:]}"
        else:
            reached = run.wait_for(lambda: cond(run, workdir), name)
            run.signal(signal.SIGKILL)
            run.proc.wait()
            assert reached, f"run ended before '{name}':\n{run.text()[-4000:]}"
        text = run.text()
        if prev is not None:
            resumed = _resumed_from(text)
            assert resumed == prev["newest_complete"], (prev, text[-3000:])
            assert "is unreadable" not in text and "corrupt_" not in text, text[-3000:]
            prev["resumed_from"] = resumed
            prev["steps_lost"] = prev["reached"] - resumed
        if cond is not None:
            prev = dict(moment=name, reached=_last_step(workdir), newest_complete=max(_committed(workdir), default=0),
                        unfinished=_unfinished(workdir))
            records.append(prev)
    got = _metrics(workdir)
    assert sorted(got) == sorted(reference)
    for step, row in reference.items():
        assert got[step]["loss"] == row["loss"], (step, got[step]["loss"], row["loss"])
        assert got[step]["grad_norm"] == row["grad_norm"], step
    assert not any(p.name.startswith("corrupt_") for p in (workdir / "checkpoints").iterdir())
    for step in _committed(workdir):
        assert (workdir / "checkpoints" / str(step) / "SHA256SUMS.json").is_file(), step
    return records


STEPS, EVERY = 6, 2


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (also traced: profile_steps 2:4)."""
    tmp = tmp_path_factory.mktemp("reference")
    run = Run(_args(tmp / "run", STEPS, EVERY, extra=("--config.train.profile_steps=2:4",)), tmp / "log")
    code = run.wait()
    assert code == 0, run.text()[-4000:]
    return dict(workdir=tmp / "run", metrics=_metrics(tmp / "run"), text=run.text())


def test_timing_fields_are_logged(reference):
    rows = reference["metrics"]
    assert sorted(rows) == list(range(1, STEPS + 1))
    for step, r in rows.items():
        for key in ("step_time_s", "input_wait_s", "compute_s", "host_s", "samples_per_sec",
                    "tflops_per_device"):
            assert key in r and r[key] >= 0, (step, key, r)
        assert r["step_time_s"] == pytest.approx(r["input_wait_s"] + r["compute_s"] + r["host_s"])
        assert r["samples_per_sec"] == pytest.approx(8 / r["step_time_s"])
        assert "mfu" not in r  # the CPU has no entry in the peak table
    assert "compile_s" in rows[1] and rows[1]["compile_s"] > 0
    assert not any("compile_s" in rows[s] for s in range(2, STEPS + 1))
    assert rows[EVERY + 1]["host_s"] > 0  # step EVERY's save ran in step EVERY's host time
    m = re.search(r"wall time ([\d.]+) s: compile ([\d.]+) s, input ([\d.]+) s, compute ([\d.]+) s, "
                  r"host ([\d.]+) s, checkpoint ([\d.]+) s, eval ([\d.]+) s", reference["text"])
    assert m, reference["text"][-2000:]
    wall, *parts = map(float, m.groups())
    assert 0 < sum(parts) <= wall


def test_profile_trace_is_written(reference):
    traces = list((reference["workdir"] / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, traces
    assert "profile of steps 2-3 written" in reference["text"]


def test_kill_at_several_moments_resumes_from_the_newest_complete_step(reference, tmp_path):
    args = _args(tmp_path / "run", STEPS, EVERY)
    records = _kill_chain(tmp_path, args, [_during_save(2), _at_step(5)], reference["metrics"])
    print("\n".join(json.dumps(r) for r in records))
    assert records[1]["reached"] >= 5 and records[1]["steps_lost"] <= 3


def _stop_with(sig: int, reference, tmp_path, twice: bool = False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    args = _args(tmp_path / "run", STEPS, EVERY)
    run = Run(args, tmp_path / "first.log")
    assert run.wait_for(lambda: _last_step(tmp_path / "run") >= 3, "step 3")
    run.signal(sig)
    if twice:
        assert run.wait_for(lambda: "received: finishing" in run.text(), "the first signal's message")
        run.signal(sig)
    return run, run.wait(), args


def test_sigterm_saves_the_current_step_and_resumes(reference, tmp_path):
    run, code, args = _stop_with(signal.SIGTERM, reference, tmp_path)
    text = run.text()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    m = re.search(r"stopped by SIGTERM after step (\d+); saved in (\S+)/(\d+)\. Resume with the same "
                  r"command: (.+)", text)
    assert m, text[-3000:]
    step = int(m.group(1))
    assert 3 <= step < STEPS and int(m.group(3)) == step
    assert m.group(2) == str((tmp_path / "run" / "checkpoints").absolute())
    assert _committed(tmp_path / "run")[-1] == step
    assert (tmp_path / "run" / "checkpoints" / str(step) / "SHA256SUMS.json").is_file()
    # The printed command resumes it.
    resume = shlex.split(m.group(4))
    assert resume[0] == "python" and resume[1:] == args, resume
    again = Run(resume[1:], tmp_path / "resume.log")
    assert again.wait() == 0, again.text()[-3000:]
    assert _resumed_from(again.text()) == step
    got = _metrics(tmp_path / "run")
    assert [got[s]["loss"] for s in sorted(got)] == [reference["metrics"][s]["loss"] for s in sorted(got)]
    assert sorted(got) == list(range(1, STEPS + 1))


def test_sigint_saves_and_a_second_sigint_stops_at_once(reference, tmp_path):
    run, code, _ = _stop_with(signal.SIGINT, reference, tmp_path / "once")
    assert code == 128 + signal.SIGINT, run.text()[-3000:]
    assert "stopped by SIGINT after step" in run.text()
    run, code, _ = _stop_with(signal.SIGINT, reference, tmp_path / "twice", twice=True)
    text = run.text()
    assert code != 0 and "KeyboardInterrupt" in text and "Resume with" not in text, (code, text[-3000:])


# The sweep: 20+ moments in one chain of a 16-step run with a checkpoint every 3 steps and the
# final evaluation.
SWEEP_STEPS, SWEEP_EVERY = 16, 3
SWEEP = [START_UP, FIRST_STEP, _at_step(2), _during_save(3), _after_commit(3), _at_step(4),
         _at_step(5), _during_save(6), _after_commit(6), _at_step(7), _at_step(8),
         _during_save(9), _after_commit(9), _at_step(10), _at_step(11), _during_save(12),
         _after_commit(12), _at_step(13), _at_step(14), _during_save(15), _after_commit(15),
         _during_save(16), _after_commit(16), FINAL_EVAL]


@pytest.mark.slow
def test_kill_sweep(tmp_path):
    ref_dir = tmp_path / "reference"
    ref = Run(_args(ref_dir, SWEEP_STEPS, SWEEP_EVERY, evaluate=True), tmp_path / "reference.log")
    assert ref.wait() == 0, ref.text()[-3000:]
    args = _args(tmp_path / "run", SWEEP_STEPS, SWEEP_EVERY, evaluate=True)
    records = _kill_chain(tmp_path, args, SWEEP, _metrics(ref_dir))
    (tmp_path / "kill_sweep.json").write_text(json.dumps(records, indent=1))
    print("\n".join(json.dumps(r) for r in records))
    assert len(records) >= 20
    assert all(r["steps_lost"] == r["reached"] - r["newest_complete"] for r in records)


@pytest.mark.parametrize("spec", ["5:2", "0:3", "3", "a:b", "2:3:4", " "])
def test_bad_profile_steps_are_refused(spec):
    from skipclick_jax import config_lib

    cfg = config_lib.base_config(config_lib.tiny_model_config())
    cfg.train.profile_steps = spec
    with pytest.raises(config_lib.ConfigError, match="train.profile_steps"):
        config_lib.validate_config(cfg)


def test_profile_range_and_peak_table():
    import jax
    import jax.numpy as jnp

    from skipclick_jax.defaults.train import profile_range
    from skipclick_jax.train.timing import peak_tflops, step_flops

    assert profile_range("") is None and profile_range("20:25") == (20, 25)
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989 and peak_tflops("NVIDIA H100 PCIe") == 756
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312 and peak_tflops("NVIDIA H200") == 989
    assert peak_tflops("TPU v5 lite") == 197 and peak_tflops("TPU v5p") == 459
    assert peak_tflops("TPU v4") == 275 and peak_tflops("TPU v6 lite") == 918
    assert peak_tflops("cpu") is None and peak_tflops("NVIDIA GeForce RTX 4090") is None
    compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
    assert step_flops(compiled) == pytest.approx(2 * 64 * 32 * 16, rel=0.05)


def test_step_timer_intervals_and_account():
    from skipclick_jax.train.timing import StepTimer

    timer = StepTimer(batch_size=8, flops_per_step=4e12, device_kind="NVIDIA H100 80GB HBM3", started=0.0)
    timer.add("compile", 30.0)
    timer.add("eval", 20.0, in_steps=False)  # the untrained evaluation before the first step
    for _ in range(2):
        timer.add("input", 0.5)
        timer.add("compute", 1.0)
        timer.add("host", 0.25)
        timer.step_done()
    timer.add("checkpoint", 0.5)
    m = timer.interval()
    assert m["step_time_s"] == pytest.approx(2.0) and m["host_s"] == pytest.approx(0.5)
    assert m["input_wait_s"] == pytest.approx(0.5) and m["compute_s"] == pytest.approx(1.0)
    assert m["samples_per_sec"] == pytest.approx(4.0) and m["tflops_per_device"] == pytest.approx(2.0)
    assert m["mfu"] == pytest.approx(2.0 / 989)
    assert timer.total["eval"] == 20.0 and timer.interval()["step_time_s"] == 0.0  # a new interval
    assert "compile 30.0 s, input 1.0 s, compute 2.0 s, host 0.5 s, checkpoint 0.5 s, eval 20.0 s" in timer.account()
