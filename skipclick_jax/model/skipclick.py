"""SkipClick (docs/design/model.md): frozen DINOv2 taps -> fuse -> + click embedding -> EncoderStack ->
SimpleFPN with skip connections -> SegFormer head -> bilinear (align_corners=True) to the image.

The quick-response split: `encode_image` runs everything that depends only on the image (DINOv2,
the fuse Linear, and the skip-tap half of each neck branch's first layer); `decode_clicks` runs the
per-click rest. All arrays are NHWC / [B, N, C]; float32, or the compute dtype `model.dtype`
for matmul outputs and the encoding (`set_precision`; the logits are always float32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from skipclick_jax import config_lib, resize
from skipclick_jax.defaults import UPSAMPLE_FACTOR
from skipclick_jax.model.dinov2 import DinoV2, PatchEmbed
from skipclick_jax.model.dinov3 import DinoV3
from skipclick_jax.model import layers
from skipclick_jax.model.layers import (
    Attention, Conv, ConvTranspose, Linear, Mlp, checkpointed, gelu, group_norm, layer_norm,
)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
REMAT = ("none", "blocks", "decoder")

Encoding = dict  # {'fused': [B,h,w,D], 'skips': tuple of 4 first-layer skip halves, or ()}
BACKBONES = {"dinov2": DinoV2, "dinov3": DinoV3}  # model.backbone.kind -> module


def _true_divide(x: jax.Array, divisor) -> jax.Array:
    """x / divisor, correctly rounded like torch: XLA would turn a division by a broadcast into
    a multiplication by its reciprocal, so the divisor is materialised behind a barrier."""
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(divisor, x.dtype), x.shape))


def check_remat(mode: str, policy: str) -> None:
    """Raises a ValueError for an unknown `train.remat` mode or `train.remat_policy` name."""
    if mode not in REMAT:
        raise ValueError(f"train.remat must be one of {REMAT}, got {mode!r}")
    layers.remat_policy(policy)


# ----------------------------------------------------------------------------- clicks
def disk_maps(points: jax.Array, height: int, width: int, radius: float,
              point_denom: jax.Array | None = None) -> jax.Array:
    """Click disks (docs/design/model.md#click-maps): [B, 2P, 3] -> [B, H, W, 2] (positive, negative) in {0, 1}.

    A pixel is in a disk if (i - y)² + (j - x)² <= r² for some click of that polarity; a slot
    with max(y, x) < 0 is empty. With `point_denom` [B, 2] the click is at (y/den_y, x/den_x) and
    the offsets are computed as (i·den - y)/den, the correctly rounded float32 of the exact offset,
    which is what the original computes in float64 for its evaluation clicks (pass y = S·r,
    den = H for the mapping r' = S·r/H).
    """
    b, n, _ = points.shape
    y, x = points[..., 0], points[..., 1]
    rows = jnp.arange(height, dtype=jnp.float32)
    cols = jnp.arange(width, dtype=jnp.float32)
    if point_denom is None:
        dy = rows[None, None, :] - y[..., None]
        dx = cols[None, None, :] - x[..., None]
    else:
        # Full-shape divisors behind a barrier: XLA rewrites a division by a broadcast into a
        # multiplication by the reciprocal, which is not correctly rounded.
        den_y, den_x = point_denom[:, 0, None, None], point_denom[:, 1, None, None]
        dy = _true_divide(rows[None, None, :] * den_y - y[..., None], den_y)
        dx = _true_divide(cols[None, None, :] * den_x - x[..., None], den_x)
    # Squares rounded before the sum, as torch does (no fused multiply-add).
    dy2, dx2 = jax.lax.optimization_barrier((dy * dy, dx * dx))
    d2 = dy2[:, :, :, None] + dx2[:, :, None, :]  # [B, 2P, H, W]
    invalid = jnp.maximum(y, x) < 0
    d2 = jnp.where(invalid[:, :, None, None], 1e6, d2)
    d2 = d2.reshape(b, 2, n // 2, height, width).min(axis=2)
    return (jnp.moveaxis(d2, 1, -1) <= radius**2).astype(jnp.float32)


# ----------------------------------------------------------------------------- EncoderStack
class StackBlock(nnx.Module):
    """MAE/SimpleClick pre-LN block without LayerScale (xavier-uniform Linear, zero bias)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, *, rngs: nnx.Rngs):
        kw = dict(kernel_init=jax.nn.initializers.xavier_uniform(), bias_init=jax.nn.initializers.zeros)
        self.norm1 = layer_norm(dim, rngs)
        self.attn = Attention(dim, heads, rngs=rngs, **kw)
        self.norm2 = layer_norm(dim, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EncoderStack(nnx.Module):
    """`backbone_mix` (docs/design/model.md#encoderstack): [B, h, w, D] fused features + click embedding -> [B, h*w, D].

    Its position grid (crop / patch) is resized with torch's non-antialiased bicubic (a=-0.75).
    """

    def __init__(self, *, dim: int, depth: int, heads: int, mlp_ratio: float, pos_grid: int,
                 rngs: nnx.Rngs, **_):
        self.pos_grid = pos_grid
        self.pos_embed = nnx.Param(
            jax.random.normal(rngs.params(), (1, pos_grid * pos_grid, dim)) * 0.02
        )
        self.blocks = nnx.List([StackBlock(dim, heads, mlp_ratio, rngs=rngs) for _ in range(depth)])
        self.remat_policy: str | None = None  # each block under jax.checkpoint with this policy

    def position_embedding(self, h: int, w: int) -> jax.Array:
        pos = self.pos_embed[...]
        if (h, w) == (self.pos_grid, self.pos_grid):
            return pos
        grid = pos.reshape(1, self.pos_grid, self.pos_grid, -1)
        return resize.bicubic(grid, (h, w)).reshape(1, h * w, -1)

    def __call__(self, fused: jax.Array, click_embed: jax.Array) -> jax.Array:
        b, h, w, d = fused.shape
        x = (fused + click_embed).reshape(b, h * w, d) + self.position_embedding(h, w)
        for block in self.blocks:
            x = checkpointed(block, self.remat_policy, x)
        return x


# ----------------------------------------------------------------------------- neck
def _subpixel_conv_t(layer: ConvTranspose, x: jax.Array, channels: slice = slice(None),
                     bias: bool = True) -> jax.Array:
    """`layer` (k = s = 2) on a sub-pixel map [B, h, w·S, C] -> [B, h, w·S·4, O].

    Each input pixel's 2x2 outputs stay beside it (sub-pixel index s·4 + 2a + b), so the
    matmul's output is used as it comes, without the interleaving transpose.
    """
    x, kernel, shift = layers.cast(layer.dtype, x, layer.kernel[...][:, :, channels], layer.bias[...])
    b, h, ws, _ = x.shape
    y = jnp.einsum("bijc,klco->bijklo", x, kernel).reshape(b, h, 4 * ws, -1)
    return y + shift if bias else y


def _from_subpixel(y: jax.Array, w: int, levels: int) -> jax.Array:
    """[B, h, w·4^L, C] sub-pixel map after L transposed convs -> image layout [B, h·2^L, w·2^L, C]."""
    if levels == 0:
        return y
    b, h, _, c = y.shape
    y = y.reshape(b, h, w, *([2, 2] * levels), c)
    rows, cols = [3 + 2 * i for i in range(levels)], [4 + 2 * i for i in range(levels)]
    return y.transpose(0, 1, *rows, 2, *cols, y.ndim - 1).reshape(b, h << levels, w << levels, c)


class SimpleFPN(nnx.Module):
    """SimpleFPN with optional skip connections (docs/design/model.md#neck), strides 3.5/7/14/28 for patch 14.

    Branch i sees concat([X, S_i]) with S_i the i-th DINOv2 tap. Each branch's first layer is
    linear, so it is applied as first(X, channels=:D) + [first(S_i, channels=D:) + bias], the
    bracket being image-only (`skip_halves`, computed at encode time). Up-sampling branches run
    in a sub-pixel layout (`_subpixel_conv_t`); GroupNorm, 1x1 convs and GELU do not care about
    pixel order, so the image layout is restored once, at the branch's end.
    """

    def __init__(self, *, in_dim: int, skip_dim: int, out_dims, skip_connections: bool,
                 rngs: nnx.Rngs):
        d = in_dim + (skip_dim if skip_connections else 0)
        self.in_dim = in_dim
        self.skip_connections = skip_connections
        c4, c8, c32 = max(2 * out_dims[0], d // 2), max(out_dims[1], d // 2), max(out_dims[3], 2 * d)
        seq = nnx.Sequential
        self.down_4 = seq(
            ConvTranspose(d, c4, rngs=rngs), group_norm(c4, rngs), gelu,
            ConvTranspose(c4, c4 // 2, rngs=rngs), group_norm(c4 // 2, rngs),
            Conv(c4 // 2, out_dims[0], 1, rngs=rngs), group_norm(out_dims[0], rngs), gelu,
        )
        self.down_8 = seq(
            ConvTranspose(d, c8, rngs=rngs), group_norm(c8, rngs),
            Conv(c8, out_dims[1], 1, rngs=rngs), group_norm(out_dims[1], rngs), gelu,
        )
        self.down_16 = seq(Conv(d, out_dims[2], 1, rngs=rngs), group_norm(out_dims[2], rngs), gelu)
        self.down_32 = seq(
            Conv(d, c32, 2, rngs=rngs), group_norm(c32, rngs),
            Conv(c32, out_dims[3], 1, rngs=rngs), group_norm(out_dims[3], rngs), gelu,
        )

    def branches(self) -> tuple[nnx.Sequential, ...]:
        return (self.down_4, self.down_8, self.down_16, self.down_32)

    @staticmethod
    def _first(branch: nnx.Sequential, x: jax.Array, channels: slice = slice(None),
               bias: bool = True) -> jax.Array:
        """The branch's first layer on input channels `channels` (sub-pixel layout if ConvT)."""
        first = branch.layers[0]
        if isinstance(first, ConvTranspose):
            return _subpixel_conv_t(first, x, channels, bias)
        return first(x, channels=channels, bias=bias)

    @staticmethod
    def _rest(branch: nnx.Sequential, y: jax.Array, w: int) -> jax.Array:
        """The branch's remaining layers on its first layer's output; -> image layout."""
        levels = int(isinstance(branch.layers[0], ConvTranspose))
        for layer in branch.layers[1:]:
            if isinstance(layer, ConvTranspose):
                y, levels = _subpixel_conv_t(layer, y), levels + 1
            else:
                y = layer(y)
        return _from_subpixel(y, w, levels)

    def skip_halves(self, taps: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        """Image-only part of each first layer: first(S_i, channels=D:) + bias (sub-pixel layout)."""
        if not self.skip_connections:
            return ()
        return tuple(self._first(branch, tap, slice(self.in_dim, None))
                     for branch, tap in zip(self.branches(), taps))

    def __call__(self, x: jax.Array, skip_halves: tuple[jax.Array, ...]) -> list[jax.Array]:
        """x [B, h, w, D] -> 4 maps at 4x, 2x, 1x, 1/2x the grid."""
        outs = []
        for i, branch in enumerate(self.branches()):
            if skip_halves:
                y = self._first(branch, x, slice(0, self.in_dim), bias=False) + skip_halves[i]
            else:
                y = self._first(branch, x)
            outs.append(self._rest(branch, y, x.shape[2]))
        return outs

    def unsplit(self, x: jax.Array, taps: tuple[jax.Array, ...]) -> list[jax.Array]:
        """The unsplit neck: branch i on concat([x, taps[i]]) (or on x without skips)."""
        outs = []
        for i, branch in enumerate(self.branches()):
            y = jnp.concatenate([x, taps[i]], axis=-1) if self.skip_connections else x
            outs.append(self._rest(branch, self._first(branch, y), x.shape[2]))
        return outs


# ----------------------------------------------------------------------------- head
class ConvModule(nnx.Module):
    """mmcv ConvModule(1x1, bias, no norm, ReLU); kaiming_normal(fan_out, relu) init, bias 0."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.conv = Conv(in_features, out_features, 1, rngs=rngs,
                         kernel_init=jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                         bias_init=jax.nn.initializers.zeros)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.conv(x))


class SegFormerHead(nnx.Module):
    """All-MLP head (docs/design/model.md#head): 4 maps -> logits [B, h4·u, w4·u, 1] for upsample x{u}."""

    def __init__(self, *, in_channels, embed_dim: int, upsample: str, dropout: float,
                 rngs: nnx.Rngs):
        if upsample not in UPSAMPLE_FACTOR:
            raise ValueError(f"head.upsample must be one of {sorted(UPSAMPLE_FACTOR)}, got {upsample!r}")
        self.upsample = upsample
        self.dropout = dropout
        e = embed_dim
        self.convs = nnx.List([ConvModule(c, e, rngs=rngs) for c in in_channels])
        self.fusion_conv = ConvModule(len(in_channels) * e, e, rngs=rngs)
        self.up_conv1 = nnx.Sequential(
            ConvTranspose(e, e // 2, rngs=rngs), group_norm(e // 2, rngs),
            Conv(e // 2, e // 2, 1, rngs=rngs), group_norm(e // 2, rngs), gelu,
        )
        self.up_conv2 = nnx.Sequential(
            ConvTranspose(e // 2, e // 4, rngs=rngs), group_norm(e // 4, rngs),
            Conv(e // 4, e // 4, 1, rngs=rngs), group_norm(e // 4, rngs), gelu,
        )
        self.conv_seg = Conv(e // UPSAMPLE_FACTOR[upsample], 1, 1, rngs=rngs)

    def __call__(self, features: list[jax.Array], dropout_rng: jax.Array | None = None) -> jax.Array:
        # fusion_conv(concat_i(up(y_i))) = ReLU(Σ_i up(y_i @ W_i) + b): the linear resize commutes
        # with each branch's slice W_i of the fusion weights, so W_i runs at the branch's own
        # resolution and the 4·e-channel concat at P4's size is never built.
        size = features[0].shape[1:3]
        e = self.fusion_conv.conv.kernel.shape[-1]
        fused = None
        for i, (conv, f) in enumerate(zip(self.convs, features)):
            y = self.fusion_conv.conv(conv(f), channels=slice(i * e, (i + 1) * e), bias=False)
            y = resize.bilinear(y, size)
            fused = y if fused is None else fused + y
        x = jax.nn.relu(fused + self.fusion_conv.conv.bias[...])
        if self.upsample in ("x2", "x4"):
            x = self.up_conv1(x)
        if self.upsample == "x4":
            x = self.up_conv2(x)
        if dropout_rng is not None and self.dropout > 0:  # Dropout2d: whole channels per sample
            keep = jax.random.bernoulli(dropout_rng, 1.0 - self.dropout, (x.shape[0], 1, 1, x.shape[-1]))
            x = jnp.where(keep, x / (1.0 - self.dropout), 0.0)
        return self.conv_seg(x)


# ----------------------------------------------------------------------------- SkipClick
class SkipClick(nnx.Module):
    """The full model. See the module docstring for the data flow and the split."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        bb, st = cfg.backbone, cfg.stack
        taps = tuple(bb.taps)
        if cfg.neck.skip_connections and len(taps) != 4:
            raise ValueError(f"skip_connections need 4 taps (one per neck branch), got taps={taps}")
        if bb.patch != st.patch:
            raise ValueError(f"backbone.patch ({bb.patch}) and stack.patch ({st.patch}) must agree")
        if cfg.crop_size % st.patch:
            raise ValueError(f"crop_size {cfg.crop_size} is not a multiple of the patch {st.patch}")
        self.patch = st.patch
        self.disk_radius = float(cfg.disk_radius)
        self.patch_embed_coords = PatchEmbed(3, st.dim, st.patch, rngs=rngs)
        kind = bb.get("kind", "dinov2")
        if kind not in BACKBONES:
            raise ValueError(f"backbone.kind must be one of {sorted(BACKBONES)}, got {kind!r}")
        self.feature_extractor = BACKBONES[kind](**bb, rngs=rngs)
        self.backbone_mix = EncoderStack(**st, pos_grid=cfg.crop_size // st.patch, rngs=rngs)
        self.neck = SimpleFPN(in_dim=st.dim, skip_dim=bb.dim, out_dims=tuple(cfg.neck.out_dims),
                              skip_connections=cfg.neck.skip_connections, rngs=rngs)
        self.head = SegFormerHead(in_channels=tuple(cfg.neck.out_dims), **cfg.head, rngs=rngs)
        self.fuse = Linear(len(taps) * bb.dim, st.dim, rngs=rngs) if len(taps) > 1 else None
        if self.fuse is None and bb.dim != st.dim:
            raise ValueError(f"a single tap needs backbone.dim == stack.dim, got {bb.dim} != {st.dim}")
        self.decoder_remat_policy: str | None = None
        self.dtype, self.attention = "float32", "xla"
        self.set_precision(cfg.get("dtype", "float32"), cfg.get("attention", "xla"))

    # -- compute settings ----------------------------------------------------------
    def set_precision(self, dtype: str | None = None, attention: str | None = None) -> None:
        """Compute dtype ('float32' | 'bfloat16') and attention ('xla' | 'cudnn'), in place; None
        keeps a setting. Parameters stay float32; the classifier (`head.conv_seg`), and so the
        logits, stay float32 (see `layers.set_precision`)."""
        layers.set_precision(self, dtype, attention, keep_float32=(self.head.conv_seg,))
        self.dtype = dtype or self.dtype
        self.attention = attention or self.attention

    def set_remat(self, mode: str = "none", policy: str = "nothing_saveable") -> None:
        """Rematerialisation of the per-click path, in place: 'none', 'blocks' (each EncoderStack
        block under jax.checkpoint with `jax.checkpoint_policies.<policy>`) or 'decoder' (also
        the neck and the head, each as one checkpointed call)."""
        check_remat(mode, policy)
        self.backbone_mix.remat_policy = None if mode == "none" else policy
        self.decoder_remat_policy = policy if mode == "decoder" else None

    # -- image-only half ---------------------------------------------------------
    def check_image_size(self, height: int, width: int) -> None:
        if height % self.patch or width % self.patch:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch}; "
                f"resize it first, e.g. to {round(height / self.patch) * self.patch}x"
                f"{round(width / self.patch) * self.patch} (skipclick_jax.resize.bilinear_ac)"
            )

    def backbone_taps(self, images: jax.Array, rng: jax.Array | None = None) -> tuple[jax.Array, ...]:
        """images [B,H,W,3] uint8 or float in [0,1] -> backbone taps, each [B, H/p, W/p, D].

        `rng` runs the backbone in training mode (DINOv3's RoPE rescale; DINOv2 is unaffected)."""
        self.check_image_size(*images.shape[1:3])
        if images.dtype == jnp.uint8:
            images = _true_divide(images.astype(jnp.float32), 255.0)
        x = _true_divide(images.astype(jnp.float32) - IMAGENET_MEAN, IMAGENET_STD)
        if rng is not None and self.feature_extractor.stochastic_in_training:
            return self.feature_extractor(x, rng)
        return self.feature_extractor(x)

    def fuse_taps(self, taps: tuple[jax.Array, ...]) -> jax.Array:
        return self.fuse(jnp.concatenate(taps, axis=-1)) if self.fuse is not None else taps[0]

    def encode_image(self, images: jax.Array, rng: jax.Array | None = None) -> Encoding:
        """images [B,H,W,3] -> {'fused': [B,h,w,D], 'skips': tuple of 4 [B,·,·,C_i] or ()}.

        `rng`: training-mode backbone (see `backbone_taps`); None (eval) is deterministic."""
        taps = self.backbone_taps(images, rng)
        return {"fused": self.fuse_taps(taps), "skips": self.neck.skip_halves(taps)}

    # -- per-click half ------------------------------------------------------------
    def click_embedding(self, prev_mask: jax.Array, points: jax.Array,
                        point_denom: jax.Array | None = None) -> jax.Array:
        """[B,H,W] previous probability, [B,2P,3] clicks -> [B, H/p, W/p, D]."""
        h, w = prev_mask.shape[1:3]
        disks = disk_maps(points.astype(jnp.float32), h, w, self.disk_radius, point_denom)
        coords = jnp.concatenate([prev_mask[..., None].astype(jnp.float32), disks], axis=-1)
        return self.patch_embed_coords(coords)

    def decode_clicks(self, encoding: Encoding, prev_mask: jax.Array, points: jax.Array,
                      point_denom: jax.Array | None = None,
                      dropout_rng: jax.Array | None = None) -> jax.Array:
        """Per-click path: -> logits [B, H, W]. `dropout_rng` switches on training-mode dropout."""
        return self._decode(encoding, prev_mask, points, point_denom, dropout_rng)["logits"]

    def _decode(self, encoding, prev_mask, points, point_denom=None, dropout_rng=None) -> dict:
        fused = encoding["fused"]
        b, h, w, d = fused.shape
        if prev_mask.shape[1:3] != (h * self.patch, w * self.patch):
            raise ValueError(f"prev_mask {prev_mask.shape} does not match the encoded image "
                             f"({h * self.patch}x{w * self.patch})")
        click_embed = self.click_embedding(prev_mask, points, point_denom)
        x = self.backbone_mix(fused, click_embed)
        pyramid = checkpointed(self.neck, self.decoder_remat_policy, x.reshape(b, h, w, d),
                               encoding["skips"])
        head_logits = checkpointed(self.head, self.decoder_remat_policy, pyramid, dropout_rng)
        logits = resize.bilinear_ac(head_logits, prev_mask.shape[1:3])[..., 0]
        return dict(fused=fused, click_embed=click_embed, encoder_out=x, pyramid=pyramid,
                    head_logits=head_logits, logits=logits)

    def __call__(self, images: jax.Array, prev_mask: jax.Array, points: jax.Array,
                 point_denom: jax.Array | None = None,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        """The unsplit forward: concatenated taps go through each neck branch's full first layer."""
        return self.stages(images, prev_mask, points, point_denom, dropout_rng)["logits"]

    def stages(self, images, prev_mask, points, point_denom=None, dropout_rng=None) -> dict:
        """Every named stage of the unsplit forward (see `forward_stages`)."""
        taps = self.backbone_taps(images)
        fused = self.fuse_taps(taps)
        b, h, w, d = fused.shape
        click_embed = self.click_embedding(prev_mask, points, point_denom)
        x = self.backbone_mix(fused, click_embed)
        grid = x.reshape(b, h, w, d)
        pyramid = self.neck.unsplit(grid, taps)
        head_logits = self.head(pyramid, dropout_rng)
        logits = resize.bilinear_ac(head_logits, prev_mask.shape[1:3])[..., 0]
        tokens = lambda t: t.reshape(b, h * w, -1)  # noqa: E731
        return {
            **{f"taps_{i}": tokens(t) for i, t in enumerate(taps)},
            "fused": tokens(fused), "click_embed": tokens(click_embed), "encoder_out": x,
            **{f"pyramid_{i}": p for i, p in enumerate(pyramid)},
            "head_logits": head_logits, "logits": logits,
        }


def forward_stages(model: SkipClick, images, prev_mask, points, point_denom=None) -> dict:
    """Named stages for parity work (JAX layout):
    taps_0..3 [B,N,C] (patch tokens, row-major grid), fused [B,N,D], click_embed [B,N,D],
    encoder_out [B,N,D], pyramid_0..3 [B,H_i,W_i,C_i], head_logits [B,h4·u,w4·u,1], logits [B,H,W].
    Single-tap configs have one tap (taps_0)."""
    return model.stages(images, prev_mask, points, point_denom)


@functools.lru_cache(maxsize=16)
def _initializer(cfg_json: str):
    """(graphdef, jitted seed -> state) for one model config, compiled once per process."""
    cfg = config_lib.config_from_json(cfg_json)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: SkipClick(cfg, rngs=nnx.Rngs(0))))
    init = jax.jit(lambda key: nnx.state(SkipClick(cfg, rngs=nnx.Rngs(key))))
    return graphdef, init


def build_model(cfg: ml_collections.ConfigDict, seed: int = 0) -> SkipClick:
    """A freshly initialised SkipClick (docs/design/model.md#initialisation) for the `model` config section.

    The initialisation runs as one compiled computation (much faster than eager op-by-op init),
    compiled once per parameter layout and process (`dtype` and `attention` only set the
    precision policy afterwards).
    """
    shape_cfg = cfg.copy_and_resolve_references()  # compute settings do not change the parameters
    settings = {k: shape_cfg.get(k, None) for k in ("dtype", "attention")}
    for key, default in (("dtype", "float32"), ("attention", "xla")):
        if key in shape_cfg:
            shape_cfg[key] = default
    graphdef, init = _initializer(config_lib.config_to_json(shape_cfg))
    model = nnx.merge(graphdef, init(jax.random.key(seed)))
    model.set_precision(**settings)
    return model
