"""The conversion CLI: import torch-side weights into a project checkpoint, export them back.

  python -m convert_weights SRC --out DIR            # -> project checkpoint (orbax + config.json)
  python -m convert_weights SRC --out FILE.pth       # -> original state dict (+ config entry)
  python -m convert_weights SRC --out FILE.safetensors

Reading is `skipclick_jax.weights.importer` (torch-free); writing `.pth` needs torch.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import sys
import tempfile

import ml_collections

from skipclick_jax import storage
from skipclick_jax.atomic import atomic_write
from skipclick_jax.weights import CheckpointError, mapping
from skipclick_jax.weights.importer import (  # noqa: F401  (re-exported for the parity layer)
    CONFIG_KEY, FORMATS, backbone_params, export_state_dict, import_weights, model_section,
    read_file,
)

EXPORT_SUFFIXES = (".pth", ".pt", ".safetensors")


def _atomic_write(path, write) -> None:
    """`write(tmp)` fills a file beside `path` that then replaces it (`atomic.atomic_write`); a
    gs:// `path` is written locally and uploaded as one object (complete or absent)."""
    if storage.is_remote(path):
        with tempfile.TemporaryDirectory(prefix="skipclick-export-") as tmp:
            local = pathlib.Path(tmp) / path.name
            write(local)
            storage.write_atomic(path, local.read_bytes())
        return
    atomic_write(path, write)


def export_weights(model, cfg: ml_collections.ConfigDict, path: str | os.PathLike) -> pathlib.Path:
    """Writes the original state dict to `.pth` ({'state_dict', 'config'}, loadable with
    weights_only=True; needs torch) or `.safetensors` (project config in the metadata)."""
    from skipclick_jax.config_lib import config_to_json

    path = storage.as_path(path) if storage.is_remote(path) else pathlib.Path(path)
    cfg = model_section(cfg)
    sd = export_state_dict(model, cfg)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        _atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata={CONFIG_KEY: config_to_json(cfg)}))
    elif path.suffix in (".pth", ".pt"):
        import torch

        entry = mapping.released_config_entry(cfg) | {CONFIG_KEY: config_to_json(cfg)}
        tensors = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items())
        _atomic_write(path, lambda tmp: torch.save({"state_dict": tensors, "config": entry}, tmp))
    else:
        raise ValueError(f"{path}: export needs a .pth/.pt or .safetensors file name")
    return path


def summary(model, cfg, info: dict) -> str:
    """Parameters per top-level module, dtypes, and the source format."""
    from skipclick_jax.model import param_counts

    counts = param_counts(model)
    total = counts.pop("total")
    width = max(map(len, counts)) + 2
    lines = [f"source: {info['source']} (format: {info['format']}, {info['tensors']} tensors, "
             f"dtype {'/'.join(info['dtypes'])} -> float32)"]
    m = model_section(cfg)
    lines.append(f"model: taps={tuple(m.backbone.taps)} skip={m.neck.skip_connections} "
                 f"stack_depth={m.stack.depth} upsample={m.head.upsample} crop={m.crop_size}")
    lines += [f"  {name:<{width}}{n:>14,}" for name, n in counts.items()]
    lines.append(f"  {'total':<{width}}{total:>14,}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from skipclick_jax import checkpoint
    from skipclick_jax.config_lib import load_config_file

    ap = argparse.ArgumentParser(
        prog="python -m convert_weights",
        description="Convert SkipClick / DINOv2 / DINOv3 weights to a project checkpoint, or export a "
                    "checkpoint back to the original PyTorch state dict.")
    ap.add_argument("src", help="released .pth, state dict (.pth/.safetensors), DINOv2/DINOv3 hub/timm "
                                "file, project checkpoint dir or train.py checkpoint dir")
    ap.add_argument("--out", required=True,
                    help="DIR: project checkpoint (orbax params + config.json); FILE.pth or "
                         "FILE.safetensors: export the original state dict")
    ap.add_argument("--config", help="configs/x.py or config.json (required for bare state "
                                     "dicts and backbones; checked against released files)")
    ap.add_argument("--format", default="auto", choices=FORMATS, help="source format")
    ap.add_argument("--seed", type=int, default=0, help="init seed of non-backbone params")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)

    if storage.is_remote(args.out):
        try:  # a missing bucket or credentials: named now, not after the conversion
            out = storage.check_access(args.out, write=True, what="--out")
        except storage.StorageError as e:
            ap.error(str(e))
        exists = out.exists() or bool(storage.list_files(out))
    else:
        out = pathlib.Path(args.out)
        exists = out.exists()
    if out.suffix and out.suffix not in EXPORT_SUFFIXES and not args.out.endswith(("/", os.sep)):
        ap.error(f"--out {args.out}: unsupported file type {out.suffix!r}; use a .pth/.pt/.safetensors "
                 "file to export a state dict, or a directory name without an extension (or ending "
                 "in /) for a project checkpoint")
    if exists and not args.overwrite:
        ap.error(f"{out} exists (use --overwrite)")
    config = load_config_file(args.config) if args.config else None
    try:
        model, config, info = checkpoint.load_with_info(args.src, config, fmt=args.format,
                                                        seed=args.seed)
        if out.suffix in EXPORT_SUFFIXES and not args.out.endswith(("/", os.sep)):
            export_weights(model, config, out)
        else:
            checkpoint.save(out, model, config, overwrite=args.overwrite)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(model, config, info))
    print(f"wrote {out}")
    return 0
