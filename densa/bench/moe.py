"""`densa bench moe`: forward+backward time of one MoE layer on 2,048 tokens at hidden 384 (fp32, CPU).

Two shapes, E=64 / top-8 / expert width 128 (fine-grained, OLMoE) and E=8 / top-2 / width 512 (Mixtral); both have
the active FLOPs of a dense SwiGLU of width 1024. Variants, all fed the same input and output gradient:
- `densa`: densa's dispatch (sort once, grouped matmul, index_add) under top-k softmax routing (ffn="topk_moe").
- `hf_eager` / `hf_grouped`: transformers' MixtralSparseMoeBlock holding the *same* weights (so the same routing and
  work), with its `eager` experts implementation (the per-expert loop) and its `grouped_mm` one (its best).
- `dense`: SwiGLU of width 1024.
- `dynamic` (E=64 only): densa's ffn="moe" with the budget at 60% of top-K (target 4.8 of 8 FFN experts per token,
  4 null + 4 identity experts), timed after the controller has settled; `dynamic_active_fraction` is the measured
  mean FFN experts per token / K. `ratio_dynamic_vs_full` compares it with the same layer at a full budget
  (`budget_full`, target 8 of 8), `ratio_dynamic_vs_topk` with `densa` (top-k softmax routing, no ZC experts).
- `half` (E=64 only): densa at top-4, half the routed pairs of top-8 (time must follow routed work).
Keys without a prefix are E=64/top-8; `e8_` keys are E=8/top-2. Timing runs rounds over all variants, interleaved,
and keeps each variant's fastest round: the CPU is shared, and the minimum is the least-disturbed measurement.

Decoding (`decode_` keys): one token through the experts of a `cpu-small-moe` MoE layer (E=16, K=4, width 176,
hidden 256, its dynamic routing), inference (no autograd), µs per call, each implementation on the same routing:
`grouped` (sort + CPU `_grouped_mm`, the eager path before issue 15), `gathered` (copy the chosen experts' weights,
one bmm each), `looped` (two `F.linear` per chosen expert on views of the weights: the eager fallback where no C++
compiler is available) and `reduced` (the compiled gather-reductions, `reduce_experts`: what eager CPU decoding
takes, `Experts.uses_reduced`); `ratio_decode_looped_vs_grouped`, `ratio_decode_reduced_vs_looped`. The `smol_`
decode keys time the same calls at a SmolLM2-135M conversion's expert shapes (hidden 576, E=16 of width 96, the 8
FFN experts a 50% budget uses; 30 layers of distinct weights per call, as in one decoding step), with random weights
and routing, beside `smol_decode_dense_us`: the dense SwiGLU FFN they come from (width 1536) on oneDNN-packed
weights, the original model's fast path; `ratio_smol_decode_reduced_vs_dense`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from densa.config import ModelConfig, from_preset
from densa.model.fastlinear import pack_linears
from densa.model.layers import SwiGLU
from densa.model.moe import Experts, MoE

TOKENS, HIDDEN, DENSE_WIDTH = 2048, 384, 1024
SHAPES = {"": (64, 8, 128), "e8_": (8, 2, 512)}  # key prefix -> (experts, top-k, expert width)


def _moe(ffn: str, hidden: int, dense_width: int, experts: int, top_k: int, width: int, **extra) -> MoE:
    cfg = ModelConfig(hidden_size=hidden, intermediate_size=dense_width, ffn=ffn, num_experts=experts,
                      num_experts_per_tok=top_k, moe_intermediate_size=width, **extra)
    return MoE(cfg).train()


def _mixtral_like(densa: MoE, implementation: str) -> nn.Module:
    """transformers' Mixtral sparse MoE block of the same shape, holding `densa`'s weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    E, two_f, D = densa.experts.gate_up_proj.shape
    cfg = MixtralConfig(hidden_size=D, intermediate_size=two_f // 2, num_local_experts=E,
                        num_experts_per_tok=densa.top_k, router_jitter_noise=0.0)
    cfg._experts_implementation = implementation
    block = MixtralSparseMoeBlock(cfg)
    block.load_state_dict({"gate.weight": densa.gate.weight, "experts.gate_up_proj": densa.experts.gate_up_proj,
                           "experts.down_proj": densa.experts.down_proj})
    return block


def _settle(layer: MoE, x: Tensor, steps: int) -> float:
    """Run the budget controller until the layer's mean FFN experts per token has settled; returns that mean."""
    with torch.no_grad():
        for _ in range(steps):
            layer(x)
            mean = layer.update_routing()["mean_ffn_experts"]
    return mean


def _fwd_bwd(module: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(grad)
        if isinstance(module, MoE):
            module.update_routing()  # a training step's bookkeeping (and keeps the dynamic budget held)
    return step


def _time_interleaved(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    best = dict.fromkeys(steps, float("inf"))
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t0) * 1000)
    return best


