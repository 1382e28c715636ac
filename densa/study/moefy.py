"""`densa study moefy`: smollm2-135m converted to densa's dynamic MoE at several FFN budgets (docs/moefy.md).

For each split (co-activation clusters, and the random balanced ablation) the model is converted once; each budget
is then the same experts and router with the zc_bias set for that budget on the calibration tokens ("untuned"),
and, where configured, the same model after brief router tuning with densa's trainer ("tuned"). Every variant is
scored on held-out text the conversion never saw (Gutenberg's held-out books, WikiText-2): bits per byte with the
routing it really used, FLOPs per token at the measured expert counts, and, for a few variants, measured ms/token and
the commonsense benchmarks through `densa.eval.api.evaluate` (accuracy and Intelligence Density = accuracy per
active GFLOP/token, compared with the original model's).

Headline key: `bpb_increase_at_half_ffn` = bpb(cluster, 50% budget, tuned) / bpb(original) - 1 on the two
held-out texts together (goal <= 0.03). Every figure is keyed `<variant>_<measure>`; variants are `dense`,
`{cluster,random}-b{100,75,50,35}` and `...-tuned`.
Settings: `--set key=value` for any `StudyConfig` field (JSON values), e.g. `--set tune_steps=0`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from densa.checkpoint import save_checkpoint
from densa.model.model import DensaModel
from densa.moefy.calibrate import calibration_windows, corpus_text, encode
from densa.moefy.convert import MoefyConfig, convert, with_budget
from densa.moefy.measure import bits_per_byte, measured_flops_per_token, ms_per_token
from densa.moefy.tune import TuneConfig, prepare_data, tune
from densa.resolve import resolve

HELD_OUT = {"gutenberg": ("gutenberg", "valid"), "wikitext2": ("wikitext2", "train")}  # wiki.test.raw


@dataclass(kw_only=True)
class StudyConfig:
    model: str = "smollm2-135m"
    experts: int = 16
    budgets: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.35])
    splits: list[str] = field(default_factory=lambda: ["cluster", "random"])
    calib_tokens: int = 4096
    window: int = 512  # calibration and evaluation window
    eval_tokens: int = 2048  # held-out tokens per text
    router_steps: int = 60
    tune_steps: int = 10
    tune_mode: str = "router"
    tune_lr: float = 0.0
    tune_batch: int = 2
    tune_context: int = 256
    tuned: list[str] = field(default_factory=lambda: ["cluster-b50", "cluster-b35", "random-b50"])
    tuned_all: list[str] = field(default_factory=lambda: ["cluster-b50"])  # also tuned with every weight trainable
    tune_all_lr: float = 1e-4
    timed: list[str] = field(default_factory=lambda: ["cluster-b100", "cluster-b75", "cluster-b50", "cluster-b35"])
    benchmarks: dict[str, int] = field(default_factory=lambda: {"arc_easy": 32, "piqa": 32})
    benchmarked: list[str] = field(default_factory=lambda: ["cluster-b75", "cluster-b50-tuned", "cluster-b35-tuned"])
    seed: int = 0

    def __post_init__(self) -> None:
        """Fail on a bad `--set` now, with the field named, not after minutes of calibration."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.type if isinstance(f.type, str) else str(f.type)
            ok = {"str": isinstance(value, str),
                  "int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, int | float) and not isinstance(value, bool),
                  "list[float]": isinstance(value, list) and all(isinstance(v, int | float) for v in value),
                  "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
                  "dict[str, int]": isinstance(value, dict) and all(isinstance(v, int) for v in value.values()),
                  }.get(kind, True)
            if not ok:
                raise ValueError(f"--set {f.name}={value!r}: expected {kind}")
        if not self.budgets or not all(0 < b <= 1 for b in self.budgets):
            raise ValueError(f"--set budgets={self.budgets}: each must be in (0, 1] (a share of the FFN FLOPs)")
        for name in ("experts", "calib_tokens", "window", "eval_tokens", "tune_batch", "tune_context"):
            if getattr(self, name) < 1:
                raise ValueError(f"--set {name}={getattr(self, name)}: must be >= 1")
        unknown = sorted(set(self.splits) - {"cluster", "random"})
        if unknown:
            raise ValueError(f"--set splits={self.splits}: choose from cluster, random")


QUICK = dict(calib_tokens=1024, eval_tokens=512, router_steps=30, budgets=[1.0, 0.5], tune_steps=2,
             tuned=["cluster-b50"], tuned_all=[], timed=["cluster-b50"], benchmarks={"arc_easy": 8},
             benchmarked=["cluster-b50-tuned"])


