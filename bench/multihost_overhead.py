"""Per-step time of train.py as 2 processes x 4 CPU devices against 1 process x 8 devices.

  python bench/multihost_overhead.py [--steps 30] [--fsdp 1]

Runs `configs/tiny_synthetic.py` (test_tiny, batch 8, crop 112) for `--steps` steps without
checkpoints, previews or evaluation, three ways: one process with in-process collectives, one
process joined to its own coordination service (gloo collectives), two processes (gloo over
loopback). Prints the median seconds per step over the steps after the first 3 (compiles).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(workdir: pathlib.Path, nproc: int, gloo: bool, steps: int, fsdp: int, data_dir: str) -> list[float]:
    args = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny_synthetic.py"),
            "--workdir", str(workdir), f"--config.train.num_steps={steps}",
            "--config.train.checkpoint_every_steps=0", "--config.train.log_every_steps=1",
            "--config.train.image_summary_every_steps=0", "--config.train.eval_untrained=False",
            "--config.data.eval_datasets=()", f"--config.train.mesh.fsdp={fsdp}",
            f"--config.data.data_dir={data_dir}", "--cpu-devices", str(8 // nproc)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    port = _port()
    procs = []
    for i in range(nproc):
        extra = ([f"--coordinator=127.0.0.1:{port}", f"--coordinator-bind=127.0.0.1:{port}",
                  f"--num-processes={nproc}", f"--process-id={i}"] if gloo else [])
        with open(f"{workdir}.p{i}.log", "w") as log:
            procs.append(subprocess.Popen(args + extra, env=env, cwd=ROOT, stdout=log,
                                          stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=3600) for p in procs]
    if any(codes):
        tail = pathlib.Path(f"{workdir}.p0.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{workdir}: return codes {codes}\n{tail}")
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [8 / r["samples_per_sec"] for r in lines if r["step"] > 3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--fsdp", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        results = {}
        for name, nproc, gloo in [("1 x 8, in-process collectives", 1, False),
                                  ("2 x 4, gloo", 2, True), ("1 x 8, gloo", 1, True)]:
            t = run(tmp / name.replace(" ", "_").replace(",", ""), nproc, gloo, args.steps, args.fsdp,
                    str(tmp / "tfds"))
            results[name] = statistics.median(t)
            print(f"{name}: {results[name]:.3f} s/step (median of {len(t)})", flush=True)
    base = results["1 x 8, in-process collectives"]
    for name, t in results.items():
        print(f"| {name} | {t:.3f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