def run_cases(tokens: int, hidden: int, dense_width: int, shapes: dict[str, tuple[int, int, int]], rounds: int,
              settle_steps: int) -> dict[str, float | int | str | bool]:
    """Time every variant; the `half` and `dynamic` variants use the shape with key prefix ""."""
    torch.manual_seed(0)
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    grad = torch.randn(1, tokens, hidden)
    steps: dict[str, Callable[[], None]] = {"dense": _fwd_bwd(SwiGLU(hidden, dense_width), x, grad)}
    out: dict[str, float | int | str | bool] = {"tokens": tokens, "hidden": hidden, "dtype": "float32",
                                                "threads": torch.get_num_threads()}
    for prefix, (E, K, width) in shapes.items():
        densa = _moe("topk_moe", hidden, dense_width, E, K, width)
        steps[f"{prefix}densa"] = _fwd_bwd(densa, x, grad)
        steps[f"{prefix}hf_eager"] = _fwd_bwd(_mixtral_like(densa, "eager"), x, grad)
        steps[f"{prefix}hf_grouped"] = _fwd_bwd(_mixtral_like(densa, "grouped_mm"), x, grad)
        out[f"{prefix}densa_uses_grouped_mm"] = densa.experts.uses_grouped_mm(x[0])
    E, K, width = shapes[""]
    steps["half"] = _fwd_bwd(_moe("topk_moe", hidden, dense_width, E, K // 2, width), x, grad)
    for name, budget in (("budget_full", 1.0), ("dynamic", 0.6)):  # densa's "moe" layer at two budgets
        layer = _moe("moe", hidden, dense_width, E, K, width, num_null_experts=4, num_identity_experts=4,
                     target_active_experts=budget * K)
        out[f"{name}_active_fraction"] = round(_settle(layer, x, settle_steps) / K, 4)
        steps[name] = _fwd_bwd(layer, x, grad)

    ms = _time_interleaved(steps, rounds)
    out.update({f"{name}_ms": round(value, 1) for name, value in ms.items()})
    for prefix in shapes:
        densa_ms = ms[f"{prefix}densa"]
        out[f"{prefix}ratio_vs_hf_eager"] = round(densa_ms / ms[f"{prefix}hf_eager"], 3)
        out[f"{prefix}ratio_vs_hf_grouped"] = round(densa_ms / ms[f"{prefix}hf_grouped"], 3)
        out[f"{prefix}ratio_vs_dense"] = round(densa_ms / ms["dense"], 3)
    out["ratio_dynamic_vs_full"] = round(ms["dynamic"] / ms["budget_full"], 3)
    out["ratio_dynamic_vs_topk"] = round(ms["dynamic"] / ms["densa"], 3)
    out["ratio_half_vs_full"] = round(ms["half"] / ms["densa"], 3)
    return dict(sorted(out.items()))


@torch.no_grad()
def decode_cases(rounds: int, calls: int = 200, smol_layers: int = 30) -> dict[str, float]:
    """µs per one-token experts call of a cpu-small-moe MoE layer, and of `smol_layers` layers of SmolLM2-sized
    experts, per implementation (module docstring)."""
    torch.manual_seed(0)
    layer = MoE(from_preset("cpu-small-moe")).eval()
    x_TD = torch.randn(1, layer.experts.gate_up_proj.shape[2])
    r = layer.gate(x_TD)
    out = _decode_calls(layer.experts, x_TD, r.ids_TK, r.weights_TK, rounds, calls, "decode_")
    out["decode_ffn_experts"] = int((r.ids_TK < layer.num_experts).sum())
    # SmolLM2-135M at a 50% budget: 16 experts of width 96 (1536 / 16) at hidden 576, 8 of them chosen; 30 layers'
    # worth of distinct weights, so that the calls stream weights from memory as a decoding step does
    smol = [Experts(16, 576, 96) for _ in range(smol_layers)]
    for experts in smol:
        nn.init.normal_(experts.gate_up_proj, std=0.02)
        nn.init.normal_(experts.down_proj, std=0.02)
    x_smol = torch.randn(1, 576)
    ids_smol = torch.randperm(16)[:8][None]
    weights_smol = torch.full((1, 8), 1 / 8)
    # the dense FFN these experts were cut from (width 1536) on oneDNN-packed weights: what the original runs
    dense = nn.ModuleList(SwiGLU(576, 1536) for _ in range(smol_layers)).eval()
    pack_linears(dense)
    smol_calls = max(1, calls // smol_layers)

    def dense_calls() -> None:
        for _ in range(smol_calls):
            for ffn in dense:
                ffn(x_smol)

    out |= _decode_calls(smol, x_smol, ids_smol, weights_smol, rounds, smol_calls, "smol_decode_",
                         {"dense": dense_calls})
    out["ratio_smol_decode_reduced_vs_dense"] = round(out["smol_decode_reduced_us"] / out["smol_decode_dense_us"], 3)
    return out


def _decode_calls(experts: Experts | list[Experts], x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, rounds: int,
                  calls: int, prefix: str, extra: dict[str, Callable[[], None]] | None = None) -> dict[str, float]:
    """µs per call (over all the `experts` modules: one call each) per implementation, interleaved rounds, with
    `extra` callables (each making `calls` calls) timed in the same rounds."""
    modules = experts if isinstance(experts, list) else [experts]

    def call(impl: str) -> Callable[[], None]:
        def run_calls() -> None:
            Experts.impl = impl
            for _ in range(calls):
                for module in modules:
                    module(x_TD, ids_TK, weights_TK)
        return run_calls

    try:
        ms = _time_interleaved({**{name: call(impl) for name, impl in (("grouped", "grouped_mm"),
                                                                        ("gathered", "gathered"),
                                                                        ("looped", "looped"),
                                                                        ("reduced", "reduced"))},
                                **(extra or {})}, rounds)
    finally:
        Experts.impl = "auto"
    out = {f"{prefix}{name}_us": round(1000 * value / calls, 1) for name, value in ms.items()}
    out[f"ratio_{prefix}looped_vs_grouped"] = round(ms["looped"] / ms["grouped"], 3)
    out[f"ratio_{prefix}reduced_vs_looped"] = round(ms["reduced"] / ms["looped"], 3)
    return out


def run(quick: bool) -> dict[str, float | int | str | bool]:
    """The issue's sizes; `quick` times 3 rounds instead of 10 (same sizes, same keys)."""
    result = run_cases(TOKENS, HIDDEN, DENSE_WIDTH, SHAPES, rounds=3 if quick else 10, settle_steps=10)
    return dict(sorted({**result, **decode_cases(rounds=3 if quick else 10)}.items()))
