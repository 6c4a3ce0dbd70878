"""Key and layout rules: original PyTorch SkipClick state dicts <-> the JAX parameter tree.

Rule table (torch key -> JAX path, applied in order; the inverse undoes them):
  feature_extractor.dinov{2,3}.X    -> feature_extractor.X
  neck.down_K.N.X, head.up_convK.N.X -> ....layers.N.X      (torch Sequential index)
  leaf `weight`, 2-D (Linear)        -> `kernel`, transposed to [in, out]
  leaf `weight`, 4-D Conv2d OIHW     -> `kernel` HWIO, permute (2, 3, 1, 0)
  leaf `weight`, 4-D ConvTranspose2d -> `kernel` [kh, kw, I, O], permute (2, 3, 0, 1)
  leaf `weight`, 1-D (LN/GN)         -> `scale`
  everything else (bias, tokens, pos_embed, ls gamma, DINOv3's `rope_embed.periods` and
  `attn.qkv.bias_mask` buffers) keeps name and shape.

`torch_layout(cfg)` lists every key and shape of the original state dict, in the original order,
for a project model config. All functions work on numpy arrays; no torch.
"""

from __future__ import annotations

import collections
import re

import ml_collections
import numpy as np
from tqdm import tqdm

from skipclick_jax.defaults import UPSAMPLE_FACTOR as _UPSAMPLE
from skipclick_jax.weights import CheckpointError

HUB_PREFIX = "feature_extractor.dinov2."
DINOV3_PREFIX = "feature_extractor.dinov3."
BACKBONE_PREFIXES = {"dinov2": HUB_PREFIX, "dinov3": DINOV3_PREFIX}  # by model.backbone.kind
_SEQ = re.compile(r"^(neck\.down_\d+|head\.up_conv[12])\.(\d+)\.")
_SEQ_JAX = re.compile(r"^(neck\.down_\d+|head\.up_conv[12])\.layers\.(\d+)\.")
_CONV_T = re.compile(r"^(neck\.down_4\.[03]|neck\.down_8\.0|head\.up_conv[12]\.0)\.weight$")
_PERM = {"linear": (1, 0), "conv": (2, 3, 1, 0), "convT": (2, 3, 0, 1)}
EXTRACTOR_TYPES = {"dinov2": "dinov2_vitb14_reg", "dinov3": "dinov3_vitb16"}  # `extractor_type`


def _kind(torch_key: str, ndim: int) -> str | None:
    if not torch_key.endswith(".weight") or ndim == 1:
        return None
    if ndim == 2:
        return "linear"
    return "convT" if _CONV_T.match(torch_key) else "conv"


def jax_path(torch_key: str, ndim: int) -> tuple[str | int, ...]:
    """Torch key (and its tensor's ndim) -> JAX state path, e.g. ('neck', 'down_4', 'layers', 0, 'kernel')."""
    key = torch_key
    for prefix in BACKBONE_PREFIXES.values():
        if key.startswith(prefix):
            key = "feature_extractor." + key[len(prefix):]
    key = _SEQ.sub(r"\1.layers.\2.", key)
    if key.endswith(".weight"):
        key = key[: -len("weight")] + ("scale" if ndim == 1 else "kernel")
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def backbone_prefix(cfg: ml_collections.ConfigDict) -> str:
    """The torch key prefix of the backbone of model config `cfg`."""
    return BACKBONE_PREFIXES[cfg.backbone.get("kind", "dinov2")]


def torch_key(path: tuple, prefix: str = HUB_PREFIX) -> str:
    """JAX state path -> torch key (inverse of `jax_path`; `prefix`: the backbone's)."""
    key = ".".join(str(p) for p in path)
    key = _SEQ_JAX.sub(r"\1.\2.", key)
    if key.startswith("feature_extractor."):
        key = prefix + key[len("feature_extractor."):]
    for leaf in (".kernel", ".scale"):
        if key.endswith(leaf):
            key = key[: -len(leaf)] + ".weight"
    return key


