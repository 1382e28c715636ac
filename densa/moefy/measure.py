"""What a converted model costs and how well it predicts: held-out bits per byte with the routing actually used,
FLOPs per token at the measured number of active experts, and measured ms per token (prefill and decode).

Bits per byte: the text's tokens are cut into windows of `window` + 1 tokens overlapping by one, so every token but
the first is predicted once with up to `window` tokens of context; bytes are the UTF-8 bytes of the predicted
tokens, so the figure is comparable across tokenizers.
Shape suffixes: N windows, L positions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from densa.counting import flops_per_token
from densa.model.model import DensaModel


@dataclass
class TextScore:
    bpb: float
    tokens: int  # predicted tokens
    bytes: int  # their UTF-8 bytes
    experts_per_layer: list[float]  # mean FFN experts per token in each MoE layer (empty for a dense model)


@torch.no_grad()
def bits_per_byte(model: DensaModel, tokenizer, ids: list[int], window: int = 512, batch: int = 4) -> TextScore:
    """Held-out bits per byte of the token sequence `ids` (module docstring), and the routing it used."""
    n = (len(ids) - 1) // window
    if n < 1:
        raise ValueError(f"need more than {window} tokens of text, got {len(ids)}")
    ids_NL = torch.tensor(ids[: n * window + 1]).unfold(0, window + 1, window)  # (N, window + 1), 1 token overlap
    nats, experts = 0.0, []
    model.eval()
    for start in range(0, n, batch):
        chunk = ids_NL[start : start + batch]
        out = model(chunk[:, :-1])
        nats += float(F.cross_entropy(out.logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum"))
        experts.append([float(v) * len(chunk) for k, v in sorted(out.aux.items(), key=_layer_order)
                        if k.endswith(".mean_ffn_experts")])
    n_bytes = len(tokenizer.decode(ids[1 : n * window + 1]).encode("utf-8"))
    per_layer = [sum(col) / n for col in zip(*experts, strict=True)] if experts and experts[0] else []
    return TextScore(nats / math.log(2) / n_bytes, n * window, n_bytes, per_layer)


def _layer_order(item: tuple[str, object]) -> tuple[int, str]:
    name = item[0]
    return (int(name.split(".")[1]), name) if name.startswith("layers.") else (-1, name)


def measured_flops_per_token(model: DensaModel, experts_per_layer: list[float], context: int) -> float:
    """Forward FLOPs per token with each MoE layer costed at the experts it actually used (`experts_per_layer`)
    instead of its target: densa.counting's figure with the FFN term replaced layer by layer."""
    cfg = model.config
    total = flops_per_token(cfg, context).total
    if cfg.ffn == "swiglu" or not experts_per_layer:
        return total
    per_expert = 6 * cfg.hidden_size * cfg.expert_intermediate_size  # SwiGLU of width F: 3 matrices, 2 FLOPs/MAC
    return total + sum((used - cfg.target_active_experts) * per_expert for used in experts_per_layer)


@torch.no_grad()
def ms_per_token(model: DensaModel, ids: list[int], prefill: int = 256, new_tokens: int = 16,
                 repeats: int = 2) -> dict[str, float]:
    """Measured wall time: prefill ms per token of a (1, `prefill`) forward, and greedy decode ms per generated
    token after a 32-token prompt (densa's cached decoding; the prompt's own prefill subtracted); the fastest of
    `repeats` runs each."""
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
