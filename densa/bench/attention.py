"""`densa bench attention`: forward+backward time and peak memory of ONE sequence-mixer layer vs sequence length.

Choices (docs/benchmarks.md explains them with the measured figures):
- densa: `MovingAverageGatedAttention` at hidden 384 with cpu-small's Mega settings and the config defaults (4
  heads, complex EMA with ema_dim 16, EMA and attention chunks of 256), shared_qk_dim 96 and value_dim 384 (= hidden,
  not Mega's 2·hidden) so its parameter count (654k) is within 11% of the dense layer's (590k); both counts are in
  the output.
- dense: the baseline's `CausalSelfAttention` at hidden 384 (6 heads of 64, no grouping): q/k/v/o projections and
  full causal SDPA, i.e. what every layer of `mixer="attention"` runs.
- Batch 1, fp32 for both, torch's default thread count (recorded as `threads`). The input requires grad and the
  loss is the output's sum, so backward computes input and parameter gradients as inside a model.
- Time: one warm-up forward+backward, then the median of `reps` timed ones (wall clock).
- Memory: every (layer, T) case runs in a fresh Python subprocess. After the layer and input are built the process'
  peak-RSS counter is reset (`echo 5 > /proc/self/clear_refs`); the peak is VmHWM minus VmRSS at the reset, i.e.
  everything the forward+backward added at its worst moment: saved activations, temporaries, gradients, allocator
  slack (tracemalloc cannot see torch's allocations). Where the reset is not allowed, the fallback is the
  `ru_maxrss` increase over the same window, which underestimates when the import had a higher peak.
"""

from __future__ import annotations

import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from densa.config import from_preset
from densa.model.attention import CausalSelfAttention
from densa.model.cache import Positions
from densa.model.mega import MovingAverageGatedAttention

HIDDEN = 384
LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (1024, 2048, 4096, 8192)
KINDS = ("densa", "dense")


def build_layer(kind: str) -> nn.Module:
    """The mixer layer for `kind`: "densa" (Mega: EMA + chunked attention) or "dense" (full causal attention)."""
    if kind == "densa":
        return MovingAverageGatedAttention(from_preset("cpu-small", hidden_size=HIDDEN, shared_qk_dim=96,
                                                       value_dim=HIDDEN))
    if kind == "dense":
        return CausalSelfAttention(from_preset("cpu-small", mixer="attention", hidden_size=HIDDEN,
                                               num_attention_heads=6, num_key_value_heads=6))
    raise ValueError(f"unknown layer kind {kind!r}; expected one of {KINDS}")


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _reset_peak() -> tuple[str, int]:
    """Start a new peak-memory window; returns (method, baseline in kB)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (and ru_maxrss) to the current RSS
        return "VmHWM after clear_refs reset", _status_kb("VmRSS")
    except OSError:
        return "ru_maxrss increase", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kb(method: str) -> int:
    if method.startswith("VmHWM"):
        return _status_kb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def measure(kind: str, T: int, reps: int, mode: str = "eager") -> dict[str, float | str]:
    """Time and peak memory of forward+backward of one `kind` layer at length T, in this process; `mode`
    "compiled" runs it through `torch.compile` (its warm-up pass compiles; the peak then includes compilation).

    The memory figure is only meaningful in a fresh process (`measure_isolated`): memory the allocator kept from
    earlier cases would absorb part of this one's peak."""
    torch.manual_seed(0)
    layer = build_layer(kind)
    x_BTD = torch.randn(1, T, HIDDEN, requires_grad=True)
    pos = Positions.build(1, T, x_BTD.device, attention_mask=None, cache=None)  # positions 0..T-1, no padding
    forward = torch.compile(layer) if mode == "compiled" else layer
    method, base_kb = _reset_peak()
    times, cpu_start = [], 0.0
    for i in range(reps + 1):  # run 0 is the warm-up
        layer.zero_grad(set_to_none=True)
        x_BTD.grad = None
        if i == 1:
            cpu_start = time.process_time()
        start = time.perf_counter()
        forward(x_BTD, pos).sum().backward()
        if i:
            times.append(time.perf_counter() - start)
    # CPU seconds per wall second over the timed runs: well below the thread count means the machine was shared
    cpu_util = (time.process_time() - cpu_start) / sum(times)
    peak_mb = max(0, _peak_kb(method) - base_kb) / 1024  # (RSS counters are synced lazily: never below 0)
    return {"ms": 1000 * statistics.median(times), "peak_mb": peak_mb,
            "params": sum(p.numel() for p in layer.parameters()), "memory_method": method, "cpu_util": cpu_util}


