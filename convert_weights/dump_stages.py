"""Writes every named stage of the JAX model, in PyTorch layout, for comparison with the original.

  python -m convert_weights.dump_stages --checkpoint CKPT --inputs IN.npz --out OUT.npz

IN.npz: `image` [H,W,3] uint8, `prev_mask` [H,W] float32, `points` [1,2P,3] (row, col, order).
OUT.npz (float32): taps_i, fused, click_embed, encoder_out [1,N,C]; pyramid_i [1,C,h,w];
head_logits [1,1,h,w]; logits [1,H,W]. Computed at matmul precision 'highest'.
"""

from __future__ import annotations

import argparse
import sys
import zipfile

import numpy as np

from skipclick_jax.weights import CheckpointError


def read_inputs(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IN.npz -> (image [1,H,W,3] uint8, prev_mask [1,H,W] float32, points [1,2P,3] float32)."""
    try:
        with np.load(path) as f:
            if not hasattr(f, "files"):
                raise CheckpointError(f"{path}: a single .npy array, expected a .npz archive (np.savez)")
            missing = {"image", "prev_mask", "points"} - set(f.files)
            if missing:
                raise CheckpointError(f"{path}: missing arrays {sorted(missing)}")
            image, prev, points = f["image"], f["prev_mask"], f["points"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a .npz archive written by np.savez (image, prev_mask, "
                              f"points) ({type(err).__name__})") from None
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CheckpointError(f"{path}: image must be [H,W,3] uint8, got {image.shape} {image.dtype}")
    if prev.shape != image.shape[:2]:
        raise CheckpointError(f"{path}: prev_mask {prev.shape} must be [H,W] = {image.shape[:2]}")
    if points.ndim != 3 or points.shape[0] != 1 or points.shape[2] != 3 or points.shape[1] % 2:
        raise CheckpointError(f"{path}: points must be [1,2P,3], got {points.shape}")
    points = points.astype(np.float32)
    used = points[0, :, 2] >= 0  # rows of -1 are empty slots
    h, w = image.shape[:2]
    rows, cols = points[0, used, 0], points[0, used, 1]
    if (not np.isfinite(points).all() or ((points[0, ~used] != -1).any())
            or (rows < 0).any() or (rows > h - 1).any() or (cols < 0).any() or (cols > w - 1).any()):
        raise CheckpointError(f"{path}: points must be (row, col, order) inside the {h}x{w} image "
                              "with order >= 0, or rows of -1 for empty slots; got values in "
                              f"[{np.nanmin(points):g}, {np.nanmax(points):g}]")
    return image[None], prev[None].astype(np.float32), points


def to_torch_layout(stages: dict) -> dict[str, np.ndarray]:
    """NHWC maps -> NCHW; tokens and logits unchanged; float32."""
    return {k: np.ascontiguousarray((v.transpose(0, 3, 1, 2) if v.ndim == 4 else v), np.float32)
            for k, v in stages.items()}


def main(argv=None) -> int:
    from convert_weights.verify import jax_stages
    from skipclick_jax import checkpoint
    from skipclick_jax.config_lib import load_config_file

    ap = argparse.ArgumentParser(prog="python -m convert_weights.dump_stages", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="anything skipclick_jax.checkpoint.load accepts")
    ap.add_argument("--config", help="configs/x.py or config.json (for state dicts/backbones)")
    ap.add_argument("--inputs", required=True, help="IN.npz with image, prev_mask, points")
    ap.add_argument("--out", required=True, help="OUT.npz")
    args = ap.parse_args(argv)
    try:
        inputs = read_inputs(args.inputs)
        config = load_config_file(args.config) if args.config else None
        model, _ = checkpoint.load(args.checkpoint, config)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    np.savez(args.out, **to_torch_layout(jax_stages(model, *inputs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
