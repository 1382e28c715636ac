"""`densa study token-value`: does token-value RL keep accuracy with far fewer output tokens? (docs/alignment.md)

Per seed (3 by default), on the generated arithmetic word problems (with `shared_sft`, the default, step 1 runs once,
seed 0, and every seed's RL starts from it):
  1. SFT          a fresh densa model on a mix of concise and verbose-but-correct targets (recipes/sft-arithmetic.yaml)
  2. RL-correct   GRPO from that SFT model, reward = correctness only (align-arithmetic.yaml, reward.length=none)
  3. RL-TV        GRPO, identical config, reward = correctness + token-value term (recipes/align-arithmetic.yaml)
  4. truncation   the SFT model with max_new_tokens capped at RL-TV's mean output length (is RL just "cut off"?)
Every arm is decoded greedily on the same held-out problems (and the 4-operation OOD split). Reported: accuracy,
mean output tokens (all; correct only), Token Value (correct answers per 1,000 output tokens), accuracy against a
token budget, OOD accuracy and the short-but-wrong rate (output no longer than the problem's concise reference
solution, and wrong: brevity bought with errors). A diagnostic, `sft_forced_concise_*`: the SFT model decoded with
its answer forced to start like the concise form (the first digit of the start number), which measures how much
accuracy the SFT model itself keeps without the verbose filler — the best a length reward could hope to keep.

Headline keys: `token_reduction` = 1 − tokens(RL-TV)/tokens(SFT) and `accuracy_delta` = accuracy(RL-TV) −
accuracy(SFT) in points, each with a 95% bootstrap interval over held-out items (resampled within each seed, the
same items for both arms, pooled over seeds). That interval holds each seed's RL run fixed; `..._ci95_seeds` is
the Student-t interval over the per-seed values, which also covers how much the RL outcome varies between seeds.
Goal: token_reduction ≥ 0.5 with accuracy_delta ≥ −1.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from densa.align.config import load_recipe
from densa.align.evaluate import Output, budget_curve, generate_greedy
from densa.align.grpo import run_grpo
from densa.align.logs import read_jsonl
from densa.align.policy import load_policy
from densa.align.problems import heldout_and_ood, messages
from densa.align.sft import run_sft
from densa.config import ConfigError, read_recipe
from densa.study.stats import mean_ci

ARMS = ("sft", "rl_correct", "rl_tv", "truncation")
LABELS = {"sft": "SFT", "rl_correct": "RL, correctness only", "rl_tv": "RL, token value", "truncation": "SFT truncated"}


@dataclass(kw_only=True)
class StudyConfig:
    sft_recipe: str = "recipes/sft-arithmetic.yaml"
    align_recipe: str = "recipes/align-arithmetic.yaml"
    seeds: int = 3
    heldout: int = 400
    ood: int = 200
    budgets: list[int] = field(default_factory=lambda: [8, 12, 16, 24, 32, 48, 64, 96])
    bootstrap: int = 2000
    shared_sft: bool = True  # one SFT model (seed 0) for every seed's RL arms: SFT is most of the CPU time
    sft_from: str = ""  # reuse this SFT MODEL (e.g. a previous study's seed0/sft/model) instead of training one
    sft: list[str] = field(default_factory=list)  # extra `section.key=value` overrides of the SFT recipe
    align: list[str] = field(default_factory=list)  # ... and of the align recipe (both RL arms)
    quick: list[str] = field(default_factory=lambda: ["sft.steps=200", "grpo.steps=10", "task.train_size=4000"])


def load_study(path: str | None, seeds: int | None) -> StudyConfig:
    cfg = StudyConfig()
    if path:
        section = read_recipe(path).get("study") or {}
        unknown = sorted(set(section) - set(vars(cfg)))
        if unknown:
            raise ConfigError(f"{path}: unknown study key(s) {unknown}; valid: {', '.join(vars(cfg))}")
        cfg = StudyConfig(**section)
    if seeds is not None:
        cfg.seeds = seeds
    if cfg.seeds < 1:
        raise ValueError(f"--seeds {cfg.seeds}: must be >= 1")
    return cfg


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cfg = load_study(args.config, args.seeds)
    progress = not args.no_progress
    extra = (cfg.quick if args.quick else []) + list(args.overrides)
    used = ("sft.", "task.", "policy.", "grpo.", "reward.")
    ignored = [pair for pair in args.overrides if not pair.startswith(used)]
    if ignored:  # an override no arm reads would be silently dropped
        raise ConfigError(f"--set {ignored[0]!r}: token-value passes only sft.*, task.*, policy.* (SFT) and "
                          "grpo.*, reward.*, task.* (both RL arms) to the recipes; study fields go in --config")
    # validate both recipes with every override now, not after the SFT stage has trained for minutes
    load_recipe(cfg.sft_recipe, cfg.sft + _only(extra, ("sft.", "task.", "policy.")), method="sft")
    load_recipe(cfg.align_recipe, cfg.align + _only(extra, ("grpo.", "reward.", "task.")), method="grpo")
    heldout_n, ood_n = (min(cfg.heldout, 100), min(cfg.ood, 60)) if args.quick else (cfg.heldout, cfg.ood)
    heldout, ood = heldout_and_ood(heldout_n, ood_n)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    decoded: dict[Path, dict[str, Any]] = {}
    for seed in range(cfg.seeds):
        sft_seed = 0 if cfg.shared_sft else seed
        sft_dir = Path(cfg.sft_from).parent if cfg.sft_from else out / f"seed{sft_seed}" / "sft"
        if sft_seed == seed and not cfg.sft_from:
            sft_recipe = load_recipe(cfg.sft_recipe, cfg.sft + _only(extra, ("sft.", "task.", "policy.")) +
                                     [f"sft.seed={seed}", f"task.heldout_size={heldout_n}"], method="sft")
            run_sft(sft_recipe, sft_dir, progress=progress, evaluate=False)
        policies = {"sft": sft_dir / "model"}
        for arm, length in (("rl_correct", ["reward.length=none"]), ("rl_tv", [])):
            recipe = load_recipe(cfg.align_recipe, cfg.align + _only(extra, ("grpo.", "reward.", "task.")) + length +
                                 [f"policy.path={sft_dir / 'model'}", f"grpo.seed={seed}",
                                  f"task.heldout_size={heldout_n}"], method="grpo")
            run_grpo(recipe, out / f"seed{seed}" / arm, progress=progress, evaluate=False)
            policies[arm] = out / f"seed{seed}" / arm / "model"
        max_new = recipe.task.max_new_tokens
        for arm, path in policies.items():
            if path not in decoded:  # greedy decoding is deterministic: a shared SFT model is decoded once
                model, tok = load_policy(load_recipe(None, [f"policy.path={path}"]).policy)
                decoded[path] = {"heldout": _decode(model, tok, heldout, max_new, progress),
                                 "ood": _decode(model, tok, ood, max_new, progress), "tok": tok,
                                 "reference": [len(tok(p.concise())["input_ids"]) + 1 for p in heldout],
                                 "reference_ood": [len(tok(p.concise())["input_ids"]) + 1 for p in ood]}
            runs[arm].append(decoded[path])
        if "sft_concise" not in decoded:  # diagnostic: the SFT model made to start its answer the concise way
            model, tok = load_policy(load_recipe(None, [f"policy.path={policies['sft']}"]).policy)
            outs = generate_greedy(model, tok, [messages(p.question, system=False) for p in heldout],
                                   [p.answer for p in heldout], max_new_tokens=max_new,
                                   forced=[str(p.steps[0][0])[0] for p in heldout])
            decoded["sft_concise"] = {"accuracy": sum(o.correct(tok) for o in outs) / len(outs),
                                      "mean_tokens": float(np.mean([len(o.tokens) for o in outs]))}
        tv_mean = np.mean([len(o.tokens) for o in runs["rl_tv"][-1]["heldout"]])
        runs["truncation"].append({**runs["sft"][-1], "budget": max(1, round(float(tv_mean)))})
    return _report(cfg, runs, out, decoded["sft_concise"])


def _decode(model: Any, tok: Any, problems: list, max_new: int, progress: bool) -> list[Output]:
    return generate_greedy(model, tok, [messages(p.question, system=False) for p in problems],
                           [p.answer for p in problems], max_new_tokens=max_new, progress=progress)


def _only(overrides: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [o for o in overrides if o.startswith(prefixes)]


def _item_arrays(run: dict[str, Any], split: str = "heldout") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item: correct (0/1), output tokens and the short-but-wrong flag; truncation runs apply their budget."""
    tok, budget = run["tok"], run.get("budget")
    outputs: list[Output] = run[split]
    correct = np.array([o.correct(tok, budget) for o in outputs], dtype=float)
    tokens = np.array([min(len(o.tokens), budget) if budget else len(o.tokens) for o in outputs], dtype=float)
    ref = np.array(run["reference" if split == "heldout" else "reference_ood"], dtype=float)
    return correct, tokens, (tokens <= ref) & (correct == 0)


