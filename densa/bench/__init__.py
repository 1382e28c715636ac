"""`densa bench NAME`: micro-benchmarks that measure ratios in one run and write them as flat JSON.

Each benchmark module has `run(quick: bool) -> dict[str, float | ...]`; the key names are documented in
docs/benchmarks.md. Speed goals are checked here, never in timed unit tests (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import time

from densa import malloc
from densa.report.flat import emit

BENCHES: dict[str, tuple[str, str]] = {
    "attention": ("densa.bench.attention", "one mixer layer, forward+backward: densa vs full causal attention"),
    "decode": ("densa.bench.decode", "ms per generated token vs context, batch 1 and 8, eager and compiled: densa, "
                                     "its dense twin, transformers Llama (--model smollm2-135m: vs llama.cpp)"),
    "prefill": ("densa.bench.prefill", "time to first token vs prompt length, eager and compiled: densa, its dense "
                                       "twin, transformers Llama (--model smollm2-135m: vs llama.cpp)"),
    "train": ("densa.bench.train", "training tokens/s and MFU: densa, dense baseline, transformers Llama"),
    "moe": ("densa.bench.moe", "one MoE layer, forward+backward: densa dispatch vs transformers Mixtral vs dense"),
    "serve": ("densa.bench.serve", "a live `densa serve`: tokens/s, TTFT and ms/token at concurrency 1, 4 and 8"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=list(BENCHES), help="; ".join(f"{k}: {v[1]}" for k, v in BENCHES.items()))
    parser.add_argument("--quick", action="store_true", help="reduced sizes that finish in about a minute")
    parser.add_argument("--json", metavar="FILE", help="write the measured figures as a flat JSON object")
    parser.add_argument("--modes", metavar="LIST", help="comma-separated eager,compiled (decode, prefill, attention, "
                        "train; default: both, --quick: eager)")
    parser.add_argument("--model", metavar="MODEL", help="decode / prefill: a real model instead of the synthetic "
                        "trio, beside llama.cpp on the same GGUF (smollm2-135m)")


def main(args: argparse.Namespace) -> None:
    module = importlib.import_module(BENCHES[args.name][0])
    accepts = inspect.signature(module.run).parameters
    options: dict[str, object] = {}
    if args.modes:
        modes = tuple(args.modes.split(","))
        if "modes" not in accepts or not set(modes) <= {"eager", "compiled"}:
            raise SystemExit(f"--modes {args.modes}: `densa bench {args.name}` takes "
                             f"{'eager and/or compiled' if 'modes' in accepts else 'no --modes'}")
        options["modes"] = modes
    if args.model:
        if "model" not in accepts:
            raise SystemExit("--model: only `densa bench decode` and `densa bench prefill` take a model")
        options["model"] = args.model
    start = time.perf_counter()
    result = {**module.run(quick=args.quick, **options), "quick": args.quick, "malloc": malloc.STATUS,
              "wall_s": round(time.perf_counter() - start, 1)}  # every bench's JSON says how it was run
    emit(result, args.json)
