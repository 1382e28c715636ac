"""`densa study inference-density`: which recipe is intelligence-dense where it runs — quality per inference FLOP,
per measured millisecond and per dollar — at equal training FLOPs.

Arms: densa's recipe (Mega + dynamic MoE), the dense transformer and the top-k MoE (matched active parameters, as
in the iso-FLOP study), and the levers of densa/study/iso_flop.py's VARIANTS with role "lever" (the gated delta-rule
mixer, hybrid layouts with every 3rd layer full attention, narrower Mega widths, fewer FFN experts per token). Every
arm trains through the iso-FLOP study's `run_one` (same data, tokenizer, optimizer, schedule and FLOP budget).

Protocol (pre-registered; docs/inference-density.md):
1. every arm trains once (seed 0) at each budget;
2. the held-out books are split in two halves by position: the *validation* half picks the finalist — the densa-family
   arm (every arm but dense and topk_moe) with the most bits saved per inference GFLOP at the largest budget —
   and nothing else is chosen anywhere;
3. the finalist, densa's current recipe, dense and topk_moe train `seeds` seeds in all;
4. the *test* half is scored once per run, after training, through the measurement core (densa/measure.py:
   bits per byte, FLOPs per token at the experts used); every arm stays in the JSON;
5. decode ms/token (batch 1, after a `context`-token prompt, each model in its best form — the compiled decode step
   where densa.model.compile offers one) is timed for every arm's seed-0 model in one pass, round-robin, so machine
   load hits every arm alike; $ per 1M output tokens follows from it (densa/cost.py).
Headline keys (the finalist against the others, test half, largest budget, mean over seeds): `id_vs_dense`,
`id_vs_topk` (bits saved per inference GFLOP, finalist ÷ other), `flops_to_dense_loss_ratio`,
`ms_per_token_vs_dense`; the same for densa's current recipe with the prefix `densa_`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from densa.checkpoint import load_model
from densa.cost import usd_per_1m_tokens, usd_per_hour
from densa.data.pretrain import TokenStream
from densa.data.tokenizer import load_tokenizer
from densa.eval.density import bits_saved
from densa.measure import bits_per_byte, token_byte_lengths
from densa.study.iso_flop import (
    RECIPES,
    VARIANTS,
    load_study,
    prepare_data,
    run_dir_of,
    run_one,
)
from densa.study.iso_flop_analysis import loss_ratios
from densa.study.stats import mean_ci
from densa.train import distributed
from densa.train.state import latest_checkpoint

BASELINES = ("dense", "topk_moe")


def default_recipe(quick: bool) -> Path:
    return RECIPES / ("inference-density-quick.yaml" if quick else "inference-density-cpu.yaml")


# ------------------------------------------------------------------------------------------------- evaluation

def heldout_halves(data: Path, context: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` windows of context + 1 tokens evenly spaced over each half of the held-out stream: (validation, test),
    each (n, context + 1). The halves do not overlap."""
    stream = TokenStream(data, "valid")
    half = stream.tokens // 2
    if half < context + 1:
        raise ValueError(f"the held-out split has {stream.tokens} tokens: too few for two halves of "
                         f"{context + 1}-token windows")

    def spread(lo: int, hi: int) -> torch.Tensor:
        last = hi - (context + 1)
        starts = [lo + round(i * (last - lo) / max(1, n - 1)) for i in range(n)]
        return torch.stack([torch.from_numpy(stream.read(s, context + 1).astype("int64")) for s in starts])

    return spread(0, half), spread(half, stream.tokens)


def score_run(checkpoint: Path, halves: tuple[torch.Tensor, torch.Tensor], token_bytes: torch.Tensor) -> dict:
    """Validation- and test-half bits per byte and inference FLOPs/token of one checkpoint (the measurement core)."""
    model = load_model(checkpoint)
    out = {}
    for name, windows in zip(("val", "test"), halves, strict=True):
        s = bits_per_byte(model, windows, token_bytes)
        out[name] = {"bpb": s.bpb, "flops_per_token": s.flops_per_token, "ffn_experts": s.ffn_experts,
                     "bits_saved_per_gflop": bits_saved(s.bpb) / (s.flops_per_token / 1e9)}
    return out


@torch.inference_mode()
def decode_ms_per_token(models: dict[str, Any], prompt: torch.Tensor, new_tokens: int, rounds: int = 3
                        ) -> dict[str, float]:
    """Batch-1 greedy decode ms/token of every model after `prompt` (1, P), each in its best form (the compiled
    decode step of densa.model.compile when available, else eager); `rounds` round-robin passes, the median step
    of each pass, the fastest pass per model (slow passes are other people's load)."""
    best = {name: float("inf") for name in models}
    steppers = {name: _stepper(model) for name, model in models.items()}
    for _ in range(rounds):
        for name, step in steppers.items():
            times = step(prompt, new_tokens)
            best[name] = min(best[name], statistics.median(times) * 1e3)
    return best


