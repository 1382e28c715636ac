"""Seconds per SFT and per GRPO step of the token-value study's SmolLM2-135M arm, in fp32 and bf16 autocast
(docs/alignment.md, "CPU budget"): the arm's recipes at their batch sizes, a few steps each, nothing evaluated.

    python scripts/token_value_step_cost.py [--steps 4] [--precisions fp32,bf16] [--json FILE] [--out DIR]

SFT: recipes/sft-arithmetic-smollm2.yaml (8 examples per step), `--steps` steps; TRL's train_runtime / steps, so the
first step's warm-up is included. GRPO: the study's RL recipe from smollm2-135m itself (not an SFT model, so the
completions run long, near the 96-token cap: an upper end), 4 prompts x 4 samples, lr 2e-6; TRL's step_time per
step. Use the threads the study will use, on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from densa import malloc
from densa.align.config import load_recipe
from densa.align.grpo import run_grpo
from densa.align.logs import read_jsonl
from densa.align.sft import run_sft

SMALL = ["task.train_size=200", "task.heldout_size=4"]


def measure(steps: int, precisions: list[str], out: Path) -> dict:
    result: dict = {"threads": torch.get_num_threads(), "steps": steps, "malloc": malloc.STATUS}
    for precision in precisions:
        recipe = load_recipe("recipes/sft-arithmetic-smollm2.yaml", [f"sft.steps={steps}", "sft.log_interval=1",
                                                                     f"sft.precision={precision}", *SMALL])
        run_sft(recipe, out / f"sft-{precision}", progress=False, evaluate=False)
        logs = read_jsonl(out / f"sft-{precision}" / "metrics.jsonl")
        result[f"sft_{precision}_s_per_step"] = round(logs[-1]["train_runtime"] / steps, 2)
        result[f"sft_{precision}_loss"] = [round(r["loss"], 4) for r in logs if "loss" in r]
        print(f"sft {precision}: {result[f'sft_{precision}_s_per_step']} s/step", flush=True)
    for precision in precisions:
        recipe = load_recipe("recipes/align-token-value-study.yaml", [
            "policy.path=smollm2-135m", f"grpo.steps={steps}", "grpo.prompts_per_step=4", "grpo.num_generations=4",
            "grpo.lr=2e-6", "grpo.log_interval=1", f"grpo.precision={precision}", *SMALL], method="grpo")
        run_grpo(recipe, out / f"grpo-{precision}", progress=False, evaluate=False)
        logs = [r for r in read_jsonl(out / f"grpo-{precision}" / "metrics.jsonl") if "step_time" in r]
        result[f"grpo_{precision}_s_per_step"] = [round(r["step_time"], 1) for r in logs]
        result[f"grpo_{precision}_mean_completion_tokens"] = [round(r["completions/mean_length"], 1) for r in logs]
        print(f"grpo {precision}: {result[f'grpo_{precision}_s_per_step']} s/step", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="steps per run (default 4)")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    malloc.tune()  # as the `densa` command does (densa/malloc.py)
    if args.steps < 1 or not set(precisions) <= {"fp32", "bf16"}:
        parser.error("--steps must be >= 1 and --precisions a list of fp32, bf16")
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.steps, precisions, Path(args.out or tmp))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
