"""Scaffolding shared by the test modules: the repository root, small configs, the fast-compile
XLA flags and a runner for Python subprocesses."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
"""XLA:CPU without its expensive optimisation passes: tiny models compile in seconds (for tests
that only check what a program computes, never how fast)."""


def child_env(**extra) -> dict[str, str]:
    """The environment for a Python child on the CPU that imports this repository's package
    (the repository first on PYTHONPATH), plus `extra`."""
    return dict(os.environ, JAX_PLATFORMS="cpu",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra)


def fast_compile_env(cache_dir: pathlib.Path) -> dict[str, str]:
    """`child_env` with `FAST_COMPILE_XLA_FLAGS` and every compilation cached in `cache_dir`."""
    return child_env(JAX_COMPILATION_CACHE_DIR=str(cache_dir), XLA_FLAGS=FAST_COMPILE_XLA_FLAGS,
                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def shrink_model(cfg):
    """`cfg` (a full experiment config) with a 4-block backbone tapped at every block, at 56 px.
    Returns `cfg`."""
    cfg.model.crop_size = 56
    cfg.model.backbone.update(depth=4, taps=(0, 1, 2, 3))
    return cfg


def small_model_config():
    """The paper's recipe around `config_lib.tiny_model_config()`, shrunk (`shrink_model`)."""
    from skipclick_jax import config_lib

    return shrink_model(config_lib.base_config(config_lib.tiny_model_config()))


def small_train_config(data_dir: str, *, num_steps: int, num_val: int):
    """configs/tiny_synthetic.py, shrunk (`shrink_model`): `num_steps` steps of batch 4 with a
    checkpoint after each, on 16 synthetic 56x56 training images and `num_val` validation ones,
    no evaluation datasets; TFDS cache in `data_dir`."""
    from skipclick_jax import config_lib

    cfg = shrink_model(config_lib.load_config_file(ROOT / "configs" / "tiny_synthetic.py"))
    cfg.train.update(batch_size=4, num_steps=num_steps, checkpoint_every_steps=1, keep_checkpoints=10,
                     log_every_steps=1, image_summary_every_steps=0, eval_untrained=False)
    cfg.data.update(epoch_len=64, data_dir=data_dir, eval_datasets=())
    cfg.data.synthetic.update(image_size=(56, 56), num_train=16, num_val=num_val)
    return cfg


def run_python(*args, env: dict | None = None, timeout: float = 600, returncode: int | None = 0,
               cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess:
    """`python *args` (this interpreter) in `cwd`, stdout and stderr captured as text. Unless
    `returncode` is None, asserts the exit status, showing the ends of both streams if it differs."""
    proc = subprocess.run([sys.executable, *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    if returncode is not None:
        assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def stop_process(proc, log=None, timeout: float = 30) -> None:
    """Ends a server started by a test: SIGTERM, then SIGKILL after `timeout` s; closes its log."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    if log is not None:
        log.close()
