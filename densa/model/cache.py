"""Decoding caches and per-row positions.

Every layer cache is a set of preallocated buffers indexed by *slot*, written in place, so a decoding step has
fixed shapes, allocates nothing and never reads a value back to the host (what `torch.compile` and CUDA graphs
need; densa/model/compile.py):
- A Mega layer keeps its EMA state plus the keys/values of the current attention chunk in a ring of
  `attn_chunk_size` slots (slot = position mod c) with the position of each slot's key (-1: empty). A query sees
  the slots whose key lies in its own chunk at or before it, so memory is constant in the number of tokens
  (docs/architecture.md, 'Decoding cache').
- A dense attention layer keeps a static K/V cache like transformers' `StaticCache`: slot = position, capacity
  reserved ahead (`ModelCache.reserve`, doubling when outgrown), and a query sees the slots at or before its
  position.

Left padding (batched generation of prompts of different lengths) is handled with per-row positions: position p of
a row counts that row's real tokens only, so each row sees exactly what it would see alone — the same EMA input,
the same norm statistics, the same chunk boundaries, the same RoPE angles — and padding never gets a slot.

Caches say what they are: `select_rows`, `concat`, `trim`, `reserve`, `tensors` are methods of each layer cache,
so continuous batching (densa/serve/batching.py) never looks at the mixer type. Caches never carry gradients.

Shape letters: B batch, H heads, S slots, T new tokens, z / v per-head key / value widths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from densa.model.layers import TimestepNormState


class LayerCache(Protocol):
    """What continuous batching and `ModelCache` need from one layer's cache."""

    def tensors(self) -> list[Tensor]: ...
    def select_rows(self, rows_B: Tensor) -> None: ...
    def concat(self, other: LayerCache) -> LayerCache: ...
    def trim(self, length: int) -> None: ...
    def reserve(self, length: int) -> None: ...


def slot_update(buf_BHS: Tensor, new_BHT: Tensor, pos: Positions, ring: bool) -> Tensor:
    """`buf` (B, H, S, ·) with the T new keys (or values) of `pos` written to their slots (position, or position
    mod S for a ring); a multi-token write (prefill, continuation), by gather: slot s of row b takes the newest of
    the row's new positions that maps to it, else keeps its old content."""
    src_BS, new_BS = _slot_sources(pos, buf_BHS.shape[2], ring)[:2]
    B, H, S, W = buf_BHS.shape
    taken = new_BHT.detach().gather(2, src_BS[:, None, :, None].expand(B, H, S, W))
    return torch.where(new_BS[:, None, :, None], taken.to(buf_BHS.dtype), buf_BHS)


def _slot_sources(pos: Positions, slots: int, ring: bool) -> tuple[Tensor, Tensor, Tensor]:
    """For each slot s of each row: the new column that now holds it (B, S), whether that column is new (B, S),
    and the slot's position (B, S). New positions of row b are start_b .. last_b; column T-1 holds last_b."""
    T = pos.ids_BT.shape[1]
    last_B1 = pos.ids_BT[:, -1:]  # the last column is always a real token (left padding only)
    if pos.valid_BT is not None:
        last_B1 = torch.where(pos.valid_BT[:, -1:], last_B1, pos.start_B[:, None] - 1)
    s_S = torch.arange(slots, device=last_B1.device)
    p_BS = last_B1 - (last_B1 - s_S) % slots if ring else s_S.expand(last_B1.shape[0], slots)
    new_BS = (p_BS >= pos.start_B[:, None]) & (p_BS <= last_B1)
    src_BS = (T - 1 - (last_B1 - p_BS)).clamp(0, T - 1)
    return src_BS, new_BS, p_BS


def slots_write(buf_BHS: Tensor, new_BHT: Tensor, pos: Positions) -> None:
    """`slot_update` for a static cache (slot = position) when every new column is a real token (no padding):
    the T new keys written in place to their slots, touching T slots per row rather than the whole reserved
    buffer (a prompt of 128 tokens into a cache reserved for 2,048 rewrote all 2,048 slots of every layer)."""
    B, H, T, W = new_BHT.shape
    buf_BHS.scatter_(2, pos.ids_BT[:, None, :, None].expand(B, H, T, W), new_BHT.detach().to(buf_BHS.dtype))