def measure_isolated(kind: str, T: int, reps: int, mode: str = "eager") -> dict[str, float | str]:
    """`measure` in a fresh Python process, so each case's peak memory is its own."""
    code = ("import json; from densa.bench.attention import measure; "
            f"print(json.dumps(measure({kind!r}, {T}, {reps}, {mode!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"bench case {kind} T={T} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_cases(lengths: tuple[int, ...], reps: int, isolated: bool = True,
              modes: tuple[str, ...] = ("eager",)) -> dict[str, float | int | str]:
    """Measure both layers at every length; flat result with per-T keys `{densa,dense}_{ms,peak_mb}_{T}` (eager)
    and `{densa,dense}_compiled_ms_{T}`; `ratio_at_max_T` compares each layer's faster mode (best with best),
    `ratio_at_max_T_{mode}` one mode. `isolated=False` runs the cases in this process (fast, for tests; the memory
    figures then mean little)."""
    result: dict[str, float | int | str] = {"hidden_size": HIDDEN, "batch_size": 1, "dtype": "float32",
                                            "threads": torch.get_num_threads(), "reps": reps, "modes": ",".join(modes)}
    for T in lengths:
        for mode in modes:
            for kind in KINDS:
                case = measure_isolated(kind, T, reps, mode) if isolated else measure(kind, T, reps, mode)
                name = kind if mode == "eager" else f"{kind}_compiled"
                result[f"{name}_ms_{T}"] = round(case["ms"], 2)
                result[f"{kind}_params"] = case["params"]
                if mode == "eager":
                    result[f"{kind}_peak_mb_{T}"] = round(case["peak_mb"], 1)
                    result["memory_method"] = case["memory_method"]
                print(f"  {kind:5s} {mode:8s} T={T:6d}  {case['ms']:9.1f} ms  peak {case['peak_mb']:7.1f} MB  "
                      f"(CPU busy x{case['cpu_util']:.2f} of {result['threads']} threads)", file=sys.stderr,
                      flush=True)
    T, T0 = max(lengths), min(lengths)
    result["max_T"] = T
    best = {kind: min(result[f"{kind}{'' if m == 'eager' else '_compiled'}_ms_{T}"] for m in modes) for kind in KINDS}
    result["ratio_at_max_T"] = round(best["densa"] / best["dense"], 4)
    for mode in modes:
        name = "" if mode == "eager" else "_compiled"
        result[f"ratio_at_max_T_{mode}"] = round(result[f"densa{name}_ms_{T}"] / result[f"dense{name}_ms_{T}"], 4)
    if result[f"dense_peak_mb_{T}"] > 0:  # (in-process runs may measure no growth at all)
        result["memory_ratio_at_max_T"] = round(result[f"densa_peak_mb_{T}"] / result[f"dense_peak_mb_{T}"], 4)
    # densa's ms per token at the largest T over that at the smallest: 1.0 = exactly linear growth
    result["densa_linearity"] = round((result[f"densa_ms_{T}"] / T) / (result[f"densa_ms_{T0}"] / T0), 3)
    return result


def run(quick: bool, modes: tuple[str, ...] | None = None) -> dict[str, float | int | str]:
    lengths, reps = (QUICK_LENGTHS, 3) if quick else (LENGTHS, 5)
    modes = modes or (("eager",) if quick else ("eager", "compiled"))
    print(f"bench attention: T in {lengths}, modes {modes}, {reps} timed reps after 1 warm-up, one subprocess per "
          "case", file=sys.stderr, flush=True)
    return run_cases(lengths, reps, modes=modes)
