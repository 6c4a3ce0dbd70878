"""Layers shared by the SkipClick modules (NHWC; parameter names mirror PyTorch's).

Initialisers follow PyTorch's defaults (docs/design/model.md#initialisation) so a model trained from scratch around a
pretrained backbone starts where the original does.

Precision: parameters are always float32. `Linear`, `Conv`, `ConvTranspose` and `Attention` have
a static `dtype` (the compute dtype, float32 unless `set_precision` says otherwise): their inputs
and weights are cast to it and their outputs are in it. Norms keep float32 statistics; the
attention logits and softmax are float32 (`jax.nn.dot_product_attention`). In float32 nothing is
cast, so the float32 path is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = ("float32", "bfloat16")
ATTENTION = ("xla", "cudnn")
REMAT_POLICIES = (  # zero-argument members of jax.checkpoint_policies
    "nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable", "everything_saveable",
    "checkpoint_dots", "checkpoint_dots_with_no_batch_dims",
)


def cast(dtype, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """The arrays in `dtype`; arrays already in it are returned as they are (no op)."""
    return tuple(a if a.dtype == dtype else a.astype(dtype) for a in arrays)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as torch.nn.GELU()."""
    return jax.nn.gelu(x, approximate=False)


def torch_uniform(fan_in: int) -> nnx.Initializer:
    """PyTorch's default Conv/Linear init: U(±1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Linear(nnx.Module):
    """y = x @ kernel + bias; kernel [in, out] (torch weight transposed)."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
                 kernel_init: nnx.Initializer | None = None, bias_init: nnx.Initializer | None = None):
        kernel_init = kernel_init or torch_uniform(in_features)
        bias_init = bias_init or torch_uniform(in_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,)))
        self.dtype = jnp.dtype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = cast(self.dtype, x, self.kernel[...], self.bias[...])
        return x @ kernel + bias


class Conv(nnx.Module):
    """Conv2d with square kernel k, stride k, no padding (patch embeds, 1x1 convs, k=s=2 down).

    kernel [k, k, in, out] (HWIO). `__call__(x, channels=slice)` applies only the kernel rows of
    an input-channel slice, so a conv over concatenated inputs can be split into a sum (the
    quick-response split of the neck's first layers); `bias=False` leaves the bias out.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, rngs: nnx.Rngs,
                 kernel_init: nnx.Initializer | None = None, bias_init: nnx.Initializer | None = None):
        fan_in = in_features * kernel_size * kernel_size
        kernel_init = kernel_init or torch_uniform(fan_in)
        bias_init = bias_init or torch_uniform(fan_in)
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,)))
        self.dtype = jnp.dtype(jnp.float32)

    def __call__(self, x: jax.Array, channels: slice = slice(None), bias: bool = True) -> jax.Array:
        x, kernel, shift = cast(self.dtype, x, self.kernel[...][:, :, channels], self.bias[...])
        k = kernel.shape[0]
        b, h, w, c = x.shape
        if k == 1:
            y = jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0])
        else:
            # Stride-k patches (trailing rows/cols dropped as torch does), then one matmul.
            hk, wk = h // k, w // k
            x = x[:, : hk * k, : wk * k].reshape(b, hk, k, wk, k, c)
            y = jnp.einsum("bikjlc,klco->bijo", x, kernel)
        return y + shift if bias else y


class ConvTranspose(nnx.Module):
    """ConvTranspose2d with kernel 2, stride 2: out[2i+a, 2j+b] = x[i, j] @ kernel[a, b] + bias.

    kernel [2, 2, in, out] (torch weight [in, out, 2, 2] permuted (2, 3, 0, 1)); no kernel flip.
    PyTorch's init quirk is kept: fan_in = out·2·2 (weight dim 1 times the kernel area).
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        init = torch_uniform(out_features * 4)
        self.kernel = nnx.Param(init(rngs.params(), (2, 2, in_features, out_features)))
        self.bias = nnx.Param(init(rngs.params(), (out_features,)))
        self.dtype = jnp.dtype(jnp.float32)

    def __call__(self, x: jax.Array, channels: slice = slice(None), bias: bool = True) -> jax.Array:
        x, kernel, shift = cast(self.dtype, x, self.kernel[...][:, :, channels], self.bias[...])
        b, h, w, _ = x.shape
        y = jnp.einsum("bijc,klco->bikjlo", x, kernel).reshape(b, 2 * h, 2 * w, -1)
        return y + shift if bias else y


