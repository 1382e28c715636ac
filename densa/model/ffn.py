"""The FFN of a block is chosen by `ModelConfig.ffn`; both block types build it here, so any mixer can be paired
with any FFN (the ablations of the iso-FLOP study need every combination)."""

from __future__ import annotations

from torch import nn

from densa.config import ModelConfig
from densa.model.layers import SwiGLU


def build_mlp(cfg: ModelConfig) -> nn.Module:
    """The FFN module for one block: a dense SwiGLU of width `intermediate_size`."""
    if cfg.ffn == "swiglu":
        return SwiGLU(cfg.hidden_size, cfg.intermediate_size)
    raise ValueError(f"ffn={cfg.ffn!r} has no builder")  # unreachable: ModelConfig validates `ffn`
