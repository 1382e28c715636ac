"""The dense baseline: a Llama-style block (RoPE, full causal SDPA attention with grouped-query heads, SwiGLU,
RMSNorm). Module and parameter names match transformers' LlamaDecoderLayer, so Llama checkpoints map 1:1.

Shape letters: B batch, T new tokens, S keys (cached + new), D hidden, H query heads, Hkv key/value heads, d head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densa.config import ModelConfig
from densa.model.cache import KVLayerCache
from densa.model.ffn import build_mlp
from densa.model.layers import RMSNorm, Rotary


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, H, Hkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = H, Hkv, d
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, Hkv * d, bias=False)
        self.v_proj = nn.Linear(D, Hkv * d, bias=False)
        self.o_proj = nn.Linear(H * d, D, bias=False)
        self.rotary = Rotary(d, cfg.rope_theta)

    def forward(self, x_BTD: Tensor, cache: KVLayerCache | None = None) -> Tensor:
        B, T, _ = x_BTD.shape
        H, Hkv, d = self.heads, self.kv_heads, self.head_dim
        seen = cache.seen if cache is not None else 0
        q = self.q_proj(x_BTD).view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x_BTD).view(B, T, Hkv, d).transpose(1, 2)  # (B, Hkv, T, d)
        v = self.v_proj(x_BTD).view(B, T, Hkv, d).transpose(1, 2)
        positions = seen + torch.arange(T, device=x_BTD.device)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is not None:
            if cache.k is not None:
                k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
            cache.k, cache.v, cache.seen = k, v, seen + T
        S = k.shape[2]
        mask = None
        if 1 < T < S:  # a multi-token step after a prefix: query i sees keys <= S - T + i
            mask = torch.arange(S, device=k.device)[None, :] <= (S - T + torch.arange(T, device=k.device))[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(T == S and T > 1),
                                           enable_gqa=Hkv != H)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * d))


class LlamaBlock(nn.Module):
    """x + attn(norm(x)), then + SwiGLU(norm(·))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = CausalSelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = build_mlp(cfg)

    def forward(self, x: Tensor, cache: KVLayerCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def new_cache(self) -> KVLayerCache:
        return KVLayerCache()