def to_jax(torch_key_: str, array: np.ndarray) -> np.ndarray:
    """Torch tensor (numpy) -> JAX layout (a new, writable C-contiguous array)."""
    kind = _kind(torch_key_, array.ndim)
    return np.array(array.transpose(_PERM[kind]) if kind else array, order="C")


def to_torch(torch_key_: str, array: np.ndarray) -> np.ndarray:
    """JAX array (numpy) -> torch layout for `torch_key_` (a new, writable C-contiguous array)."""
    kind = _kind(torch_key_, array.ndim)
    return np.array(array.transpose(np.argsort(_PERM[kind])) if kind else array, order="C")


def torch_layout(cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Every key -> shape of the original state dict for model config `cfg`, in state_dict order."""
    bb, st, nk, hd = cfg.backbone, cfg.stack, cfg.neck, cfg.head
    out: dict[str, tuple[int, ...]] = {}

    def linear(p, i, o):
        out.update({f"{p}.weight": (o, i), f"{p}.bias": (o,)})

    def conv(p, i, o, k=1):
        out.update({f"{p}.weight": (o, i, k, k), f"{p}.bias": (o,)})

    def conv_t(p, i, o):
        out.update({f"{p}.weight": (i, o, 2, 2), f"{p}.bias": (o,)})

    def norm(p, c):
        out.update({f"{p}.weight": (c,), f"{p}.bias": (c,)})

    d, s = bb.dim, st.dim
    conv("patch_embed_coords.proj", 3, s, st.patch)
    h = backbone_prefix(cfg)
    dinov3 = h == DINOV3_PREFIX
    if dinov3:
        out.update({f"{h}cls_token": (1, 1, d), f"{h}storage_tokens": (1, bb.num_registers, d),
                    f"{h}mask_token": (1, d)})
    else:
        out.update({f"{h}cls_token": (1, 1, d), f"{h}pos_embed": (1, 1 + bb.pos_grid**2, d),
                    f"{h}register_tokens": (1, bb.num_registers, d), f"{h}mask_token": (1, d)})
    conv(f"{h}patch_embed.proj", 3, d, bb.patch)
    if dinov3:
        out[f"{h}rope_embed.periods"] = (d // bb.heads // 4,)
    for i in range(bb.depth):
        b = f"{h}blocks.{i}."
        norm(b + "norm1", d)
        linear(b + "attn.qkv", d, 3 * d)
        if dinov3:
            out[b + "attn.qkv.bias_mask"] = (3 * d,)
        linear(b + "attn.proj", d, d)
        out[b + "ls1.gamma"] = (d,)
        norm(b + "norm2", d)
        linear(b + "mlp.fc1", d, int(d * bb.mlp_ratio))
        linear(b + "mlp.fc2", int(d * bb.mlp_ratio), d)
        out[b + "ls2.gamma"] = (d,)
    norm(f"{h}norm", d)
    grid = cfg.crop_size // st.patch
    out["backbone_mix.pos_embed"] = (1, grid * grid, s)
    for i in range(st.depth):
        b = f"backbone_mix.blocks.{i}."
        norm(b + "norm1", s)
        norm(b + "norm2", s)
        linear(b + "attn.qkv", s, 3 * s)
        linear(b + "attn.proj", s, s)
        linear(b + "mlp.fc1", s, int(s * st.mlp_ratio))
        linear(b + "mlp.fc2", int(s * st.mlp_ratio), s)
    o = tuple(nk.out_dims)
    n_in = s + d if nk.skip_connections else s
    c4, c8, c32 = max(2 * o[0], n_in // 2), max(o[1], n_in // 2), max(o[3], 2 * n_in)
    conv_t("neck.down_4.0", n_in, c4), norm("neck.down_4.1", c4)
    conv_t("neck.down_4.3", c4, c4 // 2), norm("neck.down_4.4", c4 // 2)
    conv("neck.down_4.5", c4 // 2, o[0]), norm("neck.down_4.6", o[0])
    conv_t("neck.down_8.0", n_in, c8), norm("neck.down_8.1", c8)
    conv("neck.down_8.2", c8, o[1]), norm("neck.down_8.3", o[1])
    conv("neck.down_16.0", n_in, o[2]), norm("neck.down_16.1", o[2])
    conv("neck.down_32.0", n_in, c32, 2), norm("neck.down_32.1", c32)
    conv("neck.down_32.2", c32, o[3]), norm("neck.down_32.3", o[3])
    e = hd.embed_dim
    conv("head.conv_seg", e // _UPSAMPLE[hd.upsample], 1)
    for i, c in enumerate(o):
        conv(f"head.convs.{i}.conv", c, e)
    conv("head.fusion_conv.conv", len(o) * e, e)
    for name, i in (("up_conv1", e), ("up_conv2", e // 2)):
        conv_t(f"head.{name}.0", i, i // 2), norm(f"head.{name}.1", i // 2)
        conv(f"head.{name}.2", i // 2, i // 2), norm(f"head.{name}.3", i // 2)
    if len(bb.taps) > 1:
        linear("fuse", len(bb.taps) * d, s)
    return out


def flatten(tree, prefix: str = "") -> list[tuple[str, object]]:
    """Nested mapping (pure dict, orbax metadata) -> [(dotted path, leaf)], sorted by path."""
    items = []
    for k, v in tree.items():
        path = f"{prefix}{k}"
        is_node = hasattr(v, "items") and not hasattr(v, "shape")
        items += flatten(v, path + ".") if is_node else [(path, v)]
    return sorted(items)


def check_state_dict(sd: dict, layout: dict, source: str) -> None:
    """Raises CheckpointError on missing/unexpected keys or shape mismatches (names key + shapes)."""
    missing = [k for k in layout if k not in sd]
    unexpected = [k for k in sd if k not in layout]
    if missing or unexpected:
        show = lambda ks: ", ".join(ks[:6]) + (f", ... ({len(ks)} in all)" if len(ks) > 6 else "")
        parts = ([f"missing keys: {show(missing)}"] if missing else []) + (
            [f"unexpected keys: {show(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{source}: state dict does not match the model config; "
                              + "; ".join(parts))
    for k, shape in layout.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise CheckpointError(f"{source}: key '{k}' has shape {tuple(sd[k].shape)} in the file "
                                  f"but {tuple(shape)} in the model config")


def state_dict_to_params(sd: dict, cfg: ml_collections.ConfigDict, source: str,
                         prefix: str = "", progress: bool = False) -> dict:
    """Checked torch-layout state dict (the keys of `cfg` starting with `prefix`) -> nested pure
    dict of float32 numpy arrays in the JAX layout."""
    layout = {k: s for k, s in torch_layout(cfg).items() if k.startswith(prefix)}
    check_state_dict(sd, layout, source)
    params: dict = {}
    for k in tqdm(layout, desc="converting", unit="tensor", leave=False, disable=not progress):
        node = params
        path = jax_path(k, sd[k].ndim)
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = to_jax(k, np.asarray(sd[k], np.float32))
    return params


def params_to_state_dict(params: dict, cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Nested pure dict (JAX layout) -> OrderedDict in the original key order and layout."""
    out = collections.OrderedDict()
    for k, shape in torch_layout(cfg).items():
        node, path = params, jax_path(k, len(shape))
        for p in path:
            if p not in node:
                raise CheckpointError(f"model parameters have no '{'.'.join(map(str, path))}' "
                                      f"(torch key '{k}')")
            node = node[p]
        out[k] = to_torch(k, np.asarray(node))
        if out[k].shape != tuple(shape):
            raise CheckpointError(f"parameter for '{k}' has torch shape {out[k].shape}, "
                                  f"config expects {tuple(shape)}")
    return out


# ----------------------------------------------------------------------------- DINOv2 backbones
def timm_to_hub(sd: dict) -> dict[str, np.ndarray]:
    """timm `vit_*_reg4_dinov2` keys -> hub keys; the cls position is folded (pos_embed[:, 0] = 0)."""
    sd = dict(sd)
    if not {"cls_token", "reg_token", "pos_embed"} <= sd.keys():
        raise CheckpointError("timm DINOv2 state dict needs cls_token, reg_token and pos_embed")
    cls, pos = sd.pop("cls_token"), sd.pop("pos_embed")
    out = {"cls_token": cls, "pos_embed": np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1),
           "register_tokens": sd.pop("reg_token"), "mask_token": np.zeros_like(cls[0])}
    out.update(sd)
    return out


