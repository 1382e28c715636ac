"""A Gated DeltaNet block (arXiv 2412.06464, as used by Qwen3-Next and, in a finer-gated form, Kimi Linear): the gated
delta rule of densa/model/delta_rule.py as a sequence mixer, then the block's FFN.

Mixer, per token: q, k, v projections → short causal depthwise convolution + SiLU → L2-normalised q and k per head;
β = σ(W_β x) (write strength), g = −exp(A_log) · softplus(W_a x + dt_bias) (log decay, Mamba-2 parametrisation);
o = gated-delta-rule(q, k, v, β, g) → per-head RMSNorm · SiLU(W_gate x) → o_proj.
The state is K×V per head whatever the context length: decoding costs the same at token 10 and token 100,000.
Left padding (batched prompts of different lengths): padded steps write nothing (β = 0), do not decay (g = 0) and
feed zeros to the convolution, so every row computes what it would alone.

Shape letters: B batch, T new tokens, D hidden, H heads, K key width, V value width, X = 2·H·K + H·V (q|k|v).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densa.config import ModelConfig
from densa.model.cache import LayerCache, Positions
from densa.model.delta_rule import delta_rule_chunked, delta_rule_step
from densa.model.ffn import apply_ffn, build_mlp
from densa.model.layers import RMSNorm
from densa.model.moe import Routed


@dataclass
class DeltaLayerCache:
    """Decoding state of one Gated DeltaNet layer: constant size in the number of tokens."""

    state: Tensor | None = None  # (B, H, K, V) fp32 delta-rule state
    conv: Tensor | None = None  # (B, X, conv_size − 1) the last inputs of the short convolution

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.state, self.conv) if t is not None]

    def select_rows(self, rows_B: Tensor) -> None:
        self.state = None if self.state is None else self.state.index_select(0, rows_B)
        self.conv = None if self.conv is None else self.conv.index_select(0, rows_B)

    def concat(self, other: LayerCache) -> DeltaLayerCache:
        if not isinstance(other, DeltaLayerCache) or (self.state is None) != (other.state is None):
            raise TypeError(f"cannot join layer caches {type(self).__name__} and {type(other).__name__}")
        if self.state is None:
            return DeltaLayerCache()
        conv = None if self.conv is None else torch.cat([self.conv, other.conv])
        return DeltaLayerCache(torch.cat([self.state, other.state]), conv)

    def trim(self, length: int) -> None:
        """Nothing to trim: the state has the same size at every length."""

    def reserve(self, length: int) -> None:
        """Nothing to reserve: the state has the same size at every length."""

    def update(self, state: Tensor, conv: Tensor | None) -> None:
        """Store the new state (in place once allocated, so a decode step allocates nothing that outlives it)."""
        if self.state is not None and self.state.shape == state.shape:
            self.state.copy_(state)
        else:
            self.state = state.detach().clone()
        if conv is not None:
            if self.conv is not None and self.conv.shape == conv.shape:
                self.conv.copy_(conv)
            else:
                self.conv = conv.detach().clone()


class GatedDeltaMixer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_attention_heads
        K, V = cfg.delta_key_dim, cfg.delta_value_dim
        self.heads, self.key_dim, self.value_dim, self.chunk = H, K, V, cfg.delta_chunk_size
        self.qkv_proj = nn.Linear(D, H * (2 * K + V), bias=False)
        self.conv_size = cfg.delta_conv_size
        X = H * (2 * K + V)
        self.conv_weight = nn.Parameter(torch.empty(X, self.conv_size)) if self.conv_size > 1 else None
        self.beta_proj = nn.Linear(D, H, bias=False)
        self.decay_proj = nn.Linear(D, H, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.gate_proj = nn.Linear(D, H * V, bias=False)
        self.o_norm = RMSNorm(V, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(H * V, D, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Decay rates A ~ U(1, 16) and step sizes dt ~ log-U(1e-3, 0.1) through softplus (Mamba-2 / Gated
        DeltaNet); the convolution starts as a near-identity on the current token. The nn.Linear weights are
        initialised by DensaModel.init_weights."""
        H = self.heads
        self.A_log.copy_(torch.empty(H).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(0.1))).clamp_min(1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        if self.conv_weight is not None:
            nn.init.normal_(self.conv_weight, 0.0, 0.02)
            self.conv_weight[:, -1] += 1.0

    def _conv(self, x_BTX: Tensor, cache: DeltaLayerCache | None) -> tuple[Tensor, Tensor | None]:
        """Causal depthwise convolution over time, continuing the cached inputs; also returns the inputs the next
        call needs (B, X, conv_size − 1)."""
        if self.conv_weight is None:
            return x_BTX, None
        B, T, X = x_BTX.shape
        P = self.conv_size - 1
        past = cache.conv if cache is not None and cache.conv is not None else x_BTX.new_zeros(B, X, P)
        seq_BXT = torch.cat([past.to(x_BTX.dtype), x_BTX.transpose(1, 2)], 2)  # (B, X, P + T)
        out = F.conv1d(seq_BXT, self.conv_weight.to(x_BTX.dtype)[:, None, :], groups=X)  # (B, X, T)
        return out.transpose(1, 2), seq_BXT[:, :, T:]

    def forward(self, x_BTD: Tensor, pos: Positions, cache: DeltaLayerCache | None = None) -> Tensor:
        B, T, _ = x_BTD.shape
        H, K, V = self.heads, self.key_dim, self.value_dim
        qkv = self.qkv_proj(x_BTD)  # (B, T, X)
        valid = pos.valid_BT  # (B, T) False at left padding, or None
        if valid is not None:
            qkv = qkv * valid[..., None].to(qkv.dtype)
        qkv, conv_tail = self._conv(qkv, cache)
        qkv = F.silu(qkv)
        q, k, v = qkv.split([H * K, H * K, H * V], -1)
        q = F.normalize(q.view(B, T, H, K).float(), dim=-1).transpose(1, 2)  # (B, H, T, K)
        k = F.normalize(k.view(B, T, H, K).float(), dim=-1).transpose(1, 2)
        v = v.view(B, T, H, V).transpose(1, 2)  # (B, H, T, V)
        beta = torch.sigmoid(self.beta_proj(x_BTD).float()).transpose(1, 2)  # (B, H, T)
        g = (-self.A_log.float().exp() * F.softplus(self.decay_proj(x_BTD).float() + self.dt_bias.float()))
        g = g.transpose(1, 2)  # (B, H, T), <= 0
        if valid is not None:
            keep = valid[:, None, :].to(beta.dtype)
            beta, g = beta * keep, g * keep
        state = cache.state if cache is not None else None
        scale = K**-0.5
        if T == 1 and state is not None:
            o, state = delta_rule_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], beta[:, :, 0], g[:, :, 0], scale, state)
            o = o[:, :, None]
        else:
            o, state = delta_rule_chunked(q, k, v, beta, g, scale, self.chunk, state)
        if cache is not None:
            cache.update(state, conv_tail)
        o = self.o_norm(o.to(x_BTD.dtype)).transpose(1, 2)  # (B, T, H, V)
        gate = F.silu(self.gate_proj(x_BTD)).view(B, T, H, V)
        return self.o_proj((o * gate).reshape(B, T, H * V))


