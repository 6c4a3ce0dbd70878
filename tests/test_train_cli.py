"""The train.py command line: config-file overrides (read as eval.py reads them), and (slow) the
README's tiny Synthetic run."""

import json
import os
import pathlib
import subprocess

import pytest
from absl import flags
from ml_collections import config_flags

from skipclick_jax import config_lib
from tests.helpers import ROOT, run_python


def _train(workdir: pathlib.Path, *overrides: str, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return run_python(ROOT / "train.py", "--config", ROOT / "configs" / "tiny_synthetic.py",
                      "--workdir", workdir, *overrides, env=env, timeout=timeout)


def test_cli_overrides_reach_the_run(tmp_path):
    _train(tmp_path / "run", "--config.train.num_steps=0", "--config.data.eval_datasets=()",
           "--config.data.synthetic.num_train=8", f"--config.data.data_dir={tmp_path / 'tfds'}",
           timeout=600)
    cfg = json.loads((tmp_path / "run" / "checkpoints" / "config.json").read_text())
    assert cfg["train"]["num_steps"] == 0 and cfg["data"]["eval_datasets"] == []
    assert cfg["data"]["synthetic"]["num_train"] == 8 and cfg["model"]["crop_size"] == 112


OVERRIDES = ["--config.train.num_steps=0x10", "--config.train.eval_untrained=F", "--config.eval.flip=false",
             "--config.train.optimizer.lr=1", "--config.data.eval_datasets=('GrabCut', 'DAVIS')",
             "--config.data.root=/data/x=y", "--config.eval.sizes.DAVIS=448", "--config.eval.batch_size=3",
             "--config.eval.batch_size=4"]


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections' file loader
def test_train_and_eval_read_overrides_alike():
    """train.py's absl config flag and eval.py's `config_lib.override` give the same config for the
    same --config.<key>=<value> arguments (every field type, last one wins)."""
    path = str(ROOT / "configs" / "tiny_synthetic.py")
    argv = ["train.py", "--config", path, *OVERRIDES]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv, lock_config=True)
    flag_values(argv)
    cfg = config_lib.load_config_file(path)
    for arg in OVERRIDES:
        config_lib.override(cfg, *config_lib.override_arg(arg))
    assert cfg.to_dict() == flag_values.config.to_dict()
    assert (cfg.train.num_steps, cfg.train.eval_untrained, cfg.eval.flip) == (16, False, False)
    assert cfg.data.root == "/data/x=y" and cfg.eval.batch_size == 4
    assert cfg.train.optimizer.lr == 1.0 and isinstance(cfg.train.optimizer.lr, float)
    assert cfg.data.eval_datasets == ("GrabCut", "DAVIS")
    with pytest.raises(ValueError, match="--config.train.eval_untrained=maybe: not a valid bool"):
        config_lib.override(cfg, "train.eval_untrained", "maybe")
    with pytest.raises(KeyError, match="no section 'nope'"):
        config_lib.override(cfg, "nope.x", "1")
    assert config_lib.override_arg("--config.eval.flip") is None and config_lib.override_arg("--out=x") is None


@pytest.mark.slow
def test_tiny_synthetic_training_lowers_noc(tmp_path):
    proc = _train(tmp_path / "run", f"--config.data.data_dir={tmp_path / 'tfds'}", timeout=3600)
    assert "NoC evaluation, untrained" in proc.stdout and "NoC evaluation, step_300" in proc.stdout
    noc = {d: json.loads((tmp_path / "run" / "eval" / d / "summary.json").read_text())["Synthetic"]["noc"]["85"]
           for d in ("untrained", "step_300")}
    assert noc["step_300"] < noc["untrained"] - 2, noc
