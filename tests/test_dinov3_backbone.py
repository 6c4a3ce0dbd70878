"""DINOv3 backbone parity with timm 1.0.31's `vit_base_patch16_dinov3_qkvb` (docs/parity.md#dinov3).

The weights are a randomised hub-layout state dict (`torch_reference.randomize_` on the reference
`Dinov3`: LayerScale gammas U(0.1, 0.5), norms 1 ± 0.1, biases N(0, 0.1²) including a nonzero k
third of every qkv bias under the 1/0/1 `bias_mask`, tokens and mask_token N(0, 0.5²)). timm reads
it through its own `checkpoint_filter_fn` (which drops the k bias and the mask token) with the
bfloat16-rounded periods copied into `rope.periods`; the JAX model reads it through the importer.
Every stage (RoPE sin/cos tables, tokens, each block's output, the four normed taps) is compared at
matmul precision 'highest' on non-square inputs; tolerance 1e-5 absolute (max abs error; values
are up to ~7). Measured at 224x160: RoPE 6e-8, tokens 5.5e-6, blocks <= 6.5e-6, taps <= 5.5e-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from convert_weights.torch_reference import Dinov3, randomize_  # noqa: E402
from skipclick_jax import config_lib  # noqa: E402
from skipclick_jax.model.dinov3 import DinoV3, default_periods, rope_tables  # noqa: E402
from skipclick_jax.weights.importer import backbone_params  # noqa: E402

TOL = 1e-5
TAPS = [2, 5, 8, 11]
# docs/design/model.md#dinov3-backbone: 100^(2j/32), j = 0..15, rounded to bfloat16 (as the released files store them).
BF16_PERIODS = [1, 1.3359375, 1.78125, 2.375, 3.15625, 4.21875, 5.625, 7.5, 10, 13.3125, 17.75,
                23.75, 31.625, 42.25, 56.25, 75]


def test_default_periods_are_the_released_bf16_values():
    np.testing.assert_array_equal(default_periods(64, 100.0), np.array(BF16_PERIODS, np.float32))


@pytest.mark.parametrize("grid", [(28, 28), (42, 42), (56, 56), (28, 40), (14, 10)])
def test_rope_tables_match_timm(grid):
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    rope = RotaryEmbeddingDinoV3(64, temperature=100.0).eval()
    periods = default_periods(64, 100.0)
    rope.periods.copy_(torch.from_numpy(periods))
    sin, cos = rope.get_embed(shape=list(grid)).chunk(2, dim=-1)
    js, jc = jax.jit(rope_tables, static_argnums=(1, 2))(jnp.asarray(periods), *grid)
    assert np.max(np.abs(np.asarray(js) - sin.numpy())) <= 1e-6
    assert np.max(np.abs(np.asarray(jc) - cos.numpy())) <= 1e-6


@pytest.fixture(scope="module")
def vitb():
    """(timm model, hub state dict, jitted JAX stages fn, JAX model) for random ViT-B/16 weights."""
    from flax import nnx
    from timm.models.eva import checkpoint_filter_fn

    cfg = config_lib.model_config(backbone="dinov3")
    ref = randomize_(Dinov3(**cfg.backbone), seed=0)
    hub = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    assert all(np.abs(hub[f"blocks.{i}.attn.qkv.bias"][768:1536]).min() > 0 for i in range(12))
    vit = timm.create_model("vit_base_patch16_dinov3_qkvb", pretrained=False, num_classes=0).eval()
    filtered = checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in hub.items()}, vit)
    vit.load_state_dict(filtered, strict=True)
    vit.rope.periods.copy_(torch.from_numpy(hub["rope_embed.periods"]))

    params = backbone_params(hub, "hub", cfg, "random hub weights")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DinoV3(**cfg.backbone, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    stages = jax.jit(lambda s, x: nnx.merge(graphdef, s).stages(x))
    return vit, hub, lambda x: stages(state, x), nnx.merge(graphdef, state)


def timm_stages(vit, x: np.ndarray) -> dict[str, np.ndarray]:
    """rope_sin/cos, tokens, block_i and taps_i of timm's Eva for NHWC input x."""
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        t, rope = vit._pos_embed(vit.patch_embed(xt))
        sin, cos = rope.chunk(2, dim=-1)
        out = {"rope_sin": sin, "rope_cos": cos, "tokens": t}
        for i, blk in enumerate(vit.blocks):
            t = blk(t, rope=rope)
            out[f"block_{i}"] = t
        taps = vit.forward_intermediates(xt, indices=TAPS, norm=True, output_fmt="NLC",
                                         intermediates_only=True)
    out.update({f"taps_{i}": tap for i, tap in enumerate(taps)})
    return {k: v.numpy() for k, v in out.items()}


