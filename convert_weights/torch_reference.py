"""PyTorch SkipClick (`FeatureVitModel`) written from the spec, with the original key structure.

`state_dict()` keys, order and shapes equal those of a released checkpoint (spec §2.2). The DINOv2
backbone runs timm's own `VisionTransformer` (`vit_base_patch14_reg4_dinov2` layout, dynamic image
size, antialiased bicubic position-embedding resampling) while its parameters are held in the
torch.hub format under `feature_extractor.dinov2.*` (`cls_token` without its position, `pos_embed`
[1, 1 + G², C], `register_tokens`, `mask_token`). Numerics follow the spec: ImageNet normalisation,
disk click maps, raw block-output taps without the final norm, non-antialiased bicubic EncoderStack
position embedding, GroupNorm(1) eps 1e-5, exact GELU, ReLU ConvModules, Dropout2d, and an
align_corners=True final resize.

Tensors are NCHW (images) and [B, N, C] (tokens). `forward_stages` returns the named stages of
`skipclick_jax.model.forward_stages` in PyTorch layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

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
            x, indices=list(taps), norm=False, stop_early=True, output_fmt="NLC",
            intermediates_only=True,
        )


class FeatureExtractor(nn.Module):
    def __init__(self, backbone_cfg):
        super().__init__()
        self.dinov2 = Dinov2Reg(**backbone_cfg)


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
    """`backbone_mix`: click embedding + own position embedding, then `depth` blocks (spec §1.5)."""

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
    """SimpleClick's SimpleFPN; with skips branch i sees cat([X, S_i]) (spec §1.6)."""

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
    """SegFormer all-MLP head (`SwinTransfomerSegHead`, spec §1.7)."""

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
    """FeatureVitModel (full forward, spec §1.3) built from a project model config."""

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
        taps = self.feature_extractor.dinov2(rgb, self.taps)
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
