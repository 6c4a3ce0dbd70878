"""The Flax SkipClick: shapes, parameter counts, the quick-response split, clicks, compilation."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from skipclick_jax import config_lib
from skipclick_jax.model import build_model, decode_fn, disk_maps, encode_fn, param_counts
from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("on_cpu")  # bit-exact / measured on CPU


# docs/design/model.md#parameter-counts: totals and per-module counts of the original PyTorch models.
EXPECTED_TOTALS = {
    "skipclick.py": 153_164_417,
    "finetune.py": 153_164_417,  # the SkipClick model, fine-tuned
    "baseline.py": 126_589_505,
    "frozen.py": 126_589_505,
    "intermediate.py": 128_949_569,
    "skipclick_p2.py": 153_164_417 - 2 * 7_087_872,
    "skipclick_p3.py": 153_164_417 - 7_087_872,
    "skipclick_p5.py": 153_164_417 + 7_087_872,
    "skipclick_p6.py": 153_164_417 + 2 * 7_087_872,
    "skipclick_x2.py": 153_164_417 - 940_673 + 940_545,
    "skipclick_x4.py": 153_164_417 - 940_673 + 940_481,
    # DINOv3 ViT-B/16 (85,669,632 params; periods and bias_mask are buffers) for DINOv2's
    # 86,583,552; EncoderStack grid 28 (240 fewer pos rows of 768); click patch embed 16x16
    "skipclick_dinov3.py": 153_164_417 - 86_583_552 + 85_669_632 - 240 * 768 + 3 * 768 * (256 - 196),
}
# test_tiny at crop 224 (EncoderStack grid 16x16); tiny_synthetic at crop 112 (grid 8x8: 192 fewer
# position-embedding rows of width 96)
TINY_TOTALS = {"test_tiny.py": 2_528_945, "tiny_synthetic.py": 2_528_945 - 192 * 96,
               # DINOv3 at dim 96 (1,418,976) for DINOv2's 1,533,216; grid 14 (60 fewer rows)
               "test_tiny_dinov3.py": 2_528_945 - 1_533_216 + 1_418_976 - 60 * 96 + 3 * 96 * (256 - 196)}
FULL_MODULES = {
    "patch_embed_coords": 452_352, "feature_extractor": 86_583_552, "backbone_mix": 29_137_920,
    "neck": 33_689_856, "head": 940_673, "fuse": 2_360_064,
}
FULL_SUBMODULES = {
    "neck.down_4": 5_951_232, "neck.down_8": 4_918_272, "neck.down_16": 787_968,
    "neck.down_32": 22_032_384, "head.up_conv1": 148_224, "head.up_conv2": 37_248,
    "head.conv_seg": 257, "backbone_mix.pos_embed": 786_432,
}


def _abstract(cfg):
    return nnx.eval_shape(lambda: build_model(cfg))


def jitted(model, method):
    """`model.method` as a jitted pure function of its arguments (eager NNX is slow)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args))
    return lambda *args: fn(state, *args)


def _clicks(batch, pos, neg, p):
    """[B, 2P, 3] with the given (row, col) positives and negatives, the rest empty."""
    pts = -np.ones((batch, 2 * p, 3), np.float32)
    for k, (r, c) in enumerate(pos):
        pts[:, k] = (r, c, k)
    for k, (r, c) in enumerate(neg):
        pts[:, p + k] = (r, c, len(pos) + k)
    return jnp.asarray(pts)


def test_full_parameter_counts_per_module():
    counts = param_counts(_abstract(config_lib.model_config()), depth=1)
    assert counts.pop("total") == 153_164_417
    assert counts == FULL_MODULES
    sub = param_counts(_abstract(config_lib.model_config()), depth=2)
    assert {k: sub[k] for k in FULL_SUBMODULES} == FULL_SUBMODULES


@pytest.mark.parametrize("name", sorted(EXPECTED_TOTALS))
def test_every_config_parameter_count(name):
    cfg = config_lib.load_config_file(os.path.join(ROOT, "configs", name))
    counts = param_counts(_abstract(cfg.model))
    assert counts["total"] == EXPECTED_TOTALS[name]
    if "baseline" in name or "frozen" in name or "intermediate" in name:
        assert counts["neck"] == 9_475_008  # docs/design/model.md#parameter-counts: neck without skips


