"""What a task cost each model: output tokens per item (median, p90, total; reasoning tokens where the endpoint
reports them), wall time per item, $ for the task, and the items whose generation hit `max_gen_toks`.

`summarize` turns one model x task's finished items into the record's `task_cost` (results.json); the report shows
them as a table (`render_task_costs`) and a plot of accuracy against output tokens per item (`plot_task_costs`,
`task_cost.png`), both added to report.md / report.html by `append_to_report`.

$ per item = input tokens x $in/1M + output tokens x $out/1M, where input tokens are everything the model read
(processed - output: each choice of a multiple-choice item). The prices are an endpoint's list prices when
`--price-in/--price-out` are given, else densa's own metering: the latency probe's throughput at the run's $/hour.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from densa.eval.measure import percentiles


def summarize(rows: list[dict[str, Any]], prices: dict[str, float] | None, price_source: str) -> dict[str, Any]:
    """The `task_cost` of one record from its items (failed items excluded)."""
    ok = [row for row in rows if row.get("ok")]
    out_tokens = [row["output_tokens"] for row in ok if row.get("output_tokens") is not None]
    reasoning = [row["reasoning_tokens"] for row in ok if row.get("reasoning_tokens") is not None]
    walls = [row["wall_s"] for row in ok if row.get("wall_s") is not None]
    usd = [_item_usd(row, prices) for row in ok]
    known = [u for u in usd if u is not None]
    hits = [row["item"] for row in ok if row.get("hit_max_gen_toks")]
    caps = sorted({row["max_gen_toks"] for row in ok if row.get("max_gen_toks") is not None})
    return {
        "n_items": len(ok),
        "output_tokens": _spread(out_tokens) if len(out_tokens) == len(ok) else None,
        "reasoning_tokens": _spread(reasoning) if reasoning else None,
        "tokens_from": sorted({row["tokens_from"] for row in ok if row.get("tokens_from")}),
        "wall_s_per_item": percentiles(walls) if walls else None,
        "wall_s_total": sum(walls) if walls else None,
        "usd_total": sum(known) if ok and len(known) == len(ok) else None,
        "usd_per_item": sum(known) / len(ok) if ok and len(known) == len(ok) else None,
        "price_source": price_source,
        "usd_per_1m": {"input": prices["input"], "output": prices["output"]} if prices else None,
        "max_gen_toks": caps[0] if len(caps) == 1 else (caps or None),
        "hit_max_gen_toks": hits,
    }


def _spread(values: list[float]) -> dict[str, float | None]:
    return {**percentiles(values), "total": sum(values), "mean": sum(values) / len(values) if values else None}


def _item_usd(row: dict[str, Any], prices: dict[str, float] | None) -> float | None:
    if prices is None or row.get("processed_tokens") is None or row.get("output_tokens") is None:
        return None
    if not all(math.isfinite(prices[k]) for k in ("input", "output")):
        return None
    n_out = row["output_tokens"]
    return ((row["processed_tokens"] - n_out) * prices["input"] + n_out * prices["output"]) / 1e6


COLUMNS = ["model", "task", "score", "items", "output tok/item (median / p90)", "output tok total",
           "reasoning tok total", "s/item (median / p90)", "$ task", "$ per item", "prices", "hit max_gen_toks"]


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in results["records"]:
        c = r.get("task_cost")
        if not c:
            continue
        tok, reason, wall = c.get("output_tokens") or {}, c.get("reasoning_tokens") or {}, c.get("wall_s_per_item")
        cap = c.get("max_gen_toks")
        hits = f"{len(c['hit_max_gen_toks'])} of {c['n_items']} (cap {cap})" if cap is not None else "–"
        rows.append([r["label"], r["task"], _f(r.get("score")), str(c["n_items"]),
                     f"{_f(tok.get('median'), 1)} / {_f(tok.get('p90'), 1)}" if tok else "–",
                     _f(tok.get("total"), 0) if tok else "–", _f(reason.get("total"), 0) if reason else "–",
                     f"{_f(wall['median'], 2)} / {_f(wall['p90'], 2)}" if wall else "–",
                     _f(c.get("usd_total"), 6), _f(c.get("usd_per_item"), 6), c["price_source"], hits])
    return rows


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float) and x != 0 and abs(x) < 1e-3:
        return f"{x:.3g}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _hit_lines(results: dict[str, Any]) -> list[tuple[str, str, int | None, list[str]]]:
    return [(r["label"], r["task"], r["task_cost"].get("max_gen_toks"), r["task_cost"]["hit_max_gen_toks"])
            for r in results["records"] if (r.get("task_cost") or {}).get("hit_max_gen_toks")]


def render_task_costs(results: dict[str, Any]) -> str:
    """The report's "What each task cost" section, Markdown."""
    rows = table_rows(results)
    if not rows:
        return ""
    md = ["\n## What each task cost\n\n", "| " + " | ".join(COLUMNS) + " |\n", "|" + "---|" * len(COLUMNS) + "\n"]
    md += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |\n" for row in rows]
    hits = _hit_lines(results)
    if hits:
        md.append("\nWarning: these generations stopped at `max_gen_toks` (their answers may be cut short):\n\n")
        md += [f"- {label} · {task} (cap {cap}): {', '.join(f'`{i}`' for i in items)}\n"
               for label, task, cap, items in hits]
    return "".join(md)


