"""Numerical parity of the JAX model with the PyTorch reference (timm DINOv2 inside).

Weights are random but O(1) everywhere (`randomize_`: LayerScale gammas U(0.1, 0.5), norm
scales 1 ± 0.1, ...), so no block is near the identity. Tolerances (max abs error, float32):
  * ViT-B/14-reg4 taps vs timm, matmul precision 'highest': 1e-5 (values up to ~10);
  * every SkipClick stage: `convert_weights.verify.TOLERANCES` (taps 1e-5, fused 2e-5,
    click_embed 1e-5, encoder/pyramid/head 5e-5, logits 1e-4); 10x at 'default' precision;
  * the 0.49-thresholded masks agree on every pixel.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from convert_weights import verify  # noqa: E402
from convert_weights.convert import backbone_params, export_weights  # noqa: E402
from convert_weights.dump_stages import main as dump_main  # noqa: E402
from convert_weights.torch_reference import build_reference, randomize_  # noqa: E402
from skipclick_jax.config_lib import model_config, tiny_model_config  # noqa: E402

TAP_TOL = 1e-5


def assert_parity(ref, model, size, precision="highest"):
    inputs = verify.example_inputs(*size)
    rows = verify.compare(verify.torch_stages(ref, *inputs),
                          verify.jax_stages(model, *inputs, precision), precision)
    failed = [r for r in rows if not r["ok"]]
    assert not failed, verify.format_rows(rows, f"{size} {precision}")
    assert next(r for r in rows if r["stage"] == "logits")["max_abs"] <= 1e-4
    return rows


@pytest.fixture(scope="module")
def tiny_pair():
    cfg = tiny_model_config()
    ref = build_reference(cfg, seed=0)
    return ref, verify.model_from_reference(ref, cfg), cfg


@pytest.mark.parametrize("size,precision", [
    ((224, 224), "highest"), ((168, 560), "highest"), ((224, 224), "default")])
def test_tiny_every_stage(tiny_pair, size, precision):
    """168x560 resamples both position grids up and down (DINOv2 37 -> 12x40, stack 16 -> 12x40)."""
    ref, model, _ = tiny_pair
    rows = assert_parity(ref, model, size, precision)
    assert {r["stage"] for r in rows} >= {"taps_3", "fused", "click_embed", "encoder_out",
                                          "pyramid_0", "pyramid_3", "head_logits", "logits"}


def test_tiny_split_path(tiny_pair):
    """encode_image + decode_clicks (the quick-response split) gives the reference logits."""
    from flax import nnx

    ref, model, _ = tiny_pair
    image, prev, points = verify.example_inputs(224, 224, seed=2)
    expected = verify.torch_stages(ref, image, prev, points)["logits"]
    graphdef, state = nnx.split(model)

    @jax.jit
    def split_forward(state, image, prev, points):
        m = nnx.merge(graphdef, state)
        return m.decode_clicks(m.encode_image(image), prev, points)

    with jax.default_matmul_precision("highest"):
        logits = np.asarray(split_forward(state, image, prev, points))
    assert np.max(np.abs(logits - expected)) <= verify.tolerance("logits")


@pytest.mark.parametrize("changes", [
    dict(taps=(2,), skip_connections=False, upsample="x2"),
    dict(skip_connections=False, upsample="x4", stack_depth=3),
], ids=["single_tap_x2", "intermediate_x4_depth3"])
def test_tiny_variants(changes):
    cfg = tiny_model_config()
    cfg.backbone.taps = changes.get("taps", cfg.backbone.taps)
    cfg.neck.skip_connections = changes["skip_connections"]
    cfg.head.upsample = changes["upsample"]
    cfg.stack.depth = changes.get("stack_depth", cfg.stack.depth)
    ref = build_reference(cfg, seed=1)
    assert_parity(ref, verify.model_from_reference(ref, cfg), (224, 224))


@pytest.fixture(scope="module")
def vitb_pair():
    """timm vit_base_patch14_reg4_dinov2 (random) and the JAX DinoV2 holding its weights."""
    from flax import nnx

    from skipclick_jax.model.dinov2 import DinoV2

    cfg = model_config()
    vit = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                            dynamic_img_size=True).eval()
    randomize_(vit, seed=0)
    params = backbone_params({k: v.numpy() for k, v in vit.state_dict().items()}, "timm", cfg, "timm")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DinoV2(**cfg.backbone, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    apply = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return vit, lambda x: apply(state, x)


@pytest.mark.parametrize("size", [
    (224, 224), (280, 420), pytest.param((448, 448), marks=pytest.mark.slow)])
def test_vitb_backbone_taps_match_timm(vitb_pair, size):
    vit, backbone = vitb_pair
    x = np.random.default_rng(0).standard_normal((1, *size, 3)).astype(np.float32)
    with torch.no_grad():
        ref = vit.forward_intermediates(torch.from_numpy(x).permute(0, 3, 1, 2), indices=[2, 5, 8, 11],
                                        norm=False, output_fmt="NLC", intermediates_only=True)
    with jax.default_matmul_precision("highest"):
        taps = backbone(x)
    for i, (r, t) in enumerate(zip(ref, taps)):
        r, t = r.numpy(), np.asarray(t).reshape(r.shape)
        assert np.max(np.abs(r - t)) <= TAP_TOL, (size, i, np.max(np.abs(r - t)), np.max(np.abs(r)))


def test_dump_stages_and_verify_cli(tiny_pair, tmp_path, capsys):
    ref, model, cfg = tiny_pair
    ckpt = export_weights(model, cfg, tmp_path / "tiny.pth")
    image, prev, points = verify.example_inputs(224, 224, seed=1)
    np.savez(tmp_path / "in.npz", image=image[0], prev_mask=prev[0], points=points)
    assert dump_main(["--checkpoint", str(ckpt), "--inputs", str(tmp_path / "in.npz"),
                      "--out", str(tmp_path / "out.npz")]) == 0
    with torch.no_grad():
        expected = ref.forward_stages(torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255,
                                      torch.from_numpy(prev)[:, None], torch.from_numpy(points))
    with np.load(tmp_path / "out.npz") as dumped:
        assert sorted(dumped.files) == sorted(expected)
        for k, v in expected.items():
            assert dumped[k].dtype == np.float32 and dumped[k].shape == tuple(v.shape), k
            assert np.max(np.abs(dumped[k] - v.numpy())) <= verify.tolerance(k), k
    np.savez(tmp_path / "bad.npz", image=image[0].astype(np.float32), prev_mask=prev[0], points=points)
    assert dump_main(["--checkpoint", str(ckpt), "--inputs", str(tmp_path / "bad.npz"),
                      "--out", str(tmp_path / "x.npz")]) == 2
    assert verify.main(["--checkpoint", str(ckpt), "--size", "224", "224"]) == 0
    assert "PASS" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["highest", "default"])
def test_full_skipclick_every_stage(precision):
    cfg = model_config()
    ref = build_reference(cfg, seed=0)
    model = verify.model_from_reference(ref, cfg)
    for size in [(448, 448), (280, 420)]:
        assert_parity(ref, model, size, precision)
