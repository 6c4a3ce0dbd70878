"""K steps of the project's training step from a PyTorch checkpoint, written in the original's names.

    python -m convert_weights.train_parity --checkpoint X.pth --config C --batches B.npz --out O.npz
        [--no-dropout] [--config.<section>.<key>=<value> ...]

`B.npz` holds `images` uint8 [K, B, S, S, 3], `points` float32 [K, B, 2P, 3] (row, col, click
index; -1 rows unused), `gt` float32 [K, B, S, S] (1 object, 0 background, -1 ignore) and
`num_clicks` int [K] (simulated clicks before step k's loss forward; 0 makes the step
deterministic, or with --no-dropout fully so). The tool imports the checkpoint's weights into the
model of `C` (its `model` section), builds the optimizer and learning-rate schedule of `C`'s `train`
section, and runs `skipclick_jax.train.step.make_train_step` K times (float32, matmul precision
'highest'). `O.npz` receives `loss` [K], `grad_norm` [K], `grad/<key>` (step 1's gradient of every
trainable parameter), `param/<key>` (every state-dict entry after the K steps), keys and layouts
those of the original PyTorch state dict, and `points` float32 [K, B, 2P, 3] (the click points of
each step's loss forward, i.e. `points` with the step's simulated clicks written in).
`convert_weights.torch_train.run_steps` writes the same
arrays for the PyTorch restatement of the original trainer (docs/training-parity.md).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import ml_collections
import numpy as np

BATCH_KEYS = ("images", "points", "gt", "num_clicks")


def load_batches(path: str | pathlib.Path, cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Reads and checks B.npz against the model config (names the file, key and shape on error)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--batches: no such file: {path}")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in BATCH_KEYS if k not in f.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing} (has {sorted(f.files)})")
        b = {k: f[k] for k in BATCH_KEYS}
    img, pts, gt, nc = b["images"], b["points"], b["gt"], b["num_clicks"]
    if img.dtype != np.uint8 or img.ndim != 5 or img.shape[-1] != 3 or img.shape[2] != img.shape[3]:
        raise ValueError(f"{path}: images must be uint8 [K, B, S, S, 3], got {img.dtype} {img.shape}")
    k, bsz, s = img.shape[:3]
    if k < 1 or bsz < 1:
        raise ValueError(f"{path}: images {img.shape} holds no step or no sample")
    if s % cfg.model.stack.patch:
        raise ValueError(f"{path}: image size {s} is not a multiple of the patch {cfg.model.stack.patch}")
    two_p = 2 * cfg.model.num_max_points
    if pts.shape != (k, bsz, two_p, 3):
        raise ValueError(f"{path}: points must be [K, B, 2P, 3] = {(k, bsz, two_p, 3)}, got {pts.shape}")
    if gt.shape != (k, bsz, s, s):
        raise ValueError(f"{path}: gt must be [K, B, S, S] = {(k, bsz, s, s)}, got {gt.shape}")
    if nc.shape != (k,) or not np.issubdtype(nc.dtype, np.integer) or (nc < 0).any():
        raise ValueError(f"{path}: num_clicks must be integers >= 0 of shape [K] = ({k},), "
                         f"got {nc.dtype} {nc.shape}")
    for name, arr in (("points", pts), ("gt", gt)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{path}: {name} holds non-finite values")
    return dict(images=img, points=pts.astype(np.float32), gt=gt.astype(np.float32),
                num_clicks=nc.astype(np.int32))


def to_torch_tree(tree: dict, model_cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """A (possibly partial) JAX parameter tree -> {torch key: array in the torch layout}, in the
    original key order; torch keys whose JAX leaf is absent from `tree` are left out."""
    from skipclick_jax.weights import mapping

    out = {}
    for key, shape in mapping.torch_layout(model_cfg).items():
        node = tree
        for p in mapping.jax_path(key, len(shape)):
            node = node.get(p) if isinstance(node, dict) else None
            if node is None:
                break
        if node is not None:
            out[key] = mapping.to_torch(key, np.asarray(node, np.float32))
    return out


def run(checkpoint, cfg: ml_collections.ConfigDict, batches: dict[str, np.ndarray],
        dropout: bool = True) -> dict[str, np.ndarray]:
    """K project training steps from `checkpoint`'s weights -> the O.npz arrays."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tqdm import tqdm

    from skipclick_jax.train import optim, state as state_lib, step as step_lib
    from skipclick_jax.weights.importer import export_state_dict, import_weights

    tc = cfg.train
    model, _, _ = import_weights(checkpoint, cfg.model)
    frozen_backbone = bool(cfg.model.backbone.frozen)
    graphdef, params, frozen = state_lib.split_model(model, frozen_backbone)
    steps_per_epoch = max(1, cfg.data.epoch_len // tc.batch_size)
    tx, schedule = optim.make_optimizer(tc, steps_per_epoch)
    state = state_lib.init_state(params, tx, tc.seed)
    step = jax.jit(step_lib.make_train_step(
        graphdef, tx, schedule, max_num_next_clicks=tc.max_num_next_clicks,
        pred_thresh=tc.pred_thresh, click_distance=tc.click_distance, **tc.loss,
        backbone_train_mode=tc.get("backbone_train_mode", True), dropout=dropout, with_grads=True))
    losses, norms, first_grads, points = [], [], None, []
    for k in tqdm(range(len(batches["num_clicks"])), desc="train steps", unit="step"):
        batch = dict(image=jnp.asarray(batches["images"][k]), points=jnp.asarray(batches["points"][k]),
                     gt=jnp.asarray(batches["gt"][k]), num_clicks=jnp.int32(batches["num_clicks"][k]))
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
        points.append(np.asarray(jax.device_get(metrics["points"]), np.float32))
        if first_grads is None:
            first_grads = jax.device_get(metrics["grads"])
    out = {"loss": np.asarray(losses, np.float32), "grad_norm": np.asarray(norms, np.float32),
           "points": np.stack(points)}
    out.update({f"grad/{k}": v for k, v in to_torch_tree(first_grads, cfg.model).items()})
    final = nnx.state(model)
    nnx.replace_by_pure_dict(final, state_lib.merge_dicts(jax.device_get(state.params), frozen))
    nnx.update(model, final)
    out.update({f"param/{k}": v for k, v in export_state_dict(model, cfg).items()})
    return out


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m convert_weights.train_parity",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="PyTorch .pth (or .safetensors) weights")
    p.add_argument("--config", required=True, help="experiment config configs/x.py[:arg] or config.json")
    p.add_argument("--batches", required=True, help="B.npz: images, points, gt, num_clicks")
    p.add_argument("--out", required=True, help="O.npz to write (refuses to overwrite)")
    p.add_argument("--no-dropout", action="store_true", help="switch the head's Dropout2d off")
    args, rest = p.parse_known_args(argv)
    overrides = []
    for arg in rest:
        if not arg.startswith("--config.") or "=" not in arg:
            p.error(f"unrecognised argument {arg!r} (overrides look like --config.train.optimizer.lr=1e-4)")
        key, value = arg[len("--config."):].split("=", 1)
        overrides.append((key, value))
    return args, overrides


def main(argv=None) -> int:
    import jax

    from skipclick_jax import config_lib

    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    out = pathlib.Path(args.out)
    if out.exists():
        raise SystemExit(f"--out {out} exists; not overwriting it")
    if not out.parent.is_dir():
        raise SystemExit(f"--out {out}: directory {out.parent} does not exist")
    cfg = config_lib.load_config_file(args.config)
    for key, value in overrides:
        try:
            config_lib.override(cfg, key, value)  # parsed as eval.py and train.py parse them
        except (KeyError, ValueError) as e:
            raise SystemExit(f"train_parity: {e.args[0] if isinstance(e, KeyError) else e}") from None
    config_lib.validate_config(cfg)
    batches = load_batches(args.batches, cfg)
    if not pathlib.Path(args.checkpoint).is_file():
        raise SystemExit(f"--checkpoint: no such file: {args.checkpoint}")
    with jax.default_matmul_precision("highest"):
        arrays = run(args.checkpoint, cfg, batches, dropout=not args.no_dropout)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out)
    print(f"wrote {out}: loss {np.array2string(arrays['loss'], precision=6)}, "
          f"{sum(k.startswith('grad/') for k in arrays)} gradients, "
          f"{sum(k.startswith('param/') for k in arrays)} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
