"""Training-step benchmark: samples/s and peak memory, JAX vs the PyTorch reference, and the
overhead of the sharded step on 8 virtual CPU devices.

    python bench/train_speed.py [--rows tiny,full,torch,sharded] [--steps 5]

Each row runs in its own subprocess (so peak RSS is that row's alone and XLA_FLAGS can differ):
  jax    the jitted train step (frozen backbone, Adam, NFL) with the click simulation drawn from
         U{0..3} per step ("sim 0-3", the recipe) and without it ("sim 0", comparable to torch);
  torch  a PyTorch training step of convert_weights/torch_reference.py's SkipClickTorch: train-mode
         forward with the DINOv2 parameters frozen, NFL loss, backward, torch.optim.Adam;
  sharded  the same jax step on meshes (8,1) and (4,2) vs one device, in an 8-device process.
Reported: mean step time over `--steps` timed steps after 2 warm-up steps, samples/s, the
process's peak RSS, and for jax XLA's own estimate of the step's peak (arguments + temporaries).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = {  # name -> (kind, config, batch, crop, max simulated clicks)
    "tiny": [("jax", "test_tiny.py", 8, 224, 3), ("jax", "test_tiny.py", 8, 224, 0)],
    "full": [("jax", "skipclick.py", 2, 448, 3), ("jax", "skipclick.py", 2, 448, 0)],
    "torch": [("torch", "test_tiny.py", 8, 224, 0), ("torch", "skipclick.py", 2, 448, 0)],
    "sharded": [("sharded", "test_tiny.py", 8, 112, 3)],
}


def _batch(batch: int, crop: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    gt = np.zeros((batch, crop, crop), np.float32)
    gt[:, crop // 4: 3 * crop // 4, crop // 5: 3 * crop // 4] = 1.0
    points = np.full((batch, 48, 3), -1.0, np.float32)
    points[:, 0] = (crop // 2, crop // 2, 100)
    image = rng.integers(0, 256, (batch, crop, crop, 3), dtype=np.uint8)
    return dict(image=image, points=points, gt=gt)


def _timed(fn, steps: int) -> float:
    """Mean seconds of fn() over `steps` calls after 2 warm-up calls (the mean, because the
    number of simulated clicks, hence the work, varies from step to step)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.fmean(times)


def _jax_setup(config: str, batch: int, crop: int, max_clicks: int):
    import jax

    from skipclick_jax import config_lib
    from skipclick_jax.model import build_model
    from skipclick_jax.train import optim, state as st, step as sp

    cfg = config_lib.load_config_file(ROOT / "configs" / config)
    cfg.model.crop_size = crop
    tx, schedule = optim.make_optimizer(cfg.train, steps_per_epoch=937)
    graphdef, params, frozen = st.split_model(build_model(cfg.model), cfg.model.backbone.frozen)
    step = sp.make_train_step(graphdef, tx, schedule, max_num_next_clicks=max_clicks)
    return jax, st.init_state(params, tx, seed=0), frozen, step, _batch(batch, crop)


def run_jax(config: str, batch: int, crop: int, max_clicks: int, steps: int) -> dict:
    from skipclick_jax.runtime import compiled_memory

    jax, state, frozen, step, data = _jax_setup(config, batch, crop, max_clicks)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, frozen, data).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled_memory(compiled)
    holder = [state]

    def one():
        holder[0], metrics = compiled(holder[0], frozen, data)
        jax.block_until_ready(metrics)

    sec = _timed(one, steps)
    return dict(step_s=sec, samples_per_s=batch / sec, compile_s=compile_s, xla_peak_mb=mem["peak"] / 2**20)


