"""train.py's --config accepts the config.json written beside a checkpoint (issue #27)."""

import pytest
from absl import flags

from skipclick_jax import config_lib


def test_json_config_flag_loads_json_and_overrides(tmp_path):
    cfg = config_lib.load_config_file("configs/test_tiny.py")
    path = tmp_path / "checkpoints" / "config.json"
    path.parent.mkdir()
    path.write_text(config_lib.config_to_json(cfg))  # has true/false/null: not Python
    assert "true" in path.read_text() or "false" in path.read_text()
    fv = flags.FlagValues()
    argv = ["train.py", f"--config={path}", "--config.train.seed=7"]
    config_lib.define_config_flag("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    assert fv.config.train.seed == 7
    cfg.train.seed = 7
    assert config_lib.config_to_json(fv.config) == config_lib.config_to_json(cfg)
    fv2 = flags.FlagValues()
    config_lib.define_config_flag("config", flag_values=fv2)
    fv2(["train.py", "--config=configs/test_tiny.py"])  # Python configs as before
    assert fv2.config.model.crop_size == cfg.model.crop_size
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    fv3 = flags.FlagValues()
    config_lib.define_config_flag("config", flag_values=fv3)
    with pytest.raises(flags.IllegalFlagValueError, match="bad.json"):
        fv3(["train.py", f"--config={bad}"])


@pytest.mark.slow
def test_train_resumes_with_its_own_config_json(tmp_path):
    """The remedy train.py names for a refused config change works end to end."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = tmp_path / "run"

    def train(config, *overrides):
        return subprocess.run([sys.executable, str(root / "train.py"), "--config", str(config),
                               "--workdir", str(run), *overrides], env=env, cwd=root,
                              capture_output=True, text=True, timeout=900)

    first = train(root / "configs" / "tiny_synthetic.py", "--config.train.num_steps=0",
                  "--config.data.eval_datasets=()", "--config.data.synthetic.num_train=8",
                  f"--config.data.data_dir={tmp_path / 'tfds'}")
    assert first.returncode == 0, first.stderr[-3000:]
    again = train(run / "checkpoints" / "config.json")
    assert again.returncode == 0, again.stderr[-3000:]
