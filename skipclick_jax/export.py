"""Export SkipClick for serving: the quick-response split as two graphs plus a JSON description.

    python -m skipclick_jax.export --checkpoint C --out DIR [--size S] [--format onnx|stablehlo]

  encoder: images [B, S, S, 3] float32 in 0..1 (resized to S×S on the host, bilinear
           align_corners=True) -> fused [B, S/p, S/p, D], skip_0..3 [B, ·, ·, C_i] (what
           `SkipClick.encode_image` returns; no skips without skip connections)
  decoder: the encoder's outputs, prev_prob [B, S, S], points [B, 2P, 3], point_denom [B, 2]
           -> logits [B, S, S]

B and P are symbolic, S is fixed. `points` rows are (S·row, S·col, click index) with
`point_denom` (H, W) of the original image, so a click lands exactly at (S·row/H, S·col/W);
positives fill rows 0..P-1, negatives P..2P-1, empty rows are -1 (`predictor.encode_points`).
`export.json` records all of this and the model config. ONNX goes through jax2onnx (optional:
`pip install --no-deps jax2onnx==0.17.1`), StableHLO through `jax.export` (`<graph>.stablehlo`,
load with `jax.export.deserialize`; tied to the jax version that wrote it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from skipclick_jax import config_lib
from skipclick_jax.atomic import atomic_directory
from skipclick_jax.model import SkipClick, layers, model_functions
from skipclick_jax.model.skipclick import IMAGENET_MEAN, IMAGENET_STD

FORMATS = ("onnx", "stablehlo")
META = "export.json"


class ExportError(RuntimeError):
    """A graph failed to convert; the message names the graph and the cause."""


def graph_functions(model: SkipClick, size: int):
    """(encoder, decoder, encoding names): flat-argument functions of the model's split."""
    fns = model_functions(model)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    n_skips = len(jax.eval_shape(lambda x: fns.encode(fns.params, x), images)["skips"])
    names = ["fused"] + [f"skip_{i}" for i in range(n_skips)]

    def encoder(images):
        enc = fns.encode(fns.params, images)
        return (enc["fused"], *enc["skips"])

    def decoder(*args):
        fused, skips = args[0], tuple(args[1:1 + n_skips])
        prev_prob, points, point_denom = args[1 + n_skips:]
        return fns.decode(fns.params, {"fused": fused, "skips": skips}, prev_prob, points, point_denom)

    return encoder, decoder, names


def for_onnxruntime(model: SkipClick) -> SkipClick:
    """A copy of `model` whose GroupNorms take staged statistics (`layers.GroupNorm`): the same
    function, which onnxruntime's reductions then compute to float32 rounding."""
    model = nnx.clone(model)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, layers.GroupNorm):
            m.staged_stats = True
    return model


def _specs(model: SkipClick, size: int, encoder, names):
    """Abstract input/output shapes of both graphs at batch 1 and P = 1 (symbolic later)."""
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    encoding = jax.eval_shape(encoder, images)
    enc_io = [dict(name=n, shape=["B", *x.shape[1:]], dtype="float32") for n, x in zip(names, encoding)]
    enc_in = [dict(name="images", shape=["B", size, size, 3], dtype="float32")]
    dec_in = enc_io + [
        dict(name="prev_prob", shape=["B", size, size], dtype="float32"),
        dict(name="points", shape=["B", "2*P", 3], dtype="float32"),
        dict(name="point_denom", shape=["B", 2], dtype="float32"),
    ]
    dec_out = [dict(name="logits", shape=["B", size, size], dtype="float32")]
    return enc_in, enc_io, dec_in, dec_out


def _export_onnx(fn, inputs, outputs, path: pathlib.Path, name: str) -> None:
    for logger in ("jax2onnx", "onnx_ir"):  # plugins of absent optional packages, value-type notes
        logging.getLogger(logger).setLevel(logging.ERROR)
    try:
        from jax2onnx import to_onnx
    except ImportError as e:
        raise ExportError(f"--format onnx needs jax2onnx ({e}); install the export extra: "
                          "pip install onnx==1.23.2 onnx-ir==1.1.0 onnxruntime==1.31.1 && "
                          "pip install --no-deps jax2onnx==0.17.1") from e
    try:
        to_onnx(fn, [tuple(i["shape"]) for i in inputs], model_name=f"skipclick_{name}",
                return_mode="file", output_path=str(path),
                input_names=[i["name"] for i in inputs], output_names=[o["name"] for o in outputs])
    except Exception as e:  # any converter failure, re-raised naming the graph
        raise ExportError(f"the {name} graph failed to convert to ONNX: {type(e).__name__}: {e}") from e


