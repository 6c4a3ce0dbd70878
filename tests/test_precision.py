"""The precision policy (model.dtype), the attention implementations and rematerialisation.

float32 is the parity path and stays exactly as it was (the parity tests cover it); bfloat16 is
an opt-in compute mode whose agreement with float32 is measured here on `test_tiny` with
randomised O(1) weights (norm scales 1 ± 0.1, biases U(±0.1), LayerScale U(0.1, 0.5)):
  * logits: max abs difference <= BF16_LOGIT_TOL · max(1, max |logits|), masks (p > 0.49) agree
    on >= BF16_MASK_AGREEMENT of the pixels;
  * gradients of one training loss: every leaf finite, cosine similarity to float32 >= 0.99 and
    global-norm ratio within 5%.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from skipclick_jax import config_lib
from skipclick_jax.defaults import MASK_THRESHOLD
from skipclick_jax.model import SkipClick, build_model, layers
from skipclick_jax.train import optim, state as state_lib
from skipclick_jax.train.loss import normalized_focal_loss
from tests.helpers import ROOT, run_python

BF16_LOGIT_TOL = 0.05  # relative to max(1, |logits|)
BF16_MASK_AGREEMENT = 0.995


def _randomised(model, seed: int = 0):
    """`model` with O(1) norm scales / biases and LayerScale gammas (nothing near the identity)."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, x), key in zip(leaves, keys):
        name = str(path[-1].key)
        if name == "scale":
            x = 1.0 + jax.random.uniform(key, x.shape, minval=-0.1, maxval=0.1)
        elif name == "bias":
            x = jax.random.uniform(key, x.shape, minval=-0.1, maxval=0.1)
        elif name == "gamma":
            x = jax.random.uniform(key, x.shape, minval=0.1, maxval=0.5)
        out.append(x)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, out))
    return nnx.merge(graphdef, state)


def _inputs(h, w, b=1, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
    prev = rng.random((b, h, w), dtype=np.float32)
    points = -np.ones((b, 6, 3), np.float32)
    points[:, 0] = (0.3 * h + 0.5, 0.4 * w, 0)
    points[:, 1] = (0.6 * h, 0.7 * w, 2)
    points[:, 3] = (0.8 * h, 0.2 * w, 1)
    return jnp.asarray(images), jnp.asarray(prev), jnp.asarray(points)


@jax.jit
def _old_attention(q, k, v):
    """The einsum attention used before jax.nn.dot_product_attention."""
    scale = q.shape[-1] ** -0.5
    attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q * scale, k), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", attn, v)


@pytest.fixture(scope="module")
def tiny_random(tiny_config):
    return _randomised(build_model(tiny_config, seed=0))


@functools.partial(jax.jit, static_argnums=0)
def _stages(graphdef, state, images, prev, points):
    return nnx.merge(graphdef, state).stages(images, prev, points)


def stages(model, *inputs):
    """Jitted `SkipClick.stages` of `model`."""
    return _stages(*nnx.split(model), *inputs)


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("shape", [(2, 261, 3, 32), (1, 1029, 12, 64), (2, 85, 4, 24)])
def test_xla_attention_equals_einsum_attention(shape):
    q, k, v = (jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(0), 3))
    attn = layers.Attention(shape[2] * shape[3], shape[2], rngs=nnx.Rngs(0))
    with jax.default_matmul_precision("highest"):
        new = jax.jit(attn.attend)(q, k, v)
        old = _old_attention(q, k, v)
    assert float(jnp.max(jnp.abs(new - old))) <= 1e-6


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-6), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("shape", [(2, 261, 3, 32), (1, 1029, 12, 64)])
def test_heads_first_attention_equals_dot_product_attention(shape, dtype, atol):
    """The CPU path computes what jax.nn.dot_product_attention's xla implementation computes:
    float32 within 1e-6; bfloat16 (float32 logits and softmax, bfloat16 probabilities) within
    bfloat16 rounding of the unit-scale outputs."""
    q, k, v = (jax.random.normal(key, shape, dtype) for key in jax.random.split(jax.random.key(3), 3))
    q = q * shape[-1] ** -0.5  # as Attention.attend scales it
    with jax.default_matmul_precision("highest"):
        ours = jax.jit(layers.heads_first_attention)(q, k, v)
        library = jax.jit(lambda *a: jax.nn.dot_product_attention(*a, scale=1.0, implementation="xla"))(q, k, v)
    assert ours.dtype == library.dtype == jnp.dtype(dtype)
    err = float(jnp.max(jnp.abs(ours.astype(jnp.float32) - library.astype(jnp.float32))))
    assert err <= atol, err