def _arm_metrics(runs: list[dict[str, Any]], budgets: list[int]) -> dict[str, Any]:
    c, n, sw = (np.concatenate(x) for x in zip(*(_item_arrays(r) for r in runs), strict=True))
    oc, on, osw = (np.concatenate(x) for x in zip(*(_item_arrays(r, "ood") for r in runs), strict=True))
    per_seed_acc = [float(_item_arrays(r)[0].mean()) for r in runs]
    curve = {}
    if "budget" not in runs[0]:
        per = [budget_curve(r["heldout"], r["tok"], budgets) for r in runs]
        curve = {str(k): float(np.mean([p[k] for p in per])) for k in budgets}
    return {"accuracy": float(c.mean()), "accuracy_per_seed": per_seed_acc, "mean_tokens": float(n.mean()),
            "mean_tokens_correct": float(n[c == 1].mean()) if c.any() else math.nan,
            "token_value_per_1k": float(1000 * c.sum() / n.sum()), "short_wrong_rate": float(sw.mean()),
            "ood_accuracy": float(oc.mean()), "ood_mean_tokens": float(on.mean()),
            "ood_short_wrong_rate": float(osw.mean()), "budget_curve": curve,
            **({"budget": [r["budget"] for r in runs]} if "budget" in runs[0] else {})}


