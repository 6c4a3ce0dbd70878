"""Stage-by-stage parity of the JAX model against the PyTorch reference on the same inputs.

  python -m convert_weights.verify --checkpoint CKPT [--size H W ...] [--precision highest]
  python -m convert_weights.verify --config configs/test_tiny.py --random [--size 224 224]

For each stage it prints max abs error and max rel error (max abs error / max |reference|) next
to their tolerances (`convert_weights.tolerances`, about 2x the measured errors) and pass/fail,
then how many pixels of the 0.49-thresholded mask disagree (a pass needs every disagreeing pixel's
reference logit within the logits tolerance of the threshold). Exit code 1 on any failure.
DINOv2 and DINOv3 (SkipClick-DINOv3) checkpoints have the same stages; the reference backbone is
timm's DINOv2 `VisionTransformer` or DINOv3 `Eva` (torch_reference.py).
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import numpy as np

from convert_weights.tolerances import table_for, tolerance
from skipclick_jax.defaults import MASK_THRESHOLD

STAGE_ORDER = ("taps", "fused", "click_embed", "encoder_out", "pyramid", "head_logits", "logits")


def stage_rank(stage: str) -> tuple[int, str]:
    """Data-flow order of the stage names."""
    return next(i for i, p in enumerate(STAGE_ORDER) if stage.startswith(p)), stage


def example_inputs(height: int, width: int, batch: int = 1, seed: int = 0):
    """image [B,H,W,3] uint8, prev_mask [B,H,W] float32 soft, points [B,2P,3] (P=3, padded, float)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    prev = rng.random((batch, height, width), dtype=np.float32)
    pos = [(0.3 * height + 0.5, 0.4 * width + 0.25, 0), (0.6 * height, 0.7 * width, 2), (-1, -1, -1)]
    neg = [(0.8 * height - 0.5, 0.2 * width, 1), (-1, -1, -1), (-1, -1, -1)]
    points = np.tile(np.array(pos + neg, np.float32)[None], (batch, 1, 1))
    return image, prev, points


def torch_stages(ref, image, prev_mask, points) -> dict[str, np.ndarray]:
    """Runs the torch reference; returns its stages in the JAX layout (NHWC maps, [B,N,C] tokens)."""
    import torch

    with torch.no_grad():
        out = ref.forward_stages(
            torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255.0,
            torch.from_numpy(prev_mask)[:, None], torch.from_numpy(points))
    return {k: (v.permute(0, 2, 3, 1) if v.ndim == 4 else v).numpy() for k, v in out.items()}


@functools.partial(jax.jit, static_argnums=0)
def _stages(graphdef, state, image, prev_mask, points):
    from flax import nnx

    from skipclick_jax.model import forward_stages

    return forward_stages(nnx.merge(graphdef, state), image, prev_mask, points)


def jax_stages(model, image, prev_mask, points, precision: str = "highest") -> dict[str, np.ndarray]:
    """Jitted `forward_stages` under `jax.default_matmul_precision(precision)`, as numpy."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision(precision):
        out = _stages(graphdef, state, image, prev_mask, points)
    return {k: np.asarray(v) for k, v in out.items()}


@functools.partial(jax.jit, static_argnums=0)
def _split_stages(graphdef, state, image, prev_mask, points, point_denom):
    from flax import nnx

    model = nnx.merge(graphdef, state)
    out = model._decode(model.encode_image(image), prev_mask, points, point_denom)
    b, h, w, d = out["fused"].shape
    pyramid = out.pop("pyramid")
    out.update(fused=out["fused"].reshape(b, h * w, d), click_embed=out["click_embed"].reshape(b, h * w, d))
    return {**out, **{f"pyramid_{i}": p for i, p in enumerate(pyramid)}}


def jax_split_stages(model, image, prev_mask, points, point_denom=None,
                     precision: str = "highest") -> dict[str, np.ndarray]:
    """The engine's and the Predictor's path, `encode_image` then `decode_clicks` (clicks at
    points / point_denom [B, 2]), as the stages of `jax_stages` it has: fused, click_embed,
    encoder_out, pyramid_i, head_logits, logits (same layouts)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision(precision):
        out = _split_stages(graphdef, state, image, prev_mask, points, point_denom)
    return {k: np.asarray(v) for k, v in out.items()}


