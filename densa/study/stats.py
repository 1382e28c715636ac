"""The statistics every study shares: where a loss curve first reaches a target, and a mean with its t interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from scipy import stats as scipy_stats


def first_crossing(curve: Sequence[Sequence[float]], target: float) -> float | None:
    """Training FLOPs at which a validation curve [(flops, loss, ...), ...] first reaches `target` loss, linearly
    interpolated between the last evaluation above it and the first at or below it (the first evaluation itself when
    it is already below); None when it never does."""
    previous = None
    for point in curve:
        flops, loss = point[0], point[1]
        if loss <= target:
            if previous is None:
                return flops
            f0, l0 = previous
            return f0 + (flops - f0) * (l0 - target) / (l0 - loss)
        previous = (flops, loss)
    return None


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean and its Student-t confidence interval over seeds (None for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    half = scipy_stats.t.ppf((1 + level) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half
