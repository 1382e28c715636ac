"""`densa bench decode`: milliseconds per generated token (batch 1, cached decoding) vs context length.

Choices (docs/benchmarks.md explains them with the measured figures):
- Models, all random-init, fp32, eval mode, under `torch.no_grad()`, torch's default thread count for all three
  (recorded as `threads`):
    densa: `from_preset("cpu-small")` (Mega mixer: EMA state + the K/V of the current 256-token chunk per layer)
    dense: `from_preset("cpu-small", mixer="attention")` (Llama-style, growing K/V cache)
    hf:    transformers' `LlamaForCausalLM` from a `LlamaConfig` with the dense baseline's width, depth, heads,
           intermediate size, vocabulary and tied embeddings (SDPA attention, a `DynamicCache`); nothing is
           downloaded.
- For each context length: prefill a random context of that length (one forward, not timed), then run `warmup`
  single-token steps and time `steps` more, one wall-clock measurement per step; ms/token is the median step.
  Every step computes the full next-token logits; all models see the same token ids.
- Context lengths are multiples of the 256-token chunk, so densa's timed steps sit at the same place in a chunk
  (positions 0..steps+warmup) at every length and `densa_growth` compares like with like.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from densa.config import ModelConfig, from_preset
from densa.model.model import DensaModel

CONTEXTS = (256, 1024, 4096, 8192)
QUICK_CONTEXTS = (256, 1024, 4096)
KINDS = ("densa", "dense", "hf")
Step = Callable[[Tensor], None]


def build_model(kind: str, cfg: ModelConfig, max_len: int) -> nn.Module:
    """`kind` in KINDS; `cfg` is the densa config, whose dense twin (and its HF Llama copy) is built for the others."""
    torch.manual_seed(0)
    if kind == "densa":
        return DensaModel(cfg).eval()
    dense_cfg = cfg.replace(mixer="attention")
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


def _prefill(kind: str, model: nn.Module, context_BT: Tensor) -> Step:
    """Run the context through `model` and return a function that decodes one more token with the cache."""
    if kind == "hf":
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        model(input_ids=context_BT, cache=cache, use_cache=True, logits_to_keep=1)
        return lambda tok_B1: model(input_ids=tok_B1, cache=cache, use_cache=True)
    cache = model.new_cache()
    model(context_BT, cache=cache)
    return lambda tok_B1: model(tok_B1, cache=cache)


@torch.no_grad()
def ms_per_token(kind: str, model: nn.Module, context: int, steps: int, warmup: int) -> tuple[float, float]:
    """Median wall-clock ms of one cached decoding step after prefilling `context` random tokens, and the CPU
    seconds per wall second over the timed steps (well below the thread count: the machine was shared)."""
    gen = torch.Generator().manual_seed(context)
    vocab = model.config.vocab_size
    ids_BT = torch.randint(0, vocab, (1, context + warmup + steps), generator=gen)  # same ids for every model
    step = _prefill(kind, model, ids_BT[:, :context])
    times, cpu_start = [], 0.0
    for i in range(warmup + steps):
        tok_B1 = ids_BT[:, context + i : context + i + 1]
        if i == warmup:
            cpu_start = time.process_time()
        start = time.perf_counter()
        step(tok_B1)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), (time.process_time() - cpu_start) / sum(times)


def run_cases(cfg: ModelConfig, contexts: tuple[int, ...], steps: int, warmup: int = 4,
              kinds: tuple[str, ...] = KINDS) -> dict[str, float | int | str]:
    """ms/token of every model kind at every context; flat keys `{kind}_ms_per_token_{context}`."""
    result: dict[str, float | int | str] = {"threads": torch.get_num_threads(), "batch_size": 1, "dtype": "float32",
                                            "steps": steps, "warmup_steps": warmup}
    max_len = max(contexts) + warmup + steps
    models = {kind: build_model(kind, cfg, max_len) for kind in kinds}
    for kind, model in models.items():
        result[f"{kind}_params"] = sum(p.numel() for p in model.parameters())
    for context in contexts:  # the models take turns at each context, so the ratios compare close-in-time runs
        for kind, model in models.items():
            ms, cpu_util = ms_per_token(kind, model, context, steps, warmup)
            result[f"{kind}_ms_per_token_{context}"] = round(ms, 3)
            print(f"  {kind:5s} context={context:5d}  {ms:7.2f} ms/token  (CPU busy x{cpu_util:.2f} of "
                  f"{result['threads']} threads)", file=sys.stderr, flush=True)
    lo, hi = min(contexts), max(contexts)
    result["max_ctx"] = hi
    for kind in kinds:  # ms/token at the longest context over the shortest (1.0 = flat)
        result[f"{kind}_growth"] = round(result[f"{kind}_ms_per_token_{hi}"] / result[f"{kind}_ms_per_token_{lo}"], 4)
    for other in ("hf", "dense"):
        if "densa" in kinds and other in kinds:
            result[f"densa_vs_{other}_at_max_ctx"] = round(
                result[f"densa_ms_per_token_{hi}"] / result[f"{other}_ms_per_token_{hi}"], 4)
    return result


def run(quick: bool) -> dict[str, float | int | str]:
    contexts, steps = (QUICK_CONTEXTS, 16) if quick else (CONTEXTS, 32)
    print(f"bench decode: cpu-small, contexts {contexts}, {steps} timed steps after 4 warm-up steps",
          file=sys.stderr, flush=True)
    return run_cases(from_preset("cpu-small"), contexts, steps)
