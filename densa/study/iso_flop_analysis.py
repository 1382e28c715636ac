"""The iso-FLOP study's analysis: the FLOPs-to-dense-loss ratio, seed statistics, the summary and the plots.

Pure functions of the run records that densa/study/iso_flop.py writes (one dict per variant × budget × seed with its
validation curve [(training FLOPs spent, val loss, val bits/byte), ...]), so they can be re-run on committed results
and tested on synthetic curves.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from densa.study.stats import first_crossing, mean_ci

if TYPE_CHECKING:
    from densa.study.iso_flop import StudyConfig

# ------------------------------------------------------------------------------------------------- analysis

def flops_to_reach(curves: list[list[list[float]]], target: float) -> float | None:
    """The fewest training FLOPs at which any of these runs (one variant, one seed, every budget) reaches `target`."""
    hits = [f for f in (first_crossing(c, target) for c in curves) if f is not None]
    return min(hits) if hits else None


def loss_ratios(records: list[dict], variant: str, budget_index: int) -> dict:
    """flops_to_dense_loss_ratio of `variant` at one budget: per seed it shares with the dense runs, the FLOPs the
    variant needs to reach that dense run's final validation loss ÷ the dense run's training FLOPs."""
    dense = {r["seed"]: r for r in records if r["variant"] == "dense" and r["budget_index"] == budget_index}
    per_seed, never = {}, []
    for seed, d in sorted(dense.items()):
        curves = [r["curve"] for r in records if r["variant"] == variant and r["seed"] == seed]
        if not curves:
            continue
        target = d["curve"][-1][1]  # the dense run's final validation loss, on the same evaluation set
        reached = flops_to_reach(curves, target)
        if reached is None:
            never.append(seed)
            most = max(r["training_flops"] for r in records if r["variant"] == variant and r["seed"] == seed)
            per_seed[seed] = {"ratio": None, "lower_bound": most / d["training_flops"]}
        else:
            per_seed[seed] = {"ratio": reached / d["training_flops"]}
    ratios = [v["ratio"] for v in per_seed.values() if v["ratio"] is not None]
    mean, lo, hi = mean_ci(ratios) if ratios and not never else (None, None, None)
    return {"ratio": mean, "ci_low": lo, "ci_high": hi, "seeds": len(per_seed), "never_reached": never,
            "per_seed": per_seed}


def summarise(records: list[dict], study: StudyConfig) -> tuple[dict, dict]:
    """(flat headline figures for --json, nested per-variant/budget table for the detail file)."""
    table: dict[str, dict] = {}
    for name in study.variants:
        for b in range(len(study.budgets)):
            runs = [r for r in records if r["variant"] == name and r["budget_index"] == b]
            if not runs:
                continue
            bpb = mean_ci([r["val_bpb"] for r in runs])
            row = {"seeds": len(runs), "val_bpb": bpb[0], "val_bpb_ci": [bpb[1], bpb[2]]}
            for key in ("training_flops", "inference_flops_per_token", "ms_per_token", "params_total",
                        "params_active", "steps", "tokens", "val_loss"):
                row[key] = statistics.fmean(r[key] for r in runs)
            if name != "dense":
                row["flops_to_dense_loss"] = loss_ratios(records, name, b)
            table.setdefault(name, {})[f"b{b}"] = row
    top = f"b{len(study.budgets) - 1}"
    flat: dict[str, Any] = {"budgets": study.budgets, "seeds": study.seeds, "ablation_seeds": study.ablation_seeds,
                            "train_s_total": sum(r["train_s"] for r in records)}  # wall_s omits runs reused from disk
    for name, rows in table.items():
        row = rows.get(top)
        if row is None:
            continue
        flat[f"{name}_val_bpb"] = row["val_bpb"]
        flat[f"{name}_inference_flops_per_token"] = row["inference_flops_per_token"]
        flat[f"{name}_ms_per_token"] = row["ms_per_token"]
        if name == "dense":
            continue
        prefix = "" if name == "densa" else f"{name}_"
        r = row["flops_to_dense_loss"]
        flat[f"{prefix}flops_to_dense_loss_ratio"] = r["ratio"]
        flat[f"{prefix}flops_to_dense_loss_ratio_ci"] = [r["ci_low"], r["ci_high"]]
        flat[f"{prefix}flops_to_dense_loss_never_reached"] = len(r["never_reached"])
    suites = {r["variant"]: r["eval_suite"] for r in records if r.get("eval_suite")}
    for name, suite in suites.items():
        for task, v in suite.items():
            flat[f"{name}_{task}"] = v["score"]
    if suites:
        flat["eval_suite_above_chance"] = sorted(f"{n}/{t}" for n, s in suites.items() for t, v in s.items()
                                                 if v["above_chance"])
    main = [n for n in ("densa", "dense", "topk_moe") if n in table and top in table[n]]
    if main:  # quality per inference FLOP: bits/byte saved over a uniform byte model (densa.eval.density) per GFLOP
        from densa.eval.density import bits_saved

        density = {n: bits_saved(table[n][top]["val_bpb"]) / (table[n][top]["inference_flops_per_token"] / 1e9)
                   for n in main}
        flat["best_quality_per_inference_flop"] = max(density, key=density.get)
        flat.update({f"{n}_bits_saved_per_gflop": v for n, v in density.items()})
    return flat, table


# ------------------------------------------------------------------------------------------------- plots

COLORS = {"densa": "C3", "dense": "C0", "topk_moe": "C2", "mega_topk": "C1", "mega_dense": "C4",
          "attention_moe": "C8"}  # olive: C5 (brown) is hard to tell from densa's red


def plot(records: list[dict], table: dict, study: StudyConfig, out: Path) -> list[Path]:
    """iso-flop-pareto.png (bits/byte vs training FLOPs, inference FLOPs/token, ms/token) and iso-flop-curves.png
    (validation curves at the largest budget)."""
    from densa.report.pareto import figure, save, scatter_panel

    def series(key: str, top_only: bool) -> dict:
        s = {}
        for name, rows in table.items():
            keys = [f"b{len(study.budgets) - 1}"] if top_only else list(rows)
            s[name] = [(rows[k][key], rows[k]["val_bpb"], _half(rows[k]["val_bpb_ci"])) for k in keys if k in rows]
        return {k: v for k, v in s.items() if v}

    fig, axes = figure(3)
    scatter_panel(axes[0], series("training_flops", False), "training FLOPs", "held-out bits/byte", colors=COLORS)
    scatter_panel(axes[1], series("inference_flops_per_token", True), "inference FLOPs/token (largest budget)",
                  "held-out bits/byte", colors=COLORS)
    scatter_panel(axes[2], series("ms_per_token", True), "measured decode ms/token (batch 1)",
                  "held-out bits/byte", colors=COLORS)
    axes[0].legend(fontsize=8)
    fig.suptitle("iso-FLOP study: lower-left is better (mean over seeds, 95% CI)")
    paths = [save(fig, out / "iso-flop-pareto.png")]

    fig, axes = figure(1, width=7)
    top = len(study.budgets) - 1
    for r in records:
        if r["budget_index"] == top:
            xs, ys = [p[0] for p in r["curve"]], [p[2] for p in r["curve"]]
            axes[0].plot(xs, ys, color=COLORS.get(r["variant"]), alpha=0.8, linewidth=1,
                         label=r["variant"] if r["seed"] == 0 else None)
    axes[0].set_xlabel("training FLOPs spent")
    axes[0].set_ylabel("validation bits/byte")
    axes[0].set_title(f"validation curves at the largest budget ({study.budgets[-1]:.2g} FLOPs)")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    paths.append(save(fig, out / "iso-flop-curves.png"))
    return paths


def _half(ci: list) -> float:
    return (ci[1] - ci[0]) / 2 if ci[0] is not None else 0.0


def render_table(table: dict, study: StudyConfig) -> str:
    """Markdown table of every variant × budget (used by the terminal output and docs/iso-flop.md)."""
    lines = ["| variant | budget | seeds | steps | held-out bits/byte (95% CI) | FLOPs to dense loss | "
             "inference MFLOP/token | decode ms/token | params (active) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in table.items():
        for key, row in rows.items():
            ci = row["val_bpb_ci"]
            bpb = f"{row['val_bpb']:.4f}" + (f" ({ci[0]:.4f}–{ci[1]:.4f})" if ci[0] is not None else "")
            ratio = "—"
            if "flops_to_dense_loss" in row:
                r = row["flops_to_dense_loss"]
                if r["ratio"] is not None:
                    ratio = f"{r['ratio']:.2f}" + (f" ({r['ci_low']:.2f}–{r['ci_high']:.2f})"
                                                   if r["ci_low"] is not None else "")
                else:
                    bounds = [v["lower_bound"] for v in r["per_seed"].values() if "lower_bound" in v]
                    ratio = f"not reached in {len(r['never_reached'])}/{r['seeds']} (> {min(bounds):.2f})" \
                        if bounds else "—"
            budget = study.budgets[int(key[1:])]
            lines.append(f"| {name} | {budget:.2g} | {row['seeds']} | {row['steps']:.0f} | {bpb} | {ratio} | "
                         f"{row['inference_flops_per_token'] / 1e6:.2f} | {row['ms_per_token']:.2f} | "
                         f"{row['params_total'] / 1e6:.2f}M ({row['params_active'] / 1e6:.2f}M) |")
    return "\n".join(lines)
