"""`densa align`: token-value RL (GRPO through TRL, reward = correctness + token-value term) or an offline
SimPO-style preference that prefers the shorter of two correct answers (docs/alignment.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from densa.align.config import load_recipe
from densa.commands.sft import write_markdown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="RECIPE",
                        help="recipe YAML with align: {method}, policy: {path: MODEL}, task:, grpo:/reward: or "
                             "preference: (e.g. recipes/align-arithmetic.yaml)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="run folder: model/, metrics.jsonl (progress, reward, length), align.png, result.json")
    parser.add_argument("--method", choices=["grpo", "simpo"], default=None,
                        help="override the recipe's align.method")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override a recipe field, e.g. grpo.steps=50, reward.length=gated (none, kimi, arora, "
                             "gated, shortest, truncation), grpo.dynamic_sampling=true, grpo.beta=0.04")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.config, args.overrides, method=args.method)
    if recipe.method == "sft":
        raise ValueError(f"{args.config}: set align.method to grpo or simpo (or pass --method); for SFT use densa sft")
    if not recipe.policy.path:
        raise ValueError(f"{args.config}: policy.path is not set; name the MODEL to align (e.g. a densa sft run's "
                         "model/ folder)")
    if recipe.method == "grpo":
        from densa.align.grpo import run_grpo

        result = run_grpo(recipe, args.out, progress=not args.no_progress)
    else:
        from densa.align.preference import run_preference

        result = run_preference(recipe, args.out, progress=not args.no_progress)
    write_markdown(Path(args.out), f"densa align ({recipe.method})", result)
    h = result["heldout"]
    print(f"{recipe.method} {result['steps']} steps -> {result['model']}; held-out greedy accuracy "
          f"{h['accuracy']:.1%}, {h['mean_tokens']:.1f} output tokens, Token Value {h['token_value_per_1k']:.1f} "
          "correct / 1k tokens")