def fold_cls_position(sd: dict) -> dict[str, np.ndarray]:
    """Hub dict in canonical form: cls_token + pos_embed[:, 0] and a zero cls position.

    The forward is unchanged bit for bit (the model adds the two in float32 either way); hub and
    timm files of the same weights then import to identical parameters.
    """
    sd = dict(sd)
    pos = np.array(sd["pos_embed"], np.float32)
    sd["cls_token"] = np.asarray(sd["cls_token"], np.float32) + pos[:, :1]
    pos[:, 0] = 0.0
    sd["pos_embed"] = pos
    return sd


# ----------------------------------------------------------------------------- DINOv3 backbones
def check_periods(periods: np.ndarray, source: str) -> str | None:
    """A warning text if RoPE `periods` are not bfloat16-representable (the released DINOv3
    files store bfloat16-rounded periods; others are kept as loaded but may not match them)."""
    import ml_dtypes

    p = np.asarray(periods, np.float32)
    rounded = p.astype(ml_dtypes.bfloat16).astype(np.float32)
    if np.array_equal(p, rounded):
        return None
    return (f"{source}: rope_embed.periods are not bfloat16-representable (max relative change "
            f"under bfloat16 rounding {float(np.max(np.abs(rounded - p) / np.abs(p))):.2g}); the "
            "released DINOv3 weights store bfloat16-rounded periods, so this file may not be one "
            "of them. Using the periods as stored.")


