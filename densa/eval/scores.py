"""From finished items to one record per model x task: the score, its quality, the cost figures and the ratios, each
with a bootstrap 95% interval. The functional forms (docs/eval.md; the quality and density definitions are
densa.eval.density's):

    score                  mean of the task's headline per-item metric (bits per byte: Σ -log2 p / Σ bytes)
    quality                accuracy: (s − c) / (1 − c), c the mean chance level of the items (densa.eval.chance);
                           bits per byte: 8 − bits per byte (bits saved against a uniform byte model)
    intelligence_density   per_gflop = quality / (Σ FLOPs / Σ tokens, in GFLOPs)      (per byte for bits per byte)
                           per_usd   = quality / (Σ item $ / Σ tokens, in $ per 1M)   (per byte for bits per byte)
                           none when the quality's interval reaches 0 ("at chance"), or a figure is missing
    token_value            per_1k_tokens = 1000 · Σ correct / Σ output tokens        (generative tasks only)
                           per_1k_bytes  = 1000 · Σ correct / Σ output bytes
    combined               correct_per_usd = Σ correct / Σ $ of the item (its input tokens at the input price,
                           its output tokens at the output price): quality, compute price and verbosity in one figure

Active GFLOPs per token are what the task's items cost: Σ analytic forward FLOPs of every scored sequence / Σ its
tokens (densa.counting; for a dynamic MoE, the experts the router actually used). An item's $ prices its input tokens
at the measured input price and its output tokens at the output price, so a task's $ per 1M tokens is its own mix.
Intervals resample items with replacement (percentile bootstrap, 1,000 resamples, seeded) and recompute every
quantity on each resample: numerator, chance level and denominator of a ratio move together. Resamples on which a
figure is not finite (a zero denominator) are dropped and counted in `dropped_resamples`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from densa.eval import density
from densa.eval.benchmarks import TASKS

BOOTSTRAP_ITERS = 1000
LN2 = math.log(2)
Stat = Callable[[np.ndarray], np.ndarray]  # index array (R, n) -> (R,) values


def bootstrap(stat: Stat, n: int, iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> tuple[list[float] | None, int]:
    """95% percentile interval of `stat` and the number of resamples dropped because the stat was not finite."""
    if n == 0:
        return None, 0
    idx = np.random.default_rng(seed).integers(0, n, size=(iters, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = stat(idx)
    finite = values[np.isfinite(values)]
    dropped = int(values.size - finite.size)
    if finite.size == 0:
        return None, dropped
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return [float(lo), float(hi)], dropped


def bootstrap_ci(stat: Stat, n: int, iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> list[float] | None:
    """95% percentile interval of `stat` (non-finite resamples dropped)."""
    return bootstrap(stat, n, iters, seed)[0]


def _column(rows: list[dict[str, Any]], key: str) -> np.ndarray | None:
    values = [row.get(key) for row in rows]
    if any(v is None for v in values):
        return None
    return np.asarray(values, dtype=np.float64)


def _ratio(num: np.ndarray, den: np.ndarray, scale: float = 1.0) -> Stat:
    return lambda idx: scale * num[idx].sum(-1) / den[idx].sum(-1)


def _point(stat: Stat, n: int) -> float | None:
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(stat(np.arange(n)[None, :])[0])
    return value if math.isfinite(value) else None


def _figure(stat: Stat, n: int) -> tuple[float | None, list[float] | None, int]:
    return _point(stat, n), *bootstrap(stat, n)


def _chance_corrected(correct: np.ndarray, chance: np.ndarray) -> Stat:
    """(s − c) / (1 − c) per resample, s and c the resample's mean score and mean chance level."""
    return lambda idx: density.chance_corrected(correct[idx].mean(-1), chance[idx].mean(-1))