def _bootstrap(rl: list[dict[str, Any]], sft: list[dict[str, Any]], draws: int) -> dict[str, list[float]]:
    """95% intervals of token_reduction and accuracy_delta: items resampled within each seed (paired across arms)."""
    rng = np.random.default_rng(0)
    pairs = [(_item_arrays(a), _item_arrays(b)) for a, b in zip(rl, sft, strict=True)]
    red, delta = [], []
    for _ in range(draws):
        tok_rl = tok_sft = acc_rl = acc_sft = 0.0
        items = 0
        for (c1, n1, _), (c0, n0, _) in pairs:
            idx = rng.integers(0, len(c1), len(c1))
            tok_rl, tok_sft = tok_rl + n1[idx].sum(), tok_sft + n0[idx].sum()
            acc_rl, acc_sft, items = acc_rl + c1[idx].sum(), acc_sft + c0[idx].sum(), items + len(idx)
        red.append(1 - tok_rl / tok_sft)
        delta.append(100 * (acc_rl - acc_sft) / items)
    return {"token_reduction": [float(np.percentile(red, 2.5)), float(np.percentile(red, 97.5))],
            "accuracy_delta": [float(np.percentile(delta, 2.5)), float(np.percentile(delta, 97.5))]}


def _seed_intervals(rl: list[dict[str, Any]], sft: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Student-t 95% intervals of token_reduction and accuracy_delta over seeds (one paired value per seed). The item
    bootstrap above holds each seed's RL run fixed, so it misses how much the RL outcome itself varies between seeds;
    this interval does not (and is wide with 3 seeds). None with a single seed."""
    pairs = [(_item_arrays(a), _item_arrays(b)) for a, b in zip(rl, sft, strict=True)]
    red = [1 - n1.mean() / n0.mean() for (_, n1, _), (_, n0, _) in pairs]
    delta = [100 * (c1.mean() - c0.mean()) for (c1, _, _), (c0, _, _) in pairs]
    out: dict[str, list[float | None]] = {}
    for key, values in (("token_reduction", red), ("accuracy_delta", delta)):
        _, low, high = mean_ci([float(v) for v in values])
        out[key] = [low, high]
    return out


def _report(cfg: StudyConfig, runs: dict[str, list[dict[str, Any]]], out: Path,
            concise: dict[str, float]) -> dict[str, Any]:
    arms = {arm: _arm_metrics(runs[arm], cfg.budgets) for arm in ARMS}
    sft, tv = arms["sft"], arms["rl_tv"]
    ci = _bootstrap(runs["rl_tv"], runs["sft"], cfg.bootstrap)
    ci_correct = _bootstrap(runs["rl_correct"], runs["sft"], cfg.bootstrap)
    seed_ci = _seed_intervals(runs["rl_tv"], runs["sft"])
    result: dict[str, Any] = {
        "token_reduction": 1 - tv["mean_tokens"] / sft["mean_tokens"], "token_reduction_ci95": ci["token_reduction"],
        "accuracy_delta": 100 * (tv["accuracy"] - sft["accuracy"]), "accuracy_delta_ci95": ci["accuracy_delta"],
        "token_reduction_ci95_seeds": seed_ci["token_reduction"],
        "accuracy_delta_ci95_seeds": seed_ci["accuracy_delta"],
        "goal_met": bool(1 - tv["mean_tokens"] / sft["mean_tokens"] >= 0.5
                         and 100 * (tv["accuracy"] - sft["accuracy"]) >= -1),
        "rl_correct_token_reduction": 1 - arms["rl_correct"]["mean_tokens"] / sft["mean_tokens"],
        "rl_correct_token_reduction_ci95": ci_correct["token_reduction"],
        "rl_correct_accuracy_delta": 100 * (arms["rl_correct"]["accuracy"] - sft["accuracy"]),
        "rl_correct_accuracy_delta_ci95": ci_correct["accuracy_delta"],
        "sft_forced_concise_accuracy": concise["accuracy"], "sft_forced_concise_mean_tokens": concise["mean_tokens"],
        "seeds": cfg.seeds, "shared_sft": cfg.shared_sft, "heldout_items": len(runs["sft"][0]["heldout"]),
        "ood_items": len(runs["sft"][0]["ood"]),
    }
    for arm, m in arms.items():
        for key in ("accuracy", "mean_tokens", "mean_tokens_correct", "token_value_per_1k", "short_wrong_rate",
                    "ood_accuracy", "ood_short_wrong_rate"):
            result[f"{arm}_{key}"] = m[key]
    result = _finite(result)  # NaN (an arm with no correct answer) is written as null: strict JSON
    (out / "detail.json").write_text(json.dumps(_finite({"config": vars(cfg), "arms": arms, **result}), indent=2) +
                                     "\n")
    _plot_budget(arms, out / "token-value-budget.png")
    _plot_training(out, cfg.seeds, out / "token-value-training.png")
    (out / "token-value.md").write_text(_markdown(arms, result))
    return result


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _interval(ci: list[float | None], spec: str) -> str:
    return "– (one seed)" if ci[0] is None else f"[{ci[0]:{spec}}, {ci[1]:{spec}}]"


def _markdown(arms: dict[str, Any], r: dict[str, Any]) -> str:
    rows = []
    for arm, m in arms.items():
        rows.append(f"| {LABELS[arm]} | {100 * m['accuracy']:.1f} | {m['mean_tokens']:.1f} | "
                    f"{m['mean_tokens_correct']:.1f} | {m['token_value_per_1k']:.1f} | {100 * m['ood_accuracy']:.1f} | "
                    f"{100 * m['short_wrong_rate']:.1f} | {100 * m['ood_short_wrong_rate']:.1f} |")
    lo, hi = r["token_reduction_ci95"]
    dlo, dhi = r["accuracy_delta_ci95"]
    return ("# token-value study\n\n"
            f"{r['seeds']} seeds x {r['heldout_items']} held-out items (greedy), {r['ood_items']} OOD items.\n\n"
            "| arm | accuracy % | tokens | tokens (correct) | Token Value /1k | OOD acc % | short-wrong % | "
            "OOD short-wrong % |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) +
            f"\n\ntoken_reduction = {r['token_reduction']:.3f} [{lo:.3f}, {hi:.3f}]; accuracy_delta = "
            f"{r['accuracy_delta']:+.2f} points [{dlo:+.2f}, {dhi:+.2f}]; goal met: {r['goal_met']}\n\n"
            f"Intervals above: item bootstrap (each seed's RL run fixed). Over seeds (t, 95%): token_reduction "
            f"{_interval(r['token_reduction_ci95_seeds'], '.3f')}, accuracy_delta "
            f"{_interval(r['accuracy_delta_ci95_seeds'], '+.2f')} points.\n\n"
            f"Diagnostic: the SFT model forced to start the concise way: accuracy "
            f"{100 * r['sft_forced_concise_accuracy']:.1f}% at {r['sft_forced_concise_mean_tokens']:.1f} tokens.\n")


def _plot_budget(arms: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in ("sft", "rl_correct", "rl_tv"):
        curve = arms[arm]["budget_curve"]
        ax.plot([int(k) for k in curve], [100 * v for v in curve.values()], marker="o", label=LABELS[arm])
        ax.scatter([arms[arm]["mean_tokens"]], [100 * arms[arm]["accuracy"]], marker="x", s=60, color="k")
    t = arms["truncation"]
    ax.scatter([t["mean_tokens"]], [100 * t["accuracy"]], marker="s", s=50, color="red",
               label="SFT truncated at RL-TV's mean length", zorder=5)
    ax.set_xlabel("token budget (max_new_tokens); x = mean tokens used")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("accuracy vs output-token budget (greedy, mean of seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_training(out: Path, seeds: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, color in (("rl_correct", "tab:orange"), ("rl_tv", "tab:green")):
        for seed in range(seeds):
            log = out / f"seed{seed}" / arm / "metrics.jsonl"
            recs = [r for r in read_jsonl(log) if "reward" in r] if log.is_file() else []
            steps = [r["step"] for r in recs]
            label = LABELS[arm] if seed == 0 else None
            axes[0].plot(steps, [r.get("accuracy", math.nan) for r in recs], color=color, alpha=0.7, label=label)
            axes[1].plot(steps, [r["completions/mean_length"] for r in recs], color=color, alpha=0.7, label=label)
    axes[0].set_ylabel("accuracy of samples (T=1)")
    axes[1].set_ylabel("mean completion tokens (sampled)")
    for ax in axes:
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
