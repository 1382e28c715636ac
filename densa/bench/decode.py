"""`densa bench decode`: milliseconds per generated token (cached decoding) vs context length, batch 1 and 8, every
model eager and compiled; `--model smollm2-135m` instead runs a real model beside llama.cpp (densa/bench/smollm2.py).

Choices (docs/benchmarks.md explains them with the measured figures):
- Models, random-init, fp32, eval mode, under `torch.no_grad()`, torch's default thread count (`threads`):
    densa: `from_preset("cpu-small-moe")`, the full recipe (Mega mixer + dynamic MoE, 16.8M parameters, 6.3M active)
    dense: its dense twin of the *same active parameters* (`dense_twin`: Llama-style attention mixer, SwiGLU FFN
           widened to match densa's active count; `dense_intermediate_size` says how wide)
    hf:    transformers' `LlamaForCausalLM` with the dense twin's shape; nothing is downloaded.
- Modes (densa/bench/modes.py): eager (linears on oneDNN-packed weights for all three) and compiled (densa's
  compile switch, or torch.compile with freezing until it exists; transformers with its StaticCache +
  torch.compile). Ratios compare best form with best form: each model's faster mode at that case.
- For each case: prefill a random context (one forward, not timed), run `warmup` single-token steps, time `steps`
  more one by one; ms/token is the median step (a batch-8 step produces 8 tokens but is reported per step, as each
  sequence sees it). Every step computes the full next-token logits; all models see the same token ids.
- Roofline (densa/bench/roofline.py): each case's achieved FLOP/s ÷ the measured matmul peak (`_flops_frac`) and
  bytes read per step ÷ time ÷ the measured read bandwidth (`_bw_frac`).
- Context lengths are multiples of the 256-token chunk, so densa's timed steps sit at the same place in a chunk.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from torch import nn

from densa.bench import roofline
from densa.bench.modes import MODES, compile_switch, decoder, prepare
from densa.config import ModelConfig, from_preset
from densa.counting import count_parameters
from densa.model.model import DensaModel

CONTEXTS = (256, 1024, 4096, 8192)
QUICK_CONTEXTS = (256, 1024)
BATCHES = (1, 8)
KINDS = ("densa", "dense", "hf")


def label(context: int) -> str:
    """Key suffix of a context length: 256, 1k, 4k, 8k."""
    return f"{context // 1024}k" if context % 1024 == 0 else str(context)


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """The dense Llama-style model with about `cfg`'s active parameters: attention mixer, SwiGLU FFN whose width
    makes the parameter count match densa's active count (a non-MoE `cfg` only swaps the mixer)."""
    base = cfg.replace(mixer="attention", ffn="swiglu")
    if cfg.ffn == "swiglu":
        return cfg.replace(mixer="attention")
    target = count_parameters(DensaModel(cfg)).active
    have = count_parameters(DensaModel(base)).total
    per_unit = 3 * cfg.hidden_size * cfg.num_hidden_layers  # SwiGLU parameters per unit of intermediate width
    width = base.intermediate_size + round((target - have) / per_unit)
    return base.replace(intermediate_size=max(8, width))


def build_model(kind: str, cfg: ModelConfig, max_len: int, dense_cfg: ModelConfig | None = None) -> nn.Module:
    """`kind` in KINDS; `cfg` is densa's config; the others are built from `dense_cfg` (default: `cfg` with the
    attention mixer, the plain dense baseline)."""
    torch.manual_seed(0)
    if kind == "densa":
        return DensaModel(cfg).eval()
    dense_cfg = dense_cfg or cfg.replace(mixer="attention")
    if kind == "dense":
        return DensaModel(dense_cfg).eval()
    if kind == "hf":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_cfg = LlamaConfig(vocab_size=dense_cfg.vocab_size, hidden_size=dense_cfg.hidden_size,
                             intermediate_size=dense_cfg.intermediate_size,
                             num_hidden_layers=dense_cfg.num_hidden_layers,
                             num_attention_heads=dense_cfg.num_attention_heads,
                             num_key_value_heads=dense_cfg.num_key_value_heads, max_position_embeddings=max_len,
                             rms_norm_eps=dense_cfg.rms_norm_eps, rope_theta=dense_cfg.rope_theta,
                             tie_word_embeddings=dense_cfg.tie_word_embeddings, use_cache=True)
        return LlamaForCausalLM(hf_cfg).eval()
    raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


@torch.no_grad()
def time_steps(dec, ids_BT: torch.Tensor, context: int, steps: int, warmup: int) -> tuple[float, float]:
    """Median seconds of one decode step after prefilling `context` tokens of `ids_BT`, and the CPU seconds per wall
    second over the timed steps only (a compile during prefill or warm-up runs in inductor's worker processes, whose
    CPU time is not this process's, so counting it would read as a busy machine)."""
    dec.prefill(ids_BT[:, :context])
    times = []
    for i in range(warmup + steps):
        if i == warmup:
            cpu0, wall0 = time.process_time(), time.perf_counter()
        start = time.perf_counter()
        dec.step(ids_BT[:, context + i : context + i + 1])
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), (time.process_time() - cpu0) / (time.perf_counter() - wall0)


