"""How long may process 0 (host of JAX's coordination service) stall before a healthy peer is
declared dead? Two processes join on loopback with a given heartbeat timeout; one of them is
frozen (SIGSTOP) for a while, then resumed (SIGCONT); both should then run on for 30 s.

  python bench/heartbeat_stall.py --heartbeat 10 --stall 7 --process 0

Prints one line: the return codes (0 0: both survived; -6: SIGABRT by the coordination service).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

CHILD = """
import os, sys, time
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
pid, port, hb = (int(a) for a in sys.argv[1:4])
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid, heartbeat_timeout_seconds=hb, initialization_timeout=120)
print("joined", flush=True)
time.sleep(float(sys.argv[4]))
jax.distributed.shutdown()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heartbeat", type=int, default=10, help="heartbeat timeout, seconds")
    parser.add_argument("--stall", type=float, default=7.0, help="seconds the process is frozen")
    parser.add_argument("--process", type=int, default=0, choices=(0, 1), help="which one is frozen")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        logs = [pathlib.Path(tmp) / f"p{i}.log" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(i), str(port), str(args.heartbeat),
                                   str(args.stall + 30)], stdout=log.open("w"), stderr=subprocess.STDOUT)
                 for i, log in enumerate(logs)]
        while not all("joined" in log.read_text() for log in logs):
            if any(p.poll() is not None for p in procs):
                sys.exit("a process ended before joining:\n" + "".join(log.read_text()[-2000:] for log in logs))
            time.sleep(0.2)
        time.sleep(2)
        os.kill(procs[args.process].pid, signal.SIGSTOP)
        time.sleep(args.stall)
        os.kill(procs[args.process].pid, signal.SIGCONT)
        codes = [p.wait(timeout=args.stall + 120) for p in procs]
    import jax

    print(f"jax {jax.__version__}: heartbeat timeout {args.heartbeat} s, process {args.process} "
          f"stalled {args.stall:g} s -> return codes {codes[0]} {codes[1]}"
          f" ({'both survived' if codes == [0, 0] else 'aborted'})")


if __name__ == "__main__":
    main()
