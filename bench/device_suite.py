"""One-command accelerator benchmark: quick response, train step, NoC engine, bfloat16 agreement.

    python bench/device_suite.py [--quick] [--time-limit 360] [--json device_suite.json]

One process, its own time limit (a section that would start after it is skipped, and says so).
Full SkipClick (ViT-B/14 DINOv2, random weights) at 448 unless --quick, which runs the same code
on a small `test_tiny` variant at tiny sizes (a CPU smoke run; a test runs it). Sections:
  env       backend, device, jax version, device memory;
  response  quick response at batch 1: encode ms and per-click decode ms (median of warm calls),
            float32 and bfloat16 (and bfloat16 with cuDNN attention where it can run);
  agree     bfloat16 vs float32 on the same input: logits max abs difference, mask IoU (p > 0.49);
  train     the train step (click simulation, NFL, Adam) at batch 32 and the largest batch that
            fits (doubling until XLA runs out of memory or --max-batch): samples/s, XLA's
            compiled estimate (arguments + temporaries) and the device's peak `memory_stats()`
            (a process-wide peak: it never decreases), float32 / bfloat16, remat off / blocks;
  noc       the NoC engine (all-clicks mode, guided oracle of bench/eval_speed.py on synthetic
            images): clicks/s at batch 1, 8, 32 beside eval_speed's per-sample loop, and whether
            the clicks are identical across batch sizes.
Prints a Markdown report and writes everything to --json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from skipclick_jax import config_lib  # noqa: E402
from skipclick_jax.defaults import MASK_THRESHOLD  # noqa: E402
from skipclick_jax.model import build_model, model_functions  # noqa: E402
from skipclick_jax.runtime import enable_compilation_cache  # noqa: E402

MB = 2**20


@dataclasses.dataclass
class Sizes:
    crop: int
    train_batch: int
    max_batch: int
    noc_batches: tuple[int, ...]
    noc_images: int
    noc_size: int
    noc_clicks: int
    loop_images: int
    repeats: int
    train_settings: tuple[tuple[str, str], ...] = (
        ("float32", "none"), ("bfloat16", "blocks"), ("bfloat16", "none"), ("float32", "blocks"))
    reserve_s: float = 30.0  # a measurement starts only with this much of the time limit left


FULL = Sizes(crop=448, train_batch=32, max_batch=1024, noc_batches=(1, 8, 32), noc_images=48,
             noc_size=448, noc_clicks=20, loop_images=8, repeats=10)
# --quick: the same code at tiny sizes, compile-bound on CPU (XLA compiles dominate), so it
# trains one setting (bfloat16 + remat: the float32 / no-remat step is the same code with the
# defaults) and runs two engine batch sizes; on CPU its kernels are compiled without LLVM
# optimisation (--xla_backend_optimization_level=0): its timings mean nothing.
QUICK = Sizes(crop=224, train_batch=1, max_batch=2, noc_batches=(1, 2), noc_images=2,
              noc_size=224, noc_clicks=2, loop_images=2, repeats=2,
              train_settings=(("bfloat16", "blocks"),), reserve_s=8.0)


def model_config(quick: bool):
    """The full SkipClick, or (quick) test_tiny with a 2-block backbone (taps 0, 0, 1, 1) and a 1-block stack."""
    if not quick:
        return config_lib.model_config()
    cfg = config_lib.tiny_model_config()
    cfg.backbone.depth = 2
    cfg.backbone.taps = (0, 0, 1, 1)
    cfg.stack.depth = 1
    cfg.crop_size = QUICK.crop
    return cfg


class Clock:
    """The suite's time limit: `left()` seconds remain; `require(s, what)` raises if fewer."""

    def __init__(self, limit: float):
        self.end = time.perf_counter() + limit

    def left(self) -> float:
        return self.end - time.perf_counter()

    def require(self, seconds: float, what: str) -> None:
        if self.left() < seconds:
            raise TimeoutError(f"{what}: skipped, {self.left():.0f} s of the time limit left")


