"""Memory and FLOPs of the full SkipClick train step at 448, per dtype x remat setting, from XLA's
compiled-step analysis (the step is compiled, never run), beside the PyTorch reference's peak RSS.

    python bench/train_memory.py [--batches 1,2,4] [--settings float32:none,bfloat16:blocks,...]
        [--policy nothing_saveable] [--json out.json] [--no-torch]

For each setting the jitted step (frozen DINOv2, click simulation, NFL, Adam; state donated) is
lowered and compiled at each batch size; reported: XLA's temporary bytes per sample (the
least-squares slope over the batches), temporaries at batch 1, argument bytes (state + batch at
batch 1), and FLOPs per sample from `cost_analysis()` (slope). These figures are
machine-independent but depend on the XLA version (remat does nothing on XLA:CPU of jax 0.10.2;
use a newer jax: PYTHON=python3.12 bash scripts/setup_env.sh, then .venv/bin/python bench/...).
The PyTorch row is a real training step of convert_weights/torch_reference.py's model (DINOv2
frozen, Adam) in a fresh subprocess per batch size: its peak RSS (getrusage) at batches 1 and 2
and the difference (per sample). It needs torch: `--torch-python` (default: the project's .venv).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = ("float32:none", "float32:blocks", "bfloat16:blocks", "float32:decoder",
            "bfloat16:decoder", "bfloat16:none")
CROP = 448
GB = 1e9


def compiled_step(dtype: str, remat: str, policy: str, batch: int, crop: int = CROP,
                  config: str = "skipclick.py"):
    """The compiled (not run) train step of `configs/<config>` with the given settings."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from skipclick_jax import config_lib
    from skipclick_jax.model import SkipClick
    from skipclick_jax.train import optim, state as state_lib, step as step_lib

    cfg = config_lib.load_config_file(ROOT / "configs" / config)
    cfg.model.update(crop_size=crop, dtype=dtype)
    model = nnx.eval_shape(lambda: SkipClick(cfg.model, rngs=nnx.Rngs(0)))
    graphdef, params, frozen = state_lib.split_model(model, bool(cfg.model.backbone.frozen))
    tx, schedule = optim.make_optimizer(cfg.train, 937)
    state = jax.eval_shape(lambda p: state_lib.init_state(p, tx, 0), params)
    step = step_lib.make_train_step(graphdef, tx, schedule, remat=remat, remat_policy=policy)
    batch_shape = dict(image=jax.ShapeDtypeStruct((batch, crop, crop, 3), jnp.uint8),
                       points=jax.ShapeDtypeStruct((batch, 48, 3), jnp.float32),
                       gt=jax.ShapeDtypeStruct((batch, crop, crop), jnp.float32))
    return jax.jit(step, donate_argnums=0).lower(state, frozen, batch_shape).compile()


