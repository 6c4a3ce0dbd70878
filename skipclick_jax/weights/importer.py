"""Any supported weight file -> a SkipClick model (torch-free).

Sources (`fmt`): 'released' (a SkipClick `.pth` with {'state_dict', 'config'}; DINOv2 or DINOv3
backbone), 'state_dict' (a bare SkipClick state dict, `.pth` or `.safetensors`), 'hub' (DINOv2
`dinov2_vitb14_reg4_pretrain.pth` or DINOv3 `dinov3_vitb16_pretrain_lvd1689m-*.pth` keys) and 'timm'
(`vit_base_patch14_reg4_dinov2` or `vit_base_patch16_dinov3[_qkvb]` keys); backbones go into a
freshly initialised SkipClick. 'auto' tells them apart by their keys. `export_state_dict` is the
inverse mapping. DINOv3 RoPE periods are checked to be bfloat16-representable (a warning if not);
timm files have none, so the bfloat16-rounded defaults are used (with a warning).
"""

from __future__ import annotations

import collections
import os
import pathlib
import warnings

import ml_collections
import numpy as np

from skipclick_jax.weights import CheckpointError, mapping
from skipclick_jax.weights.unpickler import load_pth

FORMATS = ("auto", "released", "state_dict", "hub", "timm")
CONFIG_KEY = "skipclick_jax_model_config"  # project model config (JSON) stored in exports


