"""`densa bench prefill`: time to first token (one forward over the prompt into a fresh cache, last position's
logits) vs prompt length, batch 1 and 8, densa / its dense twin / transformers' Llama, eager and compiled.

Same models, modes and best-form rule as `densa bench decode` (densa/bench/decode.py, densa/bench/modes.py); with
`--model smollm2-135m` the real model beside llama.cpp (densa/bench/smollm2.py). Each case: one untimed warm-up
prefill, then the median of `reps` timed ones. Roofline: prompt FLOPs (T · the analytic per-token average at T)
over time ÷ the measured matmul peak (`_flops_frac`); prefill is compute-bound, so that is the figure that matters.
Keys: `{kind}_{mode}_b{B}_{T}_ms` (+ roofline keys), best form `{kind}_ttft_ms_b{B}_{T}`,
`ttft_densa_vs_dense_at_{T}` (batch 1) and `_b8`, `ttft_densa_vs_hf_at_{T}`.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from densa.bench import roofline
from densa.bench.decode import BATCHES, KINDS, build_model, dense_twin, label
from densa.bench.modes import MODES, compile_switch, decoder, prepare
from densa.config import ModelConfig, from_preset
from densa.counting import flops_per_token

PROMPTS = (128, 512, 2048)
QUICK_PROMPTS = (128, 512)


@torch.no_grad()
def time_prefill(dec, ids_BT: torch.Tensor, reps: int) -> float:
    dec.prefill(ids_BT)  # warm-up (and the compile, in compiled mode)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dec.prefill(ids_BT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_cases(cfg: ModelConfig, prompts: tuple[int, ...], reps: int, kinds: tuple[str, ...] = KINDS,
              modes: tuple[str, ...] = MODES, batches: tuple[int, ...] = BATCHES) -> dict[str, float | int | str]:
    dense_cfg = dense_twin(cfg)
    limits = roofline.machine_limits()
    configs = {"densa": cfg, "dense": dense_cfg, "hf": dense_cfg}
    result: dict[str, float | int | str] = {
        "threads": torch.get_num_threads(), "dtype": "float32", "reps": reps, "modes": ",".join(modes),
        "batches": ",".join(map(str, batches)), "compile_switch": compile_switch(),
        "dense_intermediate_size": dense_cfg.intermediate_size, **limits}
    max_len = max(prompts) + 1
    for mode in modes:
        models = {kind: build_model(kind, cfg, max_len, dense_cfg) for kind in kinds}
        for model in models.values():
            prepare(model, mode)
        decoders = {kind: decoder(kind, model, mode, max_len) for kind, model in models.items()}
        for batch in batches:
            for T in prompts:
                ids_BT = torch.randint(0, cfg.vocab_size, (batch, T), generator=torch.Generator().manual_seed(T))
                for kind, dec in decoders.items():
                    seconds = time_prefill(dec, ids_BT, reps)
                    case = f"{kind}_{mode}_b{batch}_{label(T)}"
                    result[f"{case}_ms"] = round(1000 * seconds, 2)
                    flops = batch * T * flops_per_token(configs[kind], T).total
                    bytes_ = roofline.step_bytes(configs[kind], T, batch)  # weights once + the cache written
                    result.update(roofline.report(case, flops, bytes_, seconds, limits))
                    print(f"  {kind:5s} {mode:8s} batch={batch} prompt={T:5d}  {1000 * seconds:9.1f} ms  "
                          f"{result[f'{case}_flops_frac']:.1%} of peak FLOP/s", file=sys.stderr, flush=True)
    for batch in batches:
        suffix = "" if batch == 1 else f"_b{batch}"
        for T in prompts:
            for kind in kinds:
                times = {mode: result[f"{kind}_{mode}_b{batch}_{label(T)}_ms"] for mode in modes}
                best = min(times, key=times.get)
                result[f"{kind}_ttft_ms_b{batch}_{label(T)}"] = times[best]
                result[f"{kind}_best_mode_b{batch}_{label(T)}"] = best
            for other in ("dense", "hf"):
                if "densa" in kinds and other in kinds:
                    result[f"ttft_densa_vs_{other}_at_{label(T)}{suffix}"] = round(
                        result[f"densa_ttft_ms_b{batch}_{label(T)}"] / result[f"{other}_ttft_ms_b{batch}_{label(T)}"],
                        4)
    return result


def run(quick: bool, modes: tuple[str, ...] | None = None, model: str | None = None) -> dict[str, float | int | str]:
    if model is not None:
        from densa.bench import smollm2

        return smollm2.run(model, quick, modes or (("eager",) if quick else MODES))
    modes = modes or (("eager",) if quick else MODES)
    prompts, reps = (QUICK_PROMPTS, 2) if quick else (PROMPTS, 5)
    print(f"bench prefill: cpu-small-moe vs its dense twin vs transformers Llama, prompts {prompts}, batches "
          f"{BATCHES}, modes {modes}, median of {reps}", file=sys.stderr, flush=True)
    return run_cases(from_preset("cpu-small-moe"), prompts, reps, modes=modes)