def summarize(task: str, rows: list[dict[str, Any]], prices: dict[str, Any] | None,
              spent_flops_per_token: float | None = None, chance: np.ndarray | None = None) -> dict[str, Any]:
    """The score/quality/cost/ratio fields of one record from its finished items (failed items excluded).

    `chance` is the chance level per finished item; by default it is read from the shipped data for the items' ids
    (densa.eval.chance)."""
    spec = TASKS[task]
    ok = [row for row in rows if row.get("ok")]
    n = len(ok)
    out: dict[str, Any] = {"n_items": n, "n_failed": len(rows) - n}
    if n == 0:
        return out | {"score": None, "score_ci": None, "metrics": {}, "quality": None, "quality_ci": None,
                      "at_chance": None, "intelligence_density": None, "token_value": None, "combined": None}
    if spec.kind == "bpb":
        nll = np.asarray([-row["metrics"][spec.metric][0] for row in ok])
        n_bytes = np.asarray([row["metrics"][spec.metric][1] for row in ok], dtype=np.float64)
        score_stat = _ratio(nll, n_bytes, 1 / LN2)
        metrics = {spec.metric: _point(score_stat, n)}

        def quality_stat(idx: np.ndarray) -> np.ndarray:
            return density.bits_saved(score_stat(idx))

        out["chance"] = None
        units, unit_name = n_bytes, "byte"
    else:
        correct = np.asarray([row["metrics"][spec.metric] for row in ok])
        score_stat = _ratio(correct, np.ones(n))
        keys = sorted({k for row in ok for k, v in row["metrics"].items() if isinstance(v, float)})
        metrics = {k: float(np.mean([row["metrics"].get(k, 0.0) for row in ok])) for k in keys}
        if chance is None:
            from densa.eval.chance import item_chance

            chance = item_chance(task, [row.get("item") for row in ok])
        quality_stat = None if chance is None else _chance_corrected(correct, np.asarray(chance, dtype=np.float64))
        out["chance"] = float(np.mean(chance)) if chance is not None else None
        units, unit_name = None, "token"
    score, score_ci, _ = _figure(score_stat, n)
    out |= {"score": score, "score_ci": score_ci, "metrics": metrics}
    quality, quality_ci, quality_dropped = _figure(quality_stat, n) if quality_stat else (None, None, 0)
    out |= {"quality": quality, "quality_ci": quality_ci,
            "quality_kind": "bits saved per byte" if spec.kind == "bpb" else "chance-corrected accuracy",
            "at_chance": density.at_chance(quality_ci, quality) if quality is not None else None}

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
    out["idealised"] = _idealised(out, prices)

    if units is None:
        units = tokens
    out["intelligence_density"] = _density(quality_stat, quality, quality_ci, quality_dropped, n, flops, units,
                                           unit_name, item_usd, out, spent_flops_per_token, task)
    if spec.kind == "bpb":  # nothing is "correct": the counting ratios do not apply
        return out | {"token_value": None, "combined": None}

    out["token_value"] = None
    if spec.kind == "generate":
        value: dict[str, Any] = {"per_1k_tokens": None, "per_1k_tokens_ci": None}
        if cols["output_tokens"] is not None:
            value["per_1k_tokens"], value["per_1k_tokens_ci"], _ = _figure(
                _ratio(correct, cols["output_tokens"], 1000), n)
        value["per_1k_bytes"], value["per_1k_bytes_ci"], _ = _figure(_ratio(correct, cols["output_bytes"], 1000), n)
        out["token_value"] = value
    out["combined"] = None
    if item_usd is not None and item_usd.sum() > 0:
        per_usd, ci, _ = _figure(_ratio(correct, item_usd), n)
        out["combined"] = {"correct_per_usd": per_usd, "correct_per_usd_ci": ci}
    return out


def _density(quality_stat: Stat | None, quality: float | None, quality_ci: list[float] | None, quality_dropped: int,
             n: int, flops: np.ndarray | None, units: np.ndarray | None, unit_name: str, item_usd: np.ndarray | None,
             out: dict[str, Any], spent: float | None, task: str) -> dict[str, Any]:
    """Quality per GFLOP and per $ (per token, or per byte for bits per byte), each resampled with its denominator,
    or for each the reason it is missing."""
    d: dict[str, Any] = {"unit": unit_name, "per_gflop": None, "per_gflop_ci": None, "per_usd": None,
                         "per_usd_ci": None, "missing": {}, "dropped_resamples": {"quality": quality_dropped}}
    if quality_stat is None:
        d["missing"] = dict.fromkeys(("per_gflop", "per_usd"), f"no chance level defined for {task}")
        return d
    denominators: dict[str, Stat | None] = {"per_gflop": None, "per_usd": None}
    if flops is not None and units is not None:
        # Σ FLOPs / Σ units per resample; a measured MoE spend rescales the analytic FLOPs
        scale = (spent / out["flops_per_token"]) if spent and out["flops_per_token"] else 1.0
        denominators["per_gflop"] = lambda idx: scale * flops[idx].sum(-1) / units[idx].sum(-1) / 1e9
    else:
        d["missing"]["per_gflop"] = "no FLOP figure (an endpoint's architecture is unknown)"
    if item_usd is not None and units is not None and item_usd.sum() > 0:
        denominators["per_usd"] = lambda idx: 1e6 * item_usd[idx].sum(-1) / units[idx].sum(-1)
    else:
        d["missing"]["per_usd"] = "no $ figure (no price or no token counts)"
    for key, den in denominators.items():
        if den is None:
            continue
        cost = _point(den, n)
        d[f"{key}_cost"] = cost
        figure = density.density(quality, cost, quality_ci)
        if figure.value is None:
            d["missing"][key] = figure.missing
            continue
        d[key], d[f"{key}_ci"], d["dropped_resamples"][key] = _figure(
            lambda idx, den=den: quality_stat(idx) / den(idx), n)
    return d


def _idealised(out: dict[str, Any], prices: dict[str, Any] | None) -> dict[str, Any] | None:
    """HELM's "idealized runtime" in FLOP terms: the task's FLOPs per token at the machine's measured peak (a
    reference matmul), and its $ per 1M tokens at the run's $/hour. None without FLOPs or a measured peak."""
    machine = (prices or {}).get("machine") or {}
    peak = machine.get("peak_gflops_per_s")
    flops = out.get("flops_per_token_spent") or out.get("flops_per_token")
    if not peak or not flops or prices.get("usd_per_hour") is None:
        return None
    seconds = flops / (peak * 1e9)
    return {"peak_gflops_per_s": peak, "ms_per_token": 1000 * seconds,
            "usd_per_1m_tokens": prices["usd_per_hour"] / 3600 * seconds * 1e6}