def _median_ms(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


# ----------------------------------------------------------------------------- sections
def env_section() -> dict:
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    return dict(backend=jax.default_backend(), device=dev.device_kind, devices=jax.device_count(),
                jax=jax.__version__, memory_limit_mb=stats.get("bytes_limit", 0) / MB or None)


def response_section(base, sizes: Sizes, clock: Clock) -> tuple[list[dict], dict]:
    """Encode / per-click decode ms at batch 1, per setting; returns (rows, logits per dtype)."""
    s = sizes.crop
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.random((1, s, s, 3), dtype=np.float32))
    prev = jnp.zeros((1, s, s), jnp.float32)
    points = -np.ones((1, 16, 3), np.float32)
    points[0, 0] = (0.4 * s, 0.5 * s, 0)
    points[0, 8] = (0.8 * s, 0.2 * s, 1)
    points = jnp.asarray(points)
    settings = [("float32", "xla"), ("bfloat16", "xla")]
    if jax.default_backend() == "gpu":
        settings.append(("bfloat16", "cudnn"))
    rows, logits = [], {}
    for dtype, attention in settings:
        clock.require(sizes.reserve_s, f"response {dtype}/{attention}")
        row = dict(dtype=dtype, attention=attention)
        try:
            fns = model_functions(base, dtype, attention, jit=True)
            encode, decode, state = fns.encode, fns.decode, fns.params
            with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
                enc = encode(state, image)
                out = decode(state, enc, prev, points)
                row["encode_ms"] = _median_ms(lambda: encode(state, image), sizes.repeats)
                row["decode_ms"] = _median_ms(lambda: decode(state, enc, prev, points), sizes.repeats)
            logits[(dtype, attention)] = np.asarray(out, np.float32)
        except ValueError as err:  # e.g. cuDNN attention that cannot run here
            row["error"] = str(err)
        rows.append(row)
    return rows, logits


def agreement_section(logits: dict) -> list[dict]:
    ref = logits.get(("float32", "xla"))
    rows = []
    for key, out in logits.items():
        if key == ("float32", "xla") or ref is None:
            continue
        cut = np.log(MASK_THRESHOLD / (1 - MASK_THRESHOLD))  # sigmoid(z) > MASK_THRESHOLD <=> z > cut
        a, b = ref > cut, out > cut
        union = np.sum(a | b)
        rows.append(dict(dtype=key[0], attention=key[1], max_abs=float(np.abs(out - ref).max()),
                         logit_scale=float(np.abs(ref).max()),
                         mask_iou=float(np.sum(a & b) / union) if union else 1.0))
    return rows