def study_config(args: argparse.Namespace) -> StudyConfig:
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    for pair in args.overrides:
        key, sep, raw = pair.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(names))}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return StudyConfig(**values)


def score(model: DensaModel, tokenizer, texts: dict[str, list[int]], window: int) -> dict[str, Any]:
    """Held-out bits per byte on each text and both together, the FFN share used and FLOPs per token."""
    row: dict[str, Any] = {}
    bits = n_bytes = 0.0
    experts: list[list[float]] = []
    for name, ids in texts.items():
        s = bits_per_byte(model, tokenizer, ids, window)
        row[f"bpb_{name}"] = s.bpb
        bits, n_bytes = bits + s.bpb * s.bytes, n_bytes + s.bytes
        experts.append(s.experts_per_layer)
    row["bpb"] = bits / n_bytes
    per_layer = [sum(col) / len(col) for col in zip(*experts, strict=True)] if experts[0] else []
    cfg = model.config
    row["ffn_fraction"] = sum(per_layer) / len(per_layer) / cfg.num_experts if per_layer else 1.0
    row["flops_per_token"] = measured_flops_per_token(model, per_layer, window)
    return row


@torch.no_grad()
def exactness(dense: DensaModel, full: DensaModel, texts: dict[str, list[int]], window: int) -> dict[str, Any]:
    """With every expert active: the largest |logit difference| from the original over one window of each held-out
    text, and whether 32 greedily generated tokens after each text's first 32 are identical."""
    diff, same = 0.0, True
    for ids in texts.values():
        x = torch.tensor(ids[:window])[None]
        diff = max(diff, float((full(x).logits - dense(x).logits).abs().max()))
        prompt = x[:, :32]
        same &= torch.equal(full.generate(prompt, max_new_tokens=32), dense.generate(prompt, max_new_tokens=32))
    return {"all_experts_max_abs_logit_diff": diff, "all_experts_greedy_identical": same}


def run(args: argparse.Namespace, out: Path) -> dict:
    cfg = study_config(args)
    progress = not args.no_progress
    source = resolve(cfg.model)
    dense, tok = source.model, source.tokenizer
    texts = {name: encode(tok, corpus_text(corpus, split, 8 * cfg.eval_tokens))[: cfg.eval_tokens + 1]
             for name, (corpus, split) in HELD_OUT.items()}
    windows = calibration_windows(tok, "gutenberg", cfg.calib_tokens, cfg.window)
    timing_ids = texts["gutenberg"]
    rows: dict[str, dict[str, Any]] = {"dense": score(dense, tok, texts, cfg.window)}
    rows["dense"] |= ms_per_token(dense, timing_ids)
    saved: dict[str, str] = {}
    data = prepare_data(tok, "gutenberg", 2, out / "tune") if cfg.tune_steps and cfg.tuned else None
    conversions: dict[str, dict[str, Any]] = {}
    for split in cfg.splits:
        start = time.perf_counter()
        conversion = convert(dense, windows, MoefyConfig(experts=cfg.experts, budget=1.0, split=split,
                                                         router_steps=cfg.router_steps, seed=cfg.seed), progress)
        layers = conversion.report["layers"]
        conversions[split] = {"seconds": time.perf_counter() - start,
                              "router_recall": sum(r["router_recall"] for r in layers) / len(layers),
                              "random_router_recall": sum(r["random_router_recall"] for r in layers) / len(layers),
                              "mass_in_top_half": sum(r["mass_in_top_k"] for r in layers) / len(layers),
                              "oracle_half_lost_output": _mean(layers, "oracle_top_k_lost_output"),
                              "router_half_lost_output": _mean(layers, "router_top_k_lost_output"),
                              "per_layer": layers}
        for budget in cfg.budgets:
            name = f"{split}-b{round(100 * budget)}"
            model = with_budget(conversion, budget)
            rows[name] = {"split": split, "budget": budget, "tuned": False, **score(model, tok, texts, cfg.window)}
            if budget == 1.0:
                conversions[split] |= exactness(dense, model, texts, cfg.window)
            if name in cfg.timed:
                rows[name] |= ms_per_token(model, timing_ids)
            _maybe_save(model, tok, name, cfg, out, saved)
            (out / "rows.partial.json").write_text(json.dumps(rows, indent=2) + "\n")  # survives an interruption
            if name in cfg.tuned_all and data is not None:
                tuned_all = with_budget(conversion, budget)
                tc = TuneConfig(steps=cfg.tune_steps, mode="all", lr=cfg.tune_all_lr, batch_size=cfg.tune_batch,
                                context=cfg.tune_context, seed=cfg.seed)
                report = tune(tuned_all, data, out / "tune" / f"{name}-all", tc, progress)
                rows[f"{name}-tuned-all"] = {"split": split, "budget": budget, "tuned": "all", **report,
                                             **score(tuned_all, tok, texts, cfg.window)}
                del tuned_all
            if name in cfg.tuned and data is not None:
                tc = TuneConfig(steps=cfg.tune_steps, mode=cfg.tune_mode, lr=cfg.tune_lr, batch_size=cfg.tune_batch,
                                context=cfg.tune_context, seed=cfg.seed)
                report = tune(model, data, out / "tune" / name, tc, progress)
                rows[f"{name}-tuned"] = {"split": split, "budget": budget, "tuned": True, **report,
                                         **score(model, tok, texts, cfg.window)}
                _maybe_save(model, tok, f"{name}-tuned", cfg, out, saved)
            del model
        del conversion
    bench = _benchmarks(cfg, saved, out, progress) if cfg.benchmarks and saved else {}
    result = _summary(cfg, rows, conversions, bench)
    (out / "rows.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "rows": rows,
                                               "conversions": conversions, "benchmarks": bench}, indent=2) + "\n")
    _plots(rows, bench, out)
    (out / "moefy.md").write_text(_markdown(rows, bench, result))
    return result


