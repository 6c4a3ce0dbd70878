"""DINOv2 ViT with registers and LayerScale (torch.hub `dinov2_vit*14_reg`, docs/design/model.md#dinov2-backbone).

Returns the residual stream after the configured blocks (before the final norm) with the cls and
register tokens dropped. Parameter names equal the hub checkpoint's keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from skipclick_jax import resize
from skipclick_jax.model.layers import Attention, Conv, Mlp, layer_norm

_trunc_normal = jax.nn.initializers.truncated_normal(0.02)


class PatchEmbed(nnx.Module):
    """Conv(k = s = patch): [B, H, W, C_in] -> [B, H/p, W/p, D]."""

    def __init__(self, in_chans: int, dim: int, patch: int, *, rngs: nnx.Rngs, **conv_kw):
        self.proj = Conv(in_chans, dim, patch, rngs=rngs, **conv_kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init_value: float):
        self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...]


class Block(nnx.Module):
    """Pre-LN transformer block with LayerScale: x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, layerscale: float, *, rngs: nnx.Rngs):
        kw = dict(kernel_init=_trunc_normal, bias_init=jax.nn.initializers.zeros)
        self.norm1 = layer_norm(dim, rngs)
        self.attn = Attention(dim, heads, rngs=rngs, **kw)
        self.ls1 = LayerScale(dim, layerscale)
        self.norm2 = layer_norm(dim, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs, **kw)
        self.ls2 = LayerScale(dim, layerscale)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nnx.Module):
    """DINOv2 with registers. `__call__(images_normalised [B,H,W,3]) -> tuple of taps [B,h,w,D]`.

    Token order [cls + pe0, registers (no pe), patches + pe]; the 37x37 position grid is resized to
    (H/p, W/p) with antialiased bicubic (offset 0), unless the input is the native square size.
    """

    normalized_taps = False  # raw block outputs (forward hooks in the original); DINOv3's are normed
    stochastic_in_training = False  # no train/eval difference (drop_path 0)

    def __init__(self, *, dim: int, depth: int, heads: int, patch: int, num_registers: int,
                 pos_grid: int, mlp_ratio: float, taps, layerscale_init: float = 1.0,
                 rngs: nnx.Rngs, **_):
        self.patch = patch
        self.pos_grid = pos_grid
        self.taps = tuple(taps)
        small = jax.nn.initializers.normal(1e-6)
        self.cls_token = nnx.Param(small(rngs.params(), (1, 1, dim)))
        self.pos_embed = nnx.Param(_trunc_normal(rngs.params(), (1, pos_grid * pos_grid + 1, dim)))
        self.register_tokens = nnx.Param(small(rngs.params(), (1, num_registers, dim)))
        self.mask_token = nnx.Param(jnp.zeros((1, dim), jnp.float32))
        self.patch_embed = PatchEmbed(3, dim, patch, rngs=rngs)
        self.blocks = nnx.List(
            [Block(dim, heads, mlp_ratio, layerscale_init, rngs=rngs) for _ in range(depth)]
        )
        self.norm = layer_norm(dim, rngs)

    def position_embedding(self, h: int, w: int) -> jax.Array:
        """[1, 1 + h*w, D]: the cls slot and the patch grid resized to (h, w)."""
        pos = self.pos_embed[...]
        if h * w == self.pos_grid**2 and h == w:
            return pos
        grid = pos[:, 1:].reshape(1, self.pos_grid, self.pos_grid, -1)
        grid = resize.bicubic_antialias(grid, (h, w)).reshape(1, h * w, -1)
        return jnp.concatenate([pos[:, :1], grid], axis=1)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        b = x.shape[0]
        x = self.patch_embed(x)
        h, w, d = x.shape[1:]
        x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (b, 1, d)), x.reshape(b, h * w, d)], 1)
        x = x + self.position_embedding(h, w)
        regs = jnp.broadcast_to(self.register_tokens[...], (b, self.register_tokens.shape[1], d))
        x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)
        prefix = 1 + regs.shape[1]
        outputs = {}
        for i in range(max(self.taps) + 1):  # later blocks cannot change a tap
            x = self.blocks[i](x)
            tap = self.norm(x) if self.normalized_taps else x
            outputs[i] = tap[:, prefix:].reshape(b, h, w, d)
        return tuple(outputs[t] for t in self.taps)