def test_xla_attention_runs_heads_first_on_cpu_only(monkeypatch):
    """On the CPU backend 'xla' never reaches jax.nn.dot_product_attention; elsewhere it does,
    with q already scaled."""
    attn = layers.Attention(96, 3, rngs=nnx.Rngs(0))
    q, k, v = (jax.random.normal(key, (2, 37, 3, 32)) for key in jax.random.split(jax.random.key(4), 3))
    library = jax.nn.dot_product_attention
    calls = []

    def recording(*args, **kw):
        calls.append(kw)
        return library(*args, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    assert jax.default_backend() == "cpu"
    np.testing.assert_array_equal(attn.attend(q, k, v), layers.heads_first_attention(q * 32 ** -0.5, k, v))
    assert calls == []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    np.testing.assert_array_equal(attn.attend(q, k, v), library(q * 32 ** -0.5, k, v, scale=1.0))
    assert calls == [{"scale": 1.0, "implementation": "xla"}]


def test_attention_rope_applies_to_q_and_k_only():
    attn = layers.Attention(48, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 10, 48))
    seen = []

    def rope(t):
        seen.append(t.shape)
        return t * 2.0

    q, k, v = attn.qkv_heads(x)
    expected = attn.proj(attn.attend(2.0 * q, 2.0 * k, v).reshape(2, 10, 48))
    np.testing.assert_allclose(attn(x, rope=rope), expected, rtol=0, atol=1e-6)
    assert seen == [(2, 10, 4, 12), (2, 10, 4, 12)]


def test_cudnn_where_it_cannot_run_is_a_clear_error():
    attn = layers.Attention(36, 3, rngs=nnx.Rngs(0))  # head dim 12: not a multiple of 8
    layers.set_precision(attn, "float32", "cudnn")
    with pytest.raises(ValueError) as err:
        attn(jnp.zeros((1, 4, 36)))
    msg = str(err.value)
    if jax.default_backend() != "gpu":
        assert "backend is 'cpu'" in msg or f"backend is '{jax.default_backend()}'" in msg
    assert "float32" in msg and "bfloat16" in msg
    assert "head dim is 12" in msg and "model.attention='xla'" in msg


def test_unknown_settings_are_clear_errors(tiny_model):
    model = nnx.clone(tiny_model)
    with pytest.raises(ValueError, match="model.dtype must be one of"):
        model.set_precision("float16")
    with pytest.raises(ValueError, match="model.attention must be one of"):
        model.set_precision(attention="flash")
    with pytest.raises(ValueError, match="train.remat must be one of"):
        model.set_remat("all")
    with pytest.raises(ValueError, match="train.remat_policy must be one of"):
        model.set_remat("blocks", "save_everything")


# ----------------------------------------------------------------------------- bfloat16
@pytest.mark.parametrize("backbone", ["dinov2", "dinov3"])
def test_policy_sets_every_compute_layer(backbone):
    cfg = config_lib.tiny_model_config(backbone)
    cfg.dtype = "bfloat16"
    model = nnx.eval_shape(lambda: SkipClick(cfg, rngs=nnx.Rngs(0)))
    assert model.dtype == "bfloat16" and model.head.conv_seg.dtype == jnp.float32  # f32 logits
    compute = [m for _, m in nnx.iter_modules(model)
               if hasattr(m, "dtype") and m is not model and m is not model.head.conv_seg]
    kinds = (layers.Linear, layers.Conv, layers.ConvTranspose, layers.Attention, nnx.LayerNorm, nnx.GroupNorm)
    assert all(isinstance(m, kinds) for m in compute), {type(m).__name__ for m in compute}
    assert {k for k in kinds if any(isinstance(m, k) for m in compute)} == set(kinds)
    assert all(m.dtype == jnp.bfloat16 for m in compute)
    backbone_attention = [m for _, m in nnx.iter_modules(model.feature_extractor) if isinstance(m, layers.Attention)]
    assert len(backbone_attention) == 12  # every backbone block under the attention switch
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)  # master weights