def _mean(layers: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in layers) / len(layers)


def _maybe_save(model: DensaModel, tok, name: str, cfg: StudyConfig, out: Path, saved: dict[str, str]) -> None:
    if name in cfg.benchmarked:
        path = out / "models" / name
        save_checkpoint(model, path, overwrite=True)
        tok.save_pretrained(str(path))
        saved[name] = str(path)


def _benchmarks(cfg: StudyConfig, saved: dict[str, str], out: Path, progress: bool) -> dict[str, dict[str, Any]]:
    """Accuracy, ms/token and Intelligence Density of the original and the saved variants (densa.eval.api)."""
    from densa.eval.api import evaluate

    labels = {cfg.model: "dense", **{path: name for name, path in saved.items()}}
    records = evaluate(list(labels), list(cfg.benchmarks), dict(cfg.benchmarks), out / "eval", seed=cfg.seed,
                       batch_size=4, progress=progress, labels=labels)
    bench: dict[str, dict[str, Any]] = {}
    for r in records:
        density = (r.get("intelligence_density") or {}).get("per_gflop")
        bench.setdefault(labels[r["model"]], {})[r["task"]] = {
            "accuracy": r["score"], "accuracy_ci": r["score_ci"], "n": r["n_items"], "chance": r["chance"],
            "id_per_gflop": density, "flops_per_token": r["flops_per_token_spent"] or r["flops_per_token"],
            "ms_per_token": r["ms_per_token"]}
    return bench


def _summary(cfg: StudyConfig, rows: dict[str, dict[str, Any]], conversions: dict[str, dict[str, Any]],
             bench: dict[str, dict[str, Any]]) -> dict[str, Any]:
    base = rows["dense"]
    flat: dict[str, Any] = {"model": cfg.model, "experts": cfg.experts, "tune_steps": cfg.tune_steps,
                            "tune_mode": cfg.tune_mode, "calib_tokens": cfg.calib_tokens,
                            "eval_tokens_per_text": cfg.eval_tokens}
    for name, row in rows.items():
        for key in ("bpb", "bpb_gutenberg", "bpb_wikitext2", "ffn_fraction", "flops_per_token",
                    "prefill_ms_per_token", "decode_ms_per_token"):
            if key in row:
                flat[f"{name}_{key}"] = row[key]
        flat[f"{name}_bpb_increase"] = row["bpb"] / base["bpb"] - 1
        flat[f"{name}_flops_ratio"] = row["flops_per_token"] / base["flops_per_token"]
    for split, info in conversions.items():
        for key, value in info.items():
            if key != "per_layer":  # per-layer figures stay in rows.json
                flat[f"{split}_{key}"] = value
    dense_bench = bench.get("dense", {})
    for name, tasks in bench.items():
        for task, b in tasks.items():
            flat[f"{name}_{task}_accuracy"] = b["accuracy"]
            flat[f"{name}_{task}_n"] = b["n"]
            ref = dense_bench.get(task, {})
            if b["id_per_gflop"] and ref.get("id_per_gflop"):  # densa eval's accuracy per active GFLOP/token
                flat[f"{name}_{task}_id_ratio"] = b["id_per_gflop"] / ref["id_per_gflop"]
            if ref.get("accuracy") is not None and ref["accuracy"] > b["chance"] and b["flops_per_token"]:
                # the same with accuracy above chance, so a model at chance has no density at all
                above = (b["accuracy"] - b["chance"]) / b["flops_per_token"]
                flat[f"{name}_{task}_id_above_chance_ratio"] = above / (
                    (ref["accuracy"] - b["chance"]) / ref["flops_per_token"])
        probe = next(iter(tasks.values()))["ms_per_token"] or {}
        flat[f"{name}_eval_probe_ms_per_token_batch1"] = (probe.get("batch_1") or {}).get("median")
    tuned_half = [n for n in ("cluster-b50-tuned", "cluster-b50-tuned-all") if n in rows]
    half = min(tuned_half, key=lambda n: rows[n]["bpb"]) if tuned_half else "cluster-b50"  # the better tuning
    if half in rows:
        flat["bpb_increase_at_half_ffn"] = rows[half]["bpb"] / base["bpb"] - 1
        flat["bpb_increase_at_half_ffn_variant"] = half
        flat["bpb_increase_at_half_ffn_goal"] = 0.03
    return flat