def timm_to_hub_dinov3(sd: dict, heads: int, rope_base: float) -> dict[str, np.ndarray]:
    """timm `vit_*_patch16_dinov3[_qkvb]` keys -> DINOv3 hub keys (timm's checkpoint_filter_fn
    inverted): reg_token -> storage_tokens, gamma_1/2 -> ls1/ls2.gamma, q_bias/v_bias ->
    qkv.bias [q; 0; v] with bias_mask [1; 0; 1] (no q_bias: a zero bias), mask_token zeros, and
    the default `rope_embed.periods` rounded to bfloat16 (timm stores none)."""
    from skipclick_jax.model.dinov3 import default_periods

    sd = dict(sd)
    if not {"cls_token", "reg_token"} <= sd.keys() or "pos_embed" in sd:
        raise CheckpointError("timm DINOv3 state dict needs cls_token and reg_token and no pos_embed")
    cls = sd.pop("cls_token")
    out = {"cls_token": cls, "storage_tokens": sd.pop("reg_token"),
           "mask_token": np.zeros_like(cls[0])}
    out.update({k: v for k, v in sd.items() if k.startswith("patch_embed.")})
    d = cls.shape[-1]
    out["rope_embed.periods"] = default_periods(d // heads, rope_base)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        q, v = sd.pop(b + "attn.q_bias", None), sd.pop(b + "attn.v_bias", None)
        if (q is None) != (v is None):
            raise CheckpointError(f"timm DINOv3 state dict has only one of {b}attn.q_bias/v_bias")
        mask = np.ones(3 * d, np.float32)
        mask[d:2 * d] = 0.0
        zero = np.zeros(d, np.float32)
        bias = zero if q is None else np.asarray(q, np.float32)
        bias = np.concatenate([bias, zero, zero if v is None else np.asarray(v, np.float32)])
        for name, key in (("norm1.weight", "norm1.weight"), ("norm1.bias", "norm1.bias"),
                          ("attn.qkv.weight", "attn.qkv.weight")):
            out[b + name] = sd.pop(b + key)
        out[b + "attn.qkv.bias"], out[b + "attn.qkv.bias_mask"] = bias, mask
        for name, key in (("attn.proj.weight",) * 2, ("attn.proj.bias",) * 2,
                          ("ls1.gamma", "gamma_1"), ("norm2.weight",) * 2, ("norm2.bias",) * 2,
                          ("mlp.fc1.weight",) * 2, ("mlp.fc1.bias",) * 2, ("mlp.fc2.weight",) * 2,
                          ("mlp.fc2.bias",) * 2, ("ls2.gamma", "gamma_2")):
            if b + key not in sd:
                raise CheckpointError(f"timm DINOv3 state dict has no '{b}{key}'")
            out[b + name] = sd.pop(b + key)
    out.update({k: v for k, v in sd.items() if not k.startswith("patch_embed.")})  # norm, extras
    return out


# ----------------------------------------------------------------------------- configs
def _value(config: dict | None, name: str, default=None):
    params = (config or {}).get("params", {})
    return params[name]["value"] if name in params else default


def model_config_from_state_dict(sd: dict, released_config: dict | None,
                                 source: str) -> ml_collections.ConfigDict:
    """Architecture of a released SkipClick checkpoint from its tensor shapes and `config` entry.

    Shapes decide taps/fuse, skips, stack depth, widths, upsample mode and crop size; the config
    entry must agree with them. Head counts are not visible in shapes: the stack's comes from the
    entry (backbone_params.num_heads), DINOv2's is dim / 64 (every DINOv2 size), DINOv3's is
    dim / (4 · len(rope_embed.periods)). Single-tap checkpoints (use_intermediate=[11]) map to
    taps=(2,), the released behaviour (docs/design/model.md#released-code-quirks). The backbone is DINOv3 when the keys are under
    `feature_extractor.dinov3.`; the original then accepts any `extractor_type` starting with
    'dinov3' (docs/design/model.md#dinov3-backbone), DINOv2 needs 'dinov2_vitb14_reg'.
    """
    from skipclick_jax.config_lib import model_config

    def shape(k):
        if k not in sd:
            raise CheckpointError(f"{source}: not a SkipClick state dict (no key '{k}')")
        return tuple(sd[k].shape)

    kind = "dinov3" if any(k.startswith(DINOV3_PREFIX) for k in sd) else "dinov2"
    extractor = _value(released_config, "extractor_type", EXTRACTOR_TYPES[kind])
    supported = extractor.startswith("dinov3") if kind == "dinov3" else extractor == EXTRACTOR_TYPES[kind]
    if not supported or _value(released_config, "use_conv_stack", False):
        raise CheckpointError(f"{source}: unsupported variant extractor_type={extractor!r} with "
                              f"{kind} backbone keys, use_conv_stack="
                              f"{_value(released_config, 'use_conv_stack')}")
    h = BACKBONE_PREFIXES[kind]
    d = shape(h + "cls_token")[2]
    s = shape("backbone_mix.pos_embed")[2]
    patch = shape("patch_embed_coords.proj.weight")[2]
    grid = int(round(np.sqrt(shape("backbone_mix.pos_embed")[1])))
    depth_bb = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(h + "blocks."))
    depth_st = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("backbone_mix.blocks."))
    n_taps = shape("fuse.weight")[1] // d if "fuse.weight" in sd else 1
    skip = shape("neck.down_16.0.weight")[1] == s + d
    out_dims = tuple(shape(f"neck.down_{k}.{i}.weight")[0]
                     for k, i in ((4, 5), (8, 2), (16, 0), (32, 2)))
    embed = shape("head.fusion_conv.conv.weight")[0]
    upsample = {embed // f: u for u, f in _UPSAMPLE.items()}.get(shape("head.conv_seg.weight")[1])
    if upsample is None or n_taps not in (1, 4):
        raise CheckpointError(f"{source}: unrecognised head/fuse widths "
                              f"(conv_seg {shape('head.conv_seg.weight')}, taps {n_taps})")
    use_int = _value(released_config, "use_intermediate")
    bp = _value(released_config, "backbone_params", None) or {}
    hp = _value(released_config, "head_params", None) or {}
    for name, stated, implied in (
        ("use_intermediate (several taps)", None if use_int is None else len(use_int) > 1, n_taps > 1),
        ("skip_connections", _value(released_config, "skip_connections"), skip),
        ("backbone_params.depth", bp.get("depth"), depth_st),
        ("head_params.upsample", hp.get("upsample"), upsample),
    ):
        if stated is not None and stated != implied:
            raise CheckpointError(f"{source}: config entry {name} = {stated!r} contradicts the "
                                  f"tensor shapes, which imply {implied!r}")
    patch_bb = shape(h + "patch_embed.proj.weight")[2]
    if patch_bb != patch:
        raise CheckpointError(f"{source}: backbone patch {patch_bb} differs from the click "
                              f"embedding's patch {patch} (patch_embed_coords.proj.weight)")
    cfg = model_config(
        backbone=kind, taps=(2, 5, 8, 11) if n_taps == 4 else (2,), skip_connections=skip,
        stack_depth=depth_st, upsample=upsample,
        frozen=not _value(released_config, "trained_extractor", False), crop_size=grid * patch,
    )
    mlp_bb = shape(h + "blocks.0.mlp.fc1.weight")[0] / d
    mlp_st = shape("backbone_mix.blocks.0.mlp.fc1.weight")[0] / s
    if kind == "dinov3":
        head_dim = 4 * shape(h + "rope_embed.periods")[0]
        if d % head_dim:
            raise CheckpointError(f"{source}: rope_embed.periods {shape(h + 'rope_embed.periods')} "
                                  f"implies head dim {head_dim}, which does not divide dim {d}")
        cfg.backbone.update(dim=d, depth=depth_bb, heads=d // head_dim, patch=patch,
                            num_registers=shape(h + "storage_tokens")[1], mlp_ratio=int(mlp_bb))
    else:
        grid2p1 = shape(h + "pos_embed")[1]
        cfg.backbone.update(dim=d, depth=depth_bb, heads=max(1, d // 64), patch=patch,
                            num_registers=shape(h + "register_tokens")[1],
                            pos_grid=int(round(np.sqrt(grid2p1 - 1))), mlp_ratio=int(mlp_bb))
    cfg.stack.update(dim=s, heads=bp.get("num_heads", max(1, s // 64)), patch=patch,
                     mlp_ratio=int(mlp_st))
    cfg.neck.out_dims = out_dims
    cfg.head.embed_dim = embed
    cfg.disk_radius = _value(released_config, "norm_radius", cfg.disk_radius)
    return cfg


def released_config_entry(cfg: ml_collections.ConfigDict) -> dict:
    """The original-format `config` entry (builtin values only) for an exported `.pth`.

    For DINOv3 the original also needs `backbone_repo_path`/`backbone_weight_path` (local paths to
    rebuild the torch model with torch.hub); they are not known here and left out."""
    taps = tuple(cfg.backbone.taps)
    if taps not in ((2,), (2, 5, 8, 11)):
        raise CheckpointError(f"taps={taps} cannot be expressed in the original code, which always "
                              "taps blocks (2, 5, 8, 11) and feeds block 2 to single-tap models")
    st, hd = cfg.stack, cfg.head
    params = dict(
        extractor_type=EXTRACTOR_TYPES[cfg.backbone.get("kind", "dinov2")],
        trained_extractor=not cfg.backbone.frozen,
        use_intermediate=[11] if taps == (2,) else [2, 5, 8, 11],
        skip_connections=bool(cfg.neck.skip_connections), random_split=False, use_conv_stack=False,
        use_disks=True, norm_radius=cfg.disk_radius, with_prev_mask=True,
        backbone_params=dict(img_size=(cfg.crop_size, cfg.crop_size), patch_size=(st.patch, st.patch),
                             embed_dim=st.dim, depth=st.depth, num_heads=st.heads,
                             mlp_ratio=st.mlp_ratio, qkv_bias=True, primitive_stack=True),
        neck_params=dict(in_dim=st.dim, out_dims=list(cfg.neck.out_dims)),
        head_params=dict(in_channels=list(cfg.neck.out_dims), in_index=[0, 1, 2, 3],
                         dropout_ratio=hd.dropout, num_classes=1, align_corners=False,
                         upsample=hd.upsample, channels=hd.embed_dim // _UPSAMPLE[hd.upsample]),
    )
    return {"class": "isegm.model.is_featurevit_model.FeatureVitModel",
            "params": {k: {"type": "builtin", "value": v, "specified": True} for k, v in params.items()}}
