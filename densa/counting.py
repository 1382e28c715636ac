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
    max_position_embeddings), batch 1."""
    T = context or cfg.max_position_embeddings
    D, L = cfg.hidden_size, cfg.num_hidden_layers
    if cfg.mixer == "attention":
        d, H, Hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        mixer = D * H * d * 2 + D * Hkv * d * 2
        attention = 2 * 2 * H * d * mean_keys(T, T)
        ema_state = ema_fft = 0.0
    else:
        Z, V, N = cfg.shared_qk_dim, cfg.value_dim, cfg.ema_dim
        mixer = D * V + D * (Z + V + D) + V * D
        attention = 2 * (Z + V) * mean_keys(T, cfg.attn_chunk_size)
        c = min(cfg.ema_chunk_size, T)
        n = 1 << (2 * c - 1).bit_length()
        # CEMA: the state contractions run as real matmuls over (re, im) pairs (2x the real EMA's work, a real
        # input times a complex weight); the kernel einsum is complex x complex (4 real multiply-adds each)
        pairs, cplx = (2, 4) if cfg.complex_ema else (1, 1)
        # state-in and state-out einsums run over the sequence padded to whole chunks; per sequence, the kernel
        # einsum over (D, N, c) and, when the last chunk is partial, the final-state einsum over its r tokens
        padded, r = -(-T // c) * c, T % c
        ema_state = ((2 * 2 * D * N * padded + 2 * D * N * r) * pairs + 2 * D * N * c * cplx) / T
        # per chunk of c tokens and channel: rfft(x), pointwise product (n/2+1 complex), irfft; plus rfft(kernel)
        ema_fft = D * (2 * fft_flops(n) + 6 * (n // 2 + 1)) / c + D * fft_flops(n) / T
    return FlopsPerToken(linear=L * (2 * mixer + ffn_flops_per_token(cfg)), attention=L * attention,
                         ema_state=L * ema_state, ema_fft=L * ema_fft, lm_head=2 * D * cfg.vocab_size)


def ffn_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of one block's FFN. Dense SwiGLU: 6·D·I. MoE: the active experts (the budget target
    under "moe", K under "topk_moe") × 6·D·F, plus the router 2·D·(E + Z) and the shared expert 6·D·F + 2·D.
    Identity experts (an axpy), the softmax/top-k and the dispatch gathers are not counted."""
    D = cfg.hidden_size
    if cfg.ffn == "swiglu":
        return 6 * D * cfg.intermediate_size
    dynamic = cfg.ffn == "moe"
    active = cfg.target_active_experts if dynamic else cfg.num_experts_per_tok
    pool = cfg.num_experts + (cfg.num_null_experts + cfg.num_identity_experts if dynamic else 0)
    F = cfg.expert_intermediate_size
    return active * 6 * D * F + 2 * D * pool + (6 * D * F + 2 * D if cfg.shared_expert else 0)