def step_write(buf_BHS: Tensor, new_BH1: Tensor, slot_B: Tensor) -> None:
    """One decoding step's key (or value) written in place to each row's slot: no allocation, no host sync."""
    B, H, _, W = buf_BHS.shape
    buf_BHS.scatter_(2, slot_B[:, None, None, None].expand(B, H, 1, W), new_BH1.detach().to(buf_BHS.dtype))


def _cat_rows(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if (a is None) != (b is None):
        raise ValueError("cannot join a prefilled cache with an empty one")
    return None if a is None else torch.cat([a, b])


@dataclass
class MegaLayerCache:
    slots: int  # attn_chunk_size c: the ring holds the current chunk's keys
    ema_state: Tensor | None = None  # (B, D, N), fp32 or complex64
    k: Tensor | None = None  # (B, H, c, z) key of slot s = position mod c, RoPE applied
    v: Tensor | None = None  # (B, H, c, v)
    k_pos: Tensor | None = None  # (B, c) position of each slot's key; -1 for an empty slot
    norm_state: TimestepNormState | None = None  # TimestepNorm running statistics, when enabled

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.ema_state, self.k, self.v, self.k_pos, *(self.norm_state or ())) if t is not None]

    def allocate(self, batch: int, heads: int, widths: tuple[int, int], like: Tensor, ema_state: Tensor) -> None:
        """Empty buffers (before the first write)."""
        self.k = like.new_zeros(batch, heads, self.slots, widths[0])
        self.v = like.new_zeros(batch, heads, self.slots, widths[1])
        self.k_pos = torch.full((batch, self.slots), -1, dtype=torch.long, device=like.device)
        if self.ema_state is None:
            self.ema_state = ema_state

    def write(self, k_BHTz: Tensor, v_BHTv: Tensor, pos: Positions) -> None:
        """Record the new keys of a multi-token forward in the ring."""
        self.k, self.v = slot_update(self.k, k_BHTz, pos, ring=True), slot_update(self.v, v_BHTv, pos, ring=True)
        _, new_BS, p_BS = _slot_sources(pos, self.slots, ring=True)
        self.k_pos = torch.where(new_BS, p_BS, self.k_pos)

    def step(self, k_BH1z: Tensor, v_BH1v: Tensor, pos: Positions) -> None:
        """Record one decoding step's key in place."""
        slot_B = pos.slot(self.slots)
        step_write(self.k, k_BH1z, slot_B)
        step_write(self.v, v_BH1v, slot_B)
        self.k_pos.scatter_(1, slot_B[:, None], pos.ids_BT)

    def select_rows(self, rows_B: Tensor) -> None:
        for name in ("ema_state", "k", "v", "k_pos"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).index_select(0, rows_B))
        if self.norm_state is not None:
            self.norm_state = tuple(t.index_select(0, rows_B) for t in self.norm_state)

    def concat(self, other: LayerCache) -> MegaLayerCache:
        if not isinstance(other, MegaLayerCache) or other.slots != self.slots:
            raise TypeError(f"cannot join layer caches {type(self).__name__} and {type(other).__name__}")
        out = MegaLayerCache(self.slots, _cat_rows(self.ema_state, other.ema_state), _cat_rows(self.k, other.k),
                             _cat_rows(self.v, other.v), _cat_rows(self.k_pos, other.k_pos))
        if self.norm_state is not None:  # TimestepNorm running sums: (count (B,), sum (B, G), squares (B, G))
            out.norm_state = tuple(torch.cat([x, y]) for x, y in zip(self.norm_state, other.norm_state, strict=True))
        return out

    def trim(self, length: int) -> None:
        """Nothing to trim: the ring is c slots whatever the length."""

    def reserve(self, length: int) -> None:
        """Nothing to reserve: the ring is c slots whatever the length."""


