"""The report card's files: results.json (for machines), report.md and report.html (tables and plots, for people),
and a Hugging Face model-index YAML snippet per model (model_cards/<model>.yaml).

The first view is quality against cost: `quality_vs_cost.png` puts every model's quality (chance-corrected accuracy,
or bits saved per byte; densa.eval.density) on each task against three costs (GFLOPs per token, $ per 1M tokens,
ms per output token), with the Pareto frontier drawn through the points, and a table says for each pair of models
and each cost which one is better at matched cost. The ratios (Intelligence Density) come second, with "at chance"
or the missing figure where there is no ratio. `token_value.png` compares correct answers per 1k output tokens on
the generative tasks.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from densa.eval import density

DATASET_NAMES = {"hellaswag": ("HellaSwag", "validation"), "arc_easy": ("ARC-Easy", "test"),
                 "arc_challenge": ("ARC-Challenge", "test"), "piqa": ("PIQA", "validation"),
                 "winogrande": ("WinoGrande", "validation"), "boolq": ("BoolQ", "validation"),
                 "openbookqa": ("OpenBookQA", "test"), "mmlu": ("MMLU", "test"), "gsm8k": ("GSM8K", "test"),
                 "humaneval": ("HumanEval", "test"), "humanevalplus": ("HumanEval+", "test"),
                 "bpb_wikitext2": ("WikiText-2", "test"), "bpb_gutenberg": ("Gutenberg (held out)", "valid")}


def write_results(out: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """results.json, written atomically (a reader never sees half a file)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "records": records}, indent=1, default=_jsonable) + "\n")
    tmp.replace(out / "results.json")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_report(out: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    plots = [name for name, ok in (("quality_vs_cost.png", plot_quality_vs_cost(out / "quality_vs_cost.png", records)),
                                   ("token_value.png", plot_token_value(out / "token_value.png", records))) if ok]
    cards = write_model_cards(out / "model_cards", meta, records)
    warnings = _cost_warnings(records)
    tables = _tables(meta, records)
    md = ["# densa eval: Intelligence Density x Token Value\n", _header(meta)]
    md += [f"\n> **Warning:** {w}\n" for w in warnings]
    md += [f"\n![{p}]({p})\n" for p in plots[:1] if p == "quality_vs_cost.png"]
    for title, (columns, rows) in tables.items():
        md += [f"\n## {title}\n", _md_table(columns, rows)]
        if title in NOTES:
            md.append(f"\n{NOTES[title]}\n")
    flagged = _flagged_items(records)
    if flagged:
        md += ["\n## Contaminated items (13-gram overlap with the training corpus)\n\n"]
        md += [f"- {label} · {task}: {', '.join(f'`{item}`' for item in items)}\n" for label, task, items in flagged]
    md += [f"\n![{p}]({p})\n" for p in plots if p != "quality_vs_cost.png"]
    md += ["\n## Model-card snippets (Hugging Face model-index)\n"]
    md += [f"\n`model_cards/{path.name}`\n\n```yaml\n{path.read_text()}```\n" for path in cards]
    md.append("\nDefinitions: docs/eval.md. Item subsets: results.json `meta.subsets`.\n")
    (out / "report.md").write_text("".join(md))
    body = [f"<h1>densa eval: Intelligence Density &times; Token Value</h1><p>{html.escape(_header(meta))}</p>"]
    body += [f"<p><b>Warning:</b> {html.escape(w)}</p>" for w in warnings]
    body += [f'<p><img src="{p}" alt="{p}" style="max-width:100%"></p>' for p in plots if p == "quality_vs_cost.png"]
    for title, (columns, rows) in tables.items():
        body.append(f"<h2>{html.escape(title)}</h2>{_html_table(columns, rows)}")
        if title in NOTES:
            body.append(f"<p>{html.escape(NOTES[title])}</p>")
    if flagged:
        body.append("<h2>Contaminated items (13-gram overlap with the training corpus)</h2><ul>")
        body += [f"<li>{html.escape(label)} &middot; {html.escape(task)}: {html.escape(', '.join(items))}</li>"
                 for label, task, items in flagged]
        body.append("</ul>")
    body += [f'<p><img src="{p}" alt="{p}" style="max-width:100%"></p>' for p in plots if p != "quality_vs_cost.png"]
    body += [f"<h3>{html.escape(p.name)}</h3><pre>{html.escape(p.read_text())}</pre>" for p in cards]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>densa eval</title>"
                                     f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    from densa.eval.task_cost import append_to_report  # the per-task cost table and plot (densa/eval/task_cost.py)

    append_to_report(out, {"meta": meta, "records": records})


MATCHED = "Who is better at matched cost"
RATIOS = "Intelligence Density (quality per cost; second to the comparison above)"
NOTES = {
    MATCHED: "Quality is chance-corrected accuracy (s − chance) / (1 − chance), or bits saved per byte against a "
             "uniform byte model for bits per byte. A model is better at matched cost when its quality is at least "
             "the other's at no more than the other's cost (Pareto dominance); \"neither\" is a trade-off.",
    RATIOS: "Quality ÷ cost, per token (per byte for bits per byte); $ is the task's own input:output token mix at "
            "the measured prices. No ratio where the quality's 95% interval reaches 0 (\"at chance\": a ratio would "
            "only reward being small) or where a figure is missing. Intervals resample items for the quality and "
            "its denominator together; resamples where a figure is not finite are dropped and counted.",
}
AXES = (("GFLOP", "per_gflop_cost"), ("$/1M", "per_usd_cost"), ("ms/token", "ms_per_token"))


def _cost(r: dict[str, Any], key: str) -> float | None:
    if key == "ms_per_token":
        return ((r.get("ms_per_token") or {}).get("batch_1") or {}).get("median")
    return (r.get("intelligence_density") or {}).get(key)


def _matched_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """One row per task and pair of models: the verdict on each cost axis."""
    rows = []
    for task in dict.fromkeys(r["task"] for r in records):
        pts = [r for r in records if r["task"] == task and r.get("quality") is not None]
        for i, a in enumerate(pts):
            for b in pts[i + 1:]:
                verdicts = []
                for _, key in AXES:
                    ca, cb = _cost(a, key), _cost(b, key)
                    if ca is None or cb is None:
                        missing = [r["label"] for r, c in ((a, ca), (b, cb)) if c is None]
                        verdicts.append(f"no figure for {', '.join(missing)}")
                        continue
                    verdicts.append(density.compare(density.Point(a["label"], ca, a["quality"], a["quality_ci"]),
                                                    density.Point(b["label"], cb, b["quality"], b["quality_ci"])))
                rows.append([task, f"{a['label']} vs {b['label']}", *verdicts])
    return rows


def _density_cell(d: dict[str, Any], key: str) -> str:
    if d.get(key) is not None:
        return _ci(d[key], d.get(f"{key}_ci"))
    return (d.get("missing") or {}).get(key, "–")


def _cost_warnings(records: list[dict[str, Any]]) -> list[str]:
    """One line per model measured on a busy machine: its $ and ms figures are inflated."""
    out, seen = [], set()
    for r in records:
        machine = (r.get("usd_per_1m_tokens") or {}).get("machine") or {}
        if r["model"] in seen or not machine.get("busy"):
            continue
        seen.add(r["model"])
        out.append(f"{r['label']}: the machine was busy during the latency probe ({'; '.join(machine['reasons'])}); "
                   "its $ and ms per token are inflated: compare the idealised cost beside them")
    return out


def _flagged_items(records: list[dict[str, Any]]) -> list[tuple[str, str, list[str]]]:
    """(model label, task, item ids) of every evaluated item the contamination audit flagged."""
    return [(r["label"], r["task"], r["contamination"]["flagged_items"]) for r in records
            if r.get("contamination") and r["contamination"]["flagged_items"]]


def _header(meta: dict[str, Any]) -> str:
    s = meta["settings"]
    return (f"densa {meta['densa_version']} (commit {(meta.get('git_commit') or 'unknown')[:12]}), lm-eval "
            f"{meta['lm_eval_version']}; limit {s['limit']}, seed {s['seed']}, batch {s['batch_size']}; prices at "
            f"${meta['usd_per_hour']:g}/hour ({meta['hardware']}); 95% bootstrap intervals; wall "
            f"{meta.get('wall_s', 0):.0f} s.\n")


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) >= 1e4 or (x != 0 and abs(x) < 1e-3) else f"{x:.{digits}f}"
    return str(x)


