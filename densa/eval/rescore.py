"""Committed results re-scored with today's Intelligence Density (densa.eval.density), without re-running a model:

    python -m densa.eval.rescore docs/results/quickstart-before-issue-14.json docs/results/eval-default/results.json

prints a before/after Markdown table per file (docs/eval.md shows them).

Neither file keeps per-item data, so the items are rebuilt from each record: k = score × n of them correct (the
metrics are 0/1 per item), the chance levels those of the evaluated subset's items (`meta.subsets`, or for the
quickstart the seeded subset of the same size: seed 0), the costs the record's own (GFLOPs per token; for the
quickstart, which kept only the ratios, score ÷ the old per-GFLOP figure; $ per 1M tokens from the record's prices
and token counts). They then go through `densa.eval.scores.summarize`, the code path of a live run. Which items were
correct is not recorded (it only matters for the interval where chance varies by item, on ARC), and the costs per
item are equal, so the rebuilt intervals carry the quality's variation only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from densa.eval import benchmarks, density, scores


def rebuilt_rows(record: dict[str, Any], items: list[str], flops_per_token: float | None,
                 tokens: float, output_tokens: float) -> list[dict[str, Any]]:
    """Item rows with the record's score (the first k items correct) and its per-token costs."""
    n = record["n_items"]
    k = round(record["score"] * n)
    metric = benchmarks.TASKS[record["task"]].metric
    return [{"item": item, "ok": True, "metrics": {metric: float(i < k)}, "prompt_tokens": tokens - output_tokens,
             "output_tokens": output_tokens, "processed_tokens": tokens, "prompt_bytes": 0, "output_bytes": 0,
             "flops": None if flops_per_token is None else flops_per_token * tokens, "wall_s": 0.0}
            for i, item in enumerate(items[:n])]


def rescore(record: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """Quality, at-chance flag and densities of one committed record under today's definitions."""
    old = record.get("intelligence_density") or {}
    if benchmarks.TASKS[record["task"]].kind == "bpb":  # bits saved per byte; its interval mirrors the score's
        quality = density.bits_saved(record["score"])
        q_ci = [density.bits_saved(record["score_ci"][1]), density.bits_saved(record["score_ci"][0])]
        fpb = record["flops_per_token"] * record["processed_tokens_mean"] / record["prompt_bytes_mean"] / 1e9
        usd = record["usd_per_item"] / record["prompt_bytes_mean"] * 1e6 if record.get("usd_per_item") else None
        return {"quality": quality, "quality_ci": q_ci, "chance": None, "old": old,
                "per_gflop": density.density(quality, fpb, q_ci), "per_usd": density.density(quality, usd, q_ci)}
    if "flops_per_token" in record:  # a densa eval results.json record
        fpt = record.get("flops_per_token_spent") or record.get("flops_per_token")
        usd = record["usd_per_1m_tokens"]
        prices = {"input": usd["input"], "output": usd["output"]}
        tokens, output = record["processed_tokens_mean"], record["output_tokens_mean"]
    else:  # the quickstart's summary: only the old ratios are kept, score / cost
        fpt = 1e9 * record["score"] / old["per_gflop"] if old.get("per_gflop") else None
        blended = record["score"] / old["per_usd"] if old.get("per_usd") else None
        prices = {"input": blended, "output": blended} if blended else None
        tokens, output = 1.0, 0.0
    out = scores.summarize(record["task"], rebuilt_rows(record, items, fpt, tokens, output), prices)
    d = out["intelligence_density"]
    return {"quality": out["quality"], "quality_ci": out["quality_ci"], "chance": out["chance"], "old": old,
            **{key: density.Density(d.get(key), d["missing"].get(key)) for key in ("per_gflop", "per_usd")}}


def table(path: Path) -> str:
    data = json.loads(path.read_text())
    if "eval_suite" in data:  # the quickstart's summary.json
        suite = data["eval_suite"]
        names = {r["model"]: row[0] for r, row in zip(suite["records"], suite["rows"], strict=True)}
        records, subsets = suite["records"], {}
    else:
        records, subsets = data["records"], data["meta"]["subsets"]
        names = {r["model"]: r["label"] for r in records}
    lines = ["| model | task | score [95% CI] | chance | before: ID per GFLOP | after: quality [95% CI] | "
             "after: ID per GFLOP | before: ID per $ | after: ID per $ |", "|" + "---|" * 9]
    for r in records:
        if r.get("score") is None:
            continue
        items = subsets.get(r["task"]) or benchmarks.subset(r["task"], r["n_items"], 0)
        new = rescore(r, items)
        q, q_ci = new["quality"], new["quality_ci"]
        lines.append(" | ".join([
            f"| {names[r['model']]}", r["task"], f"{r['score']:.3f} [{r['score_ci'][0]:.3f}, {r['score_ci'][1]:.3f}]",
            f"{new['chance']:.3f}" if new["chance"] is not None else "–", _num(new["old"].get("per_gflop")),
            f"{q:.2f} [{q_ci[0]:.2f}, {q_ci[1]:.2f}]" if q is not None else "–", new["per_gflop"].text(),
            _num(new["old"].get("per_usd")), new["per_usd"].text()]) + " |")
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return f"{x:.1f}" if x is not None else "–"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="quickstart summary.json or densa eval results.json")
    for path in parser.parse_args(argv).files:
        print(f"\n{path}\n\n{table(path)}")


if __name__ == "__main__":
    main()
