"""Rows joining and leaving one batched decoding cache: the data side of continuous batching.

The scheduler (densa/serve/engine.py) keeps a single `ModelCache` whose batch rows are the running requests. Rows
sit at different positions, which the model already handles (densa/model/cache.py): every row has its own position
and padding is marked per key (Mega: key position -1; dense attention: `k_valid` False). So
- a request joins by concatenating its freshly prefilled cache to the running one on the batch dimension, after
  left-padding the shorter key window with padding keys (`concat_caches`);
- a request leaves by selecting the remaining rows (`ModelCache.reorder_cache`), after which key columns that no
  remaining row can see are dropped (`drop_rows`).
Each row then decodes exactly what it would alone; tests/test_serve.py checks a continuous schedule against
`generate()` per request.

Shape letters: B batch, H heads, W cached key window, z / v per-head widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from densa.model.cache import KVLayerCache, MegaLayerCache, ModelCache


def _left_pad(x: Tensor, width: int, dim: int, value: float | bool) -> Tensor:
    """Pad `x` on the left of `dim` so that it has `width` entries there."""
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = missing
    return torch.cat([x.new_full(pad_shape, value), x], dim=dim)


def _concat_mega(a: MegaLayerCache, b: MegaLayerCache) -> MegaLayerCache:
    W = max(a.k.shape[2], b.k.shape[2])  # (B, H, W, z): the longer window wins, the other row gets padding keys
    out = MegaLayerCache(
        ema_state=torch.cat([a.ema_state, b.ema_state]),
        k=torch.cat([_left_pad(a.k, W, 2, 0.0), _left_pad(b.k, W, 2, 0.0)]),
        v=torch.cat([_left_pad(a.v, W, 2, 0.0), _left_pad(b.v, W, 2, 0.0)]),
        k_pos=torch.cat([_left_pad(a.k_pos, W, 1, -1), _left_pad(b.k_pos, W, 1, -1)]),
    )
    if a.norm_state is not None:  # TimestepNorm running sums: (count (B,), sum (B, G), squares (B, G))
        out.norm_state = tuple(torch.cat([x, y]) for x, y in zip(a.norm_state, b.norm_state, strict=True))
    return out


def _concat_kv(a: KVLayerCache, b: KVLayerCache) -> KVLayerCache:
    S = max(a.k.shape[2], b.k.shape[2])  # (B, Hkv, S, d)

    def valid(c: KVLayerCache) -> Tensor:  # (B, S) with the padding columns False
        v = c.k_valid if c.k_valid is not None else torch.ones(c.k.shape[0], c.k.shape[2], dtype=torch.bool,
                                                                device=c.k.device)
        return _left_pad(v, S, 1, False)

    return KVLayerCache(k=torch.cat([_left_pad(a.k, S, 2, 0.0), _left_pad(b.k, S, 2, 0.0)]),
                        v=torch.cat([_left_pad(a.v, S, 2, 0.0), _left_pad(b.v, S, 2, 0.0)]),
                        k_valid=torch.cat([valid(a), valid(b)]))


def concat_caches(a: ModelCache, b: ModelCache) -> ModelCache:
    """One cache holding the rows of `a` then the rows of `b` (both already prefilled, any positions)."""
    if len(a.layers) != len(b.layers):
        raise ValueError(f"caches of different models: {len(a.layers)} and {len(b.layers)} layers")
    layers = []
    for la, lb in zip(a.layers, b.layers, strict=True):
        if isinstance(la, MegaLayerCache) and isinstance(lb, MegaLayerCache):
            layers.append(_concat_mega(la, lb))
        elif isinstance(la, KVLayerCache) and isinstance(lb, KVLayerCache):
            layers.append(_concat_kv(la, lb))
        else:
            raise TypeError(f"cannot join layer caches {type(la).__name__} and {type(lb).__name__}")
    return ModelCache(layers, steps=max(a.steps, b.steps), positions=torch.cat([a.positions, b.positions]))


def drop_rows(cache: ModelCache, keep: list[int]) -> None:
    """Keep only the batch rows `keep` (in that order), then trim key columns no remaining row can see."""
    cache.reorder_cache(torch.tensor(keep, dtype=torch.long, device=cache.positions.device))
    for layer in cache.layers:
        if isinstance(layer, KVLayerCache) and layer.k_valid is not None:
            seen_S = layer.k_valid.any(0)  # (S,) columns that some row still attends to
            first = int(seen_S.long().argmax()) if bool(seen_S.any()) else layer.k.shape[2]
            layer.k, layer.v, layer.k_valid = layer.k[:, :, first:], layer.v[:, :, first:], layer.k_valid[:, first:]
            if bool(layer.k_valid.all()):
                layer.k_valid = None
        elif isinstance(layer, MegaLayerCache) and layer.k_pos is not None:
            real_W = (layer.k_pos >= 0).any(0)  # (W,)
            first = int(real_W.long().argmax()) if bool(real_W.any()) else layer.k.shape[2]
            layer.k, layer.v, layer.k_pos = layer.k[:, :, first:], layer.v[:, :, first:], layer.k_pos[:, first:]


def pad_prompts(prompts: list[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Left-pad token lists into (ids (B, T), attention_mask (B, T)) for one batched prefill."""
    T = max(len(p) for p in prompts)
    ids = torch.stack([F.pad(torch.tensor(p, dtype=torch.long), (T - len(p), 0), value=pad_id) for p in prompts])
    mask = torch.stack([F.pad(torch.ones(len(p), dtype=torch.long), (T - len(p), 0)) for p in prompts])
    return ids, mask
