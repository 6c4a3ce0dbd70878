"""Reliability of train.py runs: corrupted/unsealed checkpoints fall back to the newest step that
verifies, a changed config or a too-small num_steps is refused with nothing touched, the workdir
is locked (a second run refused, a stale lock reported), bad values and folders are refused before
training, a failed save stops at once keeping the earlier steps, eval.py evaluates a run's own
Synthetic split and keeps earlier results.

The train.py scenarios run in one subprocess (one compilation, as in test_train_loop); the tests
assert on its JSON report.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import ROOT, fast_compile_env, run_python, small_train_config


def small_config(data_dir: str):
    return small_train_config(data_dir, num_steps=3, num_val=2)


def _tree(path: pathlib.Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file below `path` (folders: their names), except
    the lock file, which every attempt takes and releases."""
    return {p.relative_to(path).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(path.rglob("*")) if p.name != "train.lock"}


def _largest(folder: pathlib.Path) -> pathlib.Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_bytes(path: pathlib.Path, at: float) -> None:
    data = bytearray(path.read_bytes())
    i = int(at * (len(data) - 8))
    data[i:i + 8] = bytes(255 - b for b in data[i:i + 8])
    path.write_bytes(bytes(data))


def _outcome(fn) -> str | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the report records the type and the message
        return f"{type(e).__name__}: {e}"
    return None


def _run_child(out: pathlib.Path) -> None:
    from skipclick_jax.evaluation import cli as eval_cli
    from skipclick_jax.train import run_checkpoints as checkpointing, trainer as train

    logging.basicConfig(level=logging.WARNING)
    cfg = small_config(str(out / "tfds"))
    rep = {"child_pid": os.getpid()}

    def losses(workdir):
        return [(r["step"], r["loss"]) for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]

    # A complete run: every step sealed with its digests.
    a = out / "a"
    train.train_and_evaluate(cfg, a)
    rep["a_losses"] = losses(a)
    rep["a_sealed"] = sorted(int(p.parent.name) for p in (a / "checkpoints").glob("*/SHA256SUMS.json"))
    rep["a_lock_after"] = (a / "train.lock").read_text()

    # Step 3 unsealed (killed before its digests), step 2's optimizer state corrupted in place:
    # resume falls back to step 1, sets 2 and 3 aside, retrains them; metrics.jsonl keeps one row a step.
    b = out / "b"
    shutil.copytree(a, b)
    (b / "checkpoints" / "3" / "SHA256SUMS.json").unlink()
    _flip_bytes(_largest(b / "checkpoints" / "2" / "train"), 0.5)
    train.train_and_evaluate(cfg, b)
    rep["b_losses"] = losses(b)
    rep["b_dirs"] = sorted(p.name for p in (b / "checkpoints").iterdir())

    # Every step corrupted: refused, nothing renamed or written.
    c = out / "c"
    shutil.copytree(a, c)
    for step in (1, 2, 3):
        _flip_bytes(_largest(c / "checkpoints" / str(step) / "params"), 0.1 * step)
    before = _tree(c)
    rep["c_error"] = _outcome(lambda: train.train_and_evaluate(cfg, c))
    rep["c_unchanged"] = _tree(c) == before

    # A changed model in a used workdir: refused before anything is touched.
    before = _tree(a)
    changed = small_config(str(out / "tfds"))
    changed.model.head.embed_dim = 32
    changed.train.seed = 5
    rep["changed_error"] = _outcome(lambda: train.train_and_evaluate(changed, a))
    # A smaller num_steps on a finished run: refused (it would evaluate step 3 as step 2).
    cfg.train.num_steps = 2
    rep["fewer_steps_error"] = _outcome(lambda: train.train_and_evaluate(cfg, a))
    cfg.train.num_steps = 3
    # A second run while one holds the workdir.
    lock = checkpointing.WorkdirLock(a)
    rep["locked_error"] = _outcome(lambda: train.train_and_evaluate(cfg, a))
    lock.release()
    rep["a_unchanged"] = _tree(a) == before

    # Bad values and folders: refused before a workdir or a checkpoint exists.
    cfg.train.keep_checkpoints = 0
    rep["keep0_error"] = _outcome(lambda: train.train_and_evaluate(cfg, out / "keep0"))
    rep["keep0_exists"] = (out / "keep0").exists()
    cfg.train.keep_checkpoints = 10
    cfg.data.eval_datasets = ("GrabCut",)
    cfg.data.eval_roots.GrabCut = str(out / "no_such_grabcut")
    rep["root_error"] = _outcome(lambda: train.train_and_evaluate(cfg, out / "roots"))
    rep["root_steps"] = sorted(p.name for p in (out / "roots" / "checkpoints").glob("[0-9]*"))
    cfg.data.eval_datasets = ()

    # eval.py on the run: Synthetic= is the run's own val split (56 px, 2 images), and an --out
    # with results is kept unless --overwrite.
    ev = out / "eval_a"
    args = ["--checkpoint", str(a), "--dataset", "Synthetic=", "--out", str(ev),
            "--config.eval.max_clicks=1", "--no-flip", "--data-dir", str(out / "tfds")]
    summary = eval_cli.main(args)
    rep["eval_instances"] = summary["Synthetic"]["instances"]
    rep["eval_hw"] = sorted({(r["height"], r["width"]) for r in json.loads((ev / "Synthetic" / "clicks.json").read_text())})
    before = _tree(ev)
    try:
        eval_cli.main(args)
        rep["eval_again"] = None
    except SystemExit as e:
        rep["eval_again"] = e.code
    rep["eval_unchanged"] = _tree(ev) == before
    (out / "report.json").write_text(json.dumps(rep))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability_train")
    env = fast_compile_env(out / "jax_cache")
    proc = run_python(__file__, out, env=env, timeout=900)
    rep = json.loads((out / "report.json").read_text())
    rep["stderr"], rep["out"] = proc.stderr, str(out)
    return rep