def model_section(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `model` section of a full experiment config, or `cfg` itself if it is one."""
    return cfg.model if "model" in cfg else cfg


def read_file(path: str | os.PathLike) -> tuple[dict, dict | None, ml_collections.ConfigDict | None]:
    """-> (state dict of numpy arrays, original `config` entry or None, embedded project config)."""
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                sd = collections.OrderedDict((k, f.get_tensor(k)) for k in f.keys())
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        embedded = _embedded_config(meta.get(CONFIG_KEY), path, "metadata")
        return sd, None, embedded
    obj = load_pth(path)
    entry = None
    if isinstance(obj, dict) and "state_dict" in obj:
        entry, obj = obj.get("config"), obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise CheckpointError(f"{path}: not a checkpoint (expected a state dict of tensors or "
                              "{'state_dict': ..., 'config': ...})")
    embedded = _embedded_config(entry.get(CONFIG_KEY) if isinstance(entry, dict) else None, path,
                                "config entry")
    return obj, entry if isinstance(entry, dict) else None, embedded


def _embedded_config(text, path: pathlib.Path, where: str) -> ml_collections.ConfigDict | None:
    """The project config stored under CONFIG_KEY (None if absent); CheckpointError naming the
    file and the key if it is not a valid config JSON."""
    from skipclick_jax.config_lib import ConfigError, config_from_json

    if text is None:
        return None
    source = f"{path}: {where} key {CONFIG_KEY!r}"
    if not isinstance(text, str):
        raise CheckpointError(f"{source} holds a {type(text).__name__}, expected config JSON text")
    try:
        return config_from_json(text, source)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{source} is not a valid model config ({type(err).__name__}: {err})") from None


def warn_non_finite(sd: dict, source: str) -> list[str]:
    """Warns naming the floating tensors that hold NaN or inf values; -> their names."""
    bad = [k for k, v in sd.items()
           if (np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16")
           and not np.isfinite(np.asarray(v, np.float32)).all()]
    if bad:
        names = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        warnings.warn(f"{source}: {len(bad)} tensor(s) hold NaN or inf values: {names}; the model "
                      "will produce NaN where they are used", stacklevel=2)
    return bad


def detect_format(sd: dict, entry: dict | None, source: str) -> str:
    if any(k.startswith(tuple(mapping.BACKBONE_PREFIXES.values())) for k in sd):
        return "released" if entry is not None else "state_dict"
    if "register_tokens" in sd or "storage_tokens" in sd:
        return "hub"
    if "reg_token" in sd:
        return "timm"
    raise CheckpointError(f"{source}: unrecognised keys (first: {next(iter(sd))!r}); expected a "
                          "SkipClick state dict or a DINOv2-with-registers / DINOv3 backbone "
                          "(hub or timm)")


def backbone_kind(sd: dict) -> str:
    """'dinov3' or 'dinov2' for a hub/timm backbone state dict (DINOv3: storage tokens, or timm
    register tokens without an absolute position embedding)."""
    if "storage_tokens" in sd or ("reg_token" in sd and "pos_embed" not in sd):
        return "dinov3"
    return "dinov2"


def warn_periods(sd: dict, prefix: str, source: str) -> None:
    """Warns if a DINOv3 state dict's RoPE periods are not bfloat16-representable."""
    key = prefix + "rope_embed.periods"
    if key in sd:
        message = mapping.check_periods(sd[key], source)
        if message:
            warnings.warn(message, stacklevel=3)


def _abstract_params(cfg, seed: int | None):
    """(graphdef, state, pure dict): abstract for seed None, else freshly initialised."""
    from flax import nnx

    from skipclick_jax.model import build_model

    model = nnx.eval_shape(lambda: build_model(cfg)) if seed is None else build_model(cfg, seed)
    graphdef, state = nnx.split(model)
    return graphdef, state, nnx.to_pure_dict(state)


def _check_tree(params: dict, reference: dict, source: str) -> None:
    """`params` has exactly the leaves of `reference` (the model), with the same shapes."""
    got = {k: tuple(v.shape) for k, v in mapping.flatten(params)}
    want = {k: tuple(v.shape) for k, v in mapping.flatten(reference)}
    only = sorted(got.keys() ^ want.keys())
    if only:
        problem = "is missing from the converted weights" if only[0] in want else "is not in the model"
        raise CheckpointError(f"{source}: parameter {only[0]} {problem}")
    for k, shape in want.items():
        if got[k] != shape:
            raise CheckpointError(f"{source}: {k} has shape {got[k]}, the model expects {shape}")


def backbone_params(sd: dict, kind: str, cfg: ml_collections.ConfigDict, source: str) -> dict:
    """DINOv2/DINOv3 hub/timm state dict -> the model's `feature_extractor` subtree (JAX layout).

    DINOv2: both are brought to the canonical hub form (cls position folded into cls_token), so
    the same weights give identical parameters from either file; timm files have no mask_token
    (zeros). DINOv3: timm keys are mapped to the hub's (`mapping.timm_to_hub_dinov3`).
    """
    file_kind, model_kind = backbone_kind(sd), cfg.backbone.get("kind", "dinov2")
    if file_kind != model_kind:
        raise CheckpointError(f"{source}: a {file_kind} {kind} backbone file, but the model "
                              f"config's backbone.kind is {model_kind!r}")
    prefix = mapping.BACKBONE_PREFIXES[model_kind]
    if model_kind == "dinov3":
        if kind == "timm":
            hub = mapping.timm_to_hub_dinov3(sd, cfg.backbone.heads, cfg.backbone.rope_base)
            warnings.warn(f"{source}: timm DINOv3 weights carry no RoPE periods; using the "
                          "defaults rounded to bfloat16, as the released DINOv3 weights store them",
                          stacklevel=3)
        else:
            hub = dict(sd)
            warn_periods(hub, "", source)
    else:
        hub = mapping.timm_to_hub(sd) if kind == "timm" else mapping.fold_cls_position(sd)
    prefixed = {prefix + k: v for k, v in hub.items()}
    params = mapping.state_dict_to_params(prefixed, cfg, source, prefix=prefix, progress=True)
    return params["feature_extractor"]


def import_weights(src, cfg: ml_collections.ConfigDict | None = None, fmt: str = "auto",
                   seed: int = 0) -> tuple:
    """Reads `src` -> (model, model config, info dict). Raises CheckpointError naming the fault.

    `cfg` (model section) is required for 'state_dict' sources without an embedded config and
    for backbones; for released checkpoints it is checked against the file (shapes must agree).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    source = str(src)
    sd, entry, embedded = read_file(src)
    warn_non_finite(sd, source)
    try:
        detected = detect_format(sd, entry, source)
    except CheckpointError:
        if fmt == "auto":
            raise
        detected = "unrecognised"
    kind = detected if fmt == "auto" else fmt
    try:
        return _import(sd, entry, embedded, cfg, kind, source, seed)
    except KeyError as err:
        if fmt == "auto":
            raise
        raise CheckpointError(f"{source}: format {fmt!r} does not fit this file (its keys look like "
                              f"{detected!r}): missing key {err}") from None


def _import(sd, entry, embedded, cfg, kind, source, seed):
    from flax import nnx

    dtypes = sorted({str(v.dtype) for v in sd.values()})
    if kind in ("released", "state_dict"):
        if cfg is None:
            cfg = embedded
        if cfg is None and kind == "state_dict":
            raise CheckpointError(f"{source}: a bare state dict needs a model config (--config)")
        if cfg is None:
            cfg = mapping.model_config_from_state_dict(sd, entry, source)
        warn_periods(sd, mapping.DINOV3_PREFIX, source)
        params = mapping.state_dict_to_params(sd, cfg, source, progress=True)
        graphdef, state, reference = _abstract_params(cfg, seed=None)
    elif kind in ("hub", "timm"):
        if cfg is None:
            raise CheckpointError(f"{source}: a {kind} backbone file needs a model config (--config)")
        backbone = backbone_params(sd, kind, cfg, source)
        graphdef, state, reference = _abstract_params(cfg, seed=seed)
        params = dict(reference, feature_extractor=backbone)
    _check_tree(params, reference, source)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    info = dict(source=source, format=kind, dtypes=dtypes, tensors=len(sd))
    return model, cfg, info


def export_state_dict(model, cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """JAX model -> original state dict (numpy float32, original key order and layouts), its
    parameters and stored buffers (DINOv3's RoPE periods and qkv bias masks)."""
    from flax import nnx

    from skipclick_jax.model.dinov3 import Buffer

    pure = nnx.to_pure_dict(nnx.state(model, (nnx.Param, Buffer)))
    return mapping.params_to_state_dict(_to_numpy(pure), model_section(cfg))


def _to_numpy(tree):
    return {k: _to_numpy(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}
