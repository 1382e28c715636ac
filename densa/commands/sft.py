"""`densa sft`: chat-formatted supervised fine-tuning, loss on assistant tokens only (docs/alignment.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from densa.align.config import load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="RECIPE",
                        help="recipe YAML with policy:, task: and sft: sections (e.g. recipes/sft-arithmetic.yaml)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="run folder: model/ (a MODEL for densa align/eval), metrics.jsonl, sft.png, result.json")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override a recipe field, e.g. sft.steps=100 or policy.path=smollm2-135m (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> None:
    from densa.align.sft import run_sft  # heavy imports (trl) only when the command runs

    recipe = load_recipe(args.config, args.overrides, method="sft")
    result = run_sft(recipe, args.out, progress=not args.no_progress)
    write_markdown(Path(args.out), "densa sft", result)
    h = result["heldout"]
    print(f"SFT {result['steps']} steps -> {result['model']}; held-out greedy accuracy {h['accuracy']:.1%}, "
          f"{h['mean_tokens']:.1f} output tokens, Token Value {h['token_value_per_1k']:.1f} correct / 1k tokens")


def write_markdown(out: Path, title: str, result: dict) -> None:
    """result.md beside result.json: the held-out figures as a table."""
    h = result["heldout"]
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in h.items())
    (out / "result.md").write_text(f"# {title}\n\nmodel: `{result['model']}`\n\n| held-out (greedy) | value |\n"
                                   f"|---|---|\n{rows}\n\n```json\n{json.dumps(result, indent=2)}\n```\n")