def layer_norm(dim: int, rngs: nnx.Rngs, eps: float = 1e-6) -> nnx.LayerNorm:
    """LayerNorm over channels (eps 1e-6: DINOv2 and the stack; DINOv3 uses 1e-5), two-pass
    variance like torch."""
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


class GroupNorm(nnx.GroupNorm):
    """nnx.GroupNorm with one group over (H, W, C) per sample, two-pass variance like torch.

    `staged_stats` (off: nnx.GroupNorm as it is; the ONNX export switches it on) takes the mean
    and the variance as means over W, then H, then C, equal in exact arithmetic but accurate in
    runtimes whose reductions accumulate naively: onnxruntime's single ReduceMean over the
    64x64x256 elements of a neck map is off by ~1e-3 of the map's scale (float32), each staged
    one by float rounding only.
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs, epsilon: float = 1e-5):
        super().__init__(dim, num_groups=1, epsilon=epsilon, use_fast_variance=False, rngs=rngs)
        self.staged_stats = False

    def __call__(self, x: jax.Array, **kw) -> jax.Array:
        """x [B, H, W, C] -> [B, H, W, C]."""
        if not self.staged_stats or kw:
            return super().__call__(x, **kw)
        x32 = x.astype(jnp.float32)

        def mean(t):
            return t.mean(axis=2, keepdims=True).mean(axis=1, keepdims=True).mean(axis=3, keepdims=True)

        mu = mean(x32)
        centred = x32 - mu
        y = centred * (jax.lax.rsqrt(mean(centred * centred) + self.epsilon) * self.scale[...]) + self.bias[...]
        return y.astype(self.dtype or jnp.result_type(x.dtype, self.scale[...].dtype))


def group_norm(dim: int, rngs: nnx.Rngs) -> GroupNorm:
    """GroupNorm(num_groups=1, eps=1e-5) over (H, W, C) per sample."""
    return GroupNorm(dim, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv Linear ([q; k; v] rows, as timm/DINOv2).

    The attention itself is `jax.nn.dot_product_attention` with `implementation` 'xla' (float32
    logits and softmax in any dtype) or 'cudnn' (flash attention: GPU, bfloat16/float16); on the
    CPU backend 'xla' runs the same computation as `heads_first_attention` (XLA:CPU compiles the
    library's form to a slower program). q is scaled before the product, as DINOv2 does (exact
    for power-of-two scales). `qkv_cls` is the fused qkv layer's class (a Linear subclass, e.g.
    DINOv3's k-masked bias).
    """

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, qkv_cls: type[Linear] | None = None,
                 **linear_kw):
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = (qkv_cls or Linear)(dim, 3 * dim, rngs=rngs, **linear_kw)
        self.proj = Linear(dim, dim, rngs=rngs, **linear_kw)
        self.dtype = jnp.dtype(jnp.float32)
        self.implementation = "xla"

    def qkv_heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[B, N, C] -> q, k, v, each [B, N, heads, C / heads] in the compute dtype."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """softmax(q·k / sqrt(d)) v over [B, N, heads, d] -> [B, N, heads, d]."""
        q, k, v = cast(self.dtype, q, k, v)
        check_attention(self.implementation, q.dtype, q.shape[-1])
        q = q * q.shape[-1] ** -0.5
        if self.implementation == "xla" and jax.default_backend() == "cpu":
            return heads_first_attention(q, k, v)
        return jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation=self.implementation)

    def __call__(self, x: jax.Array, rope: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
        """x [B, N, C] -> [B, N, C]; `rope` (if given) maps q and k [B, N, heads, d] before attention."""
        b, n, c = x.shape
        q, k, v = self.qkv_heads(x)
        if rope is not None:
            q, k = rope(q), rope(k)
        return self.proj(self.attend(q, k, v).reshape(b, n, c))


def heads_first_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q·k) v over [B, N, heads, d] -> [B, N, heads, d], computed on [B, heads, N, d].

    The same computation as `jax.nn.dot_product_attention`'s xla implementation (logits and
    softmax in float32, probabilities in the input dtype; equal within 1e-6 in float32, see
    tests), for XLA:CPU: there the library's einsums (value as the left operand, under a vmap)
    make XLA transpose the [B, heads, N, N] probabilities in memory and split the attention in
    two kernels; with heads-first operands it compiles to one fused kernel, faster per
    ViT-B block (docs/performance.md#quick-response; bench/model_speed.py prints both).
    """
    qh, kh, vh = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs, vh), 1, 2)