def compare(torch_out: dict, jax_out: dict, table: str, precision: str = "highest") -> list[dict]:
    """Per-stage rows {stage, max_abs, max_rel, tol_abs, tol_rel, ok} for every stage of `jax_out`
    (in data-flow order; tolerances from `tolerances.TOLERANCES[table]`), plus the mask row."""
    rows = []
    backend = jax.default_backend()
    for stage in sorted(jax_out, key=stage_rank):
        a, b = torch_out[stage], jax_out[stage]
        if a.shape != b.shape:
            raise ValueError(f"stage {stage}: torch shape {a.shape} != jax shape {b.shape}")
        err = float(np.max(np.abs(a.astype(np.float64) - b)))
        scale = float(np.max(np.abs(a))) or 1.0
        tol_abs, tol_rel = tolerance(stage, table, precision, backend)
        rows.append(dict(stage=stage, max_abs=err, max_rel=err / scale, tol_abs=tol_abs,
                         tol_rel=tol_rel, ok=err <= tol_abs and err / scale <= tol_rel))
    if "logits" in jax_out:
        ref, got = torch_out["logits"].astype(np.float64), jax_out["logits"].astype(np.float64)
        cut = np.log(MASK_THRESHOLD / (1 - MASK_THRESHOLD))  # sigmoid(z) > 0.49 <=> z > cut
        differ = (ref > cut) != (got > cut)
        near = np.abs(ref - cut) <= tolerance("logits", table, precision, backend)[0]
        flips = int(differ.sum())
        rows.append(dict(stage="mask_pixels_differ", max_abs=flips, max_rel=flips / ref.size,
                         tol_abs=0, tol_rel=0, ok=not np.any(differ & ~near)))
    return rows


def format_rows(rows: list[dict], title: str) -> str:
    lines = [title, f"  {'stage':<20}{'max abs':>10}{'tol':>9}{'max rel':>10}{'tol':>9}  result"]
    for r in rows:
        lines.append(f"  {r['stage']:<20}{r['max_abs']:>10.3g}{r['tol_abs']:>9.2g}"
                     f"{r['max_rel']:>10.3g}{r['tol_rel']:>9.2g}  {'pass' if r['ok'] else 'FAIL'}")
    return "\n".join(lines)


def reference_from_model(model, cfg):
    """Torch reference loaded (strict) with the JAX model's weights exported to the original keys."""
    import torch

    from convert_weights.convert import export_state_dict, model_section
    from convert_weights.torch_reference import build_reference

    ref = build_reference(model_section(cfg), seed=None)
    sd = export_state_dict(model, cfg)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    return ref


def model_from_reference(ref, cfg):
    """JAX SkipClick holding the torch reference's weights (through the importer's mapping)."""
    from flax import nnx

    from skipclick_jax.weights import mapping
    from skipclick_jax.model import build_model

    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = mapping.state_dict_to_params(sd, cfg, "torch reference")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def main(argv=None) -> int:
    from convert_weights.convert import model_section
    from convert_weights.torch_reference import build_reference
    from skipclick_jax import checkpoint
    from skipclick_jax.config_lib import load_config_file

    ap = argparse.ArgumentParser(prog="python -m convert_weights.verify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="anything skipclick_jax.checkpoint.load accepts")
    src.add_argument("--random", action="store_true", help="random torch weights (needs --config)")
    ap.add_argument("--config", help="configs/x.py or config.json")
    ap.add_argument("--size", nargs=2, type=int, action="append", metavar=("H", "W"),
                    help="input size (repeatable; default: the config's crop size)")
    ap.add_argument("--precision", choices=("highest", "default"), default="highest")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    config = load_config_file(args.config) if args.config else None
    if args.random:
        if config is None:
            ap.error("--random needs --config")
        cfg = model_section(config)
        ref = build_reference(cfg, seed=args.seed)
        model = model_from_reference(ref, cfg)
    else:
        model, config = checkpoint.load(args.checkpoint, config)
        cfg = model_section(config)
        ref = reference_from_model(model, cfg)
    ok = True
    for h, w in args.size or [(cfg.crop_size, cfg.crop_size)]:
        inputs = example_inputs(h, w, seed=args.seed)
        rows = compare(torch_stages(ref, *inputs), jax_stages(model, *inputs, args.precision),
                       table_for(cfg), args.precision)
        print(format_rows(rows, f"{h}x{w}, precision {args.precision}:"))
        ok &= all(r["ok"] for r in rows)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
