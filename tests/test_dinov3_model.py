"""SkipClick-DINOv3: whole-model parity with the PyTorch reference, the converters, and the model
everywhere a DINOv2 model works (load, Predictor, project checkpoints).

Parity: random O(1) weights (`randomize_`, LayerScale U(0.1, 0.5), nonzero k bias under the 1/0/1
mask), float32 at matmul precision 'highest'; every stage within the `dinov3_tiny` / `dinov3_vitb`
tables of `convert_weights.tolerances` (about 2x the measured errors, abs and rel) and 0 differing
mask pixels, at 224x224 and 224x160 (tiny) and 448 / 448x320 (full size, slow).
"""

from __future__ import annotations

import collections
import warnings

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from convert_weights import verify  # noqa: E402
from convert_weights.convert import export_weights, main as convert_main  # noqa: E402
from convert_weights.tolerances import table_for, tolerance  # noqa: E402
from convert_weights.torch_reference import build_reference, randomize_, timm_dinov3  # noqa: E402
from skipclick_jax import checkpoint, config_lib  # noqa: E402
from skipclick_jax.weights import CheckpointError, mapping  # noqa: E402
from skipclick_jax.weights.importer import import_weights  # noqa: E402
from tests.test_convert import assert_same_state_dict  # noqa: E402
from tests.test_parity import check_dump_stages  # noqa: E402

PREFIX = mapping.DINOV3_PREFIX


def assert_parity(ref, model, size, table="dinov3_tiny"):
    inputs = verify.example_inputs(*size)
    rows = verify.compare(verify.torch_stages(ref, *inputs), verify.jax_stages(model, *inputs), table)
    assert all(r["ok"] for r in rows), verify.format_rows(rows, f"{size}")
    return rows


def sd_numpy(module) -> dict[str, np.ndarray]:
    return collections.OrderedDict((k, v.detach().numpy().copy()) for k, v in module.state_dict().items())


def save_pth(path, obj):
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def tiny_pair():
    cfg = config_lib.tiny_model_config("dinov3")
    ref = build_reference(cfg, seed=0)
    return ref, verify.model_from_reference(ref, cfg), cfg


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("size", [(224, 224), (224, 160)])
def test_tiny_every_stage(tiny_pair, size):
    ref, model, _ = tiny_pair
    rows = assert_parity(ref, model, size)
    assert {r["stage"] for r in rows} == {
        "taps_0", "taps_1", "taps_2", "taps_3", "fused", "click_embed", "encoder_out", "pyramid_0",
        "pyramid_1", "pyramid_2", "pyramid_3", "head_logits", "logits", "mask_pixels_differ"}


def test_tiny_split_path(tiny_pair):
    """encode_image + decode_clicks (the quick-response split) gives the reference logits."""
    from flax import nnx

    from skipclick_jax.model import decode_fn, encode_fn

    ref, model, _ = tiny_pair
    image, prev, points = verify.example_inputs(160, 224, seed=2)
    expected = verify.torch_stages(ref, image, prev, points)["logits"]
    graphdef, state = nnx.split(model)
    encode, decode = encode_fn(graphdef), decode_fn(graphdef)
    split = jax.jit(lambda s, i, p, c: decode(s, encode(s, i), p, c))
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(split(state, image, prev, points))
    assert np.max(np.abs(logits - expected)) <= tolerance("logits", "dinov3_tiny")[0]


@pytest.mark.slow
def test_full_skipclick_dinov3_every_stage():
    cfg = config_lib.model_config(backbone="dinov3")
    ref = build_reference(cfg, seed=0)
    model = verify.model_from_reference(ref, cfg)
    for size in [(448, 448), (448, 320)]:
        assert_parity(ref, model, size, table_for(cfg))


# ----------------------------------------------------------------------------- layout
def test_layout_matches_the_original_keys():
    """188 backbone entries (175 parameters + periods + 12 bias masks) under feature_extractor.dinov3,
    in the hub order; the rest is the DINOv2 model's layout with patch 16 (grid 28 at 448). The
    reference's state dict and the JAX tree (parameters and buffers) follow it (tiny sizes)."""
    from flax import nnx

    from skipclick_jax.model import build_model
    from skipclick_jax.model.dinov3 import Buffer

    cfg = config_lib.model_config(backbone="dinov3")
    layout = mapping.torch_layout(cfg)
    backbone = [k for k in layout if k.startswith(PREFIX)]
    assert len(backbone) == 188 and backbone[:8] == [PREFIX + k for k in (
        "cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight",
        "patch_embed.proj.bias", "rope_embed.periods", "blocks.0.norm1.weight", "blocks.0.norm1.bias")]
    assert layout[PREFIX + "rope_embed.periods"] == (16,)
    assert layout[PREFIX + "blocks.11.attn.qkv.bias_mask"] == (2304,)
    assert layout["backbone_mix.pos_embed"] == (1, 784, 768)
    assert layout["patch_embed_coords.proj.weight"] == (768, 3, 16, 16)

    cfg = config_lib.tiny_model_config("dinov3")
    layout = mapping.torch_layout(cfg)
    ref_sd = build_reference(cfg, seed=None).state_dict()
    assert [(k, tuple(v.shape)) for k, v in ref_sd.items()] == list(layout.items())
    abstract = nnx.eval_shape(lambda: build_model(cfg))
    tree = nnx.to_pure_dict(nnx.state(abstract, (nnx.Param, Buffer)))
    params = mapping.state_dict_to_params({k: np.zeros(s, np.float32) for k, s in layout.items()},
                                          cfg, "zeros")
    shapes = lambda t: [(k, tuple(v.shape)) for k, v in mapping.flatten(t)]  # noqa: E731
    assert shapes(params) == shapes(tree)
    buffers = [k for k, _ in mapping.flatten(nnx.to_pure_dict(nnx.state(abstract, Buffer)))]
    assert len(buffers) == 13 and all(k.startswith("feature_extractor.") for k in buffers)