def _stepper(model):
    """A function (prompt, n) -> per-step seconds of n greedy cached decode steps."""
    model.eval()
    try:
        from densa.model import compile as fast  # the issue-15 fast path, when present
    except ImportError:
        fast = None
    decode = fast.decode_step_fn(model) if fast is not None and hasattr(fast, "decode_step_fn") else None

    def run(prompt: torch.Tensor, n: int) -> list[float]:
        cache = model.new_cache()
        next_id = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            logits = decode(next_id, cache) if decode is not None else model(next_id, cache=cache).logits
            next_id = logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
        return times

    return run


# ------------------------------------------------------------------------------------------------- analysis

def summarise(records: list[dict], latency: dict[str, float], budgets: list[float], finalist: str | None,
              usd_per_hour: float) -> tuple[dict, dict]:
    """(flat keys, per-arm table) at the largest budget, test half, mean and 95% t-interval over seeds."""
    top = len(budgets) - 1
    table: dict[str, dict] = {}
    for name in dict.fromkeys(r["variant"] for r in records):
        runs = [r for r in records if r["variant"] == name and r["budget_index"] == top and "heldout" in r]
        if not runs:
            continue
        bpb = mean_ci([r["heldout"]["test"]["bpb"] for r in runs])
        idens = mean_ci([r["heldout"]["test"]["bits_saved_per_gflop"] for r in runs])
        flops = statistics.fmean(r["heldout"]["test"]["flops_per_token"] for r in runs)
        ms = latency.get(name)
        usd = usd_per_1m_tokens(1e3 / ms, usd_per_hour) if ms else None
        row = {"seeds": len(runs), "test_bpb": bpb[0], "test_bpb_ci": [bpb[1], bpb[2]],
               "val_bpb": statistics.fmean(r["heldout"]["val"]["bpb"] for r in runs),
               "inference_flops_per_token": flops, "bits_saved_per_gflop": idens[0],
               "bits_saved_per_gflop_ci": [idens[1], idens[2]], "ms_per_token": ms, "usd_per_1m_output": usd,
               "bits_saved_per_ms": bits_saved(bpb[0]) / ms if ms else None,
               "params_total": runs[0]["params_total"], "params_active": runs[0]["params_active"],
               "training_flops": statistics.fmean(r["training_flops"] for r in runs), "what": VARIANTS[name].what}
        if name != "dense":
            row["flops_to_dense_loss"] = loss_ratios(records, name, top)
        table[name] = row
    flat: dict[str, Any] = {"budgets": budgets, "finalist": finalist}
    for name, row in table.items():
        for key in ("test_bpb", "inference_flops_per_token", "bits_saved_per_gflop", "ms_per_token",
                    "usd_per_1m_output"):
            flat[f"{name}_{key}"] = row[key]
    for prefix, arm in (("", finalist), ("densa_", "densa")):
        if arm not in table:
            continue
        row = table[arm]
        for other, key in (("dense", "id_vs_dense"), ("topk_moe", "id_vs_topk")):
            if other in table:
                flat[prefix + key] = row["bits_saved_per_gflop"] / table[other]["bits_saved_per_gflop"]
        ratio = row.get("flops_to_dense_loss") or {}
        flat[prefix + "flops_to_dense_loss_ratio"] = ratio.get("ratio")
        flat[prefix + "flops_to_dense_loss_ratio_ci"] = [ratio.get("ci_low"), ratio.get("ci_high")]
        if row["ms_per_token"] and table.get("dense", {}).get("ms_per_token"):
            flat[prefix + "ms_per_token_vs_dense"] = row["ms_per_token"] / table["dense"]["ms_per_token"]
    return flat, table


def pick_finalist(records: list[dict], top: int) -> str | None:
    """The densa-family arm with the most bits saved per inference GFLOP on the *validation* half (seed 0)."""
    scores = {r["variant"]: r["heldout"]["val"]["bits_saved_per_gflop"] for r in records
              if r["seed"] == 0 and r["budget_index"] == top and r["variant"] not in BASELINES and "heldout" in r}
    return max(scores, key=scores.get) if scores else None