def _export_stablehlo(fn, inputs, path: pathlib.Path, name: str) -> None:
    b, p = jax.export.symbolic_shape("B, P")
    dims = {"B": b, "2*P": 2 * p}
    specs = [jax.ShapeDtypeStruct(tuple(dims.get(d, d) for d in i["shape"]), jnp.float32) for i in inputs]
    try:
        exported = jax.export.export(jax.jit(fn))(*specs)
    except Exception as e:  # any tracing/lowering failure, re-raised naming the graph
        raise ExportError(f"the {name} graph failed to export to StableHLO: {type(e).__name__}: {e}") from e
    path.write_bytes(exported.serialize())


def export(model: SkipClick, model_cfg, out: str | os.PathLike, *, size: int | None = None,
           fmt: str = "onnx", overwrite: bool = False, source: str | None = None) -> dict:
    """Writes the encoder and decoder graphs and export.json to directory `out`; returns the
    JSON dict (with export seconds and file sizes). The directory appears only when complete."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    out = pathlib.Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if size is None:
        size = model.backbone_mix.pos_grid * model.patch
    elif isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"--size must be a positive multiple of the patch size {model.patch}, got {size!r}")
    model.check_image_size(size, size)
    encoder, decoder, names = graph_functions(for_onnxruntime(model) if fmt == "onnx" else model, size)
    enc_in, enc_out, dec_in, dec_out = _specs(model, size, encoder, names)
    ext = {"onnx": ".onnx", "stablehlo": ".stablehlo"}[fmt]
    with atomic_directory(out) as tmp:
        seconds = {}
        for name, fn, inputs, outputs in (("encoder", encoder, enc_in, enc_out),
                                          ("decoder", decoder, dec_in, dec_out)):
            t0 = time.perf_counter()
            if fmt == "onnx":
                _export_onnx(fn, inputs, outputs, tmp / f"{name}{ext}", name)
            else:
                _export_stablehlo(fn, inputs, tmp / f"{name}{ext}", name)
            seconds[name] = round(time.perf_counter() - t0, 2)
        graphs = {}
        for name, inputs, outputs in (("encoder", enc_in, enc_out), ("decoder", dec_in, dec_out)):
            files = sorted(p.name for p in tmp.iterdir() if p.name.startswith(name + ext))
            graphs[name] = dict(file=name + ext, files=files, inputs=inputs, outputs=outputs,
                                bytes=sum((tmp / f).stat().st_size for f in files),
                                export_seconds=seconds[name])
        meta = dict(
            format=fmt, size=size, source=source, jax_version=jax.__version__, graphs=graphs,
            symbolic_dims={"B": "batch", "P": "click slots per polarity (points has 2P rows)"},
            preprocessing=dict(
                image="RGB resized to S×S with bilinear align_corners=True, float32 in 0..1, NHWC",
                normalisation_in_graph=dict(mean=IMAGENET_MEAN.tolist(), std=IMAGENET_STD.tolist()),
                prev_prob="previous probability at the original H×W resized to S×S "
                          "(bilinear align_corners=True); zeros before the first click",
                output="sigmoid(logits) resized to H×W (bilinear align_corners=True); mask = prob > 0.5",
            ),
            click_layout=dict(
                points="[B, 2P, 3] rows (S·row, S·col, click index from 0); positives in rows "
                       "0..P-1, negatives in P..2P-1; unused rows -1",
                point_denom="[B, 2] (H, W) of the original image: the click is at (S·row/H, S·col/W)",
                disk_radius=float(model.disk_radius),
            ),
            model_config=json.loads(config_lib.config_to_json(model_cfg)),
        )
        (tmp / META).write_text(json.dumps(meta, indent=1))
    return meta


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="anything skipclick_jax.checkpoint.load accepts")
    parser.add_argument("--config", help="config file (configs/*.py) when the checkpoint has none")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--size", type=int, help="square input size S (default: the model's crop size)")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    from skipclick_jax.checkpoint import load
    from skipclick_jax.weights.importer import model_section

    if args.size is not None and args.size <= 0:
        parser.error(f"--size must be a positive multiple of the model's patch size, got {args.size}")
    out = pathlib.Path(args.out)
    if out.exists() and not args.overwrite:
        parser.error(f"--out {out} exists; pass --overwrite to replace it")
    config = config_lib.load_config_file(args.config) if args.config else None
    model, config = load(pathlib.Path(args.checkpoint).absolute(), config)  # orbax: absolute paths
    try:
        meta = export(model, model_section(config), out, size=args.size, fmt=args.format,
                      overwrite=args.overwrite, source=str(args.checkpoint))
    except (ExportError, ValueError) as e:
        sys.exit(f"export failed: {e}")
    for name, g in meta["graphs"].items():
        print(f"{name}: {', '.join(g['files'])} {g['bytes'] / 2**20:.1f} MiB, {g['export_seconds']:.1f} s")
    print(f"wrote {out / META} (S={meta['size']}, format {meta['format']})")


if __name__ == "__main__":
    main()
