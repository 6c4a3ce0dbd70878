"""Numerical parity of the JAX model with the PyTorch reference (timm DINOv2 inside), every stage.

Weights are random but O(1) everywhere (`randomize_`: LayerScale gammas U(0.1, 0.5), norm
scales 1 ± 0.1, biases N(0, 0.1²)), so no block is near the identity. Tolerances: the one table,
`convert_weights.tolerances.TOLERANCES` (abs and rel per stage, about 2x the measured errors,
float32, CPU, matmul precision 'highest'; CPU 'default' precision is bit-identical). The masks
thresholded at 0.49 agree except where the reference logit is within the logits tolerance of the
threshold.

The norm-sensitive case (`tests/norm_sensitive.py`) gives every LayerNorm and GroupNorm an input
of variance 2·eps and mean 300 std, so the norms' eps, their variance formula and their affine
move the output far above float32 noise. Bugs injected into the JAX side (`tools/inject_bugs.py`:
in-process source patches) and the first failing stage, error / abs tolerance:

  bug                                   test_tiny_every_stage       test_norm_sensitive_*
  DINOv2 LayerNorm eps 1e-6 -> 1e-5     encoder_out 1.0x            taps 1815x (split: fused 46x)
  EncoderStack LayerNorm eps -> 1e-5    pass                        encoder_out 10391x (split too)
  neck GroupNorm eps 1e-5 -> 1e-6       pyramid 2x (split too)      pyramid 455x (split too)
  head GroupNorm eps 1e-5 -> 1e-6       pass (x1 head: no norm)     head_logits 551x
  tanh GELU in the ViT/stack MLPs       taps 24x                    taps 1.1x
  tanh GELU in neck and head            pyramid 120x                head_logits 1.1x
  fuse: taps concatenated reversed      fused 230466x (split too)   fused 77x (split too)
  click maps [disks, prev] not [prev, disks]  click_embed 923989x (split too)  click_embed 1.2e6x
  neck concat [tap, X] not [X, tap]     pyramid 463321x (split too)
  head concat of the 4 maps reversed    head_logits 372395x         head_logits 1304x
  head resize align_corners=True        head_logits 133791x         head_logits 486x
  final resize align_corners=False      logits 123678x (split too)
  stack pos-embed bicubic a.c.=True     encoder_out 61975x
  stack pos-embed antialiased           encoder_out 56897x
  DINOv2 pos-embed not antialiased      taps 98601x
  one-pass variance: DINOv2 LN          pass                        taps 20x
  one-pass variance: stack LN           pass                        encoder_out 62x
  one-pass variance: neck / head GN     pass                        pyramid 8x / head_logits 8x
  missing affine: DINOv2 / stack LN, neck GN   taps 26276x / encoder_out 67283x / pyramid 120504x
  no LayerScale                         taps 292748x
  not caught (float32-level bugs): disk boundary < r² (no click on a boundary here), uint8
  x·(1/255) instead of x/255 (1 ulp)

So the eps bugs need the norm-sensitive case (or fail at ~1-2x in the plain one) and the GELU
and concat bugs the plain one; together they catch each. The eval-side bugs (flip of the logits,
prev mask or image missing; flipped column off by one; eval resizes' align_corners) are in
`python tools/inject_bugs.py eval` against tests/test_eval_parity.py's case, not yet confirmed.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from convert_weights import tolerances, verify  # noqa: E402
from convert_weights.convert import backbone_params, export_weights  # noqa: E402
from convert_weights.dump_stages import main as dump_main  # noqa: E402
from convert_weights.torch_reference import build_reference, randomize_  # noqa: E402
from skipclick_jax.config_lib import model_config, tiny_model_config  # noqa: E402

from tests.norm_sensitive import (  # noqa: E402
    MEAN_OVER_STD, VAR_OVER_EPS, make_norm_sensitive_, norm_input_stats,
)

pytestmark = pytest.mark.usefixtures("on_cpu")  # the tolerances are measured on CPU

STAGES = {"taps_0", "taps_3", "fused", "click_embed", "encoder_out", "pyramid_0", "pyramid_3",
          "head_logits", "logits"}
SPLIT_STAGES = {"fused", "click_embed", "encoder_out", "pyramid_0", "pyramid_1", "pyramid_2",
                "pyramid_3", "head_logits", "logits"}


def assert_rows_ok(rows, title):
    assert all(r["ok"] for r in rows), verify.format_rows(rows, title)


def assert_parity(ref, model, size, table="dinov2_tiny", precision="highest", seed=0):
    inputs = verify.example_inputs(*size, seed=seed)
    rows = verify.compare(verify.torch_stages(ref, *inputs),
                          verify.jax_stages(model, *inputs, precision), table, precision)
    assert_rows_ok(rows, f"{size} {precision}")
    return rows


def split_inputs(height, width, orig=(251, 333), seed=3):
    """Evaluation-style clicks for the split path: integer clicks (r, c) on an `orig`-sized image
    at (height·r/H, width·c/W). JAX gets the numerators and `point_denom`, torch the float64
    quotients (as the original evaluation computes them)."""
    image, prev, _ = verify.example_inputs(height, width, seed=seed)
    rng = np.random.default_rng(seed)
    rc = np.stack([rng.integers(0, orig[0], 5), rng.integers(0, orig[1], 5)], -1).astype(np.float64)
    # 3 positive slots (clicks 0, 1, 3), 3 negative slots (clicks 2, 4, one empty)
    clicks = np.array([(*rc[0], 0), (*rc[1], 1), (*rc[3], 3), (*rc[2], 2), (*rc[4], 4), (-1, -1, -1)])
    filled = clicks[None, :, 0] >= 0
    num, exact = clicks[None].copy(), clicks[None].copy()
    num[filled, :2] *= (height, width)
    exact[filled, :2] = num[filled, :2] / np.array(orig, np.float64)
    denom = np.array([orig], np.float32)
    return (image, prev, num.astype(np.float32), denom), (image, prev, exact)


def assert_split_parity(ref, model, size, table="dinov2_tiny"):
    (image, prev, num, denom), torch_inputs = split_inputs(*size)
    rows = verify.compare(verify.torch_stages(ref, *torch_inputs),
                          verify.jax_split_stages(model, image, prev, num, denom), table)
    assert {r["stage"] for r in rows} == SPLIT_STAGES | {"mask_pixels_differ"}
    assert_rows_ok(rows, f"split {size}")
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
    rows = assert_parity(ref, model, size, precision=precision)
    assert {r["stage"] for r in rows} >= STAGES


def test_tiny_split_path_every_stage(tiny_pair):
    """encode_image + decode_clicks with point_denom (the engine's and the Predictor's path),
    every stage against the unsplit PyTorch network fed the float64 clicks."""
    ref, model, _ = tiny_pair
    assert_split_parity(ref, model, (168, 280))


def test_default_precision_is_refused_where_unmeasured():
    with pytest.raises(ValueError, match="no parity tolerances measured.*'default' on gpu"):
        tolerances.tolerance("logits", "dinov2_tiny", "default", "gpu")
    assert tolerances.tolerance("taps_3", "dinov2_tiny", "default", "cpu") == \
        tolerances.TOLERANCES["dinov2_tiny"]["taps"]


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
    assert_parity(ref, verify.model_from_reference(ref, cfg), (224, 224), "dinov2_tiny_x2_x4")


@pytest.fixture(scope="module")
def norm_pair():
    """test_tiny with the x4 head (GroupNorms in neck and head), made norm-sensitive."""
    cfg = tiny_model_config()
    cfg.head.upsample = "x4"
    ref = build_reference(cfg, seed=0)
    inputs = verify.example_inputs(168, 280, seed=0)
    make_norm_sensitive_(ref, inputs)
    return ref, verify.model_from_reference(ref, cfg), inputs


def test_norm_sensitive_case_is_what_it_claims(norm_pair):
    ref, _, inputs = norm_pair
    stats = norm_input_stats(ref, inputs)
    assert len(stats) == 2 * 12 + 2 * 2 + 8 + 4  # DINOv2, EncoderStack, neck, x4 head
    for name, (var_over_eps, mean_over_std) in stats.items():
        assert 0.8 * VAR_OVER_EPS <= var_over_eps <= 5 * VAR_OVER_EPS, (name, var_over_eps)
        assert mean_over_std >= 0.4 * MEAN_OVER_STD, (name, mean_over_std)


@pytest.mark.parametrize("size", [(168, 280), (224, 224)])
def test_norm_sensitive_every_stage(norm_pair, size):
    ref, model, _ = norm_pair
    rows = assert_parity(ref, model, size, "dinov2_tiny_norm_sensitive", seed=1)
    assert {r["stage"] for r in rows} >= STAGES


def test_norm_sensitive_split_path(norm_pair):
    ref, model, _ = norm_pair
    assert_split_parity(ref, model, (168, 280), "dinov2_tiny_norm_sensitive")


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
    jax_out = {f"taps_{i}": np.asarray(t).reshape(r.shape) for i, (r, t) in enumerate(zip(ref, taps))}
    rows = verify.compare({k: r.numpy() for k, r in zip(jax_out, ref)}, jax_out, "dinov2_vitb")
    assert len(rows) == 4
    assert_rows_ok(rows, f"ViT-B taps {size}")


def check_dump_stages(ref, ckpt, tmp_path, size: tuple[int, int], table: str):
    """`dump_stages` on `ckpt` writes every stage of the PyTorch reference `ref`, float32, within
    the abs tolerances of `table`; returns the inputs (image, prev, points) it used."""
    image, prev, points = verify.example_inputs(*size, seed=1)
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
            tol_abs, _ = tolerances.tolerance(k, table)
            assert np.max(np.abs(dumped[k] - v.numpy())) <= tol_abs, k
    return image, prev, points


def test_dump_stages_and_verify_cli(tiny_pair, tmp_path, capsys):
    ref, model, cfg = tiny_pair
    ckpt = export_weights(model, cfg, tmp_path / "tiny.pth")
    image, prev, points = check_dump_stages(ref, ckpt, tmp_path, (224, 224), "dinov2_tiny")
    np.savez(tmp_path / "bad.npz", image=image[0].astype(np.float32), prev_mask=prev[0], points=points)
    assert dump_main(["--checkpoint", str(ckpt), "--inputs", str(tmp_path / "bad.npz"),
                      "--out", str(tmp_path / "x.npz")]) == 2
    assert verify.main(["--checkpoint", str(ckpt), "--size", "224", "224"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_compare_fails_just_above_the_tolerance(tiny_pair):
    """A stage off by 2x its abs tolerance at one element fails; the rest still pass."""
    ref, model, _ = tiny_pair
    inputs = verify.example_inputs(224, 224)
    torch_out, jax_out = verify.torch_stages(ref, *inputs), verify.jax_stages(model, *inputs)
    bad = dict(jax_out, pyramid_2=jax_out["pyramid_2"].copy())
    bad["pyramid_2"][0, 3, 4, 5] += 2 * tolerances.tolerance("pyramid_2", "dinov2_tiny")[0]
    rows = {r["stage"]: r["ok"] for r in verify.compare(torch_out, bad, "dinov2_tiny")}
    assert not rows.pop("pyramid_2") and all(rows.values())


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["highest", "default"])
def test_full_skipclick_every_stage(precision):
    cfg = model_config()
    ref = build_reference(cfg, seed=0)
    model = verify.model_from_reference(ref, cfg)
    for size in [(448, 448), (280, 420)]:
        assert_parity(ref, model, size, "dinov2_vitb", precision)