def _check_bfloat16_agrees(model, sizes):
    bf16 = nnx.clone(model)
    bf16.set_precision("bfloat16")
    for size in sizes:
        inputs = _inputs(*size, b=2)
        with jax.default_matmul_precision("highest"):
            ref = stages(model, *inputs)
        out = stages(bf16, *inputs)
        assert out["fused"].dtype == jnp.bfloat16
        assert out["head_logits"].dtype == out["logits"].dtype == jnp.float32
        a, b = np.asarray(ref["logits"]), np.asarray(out["logits"])
        assert np.isfinite(b).all()
        scale = max(1.0, float(np.abs(a).max()))
        assert np.abs(a - b).max() <= BF16_LOGIT_TOL * scale, (size, np.abs(a - b).max(), scale)
        cut = np.log(MASK_THRESHOLD / (1 - MASK_THRESHOLD))
        agree = np.mean((a > cut) == (b > cut))
        assert agree >= BF16_MASK_AGREEMENT, (size, agree)


def test_bfloat16_forward_agrees_with_float32(tiny_random):
    _check_bfloat16_agrees(tiny_random, [(224, 224), (168, 560)])


def test_dinov3_bfloat16_forward_agrees_with_float32():
    model = _randomised(build_model(config_lib.tiny_model_config("dinov3"), seed=0))
    qkv = model.feature_extractor.blocks[0].attn.qkv
    x = jnp.ones((1, 3, qkv.kernel.shape[0]))
    assert qkv(x).dtype == jnp.float32
    _check_bfloat16_agrees(model, [(224, 160)])
    layers.set_precision(qkv, "bfloat16")
    assert qkv(x).dtype == jnp.bfloat16  # the k-masked qkv runs in the compute dtype


def test_dinov3_cudnn_where_it_cannot_run_is_a_clear_error():
    model = build_model(config_lib.tiny_model_config("dinov3"), seed=0)
    model.set_precision(attention="cudnn")
    with pytest.raises(ValueError, match="model.attention='cudnn' cannot run") as err:
        model.encode_image(jnp.zeros((1, 64, 64, 3)))
    assert "compute dtype is float32" in str(err.value)


def test_switching_back_to_float32_is_exact(tiny_random):
    """bfloat16 -> float32 restores the float32 path bit for bit (evaluate a bf16-trained model
    in float32), and a copy's setting leaves the original alone."""
    model = nnx.clone(tiny_random)
    model.set_precision("bfloat16", "xla")
    model.set_precision("float32")
    inputs = _inputs(56, 84)
    np.testing.assert_array_equal(stages(model, *inputs)["logits"],
                                  stages(tiny_random, *inputs)["logits"])
    assert tiny_random.dtype == "float32" and tiny_random.feature_extractor.blocks[0].attn.dtype == jnp.float32


def test_eval_predictors_take_a_dtype(tiny_model):
    from skipclick_jax.model.api import model_functions
    from skipclick_jax.predictor import Predictor

    pred = model_functions(tiny_model, "bfloat16")
    images = jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32)
    enc = jax.eval_shape(pred.encode, pred.params, images)
    assert enc["fused"].dtype == jnp.bfloat16 and all(s.dtype == jnp.bfloat16 for s in enc["skips"])
    logits = jax.eval_shape(pred.decode, pred.params, enc, jax.ShapeDtypeStruct((2, 112, 112), jnp.float32),
                            jax.ShapeDtypeStruct((2, 6, 3), jnp.float32), jax.ShapeDtypeStruct((2, 2), jnp.float32))
    assert logits.dtype == jnp.float32
    assert tiny_model.dtype == "float32"  # the caller's model is untouched
    assert Predictor(tiny_model, dtype="bfloat16")._state is not None


# ----------------------------------------------------------------------------- training
def _loss_and_grads(model, remat="none", crop=112):
    """NFL loss and gradients of one fixed train-mode forward (frozen backbone), jitted."""
    graphdef, params, frozen = state_lib.split_model(model, True)
    images, prev, points = _inputs(crop, crop, b=2, seed=3)
    gt = (jax.random.uniform(jax.random.key(4), (2, crop, crop)) > 0.6).astype(jnp.float32)

    @jax.jit
    def run(params, frozen):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, frozen)
            m.set_remat(remat)
            logits = m.decode_clicks(m.encode_image(images), prev, points, dropout_rng=jax.random.key(5))
            return normalized_focal_loss(logits, gt).mean()

        return jax.value_and_grad(loss_fn)(params)

    return run(params, frozen)


