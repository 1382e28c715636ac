"""`densa study NAME`: experiments that test densa's claims at equal compute and commit their evidence.

Each study module has `run(args: argparse.Namespace, out: Path) -> dict` which trains/evaluates what it needs, writes
its plots and any detail files under `out`, and returns the flat object of headline figures that `--json FILE`
receives (key names documented in the study's docs page). `--quick` is a reduced version that finishes in minutes on
2 CPU cores and measures the same figures; the full results are committed as docs/results/<study>.json.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from densa.report.flat import emit

STUDIES: dict[str, tuple[str, str]] = {
    "high-value-tokens": ("densa.study.high_value_tokens",
                          "uniform vs selective (Rho-1) vs value-curriculum training at equal FLOPs"),
    "token-value": ("densa.study.token_value", "SFT vs correctness RL vs token-value RL vs truncation"),
    "moefy": ("densa.study.moefy", "a dense model converted to dynamic experts at several FFN budgets"),
    "iso-flop": ("densa.study.iso_flop", "densa vs dense vs top-k MoE (and ablations) at equal training FLOPs"),
    "inference-density": ("densa.study.inference_density",
                          "which recipe gives the most quality per inference FLOP, ms and $ at equal training FLOPs"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=list(STUDIES), help="; ".join(f"{k}: {v[1]}" for k, v in STUDIES.items()))
    parser.add_argument("--quick", action="store_true", help="reduced version that finishes in minutes")
    parser.add_argument("--json", metavar="FILE", help="write the headline figures as a flat JSON object")
    parser.add_argument("--out", metavar="DIR", required=True, help="folder for runs, plots and detail files")
    parser.add_argument("--config", metavar="RECIPE", help="study recipe YAML (each study has a default)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the study's, usually 3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a recipe field, e.g. train.steps=100 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> None:
    module = importlib.import_module(STUDIES[args.name][0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = {**module.run(args, out), "study": args.name, "quick": args.quick,
              "wall_s": round(time.perf_counter() - start, 1)}
    (out / "summary.json").write_text(emit(result, args.json))
