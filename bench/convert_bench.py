"""Conversion time and peak RSS for a full-size SkipClick checkpoint (random weights, ~613 MB).

  cd <repo> && PYTHONPATH=. python bench/convert_bench.py [--workdir DIR]

Writes a released-format `.pth` from the random PyTorch reference, then times (in fresh
processes, peak RSS from getrusage) import -> project checkpoint, export -> .safetensors and
export -> .pth, and checks that the exported state dicts equal the original bit for bit (.pth
also in key order; safetensors stores keys sorted).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

_CHILD = """
import resource, runpy, sys
sys.argv = ["convert_weights", *sys.argv[1:]]
try:
    runpy.run_module("convert_weights", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
print(f"PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
sys.exit(code)
"""


def run_cli(*args: str) -> tuple[float, float]:
    """-> (wall seconds, peak RSS MiB) of `python -m convert_weights *args` in a fresh process."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"convert_weights {' '.join(args)} failed:\n{proc.stderr}")
    rss = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return wall, rss / 1024


def main() -> None:
    import torch

    from skipclick_jax.weights import mapping
    from convert_weights.convert import read_file
    from convert_weights.torch_reference import build_reference
    from skipclick_jax.config_lib import model_config
    from skipclick_jax.runtime import versions_line

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="where the files go (default: a temp dir)")
    args = ap.parse_args()
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="convert_bench_"))
    work.mkdir(parents=True, exist_ok=True)

    cfg = model_config()
    src = work / "skipclick_random.pth"
    start = time.perf_counter()
    ref = build_reference(cfg, seed=0)
    torch.save({"state_dict": ref.state_dict(), "config": mapping.released_config_entry(cfg)}, src)
    print(f"wrote {src} ({src.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s")
    del ref

    rows = [
        ("import .pth -> project checkpoint", run_cli(str(src), "--out", str(work / "ckpt"), "--overwrite")),
        ("export -> .safetensors", run_cli(str(work / "ckpt"), "--out", str(work / "back.safetensors"),
                                            "--overwrite")),
        ("export -> .pth", run_cli(str(work / "ckpt"), "--out", str(work / "back.pth"), "--overwrite")),
    ]
    print(versions_line())
    for name, (wall, rss) in rows:
        print(f"{name:<36} {wall:7.1f} s   peak RSS {rss:7.0f} MiB")
    original = read_file(src)[0]
    for back in ("back.safetensors", "back.pth"):
        exported = read_file(work / back)[0]
        keys = sorted if back.endswith(".safetensors") else list  # safetensors stores keys sorted
        same = keys(exported) == keys(original) and all(
            exported[k].dtype == original[k].dtype
            and np.array_equal(exported[k].view(np.uint8), original[k].view(np.uint8)) for k in original)
        print(f"{back}: bit-exact round trip: {same}")


if __name__ == "__main__":
    main()
