"""From finished items to one record per model x task: the score, the cost figures and the ratios, each with a
bootstrap 95% interval. The functional forms (docs/eval.md):

    score                  mean of the task's headline per-item metric (bits per byte: Σ -log2 p / Σ bytes)
    intelligence_density   per_gflop = score / (active GFLOPs per token)
                           per_usd   = score / (blended $ per 1M tokens, 3 input : 1 output)
    token_value            per_1k_tokens = 1000 · Σ correct / Σ output tokens        (generative tasks only)
                           per_1k_bytes  = 1000 · Σ correct / Σ output bytes
    combined               correct_per_usd = Σ correct / Σ $ of the item (its input tokens at the input price,
                           its output tokens at the output price): quality, compute price and verbosity in one figure

Active GFLOPs per token are what the task's items cost: Σ analytic forward FLOPs of every scored sequence / Σ its
tokens (densa.counting; for a dynamic MoE, the experts the router actually used). Intervals resample items with
replacement (percentile bootstrap, 1,000 resamples, seeded) and recompute every ratio on each resample, so a ratio's
interval carries the uncertainty of both its numerator and its denominator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from densa.eval.benchmarks import TASKS

BOOTSTRAP_ITERS = 1000
LN2 = math.log(2)


def bootstrap_ci(stat: Callable[[np.ndarray], np.ndarray], n: int, iters: int = BOOTSTRAP_ITERS,
                 seed: int = 0) -> list[float] | None:
    """95% percentile interval of `stat`, a function of an index array (R, n) -> (R,) values."""
    if n == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(iters, n))
    values = stat(idx)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _column(rows: list[dict[str, Any]], key: str) -> np.ndarray | None:
    values = [row.get(key) for row in rows]
    if any(v is None for v in values):
        return None
    return np.asarray(values, dtype=np.float64)


def _ratio(num: np.ndarray, den: np.ndarray, scale: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    def stat(idx: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return scale * num[idx].sum(-1) / den[idx].sum(-1)

    return stat


def _point(stat: Callable[[np.ndarray], np.ndarray], n: int) -> float | None:
    value = float(stat(np.arange(n)[None, :])[0])
    return value if math.isfinite(value) else None


def _figure(stat: Callable[[np.ndarray], np.ndarray], n: int) -> tuple[float | None, list[float] | None]:
    return _point(stat, n), bootstrap_ci(stat, n)


def summarize(task: str, rows: list[dict[str, Any]], prices: dict[str, float] | None,
              spent_flops_per_token: float | None = None) -> dict[str, Any]:
    """The score/cost/ratio fields of one record from its finished items (failed items excluded)."""
    spec = TASKS[task]
    ok = [row for row in rows if row.get("ok")]
    n = len(ok)
    out: dict[str, Any] = {"n_items": n, "n_failed": len(rows) - n}
    if n == 0:
        return out | {"score": None, "score_ci": None, "metrics": {}, "intelligence_density": None,
                      "token_value": None, "combined": None}
    if spec.kind == "bpb":
        nll = np.asarray([-row["metrics"][spec.metric][0] for row in ok])
        n_bytes = np.asarray([row["metrics"][spec.metric][1] for row in ok])
        score_stat = _ratio(nll, n_bytes, 1 / LN2)
        metrics = {spec.metric: _point(score_stat, n)}
    else:
        correct = np.asarray([row["metrics"][spec.metric] for row in ok])
        score_stat = _ratio(correct, np.ones(n))
        keys = sorted({k for row in ok for k, v in row["metrics"].items() if isinstance(v, float)})
        metrics = {k: float(np.mean([row["metrics"].get(k, 0.0) for row in ok])) for k in keys}
    score, score_ci = _figure(score_stat, n)
    out |= {"score": score, "score_ci": score_ci, "metrics": metrics}

    cols = {k: _column(ok, k) for k in ("prompt_tokens", "output_tokens", "processed_tokens", "prompt_bytes",
                                         "output_bytes", "flops", "wall_s")}
    for key in ("prompt_tokens", "output_tokens", "processed_tokens", "prompt_bytes", "output_bytes"):
        out[f"{key}_mean"] = float(cols[key].mean()) if cols[key] is not None else None
    flops, tokens = cols["flops"], cols["processed_tokens"]
    out["flops_per_token"] = float(flops.sum() / tokens.sum()) if flops is not None and tokens.sum() else None
    out["flops_per_token_spent"] = spent_flops_per_token
    out["gflops_per_item"] = float(flops.mean() / 1e9) if flops is not None else None
    out["wall_s"] = float(cols["wall_s"].sum()) if cols["wall_s"] is not None else None
    out["usd_per_item"] = None
    item_usd = None
    if prices is not None and tokens is not None and cols["output_tokens"] is not None:
        item_usd = ((tokens - cols["output_tokens"]) * prices["input"] + cols["output_tokens"] * prices["output"]) / 1e6
        out["usd_per_item"] = float(item_usd.mean())

    if spec.kind == "bpb":  # lower is better and nothing is "correct": the ratios do not apply
        return out | {"intelligence_density": None, "token_value": None, "combined": None}
    density: dict[str, Any] = {"per_gflop": None, "per_gflop_ci": None, "per_usd": None, "per_usd_ci": None}
    if flops is not None:
        # score / (Σ flops / Σ tokens) per resample; a measured MoE spend rescales the analytic FLOPs
        scale = (spent_flops_per_token / out["flops_per_token"]) if spent_flops_per_token else 1.0
        density["per_gflop"], density["per_gflop_ci"] = _figure(
            lambda idx: score_stat(idx) * tokens[idx].sum(-1) / (scale * flops[idx].sum(-1) / 1e9), n)
    if prices is not None and math.isfinite(prices["blended"]) and prices["blended"] > 0:
        density["per_usd"], density["per_usd_ci"] = _figure(lambda idx: score_stat(idx) / prices["blended"], n)
    out["intelligence_density"] = density

    out["token_value"] = None
    if spec.kind == "generate":
        value: dict[str, Any] = {"per_1k_tokens": None, "per_1k_tokens_ci": None}
        if cols["output_tokens"] is not None:
            value["per_1k_tokens"], value["per_1k_tokens_ci"] = _figure(
                _ratio(correct, cols["output_tokens"], 1000), n)
        value["per_1k_bytes"], value["per_1k_bytes_ci"] = _figure(_ratio(correct, cols["output_bytes"], 1000), n)
        out["token_value"] = value
    out["combined"] = None
    if item_usd is not None and item_usd.sum() > 0:
        per_usd, ci = _figure(_ratio(correct, item_usd), n)
        out["combined"] = {"correct_per_usd": per_usd, "correct_per_usd_ci": ci}
    return out
