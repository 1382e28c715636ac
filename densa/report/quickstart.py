"""The quickstart's report: the terminal table, and report.md / report.html with the Intelligence Density comparison.

Quality and Intelligence Density are densa.eval.density's, the same definitions as `densa eval` and the studies.
Quality here is bits per byte, the one figure every model gets: *bits saved* = 8 − held-out bits/byte (8 bits/byte is
what a model that knows nothing, raw bytes, pays). The first comparison is quality against inference cost (GFLOPs
per byte of text, so that tokenizers compare): which model is better at matched cost. The ratio, bits saved per
GFLOP/byte, comes second: it favours the cheaper model whenever both have learned something. The eval-suite subset
reports chance-corrected accuracy, and no ratio for a model whose interval includes chance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from densa.eval import density
from densa.report.document import Document
from densa.report.pareto import figure, save, scatter_panel

COLORS = {"densa": "C3", "dense baseline": "C0", "smollm2-135m": "C7"}


def bits_saved_per_gflop(row: dict[str, Any]) -> density.Density:
    """Bits saved per byte ÷ inference GFLOPs per byte (none when the model saves no bits)."""
    return density.density(density.bits_saved(row["heldout_bpb"]), row["gflops_per_byte"], cost_name="FLOP")


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n{'model':<16}{'params':>12}{'active':>12}{'train FLOPs':>13}{'GFLOP/token':>13}{'bits/byte':>11}"
          f"{'bits saved/GFLOP':>18}")
    for name, r in rows.items():
        train = f"{r['training_flops']:.3g}" if "training_flops" in r else "-"
        print(f"{name:<16}{r['params']:>12,}{r['active']:>12,}{train:>13}{r['gflops_per_token']:>13.4f}"
              f"{r['heldout_bpb']:>11.3f}{bits_saved_per_gflop(r).text():>18}")


def matched_cost(rows: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Who is better at matched inference cost (bits saved against GFLOPs per byte), for every pair of models."""
    return density.matched_cost([density.Point(name, r["gflops_per_byte"], density.bits_saved(r["heldout_bpb"]))
                                 for name, r in rows.items()])


def _plot(rows: dict[str, dict[str, Any]], out: Path) -> Path:
    fig, axes = figure(2)
    for name, r in rows.items():
        if r.get("curve"):
            axes[0].plot([p[0] for p in r["curve"]], [p[1] for p in r["curve"]], marker="o", label=name,
                         color=COLORS.get(name))
    axes[0].set_xlabel("training FLOPs")
    axes[0].set_ylabel("validation bits/byte")
    axes[0].set_title("training at equal FLOPs")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    points = {name: [(r["gflops_per_byte"] * 1e9, r["heldout_bpb"], 0.0)] for name, r in rows.items()}
    scatter_panel(axes[1], points, "inference FLOPs per byte of text", "held-out bits/byte", colors=COLORS)
    axes[1].set_title("quality vs inference cost (lower-left is better)")
    axes[1].legend(fontsize=8)
    return save(fig, out / "report.png")


def verdict(rows: dict[str, dict[str, Any]]) -> str:
    """Two sentences comparing densa with the dense baseline, from the measured figures: quality at matched cost
    first, the ratio second."""
    d, b = rows["densa"], rows["dense baseline"]
    better = "lower (better)" if d["heldout_bpb"] < b["heldout_bpb"] else "higher (worse)"
    compared = density.compare(density.Point("densa", d["gflops_per_byte"], density.bits_saved(d["heldout_bpb"])),
                               density.Point("the dense baseline", b["gflops_per_byte"],
                                             density.bits_saved(b["heldout_bpb"])))
    dd, bd = bits_saved_per_gflop(d), bits_saved_per_gflop(b)
    ratio = f"{dd.value / bd.value:.2f}× the baseline's" if dd.value and bd.value else "not comparable"
    return (f"At equal training FLOPs ({d['training_flops']:.3g}), densa's held-out bits/byte is {better} than the "
            f"dense baseline's ({d['heldout_bpb']:.3f} vs {b['heldout_bpb']:.3f}) at {d['gflops_per_byte']:.4f} vs "
            f"{b['gflops_per_byte']:.4f} inference GFLOPs per byte: {compared}. Its Intelligence Density is {ratio} "
            f"({dd.text()} vs {bd.text()} bits saved per GFLOP/byte). A few minutes of CPU training is far from "
            "convergence; `densa study iso-flop` measures the same comparison over budgets and seeds.")


