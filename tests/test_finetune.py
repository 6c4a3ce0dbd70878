"""configs/finetune.py end to end on a generated ImageMasks folder (the tiny variant): train.py
with --init-from a project checkpoint runs, resumes, and its NoC on the validation split improves
over the initial model; eval.py reads the same validation split as COCO= and ImageMasks= and
reproduces the final table.
"""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import custom_data_fixtures as fx

ROOT = pathlib.Path(__file__).resolve().parents[1]
eval_cli = importlib.import_module("eval")


def _train(args, env):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from skipclick_jax import checkpoint, config_lib
    from skipclick_jax.model import build_model

    out = tmp_path_factory.mktemp("finetune")
    fx.write_shapes(out / "train", 40, seed=1)
    val_objects = fx.write_shapes(out / "val", 6, seed=2, coco=True)
    cfg = config_lib.load_config_file(ROOT / "configs" / "finetune.py", "tiny")
    checkpoint.save(out / "init", build_model(cfg.model, seed=0), cfg)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    common = ["--config", f"{ROOT / 'configs' / 'finetune.py'}:tiny", "--workdir", str(out / "run"),
              "--init-from", str(out / "init"), "--config.data.name=ImageMasks",
              f"--config.data.root={out / 'train'}", f"--config.data.eval_roots.ImageMasks={out / 'val'}",
              f"--config.data.data_dir={out / 'tfds'}"]
    first = _train(common + ["--config.train.num_steps=30"], env)
    second = _train(common, env)
    return out, val_objects, first, second


def _summary(path):
    return json.loads(path.read_text())


def test_finetune_runs_resumes_and_improves(run):
    out, val_objects, first, second = run
    assert "resumed from" in second and "/30" in second
    assert "eval dataset COCO skipped: no folder in data.eval_roots.COCO" in first
    before = _summary(out / "run" / "eval" / "untrained" / "summary.json")["ImageMasks"]
    after = _summary(out / "run" / "eval" / "step_60" / "summary.json")["ImageMasks"]
    assert before["instances"] == after["instances"] == val_objects
    assert set(after) >= {"instances", "noc", "nof", "miou"}
    assert after["noc"]["85"] <= before["noc"]["85"] - 4, (before["noc"], after["noc"])
    assert after["miou"][0] > before["miou"][0] + 0.2
    assert "NoC evaluation, untrained" in second and "NoC evaluation, step_60" in second


def test_eval_cli_reads_the_validation_split_as_coco_and_as_image_masks(run, tmp_path):
    out, val_objects, _, _ = run
    summary = eval_cli.main(["--checkpoint", str(out / "run"), "--dataset",
                             f"COCO={out / 'val' / 'annotations.json'}", "--dataset",
                             f"ImageMasks={out / 'val'}", "--out", str(tmp_path / "eval"),
                             "--data-dir", str(out / "tfds")])
    written = _summary(tmp_path / "eval" / "summary.json")
    final = _summary(out / "run" / "eval" / "step_60" / "summary.json")["ImageMasks"]
    for name in ("COCO", "ImageMasks"):
        assert written[name]["instances"] == val_objects
        assert written[name]["noc"] == final["noc"] and written[name]["nof"] == final["nof"]
        assert written[name]["miou"] == pytest.approx(final["miou"], abs=1e-6)
    assert summary["COCO"]["noc"] == written["COCO"]["noc"]
