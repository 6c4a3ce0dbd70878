"""PyTorch SkipClick (`FeatureVitModel`) written from docs/design/model.md, with the original key structure.

`state_dict()` keys, order and shapes equal those of a released checkpoint (docs/design/model.md#parameter-counts). The DINOv3
backbone (`model.backbone.kind == 'dinov3'`, docs/design/model.md#dinov3-backbone) holds the torch.hub parameters and buffers
under `feature_extractor.dinov3.*` and runs timm's `Eva` in its `vit_*_patch16_dinov3_qkvb` layout
(docs/parity.md#dinov3: the masked qkv bias as q/k/v biases, LayerScale as gamma_1/2, the stored RoPE periods
copied in, `forward_intermediates(norm=True)`). The DINOv2
backbone runs timm's own `VisionTransformer` (`vit_base_patch14_reg4_dinov2` layout, dynamic image
size, antialiased bicubic position-embedding resampling) while its parameters are held in the
torch.hub format under `feature_extractor.dinov2.*` (`cls_token` without its position, `pos_embed`
[1, 1 + G², C], `register_tokens`, `mask_token`). Numerics follow docs/design/model.md#numerics: ImageNet normalisation,
disk click maps, raw block-output taps without the final norm for DINOv2 (with it for DINOv3;
`normalized_taps` of the JAX backbone class says which), non-antialiased bicubic EncoderStack
position embedding, GroupNorm(1) eps 1e-5, exact GELU, ReLU ConvModules, Dropout2d, and an
align_corners=True final resize.

Tensors are NCHW (images) and [B, N, C] (tokens). `forward_stages` returns the named stages of
`skipclick_jax.model.forward_stages` in PyTorch layout.
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from skipclick_jax.model.dinov2 import DinoV2
from skipclick_jax.model.dinov3 import DinoV3, default_periods

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UPSAMPLE_FACTOR = {"x1": 1, "x2": 2, "x4": 4}


def timm_dinov2(*, dim, depth, heads, patch, num_registers, pos_grid, mlp_ratio, **_):
    """timm `VisionTransformer` in the `vit_*_patch14_reg4_dinov2` layout for these dims."""
    return VisionTransformer(
        img_size=pos_grid * patch, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
        mlp_ratio=mlp_ratio, qkv_bias=True, init_values=1.0, reg_tokens=num_registers,
        no_embed_class=True, dynamic_img_size=True, num_classes=0,
    )


class Dinov2Reg(nn.Module):
    """DINOv2 ViT with registers: hub-format parameters, timm `VisionTransformer` compute.

    The hub tokens (`cls_token` [1,1,C], `pos_embed` [1,1+G²,C], `register_tokens` [1,R,C],
    `mask_token` [1,C], unused) are this module's parameters; before each forward they are handed
    to timm in its `no_embed_class` form (cls + pos_embed[:, 0], pos_embed[:, 1:], reg_token).
    `patch_embed`, `blocks` and `norm` are timm's modules, registered here so the keys are hub keys.
    """

    def __init__(self, *, dim, num_registers, pos_grid, **cfg):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        vit = timm_dinov2(dim=dim, num_registers=num_registers, pos_grid=pos_grid, **cfg)
        for name in ("cls_token", "reg_token", "pos_embed"):
            delattr(vit, name)
        self.patch_embed, self.blocks, self.norm = vit.patch_embed, vit.blocks, vit.norm
        object.__setattr__(self, "_vit", vit)  # compute engine only; not a registered child

    def forward(self, x: torch.Tensor, taps) -> list[torch.Tensor]:
        """x [B,3,H,W] normalised -> raw outputs of blocks `taps`, patch tokens only, [B,N,C]."""
        vit = self._vit
        vit.train(self.training)
        vit.cls_token = self.cls_token + self.pos_embed[:, :1]
        vit.reg_token = self.register_tokens
        vit.pos_embed = self.pos_embed[:, 1:]
        return vit.forward_intermediates(
            x, indices=list(taps), norm=DinoV2.normalized_taps, stop_early=True, output_fmt="NLC",
            intermediates_only=True,
        )


def timm_dinov3(*, dim, depth, heads, patch, num_registers, mlp_ratio, rope_base=100.0, **_):
    """timm `Eva` in the `vit_base_patch16_dinov3_qkvb` layout for these dims (eval RoPE only)."""
    return timm.create_model(
        "vit_base_patch16_dinov3_qkvb", pretrained=False, num_classes=0, patch_size=patch,
        embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, num_reg_tokens=num_registers,
        rope_temperature=rope_base,
    )


class KMaskedLinear(nn.Linear):
    """DINOv3's `LinearKMaskedBias`: bias * bias_mask (a persistent buffer, 1 for q/v, 0 for k)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__(dim_in, dim_out)
        mask = torch.ones(dim_out)
        mask[dim_out // 3: 2 * dim_out // 3] = 0.0
        self.register_buffer("bias_mask", mask)


class _Dinov3Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = KMaskedLinear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))


