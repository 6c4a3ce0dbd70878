"""Any supported weight file -> a SkipClick model (torch-free).

Sources (`fmt`): 'released' (a SkipClick `.pth` with {'state_dict', 'config'}), 'state_dict' (a
bare SkipClick state dict, `.pth` or `.safetensors`), 'hub' (DINOv2 `dinov2_vitb14_reg4_pretrain.pth`
keys) and 'timm' (`vit_base_patch14_reg4_dinov2` keys); backbones go into a freshly initialised
SkipClick. 'auto' tells them apart by their keys. `export_state_dict` is the inverse mapping.
"""

from __future__ import annotations

import collections
import os
import pathlib

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
    from skipclick_jax.config_lib import config_from_json

    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                sd = collections.OrderedDict((k, f.get_tensor(k)) for k in f.keys())
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        embedded = config_from_json(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
        return sd, None, embedded
    obj = load_pth(path)
    entry = None
    if isinstance(obj, dict) and "state_dict" in obj:
        entry, obj = obj.get("config"), obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise CheckpointError(f"{path}: not a checkpoint (expected a state dict of tensors or "
                              "{'state_dict': ..., 'config': ...})")
    embedded = None
    if isinstance(entry, dict) and isinstance(entry.get(CONFIG_KEY), str):
        embedded = config_from_json(entry[CONFIG_KEY])
    return obj, entry if isinstance(entry, dict) else None, embedded


def detect_format(sd: dict, entry: dict | None, source: str) -> str:
    if any(k.startswith(mapping.HUB_PREFIX) for k in sd):
        return "released" if entry is not None else "state_dict"
    if "register_tokens" in sd:
        return "hub"
    if "reg_token" in sd:
        return "timm"
    raise CheckpointError(f"{source}: unrecognised keys (first: {next(iter(sd))!r}); expected a "
                          "SkipClick state dict or a DINOv2-with-registers backbone (hub or timm)")


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
    """DINOv2 hub/timm state dict -> the model's `feature_extractor` subtree (JAX layout).

    Both are brought to the canonical hub form (cls position folded into cls_token), so the same
    weights give identical parameters from either file; timm files have no mask_token (zeros).
    """
    hub = mapping.timm_to_hub(sd) if kind == "timm" else mapping.fold_cls_position(sd)
    prefixed = {mapping.HUB_PREFIX + k: v for k, v in hub.items()}
    params = mapping.state_dict_to_params(prefixed, cfg, source, prefix=mapping.HUB_PREFIX,
                                          progress=True)
    return params["feature_extractor"]


def import_weights(src, cfg: ml_collections.ConfigDict | None = None, fmt: str = "auto",
                   seed: int = 0) -> tuple:
    """Reads `src` -> (model, model config, info dict). Raises CheckpointError naming the fault.

    `cfg` (model section) is required for 'state_dict' sources without an embedded config and
    for backbones; for released checkpoints it is checked against the file (shapes must agree).
    """
    from flax import nnx

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    source = str(src)
    sd, entry, embedded = read_file(src)
    kind = detect_format(sd, entry, source) if fmt == "auto" else fmt
    dtypes = sorted({str(v.dtype) for v in sd.values()})
    if kind in ("released", "state_dict"):
        if cfg is None:
            cfg = embedded
        if cfg is None and kind == "state_dict":
            raise CheckpointError(f"{source}: a bare state dict needs a model config (--config)")
        if cfg is None:
            cfg = mapping.model_config_from_state_dict(sd, entry, source)
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
    """JAX model -> original state dict (numpy float32, original key order and layouts)."""
    from flax import nnx

    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return mapping.params_to_state_dict(_to_numpy(pure), model_section(cfg))


def _to_numpy(tree):
    return {k: _to_numpy(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}
