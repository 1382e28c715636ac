"""`densa bench train`: training tokens/s and MFU of cpu-small densa, its dense baseline and transformers'
`LlamaForCausalLM` of the dense baseline's shape (densa/bench/decode.py builds all three), in one run.

Choices (docs/training.md, 'Measured speed', has the measured figures):
- All three run the same optimizer step as `densa train` (densa/train/loop.py): forward with labels = input_ids,
  backward, global-norm clipping at 1.0, AdamW with densa's parameter groups, `update_routing()` for densa models.
- Same random tokens for all, fp32 (or bf16 autocast with `bf16=True`), torch's default thread count.
- The models take turns step by step, so their timings share the machine's state; tokens/s is batch·context over the
  median step time after `warmup` untimed steps. MFU divides analytic training FLOPs (densa.counting, the dense
  baseline's for hf) by the measured matmul peak (densa/train/peak.py).
- Modes: eager, and compiled (`torch.compile` of each model's training forward; densa's switch in
  densa/model/compile.py covers inference steps only). `{kind}_{mode}_tokens_per_s` per mode, `{kind}_tokens_per_s`
  / `_mfu` the faster mode (best with best); compile time is spent in the warm-up steps.
- Goals (checked by reading the JSON, not in unit tests): `ratio_tokens_per_s` = densa/dense >= 0.8,
  `dense_vs_hf` = dense/hf >= 1.0.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from densa.bench.decode import KINDS, build_model
from densa.config import ModelConfig, from_preset
from densa.counting import flops_per_token
from densa.train.config import TrainConfig
from densa.train.optim import build_optimizers
from densa.train.peak import peak_flops


def step_seconds(model: nn.Module, optimizers: list[torch.optim.Optimizer], batch: Tensor, bf16: bool,
                 forward: Callable[..., object] | None = None) -> float:
    """Wall time of one optimizer step on `batch` (B, T+1); `forward` (default: the model) runs the loss."""
    start = time.perf_counter()
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = (model if forward is None else forward)(batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    if hasattr(model, "update_routing"):
        model.update_routing()
    return time.perf_counter() - start


def _compiled(model: nn.Module) -> Callable[..., object]:
    """The training forward compiled (densa's switch in densa/model/compile.py is for inference steps)."""
    return torch.compile(model)


def run_cases(cfg: ModelConfig, batch_size: int, context: int, steps: int, warmup: int = 2, bf16: bool = False,
              kinds: tuple[str, ...] = KINDS, peak: float | None = None,
              modes: tuple[str, ...] = ("eager",)) -> dict[str, float | int | str]:
    """Flat keys `{kind}_{mode}_tokens_per_s`, best form `{kind}_tokens_per_s` and `{kind}_mfu`, `{kind}_params`,
    and the two ratios (best with best)."""
    peak = peak if peak is not None else peak_flops(bf16)
    result: dict[str, float | int | str] = {"threads": torch.get_num_threads(), "batch_size": batch_size,
                                            "context": context, "steps": steps, "warmup_steps": warmup,
                                            "dtype": "bf16-autocast" if bf16 else "float32", "peak_flops": peak,
                                            "modes": ",".join(modes)}
    train_cfg = TrainConfig(data="(bench)", lr=1e-3)
    for mode in modes:
        models = {kind: build_model(kind, cfg, context + 1).train() for kind in kinds}
        optimizers = {kind: build_optimizers(model, train_cfg) for kind, model in models.items()}
        forwards = {kind: _compiled(m) if mode == "compiled" else m for kind, m in models.items()}
        generator = torch.Generator().manual_seed(0)
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for i in range(warmup + steps):
            batch = torch.randint(0, cfg.vocab_size, (batch_size, context + 1), generator=generator)
            for kind, model in models.items():
                seconds = step_seconds(model, optimizers[kind], batch, bf16, forwards[kind])
                if i >= warmup:
                    times[kind].append(seconds)
        for kind, model in models.items():
            tokens_per_s = batch_size * context / statistics.median(times[kind])
            result[f"{kind}_params"] = sum(p.numel() for p in model.parameters())
            result[f"{kind}_{mode}_tokens_per_s"] = round(tokens_per_s, 1)
            print(f"  {kind:5s} {mode:8s} {tokens_per_s:9,.0f} tokens/s", file=sys.stderr)
    for kind in kinds:
        tokens_per_s = max(result[f"{kind}_{mode}_tokens_per_s"] for mode in modes)
        flops = flops_per_token(cfg if kind == "densa" else cfg.replace(mixer="attention"), context).training
        result[f"{kind}_tokens_per_s"] = tokens_per_s
        result[f"{kind}_mfu"] = round(flops * tokens_per_s / peak, 4)
    if "densa" in kinds and "dense" in kinds:
        result["ratio_tokens_per_s"] = round(result["densa_tokens_per_s"] / result["dense_tokens_per_s"], 4)
    if "dense" in kinds and "hf" in kinds:
        result["dense_vs_hf"] = round(result["dense_tokens_per_s"] / result["hf_tokens_per_s"], 4)
    return result


def run(quick: bool, modes: tuple[str, ...] | None = None) -> dict[str, float | int | str]:
    batch_size, context, steps = (4, 256, 3) if quick else (8, 512, 8)
    modes = modes or (("eager",) if quick else ("eager", "compiled"))
    print(f"bench train: cpu-small, batch {batch_size}x{context}, modes {modes}, {steps} timed steps after 2 "
          "warm-up steps", file=sys.stderr, flush=True)
    return run_cases(from_preset("cpu-small"), batch_size, context, steps, modes=modes)
