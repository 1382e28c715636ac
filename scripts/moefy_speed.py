"""Speed of a finished `densa study moefy` run's 50% variants, measured again on a quiet machine (docs/moefy.md).

    python scripts/moefy_speed.py --run DIR --json FILE [--rounds 3]

The study times each variant while it runs, which on a shared machine compares measurements made minutes apart
under different loads. This script times, in one process and taking turns, the original (`model` of the run's
config), the run's 50% MoE headline (the best validation bits/byte, saved in `DIR/models/<variant>`) and TEAL at
sparsity 0.5 (thresholds calibrated again on the study's calibration windows: deterministic), each through the fast
path the study uses (`densa.moefy.measure.ms_per_token`), and keeps each model's fastest round. Speedups are the
original's ms/token over the variant's, as in the study's `prefill_speedup_at_half_ffn` / `decode_speedup_...`.
`--looped` also times the headline with its batch-1 experts on the looped path (`Experts.reduce_decode = False`:
one `F.linear` per chosen expert, the eager decode path before the compiled gather-reductions), as
`<variant>-looped`. Each model runs once before the timed rounds (the first call compiles the MoE decode kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from densa import malloc
from densa.model.moe import Experts
from densa.moefy import teal
from densa.moefy.calibrate import calibration_windows, corpus_text, encode
from densa.moefy.measure import ms_per_token
from densa.resolve import resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="the study's --out folder (state.json, models/)")
    parser.add_argument("--json", required=True, type=Path, help="where to write the figures")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds; each model keeps its fastest")
    parser.add_argument("--looped", action="store_true", help="also time the headline on the looped expert path")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    malloc.tune()  # as the `densa` command does (densa/malloc.py)
    state = json.loads((args.run / "state.json").read_text())
    cfg = state["config"]
    halves = {name: row["val_bpb"] for name, row in state["rows"].items()
              if row.get("budget") == 0.5 and row.get("split") not in (None, "teal")}
    if not halves:
        raise SystemExit(f"{args.run}/state.json holds no 50% MoE variant")
    best = min(halves, key=halves.get)  # the study's headline: the best validation bits/byte at 50%
    saved = [args.run / "models" / best]
    if not saved[0].is_dir():
        raise SystemExit(f"{saved[0]}: the study did not save its 50% headline variant (benchmarks off?)")
    original = resolve(cfg["model"])
    tok = original.tokenizer
    ids = encode(tok, corpus_text("gutenberg", "valid", 8 * 512))[:512]  # the study's held-out Gutenberg text
    windows = calibration_windows(tok, "gutenberg", cfg["calib_tokens"], cfg["window"])
    models = {"dense": original.model, "teal-b50": teal.teal_model(original.model,
                                                                    teal.calibrate(original.model, windows, 0.5))}
    models |= {path.name: resolve(str(path)).model for path in saved}
    reduce = dict.fromkeys(models, True)
    if args.looped:
        models[f"{saved[0].name}-looped"], reduce[f"{saved[0].name}-looped"] = models[saved[0].name], False
    best: dict[str, dict[str, float]] = {}
    for warm_up in [True] + [False] * args.rounds:
        for name, model in models.items():
            cpu0, wall0 = time.process_time(), time.perf_counter()
            Experts.reduce_decode = reduce[name]
            try:
                ms = ms_per_token(model, ids, repeats=1)
            finally:
                Experts.reduce_decode = True
            if warm_up:
                continue
            busy = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
            print(f"{name}: prefill {ms['prefill_ms_per_token']:.2f} ms/token, decode {ms['decode_ms_per_token']:.2f}"
                  f" ms/token (CPU busy x{busy:.2f} of {torch.get_num_threads()} threads)", flush=True)
            for key, value in ms.items():
                best.setdefault(name, {})[key] = min(value, best.get(name, {}).get(key, float("inf")))
    result: dict[str, object] = {"run": str(args.run), "threads": torch.get_num_threads(), "rounds": args.rounds,
                                 "malloc": malloc.STATUS}
    for name, ms in best.items():
        result |= {f"{name}_{key}": round(value, 3) for key, value in ms.items()}
        if name != "dense":
            for what in ("prefill", "decode"):
                result[f"{name}_{what}_speedup"] = round(best["dense"][f"{what}_ms_per_token"]
                                                         / ms[f"{what}_ms_per_token"], 3)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
