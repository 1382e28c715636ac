"""`densa bench train`: training tokens/s and MFU of cpu-small densa, its dense baseline and transformers'
`LlamaForCausalLM` of the dense baseline's shape (densa/bench/decode.py builds all three), in one run.

Choices (docs/training.md §6 has the measured figures):
- All three run the same optimizer step as `densa train` (densa/train/loop.py): forward with labels = input_ids,
  backward, global-norm clipping at 1.0, AdamW with densa's parameter groups, `update_routing()` for densa models.
- Same random tokens for all, fp32 (or bf16 autocast with `bf16=True`), torch's default thread count.
- The models take turns step by step, so their timings share the machine's state; tokens/s is batch·context over the
  median step time after `warmup` untimed steps. MFU divides analytic training FLOPs (densa.counting, the dense
  baseline's for hf) by the measured matmul peak (densa/train/peak.py).
- Goals (checked by reading the JSON, not in unit tests): `ratio_tokens_per_s` = densa/dense >= 0.8,
  `dense_vs_hf` = dense/hf >= 1.0.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch import Tensor, nn

from densa.bench.decode import KINDS, build_model
from densa.config import ModelConfig, from_preset
from densa.counting import flops_per_token
from densa.train.config import TrainConfig
from densa.train.optim import build_optimizers
from densa.train.peak import peak_flops


def step_seconds(model: nn.Module, optimizers: list[torch.optim.Optimizer], batch: Tensor, bf16: bool) -> float:
    """Wall time of one optimizer step on `batch` (B, T+1)."""
    start = time.perf_counter()
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = model(batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    if hasattr(model, "update_routing"):
        model.update_routing()
    return time.perf_counter() - start


def run_cases(cfg: ModelConfig, batch_size: int, context: int, steps: int, warmup: int = 2, bf16: bool = False,
              kinds: tuple[str, ...] = KINDS, peak: float | None = None) -> dict[str, float | int | str]:
    """Flat keys `{kind}_tokens_per_s`, `{kind}_mfu`, `{kind}_params`, and the two ratios."""
    peak = peak if peak is not None else peak_flops(bf16)
    result: dict[str, float | int | str] = {"threads": torch.get_num_threads(), "batch_size": batch_size,
                                            "context": context, "steps": steps, "warmup_steps": warmup,
                                            "dtype": "bf16-autocast" if bf16 else "float32", "peak_flops": peak}
    train_cfg = TrainConfig(data="(bench)", lr=1e-3)
    models = {kind: build_model(kind, cfg, context + 1).train() for kind in kinds}
    optimizers = {kind: build_optimizers(model, train_cfg) for kind, model in models.items()}
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for i in range(warmup + steps):
        batch = torch.randint(0, cfg.vocab_size, (batch_size, context + 1), generator=generator)
        for kind, model in models.items():
            seconds = step_seconds(model, optimizers[kind], batch, bf16)
            if i >= warmup:
                times[kind].append(seconds)
    for kind, model in models.items():
        tokens_per_s = batch_size * context / statistics.median(times[kind])
        flops = flops_per_token(cfg if kind == "densa" else cfg.replace(mixer="attention"), context).training
        result[f"{kind}_params"] = sum(p.numel() for p in model.parameters())
        result[f"{kind}_tokens_per_s"] = round(tokens_per_s, 1)
        result[f"{kind}_mfu"] = round(flops * tokens_per_s / peak, 4)
        print(f"  {kind:5s} {tokens_per_s:9,.0f} tokens/s  MFU {result[f'{kind}_mfu']:.1%}", file=sys.stderr)
    if "densa" in kinds and "dense" in kinds:
        result["ratio_tokens_per_s"] = round(result["densa_tokens_per_s"] / result["dense_tokens_per_s"], 4)
    if "dense" in kinds and "hf" in kinds:
        result["dense_vs_hf"] = round(result["dense_tokens_per_s"] / result["hf_tokens_per_s"], 4)
    return result


def run(quick: bool) -> dict[str, float | int | str]:
    batch_size, context, steps = (4, 256, 3) if quick else (8, 512, 8)
    print(f"bench train: cpu-small, batch {batch_size}x{context}, {steps} timed steps after 2 warm-up steps",
          file=sys.stderr, flush=True)
    return run_cases(from_preset("cpu-small"), batch_size, context, steps)
