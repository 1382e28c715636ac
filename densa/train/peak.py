"""The machine's measured matmul peak, the denominator of MFU (model FLOPs utilisation).

Measured once per (device, dtype, thread count, torch version) with square matmuls and cached as JSON in
`$DENSA_CACHE` (default ~/.cache/densa)/peak_flops.json. MFU = training FLOPs per token (densa.counting) * tokens/s
/ peak.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


def cache_file() -> Path:
    return Path(os.environ.get("DENSA_CACHE") or Path.home() / ".cache" / "densa") / "peak_flops.json"


def measure_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 1.0) -> float:
    """Best FLOP/s of an n×n @ n×n matmul over about `seconds` of repeats."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def cached_measurement(key: str, measure) -> float:
    """The figure cached under `key` for this machine (~/.cache/densa), measured by `measure()` now if absent."""
    path = cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = measure()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache, indent=2) + "\n")
        except OSError:
            pass  # an unwritable cache only costs a re-measurement next time
    return float(cache[key])


def peak_flops(bf16: bool = False) -> float:
    """The cached measured peak for this machine and dtype (measured now if absent)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    key = f"cpu|{platform.processor() or platform.machine()}|{torch.get_num_threads()} threads|{dtype}|" \
          f"torch {torch.__version__}"
    return cached_measurement(key, lambda: measure_matmul_flops(dtype))
