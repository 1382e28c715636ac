"""How far a measured case is from this machine's limits: FLOP/s against the measured matmul peak, bytes moved per
token against the measured memory bandwidth.

- Peak FLOP/s: densa/train/peak.py (best square fp32 / bf16 matmul, cached per machine and thread count).
- Memory bandwidth: best GB/s of summing a 256 MB fp32 tensor (read-only streaming, like a decode step reading its
  weights), cached beside the peak.
- FLOPs of one decode step at context n: the analytic model of densa/counting.py, its per-token parts (projections,
  FFN at the nominal expert budget, EMA, LM head) plus the marginal attention of the (n+1)-th query,
  (n+1)·a(n+1) − n·a(n) with a the per-token average (so a dense model attends over all n keys, densa over the keys
  of its current chunk).
- Bytes per decode step (analytic): every weight the token touches once (active parameters, with the embedding
  table counted as the LM head's read when tied, a single row otherwise) plus the cache read: K and V of every key
  the step attends to (n for full attention, the current chunk's keys for Mega) and Mega's EMA state.
"""

from __future__ import annotations

import time

import torch

from densa.config import ModelConfig
from densa.counting import ParamCounts, count_parameters, flops_per_token
from densa.model.model import DensaModel
from densa.train.peak import cached_measurement, peak_flops


def measure_bandwidth(mb: int = 256, seconds: float = 0.5) -> float:
    """Best bytes/s of `x.sum()` over an `mb`-MB fp32 tensor (a streaming read)."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start))
    return best


def bandwidth() -> float:
    """The cached measured read bandwidth for this machine and thread count (measured now if absent)."""
    key = f"bandwidth|{torch.get_num_threads()} threads|torch {torch.__version__}"
    return cached_measurement(key, measure_bandwidth)


def machine_limits(bf16: bool = False) -> dict[str, float]:
    return {"peak_flops": peak_flops(bf16), "bandwidth_bytes_per_s": bandwidth()}


def step_flops(cfg: ModelConfig, context: int) -> float:
    """Forward FLOPs of the token at position `context` (with `context` tokens before it): the per-token projections,
    FFN, EMA and LM head, plus the *marginal* attention cost of one more query at that position."""
    n = context
    before, after = flops_per_token(cfg, max(n, 1)), flops_per_token(cfg, n + 1)
    attention = (n + 1) * after.attention - n * before.attention
    return after.total - after.attention + attention


_COUNTS: dict[str, ParamCounts] = {}


def _counts(cfg: ModelConfig) -> ParamCounts:
    key = repr(cfg)  # configs are unhashable dataclasses; their repr names every field
    if key not in _COUNTS:
        _COUNTS[key] = count_parameters(DensaModel(cfg))
    return _COUNTS[key]


def step_bytes(cfg: ModelConfig, context: int, batch: int = 1, weight_bytes: int = 4) -> float:
    """Bytes a decode step of `batch` sequences reads: the active weights once + each sequence's cache (see the
    module docstring)."""
    counts = _counts(cfg)
    D, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    weights = counts.active - counts.embedding + (V * D if cfg.tie_word_embeddings else D)
    if cfg.mixer == "attention":
        head_dim = D // cfg.num_attention_heads
        cache = 2 * L * cfg.num_key_value_heads * head_dim * (context + 1)
    else:  # Mega: shared q/k of width Z and values of width V' over the chunk so far, plus the EMA state
        keys = context % cfg.attn_chunk_size + 1
        cache = L * (keys * (cfg.shared_qk_dim + cfg.value_dim) + 2 * D * cfg.ema_dim)
    return weights * weight_bytes + batch * cache * 4


def report(prefix: str, flops: float, bytes_: float, seconds: float, limits: dict[str, float]) -> dict[str, float]:
    """`{prefix}_flops_frac` (achieved FLOP/s ÷ peak) and `{prefix}_bw_frac` (bytes/s ÷ bandwidth), and the raw
    `{prefix}_gflops` / `{prefix}_gb_per_s` they come from."""
    return {f"{prefix}_gflops": round(flops / seconds / 1e9, 3),
            f"{prefix}_flops_frac": round(flops / seconds / limits["peak_flops"], 4),
            f"{prefix}_gb_per_s": round(bytes_ / seconds / 1e9, 3),
            f"{prefix}_bw_frac": round(bytes_ / seconds / limits["bandwidth_bytes_per_s"], 4)}
