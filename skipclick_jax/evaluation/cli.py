"""NoC evaluation of a checkpoint with the original's protocol (docs/design/evaluation.md).

  python eval.py --checkpoint CKPT --dataset GrabCut=/data/GrabCut [--dataset DAVIS=/data/DAVIS ...]
      --out OUT [--config configs/x.py[:arg]] [--config.eval.batch_size=16 ...] [--overlays N]
      [--no-flip] [--size S] [--all-clicks] [--dtype bfloat16] [--overwrite]

CKPT is anything `skipclick_jax.checkpoint.load` accepts; `--config` gives the config for files
without one (bare state dicts, backbones) or replaces the stored one (checked against the
weights). `--config.<section>.<key>=<value>` overrides a value, as in train.py. `--size S` uses S
for every dataset (default: the protocol's per-dataset sizes), `--all-clicks` runs all clicks
(target_iou 1.01, for mIoU@k), `--no-flip` switches off the horizontal-flip TTA. `Synthetic=`
evaluates the synthetic val split of the checkpoint's own `data.synthetic` settings. Every
dataset folder is read and checked before the first evaluation; an `--out` folder with results
is refused unless `--overwrite`. Outputs: see `skipclick_jax.evaluation.evaluate`.
Several processes (--coordinator ... or --distributed, see docs/multihost.md) split
each dataset's samples; process 0 writes the outputs.

`main(argv)` is the command line of the top-level `eval.py`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import ml_collections

from skipclick_jax import config_lib, distributed, storage
from skipclick_jax.data.custom_datasets import custom_data_defaults
from skipclick_jax.data.eval_datasets import EVAL_DATASETS, load_eval_dataset
from skipclick_jax.defaults.evaluation import eval_defaults
from skipclick_jax.evaluation.evaluate import evaluate

__all__ = ["main"]


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir or weight file")
    parser.add_argument("--dataset", action="append", required=True, metavar="NAME=PATH",
                        help="dataset name (GrabCut, Berkeley, DAVIS, SBD, HQSeg44k, SHSeg, "
                             "WSESeg_<class>, Synthetic, ImageMasks) and its root folder, or "
                             "COCO=<instances JSON>; repeatable")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--data-dir", default=None, help="TFDS cache folder for the datasets")
    parser.add_argument("--overlays", type=int, default=None, help="PNG overlays of the first N instances")
    parser.add_argument("--no-flip", action="store_true", help="no horizontal-flip TTA")
    parser.add_argument("--size", type=int, default=None, help="network input size S for every dataset")
    parser.add_argument("--all-clicks", action="store_true", help="run all clicks (target_iou=1.01)")
    parser.add_argument("--config", default=None, metavar="FILE[:ARG]",
                        help="config file (configs/*.py, optionally :arg, or a config.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    distributed.add_arguments(parser)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: the checkpoint's model.dtype)")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for arg in rest:
        kv = config_lib.override_arg(arg)
        if kv is None:
            parser.error(f"unrecognised argument {arg!r} (overrides look like --config.eval.batch_size=16)")
        overrides.append(kv)
    datasets = {}
    for spec in args.dataset:
        name, sep, path = spec.partition("=")
        if not sep or not name or (not path and name != "Synthetic"):
            parser.error(f"--dataset {spec!r}: expected NAME=PATH")
        if name not in EVAL_DATASETS:
            parser.error(f"--dataset {spec!r}: unknown dataset {name!r}; expected one of {EVAL_DATASETS}")
        if name in datasets:
            parser.error(f"--dataset {name} is given twice ({datasets[name]!r} and {path!r})")
        datasets[name] = path
    if storage.is_remote(args.out):
        try:
            out = storage.check_access(args.out, write=True, what="--out")
        except storage.StorageError as e:
            parser.error(str(e))
        held = storage.list_files(out)
        if held and not args.overwrite:
            parser.error(f"--out {out} already holds results ({', '.join(held[:5])}); pass "
                         "--overwrite to replace them or choose another --out")
        return args, overrides, datasets
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        parser.error(f"--out {out} already holds results ({', '.join(sorted(p.name for p in out.iterdir())[:5])}); "
                     "pass --overwrite to replace them or choose another --out")
    return args, overrides, datasets


def main(argv=None) -> dict:
    args, overrides, datasets = _parse(sys.argv[1:] if argv is None else argv)
    distributed.initialize(distributed.launch_from_args(args))
    try:
        summary = _main(args, overrides, datasets)
    except BaseException as e:
        distributed.fail(e)
        raise
    distributed.shutdown()
    return summary


def _main(args, overrides, datasets) -> dict:
    from skipclick_jax import checkpoint
    from skipclick_jax.data import builders
    from skipclick_jax.runtime import enable_compilation_cache, reuse_large_buffers

    for name, path in datasets.items():  # cheap checks first; the layouts are read below
        if name != "Synthetic" and not builders.resolve_root(path, name).exists():
            raise FileNotFoundError(f"--dataset {name}={path}: does not exist")
    enable_compilation_cache()
    reuse_large_buffers()

    given = None
    if args.config:
        given = config_lib.load_config_file(args.config)
        if "model" not in given:
            given = config_lib.base_config(given)
        for key, value in overrides:
            config_lib.override(given, key, value)
    model, cfg = checkpoint.load(args.checkpoint, given)
    cfg = ml_collections.ConfigDict(cfg)
    cfg.data = custom_data_defaults(cfg.get("data"))  # COCO / ImageMasks keys of older configs
    protocol = eval_defaults()  # fields missing from an older checkpoint's config take the defaults
    if "eval" in cfg:
        protocol.update(cfg.eval.to_dict())
    cfg.eval = protocol
    for key, value in overrides if given is None else ():
        config_lib.override(cfg, key, value)
    if args.overlays is not None:
        cfg.eval.overlays = args.overlays
    if args.no_flip:
        cfg.eval.flip = False
    if args.size is not None:
        cfg.eval.default_size = args.size
        cfg.eval.sizes = {}
    if args.all_clicks:
        cfg.eval.target_iou = 1.01
    if args.dtype:
        cfg.eval.dtype = args.dtype
    config_lib.validate_eval_config(cfg.eval)
    with distributed.main_first("load the datasets"):  # dataset builds run once, on process 0
        loaded = {name: _load_dataset(name, path, cfg, args.data_dir) for name, path in datasets.items()}
    summary = evaluate(model, loaded, args.out, cfg.eval, data_dir=args.data_dir)
    for name, s in summary.items() if distributed.is_main() else ():
        nocs = ", ".join(f"NoC@{k}=" + ("-" if v is None else f"{v:.2f}") for k, v in s["noc"].items())
        print(f"{name}: {s['instances']} instances, {nocs}, {s['clicks_per_second']:.1f} clicks/s")
    return summary


def _load_dataset(name: str, path: str, cfg: ml_collections.ConfigDict, data_dir):
    """The samples of one --dataset (its folder's layout checked); Synthetic uses the config's
    `data.synthetic` (the split the checkpoint was trained and evaluated with)."""
    from skipclick_jax.data.synthetic import SyntheticConfig

    if name == "Synthetic":
        settings = dict(cfg.data.synthetic) if "data" in cfg and "synthetic" in cfg.data else {}
        return load_eval_dataset(name, data_dir=data_dir, synthetic=SyntheticConfig(**settings))
    return load_eval_dataset(name, path, data_dir, options=cfg.get("data"))