def test_every_completed_step_is_sealed_and_the_lock_released(report):
    assert [s for s, _ in report["a_losses"]] == [1, 2, 3]
    assert report["a_sealed"] == [1, 2, 3]
    assert report["a_lock_after"] == ""


def test_resume_falls_back_to_the_newest_verified_step(report):
    a, b = dict(report["a_losses"]), report["b_losses"]
    assert [s for s, _ in b] == [1, 2, 3], b  # rows after the restored step were dropped, then relogged
    np.testing.assert_allclose([l for _, l in b], [a[1], a[2], a[3]], rtol=1e-6)
    assert "checkpoints/3 is unreadable" in report["stderr"] and "SHA256SUMS.json is missing" in report["stderr"]
    assert "checkpoints/2 is unreadable" in report["stderr"] and "differs from the SHA-256" in report["stderr"]
    dirs = report["b_dirs"]
    assert {"1", "2", "3", "config.json"} <= set(dirs)
    assert sum(d.startswith("corrupt_2_") for d in dirs) == 1 and sum(d.startswith("corrupt_3_") for d in dirs) == 1


def test_no_verified_step_is_an_error_that_changes_nothing(report):
    err = report["c_error"]
    assert err.startswith("WorkdirError: no checkpoint in") and "verifies" in err, err
    assert all(f"step {s}:" in err for s in (1, 2, 3)) and "Nothing was changed" in err
    assert report["c_unchanged"]


def test_changed_config_in_a_used_workdir_is_refused(report):
    err = report["changed_error"]
    assert err.startswith("WorkdirError:"), err
    assert "model.head.embed_dim: 64 in the run, 32 now" in err and "train.seed: 0 in the run, 5 now" in err
    assert "pass another --workdir" in err
    assert report["a_unchanged"]


def test_smaller_num_steps_is_refused(report):
    assert "already holds step 3, past train.num_steps=2" in report["fewer_steps_error"]


def test_second_run_in_a_locked_workdir_is_refused(report):
    err = report["locked_error"]
    assert err.startswith("WorkdirError:") and "is in use by another train.py run (pid" in err, err
    assert f"(pid {report['child_pid']} on " in err