def run_cases(cfg: ModelConfig, contexts: tuple[int, ...], steps: int, warmup: int = 4,
              kinds: tuple[str, ...] = KINDS, modes: tuple[str, ...] = MODES,
              batches: tuple[int, ...] = BATCHES) -> dict[str, float | int | str]:
    """Every kind × mode × batch × context. Keys: `{kind}_{mode}_ms_b{B}_{ctx}` and its roofline keys; best form
    `{kind}_ms_per_token_b{B}_{ctx}` (and `{kind}_ms_per_token_{ctx}` at batch 1); `densa_vs_dense_at_{ctx}` (batch
    1) and `densa_vs_dense_at_{ctx}_b8`; growth and `_at_max_ctx` ratios as before."""
    dense_cfg = dense_twin(cfg)
    limits = roofline.machine_limits()
    result: dict[str, float | int | str] = {
        "threads": torch.get_num_threads(), "dtype": "float32", "steps": steps, "warmup_steps": warmup,
        "modes": ",".join(modes), "batches": ",".join(map(str, batches)), "compile_switch": compile_switch(),
        "dense_intermediate_size": dense_cfg.intermediate_size, **limits}
    max_len = max(contexts) + warmup + steps
    configs = {"densa": cfg, "dense": dense_cfg, "hf": dense_cfg}
    for kind in kinds:  # hf has the dense twin's shape, so its counts
        counts = count_parameters(DensaModel(configs[kind]))
        result[f"{kind}_params"], result[f"{kind}_active_params"] = counts.total, counts.active
    for mode in modes:  # one set of models per mode: eager packs their linears, compiled wraps them
        models = {kind: build_model(kind, cfg, max_len, dense_cfg) for kind in kinds}
        for model in models.values():
            prepare(model, mode)
        for batch in batches:
            for context in contexts:  # the models take turns at each case, so ratios compare close-in-time runs
                gen = torch.Generator().manual_seed(context)
                ids_BT = torch.randint(0, cfg.vocab_size, (batch, context + warmup + steps), generator=gen)
                # each case reserves what it uses: a compiled dense step attends over its whole static buffer, so
                # one sized for the longest context would handicap the short ones (densa's ring is c slots anyway)
                case_len = context + warmup + steps
                decoders = {kind: decoder(kind, model, mode, case_len) for kind, model in models.items()}
                for kind, dec in decoders.items():
                    seconds, busy = time_steps(dec, ids_BT, context, steps, warmup)
                    case = f"{kind}_{mode}_b{batch}_{label(context)}"
                    result[f"{case}_ms"] = round(1000 * seconds, 3)
                    flops = batch * roofline.step_flops(configs[kind], context)
                    bytes_ = roofline.step_bytes(configs[kind], context, batch)
                    result[f"{case}_bytes_per_token"] = round(bytes_ / batch)
                    result.update(roofline.report(case, flops, bytes_, seconds, limits))
                    print(f"  {kind:5s} {mode:8s} batch={batch} context={context:5d}  {1000 * seconds:8.2f} ms/step"
                          f"  {result[f'{case}_flops_frac']:.1%} of peak FLOP/s, {result[f'{case}_bw_frac']:.0%} of "
                          f"bandwidth  (CPU busy x{busy:.2f} of {result['threads']} threads)", file=sys.stderr,
                          flush=True)
    _best_and_ratios(result, kinds, modes, batches, contexts)
    return result


def _best_and_ratios(result: dict, kinds: tuple[str, ...], modes: tuple[str, ...], batches: tuple[int, ...],
                     contexts: tuple[int, ...]) -> None:
    for kind in kinds:
        for batch in batches:
            for context in contexts:
                times = {mode: result[f"{kind}_{mode}_b{batch}_{label(context)}_ms"] for mode in modes}
                best = min(times, key=times.get)
                result[f"{kind}_ms_per_token_b{batch}_{label(context)}"] = times[best]
                result[f"{kind}_best_mode_b{batch}_{label(context)}"] = best
                if batch == 1:
                    result[f"{kind}_ms_per_token_{context}"] = times[best]
    lo, hi = min(contexts), max(contexts)
    result["max_ctx"] = hi
    for batch in batches:
        suffix = "" if batch == 1 else f"_b{batch}"
        for other in ("dense", "hf"):
            if "densa" not in kinds or other not in kinds:
                continue
            for context in contexts:
                densa = result[f"densa_ms_per_token_b{batch}_{label(context)}"]
                result[f"densa_vs_{other}_at_{label(context)}{suffix}"] = round(
                    densa / result[f"{other}_ms_per_token_b{batch}_{label(context)}"], 4)
            result[f"densa_vs_{other}_at_max_ctx{suffix}"] = result[f"densa_vs_{other}_at_{label(hi)}{suffix}"]
    if 1 in batches:
        for kind in kinds:  # ms/token at the longest context over the shortest (1.0 = flat)
            result[f"{kind}_growth"] = round(result[f"{kind}_ms_per_token_{hi}"] / result[f"{kind}_ms_per_token_{lo}"],
                                             4)


def run(quick: bool, modes: tuple[str, ...] | None = None, model: str | None = None) -> dict[str, float | int | str]:
    """The synthetic comparison, or with `model` (smollm2-135m) the real-model comparison with llama.cpp."""
    if model is not None:
        from densa.bench import smollm2

        return smollm2.run(model, quick, modes or (("eager",) if quick else MODES))
    modes = modes or (("eager",) if quick else MODES)
    contexts, steps = (QUICK_CONTEXTS, 8) if quick else (CONTEXTS, 32)
    print(f"bench decode: cpu-small-moe vs its dense twin vs transformers Llama, contexts {contexts}, batches "
          f"{BATCHES}, modes {modes}, {steps} timed steps after 4 warm-up steps", file=sys.stderr, flush=True)
    return run_cases(from_preset("cpu-small-moe"), contexts, steps, modes=modes)