def suite_table(records: list[dict[str, Any]], names: dict[str, str], limit: int) -> dict[str, Any]:
    """The eval-suite subset as a report table: score, chance, chance-corrected quality and its Intelligence
    Density per GFLOP/token ("at chance" where the quality's interval includes 0), and who is better at matched
    GFLOPs per token on each task."""
    table, matched = [], []
    for r in records:
        ci, q_ci, d = r.get("score_ci"), r.get("quality_ci"), r.get("intelligence_density") or {}
        per_gflop = d.get("per_gflop")
        table.append([names.get(r["model"], r["model"]), r["task"], f"{r['score']:.3f}" if r["score"] is not None
                      else "-", f"{ci[0]:.2f}–{ci[1]:.2f}" if ci else "-",
                      f"{r['chance']:.3f}" if r.get("chance") is not None else "not defined",
                      f"{r['quality']:.2f} [{q_ci[0]:.2f}, {q_ci[1]:.2f}]" if r.get("quality") is not None and q_ci
                      else "-",
                      f"{per_gflop:.2f}" if per_gflop is not None else (d.get("missing") or {}).get("per_gflop", "-")])
    for task in dict.fromkeys(r["task"] for r in records):
        pts = [density.Point(names.get(r["model"], r["model"]), (r.get("intelligence_density") or {})
                             .get("per_gflop_cost"), r["quality"], tuple(r["quality_ci"]) if r.get("quality_ci")
                             else None) for r in records if r["task"] == task and r.get("quality") is not None]
        matched += [[task, f"{a} vs {b}", v] for a, b, v in density.matched_cost([p for p in pts if p.cost])]
    keep = ("model", "task", "score", "score_ci", "chance", "quality", "quality_ci", "at_chance", "n_items",
            "intelligence_density")
    return {"header": ["model", "task", "score", "95% CI", "chance", "quality (chance-corrected) [95% CI]",
                       "ID per GFLOP/token"],
            "rows": table, "matched": matched, "records": [{k: r.get(k) for k in keep} for r in records],
            "note": f"{limit} seeded items per task through densa eval (lm-evaluation-harness, log-likelihood "
                    "scoring); the full report card is eval/report.md in this folder. Quality is (score − chance) / "
                    "(1 − chance); a model whose 95% interval includes chance gets no Intelligence Density (\"at "
                    "chance\"): small models trained for minutes sit there, and a ratio would only reward their "
                    "small size."}


def write_report(rows: dict[str, dict[str, Any]], suite: dict[str, Any] | None, out: Path, *, preset: str,
                 corpus: str, text_bytes: int, wall_s: float) -> tuple[Path, Path]:
    doc = Document("densa quickstart report")
    doc.paragraph(f"densa ({preset} preset, Mega mixer + dynamic MoE) and its dense Llama-style baseline, trained with "
                  f"the same tokenizer, data ({corpus}), optimizer and training FLOPs; evaluated on {text_bytes:,} "
                  f"bytes of held-out text. Wall time {wall_s:.0f} s.")
    doc.heading("Quality against inference cost")
    doc.paragraph(verdict(rows))
    doc.table(["models", "at matched GFLOPs per byte (bits saved per byte vs GFLOP/byte)"],
              [[f"{a} vs {b}", v] for a, b, v in matched_cost(rows)])
    doc.heading("Intelligence Density")
    header = ["model", "params (active)", "training FLOPs", "steps", "train tokens/s", "held-out bits/byte",
              "GFLOP/token", "bytes/token", "GFLOP/byte", "bits saved per GFLOP/byte"]
    table = []
    for name, r in rows.items():
        table.append([name, f"{r['params'] / 1e6:.2f}M ({r['active'] / 1e6:.2f}M)",
                      f"{r['training_flops']:.3g}" if "training_flops" in r else "pretrained",
                      str(r.get("steps", "-")), f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-",
                      f"{r['heldout_bpb']:.3f}", f"{r['gflops_per_token']:.4f}", f"{r['bytes_per_token']:.2f}",
                      f"{r['gflops_per_byte']:.4f}", f"**{bits_saved_per_gflop(r).text()}**"])
    doc.table(header, table)
    doc.paragraph("Bits saved per GFLOP/byte = (8 − held-out bits/byte) ÷ (inference GFLOPs per token ÷ bytes per "
                  "token): what the model learned about the text per unit of inference compute (higher is better). "
                  "densa's FLOPs count the experts its router actually used on the held-out text. Read it after the "
                  "comparison above: between two models that both learned something, the ratio favours the smaller "
                  "one even when the larger is better at the same cost (docs/eval.md).")
    doc.image(_plot(rows, out), "validation curves and quality vs inference FLOPs")
    if suite:
        doc.heading("Eval-suite subset")
        doc.table(suite["header"], suite["rows"])
        if suite.get("matched"):
            doc.table(["task", "models", "at matched GFLOPs per token"], suite["matched"])
        if suite.get("note"):
            doc.paragraph(suite["note"])
    else:
        doc.paragraph("The eval-suite subset was not run (quick mode, or densa's eval API is not available).")
    doc.heading("Samples")
    for name, r in rows.items():
        if "sample" in r:
            doc.paragraph(f"**{name}**")
            doc.code(r["sample"])
    if "smollm2-135m" in rows:
        doc.paragraph(f"smollm2-135m: {rows['smollm2-135m']['note']}.")
    doc.heading("Next")
    doc.paragraph("Checkpoints: `mega/checkpoints/latest` (densa) and `attention/checkpoints/latest` (dense "
                  "baseline) under this folder; `densa eval` evaluates them, `densa study iso-flop` runs the full "
                  "comparison at several budgets and seeds.")
    return doc.write(out)