def test_bad_values_and_folders_are_refused_before_training(report):
    assert "train.keep_checkpoints=0 is invalid: expected an integer >= 1" in report["keep0_error"]
    assert not report["keep0_exists"]
    assert "LayoutError: GrabCut: dataset root folder" in report["root_error"]
    assert "no_such_grabcut" in report["root_error"] and report["root_steps"] == []


def test_eval_uses_the_runs_synthetic_split_and_keeps_results(report):
    assert report["eval_hw"] == [[56, 56]]
    assert 4 <= report["eval_instances"] <= 10  # 2 images of 2..5 objects (the default split has 24)
    assert report["eval_again"] == 2 and report["eval_unchanged"]


def test_train_cli_exit_code_and_message(report):
    """The command line: a changed config in the used workdir -> exit 1, the message, no traceback."""
    a = pathlib.Path(report["out"]) / "a"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = run_python(ROOT / "train.py", "--config", ROOT / "configs" / "tiny_synthetic.py", "--workdir", a,
                      env=env, timeout=300, returncode=1)
    assert "train.py: error:" in proc.stderr and "model.crop_size: 56 in the run, 112 now" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- in this process
def test_lock_held_by_another_process_and_stale_lock(tmp_path, caplog):
    from skipclick_jax.train.run_checkpoints import WorkdirError, WorkdirLock

    code = ("import sys, time; from skipclick_jax.train.run_checkpoints import WorkdirLock; "
            "WorkdirLock(sys.argv[1]); print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirError, match=f"in use by another train.py run \\(pid {holder.pid} on "):
            WorkdirLock(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((tmp_path / "train.lock").read_text())["pid"] == holder.pid  # left behind
    with caplog.at_level(logging.WARNING):
        lock = WorkdirLock(tmp_path)
    assert f"stale lock {tmp_path / 'train.lock'} found (pid {holder.pid}" in caplog.text
    lock.release()


def _read_only(path: pathlib.Path):
    """Makes `path` unwritable (chmod for users, chattr +i for root); returns the undo, or None."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)
    return None


def test_failed_save_stops_at_once_and_keeps_earlier_steps(tmp_path):
    import jax
    import jax.numpy as jnp

    from skipclick_jax import checkpoint
    from skipclick_jax.train.run_checkpoints import Checkpointer, CheckpointSaveError
    from skipclick_jax.train.state import TrainState

    class Iterator:
        def get_state(self):
            return {"position": 1}

        def set_state(self, state):
            self.state = state

    cfg = small_config(str(tmp_path / "tfds"))
    state = TrainState(step=jnp.int32(1), params={"w": jnp.ones(4)}, opt_state={"m": jnp.zeros(4)},
                       rng=jax.random.key_data(jax.random.key(0)))
    ckpt = Checkpointer(tmp_path / "run", keep=3, config=cfg)
    ckpt.save(state, {}, Iterator())
    ckpt.wait()
    undo = _read_only(ckpt.directory)
    if undo is None:
        ckpt.close()
        pytest.skip("cannot make a directory read-only here (root without chattr)")
    try:
        start = time.monotonic()
        with pytest.raises(CheckpointSaveError, match=r"saving checkpoint step 2 in .*checkpoints failed.*steps \[1\]"):
            ckpt.save(state.replace(step=jnp.int32(2)), {}, Iterator())
        assert time.monotonic() - start < 60
    finally:
        undo()
        ckpt.close()
    checkpoint.verify_digests(ckpt.directory / "1")
    assert sorted(p.name for p in ckpt.directory.iterdir() if p.name.isdigit()) == ["1"]

    # Unwritable from the start: refused before training, naming the directory.
    (tmp_path / "run2" / "checkpoints").mkdir(parents=True)
    undo = _read_only(tmp_path / "run2" / "checkpoints")
    try:
        with pytest.raises(CheckpointSaveError, match=r"run2/checkpoints is not writable"):
            Checkpointer(tmp_path / "run2", keep=3, config=cfg)
    finally:
        undo()
    assert not (tmp_path / "run2" / "train.lock").read_text()  # released


if __name__ == "__main__":
    _run_child(pathlib.Path(sys.argv[1]))
