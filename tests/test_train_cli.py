"""The train.py command line: config-file overrides, and (slow) the README's tiny Synthetic run."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _train(workdir: pathlib.Path, *overrides: str, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny_synthetic.py"),
           "--workdir", str(workdir), *overrides]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_cli_overrides_reach_the_run(tmp_path):
    _train(tmp_path / "run", "--config.train.num_steps=0", "--config.data.eval_datasets=()",
           "--config.data.synthetic.num_train=8", f"--config.data.data_dir={tmp_path / 'tfds'}",
           timeout=600)
    cfg = json.loads((tmp_path / "run" / "checkpoints" / "config.json").read_text())
    assert cfg["train"]["num_steps"] == 0 and cfg["data"]["eval_datasets"] == []
    assert cfg["data"]["synthetic"]["num_train"] == 8 and cfg["model"]["crop_size"] == 112


@pytest.mark.slow
def test_tiny_synthetic_training_lowers_noc(tmp_path):
    proc = _train(tmp_path / "run", f"--config.data.data_dir={tmp_path / 'tfds'}", timeout=3600)
    assert "NoC evaluation, untrained" in proc.stdout and "NoC evaluation, step_300" in proc.stdout
    noc = {d: json.loads((tmp_path / "run" / "eval" / d / "summary.json").read_text())["Synthetic"]["noc"]["85"]
           for d in ("untrained", "step_300")}
    assert noc["step_300"] < noc["untrained"] - 2, noc