def jax_stages(stages_fn, x: np.ndarray, h: int, w: int, periods) -> dict[str, np.ndarray]:
    with jax.default_matmul_precision("highest"):
        out = stages_fn(x)
        sin, cos = rope_tables(jnp.asarray(periods), h, w)
    res = {k: np.asarray(v) for k, v in out.items() if k != "taps"}
    res.update({f"taps_{i}": np.asarray(t).reshape(t.shape[0], h * w, -1)
                for i, t in enumerate(out["taps"])})
    return dict(res, rope_sin=np.asarray(sin), rope_cos=np.asarray(cos))


def report(ref: dict, got: dict) -> dict[str, tuple[float, float]]:
    """stage -> (max abs error, max |reference|)."""
    assert ref.keys() == got.keys()
    return {k: (float(np.max(np.abs(ref[k].astype(np.float64) - got[k]))), float(np.max(np.abs(ref[k]))))
            for k in ref}


@pytest.mark.parametrize("size", [
    (224, 160), (160, 224),
    pytest.param((448, 448), marks=pytest.mark.slow), pytest.param((672, 672), marks=pytest.mark.slow)])
def test_vitb_every_stage_matches_timm(vitb, size):
    """A row/column mix-up would only show on the non-square sizes."""
    vit, hub, stages_fn, _ = vitb
    x = np.random.default_rng(0).standard_normal((1, *size, 3)).astype(np.float32)
    h, w = size[0] // 16, size[1] // 16
    errors = report(timm_stages(vit, x), jax_stages(stages_fn, x, h, w, hub["rope_embed.periods"]))
    assert len(errors) == 3 + 12 + 4
    table = "\n".join(f"{k}: {e:.3g} (max {m:.3g})" for k, (e, m) in errors.items())
    for k, (err, scale) in errors.items():
        assert err <= TOL, f"{size} {k}\n{table}"


def test_parity_detects_the_known_traps(vitb):
    """Each trap of docs/parity.md#dinov3 moves the taps beyond the tolerance with these weights: an
    unmasked k bias (> 1e-2), fp32 (unrounded) periods (> 1e-4), DINOv2's LN eps 1e-6 (> 1e-5)."""
    from flax import nnx

    vit, _, _, model = vitb
    x = np.random.default_rng(1).standard_normal((1, 160, 224, 3)).astype(np.float32)
    ref = timm_stages(vit, x)["taps_3"]

    graphdef, state = nnx.split(model)

    def tap_error(graphdef, state) -> float:
        with jax.default_matmul_precision("highest"):
            tap = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[3])(state, x))
        return float(np.max(np.abs(tap.reshape(ref.shape) - ref)))

    def replace(leaf_name, fn):
        return jax.tree_util.tree_map_with_path(
            lambda path, a: fn(a) if f"['{leaf_name}']" in jax.tree_util.keystr(path) else a,
            state)

    j = np.arange(16, dtype=np.float32)
    fp32 = jnp.asarray(np.float32(100) ** (2 * j / np.float32(32)))
    eps = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))  # new modules, same values
    for norm in [eps.norm] + [n for b in eps.blocks for n in (b.norm1, b.norm2)]:
        norm.epsilon = 1e-6

    assert tap_error(graphdef, state) <= TOL
    assert tap_error(graphdef, replace("bias_mask", jnp.ones_like)) > 1e-2
    assert tap_error(graphdef, replace("periods", lambda _: fp32)) > 1e-4
    assert tap_error(*nnx.split(eps)) > TOL  # 2e-5 with these weights (unit-variance tokens)


def test_training_mode_rescales_rope_per_block(vitb):
    """With an rng each block draws exp(U(-ln 2, ln 2)), shared by the batch; eval is deterministic."""
    _, _, _, model = vitb
    from flax import nnx

    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, x, rng: nnx.merge(graphdef, s)(x, rng))
    run_eval = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    x = np.random.default_rng(2).standard_normal((2, 64, 96, 3)).astype(np.float32)
    key = jax.random.key(7)
    a, b, c = run(state, x, key), run(state, x, key), run(state, x, jax.random.key(8))
    e1, e2 = run_eval(state, x), run_eval(state, x)
    np.testing.assert_array_equal(np.asarray(a[3]), np.asarray(b[3]))
    np.testing.assert_array_equal(np.asarray(e1[3]), np.asarray(e2[3]))
    assert np.max(np.abs(np.asarray(a[3]) - np.asarray(e1[3]))) > 1e-2
    assert np.max(np.abs(np.asarray(a[3]) - np.asarray(c[3]))) > 1e-2
    single = run(state, x[1:], key)  # one scale for the whole batch: sample 1 alone is the same
    np.testing.assert_allclose(np.asarray(single[3])[0], np.asarray(a[3])[1], atol=TOL)

    scales = np.array([[float(s) for s in model.block_scales(jax.random.key(i))] for i in range(200)])
    assert scales.shape == (200, 12) and scales.min() >= 0.5 and scales.max() <= 2.0
    logs = np.log(scales)
    assert abs(logs.mean()) < 0.05 and abs(logs.std() - np.log(2) / np.sqrt(3)) < 0.03
    assert np.std(scales, axis=1).min() > 0  # each block its own draw
