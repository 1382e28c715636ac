"""The FFN of a block is chosen by `ModelConfig.ffn`; both block types build it here, so any mixer can be paired
with any FFN (the ablations of the iso-FLOP study need every combination).

- "swiglu": the dense SwiGLU of width `intermediate_size` (Llama).
- "moe": densa's dynamic mixture of experts: zero-computation experts, budget controller, aux-loss-free balance.
- "topk_moe": the plain top-k softmax MoE baseline (Mixtral / OLMoE), same experts and dispatch.
See docs/moe.md.
"""

from __future__ import annotations

from torch import Tensor, nn

from densa.config import ModelConfig
from densa.model.layers import SwiGLU
from densa.model.moe import MoE, Routed


def build_mlp(cfg: ModelConfig) -> nn.Module:
    """The FFN module for one block; called as `mlp(h)` on (B, T, D) and returns (B, T, D)."""
    if cfg.ffn == "swiglu":
        return SwiGLU(cfg.hidden_size, cfg.intermediate_size)
    if cfg.ffn in ("moe", "topk_moe"):
        return MoE(cfg)
    raise ValueError(f"ffn={cfg.ffn!r} has no builder")  # unreachable: ModelConfig validates `ffn`


def apply_ffn(mlp: nn.Module, h_BTD: Tensor) -> tuple[Tensor, Routed | None]:
    """Run a block's FFN; a MoE FFN also returns what it routed, which the block hands up to `ModelOutput`."""
    if isinstance(mlp, MoE):
        return mlp(h_BTD, return_routing=True)
    return mlp(h_BTD), None
