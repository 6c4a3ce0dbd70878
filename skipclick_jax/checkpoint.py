"""The project's checkpoint format, and one `load` for every weight source.

A project checkpoint is a directory:
  <dir>/config.json   the config given to `save` (`config_lib.config_to_json`)
  <dir>/params/       orbax StandardCheckpointer of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`
`load` also reads a train.py run (`<workdir>` or `<workdir>/checkpoints`: the latest step's
'params' item and the root config.json) and released SkipClick
`.pth` files, `.safetensors`/`.pth` state dicts and DINOv2 hub/timm backbones
(`skipclick_jax.weights`; no torch: `.pth` files are read by a restricted numpy unpickler).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from skipclick_jax import config_lib
from skipclick_jax.model import SkipClick, build_model
from skipclick_jax.weights import CheckpointError
from skipclick_jax.weights.importer import import_weights, model_section
from skipclick_jax.weights.mapping import flatten

PARAMS, CONFIG = "params", "config.json"


def save(path: str | os.PathLike, model: SkipClick, config: ml_collections.ConfigDict, *,
         overwrite: bool = False) -> pathlib.Path:
    """Writes `model`'s parameters and `config` (full or model section) to directory `path`.

    The directory appears atomically (written beside it, then renamed).
    """
    path = pathlib.Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / PARAMS, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        checkpointer.wait_until_finished()
        (tmp / CONFIG).write_text(config_lib.config_to_json(config))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _latest_train_step(root: pathlib.Path) -> pathlib.Path | None:
    steps = [p for p in root.iterdir() if p.name.isdigit() and (p / PARAMS).is_dir()]
    return max(steps, key=lambda p: int(p.name)) / PARAMS if steps else None


def _restore(params_dir: pathlib.Path, model_cfg: ml_collections.ConfigDict) -> SkipClick:
    """Restores orbax params onto a SkipClick of `model_cfg`; shape mismatches name the key."""

    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg)))
    target = nnx.to_pure_dict(state)
    checkpointer = ocp.StandardCheckpointer()
    stored = checkpointer.metadata(params_dir).item_metadata
    flat_t, flat_s = dict(flatten(target)), dict(flatten(stored))
    only = sorted(flat_t.keys() ^ flat_s.keys())
    if only:
        where = "the checkpoint" if only[0] in flat_s else "the model config"
        raise CheckpointError(f"{params_dir}: parameter {only[0]} exists only in {where}")
    for key, t in flat_t.items():
        if tuple(flat_s[key].shape) != tuple(t.shape):
            raise CheckpointError(f"{params_dir}: parameter {key} has shape {tuple(flat_s[key].shape)}"
                                  f" in the checkpoint but {tuple(t.shape)} in the model config")
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), target)
    nnx.replace_by_pure_dict(state, checkpointer.restore(params_dir, target))
    return nnx.merge(graphdef, state)


def load_with_info(source: str | os.PathLike, config: ml_collections.ConfigDict | None = None, *,
                   fmt: str = "auto", seed: int = 0) -> tuple[SkipClick, ml_collections.ConfigDict, dict]:
    """Like `load`, plus an info dict (source, format, dtypes, tensors)."""

    path = pathlib.Path(source)
    if path.is_dir():
        root = path / "checkpoints" if (path / "checkpoints" / CONFIG).is_file() else path
        if (root / PARAMS).is_dir():
            params_dir, kind = root / PARAMS, "project"
        else:
            params_dir, kind = _latest_train_step(root), "train"
        if params_dir is None or not (root / CONFIG).is_file():
            raise CheckpointError(f"{path}: not a checkpoint directory (expected {PARAMS}/ and "
                                  f"{CONFIG}, or train.py <step>/{PARAMS}/ and {CONFIG})")
        if config is None:
            config = config_lib.config_from_json((root / CONFIG).read_text())
        model = _restore(params_dir, model_section(config))
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        dtypes = sorted({str(x.dtype) for x in leaves})
        return model, config, dict(source=str(params_dir), format=kind, dtypes=dtypes,
                                   tensors=len(leaves))
    model, model_cfg, info = import_weights(
        path, model_section(config) if config is not None else None, fmt=fmt, seed=seed)
    return model, config if config is not None else config_lib.base_config(model_cfg), info


def load(source: str | os.PathLike, config: ml_collections.ConfigDict | None = None, *,
         fmt: str = "auto", seed: int = 0) -> tuple[SkipClick, ml_collections.ConfigDict]:
    """-> (model, config) from any weight source.

    `source`: a project checkpoint dir, a train.py run dir (latest step), a released SkipClick
    `.pth`, a state dict (`.pth`/`.safetensors`; needs `config` unless one is embedded) or a
    DINOv2 hub/timm backbone (needs `config`; the rest is initialised with `seed`). `config`
    (full or model section) overrides the stored one and is checked against the weights; without
    it the stored/embedded/inferred config is returned (inferred ones wrapped by `base_config`).
    """
    model, config, _ = load_with_info(source, config, fmt=fmt, seed=seed)
    return model, config