def _plots(rows: dict[str, dict[str, Any]], bench: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(rows["dense"]["bpb"], color="black", lw=1, ls=":", label="original (dense)")
    for split, color in (("cluster", "tab:blue"), ("random", "tab:orange")):
        for tuned, style, what in ((False, "o--", "fitted router only"), (True, "s-", "router tuned"),
                                   ("all", "^", "all weights tuned")):
            pts = sorted((r["ffn_fraction"], r["bpb"]) for r in rows.values()
                         if r.get("split") == split and r.get("tuned") == tuned)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color=color, label=f"{split} split, {what}")
    ax.set_xlabel("FFN compute used (share of the dense FFN's FLOPs, measured)")
    ax.set_ylabel("held-out bits per byte (Gutenberg + WikiText-2)")
    ax.set_title("smollm2-135m converted by densa moefy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "moefy-bpb-vs-budget.png", dpi=120)
    plt.close(fig)
    if not bench:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for task in sorted({t for tasks in bench.values() for t in tasks}):
        pts = [(b[task]["flops_per_token"] / 1e9, b[task]["accuracy"], name) for name, b in bench.items()
               if task in b and b[task]["accuracy"] is not None and b[task]["flops_per_token"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=task)
        for x, y, name in pts:
            ax.annotate(name.replace("cluster-", "").replace("-tuned", "t"), (x, y), fontsize=7)
        chance = next(b[task]["chance"] for b in bench.values() if task in b)
        ax.axhline(chance, lw=0.8, ls=":", color=ax.lines[-1].get_color())
    ax.set_xlabel("active GFLOPs per token (measured routing)")
    ax.set_ylabel("accuracy (dotted: chance)")
    ax.set_title("Intelligence Density: accuracy per FLOP")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "moefy-id.png", dpi=120)
    plt.close(fig)


def _markdown(rows: dict[str, dict[str, Any]], bench: dict[str, dict[str, Any]], result: dict[str, Any]) -> str:
    lines = ["# densa study moefy", "", "| variant | FFN share | GFLOPs/token | bpb Gutenberg | bpb WikiText-2 | "
             "bpb both | increase | prefill ms/tok | decode ms/tok |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        def ms(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key]:.2f}" if key in r else ""
        lines.append(f"| {name} | {r['ffn_fraction']:.3f} | {r['flops_per_token'] / 1e9:.3f} | "
                     f"{r['bpb_gutenberg']:.4f} | {r['bpb_wikitext2']:.4f} | {r['bpb']:.4f} | "
                     f"{result[f'{name}_bpb_increase']:+.1%} | {ms('prefill_ms_per_token')} | "
                     f"{ms('decode_ms_per_token')} |")
    if bench:
        lines += ["", "| variant | task | accuracy | n | ID ratio vs original | above-chance ID ratio |",
                  "|---|---|---|---|---|---|"]
        for name, tasks in bench.items():
            for task, b in tasks.items():
                ratios = [result.get(f"{name}_{task}_{key}") for key in ("id_ratio", "id_above_chance_ratio")]
                cells = " | ".join(f"{r:.2f}" if r is not None else "" for r in ratios)
                lines.append(f"| {name} | {task} | {b['accuracy']:.3f} | {b['n']} | {cells} |")
    if "bpb_increase_at_half_ffn" in result:
        lines += ["", f"bpb_increase_at_half_ffn ({result['bpb_increase_at_half_ffn_variant']}): "
                      f"{result['bpb_increase_at_half_ffn']:+.4f} (goal <= 0.03)"]
    return "\n".join(lines) + "\n"