@dataclass
class KVLayerCache:
    k: Tensor | None = None  # (B, Hkv, S, d): slot s holds the key of position s; S is the reserved capacity
    v: Tensor | None = None
    capacity: int = 0  # slots to allocate at the first write (at least the prefill length)

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.k, self.v) if t is not None]

    def write(self, k_BHTd: Tensor, v_BHTd: Tensor, pos: Positions) -> None:
        """Record the new keys of a multi-token forward at their positions."""
        if self.k is None:
            B, H, T, d = k_BHTd.shape
            self.capacity = max(self.capacity, T + pos.first_step)
            self.k, self.v = k_BHTd.new_zeros(B, H, self.capacity, d), v_BHTd.new_zeros(B, H, self.capacity, d)
        if pos.valid_BT is None:  # no padding: write the new slots in place
            slots_write(self.k, k_BHTd, pos)
            slots_write(self.v, v_BHTd, pos)
        else:  # left padding: padding columns must not reach a slot, so rebuild from the general gather
            self.k, self.v = slot_update(self.k, k_BHTd, pos, ring=False), slot_update(self.v, v_BHTd, pos, ring=False)

    def step(self, k_BH1d: Tensor, v_BH1d: Tensor, pos: Positions) -> None:
        """Record one decoding step's key in place (the capacity was reserved ahead)."""
        step_write(self.k, k_BH1d, pos.ids_BT[:, 0])
        step_write(self.v, v_BH1d, pos.ids_BT[:, 0])

    def select_rows(self, rows_B: Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, rows_B), self.v.index_select(0, rows_B)

    def concat(self, other: LayerCache) -> KVLayerCache:
        if not isinstance(other, KVLayerCache):
            raise TypeError(f"cannot join layer caches {type(self).__name__} and {type(other).__name__}")
        S = max(self.capacity, other.capacity)  # the shorter cache gets empty slots at the end

        def padded(t: Tensor | None) -> Tensor | None:
            return None if t is None else F.pad(t, (0, 0, 0, S - t.shape[2]))

        return KVLayerCache(_cat_rows(padded(self.k), padded(other.k)), _cat_rows(padded(self.v), padded(other.v)), S)

    def trim(self, length: int) -> None:
        """Release the slots of positions >= `length` (which no row has reached) once they are most of the cache,
        so rows leaving one by one do not reallocate it each time."""
        if self.k is not None and 2 * length < self.capacity:
            self.k, self.v, self.capacity = self.k[:, :, :length], self.v[:, :, :length], length

    def reserve(self, length: int) -> None:
        """Make room for positions < `length`; a full cache doubles, so a long decode reallocates log-many times."""
        if length <= self.capacity:
            return
        self.capacity = max(length, 2 * self.capacity)
        if self.k is not None:
            grow = self.capacity - self.k.shape[2]
            self.k, self.v = F.pad(self.k, (0, 0, 0, grow)), F.pad(self.v, (0, 0, 0, grow))


@dataclass
class ModelCache:
    """One cache per layer plus the per-row positions; create it with `DensaModel.new_cache()`."""

    layers: list[LayerCache] = field(default_factory=list)
    steps: int = 0  # time steps processed (padding included): an upper bound on every row's position
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

    def reserve(self, length: int) -> None:
        """Room for `length` time steps in every layer (a static K/V cache grows here, never inside a step)."""
        for layer in self.layers:
            layer.reserve(length)

    def select_rows(self, rows_B: Tensor) -> None:
        """Keep batch rows `rows_B` (in that order) in every layer."""
        for layer in self.layers:
            layer.select_rows(rows_B)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, rows_B)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """transformers' name for `select_rows` (beam search)."""
        self.select_rows(beam_idx)

    def concat(self, other: ModelCache) -> ModelCache:
        """One cache holding the rows of `self` then the rows of `other` (both prefilled, any positions)."""
        if len(self.layers) != len(other.layers):
            raise ValueError(f"caches of different models: {len(self.layers)} and {len(other.layers)} layers")
        layers = [a.concat(b) for a, b in zip(self.layers, other.layers, strict=True)]
        return ModelCache(layers, steps=max(self.steps, other.steps), positions=_cat_rows(self.positions,
                                                                                         other.positions))

    def trim(self) -> None:
        """Release capacity no row can use any more (after rows left); one host sync."""
        if self.positions is None or not len(self.positions):
            return
        self.steps = int(self.positions.max())
        for layer in self.layers:
            layer.trim(self.steps)


