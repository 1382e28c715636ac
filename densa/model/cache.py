"""Decoding caches and per-row positions.

A Mega layer keeps its EMA state plus the keys/values of the last `attn_chunk_size − 1` steps (all a query can
see: keys of its own chunk), so its memory is constant in the number of generated tokens (mega.md §7.4).
A dense attention layer keeps a growing K/V cache.

Left padding (batched generation of prompts of different lengths) is handled with per-row positions: position p of
a row counts that row's real tokens only, so each row sees exactly what it would see alone — the same EMA input,
the same norm statistics, the same chunk boundaries, the same RoPE angles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from densa.model.layers import TimestepNormState


@dataclass
class MegaLayerCache:
    ema_state: Tensor | None = None  # (B, D, N), fp32 or complex64
    k: Tensor | None = None  # (B, H, W, z) keys of the last W <= c-1 steps, RoPE applied
    v: Tensor | None = None  # (B, H, W, v)
    k_pos: Tensor | None = None  # (B, W) per-row position of each cached key; -1 for padding
    norm_state: TimestepNormState | None = None  # TimestepNorm running statistics, when enabled

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.ema_state, self.k, self.v, self.k_pos, *(self.norm_state or ())) if t is not None]


@dataclass
class KVLayerCache:
    k: Tensor | None = None  # (B, Hkv, S, d), grows by one entry per step
    v: Tensor | None = None
    k_valid: Tensor | None = None  # (B, S) False at padding; None while there is no padding

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.k, self.v, self.k_valid) if t is not None]


LayerCache = MegaLayerCache | KVLayerCache


@dataclass
class ModelCache:
    """One cache per layer plus the per-row positions; create it with `DensaModel.new_cache()`."""

    layers: list[LayerCache] = field(default_factory=list)
    steps: int = 0  # time steps processed (padding included): the length of the sequence so far
    positions: Tensor | None = None  # (B,) real tokens processed per row

    @property
    def seen_tokens(self) -> int:
        return self.steps

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """transformers' name for `seen_tokens`."""
        return self.steps

    def nbytes(self) -> int:
        """Memory held by the cache tensors."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Select batch rows (beam search): every cached tensor is indexed on its batch dimension."""
        for layer in self.layers:
            for name, value in vars(layer).items():
                if isinstance(value, Tensor):
                    setattr(layer, name, value.index_select(0, beam_idx))
                elif isinstance(value, tuple):
                    setattr(layer, name, tuple(t.index_select(0, beam_idx) for t in value))
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx)


@dataclass
class Positions:
    """Where the T new tokens of each row sit. Built once per forward by `Positions.build`."""

    ids_BT: Tensor  # per-row position of each token (padding: clamped to the row's next position)
    valid_BT: Tensor | None  # False at left padding; None when the batch has no padding
    start_B: Tensor  # per-row position before these tokens
    first_step: int  # time steps processed before these tokens

    @property
    def uniform_start(self) -> int | None:
        """The common start position when every row has the same one, else None."""
        lo, hi = int(self.start_B.min()), int(self.start_B.max())
        return lo if lo == hi else None

    @classmethod
    def build(cls, batch: int, T: int, device: torch.device, attention_mask: Tensor | None,
              cache: ModelCache | None) -> Positions:
        start = cache.positions if cache is not None and cache.positions is not None else None
        start = start if start is not None else torch.zeros(batch, dtype=torch.long, device=device)
        steps = cache.steps if cache is not None else 0
        if attention_mask is None:
            return cls(start[:, None] + torch.arange(T, device=device), None, start, steps)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < T:
            raise ValueError(f"attention_mask must have shape (batch, >= {T}) for input_ids of shape ({batch}, {T}); "
                             f"got {tuple(attention_mask.shape)}")
        valid = attention_mask[:, -T:].to(device=device, dtype=torch.bool)
        if bool((valid[:, 1:].long() < valid[:, :-1].long()).any()) or bool((~valid[:, 0] & (start > 0)).any()):
            raise ValueError("attention_mask: only left padding is supported (zeros before a row's first token)")
        ids = start[:, None] + valid.long().cumsum(1) - 1
        ids = torch.where(valid, ids, start[:, None])
        return cls(ids, None if bool(valid.all()) else valid, start, steps)

    def advance(self, cache: ModelCache) -> None:
        """Record these tokens in the cache's per-row positions and step count."""
        T = self.ids_BT.shape[1]
        real = self.valid_BT.long().sum(1) if self.valid_BT is not None else T
        cache.positions = self.start_B + real
        cache.steps = self.first_step + T