def _ci(value: Any, ci: list[float] | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{_fmt(value, digits)} [{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]" if ci else _fmt(value, digits)


def _tables(meta: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, tuple[list[str], list[list[str]]]]:
    ratios, quality = [], []
    for r in records:
        d, tv, comb = r.get("intelligence_density") or {}, r.get("token_value") or {}, r.get("combined") or {}
        dropped = {k: v for k, v in (d.get("dropped_resamples") or {}).items() if v}
        ratios.append([r["label"], r["task"], _ci(r["score"], r["score_ci"]), _fmt(r.get("chance")),
                       _ci(r.get("quality"), r.get("quality_ci")) if r.get("quality") is not None
                       else f"no chance level defined for {r['task']}",
                       f"per {d['unit']}" if d.get("unit") else "–", _fmt(d.get("per_gflop_cost"), 4),
                       _density_cell(d, "per_gflop"), _fmt(d.get("per_usd_cost"), 4), _density_cell(d, "per_usd"),
                       ", ".join(f"{k} {v}" for k, v in dropped.items()) or "0"])
        flag = ""
        if r.get("contamination"):
            c = r["contamination"]
            flag = f"{c['n_flagged_in_subset']} flagged (clean {_fmt(c['score_clean'])})"
        quality.append([r["label"], r["task"], r["metric"], _ci(r["score"], r["score_ci"]), _fmt(r.get("chance")),
                        f"{r['n_items']}" + (f" ({r['n_failed']} failed)" if r.get("n_failed") else ""),
                        _fmt(_g(r.get("flops_per_token_spent") or r.get("flops_per_token")), 4),
                        _fmt(r.get("output_tokens_mean"), 1), _ci(tv.get("per_1k_tokens"), tv.get("per_1k_tokens_ci")),
                        _ci(tv.get("per_1k_bytes"), tv.get("per_1k_bytes_ci")),
                        _ci(comb.get("correct_per_usd"), comb.get("correct_per_usd_ci"), 4), flag])
    cost_rows, seen = [], set()
    for r in records:
        if r["model"] in seen:
            continue
        seen.add(r["model"])
        b = r["latency_probe"]["batch_size"]
        t, m, tp, usd = r["ttft_ms"], r["ms_per_token"], r["throughput_tokens_per_s"], r["usd_per_1m_tokens"]
        info = meta["models"].get(r["model"], {})
        spread = (usd.get("range") or {}).get("blended")
        machine = usd.get("machine")
        ideal = next((x["idealised"] for x in records if x["model"] == r["model"] and x.get("idealised")), None)
        cost_rows.append([r["label"], info.get("kind", "–"), _fmt(info.get("params_active")),
                          _p(t["batch_1"]), _p(t[f"batch_{b}"]), _p(m["batch_1"]), _p(m[f"batch_{b}"]),
                          _fmt(tp.get("prefill_batch_1"), 4), _fmt(tp.get(f"decode_batch_{b}"), 4),
                          _fmt(usd["input"], 4), _fmt(usd["output"], 4),
                          _fmt(usd["blended"], 4) + (f" [{_fmt(spread[0], 4)}, {_fmt(spread[1], 4)}]" if spread
                                                     else ""),
                          f"{_fmt(ideal['usd_per_1m_tokens'], 3)} at {_fmt(ideal['peak_gflops_per_s'], 1)} GFLOP/s"
                          if ideal else "no FLOP figure or measured peak",
                          _machine_cell(machine)])
    b = records[0]["latency_probe"]["batch_size"] if records else 1
    tasks = list(dict.fromkeys(r["task"] for r in records))
    side = [[label] + [next((_ci(r["score"], r["score_ci"]) for r in records if r["label"] == label
                             and r["task"] == task), "–") for task in tasks]
            for label in dict.fromkeys(r["label"] for r in records)]
    return {
        MATCHED: (["task", "models", *(f"at matched {name}" for name, _ in AXES)], _matched_rows(records)),
        "Scores side by side [95% CI]": (["model", *(f"{t} ({_task_metric(records, t)})" for t in tasks)], side),
        RATIOS: (["model", "task", "score [95% CI]", "chance", "quality [95% CI]", "unit", "GFLOP", "ID per GFLOP",
                  "$/1M (task mix)", "ID per $/1M", "dropped resamples"], ratios),
        "Token Value and cost per answer": (["model", "task", "metric", "score [95% CI]", "chance", "items",
                                             "GFLOP/token", "output tok/item", "TV per 1k tok", "TV per 1k bytes",
                                             "correct per $", "contamination"], quality),
        "Cost (latency probe)": (["model", "kind", "active params", "TTFT ms b=1 (med/p90)", f"TTFT ms b={b}",
                                  "ms/token b=1", f"ms/token b={b}", "prefill tok/s b=1", f"decode tok/s b={b}",
                                  "$/1M in", "$/1M out", "$/1M blended [rounds min, max]",
                                  "idealised $/1M (FLOPs at peak)", "machine"], cost_rows),
    }


def _machine_cell(machine: dict[str, Any] | None) -> str:
    if not machine:
        return "not measured (endpoint)"
    if machine["busy"]:
        return "BUSY: " + "; ".join(machine["reasons"])
    other = machine.get("other_cpu_cores")
    return "quiet" + (f" (others {other:.2f} of {machine['cores']} cores)" if other is not None else "")


def _task_metric(records: list[dict[str, Any]], task: str) -> str:
    return next(r["metric"] for r in records if r["task"] == task)


def _g(flops: float | None) -> float | None:
    return flops / 1e9 if flops is not None else None


def _p(p: dict[str, float | None]) -> str:
    return f"{_fmt(p['median'], 1)} / {_fmt(p['p90'], 1)}"


def _md_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _html_table(columns: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (cost x lower or equal and score y higher or equal, one
    strictly), ordered by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_quality_vs_cost(path: Path, records: list[dict[str, Any]]) -> bool:
    """One row of panels per task, one column per cost axis: quality [95% CI] against cost, the Pareto frontier
    (no other model is both cheaper and better) dashed, chance (quality 0) dotted."""
    rows = [r for r in records if r.get("quality") is not None]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if not tasks:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(len(tasks), len(AXES), figsize=(3.6 * len(AXES), 2.6 * len(tasks)), squeeze=False)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    for row_axes, task in zip(axes, tasks, strict=True):
        pts = [r for r in rows if r["task"] == task]
        unit = (pts[0].get("intelligence_density") or {}).get("unit", "token")
        for ax, (name, key) in zip(row_axes, AXES, strict=True):
            xy = [(_cost(r, key), r["quality"], r) for r in pts if _cost(r, key)]
            for x, y, r in xy:
                lo, hi = r["quality_ci"] or (y, y)
                ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", color=colors[r["label"]], capsize=2)
            front = pareto_front([(x, y) for x, y, _ in xy])
            ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "--", color="gray", lw=1)
            ax.axhline(0.0, color="red", lw=0.8, ls=":")
            if xy and max(x for x, _, _ in xy) / min(x for x, _, _ in xy) >= 10:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor log ticks labelled overlap
            per = unit if key != "ms_per_token" else "output token"
            ax.set_xlabel(f"{name} per {per}" if key != "per_usd_cost" else f"$ per 1M {unit}s", fontsize=8)
            ax.set_ylabel(f"{task}: {pts[0].get('quality_kind', 'quality')}", fontsize=7)
            ax.tick_params(labelsize=7)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colors[label]) for label in labels]
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle("quality vs cost (dashed: Pareto frontier; dotted: chance)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_token_value(path: Path, records: list[dict[str, Any]]) -> bool:
    rows = [r for r in records if (r.get("token_value") or {}).get("per_1k_tokens") is not None
            or (r.get("token_value") or {}).get("per_1k_bytes") is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    labels = sorted({r["label"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    width = 0.8 / len(labels)
    for ax, key in zip(axes, ("per_1k_tokens", "per_1k_bytes"), strict=True):
        for j, label in enumerate(labels):
            for i, task in enumerate(tasks):
                r = next((r for r in rows if r["task"] == task and r["label"] == label), None)
                value = (r["token_value"] or {}).get(key) if r else None
                if value is None:
                    continue
                lo, hi = r["token_value"].get(f"{key}_ci") or (value, value)
                ax.bar(i + j * width, value, width, yerr=[[value - lo], [hi - value]], capsize=2,
                       color=plt.cm.tab10(j % 10), label=label if i == 0 else None)
        ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(tasks))], tasks)
        ax.set_ylabel(f"correct answers {key.replace('_', ' ')}", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.suptitle("Token Value (generative tasks)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_model_cards(folder: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> list[Path]:
    """One Hugging Face `model-index` snippet per model, for the YAML header of a README model card."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in dict.fromkeys(r["model"] for r in records):
        results = []
        for r in records:
            if r["model"] != spec or r.get("score") is None:
                continue
            name, split = DATASET_NAMES.get(r["task"], (r["task"], "test"))
            subset = f"{r['n_items']}-item seeded subset" if r["n_items"] < meta["tasks"][r["task"]]["n_total"] \
                else "full"
            results.append({"task": {"type": "text-generation", "name": "Text Generation"},
                            "dataset": {"name": name, "type": r["task"], "split": split},
                            "metrics": [{"type": r["metric"].split(",")[0], "value": round(r["score"], 4),
                                         "name": f"{r['metric']} ({subset}, 95% CI "
                                                 f"{[round(x, 4) for x in r['score_ci'] or []]})"}],
                            "source": {"name": f"densa eval {meta['densa_version']}", "url": "docs/eval.md"}})
        label = meta["models"].get(spec, {}).get("label", spec)
        path = folder / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', label).strip('-')}.yaml"
        path.write_text(yaml.safe_dump({"model-index": [{"name": label, "results": results}]}, sort_keys=False,
                                       allow_unicode=True))
        paths.append(path)
    return paths
