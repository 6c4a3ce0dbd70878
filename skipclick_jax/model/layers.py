"""Layers shared by the SkipClick modules (NHWC; parameter names mirror PyTorch's).

Initialisers follow PyTorch's defaults (spec §3) so a model trained from scratch around a
pretrained backbone starts where the original does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


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

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...] + self.bias[...]


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

    def __call__(self, x: jax.Array, channels: slice = slice(None), bias: bool = True) -> jax.Array:
        kernel = self.kernel[...][:, :, channels]
        k = kernel.shape[0]
        b, h, w, c = x.shape
        if k == 1:
            y = jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0])
        else:
            # Stride-k patches (trailing rows/cols dropped as torch does), then one matmul.
            hk, wk = h // k, w // k
            x = x[:, : hk * k, : wk * k].reshape(b, hk, k, wk, k, c)
            y = jnp.einsum("bikjlc,klco->bijo", x, kernel)
        return y + self.bias[...] if bias else y


class ConvTranspose(nnx.Module):
    """ConvTranspose2d with kernel 2, stride 2: out[2i+a, 2j+b] = x[i, j] @ kernel[a, b] + bias.

    kernel [2, 2, in, out] (torch weight [in, out, 2, 2] permuted (2, 3, 0, 1)); no kernel flip.
    PyTorch's init quirk is kept: fan_in = out·2·2 (weight dim 1 times the kernel area).
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        init = torch_uniform(out_features * 4)
        self.kernel = nnx.Param(init(rngs.params(), (2, 2, in_features, out_features)))
        self.bias = nnx.Param(init(rngs.params(), (out_features,)))

    def __call__(self, x: jax.Array, channels: slice = slice(None), bias: bool = True) -> jax.Array:
        kernel = self.kernel[...][:, :, channels]
        b, h, w, _ = x.shape
        y = jnp.einsum("bijc,klco->bikjlo", x, kernel).reshape(b, 2 * h, 2 * w, -1)
        return y + self.bias[...] if bias else y


def layer_norm(dim: int, rngs: nnx.Rngs, eps: float = 1e-6) -> nnx.LayerNorm:
    """LayerNorm over channels (eps 1e-6: DINOv2 and the stack; DINOv3 uses 1e-5), two-pass
    variance like torch."""
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


def group_norm(dim: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """GroupNorm(num_groups=1, eps=1e-5) over (H, W, C) per sample."""
    return nnx.GroupNorm(dim, num_groups=1, epsilon=1e-5, use_fast_variance=False, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv Linear ([q; k; v] rows, as timm/DINOv2)."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, **linear_kw):
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim, rngs=rngs, **linear_kw)
        self.proj = Linear(dim, dim, rngs=rngs, **linear_kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scale = (c // self.heads) ** -0.5
        attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q * scale, k), axis=-1)
        return self.proj(jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, c))


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, **linear_kw):
        self.fc1 = Linear(dim, hidden, rngs=rngs, **linear_kw)
        self.fc2 = Linear(hidden, dim, rngs=rngs, **linear_kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))
