"""glibc's default malloc against densa's settings (densa/malloc.py) on `densa train`'s step, one model per process.

    python scripts/malloc_ab.py [--rounds 2] [--steps 6] [--json docs/results/malloc.json]

Each measurement is a fresh process that trains one model (cpu-small-moe densa, or its dense twin; batch 8 x 512,
fp32, the optimizer step of `densa bench train`) for `--steps` timed steps after 2 warm-up steps, with the allocator
either left as glibc's default (`DENSA_MALLOC=system`) or tuned as the `densa` command does. It reports the median
tokens/s, the minor page faults per timed step and the peak resident memory. Processes alternate (system, tuned) per
model and round, so both settings share the machine's state; the JSON keeps every process's figures.
One model per process, as `densa train` runs: `densa bench train` interleaves three models in one process, and
there one model's frees move glibc's adaptive mmap threshold for the others (docs/benchmarks.md, "Allocator").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

KINDS = ("densa", "dense")


def child(kind: str, steps: int) -> dict[str, float | str]:
    """Train `kind` in this process; the figures as a dict."""
    from densa import malloc

    status = malloc.tune()
    import torch

    from densa.bench.decode import build_model
    from densa.bench.train import step_seconds
    from densa.config import from_preset
    from densa.train.config import TrainConfig
    from densa.train.optim import build_optimizers

    cfg = from_preset("cpu-small-moe")
    model = build_model(kind, cfg, 513).train()
    optimizers = build_optimizers(model, TrainConfig(data="(bench)", lr=1e-3))
    generator = torch.Generator().manual_seed(0)
    seconds, faults = [], 0
    for i in range(2 + steps):
        batch = torch.randint(0, cfg.vocab_size, (8, 513), generator=generator)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        elapsed = step_seconds(model, optimizers, batch, False)
        if i >= 2:
            seconds.append(elapsed)
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {"malloc": status, "tokens_per_s": round(8 * 512 / statistics.median(seconds), 1),
            "faults_per_step": faults // steps, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="processes per model and setting")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    runs: list[dict[str, object]] = []
    for round_ in range(args.rounds):
        for kind in KINDS:
            for setting in ("system", "tuned"):
                env = {k: v for k, v in os.environ.items() if k != "DENSA_MALLOC"}
                if setting == "system":
                    env["DENSA_MALLOC"] = "system"
                out = subprocess.run([sys.executable, __file__, "--child", kind, "--steps", str(args.steps)],
                                     env=env, capture_output=True, text=True, check=True).stdout
                runs.append({"round": round_, "kind": kind, "setting": setting, **json.loads(out.splitlines()[-1])})
                print(json.dumps(runs[-1]), flush=True)
    result: dict[str, object] = {"steps": args.steps, "rounds": args.rounds, "runs": runs}
    for kind in KINDS:
        for setting in ("system", "tuned"):
            rows = [r for r in runs if r["kind"] == kind and r["setting"] == setting]
            result[f"{kind}_{setting}_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rows)
            result[f"{kind}_{setting}_faults_per_step"] = statistics.median(r["faults_per_step"] for r in rows)
            result[f"{kind}_{setting}_maxrss_mb"] = max(r["maxrss_mb"] for r in rows)
        result[f"{kind}_tuned_vs_system"] = round(result[f"{kind}_tuned_tokens_per_s"]
                                                  / result[f"{kind}_system_tokens_per_s"], 3)
    result["ratio_densa_vs_dense_system"] = round(result["densa_system_tokens_per_s"]
                                                  / result["dense_system_tokens_per_s"], 3)
    result["ratio_densa_vs_dense_tuned"] = round(result["densa_tuned_tokens_per_s"]
                                                 / result["dense_tuned_tokens_per_s"], 3)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
