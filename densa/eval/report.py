"""The report card's files: results.json (for machines), report.md and report.html (tables and plots, for people),
and a Hugging Face model-index YAML snippet per model (model_cards/<model>.yaml).

Plots (matplotlib, Agg): `score_vs_cost.png` puts every model's score on each task against its blended $ per 1M
tokens, with the Pareto frontier (no other model is both cheaper and better) drawn through the points;
`token_value.png` compares correct answers per 1k output tokens on the generative tasks.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

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
    plots = [name for name, ok in (("score_vs_cost.png", plot_score_vs_cost(out / "score_vs_cost.png", records)),
                                   ("token_value.png", plot_token_value(out / "token_value.png", records))) if ok]
    cards = write_model_cards(out / "model_cards", meta, records)
    tables = _tables(meta, records)
    md = ["# densa eval: Intelligence Density x Token Value\n", _header(meta)]
    for title, (columns, rows) in tables.items():
        md += [f"\n## {title}\n", _md_table(columns, rows)]
    flagged = _flagged_items(records)
    if flagged:
        md += ["\n## Contaminated items (13-gram overlap with the training corpus)\n\n"]
        md += [f"- {label} · {task}: {', '.join(f'`{item}`' for item in items)}\n" for label, task, items in flagged]
    md += [f"\n![{p}]({p})\n" for p in plots]
    md += ["\n## Model-card snippets (Hugging Face model-index)\n"]
    md += [f"\n`model_cards/{path.name}`\n\n```yaml\n{path.read_text()}```\n" for path in cards]
    md.append("\nDefinitions: docs/eval.md. Item subsets: results.json `meta.subsets`.\n")
    (out / "report.md").write_text("".join(md))
    body = [f"<h1>densa eval: Intelligence Density &times; Token Value</h1><p>{html.escape(_header(meta))}</p>"]
    for title, (columns, rows) in tables.items():
        body.append(f"<h2>{html.escape(title)}</h2>{_html_table(columns, rows)}")
    if flagged:
        body.append("<h2>Contaminated items (13-gram overlap with the training corpus)</h2><ul>")
        body += [f"<li>{html.escape(label)} &middot; {html.escape(task)}: {html.escape(', '.join(items))}</li>"
                 for label, task, items in flagged]
        body.append("</ul>")
    body += [f'<p><img src="{p}" alt="{p}" style="max-width:100%"></p>' for p in plots]
    body += [f"<h3>{html.escape(p.name)}</h3><pre>{html.escape(p.read_text())}</pre>" for p in cards]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>densa eval</title>"
                                     f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


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
    quality = []
    for r in records:
        d, tv, comb = r.get("intelligence_density") or {}, r.get("token_value") or {}, r.get("combined") or {}
        flag = ""
        if r.get("contamination"):
            c = r["contamination"]
            flag = f"{c['n_flagged_in_subset']} flagged (clean {_fmt(c['score_clean'])})"
        quality.append([r["label"], r["task"], r["metric"], _ci(r["score"], r["score_ci"]), _fmt(r.get("chance")),
                        f"{r['n_items']}" + (f" ({r['n_failed']} failed)" if r.get("n_failed") else ""),
                        _fmt(_g(r.get("flops_per_token_spent") or r.get("flops_per_token")), 4),
                        _fmt((r.get("usd_per_1m_tokens") or {}).get("blended"), 4),
                        _ci(d.get("per_gflop"), d.get("per_gflop_ci")), _ci(d.get("per_usd"), d.get("per_usd_ci")),
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
        cost_rows.append([r["label"], info.get("kind", "–"), _fmt(info.get("params_active")),
                          _p(t["batch_1"]), _p(t[f"batch_{b}"]), _p(m["batch_1"]), _p(m[f"batch_{b}"]),
                          _fmt(tp.get("prefill_batch_1"), 4), _fmt(tp.get(f"decode_batch_{b}"), 4),
                          _fmt(usd["input"], 4), _fmt(usd["output"], 4), _fmt(usd["blended"], 4)])
    b = records[0]["latency_probe"]["batch_size"] if records else 1
    tasks = list(dict.fromkeys(r["task"] for r in records))
    side = [[label] + [next((_ci(r["score"], r["score_ci"]) for r in records if r["label"] == label
                             and r["task"] == task), "–") for task in tasks]
            for label in dict.fromkeys(r["label"] for r in records)]
    return {
        "Scores side by side [95% CI]": (["model", *(f"{t} ({_task_metric(records, t)})" for t in tasks)], side),
        "Quality and ratios": (["model", "task", "metric", "score [95% CI]", "chance", "items", "GFLOP/token",
                                "$/1M blended", "ID per GFLOP", "ID per $/1M", "output tok/item",
                                "TV per 1k tok", "TV per 1k bytes", "correct per $", "contamination"], quality),
        "Cost (latency probe)": (["model", "kind", "active params", "TTFT ms b=1 (med/p90)", f"TTFT ms b={b}",
                                  "ms/token b=1", f"ms/token b={b}", "prefill tok/s b=1", f"decode tok/s b={b}",
                                  "$/1M in", "$/1M out", "$/1M blended"], cost_rows),
    }


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


def plot_score_vs_cost(path: Path, records: list[dict[str, Any]]) -> bool:
    rows = [r for r in records if r.get("score") is not None and r["higher_is_better"]
            and (r.get("usd_per_1m_tokens") or {}).get("blended") not in (None, math.inf)]
    tasks = sorted({r["task"] for r in rows})
    if not tasks:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    cols = min(4, len(tasks))
    nrows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
    labels = sorted({r["label"] for r in rows})
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    for ax, task in zip(axes.flat, tasks, strict=False):
        pts = [r for r in rows if r["task"] == task]
        xy = [(r["usd_per_1m_tokens"]["blended"], r["score"]) for r in pts]
        for r, (x, y) in zip(pts, xy, strict=True):
            lo, hi = r["score_ci"] or (y, y)
            ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", color=colors[r["label"]], label=r["label"])
        front = pareto_front(xy)
        ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "--", color="gray", lw=1)
        if pts[0].get("chance") is not None:
            ax.axhline(pts[0]["chance"], color="red", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor log ticks labelled overlap
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("$ per 1M tokens (3:1 blend)", fontsize=8)
        ax.set_ylabel(pts[0]["metric"], fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], marker="o", ls="", color=colors[label]) for label in labels]
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle("score vs cost (dashed: Pareto frontier; dotted: chance)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
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