@pytest.fixture(scope="module")
def tiny112():
    cfg = config_lib.tiny_model_config()
    cfg.crop_size = 112
    return _randomised(build_model(cfg, seed=0))


@pytest.fixture(scope="module")
def f32_grads(tiny112):
    with jax.default_matmul_precision("highest"):
        return _loss_and_grads(tiny112)


def test_bfloat16_gradients_are_finite_and_close(tiny112, f32_grads):
    model = nnx.clone(tiny112)
    model.set_precision("bfloat16")
    (loss32, g32), (loss16, g16) = f32_grads, _loss_and_grads(model)
    assert abs(float(loss16) - float(loss32)) <= 0.02 * float(loss32)
    leaves32, leaves16 = jax.tree.leaves(g32), jax.tree.leaves(g16)
    assert all(x.dtype == jnp.float32 and bool(jnp.isfinite(x).all()) for x in leaves16)
    flat32 = jnp.concatenate([x.ravel() for x in leaves32])
    flat16 = jnp.concatenate([x.ravel() for x in leaves16])
    cos = float(flat32 @ flat16 / (jnp.linalg.norm(flat32) * jnp.linalg.norm(flat16)))
    ratio = float(optax.tree.norm(g16) / optax.tree.norm(g32))
    assert cos >= 0.99 and abs(ratio - 1.0) <= 0.05, (cos, ratio)


def test_remat_changes_no_result(tiny112, f32_grads):
    """Rematerialisation recomputes the same float32 forward: same loss, and gradients equal up to
    float32 rounding (XLA fuses the recomputation differently: measured 2 of 9216 elements of one
    leaf off by 2.2e-9, about 1e-7 of that leaf's largest gradient)."""
    with jax.default_matmul_precision("highest"):
        loss, grads = _loss_and_grads(tiny112, remat="decoder")
    np.testing.assert_allclose(loss, f32_grads[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(f32_grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))


def test_mu_dtype_keeps_the_first_moment_in_bfloat16():
    cfg = config_lib.base_config(config_lib.tiny_model_config()).train
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    for mu_dtype, expected in [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)]:
        cfg.mu_dtype = mu_dtype
        tx, _ = optim.make_optimizer(cfg, 10)
        adam = tx.init(params)[0]
        assert all(x.dtype == expected for x in jax.tree.leaves(adam.mu))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(adam.nu))
    cfg.mu_dtype = "float16"
    with pytest.raises(ValueError, match="train.mu_dtype"):
        optim.make_optimizer(cfg, 10)


# ----------------------------------------------------------------------------- device suite
def test_device_suite_quick_runs_every_section(tmp_path):
    """`bench/device_suite.py --quick`: the accelerator benchmark's code at tiny sizes, one process."""
    import json

    out = tmp_path / "suite.json"
    proc = run_python(ROOT / "bench" / "device_suite.py", "--quick", "--time-limit", "900", "--json", out,
                      timeout=1200)
    r = json.loads(out.read_text())
    assert not r["errors"], r["errors"]
    assert r["env"]["backend"] == jax.default_backend() and r["env"]["jax"] == jax.__version__
    assert {(x["dtype"], x["attention"]) for x in r["response"]} >= {("float32", "xla"), ("bfloat16", "xla")}
    assert all(x["encode_ms"] > 0 and x["decode_ms"] > 0 for x in r["response"] if "error" not in x)
    assert r["agree"] and all(0.0 <= x["mask_iou"] <= 1.0 and np.isfinite(x["max_abs"]) for x in r["agree"])
    assert [(x["dtype"], x["remat"]) for x in r["train"]] == [("bfloat16", "blocks")]
    assert r["train"][0]["runs"] and "error" not in r["train"][0]
    assert [run["batch"] for run in r["train"][0]["runs"]] == [1, 2]  # batch 1, doubled once
    assert all(np.isfinite(run["loss"]) for x in r["train"] for run in x["runs"])
    assert [row["method"] for row in r["noc"]["rows"][:2]] == ["engine batch 1", "engine batch 2"]
    assert r["noc"]["clicks_identical"] and r["noc"]["loop_matches_engine"]
    assert "Quick response" in proc.stdout and "Train step" in proc.stdout