def _train_batch(batch: int, crop: int) -> dict:
    rng = np.random.default_rng(0)
    gt = np.zeros((batch, crop, crop), np.float32)
    gt[:, crop // 4: 3 * crop // 4, crop // 5: 3 * crop // 4] = 1.0
    points = np.full((batch, 48, 3), -1.0, np.float32)
    points[:, 0] = (crop // 2, crop // 2, 0)
    return dict(image=jnp.asarray(rng.integers(0, 256, (batch, crop, crop, 3), dtype=np.uint8)),
                points=jnp.asarray(points), gt=jnp.asarray(gt))


def _is_oom(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return "resource_exhausted" in text or "out of memory" in text or "oom" in text


def train_compile(cfg, dtype: str, remat: str, batch: int) -> dict:
    """The compiled train step (click simulation, NFL, Adam) with its state and batch."""
    from skipclick_jax.train import optim, state as state_lib, step as step_lib

    mcfg = cfg.copy_and_resolve_references()
    mcfg.dtype = dtype
    model = build_model(mcfg, seed=0)
    graphdef, params, frozen = state_lib.split_model(model, bool(mcfg.backbone.frozen))
    tcfg = config_lib.base_config(mcfg).train
    tx, schedule = optim.make_optimizer(tcfg, 937)
    state = state_lib.init_state(params, tx, 0)
    step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, remat=remat), donate_argnums=0)
    data = _train_batch(batch, mcfg.crop_size)
    compiled = step.lower(state, frozen, data).compile()
    return dict(batch=batch, compiled=compiled, state=state, frozen=frozen, data=data,
                memory=compiled.memory_analysis())


def train_measure(prepared: dict, steps: int) -> dict:
    """Runs a `train_compile` result: samples/s over `steps` warm steps, memory figures."""
    compiled, state, frozen, data = (prepared.pop(k) for k in ("compiled", "state", "frozen", "data"))
    batch, mem = prepared["batch"], prepared["memory"]
    state, metrics = compiled(state, frozen, data)  # warm-up (a few simulated clicks vary the work)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, frozen, data)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / steps
    stats = jax.devices()[0].memory_stats() or {}
    return dict(batch=batch, samples_per_s=batch / seconds, step_ms=1e3 * seconds,
                xla_mb=(mem.argument_size_in_bytes + mem.temp_size_in_bytes) / MB,
                peak_mb=stats.get("peak_bytes_in_use", 0) / MB or None,
                loss=float(metrics["loss"]))


def train_section(cfg, sizes: Sizes, clock: Clock, steps: int) -> list[dict]:
    """Per setting: batch `train_batch`, then doubling until out of memory or `max_batch`. The
    next batch's step compiles in a background thread while the current one is measured."""
    rows = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for dtype, remat in sizes.train_settings:
            row = dict(dtype=dtype, remat=remat, runs=[])
            pending = None
            try:
                clock.require(sizes.reserve_s, f"train {dtype}/{remat}")
                batch = sizes.train_batch
                pending = pool.submit(train_compile, cfg, dtype, remat, batch)
                while pending is not None:
                    try:
                        prepared = pending.result()
                        pending = None
                        if 2 * batch <= sizes.max_batch:
                            clock.require(sizes.reserve_s, f"train {dtype}/{remat} batch {2 * batch}")
                            pending = pool.submit(train_compile, cfg, dtype, remat, 2 * batch)
                        row["runs"].append(train_measure(prepared, steps))
                        del prepared
                    except Exception as err:  # noqa: BLE001 - out of device memory ends the doubling
                        if not (_is_oom(err) and row["runs"]):
                            raise
                        row["oom_at"] = batch
                        break
                    batch *= 2
            except TimeoutError as err:
                row["skipped"] = str(err)
            except Exception as err:  # noqa: BLE001
                row["error"] = _is_oom(err) and "out of device memory" or f"{type(err).__name__}: {err}"
            finally:
                if pending is not None:  # a compile no longer needed: wait for it, drop it
                    concurrent.futures.wait([pending])
            rows.append(row)
    return rows


def noc_section(cfg, sizes: Sizes, clock: Clock) -> dict:
    from skipclick_jax import metrics
    from skipclick_jax.evaluation.protocol import Protocol
    from skipclick_jax.evaluation.scheduler import run_samples

    try:
        import eval_speed  # its clicker is convert_weights.torch_noc's (needs torch)
    except ImportError as err:
        return dict(error=f"bench/eval_speed.py cannot be imported ({err}); it needs torch")
    mcfg = cfg.copy_and_resolve_references()
    predictor = eval_speed.guided_predictor(model_functions(build_model(mcfg, seed=0)))
    protocol = Protocol(size=sizes.noc_size, max_clicks=sizes.noc_clicks, target_iou=1.01)
    samples = eval_speed.make_samples(sizes.noc_images)
    out = dict(images=len(samples), size=sizes.noc_size, max_clicks=sizes.noc_clicks, rows=[])
    clicks_by_batch = {}
    for batch in sizes.noc_batches:
        clock.require(sizes.reserve_s, f"noc batch {batch}")
        run_samples(predictor, samples[:batch], protocol, batch_size=batch)  # compile
        t0 = time.perf_counter()
        res = run_samples(predictor, samples, protocol, batch_size=batch)
        seconds = time.perf_counter() - t0
        clicks = sum(len(r["clicks"]) for r in res)
        clicks_by_batch[batch] = [r["clicks"] for r in res]
        ious = [metrics.ious_from_counts(r["inter"], r["union"]) for r in res]
        out["rows"].append(dict(method=f"engine batch {batch}", clicks=clicks, seconds=seconds,
                                clicks_per_s=clicks / seconds,
                                noc=metrics.noc(ious, max_clicks=sizes.noc_clicks)[0].tolist()))
    first = clicks_by_batch[sizes.noc_batches[0]]
    out["clicks_identical"] = all(c == first for c in clicks_by_batch.values())
    clock.require(sizes.reserve_s, "per-sample loop")
    loop_samples = samples[:sizes.loop_images]
    eval_speed.per_sample_loop(predictor, loop_samples[:1], dataclasses.replace(protocol, max_clicks=1))
    t0 = time.perf_counter()
    loop = eval_speed.per_sample_loop(predictor, loop_samples, protocol)
    seconds = time.perf_counter() - t0
    clicks = sum(len(c) for c, _ in loop)
    out["loop_matches_engine"] = [c for c, _ in loop] == first[:len(loop)]
    out["rows"].append(dict(method=f"per-sample loop ({len(loop_samples)} images)", clicks=clicks,
                            seconds=seconds, clicks_per_s=clicks / seconds))
    return out


# ----------------------------------------------------------------------------- report
def markdown(r: dict) -> str:
    e = r["env"]
    mem = f", {e['memory_limit_mb'] / 1024:.1f} GiB" if e.get("memory_limit_mb") else ""
    lines = [f"### Device suite{' (--quick)' if r['quick'] else ''}: {e['backend']} · {e['device']} "
             f"x{e['devices']}{mem} · jax {e['jax']} · {r['seconds']:.0f} s", ""]

    def section(title, header, rows):
        lines.extend([f"**{title}**", "", "| " + " | ".join(header) + " |",
                      "|" + "---|" * len(header), *rows, ""])

    resp = r.get("response", [])
    section(f"Quick response, batch 1, {r['crop']}x{r['crop']}", ["dtype", "attention", "encode ms",
            "decode ms / click"],
            [f"| {x['dtype']} | {x['attention']} | " + (f"{x['encode_ms']:.1f} | {x['decode_ms']:.1f} |"
             if "error" not in x else f"- | {x['error']} |") for x in resp])
    section("bfloat16 vs float32 (same input)", ["dtype", "attention", "logits max abs diff",
            "max abs logit", "mask IoU"],
            [f"| {x['dtype']} | {x['attention']} | {x['max_abs']:.3g} | {x['logit_scale']:.3g} "
             f"| {x['mask_iou']:.4f} |" for x in r.get("agree", [])])
    train_rows = []
    for x in r.get("train", []):
        note = x.get("skipped") or x.get("error") or (f"OOM at batch {x['oom_at']}" if "oom_at" in x else "")
        for run in x["runs"]:
            peak = f"{run['peak_mb'] / 1024:.2f}" if run.get("peak_mb") else "-"
            train_rows.append(f"| {x['dtype']} | {x['remat']} | {run['batch']} | {run['samples_per_s']:.1f} "
                              f"| {run['xla_mb'] / 1024:.2f} | {peak} | |")
        if note:
            train_rows.append(f"| {x['dtype']} | {x['remat']} | - | - | - | - | {note} |")
    section(f"Train step, {r['crop']}x{r['crop']} (largest batch by doubling)",
            ["dtype", "remat", "batch", "samples/s", "XLA args+temp GiB", "peak GiB (process)", "note"],
            train_rows)
    noc = r.get("noc", {})
    if "error" in noc or "skipped" in noc:
        lines += [f"**NoC engine**: {noc.get('error') or noc.get('skipped')}", ""]
    elif noc:
        section(f"NoC engine, all clicks, {noc['images']} synthetic images at S={noc['size']}, "
                f"{noc['max_clicks']} clicks (clicks identical across batches: {noc['clicks_identical']}; "
                f"per-sample loop agrees: {noc['loop_matches_engine']})",
                ["method", "clicks", "seconds", "clicks/s"],
                [f"| {x['method']} | {x['clicks']} | {x['seconds']:.2f} | {x['clicks_per_s']:.1f} |"
                 for x in noc["rows"]])
    for name, err in r.get("errors", {}).items():
        lines.append(f"- {name}: {err}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds (default 360, quick 60)")
    ap.add_argument("--json", default="device_suite.json", help="where the results go")
    ap.add_argument("--steps", type=int, default=None, help="timed train steps per run")
    args = ap.parse_args(argv)
    if args.quick:  # before the backend starts; a smoke run, compile-bound
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    enable_compilation_cache()
    sizes = QUICK if args.quick else FULL
    clock = Clock(args.time_limit or (60 if args.quick else 360))
    start = time.perf_counter()
    cfg = model_config(args.quick)
    report = dict(quick=args.quick, crop=sizes.crop, env=env_section(), errors={})
    print(f"device suite: {report['env']}", flush=True)
    base = build_model(cfg, seed=0)

    def run(name, fn):
        try:
            report[name] = fn()
        except TimeoutError as err:
            report["errors"][name] = str(err)
        except Exception as err:  # noqa: BLE001 - one section's failure must not end the suite
            report["errors"][name] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        print(f"  {name} done ({time.perf_counter() - start:.0f} s)", flush=True)

    logits = {}

    def response():
        rows, out = response_section(base, sizes, clock)
        logits.update(out)
        return rows

    run("response", response)
    run("agree", lambda: agreement_section(logits))
    run("noc", lambda: noc_section(cfg, sizes, clock))
    run("train", lambda: train_section(cfg, sizes, clock, args.steps or (1 if args.quick else 5)))
    report["seconds"] = time.perf_counter() - start
    text = markdown(report)
    print(text)
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