def check_attention(implementation: str, dtype, head_dim: int) -> None:
    """Raises a ValueError saying why `implementation` cannot run here (backend, dtype, head dim)."""
    if implementation == "xla":
        return
    if implementation != "cudnn":
        raise ValueError(f"model.attention must be one of {ATTENTION}, got {implementation!r}")
    problems = []
    backend = jax.default_backend()
    max_dim = 128
    if backend != "gpu":
        problems.append(f"the backend is {backend!r}, cuDNN attention needs a GPU")
    elif str(getattr(jax.devices()[0], "compute_capability", "0")) >= "9.0":
        max_dim = 256  # Hopper and newer
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        problems.append(f"the compute dtype is {jnp.dtype(dtype).name}, cuDNN attention needs "
                        "bfloat16 or float16 (model.dtype=bfloat16)")
    if head_dim % 8 or head_dim > max_dim:
        problems.append(f"the head dim is {head_dim}, cuDNN attention needs a multiple of 8 "
                        f"<= {max_dim}")
    if problems:
        raise ValueError("model.attention='cudnn' cannot run: " + "; ".join(problems)
                         + ". Use model.attention='xla'.")


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, **linear_kw):
        self.fc1 = Linear(dim, hidden, rngs=rngs, **linear_kw)
        self.fc2 = Linear(hidden, dim, rngs=rngs, **linear_kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


def set_precision(module: nnx.Module, dtype: str | None = None, attention: str | None = None, *,
                  keep_float32: Iterable[nnx.Module] = ()) -> None:
    """Sets, in place, the compute dtype of every Linear / Conv / ConvTranspose / Attention /
    LayerNorm / GroupNorm in `module` (norms: float32 statistics, output in `dtype`) and the
    implementation of every Attention. Modules in `keep_float32` stay float32. None keeps a setting.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {DTYPES}, got {dtype!r}")
    if attention is not None and attention not in ATTENTION:
        raise ValueError(f"model.attention must be one of {ATTENTION}, got {attention!r}")
    keep = {id(m) for m in keep_float32}
    for _, m in nnx.iter_modules(module):
        if dtype is not None and isinstance(m, (Linear, Conv, ConvTranspose, Attention)):
            m.dtype = jnp.dtype("float32" if id(m) in keep else dtype)
        if dtype is not None and isinstance(m, (nnx.LayerNorm, nnx.GroupNorm)):
            m.dtype = None if dtype == "float32" or id(m) in keep else jnp.dtype(dtype)
        if attention is not None and isinstance(m, Attention):
            m.implementation = attention


def checkpointed(module: Callable, policy: str | None, *args):
    """module(*args), under `jax.checkpoint` with `jax.checkpoint_policies.<policy>` unless
    `policy` is None (then called as it is)."""
    if policy is None:
        return module(*args)
    return nnx.remat(lambda m, *a: m(*a), policy=remat_policy(policy))(module, *args)


def remat_policy(name: str):
    """The `jax.checkpoint_policies` member called `name` (one of REMAT_POLICIES)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"train.remat_policy must be one of {REMAT_POLICIES}, got {name!r}")
    return getattr(jax.checkpoint_policies, name)
