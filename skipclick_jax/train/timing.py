"""Where a training run's time goes: per-interval step-time split, achieved FLOP/s and MFU.

The training loop's wall time (after the one-off compile) is split into
  input    the host waiting for the next batch (data pipeline + host-to-device copy)
  compute  dispatching the step and waiting for the device's results (the loop checks the
           losses one step behind, so this is the device time the host could not hide)
  host     checkpoints (starting a save, waiting for the previous one), previews, logging and
           evaluation.
With asynchronous dispatch the device may still be computing while the host waits for input: then
`input` counts time the device was busy too, and `compute` is what was left to wait for.

Achieved TFLOP/s per device = the compiled step's FLOPs (XLA's `cost_analysis()`, per device)
/ mean step time (input + compute + host of the interval). MFU = that / the device's peak dense
bf16 TFLOP/s (`PEAK_BF16_TFLOPS`); it is left out for other devices (and it understates the
utilisation of a float32 model, whose peak is lower).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

PHASES = ("compile", "input", "compute", "host", "checkpoint", "eval")

# Peak dense bf16 TFLOP/s per chip (vendor data sheets): (substring of jax's device_kind, peak).
# The first match wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),   # SXM
    ("H200", 989.0),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),  # v5p reports 'TPU v5'
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
    ("TPU v6e", 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """The peak dense bf16 TFLOP/s of a device kind, or None if it is not in the table."""
    for name, peak in PEAK_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def step_flops(compiled) -> float | None:
    """FLOPs of one run of a compiled (per-device) program, from XLA's cost analysis; None if the
    backend reports none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


class StepTimer:
    """Accumulates seconds per phase, per logging interval and over the whole run."""

    def __init__(self, *, batch_size: int, flops_per_step: float | None, device_kind: str,
                 started: float | None = None):
        self.batch_size = batch_size
        self.flops = flops_per_step
        self.peak = peak_tflops(device_kind)
        self.total = dict.fromkeys(PHASES, 0.0)
        self._interval = dict.fromkeys(PHASES, 0.0)
        self._steps = 0
        self._started = time.perf_counter() if started is None else started

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float, *, in_steps: bool = True) -> None:
        """Counts `seconds` of phase `name`; in_steps=False: work before the first step (only in
        the run's account, not in a step time)."""
        self.total[name] += seconds
        if in_steps:
            self._interval[name] += seconds

    def step_done(self) -> None:
        self._steps += 1

    def interval(self) -> dict[str, float]:
        """The fields logged every log_every_steps (means over the steps since the last call):
        step_time_s, input_wait_s, compute_s, host_s (checkpoint and eval included),
        samples_per_sec, tflops_per_device and mfu (when known); then starts a new interval."""
        n = max(self._steps, 1)
        iv = self._interval
        host = iv["host"] + iv["checkpoint"] + iv["eval"]
        step = (iv["input"] + iv["compute"] + host) / n
        out = dict(step_time_s=step, input_wait_s=iv["input"] / n, compute_s=iv["compute"] / n,
                   host_s=host / n, samples_per_sec=self.batch_size / step if step > 0 else 0.0)
        if self.flops is not None and step > 0:
            out["tflops_per_device"] = self.flops / step / 1e12
            if self.peak is not None:
                out["mfu"] = out["tflops_per_device"] / self.peak
        self._interval = dict.fromkeys(PHASES, 0.0)
        self._steps = 0
        return out

    def account(self) -> str:
        """One line: the run's wall time and its parts."""
        wall = time.perf_counter() - self._started
        parts = ", ".join(f"{k} {self.total[k]:.1f} s" for k in PHASES)
        other = wall - sum(self.total.values())
        return f"wall time {wall:.1f} s: {parts}, other (start-up, restore) {other:.1f} s"
