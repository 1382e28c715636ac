"""What a converted model costs in wall time: measured ms per token (prefill and decode), through the fast path
(every `nn.Linear` on oneDNN-packed weights, densa/model/fastlinear.py, on a copy of the model; the fused MoE
experts and TEAL's row-gathered weights are not linear modules and run as they are). Held-out bits per byte and
FLOPs per token at the experts actually used come from the measurement core (densa/measure.py).
"""

from __future__ import annotations

import copy
import time

import torch

from densa.model.fastlinear import pack_linears
from densa.model.model import DensaModel


@torch.no_grad()
def ms_per_token(model: DensaModel, ids: list[int], prefill: int = 256, new_tokens: int = 16,
                 repeats: int = 2, fast: bool = True) -> dict[str, float]:
    """Measured wall time: prefill ms per token of a (1, `prefill`) forward, and greedy decode ms per generated
    token after a 32-token prompt (densa's cached decoding; the prompt's own prefill subtracted); the fastest of
    `repeats` runs each; `fast`: through the fast path (module docstring)."""
    if fast:
        model = copy.deepcopy(model)
        pack_linears(model)
    model.eval()
    x = torch.tensor(ids[:prefill])[None]
    prompt = torch.tensor(ids[:32])[None]
    best_prefill = best_decode = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        best_prefill = min(best_prefill, (time.perf_counter() - start) / x.shape[1])
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, temperature=0.0)  # the prompt's prefill and the first token
        middle = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens + 1, temperature=0.0)
        best_decode = min(best_decode, (time.perf_counter() - 2 * middle + start) / new_tokens)
    return {"prefill_ms_per_token": 1e3 * best_prefill, "decode_ms_per_token": 1e3 * best_decode}