class GatedDeltaBlock(nn.Module):
    """Pre-norm block: x + GatedDelta(norm(x)), then + FFN(norm(·))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mixer = GatedDeltaMixer(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = build_mlp(cfg)

    def forward(self, x: Tensor, pos: Positions, cache: DeltaLayerCache | None = None) -> tuple[Tensor, Routed | None]:
        """(B, T, D) -> (B, T, D), and what the FFN routed (None for a dense FFN)."""
        y = x + self.mixer(self.mixer_norm(x), pos, cache)
        h, routed = apply_ffn(self.mlp, self.mlp_norm(y))
        return y + h, routed

    def new_cache(self) -> DeltaLayerCache:
        return DeltaLayerCache()

    @staticmethod
    def mixer_flops_per_token(cfg: ModelConfig, context: int) -> dict[str, float]:
        """Forward FLOPs per token of the mixer: projections (linear), and the chunked delta rule (attention):
        per head, the C×C products QKᵀ, KKᵀ and their use on δ (≈ 2·C·(2K + V) for C-long chunks, halved for
        causality), the triangular solve on [W | U] (C·(K + V)), and the state reads and write (3 × 2·K·V)."""
        D, H = cfg.hidden_size, cfg.num_attention_heads
        K, V = cfg.delta_key_dim, cfg.delta_value_dim
        linear = 2 * D * (H * (2 * K + V) + 2 * H + H * V) + 2 * H * V * D
        C = min(cfg.delta_chunk_size, context)
        per_head = 2 * C * (2 * K + V) / 2 + C * (K + V) + 3 * 2 * K * V
        conv = 2 * cfg.delta_conv_size * H * (2 * K + V) if cfg.delta_conv_size > 1 else 0
        return {"linear": linear, "attention": H * per_head + conv}
