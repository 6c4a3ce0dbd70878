"""The project's checkpoint format, and one `load` for every weight source.

A project checkpoint is a directory:
  <dir>/config.json        the config given to `save` (`config_lib.config_to_json`)
  <dir>/params/            orbax StandardCheckpointer of `nnx.to_pure_dict(nnx.state(model))` (the
                           parameters and stored buffers such as DINOv3's RoPE periods)
  <dir>/SHA256SUMS.json    size and SHA-256 of every other file (`write_digests`)
Every restore first checks the digests (`verify_digests`): a changed, truncated or missing file is
a `CorruptCheckpointError` naming it, never loaded. train.py steps carry the same digest file.
`load` also reads a train.py run (`<workdir>` or `<workdir>/checkpoints`: the latest step's
'params' item and the root config.json) and released SkipClick
`.pth` files, `.safetensors`/`.pth` state dicts and DINOv2 hub/timm backbones
(`skipclick_jax.weights`; no torch: `.pth` files are read by a restricted numpy unpickler).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import tempfile

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from skipclick_jax import config_lib, storage
from skipclick_jax.atomic import atomic_directory
from skipclick_jax.model import SkipClick, build_model
from skipclick_jax.weights import CheckpointError
from skipclick_jax.weights.importer import import_weights, model_section
from skipclick_jax.weights.mapping import flatten

PARAMS, CONFIG, DIGESTS = "params", "config.json", "SHA256SUMS.json"
log = logging.getLogger(__name__)


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file differs from the digest recorded when it was written (or is missing)."""


def _sha256(path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_digests(directory: str | os.PathLike, exclude: tuple[str, ...] = ()):
    """Records {relative path: {size, sha256}} of every file under `directory` (local or gs://;
    but the relative paths in `exclude`) in its DIGESTS file (`storage.write_atomic`: written
    beside, then renamed, or one object upload, so it is complete or absent)."""
    directory = storage.as_path(directory)
    names = [n for n in storage.list_files(directory)
             if n != DIGESTS and not n.rsplit("/", 1)[-1].startswith(f".{DIGESTS}") and n not in exclude]
    table = {n: dict(size=_size(directory / n), sha256=_sha256(directory / n)) for n in names}
    return storage.write_atomic(directory / DIGESTS, json.dumps(table, indent=1, sort_keys=True))


def verify_digests(directory: str | os.PathLike, under: str | None = None) -> None:
    """Checks the files recorded in `directory`'s DIGESTS (only those below `under` if given).

    Raises CorruptCheckpointError naming the first file that is missing, has another size or
    another SHA-256, or when the digest file itself is missing or unreadable.
    """
    directory = storage.as_path(directory)
    table_path = directory / DIGESTS
    if not table_path.is_file():
        raise CorruptCheckpointError(
            f"{directory}: no integrity digests ({DIGESTS} is missing): the save did not complete, "
            f"or the checkpoint was written without digests; refusing to load unverified weights "
            f"(if the files are complete and yours, seal it: python -m skipclick_jax.seal {directory})")
    try:
        table = json.loads(table_path.read_text())
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in table.items()]
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{table_path}: unreadable digest file ({e})") from None
    selected = [e for e in entries if under is None or e[0] == under or e[0].startswith(under + "/")]
    if under is not None and not selected:
        raise CorruptCheckpointError(f"{table_path}: records no files under {under}/")
    for name, size, digest in selected:
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{path}: checkpoint file is missing (deleted or moved)")
        actual = _size(path)
        if actual != size:
            raise CorruptCheckpointError(f"{path}: checkpoint file is {actual} bytes, "
                                         f"{size} were written (truncated or changed)")
        if _sha256(path) != digest:
            raise CorruptCheckpointError(f"{path}: checkpoint file content differs from the SHA-256 "
                                         "recorded when it was written (corrupted)")


def _size(path) -> int:
    return path.stat().length if storage.is_remote(path) else path.stat().st_size


