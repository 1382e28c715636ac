"""Decoding caches.

A Mega layer keeps its EMA state plus the K/V of the *current partial chunk* only, so its memory is constant in the
number of generated tokens (mega.md §7.4). A dense attention layer keeps a growing K/V cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from densa.model.layers import TimestepNormState


@dataclass
class MegaLayerCache:
    ema_state: Tensor | None = None  # (B, D, N), fp32 or complex64
    k: Tensor | None = None  # (B, H, p, dz) keys of the current chunk, p < attn_chunk_size, RoPE applied
    v: Tensor | None = None  # (B, H, p, dv)
    norm_state: TimestepNormState | None = None  # TimestepNorm running statistics, when enabled
    seen: int = 0  # tokens processed so far

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.ema_state, self.k, self.v, *(self.norm_state or ())) if t is not None]


@dataclass
class KVLayerCache:
    k: Tensor | None = None  # (B, Hkv, S, d), grows by one entry per token
    v: Tensor | None = None
    seen: int = 0

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.k, self.v) if t is not None]


LayerCache = MegaLayerCache | KVLayerCache


@dataclass
class ModelCache:
    """One cache per layer; create it with `DensaModel.new_cache()`."""

    layers: list[LayerCache] = field(default_factory=list)

    @property
    def seen_tokens(self) -> int:
        return self.layers[0].seen if self.layers else 0

    def nbytes(self) -> int:
        """Memory held by the cache tensors."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())
