"""DINOv3 ViT (torch.hub `dinov3_vit*16`, docs/design/model.md#dinov3-backbone).

Returns the outputs of the configured blocks passed through the final norm (LayerNorm eps 1e-5),
patch tokens only, as the original's `get_intermediate_layers(x, n=taps)` (norm=True) does. No
absolute position embedding: RoPE (base 100, 'separate' coordinates in [-1, 1], the original's
frequency layout and rotate-half pairing) on q and k of the patch tokens. Parameter names equal the
hub checkpoint's keys; its persistent buffers `rope_embed.periods` and `blocks.N.attn.qkv.bias_mask`
are `Buffer`s (stored and loaded, never trained).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from skipclick_jax.model.dinov2 import LayerScale, PatchEmbed
from skipclick_jax.model import layers
from skipclick_jax.model.layers import Linear, Mlp, layer_norm

LN_EPS = 1e-5
_trunc_normal = jax.nn.initializers.truncated_normal(0.02)


class Buffer(nnx.Variable):
    """A stored value that is not a trainable parameter (a torch persistent buffer)."""


def default_periods(head_dim: int, base: float) -> np.ndarray:
    """[head_dim/4] float32: base^(2j / (head_dim/2)), rounded to bfloat16 as the released
    checkpoints store them (docs/design/model.md#dinov3-backbone)."""
    j = np.arange(head_dim // 4, dtype=np.float32)
    periods = np.float32(base) ** (np.float32(2) * j / np.float32(head_dim // 2))
    return periods.astype(ml_dtypes.bfloat16).astype(np.float32)


def rope_coords(h: int, w: int) -> np.ndarray:
    """[h*w, 2] float32 (row, col) patch centres normalised per axis ('separate') to [-1, 1]."""
    ch = np.arange(0.5, h, dtype=np.float32) / np.float32(h)
    cw = np.arange(0.5, w, dtype=np.float32) / np.float32(w)
    coords = np.stack(np.meshgrid(ch, cw, indexing="ij"), axis=-1).reshape(h * w, 2)
    return np.float32(2.0) * coords - np.float32(1.0)


def rope_tables(periods: jax.Array, h: int, w: int,
                scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(sin, cos), each [h*w, 4·len(periods)] float32, for an h x w patch grid.

    angles[:, 2-axis, j] = 2π·coord / periods[j], flattened (row frequencies, then column
    frequencies) and tiled twice, as the original. `scale` (a scalar) multiplies the coordinates
    first: the training-mode rescale augmentation.
    """
    coords = jnp.asarray(rope_coords(h, w))
    if scale is not None:
        coords = coords * scale
    shape = (h * w, 2, periods.shape[0])
    num = jnp.broadcast_to((np.float32(2 * math.pi) * coords)[:, :, None], shape)
    # Correctly rounded division: XLA may turn x / broadcast(p) into x * (1 / p).
    den = jax.lax.optimization_barrier(jnp.broadcast_to(periods.astype(jnp.float32), shape))
    angles = jnp.tile((num / den).reshape(h * w, -1), (1, 2))
    return jnp.sin(angles), jnp.cos(angles)


def rope_apply(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """x·cos + rotate_half(x)·sin with rotate_half(x) = [-x[D/2:], x[:D/2]]; x [B, N, H, D]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


class RopePositionEmbedding(nnx.Module):
    """Holds `periods` [head_dim/4] (loaded, not recomputed) and builds the sin/cos tables."""

    def __init__(self, head_dim: int, base: float):
        self.periods = Buffer(jnp.asarray(default_periods(head_dim, base)))

    def __call__(self, h: int, w: int, scale: jax.Array | None = None):
        return rope_tables(self.periods[...], h, w, scale)


class LinearKMaskedBias(Linear):
    """Linear whose bias is multiplied by the stored `bias_mask` (1 for q and v, 0 for k)."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, **kw):
        super().__init__(in_features, out_features, rngs=rngs, **kw)
        third = out_features // 3
        mask = np.ones(out_features, np.float32)
        mask[third:2 * third] = 0.0
        self.bias_mask = Buffer(jnp.asarray(mask))

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias, mask = layers.cast(self.dtype, x, self.kernel[...], self.bias[...],
                                            self.bias_mask[...])
        return x @ kernel + bias * mask


class SelfAttention(layers.Attention):
    """DINOv3 attention: `layers.Attention` (the precision and attention-implementation policy)
    with the k-masked qkv bias and RoPE on the last h·w tokens of q and k (computed in float32)."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, **linear_kw):
        super().__init__(dim, heads, rngs=rngs, qkv_cls=LinearKMaskedBias, **linear_kw)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        """x [B, N, C], rope (sin, cos) [h·w, head_dim] -> [B, N, C]."""
        sin, cos = rope
        prefix = x.shape[1] - sin.shape[0]

        def apply(t):
            t32 = t.astype(jnp.float32)
            rotated = rope_apply(t32[:, prefix:], sin, cos)
            return jnp.concatenate([t32[:, :prefix], rotated], axis=1).astype(t.dtype)

        return super().__call__(x, apply)


class Block(nnx.Module):
    """x += ls1(attn(norm1(x), rope)); x += ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, layerscale: float, *, rngs: nnx.Rngs):
        kw = dict(kernel_init=_trunc_normal, bias_init=jax.nn.initializers.zeros)
        self.norm1 = layer_norm(dim, rngs, eps=LN_EPS)
        self.attn = SelfAttention(dim, heads, rngs=rngs, **kw)
        self.ls1 = LayerScale(dim, layerscale)
        self.norm2 = layer_norm(dim, rngs, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs, **kw)
        self.ls2 = LayerScale(dim, layerscale)

    def __call__(self, x: jax.Array, rope) -> jax.Array:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV3(nnx.Module):
    """DINOv3 ViT. `__call__(images_normalised [B,H,W,3], rng=None) -> taps, each [B,h,w,D]`.

    Token order [cls + 0·mask_token, storage tokens, patches (row-major)]; the RoPE tables are
    rebuilt for every block. With `rng` the backbone runs in training mode: each block's
    coordinates are multiplied by its own log-uniform factor in [1/r, r] (r = `rope_rescale`,
    shared by the batch and both axes), as the original's RoPE `rescale_coords` does.
    """

    normalized_taps = True  # the taps pass through the final norm (DINOv2's are raw)

    def __init__(self, *, dim: int, depth: int, heads: int, patch: int, num_registers: int,
                 mlp_ratio: float, taps, rope_base: float = 100.0, rope_rescale: float = 2.0,
                 layerscale_init: float = 1e-5, rngs: nnx.Rngs, **_):
        self.patch = patch
        self.taps = tuple(taps)
        self.rope_rescale = float(rope_rescale or 0.0)
        self.cls_token = nnx.Param(_trunc_normal(rngs.params(), (1, 1, dim)))
        self.storage_tokens = nnx.Param(_trunc_normal(rngs.params(), (1, num_registers, dim)))
        self.mask_token = nnx.Param(jnp.zeros((1, dim), jnp.float32))
        self.patch_embed = PatchEmbed(3, dim, patch, rngs=rngs)
        self.rope_embed = RopePositionEmbedding(dim // heads, rope_base)
        self.blocks = nnx.List(
            [Block(dim, heads, mlp_ratio, layerscale_init, rngs=rngs) for _ in range(depth)]
        )
        self.norm = layer_norm(dim, rngs, eps=LN_EPS)

    @property
    def stochastic_in_training(self) -> bool:
        """Whether training mode (an `rng`) changes the output."""
        return self.rope_rescale > 1.0

    def tokens(self, x: jax.Array) -> jax.Array:
        """Normalised images [B,H,W,3] -> [B, 1 + R + h·w, D] (`prepare_tokens_with_masks`)."""
        b = x.shape[0]
        x = self.patch_embed(x)
        h, w, d = x.shape[1:]
        cls = self.cls_token[...] + 0 * self.mask_token[...]
        prefix = jnp.concatenate([cls, self.storage_tokens[...]], axis=1)
        return jnp.concatenate([jnp.broadcast_to(prefix, (b, *prefix.shape[1:])),
                                x.reshape(b, h * w, d)], axis=1)

    def block_scales(self, rng: jax.Array | None) -> list[jax.Array | None]:
        """Per-block RoPE coordinate scale: exp(U(-ln r, ln r)) in training mode, else None."""
        if rng is None or not self.stochastic_in_training:
            return [None] * len(self.blocks)
        log_r = math.log(self.rope_rescale)
        keys = jax.random.split(rng, len(self.blocks))
        return [jnp.exp(jax.random.uniform(k, (), jnp.float32, -log_r, log_r)) for k in keys]

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> tuple[jax.Array, ...]:
        return self.stages(x, rng, depth=max(self.taps) + 1)["taps"]  # later blocks change no tap

    def stages(self, x: jax.Array, rng: jax.Array | None = None, depth: int | None = None) -> dict:
        """{'tokens', 'block_i' for i < depth (default: all): [B, N, D] with N = 1 + R + h·w;
        'taps': tuple of [B, h, w, D]} for normalised images x [B, H, W, 3]."""
        b, height, width, _ = x.shape
        h, w = height // self.patch, width // self.patch
        x = self.tokens(x)
        prefix = x.shape[1] - h * w
        scales = self.block_scales(rng)
        out, taps = {"tokens": x}, {}
        for i in range(len(self.blocks) if depth is None else depth):
            x = self.blocks[i](x, self.rope_embed(h, w, scales[i]))
            out[f"block_{i}"] = x
            if i in self.taps:
                tap = self.norm(x) if self.normalized_taps else x
                taps[i] = tap[:, prefix:].reshape(b, h, w, -1)
        out["taps"] = tuple(taps[t] for t in self.taps)
        return out
