"""grain data workers end with the training process, whatever ends it (issue #27): real SIGKILL
and SIGTERM on a process iterating `train_dataset(num_workers=2)`."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from skipclick_jax.data.pipeline import train_dataset

    def record(seed, h=64, w=64):
        layers = np.zeros((h, w, 2), np.uint8)
        layers[4:36, 4:36, 0] = 1
        layers[38:62, 30:62, 0] = 2
        return {'id': str(seed), 'image': np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8),
                'layers': layers, 'objects': np.array([[0, 1], [0, 2]], np.int32),
                'parents': np.array([-1, -1], np.int32), 'num_instance_masks': 2}

    if __name__ == "__main__":
        ds = train_dataset([record(i) for i in range(4)], crop_size=48, batch_size=2, seed=0,
                           num_workers=2, epoch_len=8, min_object_area=50)
        it = iter(ds)
        next(it)
        print("ready", flush=True)
        while True:
            next(it)
""")


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        return (pathlib.Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_and_resource_tracker_end_with_the_parent(sig, tmp_path):
    """Bound: every descendant (2 grain workers, the multiprocessing resource tracker, any
    forkserver) gone within 20 s of the signal (the watchdog polls every 0.5 s; the rest is
    interpreter exit). Before: still there after 265 s."""
    script = tmp_path / "iterate.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    kids = set()
    try:
        assert proc.stdout.readline().strip() == "ready"
        kids = _descendants(proc.pid)
        assert len(kids) >= 2, kids  # the workers at least
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_running(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = [k for k in kids if _running(k)]
        assert not alive, f"still running after {sig.name}: {alive}"
    finally:
        for pid in [proc.pid, *kids]:  # only what this test started
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
