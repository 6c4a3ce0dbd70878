"""Quick-response benchmark: encode vs per-click decode latency and XLA FLOPs.

    python bench/model_speed.py [--config configs/skipclick.py] [--size 448] [--repeats 10]

Prints, for one image: encode latency, per-click decode latency (median over `repeats` after a
warm-up), XLA's FLOP count of each compiled function and of the unsplit forward, and the ratio
decode / (encode + decode) in FLOPs and in time. Target: <= 0.4.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

from skipclick_jax import config_lib  # noqa: E402
from skipclick_jax.model import build_model, decode_fn, encode_fn  # noqa: E402
from skipclick_jax.runtime import versions_line  # noqa: E402


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def median_ms(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(pathlib.Path(__file__).parents[1] / "configs" / "skipclick.py"))
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    cfg = config_lib.load_config_file(args.config)
    model = build_model(cfg.model)
    graphdef, state = nnx.split(model)
    s = args.size
    images = jax.random.uniform(jax.random.key(0), (1, s, s, 3))
    prev = jnp.zeros((1, s, s))
    points = -jnp.ones((1, 48, 3)).at[0, 0].set(jnp.array([s / 2, s / 2, 0.0]))

    encode = jax.jit(encode_fn(graphdef)).lower(state, images).compile()
    enc = encode(state, images)
    decode = jax.jit(decode_fn(graphdef)).lower(state, enc, prev, points).compile()
    full = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a)).lower(state, images, prev, points).compile()

    f_enc, f_dec, f_full = flops(encode), flops(decode), flops(full)
    t_enc = median_ms(lambda: encode(state, images), args.repeats)
    t_dec = median_ms(lambda: decode(state, enc, prev, points), args.repeats)
    t_full = median_ms(lambda: full(state, images, prev, points), args.repeats)
    print(versions_line())
    print(f"config {pathlib.Path(args.config).name} at {s}x{s}, backend {jax.default_backend()}, "
          f"{jax.device_count()} device(s)")
    print("| path | GFLOPs | median ms |\n|---|---|---|")
    print(f"| encode_image (once per image) | {f_enc / 1e9:.1f} | {t_enc:.1f} |")
    print(f"| decode_clicks (per click) | {f_dec / 1e9:.1f} | {t_dec:.1f} |")
    print(f"| unsplit forward | {f_full / 1e9:.1f} | {t_full:.1f} |")
    print(f"decode / (encode + decode): FLOPs {f_dec / (f_enc + f_dec):.3f}, "
          f"time {t_dec / (t_enc + t_dec):.3f} (target <= 0.4)")


if __name__ == "__main__":
    main()
