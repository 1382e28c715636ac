"""Intelligence Density, defined once: the eval report card (densa.eval.scores, densa.eval.report), the quickstart
report (densa.report.quickstart) and the studies (densa.study) all call these functions (docs/eval.md).

Quality is what a model knows beyond guessing, so that a model at chance has none:

    accuracy tasks   q = (s − c) / (1 − c)     s the score, c the chance level (1 / number of choices, averaged
                                                over the items; 0 for generation tasks): 0 at chance, 1 when perfect
    bits per byte    q = 8 − bits per byte      bits saved per byte against a uniform byte model (8 bits per byte)

Intelligence Density is q divided by a cost (GFLOPs per token, $ per 1M tokens; per *byte* for bits per byte, so
that tokenizers compare). A model whose 95% quality interval reaches 0 (its score's interval includes chance) gets
no density: it is "at chance" ("below chance" when the whole interval is under it), and a ratio would only reward it
for being cheap.

A ratio still favours the cheaper of two models whenever both are above chance, so the first comparison is quality
against cost: `compare` says which of two models has the higher quality at no more than the other's cost (Pareto
dominance), per cost axis; the ratios come second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np

Num = TypeVar("Num", float, np.ndarray)

UNIFORM_BYTE_BITS = 8.0  # what a model that knows nothing about the text pays per byte
AT_CHANCE = "at chance"
BELOW_CHANCE = "below chance"


def chance_corrected(score: Num, chance: Num) -> Num:
    """q = (s − c) / (1 − c): 0 at chance, 1 for a perfect score, negative below chance (elementwise on arrays)."""
    if np.any((np.asarray(chance) < 0) | (np.asarray(chance) >= 1)):
        raise ValueError(f"chance level {chance!r}: must be in [0, 1)")
    return (score - chance) / (1.0 - chance)


def bits_saved(bits_per_byte: Num) -> Num:
    """Bits per byte saved against a uniform byte model: 8 − bits per byte."""
    return UNIFORM_BYTE_BITS - bits_per_byte


def at_chance(quality_ci: list[float] | tuple[float, float] | None, quality: float | None = None) -> bool:
    """True when the quality's 95% interval reaches 0 (or, without an interval, when the quality itself is <= 0)."""
    if quality_ci:
        return quality_ci[0] <= 0.0
    return quality is None or quality <= 0.0


@dataclass(frozen=True)
class Density:
    """One Intelligence Density figure, or why there is none (`missing`: "at chance", "below chance", "no FLOP
    figure", ...)."""

    value: float | None
    missing: str | None = None

    def text(self, digits: int = 1) -> str:
        return f"{self.value:.{digits}f}" if self.value is not None else str(self.missing)


def density(quality: float | None, cost: float | None, quality_ci: list[float] | None = None,
            cost_name: str = "cost") -> Density:
    """q / cost, or the reason there is no figure: no quality (no chance level), no cost figure, or at chance."""
    if quality is None:
        return Density(None, "no quality figure")
    if cost is None or not cost > 0 or cost == float("inf"):
        return Density(None, f"no {cost_name} figure")
    if quality_ci and quality_ci[1] < 0.0:
        return Density(None, BELOW_CHANCE)
    if at_chance(quality_ci, quality):
        return Density(None, AT_CHANCE)
    return Density(quality / cost)


@dataclass(frozen=True)
class Point:
    """A model on one quality-vs-cost chart; `quality_ci` (optional) says when a difference is within noise."""

    name: str
    cost: float
    quality: float
    quality_ci: tuple[float, float] | None = None


def dominates(a: Point, b: Point) -> bool:
    """a is at least as good as b at no more than b's cost, and strictly better on one of the two."""
    return a.cost <= b.cost and a.quality >= b.quality and (a.cost < b.cost or a.quality > b.quality)


def compare(a: Point, b: Point) -> str:
    """Who is better at matched cost, as one sentence."""
    noise = ""
    if a.quality_ci and b.quality_ci and a.quality_ci[0] <= b.quality_ci[1] and b.quality_ci[0] <= a.quality_ci[1]:
        noise = " (quality intervals overlap)"
    if a.cost == b.cost and a.quality == b.quality:
        return f"{a.name} and {b.name} are equal"
    for first, second in ((a, b), (b, a)):
        if dominates(first, second):
            return f"{first.name} is better at ≤ {second.name}'s cost{noise}"
    cheap, good = (a, b) if a.cost < b.cost else (b, a)
    return f"neither: {cheap.name} is cheaper, {good.name} is better{noise}"


def matched_cost(points: list[Point]) -> list[tuple[str, str, str]]:
    """(model, model, verdict) for every pair of points, in the order given."""
    return [(a.name, b.name, compare(a, b)) for i, a in enumerate(points) for b in points[i + 1:]]
