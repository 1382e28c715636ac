"""Autoregressive sampling with a decoding cache: greedy, temperature, top-k, top-p (nucleus), stop tokens."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from densa.model.compile import CompileConfig, inference_steps

if TYPE_CHECKING:
    from densa.model.model import DensaModel


def sample_next(logits_BV: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row. temperature 0 is greedy (argmax); top-k and top-p filter before sampling."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k}: must be >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits = logits_BV.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: DensaModel, input_ids: Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens: Iterable[int] = (),
             generator: torch.Generator | None = None, attention_mask: Tensor | None = None,
             compile: str | CompileConfig = "auto") -> Tensor:
    """Continue each row of `input_ids` (B, T) by up to `max_new_tokens`, stopping a row at a stop token.

    Returns (B, T + n) with n <= max_new_tokens; rows that stopped early are filled with their stop token.
    The prompt is prefilled in one cached forward; every later step feeds one token. Prompts of different lengths
    are left-padded with `attention_mask` 0 at the padding; each row then generates what it would alone.
    `compile` is the switch of densa/model/compile.py for the decode step ("auto": compiled on CUDA only).
    The prompt is validated once (forward); the decode steps feed the model's own samples unchecked.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=input_ids.device)
    steps = inference_steps(model, compile)
    cache = model.new_cache(max_length=input_ids.shape[1] + max_new_tokens)
    logits = steps.prefill(input_ids, cache, attention_mask).logits[:, -1]
    out, done = [input_ids], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    last = None
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if last is not None:
            token = torch.where(done, last, token)  # finished rows repeat their stop token
        done = done | torch.isin(token, stops)
        out.append(token[:, None])
        last = token
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = steps.decode(token[:, None], cache)[0]
    return torch.cat(out, dim=1)