@dataclass
class Positions:
    """Where the T new tokens of each row sit. Built once per forward by `Positions.build` (or `Positions.step`)."""

    ids_BT: Tensor  # per-row position of each token (padding: clamped to the row's next position)
    valid_BT: Tensor | None  # False at left padding; None when the batch has no padding
    start_B: Tensor  # per-row position before these tokens
    first_step: int  # time steps processed before these tokens (0: a fresh sequence, every row at position 0)
    # position slots in use once these tokens are written (every row's positions are below it): eager steps attend
    # over these slots only; None (a compiled step: fixed shapes) attends over the whole reserved buffer, masked
    extent: int | None = None
    _shared: dict = field(default_factory=dict, repr=False)  # what `shared` made, by key

    def shared(self, key: tuple, make: Callable[[], Any]) -> Any:
        """`make()`, once per forward for all the layers that ask with the same `key`: every layer sees the same
        positions, so tables made from them (RoPE's cos/sin, the ring extent) are made once, not once per layer."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def ring_extent(self, slots: int) -> int | None:
        """How many leading slots of a ring of `slots` (slot = position mod `slots`, a Mega layer's chunk) an eager
        one-token decoding step must read: a token at position p sees only its own chunk's keys, which sit in slots
        0 .. p mod `slots`. None for a compiled step (`extent` None: fixed shapes, the whole ring, masked). While
        every row is in its first chunk this is `extent` itself; later it takes one host read of the rows'
        positions, once per step for all layers (a CPU tensor in eager decoding: microseconds)."""
        if self.extent is None:
            return None
        if self.extent <= slots:
            return self.extent
        return self.shared(("ring", slots), lambda: int(self.start_B.remainder(slots).max()) + 1)

    def chunk_start(self, chunk: int) -> Tensor:
        """(B,) the first position of the chunk of `chunk` tokens that each row's first new token lies in (for a
        decoding step: the chunk its query attends within), made once per forward for all layers."""
        return self.shared(("chunk_start", chunk), lambda: self.ids_BT[:, 0] - self.ids_BT[:, 0] % chunk)

    def slot(self, slots: int) -> Tensor:
        """(B,) the ring slot (position mod `slots`) of each row's token in a decoding step, once for all layers."""
        return self.shared(("slot", slots), lambda: self.ids_BT[:, 0] % slots)

    @classmethod
    def step(cls, cache: ModelCache, extent: int | None = None) -> Positions:
        """One decoding step of a prefilled cache, without reading `cache.steps` (a Python int that changes every
        step would specialise a compiled step); `first_step` is then 1, meaning "not fresh". An eager caller passes
        `extent` = cache.steps + 1 so dense layers read only the slots in use."""
        return cls(cache.positions[:, None], None, cache.positions, 1, extent)

    @classmethod
    def build(cls, batch: int, T: int, device: torch.device, attention_mask: Tensor | None,
              cache: ModelCache | None) -> Positions:
        start = cache.positions if cache is not None and cache.positions is not None else None
        start = start if start is not None else torch.zeros(batch, dtype=torch.long, device=device)
        steps = cache.steps if cache is not None else 0
        if attention_mask is None:
            return cls(start[:, None] + torch.arange(T, device=device), None, start, steps, steps + T)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < T:
            raise ValueError(f"attention_mask must have shape (batch, >= {T}) for input_ids of shape ({batch}, {T}); "
                             f"got {tuple(attention_mask.shape)}")
        valid = attention_mask[:, -T:].to(device=device, dtype=torch.bool)
        if bool((valid[:, 1:].long() < valid[:, :-1].long()).any()) or bool((~valid[:, 0] & (start > 0)).any()):
            raise ValueError("attention_mask: only left padding is supported (zeros before a row's first token)")
        ids = start[:, None] + valid.long().cumsum(1) - 1
        ids = torch.where(valid, ids, start[:, None])
        return cls(ids, None if bool(valid.all()) else valid, start, steps, steps + T)

    def advance(self, cache: ModelCache) -> None:
        """Record these tokens in the cache's per-row positions and step count."""
        T = self.ids_BT.shape[1]
        real = self.valid_BT.long().sum(1) if self.valid_BT is not None else T
        cache.positions = self.start_B + real
        cache.steps = self.first_step + T
