"""Is the machine the latency probe ran on busy? Three independent signs, each reported with its figure:

- other processes' CPU: the CPU time all processes used during the probe (/proc/stat) minus this process's own,
  per second of wall time, in cores (Linux, when /proc/stat counts exactly the cores this process may use);
- the reference matmul: an n x n matmul on the model's device, timed before and after the probe; its speed changing
  by more than `CHANGE` means the machine's load changed while the model was being timed;
- the probe's own repetitions: ms per output token varying by more than `CHANGE` (max − min over the median) across
  rounds.

The fastest reference matmul is also the machine's measured peak (FLOP/s), from which the report derives an
idealised cost: the model's FLOPs per token at that peak (HELM's "idealized runtime", in FLOP terms).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

OTHER_CPU = 0.25  # other processes using more than this fraction of our cores marks the machine busy
CHANGE = 0.2  # relative change of the reference matmul's speed, or relative spread of ms/token across rounds


def reference_gflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.2) -> list[float]:
    """GFLOP/s of repeated n x n matmuls (n = 512 on CPU, 4096 on an accelerator) for about `seconds`."""
    n = 512 if device.type == "cpu" else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: first-call allocation and kernel selection
    sync()
    rates, start = [], time.perf_counter()
    while len(rates) < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return rates


def _cpu_busy_s() -> float | None:
    """Seconds of CPU time all processes have used (the aggregate line of /proc/stat), or None where unreadable or
    where it counts more cores than this process may use (a container on a larger host)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    n_cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    if n_cpus != len(os.sched_getaffinity(0)):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in lines[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class OtherLoad:
    """Other processes' CPU use between `start()` and `stop()`, in cores."""

    busy0: float | None = None
    own0: float = 0.0
    wall0: float = 0.0

    def start(self) -> OtherLoad:
        self.busy0, self.own0, self.wall0 = _cpu_busy_s(), time.process_time(), time.perf_counter()
        return self

    def stop(self) -> float | None:
        busy = _cpu_busy_s()
        wall = time.perf_counter() - self.wall0
        if busy is None or self.busy0 is None or wall <= 0:
            return None
        return max(0.0, (busy - self.busy0) - (time.process_time() - self.own0)) / wall


def spread(values: list[float]) -> float | None:
    """(max − min) / median, or None with fewer than two values."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    return (max(values) - min(values)) / statistics.median(values)


def verdict(before: list[float] | None, after: list[float] | None, other_cores: float | None,
            round_ms: list[float]) -> dict[str, Any]:
    """The busy flag, the reasons for it, and the figures it was judged on."""
    cores = len(os.sched_getaffinity(0))
    ref_before = statistics.median(before) if before else None
    ref_after = statistics.median(after) if after else None
    change = abs(ref_after - ref_before) / max(ref_after, ref_before) if ref_before and ref_after else None
    rounds = spread(round_ms)
    reasons = []
    if other_cores is not None and other_cores > OTHER_CPU * cores:
        reasons.append(f"other processes used {other_cores:.2f} of {cores} cores during the probe")
    if change is not None and change > CHANGE:
        reasons.append(f"the reference matmul ran at {ref_before:.1f} GFLOP/s before the probe and "
                       f"{ref_after:.1f} after ({change:.0%} apart)")
    if rounds is not None and rounds > CHANGE:
        reasons.append(f"ms per output token varied {rounds:.0%} across {len(round_ms)} probe rounds")
    return {"busy": bool(reasons), "reasons": reasons, "cores": cores, "other_cpu_cores": other_cores,
            "reference_gflops_before": ref_before, "reference_gflops_after": ref_after,
            "peak_gflops_per_s": max((before or []) + (after or []), default=None), "round_spread": rounds}
