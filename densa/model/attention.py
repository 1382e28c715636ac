"""The dense baseline: a Llama-style block (RoPE, full causal SDPA attention with grouped-query heads, SwiGLU,
RMSNorm). Module and parameter names match transformers' LlamaDecoderLayer, so Llama checkpoints map 1:1.

Shape letters: B batch, T new tokens, S keys (cached + new), D hidden, H query heads, Hkv key/value heads, d head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densa.config import ModelConfig
from densa.model.cache import KVLayerCache, Positions
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

    def forward(self, x_BTD: Tensor, pos: Positions, cache: KVLayerCache | None = None) -> Tensor:
        B, T, _ = x_BTD.shape
        H, Hkv, d = self.heads, self.kv_heads, self.head_dim
        q = self.q_proj(x_BTD).view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x_BTD).view(B, T, Hkv, d).transpose(1, 2)  # (B, Hkv, T, d)
        v = self.v_proj(x_BTD).view(B, T, Hkv, d).transpose(1, 2)
        q, k = self.rotary(q, pos.ids_BT), self.rotary(k, pos.ids_BT)  # per-row positions (left padding)
        key_valid = pos.valid_BT  # (B, S) False at padding, or None when there is none
        if cache is not None:
            if cache.k is not None:
                if key_valid is not None or cache.k_valid is not None:
                    old = cache.k_valid if cache.k_valid is not None else k.new_ones(B, cache.k.shape[2], dtype=bool)
                    new = key_valid if key_valid is not None else k.new_ones(B, T, dtype=bool)
                    key_valid = torch.cat([old, new], dim=1)
                k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
            cache.k, cache.v, cache.k_valid = k, v, key_valid
        S = k.shape[2]
        mask = None
        if key_valid is not None or 1 < T < S:  # query i sees real keys <= S - T + i
            mask = torch.arange(S, device=k.device)[None, :] <= (S - T + torch.arange(T, device=k.device))[:, None]
            if key_valid is not None:
                mask = mask & key_valid[:, None, :]
                mask = (mask | ~mask.any(-1, keepdim=True))[:, None]  # padding queries: any finite output
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(mask is None and T == S and T > 1),
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

    def forward(self, x: Tensor, pos: Positions, cache: KVLayerCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), pos, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def new_cache(self) -> KVLayerCache:
        return KVLayerCache()
