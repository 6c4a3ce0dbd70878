"""convert_weights.train_parity (the project's training step) against the PyTorch restatement of
the original trainer (convert_weights.torch_train): loss, step-1 gradients and parameters after
K = 5 Adam steps at test_tiny size, from a randomly initialised PyTorch checkpoint.

Both float32 runs are measured against PyTorch in float64 (the exact result up to ~1e-16): PyTorch's
own float32 run deviates from it by far more than the JAX run does (docs/training-parity.md), so a
JAX-vs-PyTorch-float32 comparison would measure PyTorch's rounding. Tolerances (measured maxima in
brackets, Linux x86 CPU, jax 0.10.2, torch 2.14.1):
  loss, grad_norm: relative 2e-5 [6.5e-7, 3.5e-6];
  gradients: per tensor, max |g - g64| <= 1e-5 * max |g64| [7.5e-7]; all-zero tensors stay zero;
  parameters: the update p_K - p_0 within 0.02 lr where step 1's gradient is above 1e-6 of its
  tensor's maximum [0.0072 lr], within 0.1 lr everywhere [0.040 lr: Adam divides by the gradient's
  RMS, so an exactly-zero-in-theory gradient (e.g. the key bias of attention) made of rounding noise
  turns into an update of up to lr per step; bounded only, not compared].
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from configs.test_tiny import get_config  # noqa: E402
from convert_weights import torch_train, train_parity  # noqa: E402
from convert_weights.torch_reference import build_reference  # noqa: E402

K, B, S, LR = 5, 2, 112, 5e-5
pytestmark = pytest.mark.usefixtures("on_cpu")


def make_inputs(tmp_path, seed=0, num_clicks=(0,) * K, logit_shift=0.0):
    cfg = get_config()
    cfg.model.crop_size = S
    state = build_reference(cfg.model, seed=seed).state_dict()
    state["head.conv_seg.bias"] += logit_shift  # moves the logits away from the click threshold
    torch.save(state, tmp_path / "init.pth")
    rng = np.random.default_rng(seed)
    p = cfg.model.num_max_points
    yy, xx = np.mgrid[:S, :S]
    gt = np.zeros((K, B, S, S), np.float32)
    points = np.full((K, B, 2 * p, 3), -1, np.float32)
    for k in range(K):
        for b in range(B):
            cy, cx = rng.uniform(0.3 * S, 0.7 * S, 2)
            r = rng.uniform(0.1 * S, 0.3 * S)
            gt[k, b] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            gt[k, b][rng.random((S, S)) < 0.02] = -1
            points[k, b, 0] = (int(cy), int(cx), 0)
            points[k, b, p] = (rng.integers(0, S), rng.integers(0, S), 0)
    images = rng.integers(0, 256, (K, B, S, S, 3), dtype=np.uint8)
    np.savez(tmp_path / "b.npz", images=images, points=points, gt=gt, num_clicks=np.asarray(num_clicks))
    return cfg


def run_both(tmp_path, frozen, num_clicks=(0,) * K, logit_shift=0.0, seed=0):
    cfg = make_inputs(tmp_path, seed, num_clicks, logit_shift)
    cfg.model.backbone.frozen = frozen
    cfg.train.optimizer.lr = LR
    argv = ["--checkpoint", str(tmp_path / "init.pth"), "--config", "configs/test_tiny.py",
            "--batches", str(tmp_path / "b.npz"), "--out", str(tmp_path / "o.npz"), "--no-dropout",
            f"--config.model.crop_size={S}", f"--config.model.backbone.frozen={str(frozen).lower()}",
            f"--config.train.optimizer.lr={LR}"]
    assert train_parity.main(argv) == 0
    jax_out = dict(np.load(tmp_path / "o.npz"))
    batches = dict(np.load(tmp_path / "b.npz"))
    init = {k: v.numpy() for k, v in torch.load(tmp_path / "init.pth").items()}
    ref = {}
    for name, dtype in (("t32", torch.float32), ("t64", torch.float64)):
        net = build_reference(cfg.model, seed=None)
        net.load_state_dict(torch.load(tmp_path / "init.pth"))
        ref[name] = torch_train.run_steps(
            net, batches, cfg.train, frozen_backbone=frozen, dropout=False, dtype=dtype,
            steps_per_epoch=cfg.data.epoch_len // cfg.train.batch_size,
            given_points=jax_out["points"] if any(num_clicks) else None)
    return init, jax_out, ref


def check(init, out, t64, t32, frozen):
    assert out["loss"].shape == (K,) and out["grad_norm"].shape == (K,)
    np.testing.assert_allclose(out["loss"], t64["loss"], rtol=2e-5)
    np.testing.assert_allclose(out["grad_norm"], t64["grad_norm"], rtol=2e-5)
    np.testing.assert_allclose(t32["loss"], t64["loss"], rtol=1e-4)  # the float32 reference agrees too
    grads = sorted(k for k in t64 if k.startswith("grad/"))
    assert grads == sorted(k for k in out if k.startswith("grad/"))
    assert any(k.startswith("grad/feature_extractor.") for k in grads) == (not frozen)
    for k in grads:
        g, g64 = out[k], t64[k]
        assert g.shape == g64.shape, k
        scale = np.abs(g64).max()
        if scale == 0:
            assert (g == 0).all(), k
        else:
            assert np.abs(g - g64).max() <= 1e-5 * scale, (k, np.abs(g - g64).max() / scale)
    assert sorted(k for k in out if k.startswith("param/")) == sorted(f"param/{k}" for k in init)
    moved = 0
    for k, p0 in init.items():
        upd, upd64 = out[f"param/{k}"] - p0, t64[f"param/{k}"] - p0
        if f"grad/{k}" not in t64:  # frozen
            np.testing.assert_array_equal(out[f"param/{k}"], p0, err_msg=k)
            continue
        err = np.abs(upd - upd64) / LR
        assert err.max() <= 0.1, (k, err.max())
        g64 = np.abs(t64[f"grad/{k}"])
        determined = g64 > 1e-6 * g64.max()
        if determined.any():
            assert err[determined].max() <= 0.02, (k, err[determined].max())
            moved += int((np.abs(upd64[determined]) > 0.5 * LR).any())
    assert moved > 10  # the updates are real


def test_frozen_backbone_steps_match_the_original_trainer(tmp_path):
    init, out, ref = run_both(tmp_path, frozen=True)
    check(init, out, ref["t64"], ref["t32"], frozen=True)


def test_steps_with_simulated_clicks_match_given_the_same_pixels(tmp_path, monkeypatch):
    """A first step with 3 simulated clicks, then 4 deterministic steps. Each side's rule would draw
    its own random candidate, so the reference takes the project's pixels, checking that each holds
    the click's index at the slot the original rule picks and lies in that rule's candidate set of
    the reference's own predictions; then losses, gradients and parameters compare as for
    deterministic steps. The classifier's bias is shifted by +1.5 so that no prediction lies within
    rounding of the threshold (asserted: every pixel is predicted foreground by a margin, so the
    float32 and float64 candidate sets are the same and the clicks are negative ones, deep in the
    background). Only the first step clicks: later steps start from parameters whose updates differ
    by Adam's amplified rounding noise (module docstring), enough to move a pixel across the
    threshold of an unshifted model."""
    margins, rule = [], torch_train.get_next_points

    def measured(pred, gt, points, click_index, rng, thresh, given=None):
        margins.append(float((pred.double() - thresh).abs().min()))
        return rule(pred, gt, points, click_index, rng, thresh, given)

    monkeypatch.setattr(torch_train, "get_next_points", measured)
    num_clicks = (3, 0, 0, 0, 0)
    init, out, ref = run_both(tmp_path, frozen=True, num_clicks=num_clicks, logit_shift=1.5)
    assert len(margins) == 2 * sum(num_clicks) and min(margins) > 0.1, margins
    check(init, out, ref["t64"], ref["t32"], frozen=True)
    given = dict(np.load(tmp_path / "b.npz"))["points"]
    p = out["points"].shape[2] // 2
    for k, n in enumerate(num_clicks):
        written = (out["points"][k] != given[k]).any(axis=2)
        assert written.sum() <= n * B, k  # at most one slot per click and sample
        for i in range(1, n + 1):  # click i wrote (row, col, i) to slot P-i or 2P-i of a sample
            assert (out["points"][k][:, [p - i, 2 * p - i], 2] == i).any(), (k, i)


@pytest.mark.slow
def test_trained_backbone_steps_match_the_original_trainer(tmp_path):
    init, out, ref = run_both(tmp_path, frozen=False)
    check(init, out, ref["t64"], ref["t32"], frozen=False)


def test_bad_inputs_are_refused(tmp_path):
    cfg = make_inputs(tmp_path)
    with np.load(tmp_path / "b.npz") as f:
        good = dict(f)
    bad = dict(good, points=good["points"][:, :, :3])
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError, match=r"bad.npz: points must be \[K, B, 2P, 3\]"):
        train_parity.load_batches(tmp_path / "bad.npz", cfg)
    np.savez(tmp_path / "bad.npz", **{k: v for k, v in good.items() if k != "num_clicks"})
    with pytest.raises(ValueError, match=r"missing arrays \['num_clicks'\]"):
        train_parity.load_batches(tmp_path / "bad.npz", cfg)
    with pytest.raises(SystemExit, match="--config.train.nope: unknown field"):
        train_parity.main(["--checkpoint", str(tmp_path / "init.pth"), "--config", "configs/test_tiny.py",
                           "--batches", str(tmp_path / "b.npz"), "--out", str(tmp_path / "new.npz"),
                           "--config.train.nope=1"])
    assert not (tmp_path / "new.npz").exists()
    (tmp_path / "o.npz").write_bytes(b"keep")
    with pytest.raises(SystemExit, match="exists; not overwriting"):
        train_parity.main(["--checkpoint", str(tmp_path / "init.pth"), "--config", "configs/test_tiny.py",
                           "--batches", str(tmp_path / "b.npz"), "--out", str(tmp_path / "o.npz")])
    assert (tmp_path / "o.npz").read_bytes() == b"keep"