def save(path: str | os.PathLike, model: SkipClick, config: ml_collections.ConfigDict, *,
         overwrite: bool = False) -> pathlib.Path:
    """Writes `model`'s parameters and `config` (full or model section) to directory `path`.

    The directory appears atomically (written beside it, then renamed). On gs:// it is written
    locally, then uploaded with its digest file last (a reader never verifies a partial upload).
    """
    if storage.is_remote(path):
        return _save_remote(storage.check_access(path, write=True, what="checkpoint"), model,
                            config, overwrite)
    path = pathlib.Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists")
    with atomic_directory(path) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / PARAMS, nnx.to_pure_dict(nnx.state(model)))
        checkpointer.wait_until_finished()
        (tmp / CONFIG).write_text(config_lib.config_to_json(config))
        write_digests(tmp)
    return path


def _save_remote(path, model, config, overwrite: bool):
    old = storage.list_files(path)
    if old and not overwrite:
        raise FileExistsError(f"{path} exists")
    with tempfile.TemporaryDirectory(prefix="skipclick-save-") as tmp:
        local = save(pathlib.Path(tmp) / "ckpt", model, config)
        if DIGESTS in old:
            (path / DIGESTS).unlink()  # unsealed while the new files replace the old ones
        new = storage.copy_tree(local, path, last=(DIGESTS,))
    leftover = sorted(set(old) - set(new))
    if leftover:
        storage._fs().rm([storage._key(path / n) for n in leftover])
    return path


def _latest_train_step(root: pathlib.Path) -> pathlib.Path | None:
    """params/ of the newest sealed step (one with digests; a step still being written or sealed
    is passed over), else of the newest step (which then fails verification)."""
    steps = sorted((p for p in root.iterdir() if p.name.isdigit() and (p / PARAMS).is_dir()),
                   key=lambda p: int(p.name), reverse=True)
    sealed = [p for p in steps if (p / DIGESTS).is_file()]
    if sealed and sealed[0] != steps[0]:
        log.warning("%s: steps %s have no %s yet (being written or sealed); loading step %s",
                    root, [p.name for p in steps[:steps.index(sealed[0])]], DIGESTS, sealed[0].name)
    return (sealed or steps)[0] / PARAMS if steps else None


def _restore(params_dir: pathlib.Path, model_cfg: ml_collections.ConfigDict) -> SkipClick:
    """Restores orbax params onto a SkipClick of `model_cfg` (its digests checked first); shape
    mismatches name the key."""
    verify_digests(params_dir.parent, under=PARAMS)
    config_lib.validate_model_config(model_cfg)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg)))
    target = nnx.to_pure_dict(state)
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = checkpointer.metadata(params_dir).item_metadata
    except Exception as e:  # noqa: BLE001 - orbax raises many types; name the directory
        raise CheckpointError(f"{params_dir}: orbax cannot read its metadata "
                              f"({type(e).__name__}: {e})") from None
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
    remote = storage.is_remote(source)
    path = storage.check_access(source, write=False, what="checkpoint") if remote else pathlib.Path(source)
    if path.is_dir():
        path = path if remote else path.absolute()  # orbax's metadata reads need absolute paths
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        if (root / PARAMS).is_dir():
            params_dir, kind = root / PARAMS, "project"
        else:
            params_dir, kind = _latest_train_step(root), "train"
        if params_dir is None:
            raise CheckpointError(f"{path}: not a checkpoint directory (expected {PARAMS}/ and "
                                  f"{CONFIG}, or train.py <step>/{PARAMS}/ and {CONFIG})")
        if not (root / CONFIG).is_file() and config is None:
            raise CorruptCheckpointError(f"{root / CONFIG}: missing (the checkpoint's config; pass "
                                         "a config explicitly to load it anyway)")
        if kind == "project" and config is None:
            verify_digests(root, under=CONFIG)
        if config is None:
            config = config_lib.read_config_json(root / CONFIG)
        model = _restore(params_dir, model_section(config))
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        dtypes = sorted({str(x.dtype) for x in leaves})
        return model, config, dict(source=str(params_dir), format=kind, dtypes=dtypes,
                                   tensors=len(leaves))
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if config is not None:
        config_lib.validate_model_config(model_section(config))
    with storage.local_file(path) as local:  # a gs:// weight file is downloaded first
        model, model_cfg, info = import_weights(
            local, model_section(config) if config is not None else None, fmt=fmt, seed=seed)
    if remote:
        info = dict(info, source=str(path))
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