@pytest.mark.parametrize("name", sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_file_builds(name):
    """Every config in configs/ (each argument too) loads, has the four sections and builds its
    model (abstractly) with the original's parameter count (docs/design/model.md#parameter-counts)."""
    path = os.path.join(ROOT, "configs", name)
    with open(path) as f:
        source = f.read()
    args = [None] + (["paper"] if "'paper'" in source or '"paper"' in source else [])
    for arg in args:
        cfg = config_lib.load_config_file(path, arg)
        assert {"model", "train", "data", "eval"} <= set(cfg), (name, arg)
        total = param_counts(_abstract(cfg.model))["total"]
        expected = {**EXPECTED_TOTALS, **TINY_TOTALS}[name]
        assert total == expected, (name, arg, total)


def test_full_config_shapes_448():
    cfg = config_lib.model_config()
    model = _abstract(cfg)
    b, s = 2, 448
    out = jax.eval_shape(
        lambda m: m.stages(jnp.zeros((b, s, s, 3)), jnp.zeros((b, s, s)), jnp.zeros((b, 48, 3))), model)
    shapes = {k: v.shape for k, v in out.items()}
    assert shapes == {
        **{f"taps_{i}": (b, 1024, 768) for i in range(4)},
        "fused": (b, 1024, 768), "click_embed": (b, 1024, 768), "encoder_out": (b, 1024, 768),
        "pyramid_0": (b, 128, 128, 128), "pyramid_1": (b, 64, 64, 256),
        "pyramid_2": (b, 32, 32, 512), "pyramid_3": (b, 16, 16, 1024),
        "head_logits": (b, 128, 128, 1), "logits": (b, s, s),
    }


@pytest.mark.parametrize("upsample,low", [("x2", 256), ("x4", 512)])
def test_upsample_head_shapes(upsample, low):
    model = _abstract(config_lib.model_config(upsample=upsample))
    out = jax.eval_shape(
        lambda m: m.stages(jnp.zeros((1, 448, 448, 3)), jnp.zeros((1, 448, 448)), jnp.zeros((1, 2, 3))), model)
    assert out["head_logits"].shape == (1, low, low, 1)
    assert out["logits"].shape == (1, 448, 448)


@pytest.mark.parametrize("size", [(448, 448), (182, 266)])
def test_tiny_shapes_and_split_equals_full_forward(tiny_model, size):
    h, w = size
    images = jax.random.uniform(jax.random.key(1), (2, h, w, 3))
    prev = jax.random.uniform(jax.random.key(2), (2, h, w))
    points = _clicks(2, [(h // 3, w // 2), (10.5, 20.25)], [(h - 5, 3)], p=3)
    full = jitted(tiny_model, "stages")(images, prev, points)
    gh, gw = h // 14, w // 14
    assert full["taps_0"].shape == (2, gh * gw, 96)
    assert full["pyramid_0"].shape == (2, 4 * gh, 4 * gw, 32)
    assert full["pyramid_3"].shape == (2, gh // 2, gw // 2, 256)
    assert full["logits"].shape == (2, h, w)
    split = jitted(tiny_model, "decode_clicks")(jitted(tiny_model, "encode_image")(images), prev, points)
    # Same math, summed in another order: equal to float32 rounding of the logits' magnitude.
    scale = float(jnp.abs(full["logits"]).max())
    np.testing.assert_allclose(split, full["logits"], rtol=0, atol=4e-6 * max(scale, 1.0))


def test_uint8_and_float_images_agree(tiny_model):
    img = np.random.default_rng(0).integers(0, 256, (1, 56, 70, 3), dtype=np.uint8)
    encode = jitted(tiny_model, "encode_image")
    a = encode(jnp.asarray(img))["fused"]
    # uint8 is divided by 255 exactly as torch's ToTensor (true division, not x * (1/255)).
    b = encode(jnp.asarray(img.astype(np.float32) / np.float32(255)))["fused"]
    np.testing.assert_array_equal(a, b)


def test_bad_image_size_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match=r"not a multiple of the patch size 14.*resize"):
        tiny_model.encode_image(jnp.zeros((1, 100, 112, 3)))


def test_empty_click_slots_change_nothing(tiny_model):
    images = jax.random.uniform(jax.random.key(3), (1, 112, 140, 3))
    prev = jnp.zeros((1, 112, 140))
    enc = jitted(tiny_model, "encode_image")(images)
    decode = jitted(tiny_model, "decode_clicks")
    a = decode(enc, prev, _clicks(1, [(40, 50)], [(90, 100)], p=1))
    b = decode(enc, prev, _clicks(1, [(40, 50)], [(90, 100)], p=7))
    np.testing.assert_array_equal(a, b)


def _reference_disks(points, h, w, r=5.0):
    """NumPy restatement of DistMaps (docs/design/model.md#click-maps): float64 offsets stored as float32."""
    out = np.zeros((points.shape[0], h, w, 2), np.float32)
    p = points.shape[1] // 2
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for b in range(points.shape[0]):
        for pol in range(2):
            d2 = np.full((h, w), 1e6, np.float32)
            for y, x, _ in points[b, pol * p:(pol + 1) * p]:
                if max(y, x) < 0:
                    continue
                dy = (ii - np.float64(y)).astype(np.float32)
                dx = (jj - np.float64(x)).astype(np.float32)
                d2 = np.minimum(d2, dy * dy + dx * dx)
            out[b, ..., pol] = d2 <= np.float32(r * r)
    return out


def test_one_click_is_a_disk_exactly_where_expected():
    pts = np.array([[[10, 12, 0], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]]], np.float32)
    disks = np.asarray(disk_maps(jnp.asarray(pts), 30, 40, 5.0))
    ii, jj = np.mgrid[:30, :40]
    expected = ((ii - 10) ** 2 + (jj - 12) ** 2 <= 25).astype(np.float32)
    np.testing.assert_array_equal(disks[0, ..., 0], expected)  # boundary (d² = 25) included
    assert disks[0, 5, 12, 0] == 1 and disks[0, 10, 17, 0] == 1 and disks[0, 4, 12, 0] == 0
    assert not disks[..., 1].any()


def test_disks_match_reference_on_random_clicks():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-2, 40, (3, 10, 3)).astype(np.float32)
    pts[:, 3:5] = -1
    np.testing.assert_array_equal(disk_maps(jnp.asarray(pts), 37, 45, 5.0), _reference_disks(pts, 37, 45))


def test_rational_clicks_reproduce_float64_mapping():
    """Evaluation maps clicks r' = S·r/H in float64; numerators S·r over H must give the same
    disks as the float64 computation, including pixels exactly on the boundary."""
    s, h, w = 448, 480, 640  # r' in 15ths, c' in tenths: offsets like (1.4, 4.8) have d² = 25
    rows = np.array([12, 84, 96, 171, 255, 330, 411, 479])  # r' fractions .2/.4/.6/.8 occur
    cols = np.array([2, 8, 12, 18, 322, 638])               # c' fractions .2/.8/.4/.6
    clicks = np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)
    num = np.zeros((len(clicks), 2, 3), np.float32) - 1
    num[:, 0, :2] = s * clicks
    denom = np.tile(np.array([[h, w]], np.float32), (len(clicks), 1))
    got = np.asarray(disk_maps(jnp.asarray(num), s, s, 5.0, jnp.asarray(denom)))[..., 0]
    ii, jj = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    on_boundary = 0
    for k, (y, x) in enumerate(s * clicks / np.array([h, w], np.float64)):
        dy = (ii - y).astype(np.float32)
        dx = (jj - x).astype(np.float32)
        d2 = dy * dy + dx * dx  # NumPy: each square rounded, then the sum, as torch
        np.testing.assert_array_equal(got[k], d2 <= np.float32(25), err_msg=f"click {clicks[k]}")
        on_boundary += int(np.sum(np.abs((ii - y) ** 2 + (jj - x) ** 2 - 25) < 1e-9))
    assert on_boundary > 0  # the case that float32 click coordinates get wrong is exercised


def test_decode_does_not_recompile(tiny_model):
    graphdef, state = nnx.split(tiny_model)
    traces = []
    decode = decode_fn(graphdef)

    @jax.jit
    def step(state, enc, prev, points):
        traces.append(1)
        return decode(state, enc, prev, points)

    images = jax.random.uniform(jax.random.key(0), (1, 112, 112, 3))
    enc = jax.jit(encode_fn(graphdef))(state, images)
    prev = jnp.zeros((1, 112, 112))
    for k in range(4):
        prev = jax.nn.sigmoid(step(state, enc, prev, _clicks(1, [(20 + k, 30)], [(80, 90 - k)], p=4)))
    assert len(traces) == 1


def test_dropout2d_drops_whole_channels_scaled_in_training_only(tiny_model):
    """Dropout2d(p = 0.1) before the classifier: in training mode each (sample, channel) of the
    head feature is either zeroed everywhere or kept and scaled by 1/(1-p); in eval mode nothing."""
    head = tiny_model.head
    assert config_lib.tiny_model_config().head.dropout == config_lib.model_config().head.dropout == 0.1
    p = head.dropout
    graphdef, state = nnx.split(head)

    @jax.jit
    def features(state, feats, rng):
        h = nnx.merge(graphdef, state)
        h.conv_seg = lambda x: x  # the classifier's input, i.e. the dropped feature map
        return h(feats, rng)

    rng = np.random.default_rng(0)
    n = 64
    feats = [jnp.asarray(rng.standard_normal((n, 8 // 2**i, 8 // 2**i, c)), jnp.float32)
             for i, c in enumerate(config_lib.tiny_model_config().neck.out_dims)]
    plain = np.asarray(features(state, feats, None))
    dropped = np.asarray(features(state, feats, jax.random.key(0)))
    live = np.abs(plain).max(axis=(1, 2)) > 0  # [n, C] channels not already zero after the ReLU
    # x / 0.9 (XLA may multiply by the float32 reciprocal: equal to 1 ulp)
    kept = np.all(np.isclose(dropped, plain / np.float32(1 - p), rtol=2.5e-7, atol=0), axis=(1, 2))
    zeroed = np.all(dropped == 0, axis=(1, 2))
    assert np.all(kept | zeroed)  # whole channels, kept ones scaled by exactly 1/(1-p)
    rate = np.mean(zeroed[live])
    assert live.sum() > 2000 and abs(rate - p) < 0.03, (live.sum(), rate)
    # eval mode: the classifier sees the plain feature (same numbers as the unsplit forward path)
    images = jax.random.uniform(jax.random.key(4), (2, 56, 56, 3))
    prev, points = jnp.zeros((2, 56, 56)), _clicks(2, [(20, 20)], [], p=1)
    full = jitted(tiny_model, "__call__")(images, prev, points)
    decode = jitted(tiny_model, "decode_clicks")
    enc = jitted(tiny_model, "encode_image")(images)
    np.testing.assert_allclose(decode(enc, prev, points), full, rtol=0, atol=1e-5)
    assert np.abs(decode(enc, prev, points, None, jax.random.key(0)) - full).max() > 1e-3


def test_single_tap_configs_choose_the_block():
    released = config_lib.load_config_file(os.path.join(ROOT, "configs", "frozen.py"))
    paper = config_lib.load_config_file(os.path.join(ROOT, "configs", "frozen.py"), "paper")
    assert tuple(released.model.backbone.taps) == (2,)
    assert tuple(paper.model.backbone.taps) == (11,)
    cfg = config_lib.tiny_model_config()
    cfg.backbone.taps = (11,)
    cfg.neck.skip_connections = False
    model = build_model(cfg)
    images = jax.random.uniform(jax.random.key(0), (1, 56, 56, 3))
    taps_all = jitted(build_model(config_lib.tiny_model_config()), "backbone_taps")(images)
    assert model.fuse is None
    np.testing.assert_array_equal(jitted(model, "encode_image")(images)["fused"], taps_all[3])
