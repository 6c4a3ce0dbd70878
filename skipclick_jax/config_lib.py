"""Building blocks of the experiment configs in `configs/` (one source of truth per fact).

A config is an `ml_collections.ConfigDict` with sections:
  model  – architecture (read by `skipclick_jax.model.SkipClick`),
  train  – training recipe (read by `train.py`),
  data   – training data (read by `train.py`),
  eval   – NoC protocol (read by `eval.py` and by the end of `train.py`).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import ml_collections

DINOV2_VITB14_REG4 = dict(
    dim=768, depth=12, heads=12, patch=14, num_registers=4, pos_grid=37, mlp_ratio=4
)


def model_config(
    *,
    taps=(2, 5, 8, 11),
    skip_connections=True,
    stack_depth=4,
    upsample="x1",
    frozen=True,
    crop_size=448,
) -> ml_collections.ConfigDict:
    """The SkipClick architecture (spec §1.1); defaults are the full SkipClick model.

    `backbone.taps` are the DINOv2 blocks whose outputs are used. Several taps are fused by a
    Linear layer; a single tap feeds the EncoderStack directly. The released code always feeds
    block 2 for its single-tap configs (spec §8.1), the paper describes block 11.
    """
    return ml_collections.ConfigDict(
        dict(
            crop_size=crop_size,
            disk_radius=5,
            num_max_points=24,
            backbone=dict(**DINOV2_VITB14_REG4, taps=tuple(taps), frozen=frozen),
            stack=dict(dim=768, depth=stack_depth, heads=12, patch=14, mlp_ratio=4),
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


def tiny_model_config() -> ml_collections.ConfigDict:
    """`test_tiny`: a SkipClick with every structural feature at toy widths (used by tests)."""
    cfg = model_config(crop_size=224, stack_depth=2)
    cfg.backbone.update(dim=96, heads=3)
    cfg.stack.update(dim=96, heads=3)
    cfg.neck.out_dims = (32, 64, 128, 256)
    cfg.head.embed_dim = 64
    return cfg


def base_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A full experiment config around `model` with the paper's training and eval recipe."""
    from skipclick_jax.evaluation.defaults import eval_defaults
    from skipclick_jax.train.defaults import data_defaults, train_defaults

    return ml_collections.ConfigDict(
        dict(model=model, train=train_defaults(), data=data_defaults(), eval=eval_defaults())
    )


def load_config_file(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """Loads `configs/x.py` (calls its `get_config(arg)`) or a `config.json` written beside a checkpoint."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix == ".json":
        return config_from_json(path.read_text())
    spec = importlib.util.spec_from_file_location(f"_skipclick_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config()")
    return module.get_config(arg) if arg is not None else module.get_config()


def config_to_json(cfg: ml_collections.ConfigDict) -> str:
    return cfg.to_json_best_effort(indent=2, sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        return x

    return ml_collections.ConfigDict(tuples(json.loads(text)))