# ----------------------------------------------------------------------------- converters
def released_file(tmp_path, ref, cfg, extractor_type="dinov3_vitb16", name="released.pth"):
    """A file shaped like a released SkipClick-DINOv3 checkpoint: the reference's state dict and an
    original-format config entry (no project config inside)."""
    entry = mapping.released_config_entry(cfg)
    entry["params"]["extractor_type"]["value"] = extractor_type
    entry["params"]["backbone_repo_path"] = {"type": "builtin", "value": "/home/author/dinov3"}
    return save_pth(tmp_path / name, {"state_dict": ref.state_dict(), "config": entry})


def test_released_checkpoint_roundtrip_is_bit_exact(tiny_pair, tmp_path):
    ref, _, cfg = tiny_pair
    src = released_file(tmp_path, ref, cfg, extractor_type="dinov3_vitb16_custom")
    model, inferred, info = import_weights(src)  # architecture from shapes and the entry alone
    assert info["format"] == "released"
    for section in ("backbone", "stack", "neck", "head"):
        assert dict(inferred[section]) == dict(cfg[section]), section
    assert inferred.crop_size == cfg.crop_size
    out = export_weights(model, inferred, tmp_path / "out.pth")
    back = torch.load(out, weights_only=True)
    assert_same_state_dict({k: v.numpy() for k, v in back["state_dict"].items()}, sd_numpy(ref))
    assert back["config"]["params"]["extractor_type"]["value"] == "dinov3_vitb16"
    again, _, _ = import_weights(out)  # the exported file reads back to the same parameters
    assert_same_state_dict(
        {k: np.asarray(v) for k, v in mapping.flatten(jax.tree.map(np.asarray, _pure(again)))},
        {k: np.asarray(v) for k, v in mapping.flatten(jax.tree.map(np.asarray, _pure(model)))})


def _pure(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model))


def test_released_checkpoint_errors_name_the_fault(tiny_pair, tmp_path):
    ref, _, cfg = tiny_pair
    with pytest.raises(CheckpointError, match="extractor_type='dinov2_vitb14_reg' with dinov3"):
        import_weights(released_file(tmp_path, ref, cfg, extractor_type="dinov2_vitb14_reg"))
    sd = ref.state_dict()
    sd[PREFIX + "blocks.3.attn.qkv.bias_mask"] = torch.ones(5)
    src = save_pth(tmp_path / "bad.pth", {"state_dict": sd, "config": mapping.released_config_entry(cfg)})
    with pytest.raises(CheckpointError, match=r"blocks\.3\.attn\.qkv\.bias_mask' has shape \(5,\)"):
        import_weights(src)
    dinov2 = config_lib.tiny_model_config()
    with pytest.raises(CheckpointError, match="missing keys: feature_extractor.dinov2"):
        import_weights(released_file(tmp_path, ref, cfg), dinov2)