def run_torch(config: str, batch: int, crop: int, steps: int) -> dict:
    import torch

    from convert_weights.torch_reference import SkipClickTorch
    from skipclick_jax import config_lib

    cfg = config_lib.load_config_file(ROOT / "configs" / config)
    cfg.model.crop_size = crop
    model = SkipClickTorch(cfg.model).train()
    model.feature_extractor.requires_grad_(not cfg.model.backbone.frozen)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    data = _batch(batch, crop)
    image = torch.from_numpy(data["image"]).permute(0, 3, 1, 2).float() / 255.0
    net_input = torch.cat([image, torch.zeros(batch, 1, crop, crop)], dim=1)
    points, gt = torch.from_numpy(data["points"]), torch.from_numpy(data["gt"])[:, None]

    def nfl(z, y, alpha=0.5, gamma=2.0, eps=1e-12):  # docs/design/training.md#loss (RITM), no ignored pixels here
        p = torch.sigmoid(z)
        pt = 1.0 - torch.abs(y - p)
        beta = (1 - pt) ** gamma
        mult = (y.numel() / y.shape[0] / (beta.sum((-2, -1), keepdim=True) + eps)).detach()
        loss = -torch.where(y > 0.5, alpha, 1 - alpha) * beta * mult * torch.log(torch.clamp(pt + eps, max=1.0))
        return (loss.sum((1, 2, 3)) / (y[0].numel() + eps)).mean()

    def one():
        opt.zero_grad(set_to_none=True)
        loss = nfl(model(net_input, points)["instances"], gt)
        loss.backward()
        opt.step()

    sec = _timed(one, steps)
    return dict(step_s=sec, samples_per_s=batch / sec, threads=torch.get_num_threads())


def run_sharded(config: str, batch: int, crop: int, max_clicks: int, steps: int) -> dict:
    jax, state0, frozen, step, data = _jax_setup(config, batch, crop, max_clicks)
    import numpy as np

    from skipclick_jax.data.pipeline import make_global_batch
    from skipclick_jax.train import sharding

    out = {}
    for shape in [None, (8, 1), (4, 2)]:
        state = jax.tree.map(np.array, state0)
        if shape is None:
            fn, f, b = jax.jit(step, donate_argnums=0), frozen, data
        else:
            mesh = sharding.make_mesh(*shape)
            state_sh = sharding.state_shardings(mesh, state)
            frozen_sh = sharding.param_shardings(mesh, frozen)
            fn = sharding.jit_step(step, mesh, state_sh, frozen_sh)
            state, f = jax.device_put((state, frozen), (state_sh, frozen_sh))
            b = make_global_batch(data, sharding.batch_sharding(mesh))
        holder = [state]

        def one():
            holder[0], metrics = fn(holder[0], f, b)
            jax.block_until_ready(metrics)

        out["1 device" if shape is None else f"mesh {shape}"] = _timed(one, steps)
    base = out["1 device"]
    return {k: dict(step_s=v, overhead=v / base - 1.0) for k, v in out.items()}


def _worker(spec: dict) -> None:
    kind = spec.pop("kind")
    result = dict(run_jax=run_jax, run_torch=run_torch, run_sharded=run_sharded)[f"run_{kind}"](**spec)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def _spawn(kind: str, config: str, batch: int, crop: int, max_clicks: int, steps: int) -> dict:
    spec = dict(kind=kind, config=config, batch=batch, crop=crop, steps=steps)
    if kind != "torch":
        spec["max_clicks"] = max_clicks
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if kind == "sharded":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return dict(error=(proc.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="tiny,full,torch,sharded", help=f"comma list of {list(ROWS)}")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row (after 2 warm-ups)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(json.loads(args.worker))

    from skipclick_jax.runtime import versions_line

    print(versions_line())
    print(f"{'row':<52} {'step s':>8} {'samples/s':>10} {'peak RSS MB':>12} {'XLA peak MB':>12}")
    for name in args.rows.split(","):
        if name not in ROWS:
            raise SystemExit(f"--rows: unknown row {name!r}; choose from {list(ROWS)}")
        for kind, config, batch, crop, clicks in ROWS[name]:
            r = _spawn(kind, config, batch, crop, clicks, args.steps)
            label = f"{kind} {config[:-3]} B={batch} S={crop}" + (f" sim 0-{clicks}" if kind != "torch" else "")
            if "error" in r:
                print(f"{label:<52} failed: {r['error']}")
            elif kind == "sharded":
                for mesh, m in r.items():
                    if isinstance(m, dict):
                        print(f"{label + ' ' + mesh:<52} {m['step_s']:8.3f} {batch / m['step_s']:10.1f} "
                              f"{r['peak_rss_mb']:12.0f} {'':>12} overhead {100 * m['overhead']:+.0f}%")
            else:
                xla = f"{r['xla_peak_mb']:12.0f}" if "xla_peak_mb" in r else f"{'-':>12}"
                print(f"{label:<52} {r['step_s']:8.3f} {r['samples_per_s']:10.2f} {r['peak_rss_mb']:12.0f} {xla}")


if __name__ == "__main__":
    main()
