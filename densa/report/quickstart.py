"""The quickstart's report: the terminal table, and report.md / report.html with the Intelligence Density comparison.

Intelligence Density here uses bits per byte, the one quality figure every model gets: *bits saved per GFLOP* =
(8 − held-out bits/byte) / (inference GFLOPs per byte of text). 8 bits/byte is what a model that knows nothing
(raw bytes) pays, so the numerator is what the model learned about the text; dividing by FLOPs per *byte* (FLOPs per
token ÷ bytes per token) keeps models with different tokenizers comparable. Higher is better.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from densa.report.document import Document
from densa.report.pareto import figure, save, scatter_panel

COLORS = {"densa": "C3", "dense baseline": "C0", "smollm2-135m": "C7"}


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n{'model':<16}{'params':>12}{'active':>12}{'train FLOPs':>13}{'GFLOP/token':>13}{'bits/byte':>11}"
          f"{'bits saved/GFLOP':>18}")
    for name, r in rows.items():
        train = f"{r['training_flops']:.3g}" if "training_flops" in r else "-"
        print(f"{name:<16}{r['params']:>12,}{r['active']:>12,}{train:>13}{r['gflops_per_token']:>13.4f}"
              f"{r['heldout_bpb']:>11.3f}{r['bits_saved_per_gflop']:>18.1f}")


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
    """One sentence comparing densa with the dense baseline, from the measured figures."""
    d, b = rows["densa"], rows["dense baseline"]
    better = "lower (better)" if d["heldout_bpb"] < b["heldout_bpb"] else "higher (worse)"
    ratio = d["bits_saved_per_gflop"] / b["bits_saved_per_gflop"]
    return (f"At equal training FLOPs ({d['training_flops']:.3g}), densa's held-out bits/byte is {better} than the "
            f"dense baseline's ({d['heldout_bpb']:.3f} vs {b['heldout_bpb']:.3f}), and its Intelligence Density is "
            f"{ratio:.2f}× the baseline's ({d['bits_saved_per_gflop']:.1f} vs {b['bits_saved_per_gflop']:.1f} bits "
            "saved per GFLOP/byte). A few minutes of CPU training is far from convergence; `densa study iso-flop` "
            "measures the same comparison over budgets and seeds.")


def write_report(rows: dict[str, dict[str, Any]], suite: dict[str, Any] | None, out: Path, *, preset: str,
                 corpus: str, text_bytes: int, wall_s: float) -> tuple[Path, Path]:
    doc = Document("densa quickstart report")
    doc.paragraph(f"densa ({preset} preset, Mega mixer + dynamic MoE) and its dense Llama-style baseline, trained with "
                  f"the same tokenizer, data ({corpus}), optimizer and training FLOPs; evaluated on {text_bytes:,} "
                  f"bytes of held-out text. Wall time {wall_s:.0f} s.")
    doc.heading("Intelligence Density")
    doc.paragraph(verdict(rows))
    header = ["model", "params (active)", "training FLOPs", "steps", "train tokens/s", "held-out bits/byte",
              "GFLOP/token", "bytes/token", "GFLOP/byte", "bits saved per GFLOP/byte"]
    table = []
    for name, r in rows.items():
        table.append([name, f"{r['params'] / 1e6:.2f}M ({r['active'] / 1e6:.2f}M)",
                      f"{r['training_flops']:.3g}" if "training_flops" in r else "pretrained",
                      str(r.get("steps", "-")), f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-",
                      f"{r['heldout_bpb']:.3f}", f"{r['gflops_per_token']:.4f}", f"{r['bytes_per_token']:.2f}",
                      f"{r['gflops_per_byte']:.4f}", f"**{r['bits_saved_per_gflop']:.1f}**"])
    doc.table(header, table)
    doc.paragraph("Bits saved per GFLOP/byte = (8 − held-out bits/byte) ÷ (inference GFLOPs per token ÷ bytes per "
                  "token): what the model learned about the text per unit of inference compute (higher is better). "
                  "densa's FLOPs count the experts its router actually used on the held-out text.")
    doc.image(_plot(rows, out), "validation curves and quality vs inference FLOPs")
    if suite:
        doc.heading("Eval-suite subset")
        doc.table(suite["header"], suite["rows"])
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