def render_table(table: dict, flat: dict) -> str:
    lines = ["| arm | seeds | test bits/byte (95% CI) | inference MFLOP/token | ms/token | $ / 1M out | "
             "bits saved / GFLOP | params active / total | what |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in sorted(table.items(), key=lambda kv: -kv[1]["bits_saved_per_gflop"]):
        ci = row["test_bpb_ci"]
        ci_text = f" ({ci[0]:.4f}–{ci[1]:.4f})" if ci[0] is not None else ""
        mark = " **(finalist)**" if name == flat.get("finalist") else ""
        ms = f"{row['ms_per_token']:.2f}" if row["ms_per_token"] else "—"
        usd = f"{row['usd_per_1m_output']:.4f}" if row["usd_per_1m_output"] else "—"
        lines.append(f"| {name}{mark} | {row['seeds']} | {row['test_bpb']:.4f}{ci_text} | "
                     f"{row['inference_flops_per_token'] / 1e6:.2f} | {ms} | {usd} | "
                     f"{row['bits_saved_per_gflop']:.1f} | {row['params_active'] / 1e6:.2f}M / "
                     f"{row['params_total'] / 1e6:.2f}M | {row['what']} |")
    return "\n".join(lines)


def plot(table: dict, out: Path) -> Path:
    """Three Pareto panels: test bits/byte against inference FLOPs/token, ms/token and $ per 1M output tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, label, scale) in zip(axes, (("inference_flops_per_token", "inference MFLOP/token", 1e-6),
                                              ("ms_per_token", "decode ms/token (batch 1)", 1.0),
                                              ("usd_per_1m_output", "$ per 1M output tokens", 1.0)), strict=True):
        for name, row in table.items():
            if row.get(key) is None:
                continue
            ci = row["test_bpb_ci"]
            err = None if ci[0] is None else [[row["test_bpb"] - ci[0]], [ci[1] - row["test_bpb"]]]
            ax.errorbar(row[key] * scale, row["test_bpb"], yerr=err, fmt="o", capsize=3)
            ax.annotate(name, (row[key] * scale, row["test_bpb"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out test bits/byte (lower is better)")
        ax.grid(alpha=0.3)
    fig.suptitle("densa study inference-density: quality against inference cost (down-left is better)")
    fig.tight_layout()
    path = out / "inference-density-pareto.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------- entry point

def run(args: argparse.Namespace, out: Path) -> dict:
    recipe = Path(args.config) if args.config else default_recipe(args.quick)
    study, base, train_fields = load_study(recipe, list(getattr(args, "overrides", None) or []), args.seeds)
    progress = not getattr(args, "no_progress", False)
    ctx = distributed.setup("none")
    print(f"inference-density study: {recipe} -> {out}")
    data = prepare_data(study, out)
    context = train_fields.get("context", 512)
    halves = heldout_halves(data, context, study.eval_windows)
    token_bytes = token_byte_lengths(load_tokenizer(data / "tokenizer"), base.vocab_size)
    budgets, top = study.budgets, len(study.budgets) - 1
    records: list[dict] = []

    def train_and_score(name: str, b: int, seed: int) -> None:
        variant = VARIANTS[name]
        run_dir = run_dir_of(out, variant, b, seed)
        cached = run_dir / "result.json"
        if cached.is_file():
            record = json.loads(cached.read_text())
        else:
            record = run_one(variant, b, budgets[b], seed, base, train_fields, study, data, out, progress, ctx)
        if "heldout" not in record:
            record["heldout"] = score_run(latest_checkpoint(run_dir / "checkpoints"), halves, token_bytes)
            cached.write_text(json.dumps(record, indent=1) + "\n")
        records.append(record)
        test = record["heldout"]["test"]
        print(f"  {name} budget {budgets[b]:.2g} seed {seed}: test {test['bpb']:.4f} bits/byte, "
              f"{test['flops_per_token'] / 1e6:.2f} MFLOP/token")

    start = time.perf_counter()
    for b in range(len(budgets)):  # stage 1: every arm, seed 0
        for name in study.variants:
            train_and_score(name, b, 0)
    finalist = pick_finalist(records, top)
    print(f"finalist (validation half): {finalist}")
    finalists = list(dict.fromkeys([finalist, "densa", *BASELINES]))
    for seed in range(1, study.seeds):  # stage 3: the finalists' other seeds
        for b in range(len(budgets)):
            for name in finalists:
                if name in study.variants:
                    train_and_score(name, b, seed)
    prompt = halves[1][:1, :context]  # the first test window's tokens
    models = {name: load_model(latest_checkpoint(run_dir_of(out, VARIANTS[name], top, 0) / "checkpoints"))
              for name in study.variants}
    latency = decode_ms_per_token(models, prompt, study.decode_tokens)
    flat, table = summarise(records, latency, budgets, finalist, usd_per_hour())
    figure = plot(table, out)
    text = render_table(table, flat)
    print(text)
    flat.update(context=context, seeds=study.seeds, train_s_total=sum(r["train_s"] for r in records),
                wall_s=round(time.perf_counter() - start, 1), plots=[str(figure)])
    detail = {"recipe": str(recipe), "study": dataclasses.asdict(study), "base_model": base.to_dict(),
              "train": train_fields, "variants": {n: VARIANTS[n].describe() for n in study.variants},
              "finalist": finalist, "table": table, "latency_ms_per_token": latency, "runs": records}
    (out / "inference-density-detail.json").write_text(json.dumps(detail, indent=1) + "\n")
    (out / "inference-density-table.md").write_text(text + "\n")
    (out / "inference-density-flat.json").write_text(json.dumps(flat, indent=1) + "\n")
    return flat