def test_periods_must_be_bfloat16_representable(tiny_pair, tmp_path):
    """Released files hold bfloat16-rounded periods (also as a bfloat16 tensor); others warn."""
    ref, _, cfg = tiny_pair
    sd = ref.state_dict()
    key = PREFIX + "rope_embed.periods"
    sd[key] = sd[key].to(torch.bfloat16)
    src = save_pth(tmp_path / "bf16.pth", {"state_dict": sd, "config": mapping.released_config_entry(cfg)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, _, _ = import_weights(src)
    np.testing.assert_array_equal(np.asarray(model.feature_extractor.rope_embed.periods[...]),
                                  ref.state_dict()[key].numpy())
    j = np.arange(8, dtype=np.float32)
    sd[key] = torch.from_numpy(np.float32(100) ** (2 * j / np.float32(16)))
    src = save_pth(tmp_path / "fp32.pth", {"state_dict": sd, "config": mapping.released_config_entry(cfg)})
    with pytest.warns(UserWarning, match="not bfloat16-representable"):
        model, _, _ = import_weights(src)
    np.testing.assert_array_equal(np.asarray(model.feature_extractor.rope_embed.periods[...]),
                                  sd[key].numpy())


def test_hub_backbone_init_from(tiny_pair, tmp_path):
    """A `dinov3_vitb16_pretrain_*.pth`-style file (hub keys) fills feature_extractor; the rest is
    freshly initialised; the model's taps equal the reference backbone's."""
    ref, _, cfg = tiny_pair
    hub = ref.feature_extractor.dinov3.state_dict()
    src = save_pth(tmp_path / "dinov3_vitb16_pretrain_lvd1689m-test.pth", hub)
    model, got_cfg = checkpoint.load(src, cfg, seed=3)
    assert got_cfg.backbone.kind == "dinov3"
    exported = mapping.params_to_state_dict(jax.tree.map(np.asarray, _pure(model)), cfg)
    assert_same_state_dict({k[len(PREFIX):]: v for k, v in exported.items() if k.startswith(PREFIX)},
                           sd_numpy(ref.feature_extractor.dinov3))
    with pytest.raises(CheckpointError, match="a dinov3 hub backbone file, but the model config's "
                                              "backbone.kind is 'dinov2'"):
        checkpoint.load(src, config_lib.tiny_model_config())


def test_timm_layout_imports_with_default_periods(tiny_pair, tmp_path):
    """timm's layout (reg_token, gamma_1/2, q_bias/v_bias, no periods): the same model as the hub
    file of those weights (k bias 0, mask 1/0/1, bf16-rounded default periods), with a warning;
    its taps equal timm's forward_intermediates(norm=True) once the periods are copied in."""
    from flax import nnx

    from skipclick_jax.model.dinov3 import DinoV3
    from skipclick_jax.weights.importer import backbone_params

    _, _, cfg = tiny_pair
    vit = randomize_(timm_dinov3(**cfg.backbone).eval(), seed=4)
    timm_sd = sd_numpy(vit)
    assert "reg_token" in timm_sd and "blocks.0.gamma_1" in timm_sd and "blocks.0.attn.q_bias" in timm_sd
    src = save_pth(tmp_path / "timm.pth", vit.state_dict())
    with pytest.warns(UserWarning, match="carry no RoPE periods"):
        model, _ = checkpoint.load(src, cfg)
    periods = np.asarray(model.feature_extractor.rope_embed.periods[...])
    np.testing.assert_array_equal(periods, periods.astype(ml_dtypes.bfloat16).astype(np.float32))
    masks = np.asarray(model.feature_extractor.blocks[0].attn.qkv.bias_mask[...])
    np.testing.assert_array_equal(masks, np.repeat([1.0, 0.0, 1.0], 96).astype(np.float32))

    vit.rope.periods.copy_(torch.from_numpy(periods))
    x = np.random.default_rng(5).standard_normal((1, 160, 224, 3)).astype(np.float32)
    with torch.no_grad():
        want = vit.forward_intermediates(torch.from_numpy(x).permute(0, 3, 1, 2), indices=[2, 5, 8, 11],
                                         norm=True, output_fmt="NLC", intermediates_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = backbone_params(timm_sd, "timm", cfg, "timm")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DinoV3(**cfg.backbone, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    with jax.default_matmul_precision("highest"):
        taps = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    for w, t in zip(want, taps):
        assert np.max(np.abs(w.numpy() - np.asarray(t).reshape(w.shape))) <= 1e-5


def test_verify_and_dump_stages_cli(tiny_pair, tmp_path, capsys):
    ref, model, cfg = tiny_pair
    ckpt = export_weights(model, cfg, tmp_path / "tiny_dinov3.pth")
    check_dump_stages(ref, ckpt, tmp_path, (224, 160), "dinov3_tiny")
    assert verify.main(["--checkpoint", str(ckpt), "--size", "224", "160"]) == 0
    assert "PASS" in capsys.readouterr().out


# ----------------------------------------------------------------------------- everywhere
def test_project_checkpoint_load_and_predictor(tiny_pair, tmp_path):
    """convert CLI -> project checkpoint (with the buffers) -> skipclick_jax.load -> Predictor."""
    import skipclick_jax
    from skipclick_jax.model.dinov3 import DinoV3
    from skipclick_jax.predictor import Predictor

    ref, model, cfg = tiny_pair
    src = released_file(tmp_path, ref, cfg)
    assert convert_main([str(src), "--out", str(tmp_path / "ckpt")]) == 0
    loaded, config = skipclick_jax.load(tmp_path / "ckpt")
    assert isinstance(loaded.feature_extractor, DinoV3)
    assert config.model.backbone.kind == "dinov3"
    for a, b in zip(jax.tree.leaves(_pure(loaded)), jax.tree.leaves(_pure(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    image, _, _ = verify.example_inputs(90, 130, seed=3)
    predictor = Predictor(loaded)
    assert predictor.size == 224
    predictor.set_image(image[0])
    p1 = predictor.add_click(40, 60)
    p2 = predictor.add_click(10, 10, positive=False)
    assert p1.shape == (90, 130) and np.all((p1 >= 0) & (p1 <= 1)) and not np.array_equal(p1, p2)
    predictor.set_image(image[0])  # eval mode: deterministic
    np.testing.assert_array_equal(predictor.add_click(40, 60), p1)
