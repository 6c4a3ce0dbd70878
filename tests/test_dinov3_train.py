"""Training SkipClick-DINOv3: the train step's training-mode backbone (RoPE coordinate rescale in the
loss forward only, behind `train.backbone_train_mode`), buffers that are never trained, and
train.py on `test_tiny_dinov3` for a few steps on the Synthetic data (then its NoC evaluation)."""

from __future__ import annotations

import json
import os
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from skipclick_jax import config_lib
from skipclick_jax.model import build_model
from skipclick_jax.train import optim, state as state_lib, step as step_lib
from skipclick_jax.defaults.train import train_defaults
from skipclick_jax.weights.mapping import flatten
from tests.helpers import ROOT, run_python


def small_dinov3(crop: int = 64):
    """test_tiny_dinov3 with 4 blocks at a small crop, LayerScale 1 (so RoPE changes the taps)."""
    cfg = config_lib.tiny_model_config("dinov3")
    cfg.crop_size = crop
    cfg.backbone.update(depth=4, taps=(0, 1, 2, 3), layerscale_init=1.0)
    return cfg


def batch(crop: int, n: int = 2):
    rng = np.random.default_rng(0)
    gt = np.zeros((n, crop, crop), np.float32)
    gt[:, crop // 4: crop // 2, crop // 4: crop // 2] = 1
    points = -np.ones((n, 48, 3), np.float32)
    points[:, 0] = (crop * 3 // 8, crop * 3 // 8, 0)
    return dict(image=rng.integers(0, 256, (n, crop, crop, 3), dtype=np.uint8), gt=gt, points=points)


@pytest.mark.parametrize("frozen", [True, False])
def test_buffers_are_never_trained(frozen):
    """RoPE periods and bias masks are in the frozen tree (no gradient, no optimizer state) even
    when the backbone itself trains."""
    from skipclick_jax.model.dinov3 import Buffer

    cfg = small_dinov3()
    model = build_model(cfg)
    graphdef, params, frozen_tree = state_lib.split_model(model, frozen)
    names = lambda tree: {k for k, _ in flatten(tree)}  # noqa: E731
    buffers = names(nnx.to_pure_dict(nnx.state(model, Buffer)))
    assert len(buffers) == 1 + 4 and not buffers & names(params) and buffers <= names(frozen_tree)
    assert frozen == ("feature_extractor" not in params)
    tx, schedule = optim.make_optimizer(train_defaults(), 10)
    st = state_lib.init_state(params, tx, 0)
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(st.opt_state)]
    assert not [p for p in opt_paths if "bias_mask" in p or "periods" in p]
    assert frozen or [p for p in opt_paths if "'qkv'" in p and "feature_extractor" in p]
    if not frozen:  # one step trains the backbone but leaves its buffers (in `frozen_tree`) alone
        step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, max_num_next_clicks=1))
        new, metrics = step(st, frozen_tree, batch(cfg.crop_size))
        assert np.isfinite(float(metrics["loss"]))
        qkv = lambda p: np.asarray(p["feature_extractor"]["blocks"][0]["attn"]["qkv"]["kernel"])  # noqa: E731
        assert not np.array_equal(qkv(new.params), qkv(params))


def test_loss_forward_runs_the_backbone_in_training_mode():
    """Same state and batch: the loss differs with the switch on (RoPE rescale drawn from the step's
    key) and is reproducible; off, it is the eval-mode backbone's (deterministic) loss."""
    cfg = small_dinov3()
    cfg.head.dropout = 0.0  # the only other use of the step's keys (with no simulated clicks)
    graphdef, params, frozen = state_lib.split_model(build_model(cfg), True)
    tx, schedule = optim.make_optimizer(train_defaults(), 10)
    st = state_lib.init_state(params, tx, 0)
    data = batch(cfg.crop_size)

    def loss(on: bool, st) -> float:
        step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, max_num_next_clicks=0,
                                                backbone_train_mode=on))
        return [float(step(s, frozen, data)[1]["loss"]) for s in st]

    st2 = st.replace(step=st.step + 1)  # another step: another rescale draw
    (on, on2), (off, off2) = loss(True, (st, st2)), loss(False, (st, st2))
    assert off == off2  # eval-mode backbone: the loss does not depend on the step's key
    assert abs(on - off) > 1e-6 and abs(on2 - off) > 1e-6 and on != on2, (on, on2, off)
    assert on == loss(True, (st,))[0]


def test_train_py_trains_test_tiny_dinov3(tmp_path):
    """train_and_evaluate (skipclick_jax.train.trainer, train.py's trainer) on
    configs/test_tiny_dinov3.py (crop 112) for 3 steps on the Synthetic data, then the NoC
    evaluation; the run directory loads back as a DINOv3 model whose frozen backbone (parameters
    and buffers) is the initial one."""
    script = textwrap.dedent(f"""
        import json, pathlib, sys
        import jax, numpy as np
        from flax import nnx
        sys.path.insert(0, {str(ROOT)!r})
        import skipclick_jax
        from skipclick_jax import config_lib
        from skipclick_jax.model import build_model
        from skipclick_jax.train import trainer as train
        out = pathlib.Path({str(tmp_path)!r})
        cfg = config_lib.load_config_file({str(ROOT / "configs" / "test_tiny_dinov3.py")!r})
        synthetic = config_lib.load_config_file({str(ROOT / "configs" / "tiny_synthetic.py")!r})
        cfg.train, cfg.data, cfg.eval = synthetic.train, synthetic.data, synthetic.eval
        cfg.model.crop_size = 112
        cfg.train.update(batch_size=2, num_steps=3, checkpoint_every_steps=3, log_every_steps=1,
                         image_summary_every_steps=0, eval_untrained=False)
        cfg.data.update(data_dir=str(out / "tfds"), epoch_len=8)
        cfg.data.synthetic.update(image_size=(112, 112), num_train=8, num_val=2)
        cfg.eval.update(max_clicks=2)
        train.train_and_evaluate(cfg, out / "run")
        model, config = skipclick_jax.load(out / "run")
        init = build_model(cfg.model, seed=cfg.train.seed)
        fe = lambda m: nnx.to_pure_dict(nnx.state(m.feature_extractor))
        report = dict(
            kind=type(model.feature_extractor).__name__,
            losses=[json.loads(l)["loss"] for l in (out / "run" / "metrics.jsonl").read_text().splitlines()],
            backbone_unchanged=all(np.array_equal(a, b) for a, b in
                                   zip(jax.tree.leaves(fe(model)), jax.tree.leaves(fe(init)))),
            eval=sorted(p.name for p in (out / "run" / "eval").iterdir()),
        )
        (out / "report.json").write_text(json.dumps(report))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run_python("-c", script, env=env, timeout=1500)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kind"] == "DinoV3"
    assert len(report["losses"]) == 3 and all(np.isfinite(report["losses"]))
    assert report["backbone_unchanged"]
    assert report["eval"] == ["step_3"]
    summary = json.loads((tmp_path / "run" / "eval" / "step_3" / "summary.json").read_text())
    assert set(summary) == {"Synthetic"}
