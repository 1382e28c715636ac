"""Pareto fronts and the quality-vs-cost scatter plot shared by the iso-FLOP study and the quickstart report.

Quality here is a loss (bits per byte, lower is better) and cost is anything where lower is better too (FLOPs, ms).
A point is on the front when no other point is at least as good on both axes and strictly better on one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (CI, servers)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when both coordinates are minimised, ordered by the first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def scatter_panel(ax, series: dict[str, list[tuple[float, float, float]]], xlabel: str, ylabel: str,
                  log_x: bool = True, colors: dict[str, str] | None = None) -> None:
    """One panel: per name a list of (x, y, y_err) points joined by a line, and the Pareto front over all points
    as a dashed grey line."""
    everything: list[tuple[float, float]] = []
    for name, pts in series.items():
        pts = sorted(pts)
        xs, ys, errs = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
        color = (colors or {}).get(name)
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=name, color=color, linewidth=1.2)
        everything += list(zip(xs, ys, strict=True))
    front = [everything[i] for i in pareto_front(everything)]
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", linewidth=0.8, zorder=0,
                label="Pareto front")
    xs_all = [p[0] for p in everything if p[0] > 0]
    if log_x and xs_all and max(xs_all) / min(xs_all) >= 10:  # under a decade a log axis shows no labelled tick
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def figure(panels: int, width: float = 5.0, height: float = 4.0):
    """A row of `panels` axes."""
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    return fig, list(axes[0])