def render_task_costs_html(results: dict[str, Any]) -> str:
    rows = table_rows(results)
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    parts = [f"<h2>What each task cost</h2><table><tr>{head}</tr>{body}</table>"]
    hits = _hit_lines(results)
    if hits:
        parts.append("<p>Warning: these generations stopped at <code>max_gen_toks</code>:</p><ul>")
        parts += [f"<li>{html.escape(label)} &middot; {html.escape(task)} (cap {cap}): "
                  f"{html.escape(', '.join(items))}</li>" for label, task, cap, items in hits]
        parts.append("</ul>")
    return "".join(parts)


def plot_task_costs(results: dict[str, Any], path: Path) -> bool:
    """Score against mean output tokens per item, one panel per generative task, one colour per model (the
    vertical bar: the score's 95% interval; the horizontal: median to p90 output tokens)."""
    points = [r for r in results["records"] if r.get("score") is not None and r.get("higher_is_better", True)
              and ((r.get("task_cost") or {}).get("output_tokens") or {}).get("mean")]
    tasks = sorted({r["task"] for r in points})
    if not tasks:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r["label"] for r in points})
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.8 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=True):
        for r in (r for r in points if r["task"] == task):
            tok = r["task_cost"]["output_tokens"]
            lo, hi = r.get("score_ci") or (r["score"], r["score"])
            ax.errorbar([tok["mean"]], [r["score"]], yerr=[[r["score"] - lo], [hi - r["score"]]], fmt="o",
                        color=colors[r["label"]], capsize=2)
            ax.hlines(r["score"], tok["median"], tok["p90"], color=colors[r["label"]], lw=1, alpha=0.5)
        ax.set_xscale("log")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("output tokens per item (mean; line: median to p90)", fontsize=7)
        ax.set_ylabel("score", fontsize=8)
        ax.tick_params(labelsize=7)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colors[label]) for label in labels]
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle("accuracy vs output tokens per item (Token Value: up and to the left is better)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def append_to_report(out: Path, results: dict[str, Any]) -> None:
    """Add the task-cost table, the max_gen_toks warnings and task_cost.png to report.md and report.html (called
    once, after densa.eval.report wrote them)."""
    md, body = render_task_costs(results), render_task_costs_html(results)
    if not md:
        return
    if plot_task_costs(results, out / "task_cost.png"):
        md += "\n![task_cost.png](task_cost.png)\n"
        body += '<p><img src="task_cost.png" alt="task_cost.png" style="max-width:100%"></p>'
    report_md, report_html = out / "report.md", out / "report.html"
    if report_md.is_file():
        report_md.write_text(report_md.read_text() + md)
    if report_html.is_file():
        text = report_html.read_text()
        at = text.rfind("</body>")
        report_html.write_text(text[:at] + body + text[at:] if at >= 0 else text + body)
