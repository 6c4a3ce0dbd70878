"""NoC evaluation of a checkpoint with the original's protocol (spec §5).

  python eval.py --checkpoint CKPT --dataset GrabCut=/data/GrabCut [--dataset DAVIS=/data/DAVIS ...]
      --out OUT [--config.eval.batch_size=16 ...] [--overlays N] [--no-flip] [--size S] [--all-clicks]
      [--dtype bfloat16]

CKPT is anything `skipclick_jax.checkpoint.load` accepts. `--size S` uses S for every dataset
(default: the protocol's per-dataset sizes), `--all-clicks` runs all clicks (target_iou 1.01, for
mIoU@k), `--no-flip` switches off the horizontal-flip TTA. Outputs: see
`skipclick_jax.evaluation.evaluate`.
"""

from __future__ import annotations

import argparse
import ast
import sys

import ml_collections

from skipclick_jax.evaluation.defaults import eval_defaults
from skipclick_jax.evaluation.evaluate import evaluate

__all__ = ["evaluate", "main"]


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir or weight file")
    parser.add_argument("--dataset", action="append", required=True, metavar="NAME=PATH",
                        help="dataset name (GrabCut, Berkeley, DAVIS, SBD, HQSeg44k, SHSeg, "
                             "WSESeg_<class>, Synthetic) and its root folder; repeatable")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--data-dir", default=None, help="TFDS cache folder for the datasets")
    parser.add_argument("--overlays", type=int, default=None, help="PNG overlays of the first N instances")
    parser.add_argument("--no-flip", action="store_true", help="no horizontal-flip TTA")
    parser.add_argument("--size", type=int, default=None, help="network input size S for every dataset")
    parser.add_argument("--all-clicks", action="store_true", help="run all clicks (target_iou=1.01)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: the checkpoint's model.dtype)")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for arg in rest:
        if not arg.startswith("--config.") or "=" not in arg:
            parser.error(f"unrecognised argument {arg!r} (overrides look like --config.eval.batch_size=16)")
        key, value = arg[len("--config."):].split("=", 1)
        overrides.append((key, value))
    datasets = {}
    for spec in args.dataset:
        name, sep, path = spec.partition("=")
        if not sep or not name or (not path and name != "Synthetic"):
            parser.error(f"--dataset {spec!r}: expected NAME=PATH")
        datasets[name] = path
    return args, overrides, datasets


def _override(cfg: ml_collections.ConfigDict, key: str, value: str) -> None:
    """Sets cfg.<key> (dotted) from a command-line string, keeping the field's type."""
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        if part not in node:
            raise KeyError(f"--config.{key}: no section {part!r}")
        node = node[part]
    if leaf not in node:
        raise KeyError(f"--config.{key}: unknown field (known: {sorted(node.keys())})")
    old = node[leaf]
    if isinstance(old, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--config.{key}={value}: expected true or false")
        new = value.lower() in ("true", "1")
    elif isinstance(old, (int, float)):
        new = type(old)(value)
    elif isinstance(old, str):
        new = value
    else:
        new = ast.literal_eval(value)
    node[leaf] = new


def main(argv=None) -> dict:
    args, overrides, datasets = _parse(sys.argv[1:] if argv is None else argv)
    from skipclick_jax import checkpoint
    from skipclick_jax.runtime import enable_compilation_cache

    enable_compilation_cache()

    model, cfg = checkpoint.load(args.checkpoint)
    cfg = ml_collections.ConfigDict(cfg)
    protocol = eval_defaults()  # fields missing from an older checkpoint's config take the defaults
    if "eval" in cfg:
        protocol.update(cfg.eval.to_dict())
    cfg.eval = protocol
    for key, value in overrides:
        _override(cfg, key, value)
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
    summary = evaluate(model, datasets, args.out, cfg.eval, data_dir=args.data_dir)
    for name, s in summary.items():
        nocs = ", ".join(f"NoC@{k}={v:.2f}" for k, v in s["noc"].items())
        print(f"{name}: {s['instances']} instances, {nocs}, {s['clicks_per_second']:.1f} clicks/s")
    return summary


if __name__ == "__main__":
    main()
