"""Quick-response benchmark: encode and per-click decode, part by part, against the matmul peak.

    python bench/model_speed.py [--config configs/skipclick.py] [--size 448] [--repeats 10] [--torch]
                                [--no-reuse-buffers] [--single-thread]

For one image of the config's model it prints a table of the jitted parts (XLA's FLOP count,
median ms after a warm-up, GFLOP/s): encode_image (once per image), decode_clicks (per click)
and its parts (click embedding, EncoderStack, neck, head, final resize), the unsplit forward,
one backbone block's attention core two ways (`jax.nn.dot_product_attention`'s xla
implementation, and `layers.heads_first_attention`, what the model runs on CPU), then the
float32 matmul peak of this process (a large square matmul timed the same way) and the share
of it that decode_clicks reaches. The process runs with `runtime.reuse_large_buffers()` (as the
app, the demo, eval.py and train.py do) unless `--no-reuse-buffers`.

`--torch` also times `convert_weights/torch_reference.py` holding the same weights, interleaved
with the JAX runs (one JAX call, then the torch call, per repeat), so the ratios hold on a
loaded machine. Its paths follow the original's split (docs/design/evaluation.md#quick-response-split): `set_image` = normalise +
DINOv2 taps; `apply_click` = fuse Linear (recomputed per click, as the original does) + click
disks + patch embedding + EncoderStack + neck + head + align_corners=True resize. Its attention
core rows are torch's fused `scaled_dot_product_attention` (timm's DINOv2 blocks use it).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

from skipclick_jax import config_lib, resize  # noqa: E402
from skipclick_jax.model import build_model, decode_fn, encode_fn, layers  # noqa: E402
from skipclick_jax.runtime import reuse_large_buffers, versions_line  # noqa: E402

PEAK_N = 2048  # the peak matmul: [N, N] @ [N, N] float32


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms of each zero-argument callable; one call of each per round, after a warm-up."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: statistics.median(t) for name, t in times.items()}


def jax_parts(model, images, prev, points):
    """{part: (compiled function, args, GFLOP)} for the split paths and the decode's parts."""
    graphdef, state = nnx.split(model)
    s = images.shape[1:3]

    def part(name, fn, *args):
        compiled = jax.jit(fn).lower(state, *args).compile()
        parts[name] = (compiled, (state, *args), flops(compiled) / 1e9)
        return jax.block_until_ready(compiled(state, *args))

    def m(st):
        return nnx.merge(graphdef, st)

    parts = {}
    enc = part("encode_image", encode_fn(graphdef), images)
    part("decode_clicks", decode_fn(graphdef), enc, prev, points)
    part("unsplit forward", lambda st, *a: m(st)(*a), images, prev, points)
    embed = part("click embedding", lambda st, p, q: m(st).click_embedding(p, q), prev, points)
    x = part("EncoderStack", lambda st, f, c: m(st).backbone_mix(f, c), enc["fused"], embed)
    grid = x.reshape(*enc["fused"].shape)
    pyramid = part("neck", lambda st, g, sk: m(st).neck(g, sk), grid, enc["skips"])
    low = part("head", lambda st, p: m(st).head(p), pyramid)
    part("final resize", lambda st, y: resize.bilinear_ac(y, s)[..., 0], low)
    return parts


ATTENTION_CORES = ("attention core: jax.nn.dot_product_attention", "attention core: heads-first")


def attention_parts(qkv) -> dict:
    """One block's attention core on q, k, v [B, N, heads, d], in the `jax_parts` format."""
    fns = (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
           lambda q, k, v: layers.heads_first_attention(q * q.shape[-1] ** -0.5, k, v))
    parts = {}
    for name, fn in zip(ATTENTION_CORES, fns):
        compiled = jax.jit(fn).lower(*qkv).compile()
        parts[name] = (compiled, qkv, flops(compiled) / 1e9)
    return parts