def analyse(compiled) -> dict:
    """temp / argument / output bytes and FLOPs of a compiled computation."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(temp=mem.temp_size_in_bytes, args=mem.argument_size_in_bytes,
                out=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes,
                flops=float(cost.get("flops", float("nan"))))


def _slope(xs, ys) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def jax_rows(settings, batches, policy, crop, log=print) -> list[dict]:
    import jax

    rows = []
    for setting in settings:
        dtype, remat = setting.split(":")
        per_batch = {}
        for b in batches:
            per_batch[b] = analyse(compiled_step(dtype, remat, policy, b, crop))
            log(f"  compiled {setting} batch {b}: temp {per_batch[b]['temp'] / GB:.3f} GB, "
                f"{per_batch[b]['flops'] / 1e12:.3f} TFLOP")
        xs = list(per_batch)
        row = dict(dtype=dtype, remat=remat, policy=policy if remat != "none" else "-",
                   jax=jax.__version__, backend=jax.default_backend(),
                   temp_per_sample=_slope(xs, [per_batch[b]["temp"] for b in xs]),
                   flops_per_sample=_slope(xs, [per_batch[b]["flops"] for b in xs]),
                   temp_b1=per_batch[xs[0]]["temp"], args_b1=per_batch[xs[0]]["args"],
                   per_batch={str(b): v for b, v in per_batch.items()})
        rows.append(row)
        log(_row_md(row, rows[0]))
    return rows


def _torch_worker(batch: int, crop: int) -> None:
    """One PyTorch training step (frozen DINOv2, NFL, Adam) at `batch`; prints the peak RSS."""
    import torch

    from convert_weights.torch_reference import SkipClickTorch
    from skipclick_jax import config_lib

    torch.manual_seed(0)
    cfg = config_lib.load_config_file(ROOT / "configs" / "skipclick.py")
    cfg.model.crop_size = crop
    model = SkipClickTorch(cfg.model).train()
    model.feature_extractor.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    image = torch.rand(batch, 3, crop, crop)
    net_input = torch.cat([image, torch.zeros(batch, 1, crop, crop)], dim=1)
    points = -torch.ones(batch, 48, 3)
    points[:, 0] = torch.tensor([crop / 2, crop / 2, 0.0])
    gt = (torch.rand(batch, 1, crop, crop) > 0.5).float()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        p = torch.sigmoid(model(net_input, points)["instances"])
        pt = 1.0 - torch.abs(gt - p)
        beta = (1 - pt) ** 2
        mult = (gt[0].numel() / (beta.sum((-2, -1), keepdim=True) + 1e-12)).detach()
        loss = (-0.5 * beta * mult * torch.log(torch.clamp(pt + 1e-12, max=1.0))).mean()
        loss.backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(dict(batch=batch, peak_rss=peak, rss_before_step=before,
                                      torch=torch.__version__, threads=torch.get_num_threads())))


def torch_rows(python: str, batches, crop) -> dict:
    out = {}
    for b in batches:
        proc = subprocess.run([python, __file__, "--torch-worker", str(b), "--crop", str(crop)],
                              capture_output=True, text=True, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            return dict(error=(proc.stderr.strip().splitlines() or ["?"])[-1])
        out[b] = json.loads(lines[-1][len("RESULT "):])
    b0, b1 = sorted(out)[:2]
    out["per_sample"] = (out[b1]["peak_rss"] - out[b0]["peak_rss"]) / (b1 - b0)
    return out


def _row_md(row: dict, base: dict) -> str:
    flops = row["flops_per_sample"] / base["flops_per_sample"] - 1.0 if base else 0.0
    return (f"| {row['dtype']} | {row['remat']} | {row['policy']} | {row['temp_per_sample'] / GB:.3f} "
            f"| {row['temp_b1'] / GB:.3f} | {row['args_b1'] / GB:.3f} "
            f"| {row['flops_per_sample'] / 1e12:.3f} ({100 * flops:+.0f}%) |")


def markdown(rows: list[dict], torch_result: dict | None) -> str:
    head = rows[0] if rows else {}
    lines = [f"Full SkipClick train step at {CROP}, jax {head.get('jax', '?')} "
             f"({head.get('backend', '?')}), XLA compiled-step analysis:", "",
             "| dtype | remat | policy | temp GB / sample | temp GB @ b1 | args GB @ b1 "
             "| TFLOP / sample (vs first row) |",
             "|---|---|---|---|---|---|---|"]
    base = next((r for r in rows if r["dtype"] == "float32" and r["remat"] == "none"), head)
    lines += [_row_md(r, base) for r in rows]
    if torch_result and "error" not in torch_result:
        bs = sorted(k for k in torch_result if isinstance(k, int))
        t = torch_result[bs[0]]
        peaks = ", ".join(f"batch {b}: {torch_result[b]['peak_rss'] / GB:.2f} GB" for b in bs)
        lines += ["", f"PyTorch reference (torch {t['torch']}, {t['threads']} threads), peak RSS "
                  f"of a training step: {peaks}; per sample {torch_result['per_sample'] / GB:.2f} GB."]
    elif torch_result:
        lines += ["", f"PyTorch reference: not measured ({torch_result['error']})."]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="dtype:remat,... ")
    ap.add_argument("--policy", default="nothing_saveable", help="train.remat_policy")
    ap.add_argument("--crop", type=int, default=CROP)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-python", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--torch-batches", default="1,2")
    ap.add_argument("--torch-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torch_worker is not None:
        return _torch_worker(args.torch_worker, args.crop)
    import jax

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, crop {args.crop}", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    rows = jax_rows(args.settings.split(","), batches, args.policy, args.crop,
                    log=lambda s: print(s, flush=True))
    torch_result = None
    if not args.no_torch:
        torch_result = torch_rows(args.torch_python, [int(b) for b in args.torch_batches.split(",")],
                                  args.crop)
        print(f"torch: {json.dumps(torch_result)}", flush=True)
    print()
    print(markdown(rows, torch_result))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(dict(rows=rows, torch=torch_result), indent=1))


if __name__ == "__main__":
    main()