class _Dinov3Block(nn.Module):
    """Parameter holder with the hub block keys (norm1, attn.qkv(+bias_mask), attn.proj, ls1, ...)."""

    def __init__(self, dim: int, mlp_ratio: float, layerscale: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = _Dinov3Attention(dim)
        self.ls1 = _LayerScale(dim, layerscale)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = _LayerScale(dim, layerscale)


class _Rope(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.register_buffer("periods", torch.from_numpy(default_periods(head_dim, base)))


class Dinov3(nn.Module):
    """DINOv3 ViT: torch.hub parameters and buffers (state_dict as `dinov3_vit*16`), timm `Eva`
    compute. Before each forward the hub values are handed to timm: cls_token + 0·mask_token,
    storage_tokens -> reg_token, qkv.bias * bias_mask split into q/k/v biases, ls gammas ->
    gamma_1/2, `rope_embed.periods` -> rope.periods."""

    def __init__(self, *, dim, depth, heads, patch, num_registers, mlp_ratio, rope_base=100.0,
                 layerscale_init=1e-5, **_):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, num_registers, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = PatchEmbed(3, dim, patch)
        self.rope_embed = _Rope(dim // heads, rope_base)
        self.blocks = nn.ModuleList(
            _Dinov3Block(dim, mlp_ratio, layerscale_init) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        eva = timm_dinov3(dim=dim, depth=depth, heads=heads, patch=patch,
                          num_registers=num_registers, mlp_ratio=mlp_ratio, rope_base=rope_base)
        object.__setattr__(self, "_eva", eva.eval())  # compute engine only; not a registered child

    @torch.no_grad()
    def engine(self):
        """The timm `Eva` holding this module's current values."""
        e = self._eva
        e.train(self.training)
        e.cls_token.copy_(self.cls_token + 0 * self.mask_token)
        e.reg_token.copy_(self.storage_tokens)
        e.patch_embed.proj.load_state_dict(self.patch_embed.proj.state_dict())
        e.rope.periods.copy_(self.rope_embed.periods)
        for s, t in zip(self.blocks, e.blocks):
            t.norm1.load_state_dict(s.norm1.state_dict())
            t.norm2.load_state_dict(s.norm2.state_dict())
            t.attn.qkv.weight.copy_(s.attn.qkv.weight)
            q, k, v = (s.attn.qkv.bias * s.attn.qkv.bias_mask).chunk(3)
            t.attn.q_bias.copy_(q)
            t.attn.k_bias.copy_(k)
            t.attn.v_bias.copy_(v)
            t.attn.proj.load_state_dict(s.attn.proj.state_dict())
            t.gamma_1.copy_(s.ls1.gamma)
            t.gamma_2.copy_(s.ls2.gamma)
            t.mlp.fc1.load_state_dict(s.mlp.fc1.state_dict())
            t.mlp.fc2.load_state_dict(s.mlp.fc2.state_dict())
        e.norm.load_state_dict(self.norm.state_dict())
        return e

    def forward(self, x: torch.Tensor, taps) -> list[torch.Tensor]:
        """x [B,3,H,W] normalised -> outputs of blocks `taps` through the final norm, patch tokens
        only, [B,N,C] (the original's `get_intermediate_layers(x, n=taps)`)."""
        return self.engine().forward_intermediates(
            x, indices=list(taps), norm=DinoV3.normalized_taps, stop_early=True, output_fmt="NLC",
            intermediates_only=True,
        )

    @torch.no_grad()
    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every stage in the JAX `DinoV3.stages` layout: rope_sin/rope_cos [h·w, head_dim],
        tokens and block_i [B, N, C] (all tokens) for every block."""
        e = self.engine()
        h, w = x.shape[2] // e.patch_embed.patch_size[0], x.shape[3] // e.patch_embed.patch_size[1]
        t, rope = e._pos_embed(e.patch_embed(x))
        sin, cos = rope.chunk(2, dim=-1)
        out = {"rope_sin": sin, "rope_cos": cos, "tokens": t}
        assert sin.shape[0] == h * w
        for i, blk in enumerate(e.blocks):
            t = blk(t, rope=rope)
            out[f"block_{i}"] = t
        return out


class FeatureExtractor(nn.Module):
    """`feature_extractor.dinov2` or `.dinov3` by `backbone.kind`."""

    def __init__(self, backbone_cfg):
        super().__init__()
        self.kind = backbone_cfg.get("kind", "dinov2")
        if self.kind == "dinov3":
            self.dinov3 = Dinov3(**backbone_cfg)
        else:
            self.dinov2 = Dinov2Reg(**backbone_cfg)

    def forward(self, x, taps):
        return getattr(self, self.kind)(x, taps)


class PatchEmbed(nn.Module):
    """Conv2d(k=s=patch) then flatten: [B,Cin,H,W] -> [B,N,D], row-major tokens."""

    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class StackBlock(nn.Module):
    """SimpleClick pre-LN block without LayerScale (key order norm1, norm2, attn, mlp)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EncoderStack(nn.Module):
    """`backbone_mix`: click embedding + own position embedding, then `depth` blocks (docs/design/model.md#encoderstack)."""

    def __init__(self, *, dim, depth, heads, mlp_ratio, grid, **_):
        super().__init__()
        self.grid = grid
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.blocks = nn.ModuleList(StackBlock(dim, heads, mlp_ratio) for _ in range(depth))

    def interp_pos_embed(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        grid = self.pos_embed.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)

    def forward(self, x, h: int, w: int, additional_features):
        x = x + additional_features + self.interp_pos_embed(h, w)
        for block in self.blocks:
            x = block(x)
        return x


class SimpleFPN(nn.Module):
    """SimpleClick's SimpleFPN; with skips branch i sees cat([X, S_i]) (docs/design/model.md#neck)."""

    def __init__(self, in_dim: int, skip_dim: int, out_dims, skip_connections: bool):
        super().__init__()
        self.skip_connections = skip_connections
        d = in_dim + skip_dim if skip_connections else in_dim
        c4, c8, c32 = max(2 * out_dims[0], d // 2), max(out_dims[1], d // 2), max(out_dims[3], 2 * d)
        self.down_4 = nn.Sequential(
            nn.ConvTranspose2d(d, c4, 2, stride=2), nn.GroupNorm(1, c4), nn.GELU(),
            nn.ConvTranspose2d(c4, c4 // 2, 2, stride=2), nn.GroupNorm(1, c4 // 2),
            nn.Conv2d(c4 // 2, out_dims[0], 1), nn.GroupNorm(1, out_dims[0]), nn.GELU(),
        )
        self.down_8 = nn.Sequential(
            nn.ConvTranspose2d(d, c8, 2, stride=2), nn.GroupNorm(1, c8),
            nn.Conv2d(c8, out_dims[1], 1), nn.GroupNorm(1, out_dims[1]), nn.GELU(),
        )
        self.down_16 = nn.Sequential(
            nn.Conv2d(d, out_dims[2], 1), nn.GroupNorm(1, out_dims[2]), nn.GELU(),
        )
        self.down_32 = nn.Sequential(
            nn.Conv2d(d, c32, 2, stride=2), nn.GroupNorm(1, c32),
            nn.Conv2d(c32, out_dims[3], 1), nn.GroupNorm(1, out_dims[3]), nn.GELU(),
        )

    def forward(self, x, skips):
        branches = (self.down_4, self.down_8, self.down_16, self.down_32)
        if self.skip_connections:
            return [m(torch.cat([x, s], dim=1)) for m, s in zip(branches, skips)]
        return [m(x) for m in branches]


class ConvModule(nn.Module):
    """mmcv ConvModule(norm_cfg=None, act_cfg=ReLU): 1×1 conv with bias, then ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return F.relu(self.conv(x))


def _up_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 2, stride=2), nn.GroupNorm(1, cout),
        nn.Conv2d(cout, cout, 1), nn.GroupNorm(1, cout), nn.GELU(),
    )


class SegHead(nn.Module):
    """SegFormer all-MLP head (`SwinTransfomerSegHead`, docs/design/model.md#head)."""

    def __init__(self, in_channels, embed_dim: int, upsample: str, dropout: float):
        super().__init__()
        self.upsample = upsample
        self.conv_seg = nn.Conv2d(embed_dim // UPSAMPLE_FACTOR[upsample], 1, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.convs = nn.ModuleList(ConvModule(c, embed_dim) for c in in_channels)
        self.fusion_conv = ConvModule(len(in_channels) * embed_dim, embed_dim)
        self.up_conv1 = _up_conv(embed_dim, embed_dim // 2)
        self.up_conv2 = _up_conv(embed_dim // 2, embed_dim // 4)

    def forward(self, inputs):
        size = inputs[0].shape[2:]
        outs = [
            F.interpolate(conv(x), size=size, mode="bilinear", align_corners=False)
            for conv, x in zip(self.convs, inputs)
        ]
        out = self.fusion_conv(torch.cat(outs, dim=1))
        if self.upsample in ("x2", "x4"):
            out = self.up_conv1(out)
        if self.upsample == "x4":
            out = self.up_conv2(out)
        return self.conv_seg(self.dropout(out))


def disk_maps(points: torch.Tensor, rows: int, cols: int, radius: float = 5.0) -> torch.Tensor:
    """isegm DistMaps(use_disks=True): points [B,2P,3] (row, col, order) -> [B,2,H,W] 0/1 float32."""
    b, n2, _ = points.shape
    pts = points.reshape(-1, 3)[:, :2]
    invalid = pts.max(dim=1).values < 0
    r, c = torch.meshgrid(
        torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
        indexing="ij",
    )
    coords = torch.stack((r, c), dim=0).unsqueeze(0).repeat(pts.shape[0], 1, 1, 1)
    coords.add_(-pts.reshape(-1, 2, 1, 1))
    coords.mul_(coords)
    d2 = coords[:, :1] + coords[:, 1:2]
    d2[invalid] = 1e6
    d2 = d2.reshape(b * 2, n2 // 2, rows, cols).min(dim=1).values.reshape(b, 2, rows, cols)
    return (d2 <= radius * radius).float()


class SkipClickTorch(nn.Module):
    """FeatureVitModel (full forward, docs/design/model.md#overview) built from a project model config."""

    def __init__(self, cfg):
        super().__init__()
        bb, st, nk, hd = cfg.backbone, cfg.stack, cfg.neck, cfg.head
        self.taps = tuple(bb.taps)
        self.patch = st.patch
        self.radius = float(cfg.disk_radius)
        if nk.skip_connections and len(self.taps) != len(nk.out_dims):
            raise ValueError(f"skip connections need {len(nk.out_dims)} taps, got {self.taps}")
        self.patch_embed_coords = PatchEmbed(3, st.dim, st.patch)
        self.feature_extractor = FeatureExtractor(dict(bb))
        self.backbone_mix = EncoderStack(**dict(st), grid=cfg.crop_size // st.patch)
        self.neck = SimpleFPN(st.dim, bb.dim, tuple(nk.out_dims), nk.skip_connections)
        self.head = SegHead(tuple(nk.out_dims), hd.embed_dim, hd.upsample, hd.dropout)
        self.fuse = nn.Linear(len(self.taps) * bb.dim, st.dim) if len(self.taps) > 1 else None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward_stages(self, image, prev_mask, points) -> dict[str, torch.Tensor]:
        """image [B,3,H,W] in [0,1], prev_mask [B,1,H,W], points [B,2P,3] -> named stages.

        taps_i/fused/click_embed/encoder_out [B,N,C]; pyramid_i [B,C,h,w]; head_logits [B,1,h,w];
        logits [B,H,W].
        """
        b, _, h, w = image.shape
        gh, gw = h // self.patch, w // self.patch
        rgb = (image - self.mean) / self.std
        coord = torch.cat([prev_mask, disk_maps(points, h, w, self.radius)], dim=1)
        click = self.patch_embed_coords(coord)
        taps = self.feature_extractor(rgb, self.taps)
        fused = self.fuse(torch.cat(taps, dim=-1)) if self.fuse is not None else taps[0]
        x = self.backbone_mix(fused, gh, gw, click)
        grid = lambda t: t.transpose(-1, -2).reshape(b, t.shape[-1], gh, gw)
        pyramid = self.neck(grid(x), [grid(t) for t in taps])
        low = self.head(pyramid)
        logits = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=True)
        stages = {f"taps_{i}": t for i, t in enumerate(taps)}
        stages.update(fused=fused, click_embed=click, encoder_out=x, head_logits=low,
                      logits=logits[:, 0])
        stages.update({f"pyramid_{i}": p for i, p in enumerate(pyramid)})
        return stages

    def forward(self, image, points):
        """ISModel interface: image [B,4,H,W] (RGB in [0,1] + prev mask) -> {'instances': [B,1,H,W]}."""
        logits = self.forward_stages(image[:, :3], image[:, 3:4], points)["logits"]
        return {"instances": logits[:, None], "instances_aux": None}


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fills every parameter with O(1)-activation random values (norms and LayerScale included).

    Weights ~ N(0, 1/fan_in) (ConvTranspose2d: fan_in = C_in), biases and norm shifts ~ N(0, 0.1²),
    norm scales ~ 1 + N(0, 0.1²), LayerScale gammas ~ U(0.1, 0.5), tokens/position embeddings
    ~ N(0, 0.5²). So no block is near the identity.
    """
    gen = torch.Generator().manual_seed(seed)
    normal = lambda p, std, mean=0.0: p.copy_(torch.randn(p.shape, generator=gen) * std + mean)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                normal(p, 0.1, 1.0 if name == "weight" else 0.0)
            elif name == "gamma":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.4 + 0.1)
            elif name == "bias":
                normal(p, 0.1)
            elif name == "weight":
                fan_in = p.shape[0] if isinstance(module, nn.ConvTranspose2d) else p[0].numel()
                normal(p, 1.0 / math.sqrt(fan_in))
            else:
                normal(p, 0.5)
    return model


def build_reference(cfg, seed: int | None = 0) -> SkipClickTorch:
    """An eval-mode reference model for a project model config; random weights unless seed is None."""
    model = SkipClickTorch(cfg).eval()
    return randomize_(model, seed) if seed is not None else model