def backbone_qkv(bb, size: int):
    """Random q, k, v [1, N, heads, d] of a backbone block (config `bb`) at `size`x`size`."""
    tokens = (size // bb.patch) ** 2 + 1 + bb.num_registers
    keys = jax.random.split(jax.random.key(2), 3)
    return tuple(jax.random.normal(key, (1, tokens, bb.heads, bb.dim // bb.heads)) for key in keys)


def torch_parts(ref, images, prev, points, qkv):
    """{part: zero-argument callable} of the torch reference, the original's split (docstring)."""
    import torch
    import torch.nn.functional as F

    from convert_weights.torch_reference import disk_maps

    image = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()
    prev_t = torch.from_numpy(np.array(prev))[:, None]
    points_t = torch.from_numpy(np.array(points))
    b, _, h, w = image.shape
    gh, gw = h // ref.patch, w // ref.patch

    def grid(t):
        return t.transpose(-1, -2).reshape(b, t.shape[-1], gh, gw)

    def set_image():
        return ref.feature_extractor.dinov2((image - ref.mean) / ref.std, ref.taps)

    def fuse(taps):
        return ref.fuse(torch.cat(taps, dim=-1)) if ref.fuse is not None else taps[0]

    def embed():
        return ref.patch_embed_coords(torch.cat([prev_t, disk_maps(points_t, h, w, ref.radius)], 1))

    def apply_click(taps):
        x = ref.backbone_mix(fuse(taps), gh, gw, embed())
        low = ref.head(ref.neck(grid(x), [grid(t) for t in taps]))
        return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=True)

    with torch.no_grad():
        taps = set_image()
        fused = fuse(taps)
        click = embed()
        x = ref.backbone_mix(fused, gh, gw, click)
        pyramid = ref.neck(grid(x), [grid(t) for t in taps])
        low = ref.head(pyramid)

    qkv_t = [torch.from_numpy(np.array(t)).transpose(1, 2).contiguous() for t in qkv]

    def nograd(fn, *args):
        def call():
            with torch.no_grad():
                return fn(*args)
        return call

    return {
        "encode_image": nograd(set_image),
        "decode_clicks": nograd(apply_click, taps),
        "unsplit forward": nograd(lambda: ref.forward_stages(image, prev_t, points_t)),
        "fuse (torch: per click)": nograd(fuse, taps),
        "click embedding": nograd(embed),
        "EncoderStack": nograd(ref.backbone_mix, fused, gh, gw, click),
        "neck": nograd(lambda: ref.neck(grid(x), [grid(t) for t in taps])),
        "head": nograd(ref.head, pyramid),
        "final resize": nograd(lambda: F.interpolate(low, size=(h, w), mode="bilinear",
                                                     align_corners=True)),
        **{name: nograd(F.scaled_dot_product_attention, *qkv_t) for name in ATTENTION_CORES},
    }


def matmul_peak(torch_too: bool) -> dict[str, callable]:
    """Zero-argument callables of the peak matmul (JAX, and torch with `torch_too`)."""
    a = jax.random.normal(jax.random.key(1), (PEAK_N, PEAK_N))
    mm = jax.jit(lambda a, b: a @ b).lower(a, a).compile()
    fns = {"matmul peak": lambda: jax.block_until_ready(mm(a, a))}
    if torch_too:
        import torch

        t = torch.from_numpy(np.array(a))
        fns["matmul peak (torch)"] = lambda: t @ t
    return fns


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(pathlib.Path(__file__).parents[1] / "configs" / "skipclick.py"))
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--precision", default="highest", help="jax matmul precision (parity path: highest)")
    parser.add_argument("--torch", action="store_true",
                        help="time the PyTorch reference (same weights) interleaved, for the ratios")
    parser.add_argument("--single-thread", action="store_true",
                        help="XLA and torch on one compute thread each: steadier ratios on a loaded machine")
    parser.add_argument("--no-reuse-buffers", action="store_true",
                        help="leave glibc's malloc as it is (see skipclick_jax.runtime.reuse_large_buffers)")
    args = parser.parse_args(argv)
    reused = False if args.no_reuse_buffers else reuse_large_buffers()
    if args.single_thread:
        if jax._src.xla_bridge.backends_are_initialized():
            raise RuntimeError("--single-thread must be set before JAX initialises its backend")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

    cfg = config_lib.load_config_file(args.config).model
    s = args.size
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((1, s, s, 3), dtype=np.float32))
    prev = jnp.asarray(rng.random((1, s, s), dtype=np.float32))
    points = -np.ones((1, 2 * 8, 3), np.float32)
    points[0, 0] = (0.4 * s, 0.5 * s, 0)
    points[0, 8] = (0.7 * s, 0.2 * s, 1)
    points = jnp.asarray(points)

    if args.torch:
        import torch

        from convert_weights import verify
        from convert_weights.torch_reference import build_reference

        if args.single_thread:
            torch.set_num_threads(1)
        ref = build_reference(cfg, seed=0)
        model = verify.model_from_reference(ref, cfg)
    else:
        model = build_model(cfg)

    with jax.default_matmul_precision(args.precision):
        qkv = backbone_qkv(cfg.backbone, s)
        parts = {**jax_parts(model, images, prev, points), **attention_parts(qkv)}
        fns = {name: (lambda c=c, a=a: jax.block_until_ready(c(*a))) for name, (c, a, _) in parts.items()}
        fns.update(matmul_peak(args.torch))
        if args.torch:
            fns.update({f"torch {k}": v for k, v in torch_parts(ref, images, prev, points, qkv).items()})
        ms = interleaved_medians(fns, args.repeats)

    peak = 2 * PEAK_N**3 / 1e9 / (ms["matmul peak"] / 1e3)
    load = os.getloadavg()
    print(versions_line())
    print(f"config {pathlib.Path(args.config).name} at {s}x{s}, batch 1, jax {jax.__version__}, "
          f"backend {jax.default_backend()} ({jax.device_count()} device(s), {os.cpu_count()} CPUs), "
          f"precision {args.precision}, XLA on {'1 thread' if args.single_thread else 'all cores'}, "
          f"median of {args.repeats}, large buffers {'reused' if reused else 'not reused'}"
          + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if args.torch else "")
          + f"; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    header = "| part | GFLOP | JAX ms | GFLOP/s | share of peak |"
    sep = "|---|---|---|---|---|"
    if args.torch:
        header += " torch ms | JAX / torch |"
        sep += "---|---|"
    print(header + "\n" + sep)
    names = list(parts) + (["fuse (torch: per click)"] if args.torch else [])
    for name in names:
        row = f"| {name} |"
        if name in parts:
            g = parts[name][2]
            row += f" {g:.2f} | {ms[name]:.1f} | {g / ms[name] * 1e3:.0f} | {g / ms[name] * 1e3 / peak:.0%} |"
        else:
            row += " | | | |"
        if args.torch:
            t = ms[f"torch {name}"]
            row += f" {t:.1f} |" + (f" {ms[name] / t:.2f} |" if name in parts else " |")
        print(row)
    print(f"float32 matmul peak ({PEAK_N}^3): JAX {peak:.0f} GFLOP/s"
          + (f", torch {2 * PEAK_N**3 / 1e6 / ms['matmul peak (torch)']:.0f} GFLOP/s" if args.torch else ""))
    dec = parts["decode_clicks"][2] / ms["decode_clicks"] * 1e3
    print(f"decode_clicks: {dec:.0f} GFLOP/s = {dec / peak:.0%} of the JAX matmul peak (target >= 70%)")
    if args.torch:
        print(f"decode_clicks / torch apply_click = {ms['decode_clicks'] / ms['torch decode_clicks']:.2f} "
              f"(target <= 0.5); encode_image / torch set_image = "
              f"{ms['encode_image'] / ms['torch encode_image']:.2f} (target <= 0.8)")


if __name__ == "__main__":
    main()
