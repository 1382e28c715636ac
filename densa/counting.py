"""Parameter counts and analytic FLOPs per token.

FLOPs count a multiply-add as 2. Attention FLOPs are the *useful* ones: a causal query at position t attends to
t+1 keys (or to the keys of its own chunk for Mega), averaged over the positions of a sequence of `context` tokens.
The EMA is costed as what densa runs: FFT convolution inside chunks (real FFT ≈ 2.5·n·log2 n flops) plus the
state einsums of the chunked form. A MoE FFN is costed at its active experts (`ffn_flops_per_token`). Training FLOPs
are 3× forward (backward ≈ 2× forward).
tests/test_counting.py (tests/test_moe.py for the MoE) checks these formulas against torch.utils.flop_counter on the
tiny preset.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import nn

from densa.config import ModelConfig


@dataclass
class ParamCounts:
    total: int  # unique parameters (a tied head is counted once)
    embedding: int  # token embedding table
    active: int  # parameters touched per token (== total for dense FFNs; MoE counts only routed experts)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def count_parameters(model: nn.Module) -> ParamCounts:
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    embedding = model.embed_tokens.weight.numel()
    inactive = sum(m.inactive_parameters() for m in model.modules() if hasattr(m, "inactive_parameters"))
    return ParamCounts(total=total, embedding=embedding, active=total - inactive)


def mean_keys(context: int, window: int) -> float:
    """Average number of keys a causal query sees when attention is restricted to chunks of `window` tokens."""
    full, rest = divmod(context, window)
    return (full * window * (window + 1) / 2 + rest * (rest + 1) / 2) / context


def fft_flops(n: int) -> float:
    """Real-input FFT of size n: about 2.5·n·log2(n) flops (half of a complex FFT's 5·n·log2 n)."""
    return 2.5 * n * math.log2(n)


@dataclass
class FlopsPerToken:
    """Forward FLOPs per token, by part. `total` sums them; `training` is 3× total."""

    linear: float  # projections and FFN (2 × matmul parameters)
    attention: float  # q·k and probs·v
    ema_state: float  # chunked-EMA state einsums (what each chunk adds to / reads from the carried state)
    ema_fft: float  # FFT convolutions inside chunks (not seen by torch's flop counter)
    lm_head: float

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.ema_state + self.ema_fft + self.lm_head

    @property
    def training(self) -> float:
        return 3 * self.total

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total, "training": self.training}


def flops_per_token(cfg: ModelConfig, context: int | None = None) -> FlopsPerToken:
    """Analytic forward FLOPs per token, averaged over a sequence of `context` tokens (default: the config's
    max_position_embeddings), batch 1. Each layer's block class states its mixer's FLOPs
    (`mixer_flops_per_token(cfg, context)`), so a hybrid layout or a new mixer needs nothing here."""
    from densa.model.model import BLOCKS

    T = context or cfg.max_position_embeddings
    parts = {"linear": 0.0, "attention": 0.0, "ema_state": 0.0, "ema_fft": 0.0}
    for mixer in cfg.layer_mixers:
        for name, value in BLOCKS[mixer].mixer_flops_per_token(cfg, T).items():
            parts[name] += value
        parts["linear"] += ffn_flops_per_token(cfg)
    return FlopsPerToken(**parts, lm_head=2 * cfg.hidden_size * cfg.vocab_size)


def ffn_flops_per_token(cfg: ModelConfig, active_experts: float | None = None) -> float:
    """Forward FLOPs per token of one block's FFN. Dense SwiGLU: 6·D·I. MoE: `active_experts` FFN experts (default:
    the budget target under "moe", K under "topk_moe") × 6·D·F, plus the router 2·D·(E + Z) and the shared expert
    6·D·F + 2·D. Identity experts (an axpy), the softmax/top-k and the dispatch gathers are not counted.
    densa/measure.py passes the experts a layer actually used."""
    D = cfg.hidden_size
    if cfg.ffn == "swiglu":
        return 6 * D * cfg.intermediate_size
    dynamic = cfg.ffn == "moe"
    if active_experts is None:
        active_experts = cfg.target_active_experts if dynamic else cfg.num_experts_per_tok
    pool = cfg.num_experts + (cfg.num_null_experts + cfg.num_identity_experts if dynamic else 0)
    F = cfg.expert_intermediate_size
    return active_experts * 6 * D * F + 2 * D * pool + (6 * D * F + 2 * D if cfg.shared_expert else 0)
