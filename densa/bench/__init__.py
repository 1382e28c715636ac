"""`densa bench NAME`: micro-benchmarks that measure ratios in one run and write them as flat JSON.

Each benchmark module has `run(quick: bool) -> dict[str, float | ...]`; the key names are documented in
docs/benchmarks.md. Speed goals are checked here, never in timed unit tests (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import importlib
import time

from densa.report.flat import emit

BENCHES: dict[str, tuple[str, str]] = {
    "attention": ("densa.bench.attention", "one mixer layer, forward+backward: densa vs full causal attention"),
    "decode": ("densa.bench.decode", "ms per generated token vs context length: densa, dense, transformers Llama"),
    "train": ("densa.bench.train", "training tokens/s and MFU: densa, dense baseline, transformers Llama"),
    "moe": ("densa.bench.moe", "one MoE layer, forward+backward: densa dispatch vs transformers Mixtral vs dense"),
    "serve": ("densa.bench.serve", "a live `densa serve`: tokens/s, TTFT and ms/token at concurrency 1, 4 and 8"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=list(BENCHES), help="; ".join(f"{k}: {v[1]}" for k, v in BENCHES.items()))
    parser.add_argument("--quick", action="store_true", help="reduced sizes that finish in about a minute")
    parser.add_argument("--json", metavar="FILE", help="write the measured figures as a flat JSON object")


def main(args: argparse.Namespace) -> None:
    module = importlib.import_module(BENCHES[args.name][0])
    start = time.perf_counter()
    result = {**module.run(quick=args.quick), "quick": args.quick,
              "wall_s": round(time.perf_counter() - start, 1)}  # every bench's JSON says how it was run
    emit(result, args.json)
