"""train.py end to end on a small test_tiny: resume equals an uninterrupted run (losses, parameters
and optimizer state, bit for bit), a corrupted checkpoint is skipped, a non-finite loss and
non-finite parameters each stop training with the last good checkpoint kept, only the last N
checkpoints are retained, --init-from a run directory starts from its weights, previews and
TensorBoard events are written.

All runs happen in one subprocess (a fresh JAX with a persistent compilation cache, so the resumed
run reuses the first run's executable); the tests assert on its JSON report.
"""

import json
import logging
import pathlib
import shutil
import sys

import numpy as np
import pytest

from tests.helpers import fast_compile_env, run_python, small_train_config


def small_config(data_dir: str):
    return small_train_config(data_dir, num_steps=4, num_val=4)


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _run_child(out: pathlib.Path) -> None:
    import jax
    from flax import nnx

    from skipclick_jax import checkpoint, config_lib
    from skipclick_jax.train import trainer as train
    from skipclick_jax.train.state import pick

    logging.basicConfig(level=logging.WARNING)
    cfg = small_config(str(out / "tfds"))
    report = {}

    # Uninterrupted: 4 steps, a checkpoint after every step, previews every 2 steps.
    a = out / "a"
    cfg.train.image_summary_every_steps = 2
    final_a = jax.device_get(train.train_and_evaluate(cfg, a))
    cfg.train.image_summary_every_steps = 0
    report["a"] = _losses(a)
    report["pngs"] = len(list((a / "images").glob("*.png")))
    report["tensorboard"] = len(list((a / "tensorboard").glob("events.*")))

    # --init-from a run directory: training starts from that run's latest parameters.
    cfg.train.num_steps = 0
    init = train.train_and_evaluate(cfg, out / "init", init_from=str(a))
    cfg.train.num_steps = 4
    want = pick(nnx.to_pure_dict(nnx.state(checkpoint.load(a)[0])), init.params)
    report["init_from_equal"] = all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(init.params), jax.tree.leaves(want)))

    # Interrupted after step 3 whose checkpoint got corrupted: resumes from 2, runs 3 and 4.
    b = out / "b"
    shutil.copytree(a, b)
    (b / "metrics.jsonl").unlink()
    shutil.rmtree(b / "checkpoints" / "4")
    for f in (b / "checkpoints" / "3").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    final_b = jax.device_get(train.train_and_evaluate(cfg, b))
    report["b"] = _losses(b)
    report["b_dirs"] = sorted(p.name for p in (b / "checkpoints").iterdir())
    same = lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y)))  # noqa: E731
    for part in ("params", "opt_state", "step", "rng"):
        la, lb = jax.tree.leaves(getattr(final_a, part)), jax.tree.leaves(getattr(final_b, part))
        report[f"resume_{part}_equal"] = len(la) == len(lb) > 0 and all(map(same, la, lb))
    report["opt_state_leaves"] = len(jax.tree.leaves(final_a.opt_state))

    # Retention: keep_checkpoints=2 leaves the last two steps only.
    c = out / "c"
    cfg.train.keep_checkpoints = 2
    train.train_and_evaluate(cfg, c)
    cfg.train.keep_checkpoints = 10
    report["c_dirs"] = sorted(p.name for p in (c / "checkpoints").iterdir() if p.name.isdigit())

    # A non-finite loss (NaN focal-loss alpha) at step 5: stops before saving step 5. A changed
    # loss in a used workdir is refused, so this is a copy of run b whose config has that alpha.
    cfg.train.update(num_steps=6)
    cfg.train.loss.alpha = float("nan")
    b_nan = out / "b_nan"
    shutil.copytree(b, b_nan)
    (b_nan / "checkpoints" / "config.json").write_text(config_lib.config_to_json(cfg))
    try:
        train.train_and_evaluate(cfg, b_nan)
        report["loss_nan_error"] = None
    except FloatingPointError as e:
        report["loss_nan_error"] = str(e)
    cfg.train.loss.alpha = 0.5
    report["latest_after_loss_nan"] = max(int(p.name) for p in (b_nan / "checkpoints").iterdir()
                                          if p.name.isdigit())

    # A NaN learning rate: step 5's loss is finite but it leaves NaN parameters, never saved.
    cfg.train.optimizer.lr = float("nan")
    try:
        train.train_and_evaluate(cfg, b)
        report["nan_error"] = None
    except FloatingPointError as e:
        report["nan_error"] = str(e)
    model, _ = checkpoint.load(b)
    report["latest_after_nan"] = max(int(p.name) for p in (b / "checkpoints").iterdir() if p.name.isdigit())
    report["loaded_finite"] = bool(all(np.isfinite(x).all() for x in jax.tree.leaves(model)))
    (out / "report.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_loop")
    env = fast_compile_env(out / "jax_cache")
    proc = run_python(__file__, out, env=env, timeout=2400)
    rep = json.loads((out / "report.json").read_text())
    rep["stderr"] = proc.stderr
    return rep


def test_resume_matches_uninterrupted_run(report):
    a, b = report["a"], report["b"]
    assert sorted(a) == ["1", "2", "3", "4"], a
    assert sorted(b) == ["3", "4"], b
    assert [b["3"], b["4"]] == [a["3"], a["4"]]  # same CPU executable: bit for bit
    assert report["opt_state_leaves"] > 0
    for part in ("params", "opt_state", "step", "rng"):
        assert report[f"resume_{part}_equal"], part


def test_only_the_last_n_checkpoints_are_kept(report):
    assert report["c_dirs"] == ["3", "4"], report["c_dirs"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(report):
    err = report["loss_nan_error"]
    assert err and "non-finite loss nan" in err and "at step 5" in err and "step 4" in err, err
    assert report["latest_after_loss_nan"] == 4


def test_corrupted_checkpoint_is_skipped_with_a_warning(report):
    assert "checkpoints/3 is unreadable" in report["stderr"]
    assert any(d.startswith("corrupt_3") for d in report["b_dirs"]), report["b_dirs"]
    assert "config.json" in report["b_dirs"]


def test_non_finite_parameters_stop_and_keep_last_good_checkpoint(report):
    err = report["nan_error"]
    assert err and "non-finite parameters after step 5" in err and "step 4" in err, err
    assert report["latest_after_nan"] == 4
    assert report["loaded_finite"]


def test_init_from_run_directory(report):
    assert report["init_from_equal"]


def test_summaries_are_written(report):
    assert report["pngs"] == 2 and report["tensorboard"] >= 1


if __name__ == "__main__":
    _run_child(pathlib.Path(sys.argv[1]))
