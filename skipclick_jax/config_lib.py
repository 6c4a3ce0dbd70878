"""Building blocks of the experiment configs in `configs/` (one source of truth per fact).

A config is an `ml_collections.ConfigDict` with sections:
  model  – architecture (read by `skipclick_jax.model.SkipClick`),
  train  – training recipe (read by `train.py`),
  data   – training data (read by `train.py`),
  eval   – NoC protocol (read by `eval.py` and by the end of `train.py`).

Both command lines override a value with `--config.<section>.<key>=<value>` (`override`).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import pathlib

import ml_collections

from skipclick_jax.defaults import CLICK_DISTANCES, UPSAMPLE_FACTOR

DINOV2_VITB14_REG4 = dict(
    kind="dinov2", dim=768, depth=12, heads=12, patch=14, num_registers=4, pos_grid=37, mlp_ratio=4
)
# torch.hub `dinov3_vitb16` (docs/design/model.md#dinov3-backbone): 4 storage tokens (`num_registers`), RoPE base 100
# whose coordinate rescale factor 2 is active in training mode, LayerScale init 1e-5.
DINOV3_VITB16 = dict(
    kind="dinov3", dim=768, depth=12, heads=12, patch=16, num_registers=4, mlp_ratio=4,
    rope_base=100.0, rope_rescale=2.0, layerscale_init=1e-5,
)
BACKBONES = {"dinov2": DINOV2_VITB14_REG4, "dinov3": DINOV3_VITB16}


def model_config(
    *,
    backbone="dinov2",
    taps=(2, 5, 8, 11),
    skip_connections=True,
    stack_depth=4,
    upsample="x1",
    frozen=True,
    crop_size=448,
) -> ml_collections.ConfigDict:
    """The SkipClick architecture (docs/design/model.md#configurations); defaults are the full SkipClick model.

    `backbone` is 'dinov2' (ViT-B/14 with registers) or 'dinov3' (ViT-B/16, SkipClick-DINOv3);
    the EncoderStack and click embedding take its patch size. `backbone.taps` are the blocks whose
    outputs are used. Several taps are fused by a Linear layer; a single tap feeds the EncoderStack
    directly. The released code always feeds block 2 for its single-tap configs (docs/design/model.md#released-code-quirks), the
    paper describes block 11.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
    bb = BACKBONES[backbone]
    return ml_collections.ConfigDict(
        dict(
            crop_size=crop_size,
            disk_radius=5,
            num_max_points=24,
            backbone=dict(**bb, taps=tuple(taps), frozen=frozen),
            stack=dict(dim=768, depth=stack_depth, heads=12, patch=bb["patch"], mlp_ratio=4),
            neck=dict(out_dims=(128, 256, 512, 1024), skip_connections=skip_connections),
            # embed_dim = width of the fused head feature (SegFormer `out_channels`); the
            # classifier input is embed_dim / {x1: 1, x2: 2, x4: 4}.
            head=dict(embed_dim=256, upsample=upsample, dropout=0.1),
            # Compute settings (not architecture): 'float32' | 'bfloat16' for matmuls, convs and
            # attention (parameters stay float32); attention 'xla' | 'cudnn' (GPU, bfloat16).
            dtype="float32",
            attention="xla",
        )
    )


def tiny_model_config(backbone: str = "dinov2") -> ml_collections.ConfigDict:
    """`test_tiny` (`test_tiny_dinov3`): a SkipClick with every structural feature at toy widths
    (backbone dim 96, 12 blocks, 3 heads; stack 96 wide, 2 blocks; crop 224), used by tests."""
    cfg = model_config(backbone=backbone, crop_size=224, stack_depth=2)
    cfg.backbone.update(dim=96, heads=3)
    cfg.stack.update(dim=96, heads=3)
    cfg.neck.out_dims = (32, 64, 128, 256)
    cfg.head.embed_dim = 64
    return cfg


def base_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A full experiment config around `model` with the paper's training and eval recipe."""
    from skipclick_jax.defaults.evaluation import eval_defaults
    from skipclick_jax.defaults.train import data_defaults, train_defaults

    return ml_collections.ConfigDict(
        dict(model=model, train=train_defaults(), data=data_defaults(), eval=eval_defaults())
    )


class ConfigError(ValueError):
    """A config value, key or file is invalid (the message names it)."""


def split_config_arg(spec: str | pathlib.Path) -> tuple[pathlib.Path, str | None]:
    """'configs/x.py:arg' -> (path, 'arg'); a path that exists as given keeps its colons."""
    spec = str(spec)
    path, sep, arg = spec.rpartition(":")
    if not sep or pathlib.Path(spec).is_file() or not path:
        return pathlib.Path(spec), None
    return pathlib.Path(path), arg


def load_config_file(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """Loads `configs/x.py` (calls its `get_config(arg)`; `path` may end in ':arg') or a
    `config.json` written beside a checkpoint."""
    if arg is None:
        path, arg = split_config_arg(path)
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix == ".json":
        return read_config_json(path)
    spec = importlib.util.spec_from_file_location(f"_skipclick_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    try:
        return module.get_config(arg) if arg is not None else module.get_config()
    except (KeyError, TypeError) as e:
        raise ConfigError(f"config file {path}: get_config({arg!r}) failed: {type(e).__name__}: {e}") from e


OVERRIDE_PREFIX = "--config."


def override_arg(arg: str) -> tuple[str, str] | None:
    """'--config.<key>=<value>' -> (key, value); None for any other argument."""
    if not arg.startswith(OVERRIDE_PREFIX) or "=" not in arg:
        return None
    key, value = arg[len(OVERRIDE_PREFIX):].split("=", 1)
    return key, value


def override(cfg: ml_collections.ConfigDict, key: str, value: str) -> None:
    """Sets cfg.<key> (dotted) from the text of `--config.<key>=<value>`, parsed exactly as
    train.py's absl flags parse it (ml_collections `config_flags`, by the field's type: bool
    true/false/t/f/1/0, int, float, str, tuple as '(a, b)', a section as a dict literal).
    KeyError for an unknown key, ValueError for a value the field cannot take."""
    from absl import flags
    from ml_collections import config_flags

    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        if part not in node:
            raise KeyError(f"--config.{key}: no section {part!r}")
        node = node[part]
    if leaf not in node:
        raise KeyError(f"--config.{key}: unknown field (known: {sorted(node.keys())})")
    old = node[leaf]
    if old is None:  # no type to parse by (a null in an older config.json): a Python literal
        try:
            node[leaf] = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError) as e:
            raise ValueError(f"--config.{key}={value}: not a valid literal ({e})") from None
        return
    argv = ["override", f"{OVERRIDE_PREFIX}{key}={value}"]
    flag_values = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict("config", cfg, flag_values=flag_values, sys_argv=argv,
                                        lock_config=False)
        flag_values(argv)
    except (flags.Error, ValueError, TypeError) as e:
        cause = str(e).removeprefix(f"flag {argv[1]}: ")
        raise ValueError(f"--config.{key}={value}: not a valid {type(old).__name__} ({cause})") from None


def config_to_json(cfg: ml_collections.ConfigDict) -> str:
    return cfg.to_json_best_effort(indent=2, sort_keys=True)


def config_from_json(text: str, source: str = "config JSON") -> ml_collections.ConfigDict:
    """ConfigDict from `config_to_json` text (lists become tuples); ConfigError naming `source`."""

    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        return x

    if not text.strip():
        raise ConfigError(f"{source} is empty (expected the JSON config written with the checkpoint)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source} is not valid JSON ({e}); it is corrupt or truncated") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} holds a JSON {type(data).__name__}, expected an object of sections")
    return ml_collections.ConfigDict(tuples(data))


def read_config_json(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """`config_from_json` of file `path` (local or gs://); errors name the file."""
    from skipclick_jax import storage

    path = storage.as_path(path) if storage.is_remote(path) else pathlib.Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text JSON config (binary content); it is corrupt") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    return config_from_json(text, str(path))


def flatten_config(cfg) -> dict[str, object]:
    """{'section.key': leaf value} of a ConfigDict/dict (tuples and lists are leaves)."""
    out = {}
    items = cfg.items() if hasattr(cfg, "items") else ()
    for k, v in items:
        if hasattr(v, "items"):
            sub = flatten_config(v)
            out.update({f"{k}.{kk}": vv for kk, vv in sub.items()} or {k: {}})
        else:
            out[k] = tuple(v) if isinstance(v, list) else v
    return out


def config_diff(old, new) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every flattened key whose value differs (missing: '<absent>')."""
    a, b = flatten_config(old), flatten_config(new)
    absent = "<absent>"
    return [(k, a.get(k, absent), b.get(k, absent)) for k in sorted(a.keys() | b.keys())
            if _normal(a.get(k, absent)) != _normal(b.get(k, absent))]


def _normal(v):
    if isinstance(v, (list, tuple)):
        return tuple(_normal(x) for x in v)
    if isinstance(v, float) and v != v:
        return "nan"
    return v


def _check(ok: bool, key: str, value, want: str) -> None:
    if not ok:
        raise ConfigError(f"config value {key}={value!r} is invalid: {want}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_model_config(m: ml_collections.ConfigDict, prefix: str = "model") -> None:
    """Checks the architecture values that would otherwise fail deep inside the model."""
    def pos_int(key, node=m):
        v = node[key.split(".")[-1]]
        _check(_is_int(v) and v >= 1, f"{prefix}.{key}", v, "expected an integer >= 1")

    for key in ("crop_size", "num_max_points"):
        if key in m:
            pos_int(key)
    for section in ("backbone", "stack"):
        if section not in m:
            continue
        node = m[section]
        for key in ("dim", "depth", "heads", "patch"):
            if key in node:
                pos_int(f"{section}.{key}", node)
        if "dim" in node and "heads" in node:
            _check(node.dim % node.heads == 0, f"{prefix}.{section}.heads", node.heads,
                   f"the head count must divide {prefix}.{section}.dim={node.dim}")
    if "backbone" in m and "taps" in m.backbone and "depth" in m.backbone:
        taps = tuple(m.backbone.taps)
        _check(len(taps) >= 1 and all(_is_int(t) and 0 <= t < m.backbone.depth for t in taps),
               f"{prefix}.backbone.taps", taps,
               f"expected block indices in 0..{m.backbone.depth - 1} (backbone.depth={m.backbone.depth})")
    if "crop_size" in m and "backbone" in m and "patch" in m.backbone:
        _check(m.crop_size % m.backbone.patch == 0, f"{prefix}.crop_size", m.crop_size,
               f"expected a multiple of the patch size {m.backbone.patch}")
    if "head" in m and "upsample" in m.head:
        factors = UPSAMPLE_FACTOR
        _check(m.head.upsample in factors, f"{prefix}.head.upsample", m.head.upsample,
               f"expected one of {sorted(factors)}")
        e = m.head.get("embed_dim")
        _check(_is_int(e) and e >= 1 and e % factors[m.head.upsample] == 0, f"{prefix}.head.embed_dim",
               e, f"expected a positive multiple of {factors[m.head.upsample]} (upsample {m.head.upsample})")
    if "neck" in m and "out_dims" in m.neck:
        dims = tuple(m.neck.out_dims)
        _check(len(dims) == 4 and all(_is_int(d) and d >= 1 for d in dims), f"{prefix}.neck.out_dims",
               dims, "expected 4 positive integers")


def validate_eval_config(e: ml_collections.ConfigDict, prefix: str = "eval") -> None:
    """Checks the NoC protocol values (`defaults.evaluation.eval_defaults`)."""
    def need(key, ok, want):
        if key in e:
            _check(ok(e[key]), f"{prefix}.{key}", e[key], want)

    need("max_clicks", lambda v: _is_int(v) and v >= 1, "expected an integer >= 1")
    need("points_per_polarity", lambda v: _is_int(v) and v >= 1, "expected an integer >= 1")
    need("target_iou", lambda v: _number(v) and 0 < v <= 1.01, "expected a number in (0, 1.01]")
    need("thresh", lambda v: _number(v) and 0 < v < 1, "expected a number in (0, 1)")
    need("default_size", lambda v: _is_int(v) and v >= 1, "expected an integer >= 1")
    need("batch_size", lambda v: _is_int(v) and v >= 0, "expected an integer >= 0 (0 = default)")
    need("bucket", lambda v: _is_int(v) and v >= 1, "expected an integer >= 1")
    need("overlays", lambda v: _is_int(v) and v >= 0, "expected an integer >= 0")
    for name, size in dict(e.get("sizes", {})).items():
        _check(_is_int(size) and size >= 1, f"{prefix}.sizes.{name}", size, "expected an integer >= 1")


_OPEN_SECTIONS = ("eval.sizes",)  # any dataset name or prefix may be a key


def _unknown_keys(node, reference, prefix: str) -> None:
    for key in node.keys():
        if key not in reference:
            raise ConfigError(f"unknown config key {prefix}.{key} (value {node[key]!r}); known keys "
                              f"of {prefix}: {sorted(reference.keys())}")
        if (hasattr(node[key], "items") and hasattr(reference[key], "items") and reference[key]
                and f"{prefix}.{key}" not in _OPEN_SECTIONS):
            _unknown_keys(node[key], reference[key], f"{prefix}.{key}")


def _profile_ok(v) -> bool:
    from skipclick_jax.defaults.train import profile_range

    try:
        profile_range(v)
    except (ValueError, AttributeError):
        return False
    return True


def validate_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Refuses a full experiment config with unknown train/data/eval keys or invalid values,
    naming the key and the value. Returns `cfg`."""
    import dataclasses

    from skipclick_jax.data.custom_datasets import CustomOptions
    from skipclick_jax.data.eval_datasets import EVAL_DATASETS
    from skipclick_jax.data.synthetic import SyntheticConfig
    from skipclick_jax.data.train_datasets import TRAIN_DATASETS, TRAIN_SPLITS
    from skipclick_jax.defaults.evaluation import eval_defaults
    from skipclick_jax.defaults.train import data_defaults, train_defaults

    for section in ("model", "train", "data", "eval"):
        if section not in cfg:
            raise ConfigError(f"config has no {section!r} section (sections: {sorted(cfg.keys())})")
    validate_model_config(cfg.model)
    validate_eval_config(cfg.eval)
    t, d = cfg.train, cfg.data
    _unknown_keys(t, train_defaults(), "train")
    _unknown_keys(cfg.eval, eval_defaults(), "eval")
    reference = data_defaults()
    reference.synthetic = {f.name: None for f in dataclasses.fields(SyntheticConfig)}
    reference.eval_roots = {name: "" for name in EVAL_DATASETS}
    _unknown_keys(d, reference, "data")

    def need(node, prefix, key, ok, want):
        if key in node:
            _check(ok(node[key]), f"{prefix}.{key}", node[key], want)

    def pos_int(v):
        return _is_int(v) and v >= 1

    for key in ("batch_size", "keep_checkpoints", "log_every_steps"):
        need(t, "train", key, pos_int, "expected an integer >= 1")
    for key in ("num_steps", "checkpoint_every_steps", "image_summary_every_steps", "seed"):
        need(t, "train", key, _is_int, "expected an integer")
    for key in ("num_epochs", "num_image_summaries", "max_num_next_clicks"):
        need(t, "train", key, lambda v: _is_int(v) and v >= 0, "expected an integer >= 0")
    need(t, "train", "pred_thresh", lambda v: _number(v) and 0 <= v <= 1, "expected a number in [0, 1]")
    need(t, "train", "profile_steps", _profile_ok, "expected '' or 'A:B' with integers 1 <= A < B "
         "(a profiler trace of steps A .. B-1)")
    need(t, "train", "click_distance", lambda v: v in CLICK_DISTANCES,
         f"expected one of {CLICK_DISTANCES}: OpenCV's 5x5 chamfer as its IPP path (the original's "
         "on x86) or its fixed-point path computes it, or the exact Euclidean distance")
    if "optimizer" in t:
        need(t.optimizer, "train.optimizer", "lr", lambda v: _number(v) and not v < 0,
             "expected a number >= 0")
    if "mesh" in t:
        for key in ("data", "fsdp"):
            need(t.mesh, "train.mesh", key, lambda v: _is_int(v) and (v == -1 or v >= 1),
                 "expected -1 (all remaining devices) or an integer >= 1")
    need(d, "data", "name", lambda v: v in TRAIN_DATASETS, f"expected one of {TRAIN_DATASETS}")
    need(d, "data", "split", lambda v: v in TRAIN_SPLITS, f"expected one of {TRAIN_SPLITS}")
    need(d, "data", "num_workers", lambda v: _is_int(v) and v >= 0, "expected an integer >= 0")
    need(d, "data", "min_object_area", lambda v: _number(v) and v >= 0, "expected a number >= 0")
    for key in ("stuff_prob", "keep_background_prob"):
        need(d, "data", key, lambda v: _number(v) and 0 <= v <= 1, "expected a probability in [0, 1]")
    need(d, "data", "epoch_len", pos_int, "expected an integer >= 1")
    if "epoch_len" in d and "batch_size" in t and _is_int(t.batch_size):
        _check(d.epoch_len >= t.batch_size, "data.epoch_len", d.epoch_len,
               f"must be at least train.batch_size={t.batch_size}")
    if "eval_datasets" in d:
        for name in tuple(d.eval_datasets):
            _check(name in EVAL_DATASETS, "data.eval_datasets", tuple(d.eval_datasets),
                   f"{name!r} is not one of {EVAL_DATASETS}")
    try:
        CustomOptions.from_config(d)
    except ValueError as e:
        raise ConfigError(f"config value {e}") from None
    try:
        SyntheticConfig(**dict(d.get("synthetic", {})))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config value data.synthetic={dict(d.synthetic)!r} is invalid: {e}") from None
    return cfg


def define_config_flag(name: str = "config", help_string: str = "Experiment config file: "
                       "configs/*.py[:arg] or a run's checkpoints/config.json.", flag_values=None,
                       lock_config: bool = True, sys_argv: list[str] | None = None):
    """`ml_collections.config_flags.DEFINE_config_file` that also reads a `.json` config (the one
    written beside every checkpoint) as JSON instead of executing it as Python; `--name.<key>=v`
    overrides work for both (`sys_argv`: where to look for them, default sys.argv)."""
    from absl import flags
    from ml_collections import config_flags
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    class Parser(ConfigFileFlagParser):
        def parse(self, path):
            file, _ = split_config_arg(path) if isinstance(path, str) else (None, None)
            if file is None or file.suffix != ".json":
                return super().parse(path)
            cfg = read_config_json(file)
            if self._lock_config:
                cfg.lock()
            return cfg

    flag_values = flags.FLAGS if flag_values is None else flag_values
    holder = config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values,
                                             lock_config=lock_config, sys_argv=sys_argv)
    flag_values[name].parser = Parser(name=name, lock_config=lock_config)
    return holder
