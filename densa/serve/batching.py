"""Rows joining and leaving one batched decoding cache: the data side of continuous batching.

The scheduler (densa/serve/engine.py) keeps a single `ModelCache` whose batch rows are the running requests. Rows
sit at different positions, which the model already handles (densa/model/cache.py): every row has its own position
and its keys sit in slots indexed by that position, so rows never need aligning. Every layer cache says how its
rows join and leave (`concat`, `select_rows`, `trim`), so this module never looks at the mixer type:
- a request joins by concatenating its freshly prefilled cache to the running one on the batch dimension
  (`concat_caches`);
- a request leaves by selecting the remaining rows, after which capacity no remaining row can use is released
  (`drop_rows`).
Each row then decodes exactly what it would alone; tests/test_serve.py checks a continuous schedule against
`generate()` per request.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from densa.model.cache import ModelCache


def concat_caches(a: ModelCache, b: ModelCache) -> ModelCache:
    """One cache holding the rows of `a` then the rows of `b` (both already prefilled, any positions)."""
    return a.concat(b)


def drop_rows(cache: ModelCache, keep: list[int]) -> None:
    """Keep only the batch rows `keep` (in that order), then release capacity no remaining row can use."""
    cache.select_rows(torch.tensor(keep, dtype=torch.long, device=cache.positions.device))
    cache.trim()


def pad_prompts(prompts: list[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Left-pad token lists into (ids (B, T), attention_mask (B, T)) for one batched prefill."""
    T = max(len(p) for p in prompts)
    ids = torch.stack([F.pad(torch.tensor(p, dtype=torch.long), (T - len(p), 0), value=pad_id) for p in prompts])
    mask = torch.stack([F.pad(torch.ones(len(p), dtype=torch.long), (T - len(p), 0)) for p in prompts])
    return ids, mask
