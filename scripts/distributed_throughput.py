"""Training tokens/s of one process against 2 gloo processes (DDP, FSDP2) on the same CPU, same recipe, same global
batch (docs/training.md, "Distributed"). Writes docs/results/distributed-throughput.{json,md}.

    flock /tmp/densa-heavy.lock .venv/bin/python scripts/distributed_throughput.py --data DIR [--steps 12]

DIR is any `densa prepare` folder (vocabulary <= 8192). Each case is `densa train` (under torchrun for 2 processes);
tokens/s is the mean of the metrics.jsonl windows after the first one (which holds the first, slow step). Every case
gets the machine's 2 cores: 1 process × 2 threads, 1 process × 1 thread, 2 processes × 1 thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # name, processes, threads per process, train.distributed
    ("1 process, 2 threads", 1, 2, "none"),
    ("1 process, 1 thread", 1, 1, "none"),
    ("2 processes × 1 thread, DDP", 2, 1, "ddp"),
    ("2 processes × 1 thread, FSDP2", 2, 1, "fsdp2"),
]


def run_case(procs: int, threads: int, mode: str, data: str, steps: int, out: Path) -> dict:
    args = ["-m", "densa.cli", "train", "--config", str(ROOT / "recipes" / "cpu-small-train.yaml"), "--out", str(out),
            "--no-progress", "--set", f"train.data={data}", "--set", f"train.steps={steps}",
            "--set", "train.log_interval=4", "--set", f"train.eval_interval={steps}",
            "--set", f"train.checkpoint_interval={steps}", "--set", f"train.distributed={mode}",
            "--set", "train.warmup_steps=2"]
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(procs)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    subprocess.run(launcher + args, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    steady = [r["tokens_per_s"] for r in train[1:]]
    return {"tokens_per_s": sum(steady) / len(steady), "losses": [r["loss"] for r in train], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a `densa prepare` folder")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per case (multiple of 4)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "distributed-throughput"),
                        help="output path without extension (.json and .md are written)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, procs, threads, mode) in enumerate(CASES):
            case = run_case(procs, threads, mode, args.data, args.steps, Path(tmp) / str(i))
            results.append({"case": name, "processes": procs, "threads_per_process": threads, "distributed": mode,
                            **case})
            print(f"{name}: {case['tokens_per_s']:,.0f} tokens/s", flush=True)
    doc = {"recipe": "recipes/cpu-small-train.yaml (batch 8 × 256 global)", "steps": args.steps,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
           "command": "flock /tmp/densa-heavy.lock .venv/bin/python scripts/distributed_throughput.py --data DIR",
           "results": results}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    rows = "\n".join(f"| {r['case']} | {r['tokens_per_s']:,.0f} | {r['losses'][-1]:.4f} |" for r in results)
    out.with_suffix(".md").write_text(f"# Distributed throughput ({doc['machine']})\n\n{doc['recipe']}, {args.steps} "
                                      f"steps; `{doc['command']}`\n\n| case | tokens/s | loss at the last step |\n"
                                      f"|---|---|---|\n{rows}\n")


if __name__ == "__main__":
    main()
